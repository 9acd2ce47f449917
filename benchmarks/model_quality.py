"""Model quality: the default pipeline against the best classical baseline on the same split, over
a panel of datasets.

    .venv/bin/python benchmarks/model_quality.py [--only NAME ...] [--fast]

Each panel entry writes its dataset (`mlpipe.datasets`, seed 0) to a temporary folder and runs
`mlpipe run` on it in a process of its own, from an empty state directory (no cache answers),
with only the overrides the dataset needs: its `source.uri`, its `ingest.image_size` and, for
Fashion-MNIST, the taggers as `label.columns` and their anonymization policy (`FASHION_OVERRIDES`).
The entries:
- `digits-8`: the embedded sample as it is (8x8 scans), trained at 8 px;
- `digits-{16,32,64}-{nearest,bilinear}`: the sample's scans upscaled to that size, trained at it;
- `digits-long-tailed`: the rarest digit keeps 5% of its scans (the sample: 22%), at the default 16 px;
- `digits-noisy`: annotators who disagree on about 40% of items (the sample: 10%), at the default 16 px;
- `fashion-long-tailed-3000`, `fashion-balanced-10000`: real photos, Fashion-MNIST from Debian's
  `dataset-fashion-mnist` (/usr/share/datasets/fashion-mnist; `make system-packages` installs it), at 28 px.

The evaluate stage's report (`<state>/work/evaluate/<key>/report.json`) holds the deep model's
test macro-F1 and every classical baseline's, all on the same test split. ratio = deep test
macro-F1 / the best baseline's test macro-F1, where the best baseline is the one with the highest
*test* macro-F1 among those fitted. That is stricter than the pipeline's own choice
(`best_baseline`, picked on validation, also in each line as `val_chosen_baseline`): the deep model
must beat every baseline, including one that was lucky on the test set. A report without baselines
stops the benchmark with a one-line error.

Goal: ratio >= 1.00 on every entry and >= 1.03 on the Fashion-MNIST entries, each run (the `mlpipe
run` process, start to exit; writing the data not included) within 300 s on this 2-core machine.
One JSON line per entry (`name`, `ratio`, `goal`, `deep_macro_f1`, `baseline`,
`baseline_macro_f1`, `seconds`, `seconds_goal`, `met`, ...), then a summary line: ratio = the
lowest entry ratio, `met` per entry, `entries` (the entry lines), `total_s`. The whole panel takes
roughly 40-60 minutes on 2 cores (an estimate: 11 runs at up to 300 s).

`--fast` is a smoke test of this script, not a measurement: 1 epoch, 1 trial, Fashion-MNIST subsets
of 600 images; a report without baselines gives a null ratio there instead of stopping.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlpipe import datasets

ROOT = Path(__file__).resolve().parents[1]
SECONDS_GOAL = 300.0
FAST_OVERRIDES = {"train.epochs": 1, "search.grid": {}}
FAST_FASHION_IMAGES = 600


@dataclass(frozen=True)
class Entry:
    name: str
    data: str  # what the dataset is, in a few words
    write: Callable[[Path, bool], Path]  # (root, fast) -> dataset root
    overrides: dict[str, Any] = field(default_factory=dict)
    goal: float = 1.00


def _upscaled(size: int, resampling: str) -> Entry:
    name = "digits-8" if size == 8 else f"digits-{size}-{resampling}"
    data = "the embedded sample (8x8 scans)" if size == 8 else f"the sample upscaled to {size} px ({resampling})"
    return Entry(name, data, lambda root, fast: datasets.write_digits_upscaled(root, size, resampling),
                 {"ingest.image_size": size})  # fmt: skip


def _fashion(n: int, profile: str) -> Entry:
    label = profile.replace("_", "-")
    return Entry(f"fashion-{label}-{n}", f"Fashion-MNIST, {n:,} photos, {label.replace('-', ' ')}",
                 lambda root, fast: datasets.write_fashion_mnist(root, FAST_FASHION_IMAGES if fast else n, profile),
                 datasets.FASHION_OVERRIDES, goal=1.03)  # fmt: skip


PANEL = [
    _upscaled(8, "nearest"),
    *(_upscaled(size, resampling) for size in (16, 32, 64) for resampling in ("nearest", "bilinear")),
    Entry("digits-long-tailed", "the sample, rarest digit 5% of the largest",
          lambda root, fast: datasets.write_digits_long_tailed(root)),
    Entry("digits-noisy", "the sample, annotators disagreeing on ~40% of items",
          lambda root, fast: datasets.write_digits_noisy(root)),
    _fashion(3000, "long_tailed"),
    _fashion(10000, "balanced"),
]  # fmt: skip


def scores(report: dict, name: str, tolerate_missing: bool) -> dict[str, Any]:
    """Deep and baseline test macro-F1 from the evaluate report, and their ratio."""
    deep = float(report["metrics"]["test_macro_f1"])
    baselines = {k: float(v["test_macro_f1"]) for k, v in (report.get("baselines") or {}).items()}
    if not baselines:
        if not tolerate_missing:
            sys.exit(f"model_quality: {name}: the evaluate report has no classical baselines (report['baselines']): "
                     "nothing to compare the deep model with")
        print(f"warning: {name}: no baselines in the evaluate report (tolerated with --fast)", file=sys.stderr)
        return {"deep_macro_f1": round(deep, 4), "baseline": None, "baseline_macro_f1": None, "ratio": None,
                "baselines_test_macro_f1": {}, "val_chosen_baseline": None}  # fmt: skip
    best = max(baselines, key=lambda k: (baselines[k], k))
    return {"deep_macro_f1": round(deep, 4), "baseline": best, "baseline_macro_f1": round(baselines[best], 4),
            "ratio": round(deep / baselines[best], 4),
            "baselines_test_macro_f1": {k: round(v, 4) for k, v in baselines.items()},
            "val_chosen_baseline": report.get("best_baseline")}  # fmt: skip


def one_run(entry: Entry, fast: bool) -> dict[str, Any]:
    """The entry's dataset and one `mlpipe run` on it in a fresh state directory; its JSON line."""
    with tempfile.TemporaryDirectory(prefix=f"mlpipe-bench-quality-{entry.name}-") as tmp:
        tmp = Path(tmp)
        started = time.perf_counter()
        root = entry.write(tmp / "data", fast)
        write_s = time.perf_counter() - started
        overrides = {"source.uri": str(root), **entry.overrides, **(FAST_OVERRIDES if fast else {})}
        home = tmp / "state"
        env = {**os.environ, "MLPIPE_HOME": str(home), "PREFECT_LOCAL_STORAGE_PATH": str(home / "prefect-results"),
               "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "NO_ALBUMENTATIONS_UPDATE": "1"}  # fmt: skip
        env.pop("MLFLOW_TRACKING_URI", None)
        command = [sys.executable, "-m", "flows.cli", "run", *(f"--set={k}={json.dumps(v)}" for k, v in overrides.items())]
        started = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp)
        seconds = time.perf_counter() - started
        line = {"name": entry.name, "data": entry.data, "image_size": _image_size(overrides),
                "overrides": {k: v for k, v in overrides.items() if k != "source.uri"}}  # fmt: skip
        if done.returncode != 0:
            reason = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
            print(f"{entry.name}: mlpipe run failed (exit {done.returncode}); its log ends:\n"
                  + "\n".join((done.stdout + done.stderr).strip().splitlines()[-30:]), file=sys.stderr)  # fmt: skip
            return {**line, "ratio": None, "goal": entry.goal, "error": reason, "seconds": round(seconds, 1),
                    "seconds_goal": SECONDS_GOAL, "met": False}  # fmt: skip
        reports = sorted(home.glob("work/evaluate/*/report.json"))
        if len(reports) != 1:
            sys.exit(f"model_quality: {entry.name}: expected one evaluate report in {home / 'work/evaluate'}, found {len(reports)}")
        report = json.loads(reports[0].read_text())
        measured = scores(report, entry.name, tolerate_missing=fast)
    met = measured["ratio"] is not None and measured["ratio"] >= entry.goal and seconds <= SECONDS_GOAL
    return {**line, **measured, "goal": entry.goal, "seconds": round(seconds, 1), "seconds_goal": SECONDS_GOAL,
            "met": met, "test_items": report.get("test_items"), "write_s": round(write_s, 1)}  # fmt: skip


