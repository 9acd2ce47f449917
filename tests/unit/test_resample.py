import hashlib
import inspect

import numpy as np
import pytest

import mlpipe.resample as resample_module
from mlpipe.config import IngestConfig, LabelConfig, PipelineConfig, ResampleConfig, SourceConfig, SplitConfig
from mlpipe.errors import MlpipeError
from mlpipe.resample import resample, resample_training_set, training_set_for
from mlpipe.train.data import DistributedWeightedSampler

NAMES = ["a", "b", "c"]


def _data(sizes=(40, 10, 8)):
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(len(sizes)), sizes)
    return rng.integers(0, 255, (len(y), 4, 4, 1)).astype(np.uint8), y


def _index():
    """The `_data()` items as rows 0..n-1 of a pixel cache (see `_pixels`)."""
    return np.arange(len(_data()[1])), _data()[1]


def _pixels(folder):
    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / "pixels.npy", _data()[0])
    return folder / "pixels.npy"


@pytest.mark.parametrize("strategy", ["random_over", "smote", "adasyn"])
def test_oversampling_balances_classes_and_flags_synthetic_items(strategy):
    images, y = _data()
    out = resample_training_set(images, y, ResampleConfig(strategy=strategy), NAMES)
    counts = np.bincount(out["y"])
    assert counts[0] == 40 and counts.min() >= 30  # ADASYN balances approximately, by design
    extra = out["synthetic_images"]
    assert extra.dtype == np.uint8 and extra.shape[1:] == images.shape[1:]
    assert len(out["positions"]) + len(extra) == len(out["y"]) == len(out["synthetic"])
    if strategy == "random_over":  # duplicates are references to real items, no pixels copied
        assert not out["synthetic"].any() and len(extra) == 0
        np.testing.assert_array_equal(out["y"], y[out["positions"]])
    else:  # originals untouched and first, synthetic items after them
        assert out["synthetic"].sum() == len(extra) == len(out["y"]) - len(y) and not out["synthetic"][: len(y)].any()
        np.testing.assert_array_equal(out["positions"], np.arange(len(y)))


def test_undersampling_class_weight_and_weighted_sampler():
    images, y = _data()
    under = resample_training_set(images, y, ResampleConfig(strategy="random_under"), NAMES)
    assert np.bincount(under["y"]).tolist() == [8, 8, 8]
    weighted = resample_training_set(images, y, ResampleConfig(strategy="class_weight"), NAMES)
    assert len(weighted["y"]) == len(y)
    assert weighted["class_weight"][2] > weighted["class_weight"][1] > weighted["class_weight"][0]
    sampler = resample_training_set(images, y, ResampleConfig(strategy="weighted_sampler"), NAMES)
    assert len(sampler["y"]) == len(y) and (sampler["class_weight"] == 1).all()
    per_class = np.bincount(y, weights=sampler["sampler_weight"])
    np.testing.assert_allclose(per_class, per_class[0])  # every class carries the same total weight
    none = resample_training_set(images, y, ResampleConfig(strategy="none"), NAMES)
    assert (none["class_weight"] == 1).all() and len(none["y"]) == len(y) and len(none["sampler_weight"]) == 0


def test_smote_k_neighbors_beyond_the_rarest_class_names_it_and_suggests_random_over():
    images, y = _data((40, 10, 4))
    with pytest.raises(MlpipeError, match="class 'c' has \\(4\\); lower k_neighbors or use resample.strategy: random_over"):
        resample_training_set(images, y, ResampleConfig(strategy="smote", k_neighbors=5), NAMES)


def test_interpolation_is_refused_above_the_size_limit():
    images, y = _data()
    with pytest.raises(MlpipeError, match="exceed resample.max_synthetic_values"):
        resample_training_set(images, y, ResampleConfig(strategy="smote", max_synthetic_values=100), NAMES)


def test_distributed_weighted_sampler_shards_one_weighted_draw():
    y = np.repeat([0, 1], [90, 10])
    weights = 1.0 / np.bincount(y)[y]
    ranks = [DistributedWeightedSampler(weights, 2, r, seed=3) for r in range(2)]
    for s in ranks:
        s.set_epoch(1)
    a, b = (list(s) for s in ranks)
    assert len(a) == len(b) == 50
    drawn = np.array(a + b)
    assert 0.35 < (y[drawn] == 1).mean() < 0.65  # the rare class now drawn about half the time
    ranks[0].set_epoch(2)
    assert list(ranks[0]) != a  # a new draw each epoch


