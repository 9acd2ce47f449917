"""Classical baselines (mlpipe.baseline) and the registry gate against them (issue 17, item 3)."""

import json

import numpy as np
import pytest
import torch

from mlpipe import baseline
from mlpipe.config import EvaluateConfig
from mlpipe.errors import MlpipeError
from mlpipe.gate import decide
from mlpipe.store import StageResult


def _images(labels, seed, size=8, noise=120):
    """uint8 NHWC: class k is a bright band at a class-specific row, plus strong noise (not separable
    by every model, so hyperparameters matter)."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, noise, (len(labels), size, size, 1)).astype(np.uint8)
    for i, k in enumerate(labels):
        images[i, (2 * k) % size : (2 * k) % size + 2, :, 0] = 200 + rng.integers(0, 50)
    return images


def _data(k, n, seed):
    y = np.arange(n) % k
    return _images(y, seed), y


def _faint(labels, seed, shift=20):
    """Gaussian noise with a faint class band: models and grid points disagree on such items."""
    rng = np.random.default_rng(seed)
    x = rng.normal(100, 50, (len(labels), 8, 8, 1))
    for i, label in enumerate(labels):
        x[i, 2 * label : 2 * label + 2] += shift
    return np.clip(x, 0, 255).astype(np.uint8)


def _hard(k, n, seed):
    y = np.arange(n) % k
    return _faint(y, seed), y


# --- fitting and choosing -------------------------------------------------------------------------


def test_choice_follows_the_validation_labels_alone():
    """The params with the best validation macro-F1 win (first in grid order on a tie); give the
    validation items the labels one other grid point predicts, and that grid point wins instead."""
    from sklearn.linear_model import LogisticRegression

    train, val = _hard(3, 150, 0), _hard(3, 90, 1)
    first = baseline.fit_baselines(*train, *val, num_classes=3)["logistic_regression"]
    best = max(first.grid.values())
    assert first.val_macro_f1 == pytest.approx(best, abs=1e-6)
    assert f"C={first.params['C']:g}, class_weight={first.params['class_weight']}" == next(
        point for point, score in first.grid.items() if score == best)  # fmt: skip
    x = baseline.run_module(first.module.features, train[0])
    xv = baseline.run_module(first.module.features, val[0])
    chosen = first.estimator.predict(xv)
    for c in baseline.LR_GRID["C"]:  # the first other grid point that labels the validation items differently
        target = LogisticRegression(C=c, class_weight=None, max_iter=200, tol=1e-3).fit(x, train[1]).predict(xv)
        if (target != chosen).any():
            break
    else:
        pytest.fail("every grid point predicts the same validation labels: no choice to test")
    second = baseline.fit_baselines(*train, val[0], target, num_classes=3)["logistic_regression"]
    assert second.params == {"C": c, "class_weight": None} != first.params
    assert second.val_macro_f1 == pytest.approx(1.0)


def test_after_a_refit_the_baselines_are_refit_on_train_and_val_with_their_validation_choice():
    """search.refit trains the deep model on train+val: the baselines get the same items, with the
    C, class_weight and temperature chosen before on validation, so the comparison stays even."""
    train, val = _hard(3, 150, 0), _hard(3, 90, 1)
    alone = baseline.fit_baselines(*train, *val, num_classes=3)
    both = (np.concatenate([train[0], val[0]]), np.concatenate([train[1], val[1]]))
    refit = baseline.fit_baselines(*train, *val, num_classes=3, train_total=150, refit_on=(*both, 240))
    for name in baseline.NAMES:
        assert refit[name].params == alone[name].params and refit[name].val_macro_f1 == alone[name].val_macro_f1
        assert refit[name].train_items == 240 and alone[name].train_items == 150
        assert refit[name].notes[-1] == "trained on 240 of 240 training items (refit on train+val, as the deep model was)"
    lr = refit["logistic_regression"].estimator
    expected = baseline.LogisticRegression(C=alone["logistic_regression"].params["C"], max_iter=200, tol=1e-3,
                                           class_weight=alone["logistic_regression"].params["class_weight"])
    expected.fit(baseline.run_module(refit["logistic_regression"].module.features, both[0]), both[1])
    np.testing.assert_allclose(lr.coef_, expected.coef_)
    assert refit["rbf_svc"].estimator.support_vectors_.shape[0] != alone["rbf_svc"].estimator.support_vectors_.shape[0]
    assert baseline.check_parity(refit["rbf_svc"], val[0])["max_abs_diff"] <= 1e-6


def test_svc_training_items_are_capped_and_recorded(monkeypatch):
    monkeypatch.setattr(baseline, "SVC_MAX_ITEMS", 60)
    fitted = baseline.fit_baselines(*_data(3, 150, 0), *_data(3, 60, 1), num_classes=3)
    svc = fitted["rbf_svc"]
    assert svc.train_items <= 60 + 3 and "trained on" in svc.notes[0]
    assert fitted["logistic_regression"].train_items == 150


def test_bad_inputs_are_one_line_errors():
    (images, y), val = _data(3, 60, 0), _data(3, 30, 1)
    with pytest.raises(MlpipeError, match=r"class index\(es\) \[2\] have no training item"):
        baseline.fit_baselines(images[y < 2], y[y < 2], *val, num_classes=3)
    with pytest.raises(MlpipeError, match="differ in shape"):
        baseline.fit_baselines(images, y, val[0][:, :4], val[1], num_classes=3)


def test_large_images_are_pooled_to_at_most_32_px():
    assert baseline.pool_factor(28, 28) == 1 and baseline.pool_factor(64, 64) == 2 and baseline.pool_factor(224, 200) == 7
    images = np.random.default_rng(0).integers(0, 256, (3, 70, 70, 3), dtype=np.uint8)
    features = baseline.PixelFeatures(3, torch.zeros(1), torch.ones(1))
    x = baseline.run_module(features, images)
    assert x.shape == (3, 3 * 23 * 23)
    expected = images[:, :69, :69].astype(float).reshape(3, 23, 3, 23, 3, 3).mean(axis=(2, 4)) / 255
    np.testing.assert_allclose(x, expected.transpose(0, 3, 1, 2).reshape(3, -1), atol=1e-12)


# --- the torch modules reproduce scikit-learn -------------------------------------------------------


@pytest.mark.parametrize("k", [2, 3, 5])
def test_torch_modules_reproduce_scikit_learn(k, tmp_path):
    from mlpipe.evaluate import load_model

    fitted = baseline.fit_baselines(*_data(k, 40 * k, 0), *_data(k, 20 * k, 1), num_classes=k)
    test_images, _ = _data(k, 30 * k, 2)
    for name, b in fitted.items():
        x = baseline.run_module(b.module.features, test_images)
        proba = baseline.run_module(b.module, test_images)
        assert proba.shape == (len(test_images), k) and np.allclose(proba.sum(axis=1), 1, atol=1e-6)
        np.testing.assert_array_equal(proba.argmax(axis=1), b.estimator.predict(x))  # sklearn's own predict
        if name == "logistic_regression":
            np.testing.assert_allclose(proba, b.estimator.predict_proba(x), atol=1e-6)
        else:
            decision = baseline.run_module(b.module, test_images, "decision")
            np.testing.assert_allclose(decision, b.estimator.decision_function(x), atol=1e-9)
        parity = baseline.check_parity(b, test_images)
        assert parity["labels_agree"] and parity["max_abs_diff"] <= 1e-6
        # The registry's export (torch.export, dynamic batch) and the checkpoint round trip keep the outputs.
        batch = baseline.to_nchw(test_images)
        program = torch.export.export(b.module, (batch[:2],), dynamic_shapes=({0: torch.export.Dim("batch")},))
        np.testing.assert_allclose(program.module()(batch).numpy(), proba, atol=1e-6)
        torch.save(baseline.checkpoint(b.module, 1, k), tmp_path / f"{name}.pt")
        loaded = load_model(tmp_path / f"{name}.pt")
        assert loaded.arch == f"baseline {name}"
        np.testing.assert_array_equal(baseline.run_module(loaded, test_images), proba)


def test_parity_check_catches_a_module_that_is_not_the_fitted_model():
    fitted = baseline.fit_baselines(*_data(3, 120, 0), *_data(3, 60, 1), num_classes=3)
    images, _ = _data(3, 60, 2)
    fitted["logistic_regression"].module.weight[0] += 0.5
    with pytest.raises(MlpipeError, match="logistic_regression: the torch module differs from scikit-learn"):
        baseline.check_parity(fitted["logistic_regression"], images)
    fitted["rbf_svc"].module.intercept += 0.3
    with pytest.raises(MlpipeError, match="rbf_svc: the torch module differs"):
        baseline.check_parity(fitted["rbf_svc"], images)


def test_a_checkpoint_of_an_unknown_baseline_is_refused(tmp_path):
    fitted = baseline.fit_baselines(*_data(2, 40, 0), *_data(2, 20, 1), num_classes=2)
    ckpt = baseline.checkpoint(fitted["logistic_regression"].module, 1, 2)
    with pytest.raises(MlpipeError, match="unknown model 'forest'"):
        baseline.from_checkpoint({**ckpt, "model": "forest"})


# --- the registry gate against the best baseline ----------------------------------------------------

NAMES = ["a", "b", "c"]
Y = np.repeat([0, 1, 2], 200)


def _predictions(accuracy, seed):
    rng = np.random.default_rng(seed)
    pred = Y.copy()
    wrong = rng.random(len(Y)) > accuracy
    pred[wrong] = (Y[wrong] + 1) % 3
    return pred


CHECK = "beats baseline rbf_svc on macro_f1 (paired bootstrap)"


def test_gate_refuses_a_deep_model_worse_than_the_baseline():
    gate = decide(Y, _predictions(0.8, 1), None, NAMES, EvaluateConfig(), baseline=("rbf_svc", _predictions(0.9, 2)))
    assert gate["decision"] == "reject" and gate["reasons"] == [CHECK]
    value = gate["checks"][CHECK]["value"]
    assert value["difference"] < 0 and value["ci95"][0] <= value["difference"] <= value["ci95"][1]
    assert value["share_ahead"] < 0.5


def test_gate_promotes_a_deep_model_that_beats_the_baseline():
    gate = decide(Y, _predictions(0.9, 1), None, NAMES, EvaluateConfig(), baseline=("rbf_svc", _predictions(0.8, 2)))
    assert gate["decision"] == "promote" and gate["reasons"] == ["no champion yet; thresholds met; baseline rbf_svc beaten"]
    assert gate["checks"][CHECK]["passed"] and gate["checks"][CHECK]["value"]["share_ahead"] >= 0.5


def test_a_lead_on_the_full_test_set_that_most_resamples_reverse_is_not_a_win():
    """Three items of a rare class make macro-F1 volatile: the deep model is ahead on the full set
    but behind in more than half of the paired resamples."""
    y = np.array([0] * 40 + [1] * 40 + [2] * 3)
    deep, base = y.copy(), y.copy()
    deep[[47, 58, 62, 63, 64, 80]] = 0
    base[[15, 44, 75]] = 2
    check = decide(y, deep, None, NAMES, EvaluateConfig(thresholds={}), baseline=("rbf_svc", base))["checks"][CHECK]
    assert check["value"]["difference"] > 0 and check["value"]["share_ahead"] < 0.5 and not check["passed"]


def test_a_tie_with_the_baseline_is_not_a_win_and_the_check_applies_with_a_champion():
    same = _predictions(0.85, 1)
    assert not decide(Y, same, None, NAMES, EvaluateConfig(), baseline=("rbf_svc", same.copy()))["checks"][CHECK]["passed"]
    deep, mirror = Y.copy(), Y.copy()  # mirror-image mistakes: equal on the full test set ...
    deep[np.flatnonzero(Y == 0)[:10]] = 1
    mirror[np.flatnonzero(Y == 1)[:10]] = 0
    tie = decide(Y, deep, None, NAMES, EvaluateConfig(), baseline=("rbf_svc", mirror))["checks"][CHECK]
    assert tie["value"]["difference"] == 0 and tie["value"]["share_ahead"] >= 0.5  # ... ahead in half the resamples
    assert not tie["passed"]
    gate = decide(Y, _predictions(0.9, 1), _predictions(0.7, 3), NAMES, EvaluateConfig(),
                  baseline=("rbf_svc", _predictions(0.95, 2)))  # fmt: skip
    assert gate["decision"] == "reject" and gate["reasons"] == [CHECK]  # beats the champion, not the baseline


# --- in evaluate: fitted before the one test read, scored on it, registered when allowed --------------


def _splits(tmp_path, k, seed=0, make=_images):
    """A split stage's files on synthetic 8x8 grayscale images (`make(labels, seed)`): train, val, test parts."""
    parts = {"train": 40 * k, "val": 20 * k, "test": 20 * k}
    labels = {part: np.arange(n) % k for part, n in parts.items()}
    images = np.concatenate([make(labels[p], seed + i) for i, p in enumerate(parts)])
    np.save(tmp_path / "pixels.npy", images)
    start = 0
    for part, y in labels.items():
        np.savez(tmp_path / f"{part}.npz", pixel_index=np.arange(start, start + len(y)), y=y)
        start += len(y)
    names = [f"class{i}" for i in range(k)]
    (tmp_path / "label_map.json").write_text(json.dumps({n: i for i, n in enumerate(names)}))
    counts = {p: {n: int((y == i).sum()) for i, n in enumerate(names)} for p, y in labels.items()}
    report = {"sizes": parts, "class_counts": counts, "seed": 0, "group_column": "subject", "mode": "holdout"}
    return StageResult(stage="split", path=str(tmp_path), key=f"split{k}", report=report,
                       files={"pixels": str(tmp_path / "pixels.npy")})  # fmt: skip


