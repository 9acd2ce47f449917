import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mlpipe.anonymize import anonymize
from mlpipe.config import AnonymizeConfig, IngestConfig, LabelConfig, SourceConfig, SplitConfig
from mlpipe.errors import MlpipeError
from mlpipe.ingest import ingest
from mlpipe.label import label
from mlpipe.split import load_split, split

from .helpers import write_dataset


@pytest.fixture
def labelled(state, sample_root):
    source = SourceConfig(uri=str(sample_root))
    return label(anonymize(ingest(source, IngestConfig()), AnonymizeConfig(), source), LabelConfig())


def test_split_is_grouped_stratified_and_complete(labelled):
    result = split(labelled, SplitConfig())
    table = pd.read_csv(result.file("assignments.csv"))
    assert table.groupby("subject_id")["split"].nunique().max() == 1
    for name in ("train", "val", "test"):
        assert set(table.loc[table["split"] == name, "label"]) == set(range(10))
    sizes = result.report["sizes"]
    assert sum(sizes.values()) == labelled.report["labelled"]
    assert 0.08 < sizes["test"] / sum(sizes.values()) < 0.22
    images, y = load_split(result, "val")
    assert len(images) == len(y) == sizes["val"] and images.dtype == np.uint8


def test_split_is_deterministic_per_seed(labelled):
    a = split(labelled, SplitConfig(seed=3)).file("assignments.csv").read_bytes()
    b = split(labelled, SplitConfig(seed=3)).file("assignments.csv").read_bytes()
    c = split(labelled, SplitConfig(seed=4)).file("assignments.csv").read_bytes()
    assert a == b and a != c


def test_class_too_small_to_stratify_is_a_one_line_error(state, tmp_path):
    labels = [0] * 30 + [1] * 30 + [2] * 2
    root = write_dataset(tmp_path / "d", labels)
    source = SourceConfig(uri=str(root))
    policy = {"subject": "pseudonymize", "label": "keep"}
    data = anonymize(ingest(source, IngestConfig(image_size=8)), AnonymizeConfig(policy=policy), source)
    labelled = label(data, LabelConfig(columns=["label"]))
    with pytest.raises(MlpipeError, match="too few items to stratify: class '2' \\(2 group\\(s\\)\\)"):
        split(labelled, SplitConfig(group_column="subject"))


