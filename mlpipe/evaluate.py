"""evaluate: the search winner on the test set. This is the only code that reads the test split,
and the flow calls it once, after the winner is fixed on validation data.
"""

from __future__ import annotations

import contextlib
import io
import itertools

import matplotlib

matplotlib.use("Agg")  # headless: no display on servers and CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
from sklearn.metrics import ConfusionMatrixDisplay, classification_report, confusion_matrix  # noqa: E402

from mlpipe import baseline as classical  # noqa: E402
from mlpipe.config import EvaluateConfig  # noqa: E402
from mlpipe.drift import reference_profile  # noqa: E402
from mlpipe.errors import MlpipeError  # noqa: E402
from mlpipe.gate import baseline_check_name, decide, paired_difference  # noqa: E402
from mlpipe.metrics import (  # noqa: E402
    bootstrap_ci, bootstrap_indices, choose_threshold, evaluation_metrics, fast_scores, per_class_bootstrap_ci,
)  # fmt: skip
from mlpipe.split import class_names, development_parts, load_index, load_split  # noqa: E402
from mlpipe.store import StageResult, code_version, final_path, stable_hash, stage_dir, write_json  # noqa: E402
from mlpipe.serving import Preprocessing, load_model, predict_labels, predict_proba  # noqa: E402
from mlpipe.serving import save as save_serving_model  # noqa: E402
from mlpipe.train.model import ServingModel, load_checkpoint  # noqa: E402


def _tilt(ax) -> None:
    """Slant the x tick labels so long class names ("ankle boot") stay apart."""
    for label in ax.get_xticklabels():
        label.set(rotation=35, ha="right", rotation_mode="anchor")


def confusion_figure(y: np.ndarray, pred: np.ndarray, names: list[str]):
    """Test confusion matrices, counts and row-normalized (recall per class), side by side; `y`
    and `pred` (n,) integer class indices into `names`, the class names on both axes."""
    k = len(names)
    # Taller than the square matrices need: with height to spare, constrained layout settles in one
    # draw (savefig's) and the slanted names below stay on the canvas.
    fig, axes = plt.subplots(1, 2, figsize=(max(8.0, 3 + 1.4 * k), max(5.0, 2.6 + 0.7 * k)), layout="constrained")
    for ax, normalize, title in ((axes[0], None, "counts"), (axes[1], "true", "share of each true class")):
        matrix = confusion_matrix(y, pred, labels=np.arange(k), normalize=normalize)
        ConfusionMatrixDisplay(matrix, display_labels=names).plot(
            ax=ax, colorbar=False, cmap="Blues", values_format=".2f" if normalize else "d",
            text_kw={"fontsize": 8 if k <= 6 else 7},
        )  # fmt: skip
        _tilt(ax)
        ax.set_title(title)
    fig.suptitle(f"Test confusion matrix ({len(y)} items)")
    return fig


def curves_figure(y: np.ndarray, proba: np.ndarray, names: list[str], positive: int | None = None):
    """ROC and precision-recall curves from `proba` (n, classes) against `y` (n,): of the class
    `positive` (two classes; axes name it), else one curve per class against the rest, each
    labelled by its class name. A class absent from `y` (or all of it) has no curve."""
    from sklearn.metrics import PrecisionRecallDisplay, RocCurveDisplay

    fig, (roc, pr) = plt.subplots(1, 2, figsize=(11, 5.5), layout="constrained")
    shown = [positive] if positive is not None else list(range(len(names)))
    drawn = [k for k in shown if (y == k).any() and not (y == k).all()]
    for k in drawn:
        label = names[k] if positive is not None else f"{names[k]} vs rest"
        RocCurveDisplay.from_predictions(y == k, proba[:, k], pos_label=True, name=label, ax=roc,
                                         plot_chance_level=k == drawn[0])  # fmt: skip
        PrecisionRecallDisplay.from_predictions(y == k, proba[:, k], pos_label=True, name=label, ax=pr)
    # scikit-learn writes "(Positive label: True)" on the axes: replaced by the class's name
    which = f"positive class: {names[positive]}" if positive is not None else "one vs rest, per class"
    roc.set(xlabel=f"False positive rate ({which})", ylabel=f"True positive rate ({which})",
            title=f"ROC, {which}")  # fmt: skip
    pr.set(xlabel=f"Recall ({which})", ylabel=f"Precision ({which})", title=f"Precision-recall, {which}")
    for ax in (roc, pr):
        if drawn:  # below the plot: the curves stay visible
            ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncols=2, fontsize="x-small")
        else:
            ax.text(0.5, 0.5, "no curve: the test items hold one class", ha="center", transform=ax.transAxes)
    return fig


