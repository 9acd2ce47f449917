"""Parameterized reruns take unchanged stages from Prefect's cache, across flow runs, and say why
a stage ran again. Checked through the Prefect API, as the UI shows it."""

import json
import shutil
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, LogFilter, LogFilterFlowRunId

from mlpipe import tracking
from mlpipe.config import PipelineConfig

pytestmark = pytest.mark.slow
DATA_STAGES = ["ingest", "anonymize", "label", "split", "resample"]
FAST = {"train.epochs": 1, "train.nproc": 1, "search.grid": {"train.lr": [0.003]}, "evaluate.bootstrap_resamples": 100}


def _run(overrides: dict) -> tuple[dict[str, str], str]:
    """(task name -> state name, the run's log text) of one flow run; its summary in `_run.summary`."""
    from flows.training_pipeline import training_pipeline

    state = training_pipeline(PipelineConfig().with_overrides({**FAST, **overrides}), return_state=True)
    assert state.is_completed()
    _run.summary = state.result()
    flow_run_id = state.state_details.flow_run_id
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
        logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
    return {r.name.rsplit("-", 1)[0]: r.state.name for r in runs}, "\n".join(log.message for log in logs)


def test_reruns_take_unchanged_stages_from_the_cache_and_name_what_changed(harness, state):
    first, _ = _run({})
    assert [first[s] for s in DATA_STAGES] == ["Completed"] * 5

    new_lr, _ = _run({"search.grid": {"train.lr": [0.01]}})  # training parameters only
    assert [new_lr[s] for s in DATA_STAGES] == ["Cached"] * 5
    assert new_lr["train"] == "Completed"

    policy, log = _run({"anonymize.k": 3})  # the anonymization policy: it and everything downstream run again
    assert [policy[s] for s in DATA_STAGES] == ["Cached", "Completed", "Completed", "Completed", "Completed"]
    assert "anonymize: not cached, config changed: config.k" in log
    assert "label: not cached, inputs changed: dataset" in log

    shutil.rmtree(state / "work" / "split")  # someone cleaned the work folder, not Prefect's results
    cleaned, log = _run({"anonymize.k": 3})
    assert cleaned["label"] == "Cached" and cleaned["split"] == "Completed"
    assert "split: cached result's folder is gone; computing it again" in log
    # The same split again: the trial is reused, and gets a finished MLflow run of its own in this run.
    client = MlflowClient(tracking.tracking_uri())
    parent = _run.summary["run_id"]
    trials = json.loads(Path(client.download_artifacts(parent, "train/report.json", str(state))).read_text())["trials"]
    assert [t["cached"] for t in trials] == [True] and trials[0]["run_id"]
    reused = client.get_run(trials[0]["run_id"])
    assert reused.data.tags["mlflow.parentRunId"] == parent and reused.data.tags["mlpipe.reused"] == "true"
    assert reused.info.status == "FINISHED" and "reused from an earlier run" in reused.data.tags["mlflow.note.content"]

