import json
from pathlib import Path

import pandas as pd
import pytest

from mlpipe.anonymize import anonymize
from mlpipe.config import AnonymizeConfig, IngestConfig, LabelConfig, PipelineConfig, SourceConfig
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
    assert set(review["reason"]) == {"tie", "unlabelled"}  # label-error flags are advisory (label_issues.csv)
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
    for i in range(4):
        Image.fromarray(np.full((8, 8), 40 * i, np.uint8)).save(root / "img" / f"{i}.png")
    (root / "img" / "copy.png").write_bytes((root / "img" / "0.png").read_bytes())
    pd.DataFrame({"image": ["img/0.png", "img/1.png", "img/2.png", "img/3.png", "img/copy.png"],
                  "grade": ["a", "b", "b", "d", "c"]}).to_csv(root / "manifest.csv", index=False)  # fmt: skip
    source = SourceConfig(uri=str(root))
    data = anonymize(ingest(source, IngestConfig(max_drop_fraction=0.5)), AnonymizeConfig(policy={"grade": "keep"}), source)
    result = label(data, LabelConfig(columns=["grade"], max_drop_fraction=0.5))
    assert result.report["review_queue"] == {"duplicate label conflict": 1}
    assert result.report["labelled"] == 3


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
    import base64
    import io

    import numpy as np
    from PIL import Image

    from mlpipe.label import read_label_studio

    result = label(dataset, LabelConfig())
    tasks = json.loads(result.file("review_tasks.json").read_text())
    review = pd.read_csv(result.file("review_queue.csv"))
    assert [t["data"]["item_id"] for t in tasks] == review["item_id"].tolist()
    # The image Label Studio shows is the anonymized PNG itself, inline: the pixels the model sees.
    items = pd.read_parquet(dataset.file("items.parquet")).set_index("item_id")
    pixels = np.load(dataset.file("pixels"), mmap_mode="r")
    for task in tasks:
        head, _, body = task["data"]["image"].partition(",")
        assert head == "data:image/png;base64"
        png = base64.b64decode(body)
        assert png == (dataset.file("images") / f"{task['data']['item_id']}.png").read_bytes()
        shown = np.asarray(Image.open(io.BytesIO(png)))
        assert (shown == pixels[items.at[task["data"]["item_id"], "__pixel_index"]].squeeze()).all()
        assert set(task["data"]) == {"image", "item_id", "why"}  # anonymized content and a content hash only
    # An annotator labels the queue in Label Studio, which exports JSON and JSON-MIN:
    exported = [{**t, "id": i, "annotations": [{"result": [{"from_name": "label", "to_name": "image", "type": "choices",
                                                            "value": {"choices": [str(i % 10)]}}]}]}
                for i, t in enumerate(tasks)]  # fmt: skip
    (tmp_path / "export.json").write_text(json.dumps(exported))
    minimal = [{**t["data"], "id": i, "label": str(i % 10)} for i, t in enumerate(tasks)]
    (tmp_path / "export-min.json").write_text(json.dumps(minimal))
    for name in ("export.json", "export-min.json"):
        back = read_label_studio(tmp_path / name)
        assert back["item_id"].tolist() == review["item_id"].tolist()
        assert back["label"].tolist() == [str(i % 10) for i in range(len(tasks))]


def test_review_tasks_carry_the_label_stage_models_predictions(dataset, tmp_path):
    from mlpipe.label import read_label_studio

    result = label(dataset, LabelConfig())
    tasks = json.loads(result.file("review_tasks.json").read_text())
    made = result.report["review_predictions"]
    assert made["skipped"] is None and made["items"] == len(tasks) > 0
    accuracy = result.report["label_issues"]["model_oof_accuracy"]
    assert made["model_version"].endswith(f"oof_acc={accuracy:.3f}")  # the model's measured quality, in its name
    for task in tasks:
        (prediction,) = task["predictions"]
        assert prediction["model_version"] == made["model_version"] and 0 < prediction["score"] <= 1
        (choice,) = prediction["result"]
        assert (choice["from_name"], choice["to_name"], choice["type"]) == ("label", "image", "choices")
        assert choice["value"]["choices"][0] in json.loads(result.file("label_map.json").read_text())
    # The tasks come back from Label Studio with their pre-annotations but nobody's answer: no review.
    exported = [{**t, "id": i, "annotations": []} for i, t in enumerate(tasks)]
    (tmp_path / "export.json").write_text(json.dumps(exported))
    assert (read_label_studio(tmp_path / "export.json")["label"] == "").all()
    # A model below label.issue_min_accuracy makes no suggestions, nor does a stage that fits none; each says why.
    for config, why in [(LabelConfig(issue_min_accuracy=1.0), "skipped: the model's out-of-fold accuracy"),
                        (LabelConfig(find_label_issues=False), "skipped: label.find_label_issues is off")]:  # fmt: skip
        quiet = label(dataset, config)
        assert quiet.report["review_predictions"]["skipped"].startswith(why)
        assert not any("predictions" in t for t in json.loads(quiet.file("review_tasks.json").read_text()))


