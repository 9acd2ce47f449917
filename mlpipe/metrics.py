"""Classification metrics shared by validation (in the worker) and the final test evaluation."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score, roc_auc_score


def classification_metrics(y_true: np.ndarray, proba: np.ndarray, prefix: str) -> dict[str, float]:
    """Accuracy, balanced accuracy and macro-F1 from argmax; one-vs-rest ROC-AUC from probabilities.

    ROC-AUC needs scores, not hard labels: computing it from predictions (as the seed material
    does) measures a single threshold and calls it an area.
    """
    num_classes = proba.shape[1]
    y_pred = proba.argmax(axis=1)
    labels = np.arange(num_classes)
    out = {
        f"{prefix}_accuracy": accuracy_score(y_true, y_pred),
        f"{prefix}_balanced_accuracy": balanced_accuracy_score(y_true, y_pred),
        f"{prefix}_macro_f1": f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0),
    }
    if len(np.unique(y_true)) == num_classes:
        out[f"{prefix}_roc_auc_ovr"] = roc_auc_score(y_true, proba, multi_class="ovr", labels=labels)
    return {k: float(v) for k, v in out.items()}


def evaluation_metrics(y_true: np.ndarray, proba: np.ndarray) -> dict[str, float]:
    """The evaluation set: accuracy, balanced accuracy, macro and weighted P/R/F1, one-vs-rest
    ROC-AUC and PR-AUC (from probabilities), log loss and expected calibration error."""
    from sklearn.metrics import average_precision_score, log_loss, precision_recall_fscore_support
    from sklearn.preprocessing import label_binarize

    labels = np.arange(proba.shape[1])
    y_pred = proba.argmax(axis=1)
    out = classification_metrics(y_true, proba, prefix="test")
    for average in ("macro", "weighted"):
        p, r, f, _ = precision_recall_fscore_support(y_true, y_pred, labels=labels, average=average, zero_division=0)
        out.update({f"test_{average}_precision": p, f"test_{average}_recall": r, f"test_{average}_f1": f})
    if len(np.unique(y_true)) == len(labels):
        out["test_pr_auc_ovr"] = average_precision_score(label_binarize(y_true, classes=labels), proba, average="macro")
    normalized = proba / proba.sum(axis=1, keepdims=True)  # float32 softmax sums to 1 only approximately
    out["test_log_loss"] = log_loss(y_true, np.clip(normalized, 1e-15, 1), labels=labels)
    out["test_ece"] = expected_calibration_error(y_true, proba)
    return {k: float(v) for k, v in out.items()}


def expected_calibration_error(y_true: np.ndarray, proba: np.ndarray, bins: int = 15) -> float:
    """Top-label ECE: |accuracy - confidence| per equal-width confidence bin, weighted by bin size."""
    confidence, correct = proba.max(axis=1), proba.argmax(axis=1) == y_true
    which = np.minimum((confidence * bins).astype(int), bins - 1)
    total = np.bincount(which, minlength=bins)
    gap = np.abs(np.bincount(which, correct, bins) - np.bincount(which, confidence, bins))
    return float(gap.sum() / max(len(y_true), 1)) if total.any() else 0.0


def fast_scores(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> dict[str, np.ndarray]:
    """Accuracy, balanced accuracy, macro-F1 and per-class recall for many resamples at once:
    y_true and y_pred are (resamples, items). Used by the bootstrap, where sklearn per call is too slow."""
    r = np.arange(y_true.shape[0])[:, None]
    cm = np.zeros((y_true.shape[0], num_classes, num_classes))
    np.add.at(cm, (np.broadcast_to(r, y_true.shape), y_true, y_pred), 1)
    tp = np.diagonal(cm, axis1=1, axis2=2)
    support, predicted = cm.sum(axis=2), cm.sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        recall = np.where(support > 0, tp / support, np.nan)
        precision = np.where(predicted > 0, tp / predicted, 0.0)
        f1 = np.where(precision + np.nan_to_num(recall) > 0, 2 * precision * recall / (precision + recall), 0.0)
    return {
        "accuracy": tp.sum(axis=1) / y_true.shape[1],
        "balanced_accuracy": np.nanmean(recall, axis=1),
        "macro_f1": np.nan_to_num(f1).mean(axis=1),
        "recall": recall,
    }


def bootstrap_indices(n: int, resamples: int = 1000, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, n, (resamples, n))


def bootstrap_ci(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int, resamples: int = 1000, seed: int = 0,
                 level: float = 0.95) -> dict[str, list[float]]:  # fmt: skip
    """Percentile bootstrap intervals for accuracy, balanced accuracy and macro-F1 (seeded)."""
    idx = bootstrap_indices(len(y_true), resamples, seed)
    scores = fast_scores(y_true[idx], y_pred[idx], num_classes)
    tail = (1 - level) / 2 * 100
    return {f"test_{k}": [float(np.percentile(v, tail)), float(np.percentile(v, 100 - tail))]
            for k, v in scores.items() if k != "recall"}  # fmt: skip
