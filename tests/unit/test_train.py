import json

import numpy as np
import pytest
import torch

from mlpipe.config import TrainConfig
from mlpipe.errors import MlpipeError
from mlpipe.train import worker
from mlpipe.train.launch import launch, torchrun_command
from mlpipe.train.model import load_checkpoint
from mlpipe.train.spec import TrialResult, TrialSpec, WorkerSpec


def _easy_arrays(n, seed):
    """Class k = a bright row band at rows 2k..2k+1; learnable in a few epochs."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 3
    images = rng.integers(0, 40, (n, 8, 8, 1)).astype(np.uint8)
    for i, k in enumerate(y):
        images[i, 2 * k : 2 * k + 2] = 250
    return images, y


@pytest.fixture
def spec_factory(tmp_path):
    def make(trains: list[TrainConfig], train_set: str | None = None) -> WorkerSpec:
        images, y = _easy_arrays(120, 0)
        val_images, val_y = _easy_arrays(30, 1)
        pixels = np.concatenate([images, val_images])
        np.save(tmp_path / "pixels.npy", pixels)
        np.savez(tmp_path / "val.npz", pixel_index=np.arange(120, 150), y=val_y)
        np.savez(tmp_path / "train.npz", images=images, y=y, synthetic=np.zeros(120, bool),
                 class_weight=np.ones(3, np.float32))  # fmt: skip
        trials = []
        for i, cfg in enumerate(trains):
            (tmp_path / f"t{i}").mkdir()
            trials.append(TrialSpec(name=f"trial-{i:03d}", train=cfg, train_set=train_set or str(tmp_path / "train.npz"),
                                    out_dir=str(tmp_path / f"t{i}")))  # fmt: skip
        return WorkerSpec(pixels=str(tmp_path / "pixels.npy"), val_set=str(tmp_path / "val.npz"), num_classes=3, trials=trials)

    return make


def _write(spec: WorkerSpec, tmp_path):
    path = tmp_path / "spec.json"
    path.write_text(spec.model_dump_json())
    return path


FAST = {"epochs": 6, "batch_size": 16, "lr": 0.01, "device": "cpu", "augment": None}


def test_worker_trains_and_writes_atomic_checkpoint(spec_factory, tmp_path):
    spec = spec_factory([TrainConfig(**FAST)])
    worker.main(["--spec", str(_write(spec, tmp_path))])
    result = TrialResult.model_validate_json((tmp_path / "t0" / "result.json").read_text())
    assert result.val_metrics["val_macro_f1"] > 0.9
    assert result.world_size == 1 and result.amp == "off"
    assert not list((tmp_path / "t0").glob("*.tmp"))
    model = load_checkpoint(result.checkpoint)  # weights_only=True inside
    images, y = _easy_arrays(30, 1)
    proba = model(torch.from_numpy(images).permute(0, 3, 1, 2).float())
    assert (proba.argmax(1).numpy() == y).mean() > 0.9


def test_early_stopping_restores_best_epoch(spec_factory, tmp_path):
    cfg = TrainConfig(**{**FAST, "epochs": 30, "lr": 1e-9, "patience": 2})  # nothing improves after epoch 0
    spec = spec_factory([cfg])
    worker.main(["--spec", str(_write(spec, tmp_path))])
    result = json.loads((tmp_path / "t0" / "result.json").read_text())
    assert result["stopped_early"] and result["epochs_run"] <= 1 + 2 + 1
    ckpt = torch.load(result["checkpoint"], weights_only=True)
    assert ckpt["epoch"] == result["best_epoch"]


def test_augmentation_policy_is_albumentations_dict_format(spec_factory, tmp_path):
    spec = spec_factory([TrainConfig(**{**FAST, "augment": TrainConfig().augment, "epochs": 2})])
    worker.main(["--spec", str(_write(spec, tmp_path))])
    assert (tmp_path / "t0" / "result.json").exists()


def test_resolve_amp():
    cpu = torch.device("cpu")
    assert worker.resolve_amp("auto", cpu) is None
    assert worker.resolve_amp("off", cpu) is None
    assert worker.resolve_amp("bf16", cpu) is torch.bfloat16


def test_torchrun_command_is_standalone_with_restarts(tmp_path):
    cmd = torchrun_command(tmp_path / "s.json", 2, 3)
    assert cmd[1:3] == ["-m", "torch.distributed.run"]
    assert {"--standalone", "--nproc-per-node=2", "--max-restarts=3"} <= set(cmd)


@pytest.mark.slow
def test_two_process_ddp_on_gloo(spec_factory, tmp_path):
    spec = spec_factory([TrainConfig(**FAST, nproc=2), TrainConfig(**{**FAST, "lr": 0.02}, nproc=2)])
    launch(_write(spec, tmp_path), nproc=2, max_restarts=0, log_path=tmp_path / "log", cpu=True)
    for i in range(2):
        result = TrialResult.model_validate_json((tmp_path / f"t{i}" / "result.json").read_text())
        assert result.world_size == 2
        assert result.val_metrics["val_macro_f1"] > 0.9
    assert "trial-001" in (tmp_path / "log").read_text()


@pytest.mark.slow
def test_failed_worker_is_a_one_line_error(spec_factory, tmp_path):
    spec = spec_factory([TrainConfig(**FAST)], train_set=str(tmp_path / "missing.npz"))
    with pytest.raises(MlpipeError, match=r"training failed \(torchrun exit code 1\)") as err:
        launch(_write(spec, tmp_path), nproc=1, max_restarts=0, log_path=tmp_path / "log", cpu=True)
    assert "\n" not in str(err.value)


def test_training_is_deterministic_on_cpu(spec_factory, tmp_path):
    cfg = TrainConfig(**{**FAST, "augment": TrainConfig().augment, "epochs": 3})
    spec = spec_factory([cfg, cfg])  # the same trial twice, in one process
    worker.main(["--spec", str(_write(spec, tmp_path))])
    first, second = (json.loads((tmp_path / f"t{i}" / "result.json").read_text())["history"] for i in range(2))
    assert first == second


def test_worker_uses_the_weighted_sampler_when_resample_asks(spec_factory, tmp_path, monkeypatch):
    spec = spec_factory([TrainConfig(**{**FAST, "epochs": 2})])
    data = dict(np.load(spec.trials[0].train_set))
    data["sampler_weight"] = np.where(data["y"] == 0, 1.0, 5.0)
    np.savez(spec.trials[0].train_set, **data)
    built = []
    original = worker.DistributedWeightedSampler
    monkeypatch.setattr(worker, "DistributedWeightedSampler", lambda *a, **k: built.append(a) or original(*a, **k))
    worker.main(["--spec", str(_write(spec, tmp_path))])
    assert len(built) == 1 and list(built[0][0]) == list(data["sampler_weight"])
    assert json.loads((tmp_path / "t0" / "result.json").read_text())["epochs_run"] == 2