def test_labeling_config_lists_the_classes_escaped():
    import xml.etree.ElementTree as ET

    from mlpipe.label import labeling_config

    names = ["cat & dog", "<b>", 'say "hi"', "it's"]
    view = ET.fromstring(labeling_config(names))
    assert view.find("Image").attrib == {"name": "image", "value": "$image", "zoom": "true"}
    choices = view.find("Choices")
    assert (choices.get("name"), choices.get("toName")) == ("label", "image")
    assert [c.get("value") for c in choices.findall("Choice")] == names


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
    config = LabelConfig(
        tie_policy=policy, prefer_annotator="annotator_2" if policy == "prefer" else None, find_label_issues=False
    )
    result = label(dataset, config)
    r = result.report
    assert r["labelled"] + sum(r["review_queue"].values()) + r["dropped_ties"] == r["items"]  # nothing lost
    baseline = label(dataset, LabelConfig(find_label_issues=False)).report
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


def test_dawid_skene_matches_crowd_kit():
    """Held to crowd-kit 1.4.2's answers (tests/reference/crowdkit_dawid_skene.py regenerates them)."""
    import numpy as np

    from mlpipe.label import dawid_skene

    case = json.loads((Path(__file__).parent / "data" / "dawid_skene_crowdkit.json").read_text())
    probas = dawid_skene(np.array(case["votes"]), 3)
    np.testing.assert_allclose(probas, case["probas"], atol=1e-6)
    assert probas.argmax(axis=1).tolist() == case["labels"]


def test_dawid_skene_resolves_ties_by_annotator_reliability():
    """Annotator c swaps cat and dog; a, b and d are reliable. Items 6 and 7 are 2-2 ties for
    majority vote; Dawid-Skene sides with the annotators who agree with the others elsewhere."""
    votes = pd.DataFrame(
        [["cat", "cat", "dog", "cat"], ["dog", "dog", "cat", "dog"], ["cat", "cat", "dog", ""],
         ["dog", "dog", "cat", ""], ["bird", "bird", "bird", "bird"], ["cat", "cat", "dog", "cat"],
         ["cat", "dog", "dog", "cat"], ["dog", "cat", "cat", "dog"], ["bird", "cat", "bird", ""],
         ["dog", "dog", "cat", "dog"], ["", "", "", ""]],
        columns=list("abcd"),
    )  # fmt: skip
    from mlpipe.label import consensus

    majority, why, _ = consensus(votes, LabelConfig(columns=list("abcd")))
    assert why[6] == why[7] == "tie" and majority[6] is None
    labels, why, _ = consensus(votes, LabelConfig(columns=list("abcd"), consensus="dawid_skene"))
    # crowd-kit 1.4.2 answers the same (cat, dog, cat, dog, bird, cat, cat, dog, bird, dog)
    assert labels[:10].tolist() == ["cat", "dog", "cat", "dog", "bird", "cat", "cat", "dog", "bird", "dog"]
    assert labels[10] is None and why[10] == "unlabelled"


def test_dawid_skene_in_the_stage(dataset):
    result = label(dataset, LabelConfig(consensus="dawid_skene", find_label_issues=False))
    baseline = label(dataset, LabelConfig(find_label_issues=False)).report
    r = result.report
    assert r["consensus"] == "dawid_skene"
    assert "tie" not in r["review_queue"]  # the sample's 3-way ties resolve by annotator reliability
    assert r["labelled"] > baseline["labelled"]
    assert r["labelled"] + sum(r["review_queue"].values()) == r["items"]


def test_likely_label_errors_finds_planted_flips(dataset):
    import numpy as np

    from mlpipe.ingest import PIXEL_INDEX
    from mlpipe.label import likely_label_errors, thumbnails

    items = pd.read_parquet(label(dataset, LabelConfig(find_label_issues=False)).file("items.parquet"))
    features = thumbnails(np.load(dataset.file("pixels"), mmap_mode="r"), items[PIXEL_INDEX].to_numpy())
    y = items["y"].to_numpy().copy()
    rng = np.random.default_rng(0)
    flipped = rng.choice(len(y), 30, replace=False)
    y[flipped] = (y[flipped] + rng.integers(1, 10, 30)) % 10
    flagged, _, accuracy, skipped = likely_label_errors(features, y, folds=5, min_accuracy=0.8)
    assert skipped is None and accuracy > 0.8
    assert flagged[flipped].sum() >= 24  # measured 28 of 30
    assert flagged.sum() - flagged[flipped].sum() < 0.05 * len(y)  # measured 30 of 1058


