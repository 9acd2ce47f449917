"""The trainer's throughput against the hand-written reference loop, in one command.

    .venv/bin/python benchmarks/train_throughput.py                      # CPU here: resnet18@32, fp32
    python benchmarks/train_throughput.py --device cuda --arch resnet50 --res 224 --batch 256 --mode bf16
    python benchmarks/train_throughput.py --device cuda --arch resnet50 --res 224 --batch 256 --mode bf16_compile

1. reference: `benchmarks/reference/reference_loop.py` (a verbatim copy of the project's
   reference, ../shared/bench/reference_loop.py) with the same arch, batch, resolution, mode
   and device, run as a subprocess of this command.
2. synthetic: mlpipe's own training step (`mlpipe.train.worker.train_one_epoch`: uint8 batch
   normalized on the device, autocast, GradScaler, scheduler step, loss/accuracy accumulated on
   the device) over device-resident batches, same SGD settings as the reference.
3. pipeline: the same step fed by the real input path: a uint8 memory-mapped cache, the
   albumentations policy in DataLoader workers, pinned memory.

Goals: synthetic / reference >= 0.98 on a GPU for ResNet-50@224 (bf16, eager and compiled),
>= 0.95 on CPU with a small model; pipeline / synthetic >= 0.97 on a GPU. Ends with one JSON
line; ratio = synthetic / reference.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
HERE = Path(__file__).resolve().parent


def reference(args) -> dict:
    command = [sys.executable, str(HERE / "reference" / "reference_loop.py"), "--arch", args.arch,
               "--batch", str(args.batch), "--res", str(args.res), "--mode", args.mode, "--iters", str(args.iters),
               "--warmup", str(args.warmup), "--device", args.device, "--classes", str(args.classes)]  # fmt: skip
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def _trainer(args):
    from mlpipe.config import TrainConfig
    from mlpipe.train import worker
    from mlpipe.train.ddp import DistContext
    from mlpipe.train.model import build_model

    device = torch.device(args.device)
    torch.manual_seed(0)
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    amp = {"fp32": "off", "bf16": "bf16", "bf16_compile": "bf16"}[args.mode]
    cfg = TrainConfig(model=args.arch, optimizer="sgd", lr=0.1, weight_decay=5e-5, scheduler="constant", amp=amp,
                      device="cuda" if device.type == "cuda" else "cpu", epochs=1, batch_size=args.batch,
                      compile="default" if args.mode == "bf16_compile" else "off", augment=None)  # fmt: skip
    ctx = DistContext(rank=0, world_size=1, local_rank=0, device=device)
    fmt = torch.channels_last if args.mode != "fp32" else torch.contiguous_format
    # Built as for 224 px whatever --res is: timm's ResNet is then torchvision's (the reference's) layer for
    # layer; mlpipe's small-image stem (model.small_image_stem) is a modelling choice, not trainer overhead.
    model = build_model(cfg.model, 3, args.classes, 224).to(device, memory_format=fmt)
    net = torch.compile(model) if cfg.compile != "off" else model
    optimizer = worker._optimizer(cfg, model.parameters())
    scheduler = worker.build_scheduler(optimizer, cfg, 1)
    amp_dtype = worker.resolve_amp(cfg.amp, device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    norm = (torch.full((1, 3, 1, 1), 0.5, device=device), torch.full((1, 3, 1, 1), 0.25, device=device), fmt)
    loss_fn = torch.nn.CrossEntropyLoss()

    def run(loader) -> float:
        return worker.train_one_epoch(net, loader, optimizer, scheduler, loss_fn, scaler, amp_dtype, norm, ctx)["img_per_s"]

    return cfg, run


def synthetic(args) -> float:
    _, run = _trainer(args)
    device = torch.device(args.device)
    images = torch.randint(0, 256, (args.batch, 3, args.res, args.res), dtype=torch.uint8, device=device)
    targets = torch.randint(0, args.classes, (args.batch,), device=device)
    run([(images, targets)] * args.warmup)
    return run([(images, targets)] * args.iters)


def pipeline(args) -> float:
    """The real input path: memmap cache -> albumentations in DataLoader workers -> device."""
    from torch.utils.data import DataLoader, RandomSampler

    from mlpipe.train.data import ImageArrayDataset, build_augmentation

    _, run = _trainer(args)
    items = args.batch * (args.iters + args.warmup)
    folder = Path(tempfile.mkdtemp(prefix="mlpipe-bench-"))
    cache = np.lib.format.open_memmap(folder / "pixels.npy", mode="w+", dtype=np.uint8,
                                      shape=(min(items, 20_000), args.res, args.res, 3))  # fmt: skip
    cache[:] = np.random.default_rng(0).integers(0, 256, cache.shape, dtype=np.uint8)
    cache.flush()
    pixels = np.load(folder / "pixels.npy", mmap_mode="r")
    policy = {"transform": {"__class_fullname__": "Compose", "p": 1.0, "transforms": [
        {"__class_fullname__": "RandomResizedCrop", "p": 1.0, "size": [args.res, args.res], "scale": [0.35, 1.0]},
        {"__class_fullname__": "HorizontalFlip", "p": 0.5}]}}  # fmt: skip
    dataset = ImageArrayDataset(pixels, np.zeros(len(pixels), dtype=np.int64), build_augmentation(policy))
    sampler = RandomSampler(dataset, replacement=True, num_samples=items)
    loader = DataLoader(dataset, batch_size=args.batch, sampler=sampler, num_workers=args.workers,
                        pin_memory=args.device == "cuda", prefetch_factor=4 if args.workers else None,
                        persistent_workers=False)  # fmt: skip
    batches = iter(loader)  # workers start here, before the clock
    run([next(batches) for _ in range(args.warmup)])
    return run(batches)  # the remaining `iters` batches, loaded while training


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--res", type=int, default=32)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--mode", choices=["fp32", "bf16", "bf16_compile"], default="fp32")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    parser.add_argument("--repeat", type=int, default=3, help="alternate reference and trainer this many times; best of each")
    args = parser.parse_args()

    ref_rates, syn_rates = [], []
    for _ in range(args.repeat):  # interleaved: drift of a shared machine hits both alike
        ref_rates.append(reference(args)["img_per_s"])
        syn_rates.append(synthetic(args))
    pipe_rate = pipeline(args)
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else f"cpu ({os.cpu_count()} cores)"
    ref, syn = max(ref_rates), max(syn_rates)
    print(f"{device_name}: {args.arch}@{args.res} batch {args.batch} {args.mode}")
    print(f"  reference loop      {ref:9.1f} img/s   (runs: {', '.join(f'{r:.1f}' for r in ref_rates)})")
    print(f"  trainer, synthetic  {syn:9.1f} img/s   ratio {syn / ref:.3f}   (runs: {', '.join(f'{r:.1f}' for r in syn_rates)})")
    print(f"  trainer, pipeline   {pipe_rate:9.1f} img/s   ratio to synthetic {pipe_rate / syn:.3f} ({args.workers} workers)")
    print(json.dumps({
        "name": "train_throughput", "ratio": round(syn / ref, 3),
        "goal": ">= 0.98 on a GPU (ResNet-50@224 bf16), >= 0.95 on CPU with a small model",
        "device": device_name, "arch": args.arch, "res": args.res, "batch": args.batch, "mode": args.mode,
        "reference_img_per_s": round(ref, 1), "trainer_img_per_s": round(syn, 1),
        "pipeline_img_per_s": round(pipe_rate, 1), "pipeline_ratio": round(pipe_rate / syn, 3),
        "torch": torch.__version__,
    }))  # fmt: skip


if __name__ == "__main__":
    main()
