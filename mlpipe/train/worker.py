"""The training worker: runs the trials of a `WorkerSpec` under torchrun, one after another.

It imports neither Prefect nor (unless a trial names an MLflow run) MLflow, so it runs and
benchmarks on any machine with torch, albumentations and scikit-learn.

One launch serves all trials: process start-up and rendezvous cost seconds, and the process
group can be reused. Launch commands (the train task builds the first):

    # one machine, N CPU processes or one process per GPU (standalone: a free port per job)
    python -m torch.distributed.run --standalone --nproc-per-node N --max-restarts 2 \
        -m mlpipe.train.worker --spec spec.json
    # one GPU
    python -m torch.distributed.run --standalone --nproc-per-node 1 -m mlpipe.train.worker --spec spec.json
    # several machines (train.nnodes, train.rdzv_endpoint): the node that runs the pipeline hosts
    # the rendezvous and announces the launch in $MLPIPE_HOME/launches/ (storage every node mounts
    # at the same path); `mlpipe join` on each other node runs the same command with is_host=0
    python -m torch.distributed.run --nnodes 2 --rdzv-backend c10d --rdzv-endpoint HOST:29400 \
        --rdzv-id launch-0-RANDOM --rdzv-conf join_timeout=900,is_host=1 --nproc-per-node 8 \
        --max-restarts 2 -m mlpipe.train.worker --spec spec.json

Failures: if one rank dies, torchrun stops the others and (with --max-restarts) starts them
all again; the worker then skips finished trials (their result.json) and resumes the current
one from its `last.pt` (model, weight average, optimizer, scheduler, scaler, RNG, epoch,
history), continuing exactly, and logs to MLflow only the epochs MLflow has not seen. Checkpoints are written
atomically (temporary file, fsync, rename); the `last.pt` replaced is kept as `last.prev.pt`,
and a `last.pt` that does not load (truncated, corrupt) is moved aside with a warning and the
trial resumes from `last.prev.pt`, or starts over when neither loads. A hung collective fails after
`train.nccl_timeout_s`.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import math
import os
import random
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
from timm.utils import ModelEmaV3
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler

from mlpipe.metrics import classification_metrics
from mlpipe.train.data import (
    CachedImages,
    DistributedWeightedSampler,
    EpochKeyedSampler,
    ImageArrayDataset,
    build_augmentation,
)
from mlpipe.train.ddp import (
    DistContext,
    all_gather_objects,
    all_reduce_sum,
    broadcast_from_main,
    cleanup,
    init_distributed,
)
from mlpipe.train.model import build_model, freeze_backbone, head_parameters
from mlpipe.train.spec import TrialResult, TrialSpec, WorkerSpec, is_done, resolve_budget


def resolve_amp(mode: str, device: torch.device) -> torch.dtype | None:
    """bf16 where the GPU has it, fp16 (with GradScaler) where it does not, nothing on CPU by default."""
    if mode == "off" or (mode == "auto" and device.type != "cuda"):
        return None
    if mode == "fp16" or (mode == "auto" and not torch.cuda.is_bf16_supported()):
        return torch.float16
    return torch.bfloat16


def normalize_on_device(batch: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, fmt) -> torch.Tensor:
    # uint8 crosses the bus (4x less than float32); scaling happens on the device.
    return ((batch.float() / 255.0 - mean) / std).contiguous(memory_format=fmt)


def train_one_epoch(model, loader, optimizer, scheduler, loss_fn, scaler, amp_dtype, norm, ctx: DistContext,
                    grad_clip: float | None = None, frozen: list[nn.Parameter] | None = None,
                    ema: ModelEmaV3 | None = None, raw_model: nn.Module | None = None) -> dict[str, float]:  # fmt: skip
    """One pass over this rank's shard; loss and accuracy all-reduced over ranks, img/s global.
    `frozen` parameters keep their values: their gradients are dropped before the step (the
    optimizer skips a parameter without a gradient), which works under DDP, whose gradient
    all-reduce needs every parameter that took part in the forward pass. `ema` follows
    `raw_model` (the module under any DDP or compile wrapper) after every step; the scheduler's
    step count is the EMA's, so a resumed epoch warms the decay up as an uninterrupted one."""
    model.train()
    # Summed on the device: a per-step .item() would stall the GPU on every batch.
    total = torch.zeros((), dtype=torch.float64, device=ctx.device)
    correct = torch.zeros((), dtype=torch.float64, device=ctx.device)
    count = 0
    started = time.perf_counter()
    for images, targets in loader:
        images = normalize_on_device(images.to(ctx.device, non_blocking=True), *norm)
        targets = targets.to(ctx.device, non_blocking=True)
        with torch.autocast(ctx.device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            logits = model(images)
            loss = loss_fn(logits, targets)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        for p in frozen or ():
            p.grad = None
        if grad_clip is not None:
            scaler.unscale_(optimizer)  # clip the true gradients, not the fp16-scaled ones
            nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        if ema is not None:
            ema.update(raw_model, step=scheduler.last_epoch)
        total += loss.detach().double() * len(targets)
        correct += (logits.detach().argmax(dim=1) == targets).sum().double()
        count += len(targets)
    total, correct, count = all_reduce_sum([total.item(), correct.item(), count], ctx.device)
    seconds = time.perf_counter() - started
    return {"train_loss": total / max(count, 1), "train_accuracy": correct / max(count, 1), "img_per_s": count / seconds}


def focal_loss(weight: torch.Tensor, gamma: float, label_smoothing: float):
    """Softmax focal loss (Lin et al. 2017): cross-entropy scaled by (1 - p_true)^gamma, so easy,
    well-classified items count less; class weights and label smoothing apply as in CrossEntropyLoss."""

    def loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        ce = nn.functional.cross_entropy(logits.float(), targets, reduction="none", label_smoothing=label_smoothing)
        p_true = torch.softmax(logits.float(), dim=1).gather(1, targets[:, None]).squeeze(1)
        return ((1 - p_true) ** gamma * ce * weight[targets]).sum() / weight[targets].sum()

    return loss


def build_scheduler(optimizer, cfg, steps_per_epoch: int):
    """torch's schedulers, stepped per batch: a linear warmup, then cosine, step or constant;
    one-cycle uses the warmup share as its rising phase."""
    total = max(1, cfg.epochs * steps_per_epoch)
    warmup = min(total - 1, int(round(cfg.warmup_epochs * steps_per_epoch)))
    sched = torch.optim.lr_scheduler
    if cfg.scheduler == "onecycle":
        pct = warmup / total if warmup else 0.3
        peaks = [group["lr"] for group in optimizer.param_groups]  # per group: the backbone's may be scaled
        return sched.OneCycleLR(optimizer, max_lr=peaks, total_steps=total, pct_start=max(pct, 1 / total))
    if cfg.scheduler == "cosine":
        main = sched.CosineAnnealingLR(optimizer, T_max=max(1, total - warmup))
    elif cfg.scheduler == "step":
        main = sched.StepLR(optimizer, step_size=cfg.step_epochs * steps_per_epoch, gamma=cfg.step_gamma)
    else:
        main = sched.ConstantLR(optimizer, factor=1.0, total_iters=0)
    if not warmup:
        return main
    ramp = sched.LinearLR(optimizer, start_factor=0.01, end_factor=1.0, total_iters=warmup)
    return sched.SequentialLR(optimizer, [ramp, main], milestones=[warmup])


@torch.no_grad()
def predict(model, images: np.ndarray, batch_size: int, amp_dtype, norm, device) -> np.ndarray:
    model.eval()
    out = []
    for start in range(0, len(images), batch_size):
        batch = torch.from_numpy(images[start : start + batch_size]).permute(0, 3, 1, 2).to(device)
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            logits = model(normalize_on_device(batch, *norm))
        out.append(torch.softmax(logits.float(), dim=1).cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, 0), dtype=np.float32)


