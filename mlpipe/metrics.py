"""Classification metrics shared by validation (in the worker) and the final test evaluation.

Any class count from two up. Two classes are a binary task: ROC-AUC and PR-AUC are computed on
the positive class's probability (`test_roc_auc`, `test_pr_auc`) and hard labels come from a
decision threshold on that probability (`choose_threshold`, `apply_threshold`). Three and more
classes get one-vs-rest areas (`test_roc_auc_ovr`, `test_pr_auc_ovr`) and argmax labels.

No metric is ever NaN or None: a metric that is undefined on the data at hand (an area with a
single class present in `y_true`, say) is left out, and the reason is written into the
`undefined` dict the caller passes (evaluate records it in its report).
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    balanced_accuracy_score,
    f1_score,
    roc_auc_score,
)


def _defined(out: dict[str, float], undefined: dict[str, str] | None) -> dict[str, float]:
    """Floats only, finite only: a non-finite value is dropped (and named in `undefined`), never returned."""
    kept = {}
    for name, value in out.items():
        value = float(value)
        if math.isfinite(value):
            kept[name] = value
        elif undefined is not None:
            undefined[name] = f"not finite ({value})"
    return kept


def ranking_metrics(
    y_true: np.ndarray, proba: np.ndarray, prefix: str, positive: int = 1, pr_auc: bool = False,
    undefined: dict[str, str] | None = None,
) -> dict[str, float]:  # fmt: skip
    """Areas from probabilities. Two classes: `{prefix}_roc_auc` (and `{prefix}_pr_auc`, average
    precision) of class `positive` scored by its own probability. More: one-vs-rest macro
    `{prefix}_roc_auc_ovr` (and `{prefix}_pr_auc_ovr`), only when every class occurs in `y_true`."""
    num_classes = proba.shape[1]
    present = len(np.unique(y_true))
    out: dict[str, float] = {}
    if num_classes < 2 or present < 2:  # one class: every area is undefined (scikit-learn answers NaN)
        suffix = "" if num_classes == 2 else "_ovr"
        for name in [f"{prefix}_roc_auc{suffix}"] + ([f"{prefix}_pr_auc{suffix}"] if pr_auc else []):
            _note(undefined, name, f"y_true holds {present} class(es) of {num_classes}; an area needs two")
        return out
    if num_classes == 2:
        is_positive, score = y_true == positive, proba[:, positive]
        out[f"{prefix}_roc_auc"] = roc_auc_score(is_positive, score)
        if pr_auc:
            out[f"{prefix}_pr_auc"] = average_precision_score(is_positive, score)
        return _defined(out, undefined)
    names = [f"{prefix}_roc_auc_ovr"] + ([f"{prefix}_pr_auc_ovr"] if pr_auc else [])
    if present < num_classes:
        for name in names:
            _note(undefined, name, f"y_true holds {present} of the {num_classes} classes; one-vs-rest needs all")
        return out
    labels = np.arange(num_classes)
    out[f"{prefix}_roc_auc_ovr"] = roc_auc_score(y_true, proba, multi_class="ovr", labels=labels)
    if pr_auc:
        onehot = (y_true[:, None] == labels[None, :]).astype(int)  # label_binarize gives 1 column for 2 classes
        out[f"{prefix}_pr_auc_ovr"] = average_precision_score(onehot, proba, average="macro")
    return _defined(out, undefined)


def _note(undefined: dict[str, str] | None, name: str, why: str) -> None:
    if undefined is not None:
        undefined[name] = why


def classification_metrics(
    y_true: np.ndarray, proba: np.ndarray, prefix: str, y_pred: np.ndarray | None = None,
    undefined: dict[str, str] | None = None,
) -> dict[str, float]:  # fmt: skip
    """Accuracy, balanced accuracy and macro-F1 from hard labels (`y_pred`; default argmax), ROC-AUC
    from probabilities (binary on class 1, whose area equals class 0's; one-vs-rest for more classes).

    ROC-AUC needs scores, not hard labels: computing it from predictions (as the seed material
    does) measures a single threshold and calls it an area.
    """
    num_classes = proba.shape[1]
    y_pred = proba.argmax(axis=1) if y_pred is None else y_pred
    labels = np.arange(num_classes)
    out = {
        f"{prefix}_accuracy": accuracy_score(y_true, y_pred),
        f"{prefix}_balanced_accuracy": balanced_accuracy_score(y_true, y_pred),
        f"{prefix}_macro_f1": f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0),
    }
    out = _defined(out, undefined)
    out.update(ranking_metrics(y_true, proba, prefix, undefined=undefined))
    return out


def evaluation_metrics(
    y_true: np.ndarray, proba: np.ndarray, y_pred: np.ndarray | None = None, positive: int = 1,
    undefined: dict[str, str] | None = None,
) -> dict[str, float]:  # fmt: skip
    """The evaluation set: accuracy, balanced accuracy, macro and weighted P/R/F1 from hard labels
    (`y_pred`, e.g. thresholded; default argmax), ROC-AUC and PR-AUC from probabilities (binary:
    of class `positive`, plus its sensitivity and specificity; else one-vs-rest), log loss and
    expected calibration error."""
    from sklearn.metrics import log_loss, precision_recall_fscore_support

    labels = np.arange(proba.shape[1])
    y_pred = proba.argmax(axis=1) if y_pred is None else y_pred
    out: dict[str, float] = {}
    for name, value in classification_metrics(y_true, proba, "test", y_pred, undefined).items():
        if "_auc" not in name:  # the areas come below, with PR-AUC
            out[name] = value
    for average in ("macro", "weighted"):
        p, r, f, _ = precision_recall_fscore_support(y_true, y_pred, labels=labels, average=average, zero_division=0)
        out.update({f"test_{average}_precision": p, f"test_{average}_recall": r, f"test_{average}_f1": f})
    if len(labels) == 2:
        is_pos, said_pos = y_true == positive, y_pred == positive
        if is_pos.any():
            out["test_sensitivity"] = (is_pos & said_pos).sum() / is_pos.sum()
        else:
            _note(undefined, "test_sensitivity", "no positive item in y_true")
        if (~is_pos).any():
            out["test_specificity"] = (~is_pos & ~said_pos).sum() / (~is_pos).sum()
        else:
            _note(undefined, "test_specificity", "no negative item in y_true")
    out.update(ranking_metrics(y_true, proba, "test", positive, pr_auc=True, undefined=undefined))
    normalized = proba / proba.sum(axis=1, keepdims=True)  # float32 softmax sums to 1 only approximately
    if len(labels) >= 2:
        out["test_log_loss"] = log_loss(y_true, np.clip(normalized, 1e-15, 1), labels=labels)
    else:
        _note(undefined, "test_log_loss", "one class: scikit-learn's log loss needs two labels")
    out["test_ece"] = expected_calibration_error(y_true, proba)
    return _defined(out, undefined)


ThresholdRule = Literal["f1", "youden"]


def choose_threshold(
    is_positive: np.ndarray, score: np.ndarray, rule: ThresholdRule = "f1"
) -> tuple[float, float] | None:
    """The decision threshold on a positive-class score that maximizes `rule` on these (validation)
    items; returns (threshold, the rule's value there), or None when the items cannot choose one
    (a single class present, or all scores equal). A pure function: no state, no randomness.

    Rules:
    - "f1": the F1-optimal threshold, the F1 score (harmonic mean of precision and recall of the
      positive class) maximized over all thresholds (e.g. Lipton, Elkan & Naryanaswamy 2014,
      "Thresholding classifiers to maximize F1 score").
    - "youden": Youden's J statistic, J = TPR - FPR = sensitivity + specificity - 1 (Youden 1950,
      "Index for rating diagnostic tests", Cancer 3:32-35), maximized over the ROC curve.

    Candidates are the midpoints between consecutive distinct scores, so every candidate splits
    the items differently and the chosen one lies strictly inside (0, 1) with a margin on both
    sides. Ties on the rule go to the candidate nearest 0.5. Apply it with `apply_threshold`
    (positive when score >= threshold).
    """
    is_positive = np.asarray(is_positive, dtype=bool)
    score = np.asarray(score, dtype=np.float64)
    positives, negatives = int(is_positive.sum()), int((~is_positive).sum())
    distinct = np.unique(score)
    if positives == 0 or negatives == 0 or len(distinct) < 2:
        return None
    candidates = (distinct[:-1] + distinct[1:]) / 2
    tp = positives - np.searchsorted(np.sort(score[is_positive]), candidates, side="right")
    fp = negatives - np.searchsorted(np.sort(score[~is_positive]), candidates, side="right")
    if rule == "f1":
        value = 2 * tp / (2 * tp + fp + (positives - tp))  # 2TP / (2TP + FP + FN); TP + FP > 0 at every candidate
    elif rule == "youden":
        value = tp / positives - fp / negatives
    else:
        raise ValueError(f"unknown threshold rule {rule!r} (f1 or youden)")
    best = np.flatnonzero(value >= value.max() - 1e-12)
    pick = best[np.argmin(np.abs(candidates[best] - 0.5))]
    return float(candidates[pick]), float(value[pick])


def apply_threshold(proba: np.ndarray, positive: int, threshold: float) -> np.ndarray:
    """Binary hard labels: `positive` where its probability is >= threshold, the other class elsewhere."""
    return np.where(proba[:, positive] >= threshold, positive, 1 - positive)


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
    tp, support, predicted = _class_counts(y_true, y_pred, num_classes)
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


def _class_counts(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> tuple[np.ndarray, ...]:
    """(true positives, support, predicted count) per resample and class, each (resamples, classes),
    from y_true and y_pred of shape (resamples, items)."""
    r = np.arange(y_true.shape[0])[:, None]
    cm = np.zeros((y_true.shape[0], num_classes, num_classes))
    np.add.at(cm, (np.broadcast_to(r, y_true.shape), y_true, y_pred), 1)
    return np.diagonal(cm, axis1=1, axis2=2), cm.sum(axis=2), cm.sum(axis=1)


def per_class_bootstrap_ci(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int, resamples: int = 1000,
                           seed: int = 0, level: float = 0.95) -> dict[str, list[list[float] | None]]:  # fmt: skip
    """Percentile bootstrap intervals of each class's precision, recall and F1: {"precision",
    "recall", "f1"} -> one [low, high] per class (index order), resampling items with the same
    seeded `bootstrap_indices` as `bootstrap_ci`. A resample where a score is undefined (precision:
    the class never predicted; recall: no item of it; F1: neither) does not count towards that
    class's interval; an interval undefined in every resample is None, never NaN."""
    idx = bootstrap_indices(len(y_true), resamples, seed)
    tp, support, predicted = _class_counts(y_true[idx], y_pred[idx], num_classes)
    with np.errstate(divide="ignore", invalid="ignore"):  # 0/0: undefined in that resample, NaN until skipped
        scores = {"precision": tp / predicted, "recall": tp / support, "f1": 2 * tp / (support + predicted)}
    tail = (1 - level) / 2 * 100
    out: dict[str, list[list[float] | None]] = {}
    for name, values in scores.items():
        out[name] = [None if np.isnan(column).all() else
                     [float(np.nanpercentile(column, tail)), float(np.nanpercentile(column, 100 - tail))]
                     for column in values.T]  # fmt: skip
    return out


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
