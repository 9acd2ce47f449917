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


def worker_data(folder, n: int) -> tuple[str, str, str]:
    """pixels.npy, train.npz, val.npz of the easy 3-class problem: n training items, 60 validation items."""
    images, y = _easy_arrays(n, 0)
    val_images, val_y = _easy_arrays(60, 1)
    np.save(folder / "pixels.npy", np.concatenate([images, val_images]))
    np.savez(folder / "val.npz", pixel_index=np.arange(n, n + 60), y=val_y)
    np.savez(folder / "train.npz", pixel_index=np.arange(n), synthetic_images=np.zeros((0, 8, 8, 1), np.uint8), y=y,
             synthetic=np.zeros(n, bool), class_weight=np.ones(3, np.float32))  # fmt: skip
    return str(folder / "pixels.npy"), str(folder / "train.npz"), str(folder / "val.npz")


def _without_timing(history):
    return [{k: v for k, v in epoch.items() if k != "img_per_s"} for epoch in history]


@pytest.fixture
def spec_factory(tmp_path):
    def make(trains: list[TrainConfig], train_set: str | None = None) -> WorkerSpec:
        images, y = _easy_arrays(120, 0)
        val_images, val_y = _easy_arrays(30, 1)
        pixels = np.concatenate([images, val_images])
        np.save(tmp_path / "pixels.npy", pixels)
        np.savez(tmp_path / "val.npz", pixel_index=np.arange(120, 150), y=val_y)
        np.savez(tmp_path / "train.npz", pixel_index=np.arange(120), synthetic_images=np.zeros((0, 8, 8, 1), np.uint8),
                 y=y, synthetic=np.zeros(120, bool), class_weight=np.ones(3, np.float32))  # fmt: skip
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
    # Macro-F1 never improves at this rate; only batch-norm statistics move the validation loss a little.
    cfg = TrainConfig(**{**FAST, "epochs": 30, "lr": 1e-9, "patience": 2})
    spec = spec_factory([cfg])
    worker.main(["--spec", str(_write(spec, tmp_path))])
    result = json.loads((tmp_path / "t0" / "result.json").read_text())
    assert result["stopped_early"] and result["epochs_run"] == result["best_epoch"] + 2 + 1 < 30
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
    with pytest.raises(MlpipeError, match=r"training failed: FileNotFoundError: .*missing\.npz.* \(trial-000, rank 0; full log: ") as err:
        launch(_write(spec, tmp_path), nproc=1, max_restarts=0, log_path=tmp_path / "log", cpu=True)
    assert "\n" not in str(err.value)


def test_training_is_deterministic_on_cpu(spec_factory, tmp_path):
    cfg = TrainConfig(**{**FAST, "augment": TrainConfig().augment, "epochs": 3})
    spec = spec_factory([cfg, cfg])  # the same trial twice, in one process
    worker.main(["--spec", str(_write(spec, tmp_path))])
    first, second = (_without_timing(json.loads((tmp_path / f"t{i}" / "result.json").read_text())["history"])
                     for i in range(2))  # fmt: skip
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


# --- models -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["small_cnn", "resnet18", "convnext_tiny", "efficientnet_b0", "mobilenetv3_small_050"])
def test_architectures_take_grayscale_tiny_images(name):
    """The former torchvision names and any other timm name: one channel, 4 classes, 32 px."""
    from mlpipe.train.model import build_model

    model = build_model(name, in_channels=1, num_classes=4, image_size=32).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 1, 32, 32)).shape == (2, 4)


