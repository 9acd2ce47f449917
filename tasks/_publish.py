"""What every stage task does after the library call: record the stage in MLflow and Prefect."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pandas as pd
from prefect import Task
from prefect.artifacts import create_markdown_artifact, create_progress_artifact, update_progress_artifact

from mlpipe import tracking
from mlpipe.anonymize import ITEM_ID
from mlpipe.config import Trial
from mlpipe.label import LABEL
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


def publish_trials(run: RunRef, trained: StageResult, trials: list[Trial], validation: tuple[str, str] | None) -> None:
    """Each trial's report entry and checkpoint into its own MLflow child run, with `best_<metric>`
    (the epoch that early stopping kept and the search ranks on; linked to the `validation`
    dataset) and `best_epoch`, and a description; then end it when its training ended. A trial
    reused from an earlier run gets a new run here, tagged `mlpipe.reused`, and the report its id.
    Any child run still open after that is ended, so that none is left RUNNING."""
    params = {t.name: t.flat_params() for t in trials}
    for trial in trained.report["trials"]:
        if trial["run_id"] is None:  # this run's worker started none (reused), or another run finished the trial
            trial["run_id"] = tracking.child_run(run.tracking_uri, run.experiment_id, run.run_id, trial["trial"],
                                                 params[trial["trial"]], {"mlpipe.reused": str(trial["cached"]).lower()},
                                                 reuse=True)  # fmt: skip
        child = trial["run_id"]
        checkpoints = [trained.file(trial["checkpoint"])] if trial["checkpoint"] else []  # kfold: no single model
        tracking.log_stage(run, "train", trial, checkpoints, run_id=child)
        if "fold_val_metrics" in trial:  # kfold: the trial's own metrics are the fold means
            tracking.log_metrics(run, trial["val_metrics"], run_id=child)
        if trial["history"]:  # reused from an earlier run: its curves into this run's child
            tracking.log_history(run, trial["history"], run_id=child)
        tracking.log_metrics(run, {f"best_{k}": v for k, v in trial["val_metrics"].items()}, run_id=child,
                             dataset=validation)  # fmt: skip
        tracking.log_metrics(run, {"best_epoch": trial["best_epoch"], "epochs_run": trial["epochs_run"]}, run_id=child)
        tracking.set_description(run, trial_description(trial), run_id=child)
        tracking.end_run(run, child, end_time_ms=trial.get("ended_ms"))
    published = {t["run_id"] for t in trained.report["trials"]}
    for stray in set(tracking.running_children(run)) - published:  # e.g. a halving rung another run finished
        tracking.end_run(run, stray)


def trial_description(trial: dict) -> str:
    """A trial run's description: its grid point and how its training went."""
    grid = ", ".join(f"`{k}={v}`" for k, v in trial["params"].items()) or "the base config"
    metric = trial["val_metrics"].get("val_macro_f1")
    score = f"validation macro-F1 {metric:.4f}" if metric is not None else "no validation score"
    how = "reused from an earlier run (same data, config and code)" if trial["cached"] else \
        f"trained for {trial['seconds']:.1f} s on {trial['device']} x{trial['world_size']}"
    stop = ", stopped early" if trial.get("stopped_early") else ""
    return (f"Grid point {grid}. Best epoch {trial['best_epoch']} of {trial['epochs_run']}{stop}: {score}; {how}. "
            "The `best_*` metrics are that epoch's, the ones the search ranks trials on.")


def dataset_links(splits: StageResult) -> dict[str, tuple[str, str]]:
    """split name -> (MLflow dataset name, digest) of the split stage's datasets (`log_splits`)."""
    return tracking.dataset_links(split_frames(splits))


def split_frames(splits: StageResult) -> dict[str, pd.DataFrame]:
    """Each split's anonymized rows (item id, label), in the split stage's order."""
    table = pd.read_parquet(splits.file("manifest.parquet"), columns=[ITEM_ID, LABEL, "split"])
    return {name: part[[ITEM_ID, LABEL]].reset_index(drop=True) for name, part in table.groupby("split", sort=False)}


def log_splits(run: RunRef, splits: StageResult) -> None:
    """The splits as MLflow datasets of the run, their source the split stage's own table."""
    tracking.log_split_datasets(run, split_frames(splits), f"runs:/{run.run_id}/{splits.stage}/manifest.parquet")


def cached_stage(stage_task: Task, run: RunRef, *args: Any, files: tuple[str, ...] = ()) -> StageResult:
    """Run a cached stage task, then record it in this run whether it ran or came from the cache:
    a cache hit publishes the same report and files again, and is tagged as such."""
    state = stage_task(*args, return_state=True)
    result = state.result()
    tracking.set_tags(run, {f"mlpipe.cache.{result.stage}": "hit" if state.name == "Cached" else "miss"})
    return publish(run, result, files)