def _deep(tmp_path, k):
    """A search winner's checkpoint: an untrained small CNN, about chance level."""
    from mlpipe.train.model import build_model

    torch.manual_seed(0)
    state = build_model("small_cnn", 1, k, 8).state_dict()
    torch.save({"model": "small_cnn", "in_channels": 1, "num_classes": k, "image_size": 8, "model_state": state,
                "mean": torch.tensor([0.2]), "std": torch.tensor([0.3])}, tmp_path / "checkpoint.pt")  # fmt: skip
    return StageResult(stage="refit", path=str(tmp_path), key=f"deep{k}", report={"winner": "trial-000"},
                       files={"checkpoint": str(tmp_path / "checkpoint.pt")})  # fmt: skip


@pytest.fixture
def run_evaluate(tmp_path, monkeypatch):
    import mlpipe.evaluate as ev

    # ONNX and Grad-CAM are the deep model's, tested in test_gate.py; not redone here
    monkeypatch.setattr(ev, "onnx_parity", lambda *a, **k: {"exported": False, "error": "not exported in unit tests"})
    monkeypatch.setattr(ev, "gradcam_figure", lambda *a, **k: ev.plt.figure())
    calls = []
    read = ev.load_split
    monkeypatch.setattr(ev, "load_split", lambda splits, name: calls.append(("read", name)) or read(splits, name))
    fit = ev.classical.fit_baselines
    monkeypatch.setattr(ev.classical, "fit_baselines", lambda *a, **k: calls.append(("fit", len(a[0]))) or fit(*a, **k))

    def run(k, champion=None, make=_images, **config):
        folder = tmp_path / f"k{k}-{len(list(tmp_path.iterdir()))}"
        folder.mkdir()
        calls.clear()
        result, model = ev.evaluate(_deep(folder, k), _splits(folder, k, make=make),
                                    EvaluateConfig(bootstrap_resamples=200, **config), champion)  # fmt: skip
        return result, model, list(calls)

    return run