def test_label_issues_are_flagged_for_review_and_stay_in_training_and_test(dataset):
    result = label(dataset, LabelConfig())
    issues = pd.read_csv(result.file("label_issues.csv"))
    assert len(issues) == result.report["label_issues"]["flagged"] > 0
    assert result.report["label_issues"]["model_oof_accuracy"] > 0.8
    items = pd.read_parquet(result.file("items.parquet"))
    assert set(issues["item_id"]) <= set(items["item_id"])  # kept: the test set is never made easier
    unflagged = pd.read_parquet(label(dataset, LabelConfig(find_label_issues=False)).file("items.parquet"))
    assert items.set_index("item_id")["label"].sort_index().equals(unflagged.set_index("item_id")["label"].sort_index())
    flagged = items.set_index("item_id").loc[issues["item_id"], "label"].astype(str)
    assert (flagged.to_numpy() == issues["given_label"].astype(str).to_numpy()).all()  # not silently relabelled
    review = pd.read_csv(result.file("review_queue.csv"))
    assert "likely label error" not in set(review["reason"])


def test_flagged_items_reach_the_test_split_and_leave_training_only_on_request(dataset):
    """Flags are advisory all the way down: split keeps flagged items in whichever split they fall
    (the test set included); resample.drop_label_issues leaves them out of the training set only."""
    import numpy as np

    from mlpipe.resample import resample, training_set_for
    from mlpipe.split import split

    config = PipelineConfig()
    labelled = label(dataset, config.label)
    flagged = set(pd.read_csv(labelled.file("label_issues.csv"))["item_id"])
    splits = split(labelled, config.split)
    table = pd.read_csv(splits.file("assignments.csv"))
    where = table[table["item_id"].isin(flagged)]["split"].value_counts()
    assert where.sum() == len(flagged) and where.get("test", 0) > 0  # measured: some in each split
    parts = {name: np.load(splits.file(f"{name}.npz")) for name in ("train", "val", "test")}
    assert int(parts["test"]["label_issue"].sum()) == where["test"] and len(parts["test"]["y"]) == splits.report["sizes"]["test"]

    trials = config.with_overrides({"search.grid": {"resample.drop_label_issues": [False, True]}}).trials()
    resampled = resample(splits, trials)
    kept, dropped = (np.load(training_set_for(resampled, t))["pixel_index"] for t in trials)
    train_flagged = set(parts["train"]["pixel_index"][parts["train"]["label_issue"]])
    assert len(kept) == len(parts["train"]["y"]) and train_flagged <= set(kept)
    assert len(dropped) == len(kept) - len(train_flagged) and not train_flagged & set(dropped)
    entry = resampled.report["strategies"][next(k for k in resampled.report["strategies"] if k.startswith(
        __import__("mlpipe.store", fromlist=["stable_hash"]).stable_hash(trials[1].resample)[:12]))]
    assert entry["label_issues_left_out"] == len(train_flagged)

    from mlpipe.accounting import lines
    from mlpipe.split import trained_on

    assert trained_on(splits, refit=False, drop_label_issues=False) == (len(kept), 0)
    assert trained_on(splits, refit=False, drop_label_issues=True) == (len(dropped), len(train_flagged))
    assert trained_on(splits, refit=True, drop_label_issues=False)[0] == len(kept) + len(parts["val"]["y"])
    line = lines([], trained_on=len(dropped), left_out=len(train_flagged))[-1]
    assert line == f"train      trained on {len(dropped)} ({len(train_flagged)} flagged as likely label errors left out: " \
                   "resample.drop_label_issues)"


def test_a_weak_flagging_model_flags_nothing_and_says_why(state, tmp_path):
    """Field case case10 (cleanlab/cleanlab#685): 120 correctly labelled shapes; the thumbnail
    model reaches about half accuracy, and its flags would remove correct labels."""
    from tests.field_cases import CASE_OVERRIDES, write_shapes

    root = write_shapes(tmp_path / "data", ["bar", "flat", "ring"], 40)
    config = PipelineConfig().with_overrides({**CASE_OVERRIDES, "source.uri": str(root)})
    labelled = label(anonymize(ingest(config.source, config.ingest), config.anonymize, config.source), config.label)
    issues = labelled.report["label_issues"]
    assert issues["flagged"] == 0 and issues["skipped"].startswith("skipped: the flagging model's out-of-fold accuracy")
    assert issues["model_oof_accuracy"] < 0.8
    assert labelled.report["labelled"] == 120


