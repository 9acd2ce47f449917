"""The training worker: runs the trials of a `WorkerSpec` under torchrun, one after another.

It imports neither Prefect nor (unless a trial names an MLflow run) MLflow, so it runs and
benchmarks on any machine with torch, albumentations and scikit-learn.

One launch serves all trials: process start-up and rendezvous cost seconds, and the process
group can be reused. Launch commands (the train task builds the first):

    # one machine, CPU processes or one process per GPU
    python -m torch.distributed.run --standalone --nproc-per-node 2 -m mlpipe.train.worker --spec spec.json
    # one GPU, no torchrun at all
    python -m mlpipe.train.worker --spec spec.json
    # several nodes (run on each; node 0's address as the endpoint)
    python -m torch.distributed.run --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d \
        --rdzv-endpoint HOST:29400 --rdzv-id JOB -m mlpipe.train.worker --spec spec.json
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler

from mlpipe.metrics import classification_metrics
from mlpipe.train.data import DistributedWeightedSampler, ImageArrayDataset, build_augmentation, seed_worker
from mlpipe.train.ddp import DistContext, all_gather_objects, all_reduce_sum, cleanup, init_distributed
from mlpipe.train.model import build_model
from mlpipe.train.spec import TrialResult, TrialSpec, WorkerSpec


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


def train_one_epoch(model, loader, optimizer, loss_fn, scaler, amp_dtype, norm, ctx: DistContext) -> float:
    model.train()
    # Summed on the device: a per-step .item() would stall the GPU on every batch.
    total = torch.zeros((), dtype=torch.float64, device=ctx.device)
    count = 0
    for images, targets in loader:
        images = normalize_on_device(images.to(ctx.device, non_blocking=True), *norm)
        targets = targets.to(ctx.device, non_blocking=True)
        with torch.autocast(ctx.device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            loss = loss_fn(model(images), targets)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        total += loss.detach().double() * len(targets)
        count += len(targets)
    total, count = all_reduce_sum([total.item(), count], ctx.device)
    return total / max(count, 1)


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
    full = np.concatenate([q for _, q in gathered if len(q)])[np.argsort(order)]
    return classification_metrics(val_y, full.astype(np.float64), prefix="val")


def save_checkpoint(path: Path, payload: dict) -> None:
    """Atomic: a crash mid-write leaves the previous checkpoint, never a truncated one."""
    tmp = path.with_suffix(".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def run_trial(trial: TrialSpec, spec: WorkerSpec, ctx: DistContext, tracker) -> TrialResult:
    cfg = trial.train
    started = time.perf_counter()
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)

    data = np.load(trial.train_set)
    train_images, train_y = data["images"], data["y"]
    val_path = trial.val_set or spec.val_set
    if val_path is not None:
        val_part = np.load(val_path)
        val_images = np.ascontiguousarray(np.load(spec.pixels, mmap_mode="r")[val_part["pixel_index"]])
        val_y = val_part["y"]
    channels = train_images.shape[3]

    # Normalization statistics from the training split only.
    mean = torch.tensor(train_images.mean(axis=(0, 1, 2)) / 255.0, dtype=torch.float32, device=ctx.device)
    std = torch.tensor(train_images.std(axis=(0, 1, 2)) / 255.0 + 1e-6, dtype=torch.float32, device=ctx.device)
    fmt = torch.channels_last if ctx.device.type == "cuda" else torch.contiguous_format
    norm = (mean.view(1, -1, 1, 1), std.view(1, -1, 1, 1), fmt)
    amp_dtype = resolve_amp(cfg.amp, ctx.device)

    model = build_model(cfg.model, channels, spec.num_classes).to(ctx.device, memory_format=fmt)
    net = DistributedDataParallel(model, device_ids=[ctx.local_rank] if ctx.device.type == "cuda" else None) \
        if ctx.world_size > 1 else model

    dataset = ImageArrayDataset(train_images, train_y, build_augmentation(cfg.augment, seed=cfg.seed + 1000 * ctx.rank))
    if "sampler_weight" in data.files and len(data["sampler_weight"]):  # resample.strategy: weighted_sampler
        sampler = DistributedWeightedSampler(data["sampler_weight"], ctx.world_size, ctx.rank, seed=cfg.seed)
    else:
        sampler = DistributedSampler(dataset, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True, seed=cfg.seed)
    loader = DataLoader(
        dataset,
        batch_size=cfg.batch_size,
        sampler=sampler,
        num_workers=cfg.num_workers,
        pin_memory=ctx.device.type == "cuda",
        persistent_workers=cfg.num_workers > 0,
        prefetch_factor=4 if cfg.num_workers > 0 else None,
        worker_init_fn=seed_worker,
        generator=torch.Generator().manual_seed(cfg.seed + ctx.rank),
    )
    optimizer = _optimizer(cfg, net.parameters())
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.epochs)
    loss_fn = nn.CrossEntropyLoss(
        weight=torch.as_tensor(data["class_weight"], device=ctx.device), label_smoothing=cfg.label_smoothing
    )
    # GradScaler only with fp16 autocast; bf16 has fp32's range and needs none.
    scaler = torch.amp.GradScaler(ctx.device.type, enabled=amp_dtype == torch.float16)

    ckpt_path = Path(trial.out_dir) / "checkpoint.pt"
    best_score, best_epoch, best_state, history = -1.0, -1, None, []
    for epoch in range(cfg.epochs):
        sampler.set_epoch(epoch)  # a different shuffle each epoch, the same on every rank
        train_loss = train_one_epoch(net, loader, optimizer, loss_fn, scaler, amp_dtype, norm, ctx)
        scheduler.step()
        metrics = {"train_loss": train_loss}
        if val_path is not None:
            metrics.update(validate(model, val_images, val_y, cfg.batch_size, amp_dtype, norm, ctx))
        history.append({"epoch": epoch, **metrics})
        if ctx.is_main:
            shown = " ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k in ("train_loss", "val_macro_f1"))
            print(f"{trial.name} epoch {epoch:3d} {shown}", flush=True)
            if tracker is not None:
                tracker({trial.metric_prefix + k: v for k, v in metrics.items()}, epoch)
        # Without validation (a refit) every epoch counts as the best: the last weights are kept.
        score = metrics.get("val_macro_f1", float(epoch))
        if score > best_score:
            best_score, best_epoch = score, epoch
            best_state = copy.deepcopy(model.state_dict())
            if ctx.is_main:
                save_checkpoint(ckpt_path, {
                    "model_state": best_state,
                    "model": cfg.model,
                    "in_channels": channels,
                    "num_classes": spec.num_classes,
                    "image_size": int(train_images.shape[1]),
                    "mean": mean.cpu(),
                    "std": std.cpu(),
                    "epoch": epoch,
                    "val_macro_f1": metrics.get("val_macro_f1"),
                })
        elif epoch - best_epoch >= cfg.patience:
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
        stopped_early=len(history) < cfg.epochs,
        val_metrics={k: v for k, v in best.items() if k.startswith("val_")},
        history=history,
        checkpoint=str(ckpt_path),
        world_size=ctx.world_size,
        device=str(ctx.device),
        amp=str(amp_dtype).removeprefix("torch.") if amp_dtype else "off",
        train_items=len(train_y),
        seconds=round(time.perf_counter() - started, 3),
    )


def _optimizer(cfg, params):
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay, nesterov=True)
    cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    return cls(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def _metric_logger(spec: WorkerSpec, trial: TrialSpec, ctx: DistContext):
    """Rank 0 with a run id logs through mlpipe.tracking; everyone else gets None."""
    if not ctx.is_main or trial.run_id is None:
        return None
    from mlpipe import tracking  # imported here so the worker runs without MLflow installed

    return tracking.metric_logger(trial.run_id, spec.tracking_uri)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="mlpipe training worker (run under torchrun)")
    parser.add_argument("--spec", required=True, type=Path)
    args = parser.parse_args(argv)
    spec = WorkerSpec.model_validate_json(args.spec.read_text())
    devices = {t.train.device for t in spec.trials}
    if len(devices) != 1:
        raise SystemExit("all trials of one launch must share train.device")
    ctx = init_distributed(devices.pop())
    if ctx.device.type == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // ctx.world_size))
    try:
        for trial in spec.trials:
            result = run_trial(trial, spec, ctx, _metric_logger(spec, trial, ctx))
            if ctx.is_main:
                path = Path(trial.out_dir) / "result.json"
                tmp = path.with_suffix(".tmp")
                tmp.write_text(result.model_dump_json(indent=2))
                os.replace(tmp, path)
    finally:
        with contextlib.suppress(Exception):
            cleanup()


if __name__ == "__main__":
    main()