@pytest.mark.parametrize("k", [2, 3])
def test_evaluate_reports_baselines_and_refuses_a_deep_model_that_loses(run_evaluate, k):
    result, model, calls = run_evaluate(k)
    assert calls.index(("fit", 40 * k)) < calls.index(("read", "test")) and calls.count(("read", "test")) == 1
    report = result.report
    assert set(report["baselines"]) == {"logistic_regression", "rbf_svc"}
    best = report["best_baseline"]
    assert best == max(report["baselines"], key=lambda n: report["baselines"][n]["val_macro_f1"])
    for name, entry in report["baselines"].items():
        assert {"params", "val_macro_f1", "test_macro_f1", "test_accuracy", "test_balanced_accuracy"} <= set(entry)
        assert entry["torch_parity"]["labels_agree"] and entry["test_macro_f1"] > 0.8
        assert report["baseline_metrics"][f"baseline_{name}_test_macro_f1"] == entry["test_macro_f1"]
    gate = report["gate"]
    check = f"beats baseline {best} on macro_f1 (paired bootstrap)"
    assert gate["decision"] == "reject" and check in gate["reasons"] and not gate["checks"][check]["passed"]
    assert gate["registered"]["model"] == "deep model" and "allow_baseline_champion is false" in gate["registered"]["why"]
    assert model.arch == "small_cnn" and result.file("checkpoint").name == "checkpoint.pt"
    card = result.file("model_card.md").read_text()
    assert "## Classical baselines (same split)" in card and f"- best on validation: {best}" in card
    for name, scores in report["per_class_intervals"].items():  # the card's per-class table, with intervals
        low, high = scores["f1_ci"]
        assert f"| {name} | {scores['support']} |" in card and f"{scores['f1']:.3f} ({low:.3f}-{high:.3f}) |" in card
    if k == 2:  # the baselines get an operating point chosen on validation, like the deep model
        assert all(e["decision_rule"]["kind"] == "threshold" for e in report["baselines"].values())