def validate(model, val_images, val_y, batch_size, amp_dtype, norm, ctx: DistContext) -> dict[str, float]:
    """Each rank predicts its shard; every rank gathers all, so all reach the same early-stop decision."""
    positions = np.arange(len(val_y))[ctx.rank :: ctx.world_size]
    proba = predict(model, val_images[positions], batch_size, amp_dtype, norm, ctx.device)
    gathered = all_gather_objects((positions, proba))
    order = np.concatenate([p for p, _ in gathered])
    full = np.concatenate([q for _, q in gathered if len(q)])[np.argsort(order)].astype(np.float64)
    val_loss = float(-np.log(np.clip(full[np.arange(len(val_y)), val_y], 1e-12, None)).mean())
    return {"val_loss": val_loss, **classification_metrics(val_y, full, prefix="val")}


def save_checkpoint(path: Path, payload: dict, keep_previous: bool = False) -> None:
    """Atomic and durable: written to a temporary file, flushed to the disk (fsync), then renamed
    over `path`, so a crash or power loss mid-write leaves the previous checkpoint, never a
    truncated one. `keep_previous`: the checkpoint it replaces stays as `<stem>.prev.pt` (a hard
    link, so `path` itself never goes missing), the fallback should `path` later prove unreadable."""
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        torch.save(payload, f)
        f.flush()
        os.fsync(f.fileno())
    if keep_previous and path.exists():
        _keep_as(path, previous_checkpoint(path))
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def previous_checkpoint(path: Path) -> Path:
    return path.with_name(f"{path.stem}.prev{path.suffix}")


