"""What every stage task does after the library call: record the stage in MLflow and Prefect."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from prefect import Task
from prefect.artifacts import create_markdown_artifact, create_progress_artifact, update_progress_artifact

from mlpipe import tracking
from mlpipe.store import StageResult
from mlpipe.tracking import RunRef


def publish(run: RunRef, result: StageResult, files: tuple[str, ...] = ()) -> StageResult:
    """`<stage>/report.json` and the stage's files into the MLflow run; a markdown summary into Prefect."""
    tracking.log_stage(run, result.stage, result.report, [result.file(f) for f in files])
    create_markdown_artifact(
        key=f"{result.stage}-report",
        markdown=_markdown(result),
        description=f"mlpipe {result.stage} report (MLflow run {run.run_id})",
    )
    return result


def _markdown(result: StageResult) -> str:
    lines = [f"# {result.stage}", "", "| key | value |", "|---|---|"]
    for key, value in result.report.items():
        text = json.dumps(value, default=str) if not isinstance(value, str) else value
        lines.append(f"| {key} | {text[:300].replace('|', '/')} |")
    return "\n".join(lines)


def training_progress() -> Callable[[float], None]:
    """A Prefect progress artifact for the train task, updated after every epoch."""
    artifact = create_progress_artifact(0.0, key="train-progress", description="planned training epochs done (%)")
    shown = [0.0]

    def update(fraction: float) -> None:  # one API call per 5 points: each costs a round trip
        percent = round(100.0 * fraction, 1)
        if percent >= 100.0 or percent - shown[0] >= 5.0:
            shown[0] = percent
            update_progress_artifact(artifact, percent)

    return update


def publish_trials(run: RunRef, trained: StageResult) -> None:
    """Each trial's report entry and checkpoint into its own MLflow child run, then close it."""
    for trial in trained.report["trials"]:
        child = trial["run_id"]
        checkpoints = [trained.file(trial["checkpoint"])] if trial["checkpoint"] else []  # kfold: no single model
        tracking.log_stage(run, "train", trial, checkpoints, run_id=child)
        if "fold_val_metrics" in trial:  # kfold: the trial's own metrics are the fold means
            tracking.log_metrics(run, trial["val_metrics"], run_id=child)
        if trial["history"]:  # reused from an earlier run: its curves into this run's child
            tracking.log_history(run, trial["history"], run_id=child)
        tracking.end_run(run, child)


def cached_stage(stage_task: Task, run: RunRef, *args: Any, files: tuple[str, ...] = ()) -> StageResult:
    """Run a cached stage task, then record it in this run whether it ran or came from the cache:
    a cache hit publishes the same report and files again, and is tagged as such."""
    state = stage_task(*args, return_state=True)
    result = state.result()
    tracking.set_tags(run, {f"mlpipe.cache.{result.stage}": "hit" if state.name == "Cached" else "miss"})
    return publish(run, result, files)