def test_test_labels_choose_nothing(run_evaluate, monkeypatch):
    """Give the test items the labels the baseline that lost on validation predicts: it becomes the
    best on test (macro-F1 1.0), yet the best baseline and every chosen param stay as they were."""
    import mlpipe.evaluate as ev

    honest = run_evaluate(3, make=_faint)[0].report
    loser = next(name for name in honest["baselines"] if name != honest["best_baseline"])
    read = ev.load_split

    def relabelled(splits, name):
        images, y = read(splits, name)
        if name != "test":
            return images, y
        fitted = baseline.fit_baselines(*read(splits, "train"), *read(splits, "val"), num_classes=3)
        return images, baseline.run_module(fitted[loser].module, images).argmax(axis=1)

    monkeypatch.setattr(ev, "load_split", relabelled)
    rigged = run_evaluate(3, make=_faint)[0].report
    assert rigged["baselines"][loser]["test_macro_f1"] == pytest.approx(1.0)  # the test set would pick it ...
    assert rigged["baselines"][loser]["test_macro_f1"] > rigged["baselines"][honest["best_baseline"]]["test_macro_f1"]
    assert rigged["best_baseline"] == honest["best_baseline"]  # ... validation picked, and still picks, the other
    for name in honest["baselines"]:
        assert rigged["baselines"][name]["params"] == honest["baselines"][name]["params"]
        assert rigged["baselines"][name]["val_macro_f1"] == honest["baselines"][name]["val_macro_f1"]