def reliability_figure(y: np.ndarray, proba: np.ndarray, ece: float, bins: int = 15):
    """Accuracy per equal-width bin of top-class confidence, `proba` (n, classes) against `y` (n,),
    with the diagonal of perfect calibration; `ece` (0-1) goes into the title."""
    confidence, correct = proba.max(axis=1), proba.argmax(axis=1) == y
    which = np.minimum((confidence * bins).astype(int), bins - 1)
    count = np.bincount(which, minlength=bins)
    accuracy = np.divide(np.bincount(which, correct, bins), count, out=np.zeros(bins), where=count > 0)
    fig, ax = plt.subplots(figsize=(4.8, 5.2), layout="constrained")
    centers = (np.arange(bins) + 0.5) / bins
    ax.bar(centers[count > 0], accuracy[count > 0], width=1 / bins, edgecolor="black", label="accuracy")
    ax.plot([0, 1], [0, 1], "--", color="grey", label="perfect calibration")
    ax.set_xlabel("confidence (top class)")
    ax.set_ylabel("accuracy")
    ax.set_title(f"Reliability (ECE {ece:.3f})")
    fig.legend(loc="outside lower center", ncols=2, fontsize="small")  # outside the axes: never over a bar
    return fig


def _show(ax, image: np.ndarray) -> None:
    """One HWC uint8 image, grey when it has one channel."""
    ax.imshow(image[:, :, 0] if image.shape[2] == 1 else image, cmap="gray" if image.shape[2] == 1 else None)


def _nothing(fig, what: str) -> None:
    fig.text(0.5, 0.5, what, ha="center", va="center", fontsize=9)


def misclassified_figure(images: np.ndarray, y: np.ndarray, proba: np.ndarray, names: list[str], limit: int = 24,
                         pred: np.ndarray | None = None):  # fmt: skip
    """The most confident mistakes: anonymized pixels only (`images` NHWC uint8), each titled
    true -> predicted (`pred`; default argmax of `proba`, (n, classes)) and that class's probability.
    No mistake: a figure that says so."""
    pred = proba.argmax(axis=1) if pred is None else pred
    wrong = np.flatnonzero(pred != y)
    wrong = wrong[np.argsort(-proba[wrong, pred[wrong]], kind="stable")][:limit]
    cols = 6
    rows = max(1, -(-len(wrong) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(1.8 * cols, 0.6 + 1.9 * rows), squeeze=False, layout="constrained")
    for ax in axes.ravel():
        ax.axis("off")
    for ax, i in zip(axes.ravel(), wrong, strict=False):
        _show(ax, images[i])
        ax.set_title(f"{names[y[i]]} -> {names[pred[i]]}\n{proba[i, pred[i]]:.2f}", fontsize=7)
    if not len(wrong):
        _nothing(fig, "no misclassified test items")
    fig.suptitle(f"Misclassified test items ({int((pred != y).sum())}, most confident first)", fontsize=9)
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
        "## Per class (test; 95% bootstrap intervals, figure `per_class.png`)",
        "| class | items | precision | recall | F1 |",
        "|---|---|---|---|---|",
        *(_per_class_row(name, scores) for name, scores in report["per_class_intervals"].items()),
        "",
        "## Classical baselines (same split)",
        *_baseline_lines(report),
        "",
        "## Registry gate",
        f"- registered: {gate['registered']['model']} ({gate['registered']['why']})",
        f"- decision: {gate['decision']} (champion before: {gate.get('champion_version')})",
        *(f"- {name}: {'passed' if c['passed'] else 'FAILED'} ({c['value']})" for name, c in gate["checks"].items()),
        *([f"- the deep model's own gate: {gate['deep_model_gate']['decision']} "
           f"({'; '.join(gate['deep_model_gate']['reasons'])})"] if "deep_model_gate" in gate else []),  # fmt: skip
        "",
        "## Using it",
        f"- `mlflow.pyfunc.load_model(\"models:/{report['registered_model_name']}@champion\")`, then `.predict` on a "
        "DataFrame with a column `image` (encoded bytes), `path` (a local file) or `array` (uint8 H x W [x C]); or "
        "`mlpipe predict SOURCE`; or `mlflow models serve` (base64 in `image`). Images of any size and mode go "
        "through the same decode and resize as training; the answer is class, probability, one probability per "
        "class and, per row, the reason when there is none.",
        "",
        "## Known limits",
        "- Metrics hold for data like the test split: same sources, same label process, same class mix.",
        f"- {report['test_items']} test items: per-class figures of rare classes have wide intervals.",
        "- Labels come from annotator consensus; items in the review queue were not used.",
    ]
    return "\n".join(lines) + "\n"


