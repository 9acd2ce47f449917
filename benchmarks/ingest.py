"""Ingest throughput against a bare PIL loop, and how ingest time scales with the image count.

    .venv/bin/python benchmarks/ingest.py [--small 20000] [--large 2000]

Data sets (generated once into a temp dir): N small 32x32 grayscale PNGs, and M 512x512 RGB
JPEGs. The bare loop opens and decodes every file with PIL in one thread and does nothing else.
Ingest runs from an empty state directory (no snapshot to reuse) with its defaults: path
checks, pandera validation, decoding on a thread pool, mode normalization, resizing, sha256,
perceptual hashes, duplicate detection and writing the snapshot.

ratio = bare time / ingest time (ingest throughput relative to raw decoding; goal >= 0.8).
scaling = ingest time for N small / for N/10 small (goal <= 11). Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image


def make_dataset(root: Path, count: int, size: int, fmt: str, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    (root / "img").mkdir(parents=True)
    paths = []
    for i in range(count):
        if fmt == "png":
            pixels = (rng.random((size, size)) * 40).astype(np.uint8)
            pixels[rng.integers(size) :, rng.integers(size) :] += 180  # some structure, not pure noise
            Image.fromarray(pixels).save(root / "img" / f"{i}.png")
            paths.append(f"img/{i}.png")
        else:
            base = np.linspace(0, 255, size, dtype=np.float32)
            pixels = np.stack([np.add.outer(base, base * (c + 1) / 3) % 256 for c in range(3)], axis=-1)
            pixels = (pixels + rng.integers(0, 30, (size, size, 3))).clip(0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / "img" / f"{i}.jpg", quality=90)
            paths.append(f"img/{i}.jpg")
    pd.DataFrame({"image": paths}).to_csv(root / "manifest.csv", index=False)
    return root


def bare_loop(root: Path) -> float:
    paths = pd.read_csv(root / "manifest.csv")["image"]
    started = time.perf_counter()
    for rel in paths:
        with Image.open(root / rel) as img:
            img.load()
    return time.perf_counter() - started


def ingest_time(root: Path, image_size: int, channels: int) -> tuple[float, dict]:
    from mlpipe.config import IngestConfig, SourceConfig
    from mlpipe.ingest import ingest

    with tempfile.TemporaryDirectory() as home:
        os.environ["MLPIPE_HOME"] = home
        started = time.perf_counter()
        result = ingest(SourceConfig(uri=str(root)), IngestConfig(image_size=image_size, channels=channels))
        return time.perf_counter() - started, result.report


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--small", type=int, default=20000)
    parser.add_argument("--large", type=int, default=2000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        small = make_dataset(tmp / "small", args.small, 32, "png", 0)
        tenth = make_dataset(tmp / "tenth", args.small // 10, 32, "png", 1)
        large = make_dataset(tmp / "large", args.large, 512, "jpg", 2)
        for d in (small, tenth, large):  # warm the page cache for both contenders alike
            bare_loop(d)
        figures = {}
        for name, root, size, channels in (("small_png", small, 32, 1), ("large_jpeg", large, 224, 3)):
            bare = bare_loop(root)
            took, report = ingest_time(root, size, channels)
            assert report["kept"] + report["duplicates"] == report["rows_in"], report
            figures[name] = {"images": report["rows_in"], "bare_s": round(bare, 3), "ingest_s": round(took, 3),
                             "ratio": round(bare / took, 3)}  # fmt: skip
            print(f"{name}: {report['rows_in']} images, bare PIL {bare:.2f}s, ingest {took:.2f}s, ratio {bare / took:.3f}")
        tenth_s, _ = ingest_time(tenth, 32, 1)
        scaling = figures["small_png"]["ingest_s"] / tenth_s
        print(f"scaling: {args.small} small in {figures['small_png']['ingest_s']:.2f}s vs {args.small // 10} in {tenth_s:.2f}s: {scaling:.2f}")
    ratio = min(f["ratio"] for f in figures.values())
    print(json.dumps({"name": "ingest_throughput_vs_bare_pil", "ratio": ratio, "goal": ">= 0.8 (and scaling <= 11)",
                      **figures, "scaling": round(scaling, 2), "scaling_goal": 11, "tenth_ingest_s": round(tenth_s, 3),
                      "cpus": os.cpu_count()}))  # fmt: skip
    sys.exit(0)


if __name__ == "__main__":
    main()