def _sees_whole_image(model: torch.nn.Module, features, size: int, channels: int = 1) -> bool:
    """Does the centre unit of the last feature map depend on every corner pixel? Gradients of
    that unit with respect to the input, in eval mode (batch statistics off). BatchNorm scales are
    set to 1 first: timm zero-initializes each residual branch's last one (zero_init_last), which
    at initialization hides every path but the shortcuts; the architecture's field is what counts."""
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            torch.nn.init.ones_(module.weight)
    image = torch.randn(1, channels, size, size, requires_grad=True)
    out = features(image)
    out[0, :, out.shape[2] // 2, out.shape[3] // 2].sum().backward()
    grad = image.grad[0].abs().sum(0)
    corners = [grad[0, 0], grad[0, -1], grad[-1, 0], grad[-1, -1]]
    return all(c > 0 for c in corners)


@pytest.mark.parametrize("size", [8, 16, 28, 32, 64])
def test_small_cnn_receptive_field_covers_the_image(size):
    from mlpipe.train.model import build_model

    model = build_model("small_cnn", 1, 10, size).eval()
    assert _sees_whole_image(model, model.features, size)


def test_resnet_on_64_px_keeps_a_map_that_sees_the_whole_image():
    """timm's resnet18 at 64 px: the small-image stem keeps a 4 px last map (2 px as timm builds
    it), and its centre unit still sees every corner."""
    from mlpipe.train.model import build_model

    model = build_model("resnet18", 1, 10, 64).eval()
    assert model.forward_features(torch.zeros(1, 1, 64, 64)).shape[-1] == 4
    assert _sees_whole_image(model, model.forward_features, 64)


def test_pretrained_weights_from_local_timm_and_torchvision_files(tmp_path):
    import timm
    import torchvision

    from mlpipe.train.model import build_model, freeze_backbone

    timm_donor = timm.create_model("resnet18", num_classes=1000)  # e.g. a timm file saved on a networked machine
    torch.save(timm_donor.state_dict(), tmp_path / "resnet18_timm.pth")
    model = build_model("resnet18", in_channels=3, num_classes=5, image_size=32, pretrained=str(tmp_path / "resnet18_timm.pth"))
    assert torch.equal(model.layer3[0].conv1.weight, timm_donor.layer3[0].conv1.weight)
    assert torch.equal(model.conv1.weight, timm_donor.conv1.weight)
    assert model.fc.weight.shape == (5, 512)  # 1000-class head dropped, a fresh 5-class one

    tv_donor = torchvision.models.resnet18(num_classes=1000)  # torchvision's ImageNet file, saved locally
    torch.save(tv_donor.state_dict(), tmp_path / "resnet18-f37072fd.pth")
    gray = build_model("resnet18", 1, 5, 32, pretrained=str(tmp_path / "resnet18-f37072fd.pth"))
    assert torch.equal(gray.layer4[1].conv2.weight, tv_donor.layer4[1].conv2.weight)
    # one channel: timm sums the RGB filters (adapt_input_conv), so a gray image gets the same response
    assert torch.allclose(gray.conv1.weight[:, 0], tv_donor.conv1.weight.sum(dim=1))

    trainable = freeze_backbone(gray)
    assert trainable == 512 * 5 + 5
    assert [n for n, p in gray.named_parameters() if p.requires_grad] == ["fc.weight", "fc.bias"]


def test_pretrained_tag_without_network_is_one_line(monkeypatch):
    import huggingface_hub.constants

    from mlpipe.train.model import build_model

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads HF_HUB_OFFLINE once, when imported (here, long before this test): the variable alone
    # left the hub trying the network, which in CI meant ~45 s of connection retries before the same error.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(MlpipeError, match=r"train.pretrained 'a1_in1k' for resnet18: .*offline: give a local weights file") as err:
        build_model("resnet18", 1, 3, 32, pretrained="a1_in1k")
    assert "\n" not in str(err.value)


def test_unknown_architecture_is_refused_at_validation():
    with pytest.raises(Exception, match="unknown architecture 'resnet9000'"):
        TrainConfig(model="resnet9000")


def test_pretrained_file_holding_code_is_refused(tmp_path):
    import pickle

    from mlpipe.train.model import build_model

    class Evil:
        def __reduce__(self):
            return (print, ("executed",))

    (tmp_path / "evil.pth").write_bytes(pickle.dumps({"x": Evil()}, protocol=2))
    with pytest.raises(pickle.UnpicklingError):
        build_model("small_cnn", 3, 2, 16, pretrained=str(tmp_path / "evil.pth"))
    with pytest.raises(MlpipeError, match=r"^train.pretrained .* weights_only=True blocked loading"):
        build_model("resnet18", 3, 2, 32, pretrained=str(tmp_path / "evil.pth"))


def test_budget_in_steps_becomes_epochs_and_auto_fields_resolve():
    from mlpipe.train.spec import resolve_budget

    cfg = resolve_budget(TrainConfig(steps=1000, batch_size=64), train_items=770, world_size=1)
    assert cfg.epochs == 77 and cfg.patience == 20 and cfg.warmup_epochs == pytest.approx(3.85)  # 13 steps an epoch
    assert cfg.backbone_lr_scale == 1.0
    big = resolve_budget(TrainConfig(steps=1000, batch_size=64), train_items=64_000, world_size=2)
    assert big.epochs == 10 and big.patience == 5  # 500 steps an epoch on each of 2 ranks: the 10-epoch floor
    assert resolve_budget(TrainConfig(steps=1000, min_epochs=1), train_items=64_000, world_size=2).epochs == 2
    tiny = resolve_budget(TrainConfig(steps=2000, batch_size=64), train_items=90)
    assert tiny.epochs == 200 and tiny.patience == 50  # 2 steps an epoch: capped at train.max_epochs
    fixed = resolve_budget(TrainConfig(epochs=3, pretrained="a1_in1k", model="resnet18"), train_items=10)
    assert fixed.epochs == 3 and fixed.backbone_lr_scale == 0.1
    assert resolve_budget(fixed, train_items=99_999) == fixed  # resolving twice changes nothing


def test_frozen_backbone_epoch_trains_only_the_head():
    from mlpipe.train.ddp import DistContext
    from mlpipe.train.model import build_model, head_parameters

    torch.manual_seed(0)
    model = build_model("small_cnn", 1, 3, 8)
    backbone, head = head_parameters(model)
    before = [p.detach().clone() for p in (*backbone, *head)]
    images, y = _easy_arrays(32, 0)
    loader = [(torch.from_numpy(images).permute(0, 3, 1, 2), torch.from_numpy(y))]
    optimizer = worker._optimizer(TrainConfig(), [{"params": head, "lr": 1e-2}, {"params": backbone, "lr": 1e-3}])
    scheduler = torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0)
    norm = (torch.zeros(1, 1, 1, 1), torch.ones(1, 1, 1, 1), torch.contiguous_format)
    ctx = DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    worker.train_one_epoch(model, loader, optimizer, scheduler, torch.nn.CrossEntropyLoss(), scaler, None, norm, ctx,
                           frozen=backbone)  # fmt: skip
    after = [p.detach() for p in (*backbone, *head)]
    conv = [torch.equal(a, b) for a, b in zip(before[: len(backbone)], after[: len(backbone)], strict=True)]
    assert all(conv), "a frozen backbone parameter changed"
    assert not torch.equal(before[-1], after[-1]), "the head did not learn"