def evaluate(
    best: StageResult, splits: StageResult, config: EvaluateConfig, champion: dict | None = None,
    links: dict[str, str] | None = None, preprocessing: Preprocessing | None = None,
) -> tuple[StageResult, ServingModel]:  # fmt: skip
    """The winner on the test set, once; the classical baselines (`evaluate.baseline`) and the
    current champion (if any, and if its class map matches; a deep model or a baseline) on the
    same items, and the registry gate's decision. Returns the stage result and the model to
    register: the deep model, or the best baseline when `evaluate.allow_baseline_champion` lets it
    take the deep model's place (`choose_registered`). With `preprocessing` (the run's ingest
    settings), the stage also writes the serving model's data folder, `serving/`
    (`mlpipe.serving.save`): what the registry gets."""
    model = load_checkpoint(best.file("checkpoint"))
    names = class_names(splits)
    champion_model, note = None, None
    if champion is not None and champion["class_names"] != names:
        note = f"champion version {champion['version']} skipped: its class map differs from this run's"
    elif champion is not None:
        try:
            champion_model = load_model(champion["checkpoint"])
        except (RuntimeError, KeyError) as err:  # an architecture this code builds differently (state dict keys, shapes)
            note = (f"champion version {champion['version']} skipped: its checkpoint does not load into the "
                    f"architecture this code version builds ({type(err).__name__})")  # fmt: skip
    # Two classes: the positive class and the threshold are fixed before the test set is read,
    # on validation data only; every model gets its operating point by the same rule.
    refit = bool(best.report.get("refit"))
    rule, champion_rule = decision_rule(names, splits, config, model, refit), None
    if champion_model is not None and rule["kind"] == "threshold":
        champion_rule = decision_rule(names, splits, config, champion_model)
    # The baselines are fitted, chosen and given their rule on train and val, before the test read.
    baselines = fit_split_baselines(splits, len(names), config.seed, refit) if config.baseline else {}
    baseline_rules = {name: decision_rule(names, splits, config, b.module) for name, b in baselines.items()}
    best_baseline = max(baselines, key=lambda n: baselines[n].val_macro_f1) if baselines else None  # first on a tie
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
    scored = {name: score_baseline(b, baseline_rules[name], images, y, len(names)) for name, b in baselines.items()}
    baseline_preds = {name: entry.pop("pred") for name, entry in scored.items()}
    versus = (best_baseline, baseline_preds[best_baseline]) if baselines else None
    gate = decide(y, pred, champion_pred, names, config, note, versus)
    gate, chosen = choose_registered(gate, y, pred, champion_pred, names, config, note, versus,
                                     baselines.get(best_baseline), baseline_rules.get(best_baseline))  # fmt: skip
    serving = chosen or model
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
        "per_class_intervals": per_class_intervals(y, pred, names, config.bootstrap_resamples, config.seed),
        "class_names": names,
        "gate": gate,
        "registered_model_name": config.registered_model_name,
        "baselines": scored,  # fitted on train, chosen on val; test metrics on these same items
        "best_baseline": best_baseline,  # chosen on validation macro-F1, never on test
        "baseline_metrics": {f"baseline_{name}_{metric}": value for name, entry in scored.items()
                             for metric, value in entry.items() if metric.startswith("test_")},  # fmt: skip
    }
    key = stable_hash(best.key, splits.key, config, champion and champion["version"], preprocessing,
                      code_version("mlpipe.evaluate", "mlpipe.baseline", "mlpipe.gate", "mlpipe.serving"))[:16]  # fmt: skip
    with stage_dir("evaluate", key) as out:
        figures = {
            "confusion_matrix.png": confusion_figure(y, pred, names),
            "roc_pr_curves.png": curves_figure(y, proba, names, rule.get("positive_index")),
            "reliability.png": reliability_figure(y, proba, metrics["test_ece"]),
            "misclassified.png": misclassified_figure(images, y, proba, names, pred=pred),
            "gradcam.png": gradcam_figure(model, images, y, proba, names, pred),
            "per_class.png": per_class_figure(report["per_class_intervals"], config.bootstrap_resamples),
        }
        for name, fig in figures.items():
            fig.savefig(out / name, dpi=110, metadata={"Software": None})
            plt.close(fig)
        # Rows in test.npz order; every class's probability, so that served answers can be checked against these.
        table = {"y": y, "pred": pred, "confidence": proba[np.arange(len(y)), pred],
                 **{f"p_{name}": proba[:, k] for k, name in enumerate(names)}}  # fmt: skip
        pd.DataFrame(table).to_csv(out / "predictions.csv", index=False)
        report["onnx"] = onnx_parity(model, images, out / "model.onnx")
        checkpoint, files = best.file("checkpoint"), {}
        if serving is not model:  # a baseline is registered: its own checkpoint, for later champion comparisons
            torch.save(classical.checkpoint(serving, images.shape[3], len(names)), out / "checkpoint.pt")
            checkpoint = final_path("evaluate", key) / "checkpoint.pt"
        if preprocessing is not None:
            save_serving_model(out / "serving", out / "checkpoint.pt" if serving is not model else checkpoint, names,
                               preprocessing, rule if serving is model else baseline_rules[best_baseline], images[0],
                               model.arch if serving is model else f"baseline {best_baseline}",
                               out / "model.onnx" if serving is model else None,
                               training_profile(splits, refit, len(names), config.seed))  # fmt: skip
            files["serving"] = final_path("evaluate", key) / "serving"
        write_json(out / "gate.json", gate)
        (out / "model_card.md").write_text(model_card(report, best, splits, links or {}), encoding="utf-8")
        write_json(out / "report.json", report)
    return StageResult.at("evaluate", key, report, checkpoint=checkpoint, **files), serving


