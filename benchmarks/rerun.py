"""A parameterized rerun against the first run: how long the upstream stages take when only
the learning rate changes.

    .venv/bin/python benchmarks/rerun.py

Two flow runs in one fresh state directory on the embedded sample, in this process (Prefect's
temporary server, a local MLflow store): the first with `search.grid: {train.lr: [0.003]}`, the
second with `{train.lr: [0.01]}`. Read from the Prefect API:
- stage time: the five data stages' task runs (ingest, anonymize, label, split, resample), start
  to end, summed: the stage work, or on the rerun the cache key and lookup;
- window: from the start of the ingest task run to the start of the train task run, which adds
  what the flow does between the tasks: each stage's MLflow record (report, files, tags) and
  Prefect artifact, written again on a cache hit so every run holds every stage's artifacts.
Goal: rerun / first <= 0.05. Ends with one JSON line; ratio = the stage-time ratio; the window
ratio is beside it.
"""

from __future__ import annotations

import json

from _state import fresh_state

DATA_STAGES = ["ingest", "anonymize", "label", "split", "resample"]


def upstream(state) -> tuple[float, float, dict[str, str]]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id])))
    by_stage = {r.name.rsplit("-", 1)[0]: r for r in runs}
    window = (by_stage["train"].start_time - by_stage["ingest"].start_time).total_seconds()
    stages = sum((by_stage[s].end_time - by_stage[s].start_time).total_seconds() for s in DATA_STAGES)
    return stages, window, {s: by_stage[s].state.name for s in DATA_STAGES}


def main() -> None:
    fresh_state("rerun")
    from flows.training_pipeline import training_pipeline
    from mlpipe.config import PipelineConfig

    base = {"train.epochs": 2, "train.nproc": 1}
    first = training_pipeline(PipelineConfig().with_overrides({**base, "search.grid": {"train.lr": [0.003]}}), return_state=True)
    rerun = training_pipeline(PipelineConfig().with_overrides({**base, "search.grid": {"train.lr": [0.01]}}), return_state=True)
    assert first.is_completed() and rerun.is_completed()
    (first_s, first_w, first_states), (rerun_s, rerun_w, rerun_states) = upstream(first), upstream(rerun)
    print(f"first run: data stages {first_s:.3f} s, window {first_w:.3f} s {first_states}")
    print(f"rerun (train.lr changed): data stages {rerun_s:.3f} s, window {rerun_w:.3f} s {rerun_states}")
    print(json.dumps({"name": "rerun_upstream", "ratio": round(rerun_s / first_s, 4), "goal": "<= 0.05",
                      "first_stages_s": round(first_s, 3), "rerun_stages_s": round(rerun_s, 3),
                      "window_ratio": round(rerun_w / first_w, 4), "first_window_s": round(first_w, 3),
                      "rerun_window_s": round(rerun_w, 3), "rerun_states": rerun_states}))  # fmt: skip

if __name__ == "__main__":
    main()