@pytest.mark.parametrize("k", [2, 3])
def test_allow_baseline_champion_registers_the_baseline(run_evaluate, k):
    result, model, _ = run_evaluate(k, allow_baseline_champion=True)
    report, gate = result.report, result.report["gate"]
    best = report["best_baseline"]
    assert gate["registered"]["model"] == f"baseline {best}" and "beat the deep model" in gate["registered"]["why"]
    assert gate["decision"] == "promote" and gate["deep_model_gate"]["decision"] == "reject"
    assert model.kind == best
    assert "registered: baseline" in result.file("model_card.md").read_text()
    # Its checkpoint is the one the registry keeps: a later run loads it as the champion.
    saved = torch.load(result.file("checkpoint"), weights_only=True)
    assert result.file("checkpoint").name == "checkpoint.pt" and saved["kind"] == "baseline" and saved["model"] == best
    names = [f"class{i}" for i in range(k)]
    later, _, _ = run_evaluate(k, {"version": "4", "checkpoint": str(result.file("checkpoint")), "class_names": names})
    assert later.report["gate"]["champion_version"] == "4" and later.report["gate"]["champion"] is not None
    assert later.report["gate"]["decision"] == "reject"  # an untrained CNN does not beat the baseline champion


def test_a_baseline_below_the_thresholds_is_not_registered(run_evaluate):
    result, model, _ = run_evaluate(3, make=_faint, allow_baseline_champion=True, thresholds={"macro_f1": 0.95})
    gate, best = result.report["gate"], result.report["best_baseline"]
    assert result.report["baselines"][best]["test_macro_f1"] < 0.95  # it beats the untrained CNN, not the floor
    assert gate["registered"]["model"] == "deep model" and "not registered instead: macro_f1" in gate["registered"]["why"]
    assert model.arch == "small_cnn" and "deep_model_gate" not in gate