def _keep_as(path: Path, target: Path) -> None:
    """`target` becomes the file `path` is now, atomically, `path` staying in place."""
    tmp = target.with_suffix(".tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    try:
        os.link(path, tmp)
    except OSError:  # a filesystem without hard links: a copy
        shutil.copyfile(path, tmp)
    os.replace(tmp, target)


def _fsync_dir(folder: Path) -> None:
    """Make the renames durable too (POSIX; a no-op where a folder cannot be opened)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


LOSS_MIN_DELTA = 1e-4  # the least drop in validation loss that breaks a macro-F1 tie (Keras's min_delta)

RESUME_KEYS = {"model_state", "optimizer", "scheduler", "scaler", "rng", "epoch", "best_score", "best_epoch",
               "best_state", "history"}  # fmt: skip


def _readable(path: Path) -> dict:
    """The resume checkpoint at `path`, verified: it loads (weights_only) and has every field."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    missing = RESUME_KEYS - set(state) if isinstance(state, dict) else RESUME_KEYS
    if missing:
        raise ValueError(f"fields missing: {', '.join(sorted(missing))}")
    return state


def choose_resume_checkpoint(path: Path, name: str) -> Path | None:
    """Rank 0's choice of where a trial resumes: `last.pt` if it loads; if it does not (truncated,
    corrupt) it is moved aside (`last.pt.corrupt`) with a warning, and `last.prev.pt`, the one
    before it, is put in its place if that loads; else None (the trial starts over, as it does
    without a `last.pt`)."""
    if not path.exists():
        return None
    try:
        _readable(path)
        return path
    except Exception as err:  # noqa: BLE001 - any unreadable file: truncated zip, bad pickle, wrong content
        aside = path.with_name(f"{path.name}.corrupt")
        os.replace(path, aside)
        reason = " ".join(str(err).split())[:160]
        print(f"{name} WARNING: checkpoint {path} is unreadable (truncated or corrupt: {type(err).__name__}: "
              f"{reason}); moved aside to {aside.name}", flush=True)  # fmt: skip
    previous = previous_checkpoint(path)
    try:
        epoch = _readable(previous)["epoch"]
    except Exception as err:  # noqa: BLE001
        reason = "missing" if not previous.exists() else f"unreadable: {type(err).__name__}"
        print(f"{name} WARNING: the previous checkpoint {previous.name} is {reason} too; the trial starts over",
              flush=True)  # fmt: skip
        return None
    _keep_as(previous, path)
    print(f"{name} resuming from the previous good checkpoint {previous.name} (epoch {epoch})", flush=True)
    return path


def load_resumable(path: Path, device: torch.device, name: str, ctx: DistContext) -> dict | None:
    """The verified resume state of a trial, or None. Rank 0 chooses (and repairs) and tells the
    other ranks, so every rank resumes from the same file, or none does."""
    chosen = choose_resume_checkpoint(path, name) if ctx.is_main else None
    chosen = all_gather_objects(chosen)[0]
    return None if chosen is None else torch.load(chosen, map_location=device, weights_only=True)


def run_trial(trial: TrialSpec, spec: WorkerSpec, ctx: DistContext, tracker) -> TrialResult:
    """Train one trial. With a `last.pt` in its folder (a restart after a failure) it resumes
    from there and continues exactly: shuffles, augmentations and dropout follow from (seed,
    epoch), so the resumed epochs draw what an uninterrupted run would."""
    cfg = trial.train
    started = time.perf_counter()
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)

    data = np.load(trial.train_set)
    pixels = np.load(spec.pixels, mmap_mode="r")
    train_images = CachedImages(pixels, data["pixel_index"], data["synthetic_images"])
    train_y = data["y"]
    val_path = trial.val_set or spec.val_set
    if val_path is not None:
        val_part = np.load(val_path)
        val_images = np.ascontiguousarray(pixels[val_part["pixel_index"]])
        val_y = val_part["y"]
    channels = train_images.shape[3]

    # Normalization statistics from the training split only.
    channel_mean, channel_std = train_images.channel_stats(seed=cfg.seed)
    mean = torch.tensor(channel_mean, dtype=torch.float32, device=ctx.device)
    std = torch.tensor(channel_std + 1e-6, dtype=torch.float32, device=ctx.device)
    fmt = torch.channels_last if ctx.device.type == "cuda" else torch.contiguous_format
    norm = (mean.view(1, -1, 1, 1), std.view(1, -1, 1, 1), fmt)
    amp_dtype = resolve_amp(cfg.amp, ctx.device)

    cfg = resolve_budget(cfg, len(train_y), ctx.world_size)  # the launcher resolved it already: unchanged then
    model = build_model(cfg.model, channels, spec.num_classes, int(train_images.shape[1]), cfg.pretrained)
    if cfg.freeze == "backbone":
        freeze_backbone(model)
    backbone, head = head_parameters(model)
    if cfg.sync_batchnorm and ctx.world_size > 1 and ctx.device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = model.to(ctx.device, memory_format=fmt)
    # The average lives beside the model (same device, fp32), not under DDP: every rank updates its own
    # copy from identical weights, so the copies stay equal without communication.
    ema = ModelEmaV3(model, decay=cfg.ema_decay, use_warmup=True, warmup_power=3 / 4) if cfg.ema_decay else None
    shipped = ema.module if ema is not None else model  # what is validated, checkpointed and returned
    net = DistributedDataParallel(model, device_ids=[ctx.local_rank] if ctx.device.type == "cuda" else None) \
        if ctx.world_size > 1 else model
    if cfg.compile != "off":
        net = torch.compile(net, mode=cfg.compile)

    dataset = ImageArrayDataset(train_images, train_y, build_augmentation(cfg.augment), seed=cfg.seed)
    if "sampler_weight" in data.files and len(data["sampler_weight"]):  # resample.strategy: weighted_sampler
        shard = DistributedWeightedSampler(data["sampler_weight"], ctx.world_size, ctx.rank, seed=cfg.seed)
    else:
        shard = DistributedSampler(dataset, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True, seed=cfg.seed)
    sampler = EpochKeyedSampler(shard, len(dataset))
    loader = DataLoader(
        dataset,
        batch_size=cfg.batch_size,
        sampler=sampler,
        num_workers=cfg.num_workers,
        pin_memory=ctx.device.type == "cuda",
        persistent_workers=cfg.num_workers > 0,
        prefetch_factor=4 if cfg.num_workers > 0 else None,
        generator=torch.Generator().manual_seed(cfg.seed),  # worker seeds never draw from the global RNG
    )
    optimizer = _optimizer(cfg, [{"params": [p for p in head if p.requires_grad], "lr": cfg.lr},
                                 {"params": [p for p in backbone if p.requires_grad], "lr": cfg.lr * cfg.backbone_lr_scale}])
    scheduler = build_scheduler(optimizer, cfg, len(loader))
    weight = torch.as_tensor(data["class_weight"], device=ctx.device)
    loss_fn = focal_loss(weight, cfg.focal_gamma, cfg.label_smoothing) if cfg.loss == "focal" \
        else nn.CrossEntropyLoss(weight=weight, label_smoothing=cfg.label_smoothing)
    # GradScaler only with fp16 autocast; bf16 has fp32's range and needs none.
    scaler = torch.amp.GradScaler(ctx.device.type, enabled=amp_dtype == torch.float16)

    out = Path(trial.out_dir)
    ckpt_path, last_path = out / "checkpoint.pt", out / "last.pt"
    best_score, best_epoch, best_state, history, first_epoch = [-math.inf, -math.inf], -1, None, [], 0
    state = load_resumable(last_path, ctx.device, trial.name, ctx)
    if state is not None:
        model.load_state_dict(state["model_state"])
        if ema is not None:
            ema.module.load_state_dict(state.get("ema_state") or state["model_state"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        _set_rng_state(state["rng"])
        best_score, best_epoch, best_state = list(state["best_score"]), state["best_epoch"], state["best_state"]
        history, first_epoch = list(state["history"]), state["epoch"] + 1
        if ctx.is_main:
            print(f"{trial.name} resumed after epoch {state['epoch']}", flush=True)
            if tracker is not None:
                tracker.catch_up(history, trial.metric_prefix)  # epochs saved but not yet logged

    last_epoch = min(cfg.epochs, trial.stop_after or cfg.epochs)  # the schedule still spans cfg.epochs
    stopped = False
    for epoch in range(first_epoch, last_epoch):
        torch.manual_seed(cfg.seed * 1_000_003 + epoch)  # dropout; augmentation is seeded per item
        sampler.set_epoch(epoch)  # a different shuffle each epoch, the same on every rank
        frozen = backbone if epoch < cfg.freeze_epochs else None  # fine-tuning: the head learns first
        metrics = train_one_epoch(net, loader, optimizer, scheduler, loss_fn, scaler, amp_dtype, norm, ctx,
                                  cfg.grad_clip, frozen, ema, model)  # fmt: skip
        metrics["lr"] = scheduler.get_last_lr()[0]
        if ema is not None:
            broadcast_from_main(ema.module)  # its batch-norm statistics drift apart between ranks
        if ctx.device.type == "cuda":
            metrics["gpu_mem_mib"] = max(all_gather_objects(torch.cuda.max_memory_allocated(ctx.device) / 2**20))
        if val_path is not None:
            metrics.update(validate(shipped, val_images, val_y, cfg.batch_size, amp_dtype, norm, ctx))
        history.append({"epoch": epoch, **metrics})
        # Validation macro-F1, ties broken by the lower validation loss: a small validation split
        # saturates (macro-F1 1.0 from an early epoch) and the first epoch to reach it is rarely the
        # best model. Without validation (a refit) every epoch counts as the best: the last weights are kept.
        score = [metrics["val_macro_f1"], -metrics["val_loss"]] if "val_macro_f1" in metrics else [float(epoch), 0.0]
        improved = score[0] > best_score[0] or (score[0] == best_score[0] and score[1] > best_score[1] + LOSS_MIN_DELTA)
        if improved:
            best_score, best_epoch = score, epoch
            best_state = copy.deepcopy(shipped.state_dict())
        if ctx.is_main:
            if improved:
                save_checkpoint(ckpt_path, {
                    "model_state": best_state, "model": cfg.model, "in_channels": channels,
                    "num_classes": spec.num_classes, "image_size": int(train_images.shape[1]),
                    "mean": mean.cpu(), "std": std.cpu(), "epoch": epoch, "val_macro_f1": metrics.get("val_macro_f1"),
                })  # fmt: skip
            # Saved before the metrics are logged: a crash in between is caught up on resume.
            save_checkpoint(last_path, {
                "model_state": model.state_dict(), **({"ema_state": ema.module.state_dict()} if ema else {}),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "rng": _rng_state(),
                "epoch": epoch, "best_score": best_score, "best_epoch": best_epoch, "best_state": best_state,
                "history": history,
            }, keep_previous=True)  # fmt: skip
            shown = " ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k in ("train_loss", "val_macro_f1"))
            print(f"{trial.name} epoch {epoch:3d}/{cfg.epochs} {shown} {metrics['img_per_s']:.0f} img/s", flush=True)
            if tracker is not None:
                tracker({trial.metric_prefix + k: v for k, v in metrics.items()}, epoch)
        if not improved and epoch - best_epoch >= cfg.patience:
            stopped = True
            break

    model.load_state_dict(best_state)  # early stopping restores the best weights, not the last
    best = history[best_epoch]
    if ctx.is_main:
        score = f"val_macro_f1 {best['val_macro_f1']:.4f}" if "val_macro_f1" in best else "no validation (refit)"
        print(f"[{trial.name}] done: best epoch {best_epoch} of {len(history)}, {score}, "
              f"{time.perf_counter() - started:.1f}s", flush=True)
    return TrialResult(
        name=trial.name,
        best_epoch=best_epoch,
        epochs_run=len(history),
        stopped_early=stopped,
        paused=not stopped and len(history) < cfg.epochs,
        val_metrics={k: v for k, v in best.items() if k.startswith("val_")},
        history=history,
        checkpoint=str(ckpt_path),
        world_size=ctx.world_size,
        device=str(ctx.device),
        amp=str(amp_dtype).removeprefix("torch.") if amp_dtype else "off",
        train_items=len(train_y),
        seconds=round(time.perf_counter() - started, 3),
    )


def _rng_state() -> dict:
    numpy_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": torch.from_numpy(numpy_state[1].astype(np.int64)),
        "numpy_pos": int(numpy_state[2]),
        "python": random.getstate(),
    }


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"], 0, 0.0))
    random.setstate(state["python"])


def _optimizer(cfg, params):
    """`params`: parameters, or param groups with their own "lr" (the head's first: the logged lr)."""
    groups = [g for g in params if not isinstance(g, dict) or g["params"]] if isinstance(params, list) else params
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay, nesterov=True)
    cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    return cls(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)