def training_profile(splits: StageResult, refit: bool, num_classes: int, seed: int) -> dict:
    """The drift reference the serving model carries (`mlpipe.drift.reference_profile`): the
    training items' class shares (train+val after a refit) and pixel statistics of up to
    `PROFILE_ITEMS` of them. Never test data."""
    parts = development_parts(splits) if refit else ["train.npz"]
    images, _, _ = _capped_items(splits, parts, PROFILE_ITEMS, seed)
    return reference_profile(images, load_index(splits, parts)[1], num_classes)


PROFILE_ITEMS = 5000


def _capped_items(splits: StageResult, parts: list[str], cap: int, seed: int) -> tuple[np.ndarray, np.ndarray, int]:
    """(images uint8 NHWC, labels, the parts' size) of at most about `cap` items of these split files
    (the baseline's class-proportional subsample), reading only their pixels from the cache."""
    index, y = load_index(splits, parts)
    rows = classical.subsample(y, cap, seed)
    return np.ascontiguousarray(np.load(splits.file("pixels"), mmap_mode="r")[index[rows]]), y[rows], len(y)


def fit_split_baselines(splits: StageResult, num_classes: int, seed: int,
                        refit: bool = False) -> dict[str, classical.Baseline]:  # fmt: skip
    """The classical baselines on the split stage's own training items (never a resampled set;
    in kfold mode train.npz holds folds 1..k-1 and val.npz fold 0), chosen on the validation items;
    `refit` (the deep model was refit on train+val): then refit on every development item too."""
    train_images, train_y, total = _capped_items(splits, ["train.npz"], classical.LR_MAX_ITEMS, seed)
    val_images, val_y, _ = _capped_items(splits, ["val.npz"], classical.VAL_MAX_ITEMS, seed)
    refit_on = _capped_items(splits, development_parts(splits), classical.LR_MAX_ITEMS, seed) if refit else None
    return classical.fit_baselines(train_images, train_y, val_images, val_y, num_classes, seed, train_total=total,
                                   refit_on=refit_on)  # fmt: skip


