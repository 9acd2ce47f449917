"""Registry gate decisions and evaluation metrics on constructed cases."""

import numpy as np
import pytest

from mlpipe.config import EvaluateConfig
from mlpipe.gate import decide
from mlpipe.metrics import bootstrap_ci, expected_calibration_error, evaluation_metrics

NAMES = ["a", "b", "c"]


def _predictions(y, accuracy, seed, spare=None):
    """Predictions right on a share `accuracy` of items (wrong ones shifted by one class);
    `spare`: a class whose items are always right."""
    rng = np.random.default_rng(seed)
    pred = y.copy()
    wrong = rng.random(len(y)) > accuracy
    if spare is not None:
        wrong &= y != spare
    pred[wrong] = (y[wrong] + 1) % 3
    return pred


Y = np.repeat([0, 1, 2], 200)


def test_no_champion_promotes_when_thresholds_are_met():
    gate = decide(Y, _predictions(Y, 0.8, 0), None, NAMES, EvaluateConfig())
    assert gate["decision"] == "promote" and gate["reasons"] == ["no champion yet; thresholds met"]
    low = decide(Y, _predictions(Y, 0.3, 0), None, NAMES, EvaluateConfig())
    assert low["decision"] == "reject" and low["reasons"] == ["threshold macro_f1 >= 0.5"]


def test_clearly_better_challenger_is_promoted():
    gate = decide(Y, _predictions(Y, 0.9, 1), _predictions(Y, 0.7, 2), NAMES, EvaluateConfig())
    assert gate["decision"] == "promote", gate
    low, high = gate["checks"]["paired bootstrap 95% CI excludes 0"]["value"]
    assert 0 < low < gate["checks"]["improvement >= 0.0"]["value"] < high


def test_worse_challenger_is_rejected():
    gate = decide(Y, _predictions(Y, 0.7, 1), _predictions(Y, 0.9, 2), NAMES, EvaluateConfig())
    assert gate["decision"] == "reject"
    assert "improvement >= 0.0" in gate["reasons"] and "paired bootstrap 95% CI excludes 0" in gate["reasons"]


def test_a_gain_within_noise_is_not_significant():
    champion = _predictions(Y, 0.85, 2)
    challenger = champion.copy()
    flip = np.flatnonzero(challenger != Y)[:3]  # three more right answers out of 600
    challenger[flip] = Y[flip]
    gate = decide(Y, challenger, champion, NAMES, EvaluateConfig())
    assert gate["checks"]["improvement >= 0.0"]["passed"]  # better on the point estimate ...
    assert gate["reasons"] == ["paired bootstrap 95% CI excludes 0"]  # ... but not significantly
    assert gate["decision"] == "reject"


def test_a_class_recall_regression_blocks_promotion():
    champion = _predictions(Y, 0.75, 2, spare=2)  # class c always right
    challenger = _predictions(Y, 0.97, 3)
    challenger[np.flatnonzero(Y == 2)[:40]] = 0  # ... but c loses 20 points of recall
    gate = decide(Y, challenger, champion, NAMES, EvaluateConfig(max_recall_drop=0.05))
    check = gate["checks"]["no class recall drops by more than 0.05"]
    assert not check["passed"] and check["value"]["class"] == "c" and check["value"]["drop"] >= 0.2
    assert gate["decision"] == "reject"


def test_min_improvement_is_enforced():
    gate = decide(Y, _predictions(Y, 0.9, 1), _predictions(Y, 0.8, 2), NAMES, EvaluateConfig(min_improvement=0.3))
    assert gate["reasons"] == ["improvement >= 0.3"]


def test_metrics_intervals_and_calibration():
    rng = np.random.default_rng(0)
    proba = rng.dirichlet(np.ones(3), len(Y))
    proba[np.arange(len(Y)), Y] += 1.0
    proba /= proba.sum(axis=1, keepdims=True)
    metrics = evaluation_metrics(Y, proba)
    assert {"test_accuracy", "test_balanced_accuracy", "test_macro_f1", "test_weighted_f1", "test_macro_precision",
            "test_roc_auc_ovr", "test_pr_auc_ovr", "test_log_loss", "test_ece"} <= set(metrics)  # fmt: skip
    intervals = bootstrap_ci(Y, proba.argmax(axis=1), 3, resamples=1000, seed=0)
    for name, (low, high) in intervals.items():
        assert low <= metrics[name] <= high
    assert intervals == bootstrap_ci(Y, proba.argmax(axis=1), 3, resamples=1000, seed=0)  # seeded
    # ECE known answers: always 60% confident and 60% right -> 0; 90% confident and 60% right -> 0.3
    y = np.array([0] * 6 + [1] * 4)
    sure = np.tile([0.6, 0.4], (10, 1))
    assert expected_calibration_error(y, sure) == pytest.approx(0.0)
    assert expected_calibration_error(y, np.tile([0.9, 0.1], (10, 1))) == pytest.approx(0.3)


@pytest.mark.parametrize("arch", ["small_cnn", "resnet18"])
def test_onnx_export_matches_torch_within_1e_4(arch, tmp_path):
    import torch

    from mlpipe.evaluate import onnx_parity
    from mlpipe.train.model import ServingModel, build_model

    torch.manual_seed(0)
    model = ServingModel(build_model(arch, 1, 10, 16), torch.tensor([0.3]), torch.tensor([0.2])).eval()
    images = np.random.default_rng(0).integers(0, 256, (40, 16, 16, 1), dtype=np.uint8)
    result = onnx_parity(model, images, tmp_path / "model.onnx")
    assert result["exported"], result
    assert result["inputs"] == 32 and result["passed"] and result["max_abs_diff"] <= 1e-4
    assert (tmp_path / "model.onnx").stat().st_size > 1000


@pytest.mark.parametrize("arch", ["small_cnn", "resnet18"])
def test_gradcam_figure_from_captum(arch, tmp_path):
    import torch

    from mlpipe.evaluate import gradcam_figure
    from mlpipe.train.model import ServingModel, build_model

    torch.manual_seed(0)
    model = ServingModel(build_model(arch, 1, 3, 16), torch.tensor([0.3]), torch.tensor([0.2])).eval()
    images = np.random.default_rng(0).integers(0, 256, (12, 16, 16, 1), dtype=np.uint8)
    y = np.arange(12) % 3
    with torch.no_grad():
        proba = model(torch.from_numpy(images).permute(0, 3, 1, 2).float()).numpy()
    fig = gradcam_figure(model, images, y, proba, NAMES, count=4)
    fig.savefig(tmp_path / "cam.png")
    assert (tmp_path / "cam.png").stat().st_size > 5000
    right = int((proba.argmax(axis=1) == y).sum())
    shown = min(right, 4) + min(12 - right, 4)  # a row of correct items, a row of mistakes
    assert len([ax for ax in fig.axes if ax.images]) == shown
    assert all(p.grad is None for p in model.parameters())  # the attribution's gradients are cleared
