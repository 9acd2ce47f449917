"""Split and SMOTE time, each at two sizes, to show how they grow.

    .venv/bin/python benchmarks/split_resample.py [--rows 1000000] [--groups 100000] [--smote 50000]

Split: the whole split stage (`mlpipe.split.split`: grouping by subject and near-duplicate
group, two StratifiedGroupKFold holdouts, leak and proportion checks, the manifest, per-split
files and chart) on a generated labelled table of `rows` items in `groups` subjects, 10 skewed
classes, 2% of items in near-duplicate pairs; and on a quarter of it.

SMOTE: `resample_training_set` with strategy smote on `smote` training items of 32x32x3 uint8
pixels, 10 skewed classes; and on half of it.

Goals: growth time(large) / time(small) <= 1.25 x size ratio x log2(large) / log2(small)
(n log n, with 25% for noise). Ends with one JSON line; ratio = the larger of the two growth
figures divided by its n log n bound (<= 1 meets the goal).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

CLASS_SHARES = np.array([0.30, 0.20, 0.14, 0.10, 0.08, 0.06, 0.05, 0.04, 0.02, 0.01])


def labelled_stage(rows: int, groups: int, seed: int = 0):
    from mlpipe.anonymize import ITEM_ID, NEAR_DUP_GROUP
    from mlpipe.ingest import PIXEL_INDEX
    from mlpipe.label import LABEL, TARGET
    from mlpipe.store import StageResult, stage_dir, write_json

    rng = np.random.default_rng(seed)
    group_class = rng.choice(len(CLASS_SHARES), groups, p=CLASS_SHARES)  # a subject's items share a class
    subject = rng.integers(0, groups, rows)
    y = group_class[subject]
    near = np.full(rows, "", dtype=object)
    pairs = rng.choice(rows, (rows // 100, 2), replace=False)
    near[pairs.ravel()] = np.repeat([f"n{i}" for i in range(len(pairs))], 2)
    items = pd.DataFrame({
        ITEM_ID: [f"{i:016x}" for i in range(rows)], "subject_id": subject.astype(str), NEAR_DUP_GROUP: near,
        LABEL: y.astype(str), TARGET: y, PIXEL_INDEX: np.arange(rows),
    })  # fmt: skip
    key = f"bench-{rows}-{groups}"
    with stage_dir("label", key) as out:
        items.to_parquet(out / "items.parquet", index=False)
        write_json(out / "label_map.json", {str(k): k for k in range(len(CLASS_SHARES))})
    np.save(Path(os.environ["MLPIPE_HOME"]) / "pixels.npy", np.zeros((1, 1, 1, 1), np.uint8))
    return StageResult.at("label", key, {}, pixels=Path(os.environ["MLPIPE_HOME"]) / "pixels.npy")


def time_split(rows: int, groups: int) -> float:
    from mlpipe.config import SplitConfig
    from mlpipe.split import split

    labelled = labelled_stage(rows, groups)
    started = time.perf_counter()
    result = split(labelled, SplitConfig(tolerance=0.05))
    seconds = time.perf_counter() - started
    assert sum(result.report["sizes"].values()) == rows and not any(result.report["leaks"].values())
    return seconds


def time_smote(items: int) -> float:
    from mlpipe.config import ResampleConfig
    from mlpipe.resample import resample_training_set

    rng = np.random.default_rng(0)
    y = rng.choice(len(CLASS_SHARES), items, p=CLASS_SHARES)
    images = rng.integers(0, 256, (items, 32, 32, 3), dtype=np.uint8)
    started = time.perf_counter()
    out = resample_training_set(images, y, ResampleConfig(strategy="smote"), [str(k) for k in range(10)])
    seconds = time.perf_counter() - started
    assert out["synthetic"].sum() == len(out["y"]) - items > 0
    return seconds


def growth(small_n: int, large_n: int, small_s: float, large_s: float) -> dict:
    bound = 1.25 * (large_n / small_n) * math.log2(large_n) / math.log2(small_n)
    return {"small": small_n, "large": large_n, "small_s": round(small_s, 3), "large_s": round(large_s, 3),
            "growth": round(large_s / small_s, 3), "nlogn_bound": round(bound, 3),
            "per_million_items_s": round(large_s / large_n * 1e6, 3)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--groups", type=int, default=100_000)
    parser.add_argument("--smote", type=int, default=50_000)
    args = parser.parse_args()
    os.environ["MLPIPE_HOME"] = tempfile.mkdtemp(prefix="mlpipe-bench-")

    split_small = time_split(args.rows // 4, args.groups // 4)
    split_large = time_split(args.rows, args.groups)
    smote_small = time_smote(args.smote // 2)
    smote_large = time_smote(args.smote)
    split_fig = growth(args.rows // 4, args.rows, split_small, split_large)
    smote_fig = growth(args.smote // 2, args.smote, smote_small, smote_large)
    print(f"split  {split_fig['small']:>9,} rows: {split_small:7.2f} s   {split_fig['large']:>9,} rows: {split_large:7.2f} s   "
          f"growth {split_fig['growth']:.2f} (n log n bound {split_fig['nlogn_bound']:.2f})")
    print(f"smote  {smote_fig['small']:>9,} items: {smote_small:6.2f} s   {smote_fig['large']:>9,} items: {smote_large:6.2f} s   "
          f"growth {smote_fig['growth']:.2f} (n log n bound {smote_fig['nlogn_bound']:.2f})")
    ratio = max(split_fig["growth"] / split_fig["nlogn_bound"], smote_fig["growth"] / smote_fig["nlogn_bound"])
    print(json.dumps({"name": "split_resample", "ratio": round(ratio, 3), "goal": "<= 1 (growth within 1.25 x n log n)",
                      "split": split_fig, "smote": smote_fig, "groups": args.groups}))  # fmt: skip


if __name__ == "__main__":
    main()