def score_baseline(fitted: classical.Baseline, rule: dict, images: np.ndarray, y: np.ndarray, k: int) -> dict:
    """A baseline on the test items: its summary, test accuracy, balanced accuracy and macro-F1
    (hard labels by its `decision_rule`), the torch module's parity with scikit-learn on these
    items (`check_parity` raises on a mismatch), and its predictions under "pred"."""
    pred = predict_labels(predict_proba(fitted.module, images), rule)
    scores = {f"test_{m}": float(v[0]) for m, v in fast_scores(y[None], pred[None], k).items() if m != "recall"}
    parity = classical.check_parity(fitted, images[: classical.PARITY_MAX_ITEMS])
    return {**fitted.summary(), **dict(sorted(scores.items())), "decision_rule": rule, "torch_parity": parity,
            "pred": pred}  # fmt: skip


def choose_registered(gate: dict, y: np.ndarray, pred: np.ndarray, champion_pred: np.ndarray | None, names: list[str],
                      config: EvaluateConfig, note: str | None, versus: tuple[str, np.ndarray] | None,
                      fitted: classical.Baseline | None, rule: dict | None) -> tuple[dict, torch.nn.Module | None]:  # fmt: skip
    """Which model is registered, recorded under gate["registered"]; returns (gate, the baseline's
    module, or None for the deep model). `versus` and `fitted`: the best baseline's (name, test
    predictions) and fit. The deep model, unless `evaluate.allow_baseline_champion` is set, the
    deep model failed its baseline check, the best baseline beats the deep model by the same rule
    with the roles swapped (strictly ahead on the full test set and in at least half of the paired
    bootstrap resamples) and meets `evaluate.thresholds`: then the baseline is registered, and the
    gate is decided again with the baseline as the challenger (against the champion, if any); the
    deep model's gate is kept under "deep_model_gate"."""
    registered = {"model": "deep model", "why": "the search winner"}
    if versus is None or gate["checks"][baseline_check_name(versus[0], config.gate_metric)]["passed"]:
        return {**gate, "registered": registered}, None
    name, theirs = versus
    if not config.allow_baseline_champion:
        registered["why"] = f"the search winner; baseline {name} beat it, evaluate.allow_baseline_champion is false"
        return {**gate, "registered": registered}, None
    ahead = paired_difference(y, theirs, pred, len(names), config.gate_metric,
                              bootstrap_indices(len(y), config.bootstrap_resamples, config.seed))  # fmt: skip
    scores = {m: float(v[0]) for m, v in fast_scores(y[None], theirs[None], len(names)).items() if m != "recall"}
    floors = [f"{m} {scores[m]:.4f} < {floor}" for m, floor in config.thresholds.items() if scores[m] < floor]
    if not (ahead["difference"] > 0 and ahead["share_ahead"] >= 0.5) or floors:
        why = "; ".join(floors) or (f"it does not beat the deep model (difference {ahead['difference']:.4f}, ahead in "
                                    f"{ahead['share_ahead']:.0%} of resamples)")  # fmt: skip
        registered["why"] = f"the search winner; baseline {name} not registered instead: {why}"
        return {**gate, "registered": registered}, None
    deep_gate = {k: gate[k] for k in ("decision", "reasons", "checks", "challenger")}
    gate = decide(y, theirs, champion_pred, names, config, note)
    why = (f"evaluate.allow_baseline_champion: it beat the deep model on {config.gate_metric} (difference "
           f"{ahead['difference']:.4f}, ahead in {ahead['share_ahead']:.0%} of paired bootstrap resamples) and meets "
           "evaluate.thresholds")  # fmt: skip
    gate["reasons"].append(f"registered baseline {name} instead of the deep model ({why})")  # onto the version's tags
    registered = {"model": f"baseline {name}", "params": fitted.params, "decision_rule": rule, "why": why}
    return {**gate, "registered": registered, "deep_model_gate": deep_gate}, fitted.module


