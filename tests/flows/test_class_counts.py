"""Any class count, end to end: 2 classes (binary metrics, a positive class and a validation-chosen
threshold), 3 and 50 classes (one-vs-rest metrics), on the field cases' synthetic shapes.

Tiny data, 16 px images, one process, no grid: each run costs well under a minute.
"""

import csv
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient
from sklearn.metrics import average_precision_score, roc_auc_score

from mlpipe import tracking
from mlpipe.config import PipelineConfig
from tests.field_cases import CASE_OVERRIDES, write_shapes
from tests.flows.serving_checks import same_answers, write_test_split

pytestmark = pytest.mark.slow
FAST = {**CASE_OVERRIDES, "train.nproc": 1, "ingest.image_size": 16, "label.find_label_issues": False}


def _drop_items(root: Path, label: str, keep: int) -> None:
    """Keep the first `keep` items of class `label` in the manifest (subjects stay whole: 2 items each)."""
    with open(root / "manifest.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    rows = [r for r in rows if r["label"] != label or int(Path(r["image"]).stem.rsplit("_", 1)[1]) < keep]
    with open(root / "manifest.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, ["image", "subject", "label"])
        writer.writeheader()
        writer.writerows(rows)


def _run(root: Path, overrides: dict, tmp_path: Path) -> tuple[dict, dict, pd.DataFrame, MlflowClient]:
    """(flow summary, evaluate/report.json and predictions.csv as logged to MLflow, the client)."""
    from flows.training_pipeline import training_pipeline

    config = PipelineConfig().with_overrides({**FAST, "source.uri": str(root), **overrides})
    state = training_pipeline(config, return_state=True)
    assert state.is_completed(), state.message
    summary = state.result()
    client = MlflowClient(summary["tracking_uri"])
    report_file = client.download_artifacts(summary["run_id"], "evaluate/report.json", str(tmp_path))
    report = json.loads(Path(report_file).read_text())
    predictions = pd.read_csv(client.download_artifacts(summary["run_id"], "evaluate/predictions.csv", str(tmp_path)))
    return summary, report, predictions, client


def test_two_classes_get_binary_metrics_a_positive_class_and_a_validation_threshold(harness, state, tmp_path):
    root = write_shapes(tmp_path / "data", ["normal", "lesion"], 48)
    _drop_items(root, "lesion", 24)  # lesion is the minority: the default positive class
    # 54 training items are one step an epoch: 30 epochs, 30 steps (3 were enough for the smaller net before 2026-12-01)
    summary, report, predictions, client = _run(root, {"train.epochs": 30}, tmp_path)

    metrics = summary["metrics"]
    assert {"test_roc_auc", "test_pr_auc", "test_sensitivity", "test_specificity"} <= set(metrics)
    assert not {"test_roc_auc_ovr", "test_pr_auc_ovr"} & set(metrics)
    rule = report["decision_rule"]
    assert report["class_names"] == ["lesion", "normal"]
    assert rule["positive_class"] == "lesion" and rule["positive_index"] == 0
    assert rule["positive_class_source"].startswith("minority class of the training split")
    assert 0 < rule["threshold"] < 1 and rule["threshold_source"].startswith("auto: F1-optimal on the validation split")
    # the areas are the positive class's; the hard labels are the validation threshold applied unchanged
    is_lesion, score = predictions["y"] == 0, predictions["p_lesion"]
    assert metrics["test_roc_auc"] == pytest.approx(roc_auc_score(is_lesion, score))
    assert metrics["test_pr_auc"] == pytest.approx(average_precision_score(is_lesion, score))
    assert (predictions["pred"] == np.where(score >= rule["threshold"], 0, 1)).all()
    assert metrics["test_accuracy"] == pytest.approx((predictions["pred"] == predictions["y"]).mean())
    assert metrics["test_roc_auc"] > 0.5 and metrics["test_macro_f1"] > report["majority_class_macro_f1"]
    run = client.get_run(summary["run_id"])
    assert run.data.metrics["test_roc_auc"] == pytest.approx(metrics["test_roc_auc"])
    card = Path(client.download_artifacts(summary["run_id"], "evaluate/model_card.md", str(tmp_path))).read_text()
    assert "positive class: lesion" in card and f"threshold: {rule['threshold']:.6g}" in card

    # The registered model decides as evaluate did: the validation threshold, not argmax.
    files = write_test_split(state, client, summary["run_id"], tmp_path / "test-images")
    model, _ = tracking.load_serving_model(f"models:/{report['registered_model_name']}/{summary['version']}",
                                           tmp_path / "model")  # fmt: skip
    answers = model.predict(pd.DataFrame({"path": [str(f) for f in files]}))
    same_answers(answers, predictions, report["class_names"], "pyfunc, two classes")
    assert (answers["threshold"] == rule["threshold"]).all()


@pytest.mark.parametrize(
    ("classes", "per_class", "overrides"),
    [
        (3, 28, {"train.epochs": 3}),  # 14 subjects per class: 2 in each of 7 folds (30 items: gap 0.143 > tolerance)
        # 4 subjects per class: one each for test and val, two for training (fractions met to whole folds)
        (50, 8, {"train.epochs": 3, "split.train_fraction": 0.5, "split.val_fraction": 0.25,
                 "split.test_fraction": 0.25}),  # fmt: skip
    ],
)
def test_three_and_fifty_classes_complete_above_the_majority_baseline(harness, state, tmp_path, classes, per_class,
                                                                     overrides):  # fmt: skip
    names = [f"class{c:02d}" for c in range(classes)]
    summary, report, predictions, client = _run(write_shapes(tmp_path / "data", names, per_class), overrides, tmp_path)

    metrics = summary["metrics"]
    assert report["class_names"] == names
    version = client.get_model_version(summary["registered_model"], summary["version"])
    assert json.loads(version.tags["mlpipe.class_names"]) == names
    note = f"{classes} classes: the most probable class is predicted"
    assert report["decision_rule"] == {"kind": "argmax", "note": note}
    assert {"test_roc_auc_ovr", "test_pr_auc_ovr"} <= set(metrics) and "test_roc_auc" not in metrics
    assert metrics["test_macro_f1"] > report["majority_class_macro_f1"]
    assert metrics["test_roc_auc_ovr"] > 0.55  # measured: 0.88 (3 classes), 0.65 (50 classes, 4 training items each)
    assert set(predictions["y"]) == set(range(classes))  # every class was tested