def _with_run(spec: WorkerSpec, trial: TrialSpec, ctx: DistContext) -> TrialSpec:
    """On rank 0, the trial with its MLflow run: started now (or found again on a resume) when
    the spec asks for a new one."""
    if not ctx.is_main or trial.run_id is not None or trial.new_run is None:
        return trial
    from mlpipe import tracking

    new = trial.new_run
    run_id = tracking.child_run(spec.tracking_uri, new.experiment_id, new.parent_run_id, trial.name, new.params, reuse=True)
    return trial.model_copy(update={"run_id": run_id})


def _metric_logger(spec: WorkerSpec, trial: TrialSpec, ctx: DistContext):
    """Rank 0 with a run id logs through mlpipe.tracking; everyone else gets None."""
    if not ctx.is_main or trial.run_id is None:
        return None
    from mlpipe import tracking  # imported here so the worker runs without MLflow installed

    return tracking.metric_logger(trial.run_id, spec.tracking_uri)


ERROR_MARK = "mlpipe-worker-error:"  # the launcher finds a failed worker's exception by this line


def error_line(err: BaseException, trial: str | None) -> str:
    """A worker's exception as the one line the launcher reports: `mlpipe-worker-error: trial-000
    rank 0: ValueError: <first line of the message, at most 300 characters>` (`-` before any trial)."""
    first = next((line.strip() for line in str(err).splitlines() if line.strip()), "")
    first = first if len(first) <= 300 else first[:299] + "\u2026"
    rank = os.environ.get("RANK", "0")
    return f"{ERROR_MARK} {trial or '-'} rank {rank}: {type(err).__name__}" + (f": {first}" if first else "")


