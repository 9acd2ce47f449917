import numpy as np
import pandas as pd
import pytest

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