def _image_size(overrides: dict[str, Any]) -> int:
    from mlpipe.config import IngestConfig

    return int(overrides.get("ingest.image_size", IngestConfig().image_size))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--only", nargs="+", choices=[e.name for e in PANEL], metavar="NAME",
                        help=f"run these entries only: {', '.join(e.name for e in PANEL)}")  # fmt: skip
    parser.add_argument("--fast", action="store_true", help="smoke test: 1 epoch, 1 trial, 600 Fashion-MNIST images")
    args = parser.parse_args()
    chosen = [e for e in PANEL if not args.only or e.name in args.only]
    started, lines = time.perf_counter(), []
    for entry in chosen:
        print(f"running {entry.name}{' (fast)' if args.fast else ''}", file=sys.stderr, flush=True)
        lines.append({**one_run(entry, args.fast), **({"fast": True} if args.fast else {})})
        print(json.dumps(lines[-1]), flush=True)
    ratios = [line["ratio"] for line in lines if line["ratio"] is not None]
    print(json.dumps({"name": "model_quality", "ratio": min(ratios) if len(ratios) == len(lines) else None,
                      "goal": ">= 1.00 on every entry, >= 1.03 on Fashion-MNIST; each run <= 300 s",
                      "met": {line["name"]: line["met"] for line in lines}, "all_met": all(line["met"] for line in lines),
                      "total_s": round(time.perf_counter() - started, 1), "cpus": os.cpu_count(), "entries": lines,
                      **({"fast": True} if args.fast else {})}))  # fmt: skip
    sys.exit(1 if any("error" in line for line in lines) else 0)


if __name__ == "__main__":
    main()
