"""Every figure mlpipe writes, drawn on tiny synthetic inputs and checked for what a reader needs
at a glance: no text or legend outside the canvas (clipped), no two texts on top of each other,
legends clear of the bars, class names on the axes, curves labelled by class name."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import numpy as np
import pytest
from matplotlib.text import Text

LONG = ["T-shirt/top", "trouser", "pullover", "ankle boot"]  # long names, as in Fashion-MNIST
BINARY = ["healthy", "pneumonia"]
TEN = ["T-shirt/top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot"]


def _drawn_texts(fig) -> list[Text]:
    """The texts the canvas shows: visible, non-empty, and not the labels of ticks outside the view
    (matplotlib keeps those, stale and undrawn) nor of axes switched off."""
    hidden = set()
    for ax in fig.axes:
        for axis in (ax.xaxis, ax.yaxis):
            low, high = sorted(axis.get_view_interval())
            for tick in axis.get_major_ticks() + axis.get_minor_ticks():
                if not ax.axison or not low - 1e-9 <= tick.get_loc() <= high + 1e-9:
                    hidden.update({id(tick.label1), id(tick.label2)})
            if not ax.axison:
                hidden.add(id(axis.label))
    return [t for t in fig.findobj(Text) if t.get_visible() and t.get_text().strip() and id(t) not in hidden]


def _legends(fig) -> list:
    return [*fig.legends, *(leg for sub in fig.subfigs for leg in sub.legends),
            *(ax.get_legend() for ax in fig.axes if ax.get_legend() is not None)]  # fmt: skip


def _canvas(fig):
    """The figure's Agg canvas: pyplot.close leaves a closed figure a bare canvas that cannot render."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    return fig.canvas if isinstance(fig.canvas, FigureCanvasAgg) else FigureCanvasAgg(fig)


def _overlap(a, b, slack: float = 1.0) -> bool:
    return min(a.x1, b.x1) - max(a.x0, b.x0) > slack and min(a.y1, b.y1) - max(a.y0, b.y0) > slack


def assert_readable(fig) -> list[Text]:
    """Draws `fig` once, as savefig does; fails when a text or legend leaves the canvas or two texts
    overlap. Returns the texts."""
    _canvas(fig).draw()
    renderer = fig.canvas.get_renderer()
    width, height = fig.bbox.width, fig.bbox.height
    texts = _drawn_texts(fig)
    assert texts, "nothing drawn"
    boxes = [(t.get_text(), t.get_window_extent(renderer)) for t in texts]
    boxes += [(f"legend {[t.get_text() for t in leg.get_texts()]}", leg.get_window_extent(renderer))
              for leg in _legends(fig)]  # fmt: skip
    for what, box in boxes:
        assert box.x0 >= -1 and box.y0 >= -1 and box.x1 <= width + 1 and box.y1 <= height + 1, (
            f"{what!r} at {box.bounds} leaves the {width:.0f} x {height:.0f} canvas")  # fmt: skip
    for i, (first, a) in enumerate(boxes[: len(texts)]):
        for second, b in boxes[i + 1 : len(texts)]:
            assert not _overlap(a, b), f"{first!r} and {second!r} overlap"
    for legend in _legends(fig):
        own = {id(t) for t in legend.findobj(Text)}
        box = legend.get_window_extent(renderer)
        for text in texts:
            assert id(text) in own or not _overlap(box, text.get_window_extent(renderer)), (
                f"the legend covers {text.get_text()!r}")  # fmt: skip
    return texts


def assert_legend_clear_of_bars(fig) -> None:
    _canvas(fig).draw()
    renderer = fig.canvas.get_renderer()
    legends = _legends(fig)
    bars = [p for ax in fig.axes for p in ax.patches if p.get_height() > 0]
    assert legends and bars
    for legend in legends:
        box = legend.get_window_extent(renderer)
        covered = [p for p in bars if _overlap(box, p.get_window_extent(renderer))]
        assert not covered, f"the legend covers {len(covered)} bar(s)"


def tick_texts(ax, axis: str = "x") -> list[str]:
    return [t.get_text() for t in (ax.get_xticklabels() if axis == "x" else ax.get_yticklabels())]


def _predictions(names: list[str], n: int = 40, seed: int = 0, accuracy: float = 0.7):
    """(y, proba): every class present, about `accuracy` of the argmax right."""
    rng = np.random.default_rng(seed)
    k = len(names)
    y = np.arange(n) % k
    logits = rng.normal(size=(n, k))
    logits[np.arange(n), np.where(rng.random(n) < accuracy, y, (y + 1) % k)] += 3
    proba = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return y, proba