def main(argv: list[str] | None = None) -> None:
    """Any exception leaves one `error_line` in the output before it propagates (under torchrun
    `record` also writes it to torchrun's error file, so torchrun's summary shows the traceback)."""
    current: list[str | None] = [None]  # the trial being trained, for the error line
    try:
        _main(argv, current)
    except Exception as err:
        print(error_line(err, current[0]), file=sys.stderr, flush=True)
        raise


def _main(argv: list[str] | None, current: list[str | None]) -> None:
    parser = argparse.ArgumentParser(description="mlpipe training worker (run under torchrun)")
    parser.add_argument("--spec", required=True, type=Path)
    args = parser.parse_args(argv)
    spec = WorkerSpec.model_validate_json(args.spec.read_text())
    devices = {t.train.device for t in spec.trials}
    if len(devices) != 1:
        raise SystemExit("all trials of one launch must share train.device")
    ctx = init_distributed(devices.pop(), timeout_s=max(t.train.nccl_timeout_s for t in spec.trials))
    if ctx.device.type == "cpu":  # the launcher's share (parallel launches split the cores), else cores / world
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or max(1, (os.cpu_count() or 1) // ctx.world_size)))
    try:
        for trial in spec.trials:
            path = Path(trial.out_dir) / "result.json"
            if path.exists() and is_done(TrialResult.model_validate_json(path.read_text()), trial.stop_after, trial.train.epochs):
                continue  # finished before a restart (torchrun re-runs the whole spec) or in an earlier rung
            current[0] = trial.name
            trial = _with_run(spec, trial, ctx)
            tracker = _metric_logger(spec, trial, ctx)
            if tracker is not None:
                tracker.start_system_metrics()
            try:
                result = run_trial(trial, spec, ctx, tracker)
            finally:
                if tracker is not None:
                    tracker.stop_system_metrics()
            if ctx.is_main:
                parent = trial.new_run.parent_run_id if trial.new_run else None
                result = result.model_copy(update={"run_id": trial.run_id, "parent_run_id": parent,
                                                   "ended_ms": int(time.time() * 1000)})  # fmt: skip
                tmp = path.with_suffix(".tmp")
                tmp.write_text(result.model_dump_json(indent=2))
                os.replace(tmp, path)
    finally:
        with contextlib.suppress(Exception):
            cleanup()


if __name__ == "__main__":
    from torch.distributed.elastic.multiprocessing.errors import record

    record(main)()