# --- optimization -------------------------------------------------------------------------------


def _lrs(cfg: TrainConfig, steps_per_epoch: int = 10) -> list[float]:
    params = [torch.nn.Parameter(torch.zeros(1))]
    optimizer = torch.optim.SGD(params, lr=cfg.lr)
    scheduler = worker.build_scheduler(optimizer, cfg, steps_per_epoch)
    out = []
    for _ in range(cfg.epochs * steps_per_epoch):
        out.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return out


def test_schedules_with_warmup():
    cosine = _lrs(TrainConfig(lr=1.0, epochs=10, warmup_epochs=2))
    assert cosine[0] == pytest.approx(0.01) and max(cosine) == pytest.approx(1.0, abs=0.01)
    assert cosine.index(max(cosine)) == 20 and cosine[-1] < 0.01  # linear ramp over 2 epochs, then cosine to ~0
    step = _lrs(TrainConfig(lr=1.0, epochs=10, scheduler="step", step_epochs=4, step_gamma=0.5, warmup_epochs=0))
    assert step[0] == step[39] == 1.0 and step[40] == 0.5 and step[80] == 0.25
    onecycle = _lrs(TrainConfig(lr=1.0, epochs=10, scheduler="onecycle", warmup_epochs=3))
    assert onecycle.index(max(onecycle)) == 29 and onecycle[0] < 0.1 and onecycle[-1] < 1e-3
    constant = _lrs(TrainConfig(lr=0.5, epochs=2, scheduler="constant", warmup_epochs=0))
    assert set(constant) == {0.5}


def test_focal_loss_is_cross_entropy_at_gamma_zero_and_down_weights_easy_items():
    logits = torch.tensor([[4.0, 0.0, 0.0], [0.2, 0.1, 0.0], [0.0, 3.0, 0.0]])
    targets = torch.tensor([0, 0, 1])
    weight = torch.ones(3)
    ce = torch.nn.functional.cross_entropy(logits, targets)
    assert worker.focal_loss(weight, 0.0, 0.0)(logits, targets) == pytest.approx(ce.item())
    assert worker.focal_loss(weight, 2.0, 0.0)(logits, targets) < ce


