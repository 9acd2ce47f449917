"""evaluate: the search winner on the test set. This is the only code that reads the test split,
and the flow calls it once, after the winner is fixed on validation data.
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # headless: no display on servers and CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
from sklearn.metrics import ConfusionMatrixDisplay, classification_report, confusion_matrix  # noqa: E402

from mlpipe.config import EvaluateConfig  # noqa: E402
from mlpipe.metrics import classification_metrics  # noqa: E402
from mlpipe.split import class_names, load_split  # noqa: E402
from mlpipe.store import StageResult, code_version, stable_hash, stage_dir, write_json  # noqa: E402
from mlpipe.train.model import ServingModel, load_checkpoint  # noqa: E402


@torch.no_grad()
def predict_proba(model: ServingModel, images: np.ndarray, batch_size: int = 512) -> np.ndarray:
    """Deterministic inference: no augmentation, eval mode, float32 on CPU."""
    out = [
        model(torch.from_numpy(images[i : i + batch_size]).permute(0, 3, 1, 2).float()).double().numpy()
        for i in range(0, len(images), batch_size)
    ]
    return np.concatenate(out)


def confusion_figure(y: np.ndarray, pred: np.ndarray, names: list[str]):
    matrix = confusion_matrix(y, pred, labels=np.arange(len(names)))
    fig, ax = plt.subplots(figsize=(1 + 0.6 * len(names), 1 + 0.6 * len(names)))
    ConfusionMatrixDisplay(matrix, display_labels=names).plot(ax=ax, colorbar=False, cmap="Blues")
    ax.set_title("Test confusion matrix (counts)")
    fig.tight_layout()
    return fig


def evaluate(best: StageResult, splits: StageResult, config: EvaluateConfig) -> tuple[StageResult, ServingModel]:
    model = load_checkpoint(best.file("checkpoint"))
    names = class_names(splits)
    images, y = load_split(splits, "test")  # the one read of the test set
    proba = predict_proba(model, images)
    pred = proba.argmax(axis=1)

    metrics = classification_metrics(y, proba, prefix="test")
    per_class = classification_report(y, pred, labels=np.arange(len(names)), target_names=names, output_dict=True, zero_division=0)
    report = {
        "winner": best.report["winner"],
        "model": "refit on train+val" if best.report.get("refit") else "search winner",
        "refit": best.report.get("refit"),
        "test_items": len(y),
        "input_shape": [int(images.shape[3]), int(images.shape[1]), int(images.shape[2])],  # C, H, W
        "metrics": metrics,
        "majority_class_macro_f1": _majority_macro_f1(y, len(names)),
        "per_class": per_class,
        "registered_model_name": config.registered_model_name,
    }
    key = stable_hash(best.key, splits.key, config, code_version("mlpipe.evaluate"))[:16]
    with stage_dir("evaluate", key) as out:
        fig = confusion_figure(y, pred, names)
        fig.savefig(out / "confusion_matrix.png", dpi=120)
        plt.close(fig)
        pd.DataFrame({"y": y, "pred": pred, "confidence": proba.max(axis=1)}).to_csv(out / "predictions.csv", index=False)
        write_json(out / "report.json", report)
    return StageResult.at("evaluate", key, report), model


def _majority_macro_f1(y: np.ndarray, num_classes: int) -> float:
    """The floor any useful model must clear: always predicting the most common test class."""
    proba = np.zeros((len(y), num_classes))
    proba[:, np.bincount(y, minlength=num_classes).argmax()] = 1.0
    return classification_metrics(y, proba, prefix="m")["m_macro_f1"]