def test_the_cli_summary_prints_the_baselines(capsys):
    from flows.cli import _print_summary

    summary = {"flow_run_id": "f", "experiment_name": "e", "experiment_id": "1", "run_id": "r", "tracking_uri": "u",
               "registered_model": "m", "version": "3", "metrics": {"test_macro_f1": 0.5}, "gate": "promote",
               "registered_as": "baseline rbf_svc", "best_baseline": "rbf_svc",
               "baselines": {"logistic_regression": {"test_macro_f1": 0.91}, "rbf_svc": {"test_macro_f1": 0.9}}}  # fmt: skip
    _print_summary(summary)
    lines = capsys.readouterr().out.splitlines()
    assert "Registered model:  m version 3 (the baseline rbf_svc, not the deep model)" in lines
    at = next(i for i, line in enumerate(lines) if line.startswith("Test metrics:"))
    assert lines[at + 1] == ("Baselines:         logistic_regression macro_f1=0.9100  rbf_svc macro_f1=0.9000 "
                             "(best on validation: rbf_svc)")  # fmt: skip


def test_allow_baseline_champion_needs_baselines():
    with pytest.raises(ValueError, match="allow_baseline_champion needs evaluate.baseline"):
        EvaluateConfig(baseline=False, allow_baseline_champion=True)


def test_without_baselines_nothing_is_fitted(run_evaluate):
    result, _, calls = run_evaluate(3, baseline=False)
    assert not any(c[0] == "fit" for c in calls) and result.report["baselines"] == {}
    assert not any("baseline" in name for name in result.report["gate"]["checks"])
    assert "- not fitted (evaluate.baseline: false)" in result.file("model_card.md").read_text()


def test_a_champion_this_code_cannot_rebuild_is_skipped_with_the_reason(run_evaluate, tmp_path):
    """A champion registered by an older code version whose small_cnn had other layers: its state
    dict does not fit today's network. The gate says so instead of failing the run."""
    old = tmp_path / "old-champion.pt"
    torch.save({"model": "small_cnn", "in_channels": 1, "num_classes": 3, "image_size": 8,
                "model_state": {"features.0.0.weight": torch.zeros(32, 1, 3, 3)},
                "mean": torch.tensor([0.2]), "std": torch.tensor([0.3])}, old)  # fmt: skip
    names = [f"class{i}" for i in range(3)]
    result, _, _ = run_evaluate(3, {"version": "7", "checkpoint": str(old), "class_names": names})
    gate = result.report["gate"]
    assert gate["champion"] is None
    assert any(r.startswith("champion version 7 skipped: its checkpoint does not load") for r in gate["reasons"])
