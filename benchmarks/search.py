"""Successive halving against the full grid on sample://digits.

    .venv/bin/python benchmarks/search.py [--epochs 9] [--factor 3]

The same 9-trial grid (train.lr x resample.strategy) is trained twice from scratch in separate
state folders: every trial for `epochs`, and by successive halving (min 1 epoch, x factor per
rung, best 1/factor continue from their checkpoints). Reported: compute in trial-epochs and wall
time of the train stage, both winners, and whether the halving winner is the grid winner or lies
inside the grid winner's 95% bootstrap interval of validation macro-F1.

Then the full grid once more with `search.max_parallel: 2` (two torchrun launches side by side,
one CPU thread each, dealt trials round-robin) against the sequential grid run above (one launch,
two threads): the wall ratio of the train stage, its winner, and the largest gap in any trial's
validation macro-F1 (one thread against two changes the order of float sums, so the figures differ
in the last digits and, over 9 epochs, sometimes by a validation item; under equal thread counts
they are identical, which tests/unit/test_search.py asserts).

Goal: compute ratio (halving / grid trial-epochs) <= 0.35 with the same winner or one within the
interval. Ends with one JSON line; ratio = the compute ratio; parallel_wall_ratio is reported beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

GRID = {"train.lr": [0.0003, 0.003, 0.01], "resample.strategy": ["none", "random_over", "class_weight"]}


def run(strategy: str, epochs: int, factor: int, home: Path, max_parallel: int = 1) -> dict:
    os.environ["MLPIPE_HOME"] = str(home)
    from mlpipe.anonymize import anonymize
    from mlpipe.config import PipelineConfig
    from mlpipe.ingest import ingest
    from mlpipe.label import label
    from mlpipe.resample import resample
    from mlpipe.sample import write_sample_digits
    from mlpipe.search import search
    from mlpipe.split import split
    from mlpipe.train.launch import train

    config = PipelineConfig().with_overrides({
        "source.uri": str(write_sample_digits(home / "digits")), "train.epochs": epochs, "train.nproc": 1,
        "train.patience": epochs, "search.grid": GRID, "search.strategy": strategy,
        "search.halving_factor": factor, "search.min_epochs": 1, "search.max_parallel": max_parallel,
    })  # fmt: skip
    splits = split(label(anonymize(ingest(config.source, config.ingest), config.anonymize, config.source), config.label),
                   config.split)  # fmt: skip
    trials = config.trials()
    resampled = resample(splits, trials)
    started = time.perf_counter()
    trained = train(splits, resampled, trials, {}, None, search=config.search)
    seconds = time.perf_counter() - started
    best = search(trained, config.search)
    return {"trained": trained, "best": best, "splits": splits, "seconds": seconds}


def winner_interval(result: dict) -> list[float]:
    """95% bootstrap interval of the grid winner's validation macro-F1."""
    import numpy as np

    from mlpipe.evaluate import predict_proba
    from mlpipe.metrics import bootstrap_ci
    from mlpipe.split import load_split
    from mlpipe.train.model import load_checkpoint

    images, y = load_split(result["splits"], "val")
    pred = predict_proba(load_checkpoint(result["best"].file("checkpoint")), images).argmax(axis=1)
    return bootstrap_ci(y, pred, int(np.max(y)) + 1)["test_macro_f1"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=9)
    parser.add_argument("--factor", type=int, default=3)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="mlpipe-bench-search-"))
    grid = run("grid", args.epochs, args.factor, root / "grid")
    halving = run("halving", args.epochs, args.factor, root / "halving")
    parallel = run("grid", args.epochs, args.factor, root / "parallel", max_parallel=2)
    grid_scores = {t["trial"]: t["val_metrics"]["val_macro_f1"] for t in grid["trained"].report["trials"]}
    parallel_scores = {t["trial"]: t["val_metrics"]["val_macro_f1"] for t in parallel["trained"].report["trials"]}
    f1_gap = max(abs(parallel_scores[name] - score) for name, score in grid_scores.items())
    low, high = winner_interval(grid)
    grid_winner, halving_winner = grid["best"].report["winner"], halving["best"].report["winner"]
    inside = low <= grid_scores[halving_winner] <= high
    compute = halving["trained"].report["trial_epochs"] / grid["trained"].report["trial_epochs"]
    print(f"grid:    {grid['trained'].report['trial_epochs']} trial-epochs, {grid['seconds']:.1f} s, winner {grid_winner} "
          f"(val macro-F1 {grid_scores[grid_winner]:.4f}, 95% CI {low:.4f}-{high:.4f})")
    print(f"halving: {halving['trained'].report['trial_epochs']} trial-epochs, {halving['seconds']:.1f} s, winner {halving_winner} "
          f"(its full-grid val macro-F1 {grid_scores[halving_winner]:.4f}; inside the CI: {inside})")
    print(f"parallel grid (max_parallel 2): {parallel['seconds']:.1f} s against {grid['seconds']:.1f} s sequential; "
          f"winner {parallel['best'].report['winner']}, largest val macro-F1 gap to the sequential run {f1_gap:.4f}")
    print(json.dumps({
        "name": "search_halving", "ratio": round(compute, 3), "goal": "<= 0.35, same winner or within its CI",
        "grid_trial_epochs": grid["trained"].report["trial_epochs"],
        "halving_trial_epochs": halving["trained"].report["trial_epochs"],
        "wall_ratio": round(halving["seconds"] / grid["seconds"], 3),
        "grid_s": round(grid["seconds"], 1), "halving_s": round(halving["seconds"], 1),
        "same_winner": grid_winner == halving_winner, "within_ci": inside,
        "parallel_wall_ratio": round(parallel["seconds"] / grid["seconds"], 3), "parallel_s": round(parallel["seconds"], 1),
        "parallel_winner": parallel["best"].report["winner"], "parallel_max_f1_gap": round(f1_gap, 4),
        "grid_winner": grid_winner, "halving_winner": halving_winner, "rungs": halving["trained"].report["rungs"],
    }))  # fmt: skip


if __name__ == "__main__":
    main()