def test_fewer_groups_than_the_split_fractions_folds_still_split(state, tmp_path):
    """Six patients, each with images of both classes: a 0.15 share is one of 7 group folds, and
    scikit-learn refuses 7 folds of 6 groups (ValueError). The split takes 6 larger folds instead,
    and no patient spans two splits."""
    labels = [i % 2 for i in range(36)]
    root = write_dataset(tmp_path / "d", labels, groups=[i // 6 for i in range(36)])
    source = SourceConfig(uri=str(root))
    policy = {"subject": "pseudonymize", "label": "keep"}
    data = anonymize(ingest(source, IngestConfig(image_size=8)), AnonymizeConfig(policy=policy), source)
    labelled = label(data, LabelConfig(columns=["label"]))
    report = split(labelled, SplitConfig(group_column="subject")).report
    assert report["groups"] == {"train": 4, "val": 1, "test": 1} and report["leaks"]["subjects_across_splits"] == 0
    # kfold asks for its folds by name: 5 of the 5 patients left works, 6 is one line (it was scikit-learn's ValueError)
    assert split(labelled, SplitConfig(group_column="subject", mode="kfold", folds=5)).report["groups"]["test"] == 1
    with pytest.raises(MlpipeError, match=r"^too few groups for split.folds=6: 5 left after the test split; lower "
                                          r"split.folds or use split.mode holdout$"):  # fmt: skip
        split(labelled, SplitConfig(group_column="subject", mode="kfold", folds=6))


def test_items_without_a_group_value_are_one_group_and_the_error_says_how_many(state, tmp_path):
    """A blank group value names no subject: those items are kept together (none can leak), and
    when that leaves a class too few groups the error says why."""
    labels = [0] * 30 + [1] * 30 + [2] * 6
    root = write_dataset(tmp_path / "d", labels)
    manifest = pd.read_csv(root / "manifest.csv", dtype=str)
    manifest.loc[manifest["label"] == "2", "subject"] = ""
    manifest.to_csv(root / "manifest.csv", index=False)
    source = SourceConfig(uri=str(root))
    policy = {"subject": "pseudonymize", "label": "keep"}
    data = anonymize(ingest(source, IngestConfig(image_size=8)), AnonymizeConfig(policy=policy), source)
    labelled = label(data, LabelConfig(columns=["label"]))
    with pytest.raises(MlpipeError, match=r"class '2' \(1 group\(s\)\); .* 6 item\(s\) have no subject value and are one group"):
        split(labelled, SplitConfig(group_column="subject"))


def test_manifest_is_byte_identical_for_the_same_seed_and_has_a_chart(labelled):
    from mlpipe.store import state_dir

    first = split(labelled, SplitConfig(seed=5))
    manifest = first.file("manifest.parquet").read_bytes()
    chart = first.file("class_counts.png").read_bytes()
    import shutil

    shutil.rmtree(state_dir() / "work" / "split")  # recompute from scratch, not from the same folder
    again = split(labelled, SplitConfig(seed=5))
    assert again.file("manifest.parquet").read_bytes() == manifest
    assert again.file("class_counts.png").read_bytes() == chart
    assert list(pd.read_parquet(again.file("manifest.parquet")).columns) == ["item_id", "split", "label"]
    assert again.report["proportion_gap_linf"] < 0.1


def test_class_proportions_beyond_tolerance_fail_the_run(state, tmp_path):
    """Class 'a' comes in three subjects of 12 images, the others one image per subject: whole
    groups cannot balance 'a', and the gap exceeds both the tolerance and one group's step."""
    from mlpipe.anonymize import anonymize
    from mlpipe.config import PipelineConfig
    from mlpipe.ingest import ingest
    from mlpipe.label import label
    from tests.field_cases import CASE_OVERRIDES, write_shapes

    root = write_shapes(tmp_path / "data", ["a", "b", "c"], 36)
    manifest = pd.read_csv(root / "manifest.csv")
    manifest["subject"] = [f"a{i // 12}" if lab == "a" else f"x{i}" for i, lab in enumerate(manifest["label"])]
    manifest.to_csv(root / "manifest.csv", index=False)
    config = PipelineConfig().with_overrides({**CASE_OVERRIDES, "source.uri": str(root), "label.find_label_issues": False})
    labelled = label(anonymize(ingest(config.source, config.ingest), config.anonymize, config.source), config.label)
    with pytest.raises(MlpipeError, match=r"class proportions differ by 0\.\d+ between splits \(split.tolerance is 0.1; "
                                          r"one group moves a share by 0\.0\d+\)"):
        split(labelled, config.split)


def test_fractions_must_sum_to_one():
    from mlpipe.config import load_config

    with pytest.raises(MlpipeError, match="split fractions must sum to 1 \\(train \\+ val \\+ test = 1.1\\)"):
        load_config(None, ["split.train_fraction=0.8"])


@settings(max_examples=40, deadline=None)
@given(
    classes=st.integers(min_value=2, max_value=5),
    groups_per_class=st.integers(min_value=6, max_value=20),
    items_per_group=st.integers(min_value=1, max_value=4),
    mixed=st.booleans(),
    seed=st.integers(min_value=0, max_value=10_000),
)
def test_split_invariants_hold_across_random_class_and_group_mixes(classes, groups_per_class, items_per_group, mixed, seed):
    from mlpipe.split import assign_splits

    rng = np.random.default_rng(seed)
    groups = np.repeat(np.arange(classes * groups_per_class), items_per_group)
    y = groups % classes
    if mixed:  # some groups hold items of another class too
        flip = rng.random(len(y)) < 0.1
        y = np.where(flip, rng.integers(0, classes, len(y)), y)
    config = SplitConfig(seed=seed)
    assigned = assign_splits(y, groups, config)
    assert set(assigned) <= {"train", "val", "test"} and len(assigned) == len(y)
    frame = pd.DataFrame({"group": groups, "split": assigned})
    assert frame.groupby("group")["split"].nunique().max() == 1  # no group spans two splits
    assert (assign_splits(y, groups, config) == assigned).all()  # deterministic per seed
    for name in ("train", "val", "test"):
        assert (assigned == name).any()


def test_small_data_within_one_group_step_is_split_not_refused(state, tmp_path):
    """Field case case19: 111 labelled items of 3 classes, two per subject. The best grouped split
    leaves a class share 0.103 apart, under what moving one 2-item group into a 17-item test split
    changes (0.118); the old fixed 0.1 refused an ordinary dataset for arithmetic."""
    from mlpipe.anonymize import anonymize
    from mlpipe.config import PipelineConfig
    from mlpipe.ingest import ingest
    from mlpipe.label import label
    from tests.field_cases import CASE_OVERRIDES, write_shapes

    root = write_shapes(tmp_path / "data", ["0", "1", "2"], 40, manifest="jsonl",
                        label=lambda c, i, name: None if i % 13 == 12 else c)  # fmt: skip
    config = PipelineConfig().with_overrides({**CASE_OVERRIDES, "source.uri": str(root),
                                              "source.manifest": "manifest.jsonl", "label.classes": ["0", "1", "2"]})  # fmt: skip
    labelled = label(anonymize(ingest(config.source, config.ingest), config.anonymize, config.source), config.label)
    result = split(labelled, config.split)
    assert config.split.tolerance < result.report["proportion_gap_linf"] <= result.report["group_step"]
    assert sum(result.report["sizes"].values()) == labelled.report["labelled"] == 111


def test_a_dicom_item_without_a_patient_id_is_grouped_by_its_study():
    """A mixed export (some Patient IDs blanked upstream): those items fall back to their study,
    not into one group of every such item; an item with neither value is in the one blank group."""
    from mlpipe.split import group_values

    items = pd.DataFrame({"PatientID": ["p_1", "", "", None, ""], "StudyInstanceUID": ["2.25.1", "2.25.2", "2.25.3", "2.25.3", ""]})
    assert group_values(items, "PatientID").tolist() == ["p_1", "study 2.25.2", "study 2.25.3", "study 2.25.3", ""]
    assert group_values(items, "StudyInstanceUID").tolist() == ["2.25.1", "2.25.2", "2.25.3", "2.25.3", ""]  # no fallback
    assert group_values(items.drop(columns="StudyInstanceUID"), "PatientID").tolist() == ["p_1", "", "", "", ""]