def test_history_holds_the_per_epoch_metrics(spec_factory, tmp_path):
    cfg = TrainConfig(**{**FAST, "epochs": 2, "grad_clip": 1.0, "loss": "focal", "warmup_epochs": 0.5})
    spec = spec_factory([cfg])
    worker.main(["--spec", str(_write(spec, tmp_path))])
    history = json.loads((tmp_path / "t0" / "result.json").read_text())["history"]
    assert {"train_loss", "train_accuracy", "val_loss", "val_accuracy", "val_macro_f1", "lr", "img_per_s"} <= set(history[0])
    assert history[0]["img_per_s"] > 0 and history[1]["lr"] < cfg.lr


# --- checkpoints, resume and failure ------------------------------------------------------------


def test_resume_from_a_checkpoint_reproduces_the_uninterrupted_run(spec_factory, tmp_path, monkeypatch):
    cfg = TrainConfig(**{**FAST, "epochs": 5, "augment": TrainConfig().augment, "patience": 10})
    spec = spec_factory([cfg, cfg])
    spec.trials[1].name = "trial-001"
    worker.main(["--spec", str(_write(spec, tmp_path))])
    uninterrupted = json.loads((tmp_path / "t0" / "result.json").read_text())
    (tmp_path / "t1" / "result.json").unlink()
    (tmp_path / "t1" / "last.pt").unlink()
    original = worker.validate
    calls = []

    def crash_in_epoch_two(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("simulated crash")
        return original(*args, **kwargs)

    monkeypatch.setattr(worker, "validate", crash_in_epoch_two)
    with pytest.raises(RuntimeError, match="simulated crash"):
        worker.main(["--spec", str(_write(spec, tmp_path))])
    assert torch.load(tmp_path / "t1" / "last.pt", weights_only=True)["epoch"] == 1
    monkeypatch.setattr(worker, "validate", original)
    worker.main(["--spec", str(_write(spec, tmp_path))])
    resumed = json.loads((tmp_path / "t1" / "result.json").read_text())
    assert _without_timing(resumed["history"]) == _without_timing(uninterrupted["history"])
    first = torch.load(tmp_path / "t0" / "checkpoint.pt", weights_only=True)["model_state"]
    second = torch.load(tmp_path / "t1" / "checkpoint.pt", weights_only=True)["model_state"]
    assert all(torch.equal(first[k], second[k]) for k in first)
    state = torch.load(tmp_path / "t1" / "last.pt", weights_only=True)
    assert {"model_state", "optimizer", "scheduler", "scaler", "rng", "epoch"} <= set(state)


def _worker_pids(marker: str) -> list[int]:
    """Live processes whose command line names `marker` (the spec path)."""
    import os

    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if marker.encode() in f.read():
                        pids.append(int(entry))
            except OSError:
                continue
    return pids


def _rank_pid(marker: str, rank: int) -> int | None:
    for pid in _worker_pids(marker):
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                if f"\0RANK={rank}\0".encode() in b"\0" + f.read():
                    return pid
        except OSError:
            continue
    return None


def kill_rank_when_logged(spec_path, log_path, rank: int, line: str, killed: list[int], timeout_s: float = 300):
    """A started thread that SIGKILLs `rank` of the launch of `spec_path` once `line` is in its log
    (the pid goes into `killed`)."""
    import os
    import signal
    import threading
    import time

    def kill() -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if log_path.exists() and line in log_path.read_text():
                pid = _rank_pid(str(spec_path), rank)
                if pid:
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
                    return
            time.sleep(0.05)

    thread = threading.Thread(target=kill)
    thread.start()
    return thread


@pytest.mark.slow
def test_no_worker_outlives_a_failed_run(spec_factory, tmp_path):
    spec = spec_factory([TrainConfig(**FAST)], train_set=str(tmp_path / "missing.npz"))
    path = _write(spec, tmp_path)
    with pytest.raises(MlpipeError):
        launch(path, nproc=2, max_restarts=0, log_path=tmp_path / "log", cpu=True)
    assert _worker_pids(str(path)) == []


@pytest.mark.slow
def test_no_worker_outlives_a_cancelled_run(spec_factory, tmp_path):
    """SIGTERM to the launching process (what cancelling a flow run sends): the whole torchrun
    process group is gone within 30 s."""
    import signal
    import subprocess
    import sys
    import time

    spec = spec_factory([TrainConfig(**{**FAST, "epochs": 1000, "patience": 1000})])
    path = _write(spec, tmp_path)
    code = ("from pathlib import Path; from mlpipe.train.launch import launch; "
            f"launch(Path({str(path)!r}), 2, 0, Path({str(tmp_path / 'log')!r}), cpu=True)")  # fmt: skip
    parent = subprocess.Popen([sys.executable, "-c", code])
    deadline = time.monotonic() + 120
    while len(_worker_pids(str(path))) < 3 and time.monotonic() < deadline:  # torchrun + 2 workers
        time.sleep(0.2)
    assert len(_worker_pids(str(path))) >= 3, "workers never started"
    time.sleep(3)
    parent.send_signal(signal.SIGTERM)
    stopped = time.monotonic()
    parent.wait(timeout=60)
    while _worker_pids(str(path)) and time.monotonic() - stopped < 30:
        time.sleep(0.2)
    assert _worker_pids(str(path)) == [], "workers outlived the cancelled run"


def test_augmentation_does_not_depend_on_the_number_of_loader_workers(spec_factory, tmp_path):
    """Each item's augmentation is seeded from (seed, epoch, index), not from a worker's stream."""
    base = {**FAST, "epochs": 2, "augment": TrainConfig().augment}
    spec = spec_factory([TrainConfig(**base), TrainConfig(**{**base, "num_workers": 2})])
    worker.main(["--spec", str(_write(spec, tmp_path))])
    first, second = (_without_timing(json.loads((tmp_path / f"t{i}" / "result.json").read_text())["history"])
                     for i in range(2))  # fmt: skip
    assert first == second


def test_weight_average_is_what_is_validated_and_shipped(spec_factory, tmp_path, monkeypatch):
    """train.ema_decay: the moving average of the weights, not the last weights, is validated each epoch,
    kept as the best state and written as the checkpoint; the resume file carries it."""
    seen = []
    original = worker.validate

    def spy(model, *args, **kwargs):
        seen.append({k: v.clone() for k, v in model.state_dict().items()})
        return original(model, *args, **kwargs)

    monkeypatch.setattr(worker, "validate", spy)
    spec = spec_factory([TrainConfig(**{**FAST, "epochs": 3, "patience": 10, "ema_decay": 0.9})])
    worker.main(["--spec", str(_write(spec, tmp_path))])
    result = json.loads((tmp_path / "t0" / "result.json").read_text())
    last = torch.load(tmp_path / "t0" / "last.pt", weights_only=True)
    shipped = torch.load(result["checkpoint"], weights_only=True)["model_state"]
    assert len(seen) == 3
    assert all(torch.equal(seen[-1][k], last["ema_state"][k]) for k in seen[-1])
    assert not all(torch.equal(last["ema_state"][k], last["model_state"][k]) for k in last["model_state"])
    assert all(torch.equal(seen[result["best_epoch"]][k], shipped[k]) for k in shipped)


def test_a_saturated_validation_split_keeps_the_epoch_with_the_lower_loss(spec_factory, tmp_path):
    """The easy problem reaches validation macro-F1 1.0 in an early epoch and its loss keeps falling:
    the checkpoint is the last epoch at 1.0 whose loss fell by more than the min delta, not the first at 1.0."""
    spec = spec_factory([TrainConfig(**{**FAST, "epochs": 8, "patience": 20})])
    worker.main(["--spec", str(_write(spec, tmp_path))])
    result = json.loads((tmp_path / "t0" / "result.json").read_text())
    history = result["history"]
    top = max(h["val_macro_f1"] for h in history)
    first_at_top = next(i for i, h in enumerate(history) if h["val_macro_f1"] == top)
    assert top == 1.0 and first_at_top < len(history) - 1
    expected = first_at_top
    for h in history[first_at_top + 1 :]:
        if h["val_macro_f1"] == top and h["val_loss"] < history[expected]["val_loss"] - worker.LOSS_MIN_DELTA:
            expected = int(h["epoch"])
    assert result["best_epoch"] == expected > first_at_top
    assert torch.load(result["checkpoint"], weights_only=True)["epoch"] == expected
