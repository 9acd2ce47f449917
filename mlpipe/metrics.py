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
