import json

import pandas as pd
import pytest

from mlpipe.anonymize import anonymize
from mlpipe.config import AnonymizeConfig, IngestConfig, LabelConfig, SourceConfig
from mlpipe.errors import MlpipeError
from mlpipe.ingest import ingest
from mlpipe.label import label, majority_vote


@pytest.mark.parametrize(
    ("votes", "expected"),
    [
        (["3", "3", "3"], ("3", None)),
        (["3", "5", "3"], ("3", None)),
        (["3", "", ""], ("3", None)),
        (["3", "5", ""], (None, "tie")),
        (["1", "2", "3"], (None, "tie")),
        (["", "", ""], (None, "unlabelled")),
    ],
)
def test_majority_vote(votes, expected):
    assert majority_vote(votes) == expected


@pytest.fixture
def dataset(state, sample_root):
    source = SourceConfig(uri=str(sample_root))
    return anonymize(ingest(source, IngestConfig()), AnonymizeConfig(), source)


def test_labels_class_map_and_review_queue(dataset):
    result = label(dataset, LabelConfig())
    class_map = json.loads(result.file("label_map.json").read_text())
    assert class_map == {str(d): d for d in range(10)}
    items = pd.read_parquet(result.file("items.parquet"))
    review = pd.read_csv(result.file("review_queue.csv"))
    assert len(items) + len(review) == result.report["items"]
    assert set(review["reason"]) == {"tie", "unlabelled"}
    assert not set(review["item_id"]) & set(items["item_id"])  # review items never reach training
    assert (items["y"] == items["label"].map(class_map)).all()
    assert 0.05 < result.report["disagreement_fraction"] < 0.15
    assert list(review.columns) == ["item_id", "reason"]  # anonymized references only


def test_unknown_labels_stop_the_run(dataset):
    with pytest.raises(MlpipeError, match="unknown label\\(s\\) not in label.classes: 8, 9"):
        label(dataset, LabelConfig(classes=[str(d) for d in range(8)]))


def test_missing_label_column(dataset):
    with pytest.raises(MlpipeError, match="label column\\(s\\) not found"):
        label(dataset, LabelConfig(columns=["grade"]))


def test_near_duplicates_with_different_labels_go_to_review():
    from mlpipe.label import near_duplicate_conflicts

    items = pd.DataFrame({"near_dup_group": ["n0", "n0", "n2", "n2", ""]})
    labels = pd.Series(["cat", "dog", "cat", "cat", "dog"], dtype=object)
    assert near_duplicate_conflicts(items, labels).tolist() == [True, True, False, False, False]


def test_exact_duplicates_labelled_differently_go_to_review(state, tmp_path):
    import numpy as np
    from PIL import Image

    root = tmp_path / "d"
    (root / "img").mkdir(parents=True)
    for i in range(3):
        Image.fromarray(np.full((8, 8), 40 * i, np.uint8)).save(root / "img" / f"{i}.png")
    (root / "img" / "copy.png").write_bytes((root / "img" / "0.png").read_bytes())
    pd.DataFrame({"image": ["img/0.png", "img/1.png", "img/2.png", "img/copy.png"],
                  "grade": ["a", "b", "b", "c"]}).to_csv(root / "manifest.csv", index=False)  # fmt: skip
    source = SourceConfig(uri=str(root))
    data = anonymize(ingest(source, IngestConfig()), AnonymizeConfig(policy={"grade": "keep"}), source)
    result = label(data, LabelConfig(columns=["grade"]))
    assert result.report["review_queue"] == {"duplicate label conflict": 1}
    assert result.report["labelled"] == 2


def test_agreement_is_krippendorffs_alpha_overall_and_per_class(dataset):
    result = label(dataset, LabelConfig())
    alpha = result.report["krippendorff_alpha"]
    assert 0.8 < alpha < 1.0  # ~10% of items with a dissent among 10 classes
    per_class = result.report["krippendorff_alpha_per_class"]
    assert set(per_class) == {str(d) for d in range(10)} and all(0.5 < v <= 1.0 for v in per_class.values())