def test_one_class_is_refused_at_label_time(state, tmp_path):
    """Field case case12: only 'normal' scans were exported."""
    from tests.field_cases import CASE_OVERRIDES, write_shapes

    root = write_shapes(tmp_path / "data", ["normal"], 30)
    config = PipelineConfig().with_overrides({**CASE_OVERRIDES, "source.uri": str(root)})
    dataset = anonymize(ingest(config.source, config.ingest), config.anonymize, config.source)
    with pytest.raises(MlpipeError, match=r"^only one class \('normal'\) has labelled items; a classifier needs at least two$"):
        label(dataset, config.label)


def test_label_stops_when_more_than_the_limit_loses_its_label(dataset):
    # The sample's 3-way ties: 12 of 1096 items; a limit below that share stops, naming the reason.
    with pytest.raises(MlpipeError, match=r"^label removed 12 of 1096 rows \(1%: 12 sent to review \(tie\)\); "
                                          r"label.max_drop_fraction is 0.005"):
        label(dataset, LabelConfig(find_label_issues=False, max_drop_fraction=0.005))
    assert label(dataset, LabelConfig(find_label_issues=False, max_drop_fraction=0.02)).report["labelled"] == 1058


def test_tiny_classes_skip_the_label_error_model():
    import numpy as np

    from mlpipe.label import likely_label_errors

    flagged, _, _, skipped = likely_label_errors(np.zeros((3, 4)), np.array([0, 0, 1]), folds=5, min_accuracy=0.8)
    assert not flagged.any() and skipped.startswith("skipped")


def test_reviewed_labels_from_label_studio_are_applied(dataset, tmp_path):
    first = label(dataset, LabelConfig(find_label_issues=False))
    tasks = json.loads(first.file("review_tasks.json").read_text())
    answers = {t["data"]["item_id"]: str(i % 10) for i, t in enumerate(tasks) if i % 4}  # one in four left blank
    exported = [{**t, "id": i, "annotations": [{"result": [{"type": "choices", "value": {
        "choices": [answers[t["data"]["item_id"]]] if t["data"]["item_id"] in answers else []}}]}]}
        for i, t in enumerate(tasks)]  # fmt: skip
    (tmp_path / "export.json").write_text(json.dumps(exported))
    second = label(dataset, LabelConfig(find_label_issues=False, reviewed=str(tmp_path / "export.json")))
    assert second.report["reviewed"] == len(answers)
    assert second.report["labelled"] == first.report["labelled"] + len(answers)
    items = pd.read_parquet(second.file("items.parquet")).set_index("item_id")
    assert all(items.at[item, "label"] == lab for item, lab in answers.items())
    assert second.key != first.key  # the export's content is part of the cache key


def test_reviewed_export_from_other_data_is_refused(dataset, tmp_path):
    (tmp_path / "export.json").write_text(json.dumps([{"item_id": "0123456789abcdef", "choice": "3"}]))
    with pytest.raises(MlpipeError, match="names 1 item\\(s\\) that are not in this data set"):
        label(dataset, LabelConfig(reviewed=str(tmp_path / "export.json")))
    with pytest.raises(MlpipeError, match="label.reviewed: no such file"):
        label(dataset, LabelConfig(reviewed=str(tmp_path / "missing.json")))


def test_a_json_export_from_another_labeling_config_is_read_not_dropped(tmp_path):
    """A project made from Label Studio's own image-classification template names its control
    "choice": its reviews count. When a task has mlpipe's "label" control, that one decides."""
    from mlpipe.label import read_label_studio

    def task(item, *results):
        return {"id": 1, "data": {"item_id": item}, "annotations": [{"result": list(results)}],
                "predictions": [{"result": [{"from_name": "label", "type": "choices", "value": {"choices": ["9"]}}]}]}

    def choice(control, value):
        return {"from_name": control, "to_name": "image", "type": "choices", "value": {"choices": [value]}}

    exported = [task("a" * 16, choice("choice", "3")), task("b" * 16, choice("other", "1"), choice("label", "2"))]
    (tmp_path / "export.json").write_text(json.dumps(exported))
    assert read_label_studio(tmp_path / "export.json").values.tolist() == [["a" * 16, "3"], ["b" * 16, "2"]]