def test_resampling_cannot_see_validation_or_test_data(monkeypatch, state):
    # The function takes the training arrays and nothing else ...
    assert list(inspect.signature(resample_training_set).parameters) == ["images", "y", "config", "names"]
    # ... and the stage reads the training split only.
    seen = []
    monkeypatch.setattr(resample_module, "training_items", lambda splits, parts, drop: seen.append(parts) or (*_index(), 0))
    monkeypatch.setattr(resample_module, "load_labels", lambda splits, parts: seen.append(parts) or _data()[1])
    monkeypatch.setattr(resample_module, "class_names", lambda splits: NAMES)
    pixels = _pixels(state)

    class FakeSplits:
        key = "k"
        report = {"mode": "holdout", "folds": None}

        def file(self, name):
            assert name == "pixels"
            return pixels

    trials = PipelineConfig().with_overrides({"search.grid": {"resample.strategy": ["none", "smote"]}}).trials()
    result = resample(FakeSplits(), trials)
    assert seen == [["train.npz"]] * 3  # class counts before, then each config's items
    FakeSplits.key = "k2"
    FakeSplits.report = {"mode": "kfold", "folds": [10, 10, 10]}  # each fold's training part: the other folds
    seen.clear()
    resample(FakeSplits(), trials)
    folds = [["fold-1.npz", "fold-2.npz"], ["fold-0.npz", "fold-2.npz"], ["fold-0.npz", "fold-1.npz"]]
    assert seen == [folds[0]] + folds * 2  # only ever training parts
    assert len(result.report["strategies"]) == 2
    assert result.file("class_counts.png").stat().st_size > 1000


def test_each_resample_config_is_cached_on_its_own(monkeypatch, state):
    monkeypatch.setattr(resample_module, "training_items", lambda splits, parts, drop: (*_index(), 0))
    monkeypatch.setattr(resample_module, "load_labels", lambda splits, parts: _data()[1])
    monkeypatch.setattr(resample_module, "class_names", lambda splits: NAMES)
    pixels = _pixels(state)

    class FakeSplits:
        key, report = "k", {"mode": "holdout", "folds": None}

        def file(self, name):
            return pixels

    def grid(*strategies):
        return PipelineConfig().with_overrides({"search.grid": {"resample.strategy": list(strategies)}}).trials()

    first = resample(FakeSplits(), grid("none", "smote"))
    second = resample(FakeSplits(), grid("none", "smote", "random_over"))  # one strategy added to the grid
    assert first.report["reused"] == [] and len(second.report["reused"]) == 2
    smote = grid("smote")[0]
    assert training_set_for(first, smote) == training_set_for(second, smote)
    FakeSplits.key = "changed split"
    assert resample(FakeSplits(), grid("none", "smote")).report["reused"] == []


def test_validation_and_test_files_are_byte_identical_after_every_strategy(state, sample_root):
    from mlpipe.anonymize import anonymize
    from mlpipe.config import AnonymizeConfig
    from mlpipe.ingest import ingest
    from mlpipe.label import label
    from mlpipe.split import split

    source = SourceConfig(uri=str(sample_root))
    splits = split(label(anonymize(ingest(source, IngestConfig()), AnonymizeConfig(), source), LabelConfig()), SplitConfig())

    def digest(name):
        return hashlib.sha256(splits.file(f"{name}.npz").read_bytes()).hexdigest()

    before = {name: digest(name) for name in ("val", "test")}
    # (ADASYN refuses the well-separated digits: no minority item has a majority neighbour.)
    strategies = ["none", "random_over", "random_under", "smote", "class_weight", "weighted_sampler"]
    trials = PipelineConfig().with_overrides({"search.grid": {"resample.strategy": strategies}}).trials()
    result = resample(splits, trials)
    assert len(result.report["strategies"]) == len(strategies)
    assert {name: digest(name) for name in ("val", "test")} == before
    for entry in result.report["strategies"].values():  # synthetic items exist only in training sets
        assert entry["synthetic"] == 0 or entry["config"]["strategy"] in ("smote", "adasyn")


def test_resampling_improves_minority_class_recall_on_the_skewed_sample(state, sample_root):
    """Fixed seeds, 6 epochs, one process: the three rarest classes' validation recall with no
    resampling vs random_over and smote (measured with the 16 px small_cnn of 2026-12-01: none
    0.847, random_over 0.944, smote 0.944; with the smaller net before it: 0.17, 0.82, 0.87)."""
    from sklearn.metrics import recall_score

    from mlpipe.anonymize import anonymize
    from mlpipe.config import AnonymizeConfig, IngestConfig, LabelConfig, SourceConfig, SplitConfig
    from mlpipe.evaluate import predict_proba
    from mlpipe.ingest import ingest
    from mlpipe.label import label
    from mlpipe.split import load_split, split
    from mlpipe.train.launch import train
    from mlpipe.train.model import load_checkpoint

    source = SourceConfig(uri=str(sample_root))
    splits = split(label(anonymize(ingest(source, IngestConfig()), AnonymizeConfig(), source), LabelConfig()), SplitConfig())
    rarest = np.argsort(np.bincount(load_split(splits, "train")[1]))[:3]
    grid = {"resample.strategy": ["none", "random_over", "smote"]}
    trials = PipelineConfig().with_overrides({"train.epochs": 6, "train.nproc": 1, "search.grid": grid}).trials()
    trained = train(splits, resample(splits, trials), trials, {}, None)
    images, y = load_split(splits, "val")
    recall = {}
    for entry in trained.report["trials"]:
        pred = predict_proba(load_checkpoint(trained.file(entry["checkpoint"])), images).argmax(axis=1)
        recall[entry["params"]["resample.strategy"]] = recall_score(y, pred, labels=rarest, average="macro")
    assert max(recall["random_over"], recall["smote"]) > recall["none"] + 0.05, recall
