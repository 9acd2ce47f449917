"""`mlpipe predict` throughput against a bare loop of the same model, in the same process.

    .venv/bin/python benchmarks/predict.py [--images 2000] [--side 64] [--image-size 32] [--rounds 3]

Data: `--images` Fashion-MNIST test photos (Debian's dataset-fashion-mnist) upscaled to `--side`
px (Pillow bilinear), as PNG files. Model: small_cnn for `--image-size` px grayscale, registered
in a temporary MLflow store through `mlpipe.tracking.log_model`, exactly as the pipeline
registers it (random weights: throughput does not depend on them).

- predict: what `mlpipe predict` runs once the model is loaded: list the folder (ingest's
  `Source`), read each file, the pyfunc (MLflow's schema enforcement, ingest's decode and
  resize, the forward pass, the decision rule, the output frame), and the CSV written.
- bare loop: the same files and network, by hand: read, PIL decode, convert to L, resize
  bilinear, stack, forward, batch 256; nothing else.

The two alternate `--rounds` times; ratio = median bare time / median predict time (predict's
throughput relative to the bare loop; goal >= 0.8). Also measured once: the whole CLI command
(`mlpipe predict`, process start and model download included). Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

from mlpipe import serving, tracking
from mlpipe.datasets import load_fashion_mnist
from mlpipe.predict import list_inputs, predict_inputs, write_predictions
from mlpipe.train.model import build_model

BATCH = 256
CLASSES = [str(k) for k in range(10)]


def write_images(folder: Path, count: int, side: int) -> list[Path]:
    images, _ = load_fashion_mnist("test")
    folder.mkdir(parents=True)
    files = [folder / f"{i:05d}.png" for i in range(count)]
    for file, image in zip(files, images[:count], strict=True):
        Image.fromarray(image).resize((side, side), Image.Resampling.BILINEAR).save(file)
    return files


def register(work: Path, image_size: int) -> str:
    torch.manual_seed(0)
    net = build_model("small_cnn", 1, len(CLASSES), image_size)
    ckpt = work / "checkpoint.pt"
    torch.save({"model_state": net.state_dict(), "model": "small_cnn", "in_channels": 1, "num_classes": len(CLASSES),
                "image_size": image_size, "mean": torch.tensor([0.3]), "std": torch.tensor([0.3])}, ckpt)  # fmt: skip
    folder = serving.save(work / "serving", ckpt, CLASSES, serving.Preprocessing(image_size, 1), {"kind": "argmax"},
                          np.zeros((image_size, image_size, 1), np.uint8), "small_cnn")  # fmt: skip
    ref = tracking.start_run("predict-benchmark", "register", {}, {})
    registered = tracking.log_model(ref, folder, "predict-benchmark", ckpt, CLASSES)
    tracking.end_run(ref)
    return f"models:/predict-benchmark/{registered['version']}"


def predict_time(model, folder: Path, out: Path) -> float:
    started = time.perf_counter()
    src, inputs = list_inputs([str(folder)])
    counts = write_predictions(predict_inputs(model, inputs, src, BATCH), out)
    elapsed = time.perf_counter() - started
    assert counts["images"] == len(inputs) and not counts["failed"], counts
    return elapsed


@torch.no_grad()
def bare_time(net: torch.nn.Module, files: list[Path], image_size: int) -> float:
    started = time.perf_counter()
    for i in range(0, len(files), BATCH):
        pixels = []
        for file in files[i : i + BATCH]:
            with Image.open(file) as img:
                small = img.convert("L").resize((image_size, image_size), Image.Resampling.BILINEAR)
            pixels.append(np.asarray(small))
        batch = torch.from_numpy(np.stack(pixels)[:, None]).float()
        net(batch).argmax(1).numpy()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--side", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{work / 'mlflow.db'}"
        os.environ["MLPIPE_HOME"] = str(work / "state")
        files = write_images(work / "images", args.images, args.side)
        uri = register(work, args.image_size)
        model, _ = tracking.load_serving_model(uri, work / "model")
        net = serving.load_model(work / "checkpoint.pt").eval()
        predict_s, bare_s = [], []
        for _ in range(args.rounds):
            predict_s.append(predict_time(model, work / "images", work / "predictions.csv"))
            bare_s.append(bare_time(net, files, args.image_size))
        started = time.perf_counter()
        subprocess.run([str(Path(sys.executable).parent / "mlpipe"), "predict", "--model", uri, "--output",
                        str(work / "cli.csv"), str(work / "images")], check=True, capture_output=True, env=os.environ)  # fmt: skip
        cli_s = time.perf_counter() - started
    p, b = statistics.median(predict_s), statistics.median(bare_s)
    print(f"predict: {args.images / p:.0f} images/s ({p:.3f} s); bare loop: {args.images / b:.0f} images/s ({b:.3f} s); "
          f"whole CLI command {cli_s:.2f} s")  # fmt: skip
    print(json.dumps({"name": "predict", "ratio": round(b / p, 3), "goal": ">= 0.8", "images": args.images, "side": args.side,
                      "image_size": args.image_size, "batch": BATCH, "predict_s": round(p, 3), "bare_s": round(b, 3),
                      "predict_images_per_s": round(args.images / p, 1), "bare_images_per_s": round(args.images / b, 1),
                      "cli_wall_s": round(cli_s, 2), "rounds": args.rounds, "torch_threads": torch.get_num_threads()}))  # fmt: skip


if __name__ == "__main__":
    main()