def test_agreement_known_answers():
    from mlpipe.label import agreement

    perfect = pd.DataFrame({"a": ["x", "y", "x", "y"], "b": ["x", "y", "x", "y"]})
    assert agreement(perfect, ["x", "y"])["krippendorff_alpha"] == 1.0
    opposed = pd.DataFrame({"a": ["x", "y", "x", "y"], "b": ["y", "x", "y", "x"]})
    assert agreement(opposed, ["x", "y"])["krippendorff_alpha"] < 0


def test_label_studio_round_trip(dataset, tmp_path):
    from mlpipe.label import read_label_studio

    result = label(dataset, LabelConfig())
    tasks = json.loads(result.file("review_tasks.json").read_text())
    review = pd.read_csv(result.file("review_queue.csv"))
    assert [t["data"]["item_id"] for t in tasks] == review["item_id"].tolist()
    assert all(t["data"]["image"] == f"images/{t['data']['item_id']}.png" for t in tasks)  # anonymized only
    # An annotator labels the queue in Label Studio, which exports JSON and JSON-MIN:
    exported = [{**t, "id": i, "annotations": [{"result": [{"type": "choices", "value": {"choices": [str(i % 10)]}}]}]}
                for i, t in enumerate(tasks)]  # fmt: skip
    (tmp_path / "export.json").write_text(json.dumps(exported))
    minimal = [{**t["data"], "id": i, "choice": str(i % 10)} for i, t in enumerate(tasks)]
    (tmp_path / "export-min.json").write_text(json.dumps(minimal))
    for name in ("export.json", "export-min.json"):
        back = read_label_studio(tmp_path / name)
        assert back["item_id"].tolist() == review["item_id"].tolist()
        assert back["label"].tolist() == [str(i % 10) for i in range(len(tasks))]


def test_case_whitespace_and_synonyms_are_normalized():
    from mlpipe.label import normalize

    synonyms = {normalize("Kitty"): "cat"}
    assert [normalize(v, synonyms) for v in ["Cat", "  cat ", "KITTY", "Dog  Breed"]] == ["cat", "cat", "cat", "dog breed"]
    assert majority_vote([normalize(v, synonyms) for v in ["Cat", " cat", "kitty"]]) == ("cat", None)
    assert majority_vote(["a", "a", "b"], min_agreement=0.9) == (None, "low agreement")


def test_min_agreement_sends_weak_majorities_to_review(dataset):
    strict = label(dataset, LabelConfig(min_agreement=0.9))
    default = label(dataset, LabelConfig())
    assert strict.report["review_queue"].get("low agreement", 0) > 50  # the 2-of-3 items
    assert "low agreement" not in default.report["review_queue"]
    assert strict.report["labelled"] + sum(strict.report["review_queue"].values()) == strict.report["items"]


@pytest.mark.parametrize("policy", ["review", "drop", "prefer"])
def test_tie_policies(dataset, policy):
    config = LabelConfig(tie_policy=policy, prefer_annotator="annotator_2" if policy == "prefer" else None)
    result = label(dataset, config)
    r = result.report
    assert r["labelled"] + sum(r["review_queue"].values()) + r["dropped_ties"] == r["items"]  # nothing lost
    baseline = label(dataset, LabelConfig()).report
    ties = baseline["review_queue"]["tie"]
    if policy == "review":
        assert r["review_queue"]["tie"] == ties and r["dropped_ties"] == 0
    elif policy == "drop":
        assert "tie" not in r["review_queue"] and r["dropped_ties"] == ties
    else:  # the sample's ties are 3-way splits with one vote each: the preferred vote always wins
        assert "tie" not in r["review_queue"] and r["labelled"] == baseline["labelled"] + ties


def test_prefer_needs_an_annotator_column():
    from mlpipe.config import load_config

    with pytest.raises(MlpipeError, match="tie_policy prefer needs prefer_annotator"):
        load_config(None, ["label.tie_policy=prefer"])