def gradcam_figure(model: ServingModel, images: np.ndarray, y: np.ndarray, proba: np.ndarray, names: list[str],
                   pred: np.ndarray | None = None, count: int = 6):  # fmt: skip
    """Grad-CAM (captum's LayerGradCam on the last convolutional stage) towards the predicted
    class, over the anonymized pixels (`images` NHWC uint8), in two rows: correct items (the most
    confident of each class in turn) and the most confident mistakes, at most `count` each, titled
    true -> predicted and that class's probability. `proba` (n, classes) is `model`'s on `images`,
    `pred` (n,) its labels (default argmax). No mistake: the second row says so."""
    from captum.attr import LayerAttribution, LayerGradCam

    from mlpipe.train.model import last_conv_layer

    pred = proba.argmax(axis=1) if pred is None else pred
    confidence = proba[np.arange(len(y)), pred]
    ranked = np.argsort(-confidence, kind="stable")
    right = [ranked[(pred[ranked] == y[ranked]) & (y[ranked] == k)] for k in range(len(names))]
    correct = [int(i) for column in itertools.zip_longest(*right) for i in column if i is not None][:count]
    wrong = [int(i) for i in ranked[pred[ranked] != y[ranked]][:count]]
    chosen = correct + wrong
    heat = np.zeros((0, *images.shape[1:3]))
    if chosen:
        batch = torch.from_numpy(images[chosen]).permute(0, 3, 1, 2).float()
        cam = LayerGradCam(model, last_conv_layer(model.model))
        heat = LayerAttribution.interpolate(cam.attribute(batch, target=torch.from_numpy(pred[chosen]).long()),
                                            tuple(batch.shape[2:]), "bilinear")  # fmt: skip
        heat = heat.detach().clamp(min=0).squeeze(1).numpy()
        model.zero_grad(set_to_none=True)  # the attribution's gradients must not travel with the model
    cols = max(count, 1)
    fig = plt.figure(figsize=(1.8 * cols, 4.8), layout="constrained")
    rows = fig.subfigures(2, 1)
    for row, items, title, empty in (
        (rows[0], correct, "Correct, most confident of each class", "no correctly classified test items"),
        (rows[1], wrong, f"Mistakes, most confident first ({int((pred != y).sum())} in all)",
         "no misclassified test items"),
    ):  # fmt: skip
        row.suptitle(title, fontsize=9)
        axes = row.subplots(1, cols, squeeze=False)[0]
        for ax in axes:
            ax.axis("off")
        for ax, i in zip(axes, items, strict=False):
            _show(ax, images[i])
            h = heat[chosen.index(i)]
            ax.imshow(h / (h.max() or 1), cmap="jet", alpha=0.45)
            ax.set_title(f"{names[y[i]]} -> {names[pred[i]]}\n{confidence[i]:.2f}", fontsize=7)
        if not items:
            _nothing(row, empty)
    fig.suptitle("Grad-CAM towards the predicted class (true -> predicted, its probability)", fontsize=10)
    return fig


def per_class_intervals(y: np.ndarray, pred: np.ndarray, names: list[str], resamples: int, seed: int) -> dict:
    """Each class's test precision, recall and F1 (scikit-learn's, 0 where undefined) and support,
    with percentile bootstrap 95% intervals (`mlpipe.metrics.per_class_bootstrap_ci`, the same
    resamples as `confidence_intervals_95`): class name -> {precision, recall, f1, support,
    precision_ci, recall_ci, f1_ci}, each interval [low, high], or None where the score is undefined
    in every resample (a class without test items, say)."""
    from sklearn.metrics import precision_recall_fscore_support

    labels = np.arange(len(names))
    point = precision_recall_fscore_support(y, pred, labels=labels, zero_division=0)
    ci = per_class_bootstrap_ci(y, pred, len(names), resamples, seed)
    return {name: {"precision": float(point[0][k]), "recall": float(point[1][k]), "f1": float(point[2][k]),
                   "support": int(point[3][k]), **{f"{m}_ci": ci[m][k] for m in ("precision", "recall", "f1")}}
            for k, name in enumerate(names)}  # fmt: skip


def per_class_figure(intervals: dict, resamples: int):
    """Horizontal bars of each class's precision, recall and F1 (0-1) with their bootstrap 95%
    intervals as error bars, from `per_class_intervals`'s dict; class names (and test support) on
    the y axis, first class on top. An undefined interval has no error bar."""
    names = list(intervals)
    fig, ax = plt.subplots(figsize=(7.5, 1.6 + 0.55 * len(names)), layout="constrained")
    height = 0.27
    for j, metric in enumerate(("precision", "recall", "f1")):
        values = np.array([intervals[n][metric] for n in names])
        bounds = np.array([intervals[n][f"{metric}_ci"] or [v, v] for n, v in zip(names, values, strict=True)])
        spread = np.clip(np.stack([values - bounds[:, 0], bounds[:, 1] - values]), 0, None)
        ax.barh(np.arange(len(names)) + (j - 1) * height, values, height, xerr=spread, capsize=2,
                label={"f1": "F1"}.get(metric, metric), error_kw={"elinewidth": 0.8})  # fmt: skip
    ax.set_yticks(np.arange(len(names)), [f"{n}\n{intervals[n]['support']} items" for n in names], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 1.02)
    ax.set_xlabel("score on the test set")
    ax.set_title(f"Per-class precision, recall and F1\n(95% bootstrap intervals, {resamples} resamples)")
    fig.legend(loc="outside lower center", ncols=3, fontsize="small")
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


