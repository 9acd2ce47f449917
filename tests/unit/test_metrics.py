"""Metrics for any class count: binary areas on the positive class, one-vs-rest for more, nothing
undefined ever returned as NaN; the validation threshold rules (F1-optimal, Youden's J)."""

import json
import math

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, f1_score, roc_auc_score

from mlpipe.config import EvaluateConfig, PipelineConfig
from mlpipe.errors import MlpipeError
from mlpipe.metrics import apply_threshold, choose_threshold, classification_metrics, evaluation_metrics


def _binary(n: int = 200, seed: int = 0, positive_share: float = 0.3):
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < positive_share).astype(int)
    p1 = np.clip(0.35 * y + rng.normal(0.35, 0.18, n), 0.001, 0.999)
    return y, np.column_stack([1 - p1, p1])


def _all_finite(metrics: dict) -> bool:
    return all(isinstance(v, float) and math.isfinite(v) for v in metrics.values())


def test_binary_validation_metrics_score_the_probability_of_class_1():
    y, proba = _binary()
    metrics = classification_metrics(y, proba, "val")  # raised "y should be a 1d array" before
    assert metrics["val_roc_auc"] == pytest.approx(roc_auc_score(y, proba[:, 1]))
    assert "val_roc_auc_ovr" not in metrics and _all_finite(metrics)
    json.dumps(metrics, allow_nan=False)  # what the worker writes into result.json


def test_binary_test_metrics_are_on_the_named_positive_class_with_thresholded_labels():
    y, proba = _binary()
    pred = apply_threshold(proba, 1, 0.3)
    assert (pred != proba.argmax(axis=1)).sum() > 20  # far from argmax: the metrics must use these labels
    metrics = evaluation_metrics(y, proba, pred, positive=1)
    assert metrics["test_accuracy"] == pytest.approx((pred == y).mean())
    assert metrics["test_roc_auc"] == pytest.approx(roc_auc_score(y, proba[:, 1]))
    assert metrics["test_pr_auc"] == pytest.approx(average_precision_score(y, proba[:, 1]))
    assert metrics["test_macro_f1"] == pytest.approx(f1_score(y, pred, average="macro"))
    assert metrics["test_sensitivity"] == pytest.approx(((pred == 1) & (y == 1)).sum() / (y == 1).sum())
    assert metrics["test_specificity"] == pytest.approx(((pred == 0) & (y == 0)).sum() / (y == 0).sum())
    assert not {"test_roc_auc_ovr", "test_pr_auc_ovr"} & set(metrics) and _all_finite(metrics)
    # class 0 as the positive class: the same ROC area, a different PR area (its own prevalence)
    flipped = evaluation_metrics(y, proba, pred, positive=0)
    assert flipped["test_roc_auc"] == pytest.approx(metrics["test_roc_auc"])
    assert flipped["test_pr_auc"] == pytest.approx(average_precision_score(y == 0, proba[:, 0]))
    assert flipped["test_sensitivity"] == pytest.approx(metrics["test_specificity"])


@pytest.mark.parametrize("k", [3, 50])
def test_multiclass_keeps_the_one_vs_rest_keys(k):
    rng = np.random.default_rng(k)
    y = np.tile(np.arange(k), 4)
    proba = rng.dirichlet(np.ones(k), len(y))
    proba[np.arange(len(y)), y] += 0.5
    proba /= proba.sum(axis=1, keepdims=True)
    metrics = evaluation_metrics(y, proba)
    assert {"test_roc_auc_ovr", "test_pr_auc_ovr", "test_log_loss", "test_ece"} <= set(metrics)
    assert not {"test_roc_auc", "test_pr_auc", "test_sensitivity"} & set(metrics) and _all_finite(metrics)


def test_undefined_metrics_are_left_out_and_named_never_nan():
    undefined: dict[str, str] = {}
    one_class = classification_metrics(np.zeros(6, dtype=int), np.ones((6, 1)), "val", undefined=undefined)  # case12
    assert "val_roc_auc_ovr" not in one_class and _all_finite(one_class) and "val_roc_auc_ovr" in undefined
    json.dumps(one_class, allow_nan=False)

    undefined = {}
    y, proba = np.ones(5, dtype=int), _binary(5)[1]  # binary, but the items hold one class
    metrics = evaluation_metrics(y, proba, positive=1, undefined=undefined)
    assert {"test_roc_auc", "test_pr_auc", "test_specificity"} <= set(undefined) and _all_finite(metrics)
    assert "test_roc_auc" not in metrics and "test_sensitivity" in metrics

    undefined = {}
    y3 = np.array([0, 1, 0, 1])  # three classes, one absent
    metrics = evaluation_metrics(y3, np.full((4, 3), 1 / 3), undefined=undefined)
    assert set(undefined) == {"test_roc_auc_ovr", "test_pr_auc_ovr"} and _all_finite(metrics)


def test_a_non_finite_value_is_dropped_and_named():
    from mlpipe.metrics import _defined

    undefined: dict[str, str] = {}
    assert _defined({"a": float("nan"), "b": np.float64(0.5), "c": float("inf")}, undefined) == {"b": 0.5}
    assert set(undefined) == {"a", "c"}


def test_f1_threshold_is_the_best_f1_over_all_cuts():
    y, proba = _binary(300, seed=3)
    threshold, best = choose_threshold(y == 1, proba[:, 1], "f1")
    assert 0 < threshold < 1
    assert best == pytest.approx(f1_score(y, apply_threshold(proba, 1, threshold)))
    for t in np.linspace(0.01, 0.99, 99):  # brute force: no cut does better
        assert f1_score(y, apply_threshold(proba, 1, t), zero_division=0) <= best + 1e-12


def test_youden_threshold_maximizes_tpr_minus_fpr():
    y, proba = _binary(300, seed=4)
    threshold, j = choose_threshold(y == 1, proba[:, 1], "youden")

    def youden(t):
        pred = apply_threshold(proba, 1, t) == 1
        return pred[y == 1].mean() - pred[y == 0].mean()

    assert j == pytest.approx(youden(threshold))
    assert all(youden(t) <= j + 1e-12 for t in np.linspace(0.01, 0.99, 99))


def test_threshold_known_answers_and_degenerate_inputs():
    score = np.array([0.1, 0.2, 0.3, 0.6, 0.7, 0.9])
    positive = np.array([False, False, False, True, True, True])
    assert choose_threshold(positive, score, "f1") == (pytest.approx(0.45), pytest.approx(1.0))  # the clean cut
    assert choose_threshold(positive, score, "youden") == (pytest.approx(0.45), pytest.approx(1.0))
    assert choose_threshold(np.ones(4, bool), np.linspace(0.1, 0.9, 4)) is None  # one class
    assert choose_threshold(np.array([True, False]), np.array([0.5, 0.5])) is None  # one distinct score
    assert choose_threshold(positive, score, "youden") == choose_threshold(positive, score, "youden")  # pure
    with pytest.raises(ValueError, match="unknown threshold rule"):
        choose_threshold(positive, score, "accuracy")


def test_threshold_config():
    assert EvaluateConfig().threshold == "auto" and EvaluateConfig().threshold_rule == "f1"
    assert EvaluateConfig(threshold=0.3, positive_class="lesion").threshold == 0.3
    for bad in (0, 1, 1.5, -0.2, "best"):
        with pytest.raises(MlpipeError, match="evaluate.threshold"):
            PipelineConfig().with_overrides({"evaluate.threshold": bad})
