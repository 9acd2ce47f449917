import inspect

import numpy as np
import pytest

import mlpipe.resample as resample_module
from mlpipe.config import PipelineConfig, ResampleConfig
from mlpipe.resample import resample, resample_training_set


def _data():
    rng = np.random.default_rng(0)
    y = np.array([0] * 40 + [1] * 10 + [2] * 5)
    return rng.integers(0, 255, (len(y), 4, 4, 1)).astype(np.uint8), y


@pytest.mark.parametrize("strategy", ["random_over", "smote"])
def test_oversampling_balances_classes(strategy):
    images, y = _data()
    out = resample_training_set(images, y, ResampleConfig(strategy=strategy), 3)
    assert np.bincount(out["y"]).tolist() == [40, 40, 40]
    assert out["images"].dtype == np.uint8 and out["images"].shape[1:] == images.shape[1:]
    if strategy == "smote":
        assert out["synthetic"].sum() == 65 and not out["synthetic"][: len(y)].any()
        np.testing.assert_array_equal(out["images"][: len(y)], images)
    else:
        assert not out["synthetic"].any()


def test_undersampling_and_class_weight():
    images, y = _data()
    under = resample_training_set(images, y, ResampleConfig(strategy="random_under"), 3)
    assert np.bincount(under["y"]).tolist() == [5, 5, 5]
    weighted = resample_training_set(images, y, ResampleConfig(strategy="class_weight"), 3)
    assert len(weighted["y"]) == len(y)
    assert weighted["class_weight"][2] > weighted["class_weight"][1] > weighted["class_weight"][0]
    none = resample_training_set(images, y, ResampleConfig(strategy="none"), 3)
    assert (none["class_weight"] == 1).all() and len(none["y"]) == len(y)


def test_resampling_cannot_see_validation_or_test_data(monkeypatch, state):
    # The function takes the training arrays and nothing else ...
    assert list(inspect.signature(resample_training_set).parameters) == ["images", "y", "config", "num_classes"]
    # ... and the stage reads the training split only.
    seen = []
    monkeypatch.setattr(resample_module, "load_split", lambda splits, name: seen.append(name) or _data())
    monkeypatch.setattr(resample_module, "class_names", lambda splits: ["a", "b", "c"])

    class FakeSplits:
        key = "k"

    trials = PipelineConfig().with_overrides({"search.grid": {"resample.strategy": ["none", "smote"]}}).trials()
    result = resample(FakeSplits(), trials)
    assert seen == ["train"]
    assert len(result.report["strategies"]) == 2
