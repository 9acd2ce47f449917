"""evaluate: the search winner on the test set. This is the only code that reads the test split,
and the flow calls it once, after the winner is fixed on validation data.
"""

from __future__ import annotations

import contextlib
import io

import matplotlib

matplotlib.use("Agg")  # headless: no display on servers and CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
from sklearn.metrics import ConfusionMatrixDisplay, classification_report, confusion_matrix  # noqa: E402

from mlpipe.config import EvaluateConfig  # noqa: E402
from mlpipe.errors import MlpipeError  # noqa: E402
from mlpipe.gate import decide  # noqa: E402
from mlpipe.metrics import apply_threshold, bootstrap_ci, choose_threshold, evaluation_metrics  # noqa: E402
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
    """Counts and row-normalized (recall per class), side by side."""
    fig, axes = plt.subplots(1, 2, figsize=(2 + 1.2 * len(names), 1 + 0.6 * len(names)))
    for ax, normalize, title in ((axes[0], None, "counts"), (axes[1], "true", "normalized by true class")):
        matrix = confusion_matrix(y, pred, labels=np.arange(len(names)), normalize=normalize)
        ConfusionMatrixDisplay(matrix, display_labels=names).plot(
            ax=ax, colorbar=False, cmap="Blues", values_format=".2f" if normalize else "d"
        )
        ax.set_title(f"Test confusion matrix ({title})")
    fig.tight_layout()
    return fig


def curves_figure(y: np.ndarray, proba: np.ndarray, names: list[str], positive: int | None = None):
    """ROC and precision-recall curves: of the positive class (two classes), else one vs rest per class."""
    from sklearn.metrics import PrecisionRecallDisplay, RocCurveDisplay

    fig, (roc, pr) = plt.subplots(1, 2, figsize=(11, 4.5))
    shown = [positive] if positive is not None else range(len(names))
    for k in shown:
        if (y == k).any() and not (y == k).all():
            chance = k == shown[0]
            RocCurveDisplay.from_predictions(y == k, proba[:, k], name=names[k], ax=roc, plot_chance_level=chance)
            PrecisionRecallDisplay.from_predictions(y == k, proba[:, k], name=names[k], ax=pr)
    kind = f"positive class '{names[positive]}'" if positive is not None else "one vs rest"
    roc.set_title(f"ROC, {kind}")
    pr.set_title(f"Precision-recall, {kind}")
    for ax in (roc, pr):
        ax.legend(fontsize="x-small")
    fig.tight_layout()
    return fig


def reliability_figure(y: np.ndarray, proba: np.ndarray, ece: float, bins: int = 15):
    confidence, correct = proba.max(axis=1), proba.argmax(axis=1) == y
    which = np.minimum((confidence * bins).astype(int), bins - 1)
    count = np.bincount(which, minlength=bins)
    accuracy = np.divide(np.bincount(which, correct, bins), count, out=np.zeros(bins), where=count > 0)
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    centers = (np.arange(bins) + 0.5) / bins
    ax.bar(centers[count > 0], accuracy[count > 0], width=1 / bins, edgecolor="black", label="accuracy")
    ax.plot([0, 1], [0, 1], "--", color="grey", label="perfect calibration")
    ax.set_xlabel("confidence (top class)")
    ax.set_ylabel("accuracy")
    ax.set_title(f"Reliability (ECE {ece:.3f})")
    ax.legend(fontsize="small")
    fig.tight_layout()
    return fig


