"""The train stage: every trial of the grid, trained by one torchrun launch of `mlpipe.train.worker`.

The caller creates an MLflow child run per trial and passes the ids in; rank 0 of the worker
logs per-epoch metrics into them. The worker reads only training and validation data.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections import deque
from collections.abc import Callable
from pathlib import Path

import torch

from mlpipe.config import TrainConfig, Trial
from mlpipe.errors import MlpipeError
from mlpipe.resample import training_set_for
from mlpipe.split import class_names
from mlpipe.store import StageResult, code_version, stable_hash, stage_dir, write_json
from mlpipe.train.spec import TrialResult, TrialSpec, WorkerSpec

log = logging.getLogger(__name__)


def uses_cuda(cfg: TrainConfig) -> bool:
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise MlpipeError("train.device is cuda but no CUDA device is available")
    return cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())


def resolve_nproc(cfg: TrainConfig) -> int:
    """`auto`: one process per visible GPU, or one CPU process."""
    if cfg.nproc != "auto":
        return cfg.nproc
    return max(1, torch.cuda.device_count()) if uses_cuda(cfg) else 1


def torchrun_command(spec_path: Path, nproc: int, max_restarts: int) -> list[str]:
    return [
        sys.executable, "-m", "torch.distributed.run",
        "--standalone",  # local rendezvous on a free port: parallel jobs never collide
        f"--nproc-per-node={nproc}",
        f"--max-restarts={max_restarts}",
        "-m", "mlpipe.train.worker", "--spec", str(spec_path),
    ]  # fmt: skip


def launch(
    spec_path: Path, nproc: int, max_restarts: int, log_path: Path, cpu: bool,
    on_trial_done: Callable[[str], None] | None = None,
) -> None:  # fmt: skip
    """Run torchrun, stream rank 0's progress to the log, fail with the last error line."""
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "PYTHONUNBUFFERED": "1"}
    if cpu:  # share the cores instead of oversubscribing them nproc times
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // nproc))
    tail: deque[str] = deque(maxlen=40)
    with open(log_path, "w", encoding="utf-8") as sink:
        proc = subprocess.Popen(
            torchrun_command(spec_path, nproc, max_restarts),
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
        )  # fmt: skip
        for line in proc.stdout:
            sink.write(line)
            tail.append(line.rstrip())
            if line.startswith("[trial-"):
                log.info(line.rstrip())
                if on_trial_done is not None:
                    on_trial_done(line[1 : line.index("]")])
        code = proc.wait()
    if code != 0:
        errors = [t for t in tail if "Error" in t or "error" in t] or list(tail) or ["no output"]
        raise MlpipeError(f"training failed (torchrun exit code {code}): {errors[-1].strip()}")


def train(
    splits: StageResult,
    resampled: StageResult,
    trials: list[Trial],
    run_ids: dict[str, str],
    tracking_uri: str | None,
    on_trial_done: Callable[[str], None] | None = None,
) -> StageResult:
    """Train all trials; returns a report with one entry per trial (validation metrics only).

    `on_trial_done(name)` is called as each trial finishes, for progress reporting.
    """
    key = stable_hash(splits.key, resampled.key, [t.model_dump() for t in trials], code_version("mlpipe.train"))[:16]
    num_classes = len(class_names(splits))
    results: list[dict] = []
    with stage_dir("train", key) as out:
        groups: dict[tuple[bool, int, int], list[Trial]] = {}
        for trial in trials:  # one launch per (device, nproc, restarts) combination; usually one
            groups.setdefault((uses_cuda(trial.train), resolve_nproc(trial.train), trial.train.max_restarts), []).append(trial)
        for n, ((cuda, nproc, restarts), members) in enumerate(groups.items()):
            spec = WorkerSpec(
                pixels=str(splits.file("pixels")),
                val_set=str(splits.file("val.npz")),
                num_classes=num_classes,
                tracking_uri=tracking_uri,
                trials=[_trial_spec(t, resampled, out, run_ids.get(t.name)) for t in members],
            )
            spec_path = write_json(out / f"launch-{n}.json", spec.model_dump())
            launch(spec_path, nproc, restarts, out / f"launch-{n}.log", cpu=not cuda, on_trial_done=on_trial_done)
        for trial in trials:
            result = TrialResult.model_validate_json((out / trial.name / "result.json").read_text())
            results.append({
                "trial": trial.name,
                "params": trial.params,
                "run_id": run_ids.get(trial.name),
                **result.model_dump(exclude={"history", "checkpoint"}),
                "checkpoint": f"{trial.name}/checkpoint.pt",
            })
        report = {"trials": results, "num_classes": num_classes}
        write_json(out / "report.json", report)
    return StageResult.at("train", key, report, pixels=splits.file("pixels"))


def _trial_spec(trial: Trial, resampled: StageResult, out: Path, run_id: str | None) -> TrialSpec:
    trial_dir = out / trial.name
    trial_dir.mkdir()
    return TrialSpec(
        name=trial.name, train=trial.train, train_set=training_set_for(resampled, trial), out_dir=str(trial_dir), run_id=run_id
    )