@pytest.mark.parametrize("names", [BINARY, LONG, TEN], ids=["binary", "long-names", "ten-classes"])
def test_confusion_matrix_names_both_axes_and_fits(names):
    from mlpipe.evaluate import confusion_figure

    y, proba = _predictions(names)
    fig = confusion_figure(y, proba.argmax(axis=1), names)
    assert_readable(fig)
    for ax in fig.axes:
        assert tick_texts(ax, "x") == names and tick_texts(ax, "y") == names


def test_binary_curves_name_the_positive_class_not_a_label_index():
    from mlpipe.evaluate import curves_figure

    y, proba = _predictions(BINARY)
    fig = curves_figure(y, proba, BINARY, positive=1)
    texts = [t.get_text() for t in assert_readable(fig)]
    assert not [t for t in texts if "Positive label" in t]
    for ax in fig.axes:
        assert "pneumonia" in ax.get_xlabel() and "pneumonia" in ax.get_ylabel()


@pytest.mark.parametrize("names", [LONG, TEN], ids=["four", "ten"])
def test_multiclass_curves_are_one_vs_rest_per_class_name(names):
    from mlpipe.evaluate import curves_figure

    y, proba = _predictions(names)
    fig = curves_figure(y, proba, names)
    texts = [t.get_text() for t in assert_readable(fig)]
    assert not [t for t in texts if "Positive label" in t]
    for ax in fig.axes:
        assert "one vs rest" in ax.get_xlabel()
        entries = [t.get_text() for t in ax.get_legend().get_texts()]
        for name in names:
            assert [e for e in entries if e.startswith(f"{name} vs rest")], (name, entries)


def test_reliability_legend_clear_of_the_bars():
    from mlpipe.evaluate import reliability_figure

    y, proba = _predictions(LONG, n=200, accuracy=0.9)
    fig = reliability_figure(y, proba, 0.05)
    assert_readable(fig)
    assert_legend_clear_of_bars(fig)


@pytest.mark.parametrize("accuracy", [0.6, 1.0], ids=["mistakes", "no-mistakes"])
def test_misclassified_figure_most_confident_first_or_says_none(accuracy):
    from mlpipe.evaluate import misclassified_figure

    y, proba = _predictions(LONG, n=30, accuracy=accuracy)
    pred = proba.argmax(axis=1)
    images = np.random.default_rng(0).integers(0, 256, (30, 8, 8, 1), dtype=np.uint8)
    texts = [t.get_text() for t in assert_readable(misclassified_figure(images, y, proba, LONG))]
    wrong = np.flatnonzero(pred != y)
    if len(wrong):
        top = wrong[np.argmax(proba[wrong, pred[wrong]])]
        assert f"{LONG[y[top]]} -> {LONG[pred[top]]}\n{proba[top, pred[top]]:.2f}" in texts
    else:
        assert "no misclassified test items" in texts


@pytest.fixture(scope="module")
def tiny_model():
    import torch

    from mlpipe.train.model import ServingModel, build_model

    torch.manual_seed(0)
    return ServingModel(build_model("small_cnn", 1, len(LONG), 16), torch.tensor([0.3]), torch.tensor([0.2])).eval()


def test_gradcam_shows_correct_items_and_the_most_confident_mistake(tiny_model):
    from mlpipe.evaluate import gradcam_figure

    images = np.random.default_rng(0).integers(0, 256, (12, 16, 16, 1), dtype=np.uint8)
    y = np.arange(12) % 4
    proba = np.full((12, 4), 0.1)
    proba[np.arange(12), y] = 0.7  # all right ...
    proba[5] = [0.01, 0.02, 0.95, 0.02]  # ... but item 5 (trouser), the most confident mistake
    proba[6] = [0.6, 0.1, 0.2, 0.1]  # and item 6 (pullover), a less confident one
    fig = gradcam_figure(tiny_model, images, y, proba, LONG, count=4)
    texts = [t.get_text() for t in assert_readable(fig)]
    # (title, true, predicted) of every item shown
    items = [(t, *t.split("\n")[0].split(" -> ")) for t in texts if " -> " in t and "\n" in t]
    mistakes = [title for title, true, predicted in items if true != predicted]
    assert mistakes == ["trouser -> pullover\n0.95", "pullover -> T-shirt/top\n0.60"], texts  # most confident first
    correct = [title for title, true, predicted in items if true == predicted]
    assert len(correct) == 4 and {t.split(" -> ")[0] for t in correct} == set(LONG)  # one of each class
    assert len([ax for ax in fig.axes if ax.images]) == 6