def misclassified_figure(images: np.ndarray, y: np.ndarray, proba: np.ndarray, names: list[str], limit: int = 24,
                         pred: np.ndarray | None = None):  # fmt: skip
    """The most confident mistakes: anonymized pixels only, labelled true -> predicted (`pred`; default argmax)."""
    pred = proba.argmax(axis=1) if pred is None else pred
    wrong = np.flatnonzero(pred != y)
    wrong = wrong[np.argsort(-proba[wrong, pred[wrong]], kind="stable")][:limit]
    cols = 6
    rows = max(1, -(-len(wrong) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(1.6 * cols, 1.8 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, i in zip(axes.ravel(), wrong, strict=False):
        image = images[i]
        ax.imshow(image[:, :, 0] if image.shape[2] == 1 else image, cmap="gray" if image.shape[2] == 1 else None)
        ax.set_title(f"{names[y[i]]} -> {names[pred[i]]}\n{proba[i, pred[i]]:.2f}", fontsize=7)
    fig.suptitle(f"Misclassified test items ({int((pred != y).sum())}, most confident first)", fontsize=9)
    fig.tight_layout()
    return fig


def model_card(report: dict, best: StageResult, splits: StageResult, links: dict[str, str]) -> str:
    """evaluate/model_card.md: what a reviewer needs before trusting or promoting the model."""
    metrics, intervals, gate = report["metrics"], report["confidence_intervals_95"], report["gate"]

    def figure(name: str) -> str:
        value = f"{metrics[name]:.4f}"
        return value + (f" (95% CI {intervals[name][0]:.4f}-{intervals[name][1]:.4f})" if name in intervals else "")

    sizes = splits.report["sizes"]
    lines = [
        f"# Model card: {report['registered_model_name']}",
        "",
        "## Provenance",
        *(f"- {k}: {v}" for k, v in links.items()),
        f"- data fingerprint (split stage key): {splits.key}",
        f"- split: {splits.report.get('mode', 'holdout')}, seed {splits.report['seed']}, grouped by "
        f"{splits.report['group_column']}; sizes train {sizes['train']}, val {sizes['val']}, test {sizes['test']}",
        "",
        "## Classes",
        ", ".join(f"{i}: {name}" for i, name in enumerate(report["class_names"])),
        "",
        "## Training",
        f"- winning trial: {report['winner']} ({report['model']})",
        f"- winning grid values: {best.report.get('winner_params')}",
        f"- resampling: {best.report.get('winner_params', {}).get('resample.strategy', 'as configured')} "
        "(training split only)",
        "",
        "## Decision rule",
        *_decision_lines(report["decision_rule"]),
        "",
        "## Test metrics (the test set read once)",
        *(f"- {name.removeprefix('test_')}: {figure(name)}" for name in metrics),
        f"- majority-class baseline macro-F1: {report['majority_class_macro_f1']:.4f}",
        *(f"- {name.removeprefix('test_')}: not reported ({why})" for name, why in report["undefined_metrics"].items()),
        "",
        "## Registry gate",
        f"- decision: {gate['decision']} (champion before: {gate.get('champion_version')})",
        *(f"- {name}: {'passed' if c['passed'] else 'FAILED'} ({c['value']})" for name, c in gate["checks"].items()),
        "",
        "## Known limits",
        "- Metrics hold for data like the test split: same sources, same label process, same class mix.",
        f"- {report['test_items']} test items: per-class figures of rare classes have wide intervals.",
        "- Labels come from annotator consensus; items in the review queue were not used.",
    ]
    return "\n".join(lines) + "\n"


def evaluate(
    best: StageResult, splits: StageResult, config: EvaluateConfig, champion: dict | None = None,
    links: dict[str, str] | None = None,
) -> tuple[StageResult, ServingModel]:  # fmt: skip
    """The winner on the test set, once; the current champion (if any, and if its class map
    matches) on the same items, and the registry gate's decision."""
    model = load_checkpoint(best.file("checkpoint"))
    names = class_names(splits)
    champion_model, note = None, None
    if champion is not None and champion["class_names"] != names:
        note = f"champion version {champion['version']} skipped: its class map differs from this run's"
    elif champion is not None:
        champion_model = load_checkpoint(champion["checkpoint"])
    # Two classes: the positive class and the threshold are fixed before the test set is read,
    # on validation data only; both models get their operating point by the same rule.
    rule, champion_rule = decision_rule(names, splits, config, model, bool(best.report.get("refit"))), None
    if champion_model is not None and rule["kind"] == "threshold":
        champion_rule = decision_rule(names, splits, config, champion_model)
    images, y = load_split(splits, "test")  # the one read of the test set
    proba = predict_proba(model, images)
    pred = predict_labels(proba, rule)

    undefined: dict[str, str] = {}
    positive = rule.get("positive_index", 1)
    metrics = evaluation_metrics(y, proba, pred, positive, undefined)
    intervals = bootstrap_ci(y, pred, len(names), config.bootstrap_resamples, config.seed)
    per_class = classification_report(y, pred, labels=np.arange(len(names)), target_names=names, output_dict=True, zero_division=0)
    champion_pred = None
    if champion_model is not None:
        champion_pred = predict_labels(predict_proba(champion_model, images), champion_rule or rule)
    gate = decide(y, pred, champion_pred, names, config, note)
    if champion_rule is not None:
        gate["champion_threshold"] = champion_rule["threshold"]
    gate["champion_version"] = champion["version"] if champion else None
    report = {
        "winner": best.report["winner"],
        "model": "refit on train+val" if best.report.get("refit") else "search winner",
        "refit": best.report.get("refit"),
        "test_items": len(y),
        "input_shape": [int(images.shape[3]), int(images.shape[1]), int(images.shape[2])],  # C, H, W
        "metrics": metrics,
        "undefined_metrics": undefined,  # left out, never NaN: name -> why
        "decision_rule": rule,
        "confidence_intervals_95": intervals,
        "bootstrap": {"resamples": config.bootstrap_resamples, "seed": config.seed},
        "majority_class_macro_f1": _majority_macro_f1(y, len(names)),
        "per_class": per_class,
        "class_names": names,
        "gate": gate,
        "registered_model_name": config.registered_model_name,
    }
    key = stable_hash(best.key, splits.key, config, champion and champion["version"], code_version("mlpipe.evaluate"))[:16]
    with stage_dir("evaluate", key) as out:
        figures = {
            "confusion_matrix.png": confusion_figure(y, pred, names),
            "roc_pr_curves.png": curves_figure(y, proba, names, rule.get("positive_index")),
            "reliability.png": reliability_figure(y, proba, metrics["test_ece"]),
            "misclassified.png": misclassified_figure(images, y, proba, names, pred=pred),
            "gradcam.png": gradcam_figure(model, model.arch, images, y, names),
        }
        for name, fig in figures.items():
            fig.savefig(out / name, dpi=110, metadata={"Software": None})
            plt.close(fig)
        table = {"y": y, "pred": pred, "confidence": proba[np.arange(len(y)), pred]}
        if rule["kind"] == "threshold":
            table[f"p_{rule['positive_class']}"] = proba[:, positive]
        pd.DataFrame(table).to_csv(out / "predictions.csv", index=False)
        report["onnx"] = onnx_parity(model, images, out / "model.onnx")
        write_json(out / "gate.json", gate)
        (out / "model_card.md").write_text(model_card(report, best, splits, links or {}), encoding="utf-8")
        write_json(out / "report.json", report)
    return StageResult.at("evaluate", key, report, checkpoint=best.file("checkpoint")), model


def gradcam_figure(model: ServingModel, arch: str, images: np.ndarray, y: np.ndarray, names: list[str], per_class: int = 2):
    """Grad-CAM (captum's LayerGradCam on the last convolutional stage) for the first
    `per_class` test items of each class, towards the predicted class, over the anonymized pixels."""
    from captum.attr import LayerAttribution, LayerGradCam

    from mlpipe.train.model import last_conv_layer

    chosen = [i for k in range(len(names)) for i in np.flatnonzero(y == k)[:per_class]]
    batch = torch.from_numpy(images[chosen]).permute(0, 3, 1, 2).float()
    with torch.no_grad():
        pred = model(batch).argmax(dim=1)
    cam = LayerGradCam(model, last_conv_layer(model.model, arch))
    heat = LayerAttribution.interpolate(cam.attribute(batch, target=pred), tuple(batch.shape[2:]), "bilinear")
    heat = heat.detach().clamp(min=0).squeeze(1).numpy()
    model.zero_grad(set_to_none=True)  # the attribution's gradients must not travel with the model
    cols = 2 * per_class
    rows = -(-len(chosen) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(1.5 * cols, 1.7 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, i, h, p in zip(axes.ravel(), chosen, heat, pred.tolist(), strict=False):
        image = images[i]
        ax.imshow(image[:, :, 0] if image.shape[2] == 1 else image, cmap="gray" if image.shape[2] == 1 else None)
        ax.imshow(h / (h.max() or 1), cmap="jet", alpha=0.45)
        ax.set_title(f"{names[y[i]]} -> {names[p]}", fontsize=7)
    fig.suptitle("Grad-CAM towards the predicted class", fontsize=9)
    fig.tight_layout()
    return fig


def onnx_parity(model: ServingModel, images: np.ndarray, path, tolerance: float = 1e-4) -> dict:
    """Export the serving model to ONNX (dynamic batch) and compare onnxruntime's probabilities
    with torch's on up to 32 test inputs. An export failure is recorded, not raised: ONNX is a
    deployment extra, the registered model is the torch export."""
    batch = torch.from_numpy(images[:32]).permute(0, 3, 1, 2).float()
    try:
        import onnx
        import onnxruntime

        with contextlib.redirect_stdout(io.StringIO()):  # the exporter prints its progress
            program = torch.onnx.export(model, (batch,), input_names=["pixels"], output_names=["probabilities"],
                                        dynamic_shapes={"x": {0: torch.export.Dim("batch")}}, dynamo=True)  # fmt: skip
        program.save(str(path))
        opset = int(onnx.load(str(path)).opset_import[0].version)
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        got = session.run(None, {"pixels": batch.numpy()})[0]
    except Exception as exc:  # noqa: BLE001 - recorded in the report
        return {"exported": False, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"}
    with torch.no_grad():
        expected = model(batch).numpy()
    diff = float(np.abs(got - expected).max())
    return {"exported": True, "inputs": len(batch), "max_abs_diff": diff, "tolerance": tolerance,
            "passed": diff <= tolerance, "opset": opset}  # fmt: skip


FIGURES = ("confusion_matrix.png", "roc_pr_curves.png", "reliability.png", "misclassified.png", "gradcam.png")


def artifact_files(report: dict) -> tuple[str, ...]:
    """The evaluate stage's files for MLflow: figures, predictions, gate, card, and the ONNX model if exported."""
    onnx_file = ("model.onnx",) if report["onnx"].get("exported") else ()
    return (*FIGURES, "predictions.csv", "gate.json", "model_card.md", *onnx_file)


def _majority_macro_f1(y: np.ndarray, num_classes: int) -> float:
    """The floor any useful model must clear: always predicting the most common test class."""
    from sklearn.metrics import f1_score

    pred = np.full(len(y), np.bincount(y, minlength=num_classes).argmax())
    return float(f1_score(y, pred, labels=np.arange(num_classes), average="macro", zero_division=0))


def positive_class(names: list[str], splits: StageResult, config: EvaluateConfig) -> tuple[int, str]:
    """(index, why) of the positive class of a two-class run: `evaluate.positive_class` if set,
    else the minority class of the training split (its counts from the split report; a tie goes
    to the later class in the class map, scikit-learn's pos_label=1 convention)."""
    if config.positive_class is not None:
        if config.positive_class not in names:
            raise MlpipeError(f"evaluate.positive_class '{config.positive_class}' is not a class of this run "
                              f"(classes: {', '.join(names)})")  # fmt: skip
        return names.index(config.positive_class), "evaluate.positive_class"
    counts = splits.report["class_counts"]["train"]
    sizes = [int(counts.get(name, 0)) for name in names]
    index = 1 if sizes[0] == sizes[1] else int(np.argmin(sizes))
    tie = ", a tie: the later class in the class map" if sizes[0] == sizes[1] else ""
    return index, f"minority class of the training split ({sizes[index]} of {sum(sizes)} items{tie})"


def decision_rule(names: list[str], splits: StageResult, config: EvaluateConfig, model: ServingModel,
                  refit: bool = False) -> dict:  # fmt: skip
    """How probabilities become labels. Three or more classes: argmax. Two: the positive class's
    probability against a threshold, `evaluate.threshold` as given or ("auto") chosen on the
    validation split by `evaluate.threshold_rule` (`mlpipe.metrics.choose_threshold`). Only
    validation data is read here, never test. In a refit (train+val) the validation items were
    also training items, so an "auto" threshold fits them more closely than new data; noted."""
    if len(names) != 2:
        defaults = type(config).model_fields
        ignored = [key for key in ("positive_class", "threshold") if getattr(config, key) != defaults[key].default]
        return {"kind": "argmax", "note": f"{len(names)} classes: the most probable class is predicted"
                + (f"; evaluate.{' and evaluate.'.join(ignored)} ignored (two classes only)" if ignored else "")}
    index, why = positive_class(names, splits, config)
    rule = {"kind": "threshold", "positive_class": names[index], "positive_index": index, "positive_class_source": why,
            "negative_class": names[1 - index]}  # fmt: skip
    if config.threshold != "auto":
        rule.update(threshold=float(config.threshold), threshold_source="evaluate.threshold")
    else:
        images, y = load_split(splits, "val")  # validation only
        chosen = choose_threshold(y == index, predict_proba(model, images)[:, index], config.threshold_rule)
        if chosen is None:
            rule.update(threshold=0.5, threshold_source="0.5: the validation split cannot choose one "
                        "(a single class or one distinct score)")  # fmt: skip
        else:
            label = {"f1": "F1-optimal", "youden": "Youden's J (TPR - FPR) maximal"}[config.threshold_rule]
            rule.update(threshold=chosen[0], threshold_source=f"auto: {label} on the validation split ({len(y)} items)",
                        threshold_rule=config.threshold_rule, validation_value=round(chosen[1], 6))  # fmt: skip
            if refit:
                rule["note"] = ("the model was refit on train+val, so the validation items chose the threshold "
                                "after training on them: it may suit new data less well than on them")  # fmt: skip
    rule["apply"] = (f"predict '{names[index]}' when the registered model's probability column {index} "
                     f"('{names[index]}') is >= {rule['threshold']:.6g}, else '{names[1 - index]}'")  # fmt: skip
    return rule


def predict_labels(proba: np.ndarray, rule: dict) -> np.ndarray:
    """Hard labels from probabilities under a `decision_rule`."""
    if rule["kind"] == "threshold":
        return apply_threshold(proba, rule["positive_index"], rule["threshold"])
    return proba.argmax(axis=1)


def _decision_lines(rule: dict) -> list[str]:
    if rule["kind"] != "threshold":
        return [f"- {rule['note']}"]
    return [
        f"- positive class: {rule['positive_class']} ({rule['positive_class_source']})",
        f"- threshold: {rule['threshold']:.6g} ({rule['threshold_source']})",
        f"- apply: {rule['apply']}",
        *([f"- note: {rule['note']}"] if "note" in rule else []),
    ]