FIGURES = ("confusion_matrix.png", "roc_pr_curves.png", "reliability.png", "misclassified.png", "gradcam.png",
           "per_class.png")


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


def _baseline_lines(report: dict) -> list[str]:
    if not report["baselines"]:
        return ["- not fitted (evaluate.baseline: false)"]
    lines = [f"- features: {classical.FEATURES}", "- fitted on the training split, hyperparameters chosen on the "
             "validation split's macro-F1; the best on validation is the one the gate compares against"]  # fmt: skip
    for name, entry in report["baselines"].items():
        test = ", ".join(f"{m.removeprefix('test_')} {v:.4f}" for m, v in entry.items() if m.startswith("test_"))
        notes = f"; {'; '.join(entry['notes'])}" if entry["notes"] else ""
        lines.append(f"- {name}: {entry['params']}; {entry['train_items']} training items{notes}; validation "
                     f"macro_f1 {entry['val_macro_f1']:.4f}; test {test}")  # fmt: skip
    lines.append(f"- best on validation: {report['best_baseline']}")
    return lines


def _per_class_row(name: str, scores: dict) -> str:
    cells = [name.replace("|", "\\|"), str(scores["support"]), *(_with_interval(scores, m) for m in ("precision", "recall", "f1"))]
    return "| " + " | ".join(cells) + " |"


def _with_interval(scores: dict, metric: str) -> str:
    interval = scores[f"{metric}_ci"]
    return f"{scores[metric]:.3f}" + (f" ({interval[0]:.3f}-{interval[1]:.3f})" if interval else "")


def _decision_lines(rule: dict) -> list[str]:
    if rule["kind"] != "threshold":
        return [f"- {rule['note']}"]
    return [
        f"- positive class: {rule['positive_class']} ({rule['positive_class_source']})",
        f"- threshold: {rule['threshold']:.6g} ({rule['threshold_source']})",
        f"- apply: {rule['apply']}",
        *([f"- note: {rule['note']}"] if "note" in rule else []),
    ]


def per_class_metrics(report: dict) -> dict[str, float]:
    """`test_precision/<class>`, `test_recall/<class>` and `test_f1/<class>` for every class, from
    the report's `per_class` (scikit-learn's classification_report on the test set): MLflow's
    charts group each of the three into one section, one line per class name. A class whose
    name sanitizes to another's (`mlpipe.scoring.metric_name`) gets `-<class index>` appended."""
    from mlpipe.scoring import metric_name

    keys: dict[str, str] = {}
    for index, name in enumerate(report["class_names"]):
        key = metric_name(name)
        keys[name] = f"{key}-{index}" if key in keys.values() else key  # "猫" and "犬" both read "_"
    return {f"test_{metric}/{keys[name]}": float(report["per_class"][name][column])
            for name in report["class_names"]
            for metric, column in (("precision", "precision"), ("recall", "recall"), ("f1", "f1-score"))}  # fmt: skip


def run_description(report: dict, registered: dict) -> str:
    """The pipeline run's description in MLflow (markdown): what was registered and how good it is."""
    metrics, intervals = report["metrics"], report["confidence_intervals_95"]
    f1 = f"test macro-F1 {metrics['test_macro_f1']:.4f}"
    if "test_macro_f1" in intervals:
        f1 += f" (95% CI {intervals['test_macro_f1'][0]:.4f}-{intervals['test_macro_f1'][1]:.4f})"
    baseline = ""
    if report.get("best_baseline"):
        score = report["baselines"][report["best_baseline"]].get("test_macro_f1")
        baseline = f"; best classical baseline ({report['best_baseline']}) {score:.4f}" if score is not None else ""
    return (f"Trained {report['winner']} ({report['model']}) on {len(report['class_names'])} classes: {f1} on "
            f"{report['test_items']} test items{baseline}. Registered as {registered['registered_model']} version "
            f"{registered['version']} ({report['gate']['registered']['model']}); gate: {report['gate']['decision']}. "
            "Figures and reports per stage under Artifacts; one child run per trial.")