def test_gradcam_without_mistakes_says_so(tiny_model):
    from mlpipe.evaluate import gradcam_figure

    images = np.random.default_rng(1).integers(0, 256, (8, 16, 16, 1), dtype=np.uint8)
    y = np.arange(8) % 4
    proba = np.eye(4)[y] * 0.9 + 0.025
    texts = [t.get_text() for t in assert_readable(gradcam_figure(tiny_model, images, y, proba, LONG))]
    assert "no misclassified test items" in texts


def test_per_class_intervals_and_figure():
    from sklearn.metrics import precision_recall_fscore_support

    from mlpipe.evaluate import FIGURES, per_class_figure, per_class_intervals

    assert "per_class.png" in FIGURES  # logged to MLflow with the others

    y, proba = _predictions(LONG, n=80)
    pred = proba.argmax(axis=1)
    intervals = per_class_intervals(y, pred, LONG, resamples=200, seed=3)
    assert intervals == per_class_intervals(y, pred, LONG, resamples=200, seed=3)  # seeded
    p, r, f, support = precision_recall_fscore_support(y, pred, labels=range(4), zero_division=0)
    for k, name in enumerate(LONG):
        entry = intervals[name]
        assert entry["support"] == support[k] and entry["f1"] == pytest.approx(f[k])
        for metric, point in (("precision", p[k]), ("recall", r[k]), ("f1", f[k])):
            low, high = entry[f"{metric}_ci"]
            assert entry[metric] == pytest.approx(point) and low <= point <= high and low < high
    perfect = per_class_intervals(y, y, LONG, resamples=50, seed=0)
    assert all(e[f"{m}_ci"] == [1.0, 1.0] for e in perfect.values() for m in ("precision", "recall", "f1"))
    absent = per_class_intervals(np.zeros(10, int), np.zeros(10, int), ["a", "b"], resamples=20, seed=0)
    assert absent["b"]["recall_ci"] is None and absent["b"]["support"] == 0  # undefined: None, never NaN
    fig = per_class_figure(intervals, 200)
    assert_readable(fig)
    assert_legend_clear_of_bars(fig)
    assert [t.splitlines()[0] for t in tick_texts(fig.axes[0], "y")] == LONG


def test_split_class_counts_chart(tmp_path):
    from mlpipe.split import _chart

    parts = ["train", "val", "test"]
    counts = {part: {c: 10 * (i + 1) + j for j, c in enumerate(LONG)} for i, part in enumerate(parts)}
    fig = _chart({"class_counts": counts, "proportion_gap_linf": 0.012}, tmp_path / "class_counts.png")
    assert (tmp_path / "class_counts.png").stat().st_size > 5000
    assert_readable(fig)
    assert_legend_clear_of_bars(fig)
    assert tick_texts(fig.axes[0]) == sorted(LONG)


@pytest.mark.parametrize("strategies", [["random_over"], ["random_over", "smote", "random_under"]])
def test_resample_class_counts_chart(strategies, tmp_path):
    from mlpipe.resample import _chart

    entries = {name: {"fold": None, "config": {"strategy": name}, "after": [60, 60, 60, 60]} for name in strategies}
    report = {"classes": LONG, "before": [60, 40, 20, 5], "strategies": entries}
    fig = _chart(report, tmp_path / "class_counts.png")
    assert (tmp_path / "class_counts.png").stat().st_size > 5000
    assert_readable(fig)
    assert_legend_clear_of_bars(fig)
    assert tick_texts(fig.axes[0]) == LONG


@pytest.mark.parametrize("axes", [1, 2, 3])
def test_grid_figure_fits(axes):
    import itertools

    from mlpipe.search import grid_figure, leaderboard

    values = {"train.lr": [0.1, 0.01], "resample.strategy": ["none", "smote"], "train.batch_size": [16, 32]}
    keys = list(values)[:axes]
    trials = [{"trial": f"t{i}", "params": dict(zip(keys, combo, strict=True)),
               "val_metrics": {"val_macro_f1": 0.5 + 0.01 * i, "val_accuracy": 0.5}, "best_epoch": 1, "epochs_run": 1,
               "seconds": 1.0} for i, combo in enumerate(itertools.product(*(values[k] for k in keys)))]  # fmt: skip
    assert_readable(grid_figure(leaderboard(trials, "val_macro_f1"), "val_macro_f1"))


def test_scoring_confidence_figure_fits():
    from mlpipe.scoring import confidence_figure

    edges = np.linspace(0, 1, 11).round(2).tolist()
    texts = [t.get_text() for t in assert_readable(confidence_figure({"edges": edges, "counts": list(range(10))}, 45))]
    assert "Confidence of 45 scored images" in texts
