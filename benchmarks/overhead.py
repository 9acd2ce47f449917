"""Orchestration overhead: the share of a default run's wall time that is not stage compute.

    .venv/bin/python benchmarks/overhead.py

The default pipeline (embedded sample, default config) runs once in this process from an empty
state directory, started the way `mlpipe run` starts it: Prefect's temporary server and the new
local MLflow store come up in the background while the modules import, and only the wait for
them that is left after the imports counts (`startup_wait_s`; from their start to ready:
`startup_s`); the flow runs with `mlpipe run`'s settings (no heartbeats on the temporary server).

Every library call a task makes is timed (the embedded sample's files, written once by ingest's
cache key; ingest, anonymize, label, split, resample, train with its torchrun launch, search,
refit, evaluate); everything else inside the run is Prefect and MLflow: the startup wait, task
and state bookkeeping, cache keys (ingest's includes a stat of every source file) and lookups,
result persistence, MLflow runs, params, tags, reports, artifacts and the model registry, where
they hold up the flow (MLflow writes run in the background; the run waits for all of them at
its end). The trial workers' per-epoch MLflow batches happen inside the train launch and count
as compute. Goal: overhead / wall <= 0.03. Ends with one JSON line; ratio = overhead share.
"""

from __future__ import annotations

import functools
import json
import time

from _state import fresh_state

CALLS = {
    "mlpipe.ingest": ["materialize_sample"],  # the embedded sample's files, written once (in ingest's cache key)
    "tasks.ingest": ["ingest_snapshot"], "tasks.anonymize": ["anonymize_dataset"], "tasks.label": ["label_items"],
    "tasks.split": ["split_stratified_grouped"], "tasks.resample": ["resample_training_split"],
    "tasks.train": ["train_trials"], "tasks.search": ["select_winner"], "tasks.refit": ["refit_winner"],
    "tasks.evaluate": ["evaluate_on_test"],
}  # fmt: skip


def main() -> None:
    fresh_state("overhead")
    import importlib

    started = time.perf_counter()
    from flows.cli import prepare_in_background
    from flows.ephemeral import flow_run_settings

    ready = prepare_in_background()

    from flows.training_pipeline import training_pipeline
    from mlpipe.config import PipelineConfig

    spent: dict[str, float] = {}

    inside: list[str] = []  # a timed call within a timed call counts once, in the outer one

    def timed(name, fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            if inside:
                return fn(*args, **kwargs)
            inside.append(name)
            started = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent[name] = spent.get(name, 0.0) + time.perf_counter() - started
                inside.pop()

        return wrapper

    for module_name, names in CALLS.items():
        module = importlib.import_module(module_name)
        for name in names:
            setattr(module, name, timed(name, getattr(module, name)))
    imported = time.perf_counter()
    ready()
    prepared = time.perf_counter()
    startup, startup_wait = prepared - started, prepared - imported
    with flow_run_settings():
        state = training_pipeline(PipelineConfig(), return_state=True)
    wall = time.perf_counter() - imported
    assert state.is_completed(), state
    compute = sum(spent.values())
    overhead = wall - compute
    print(f"run wall {wall:.2f} s, stage compute {compute:.2f} s, Prefect + MLflow {overhead:.2f} s ({overhead / wall:.1%}); "
          f"of it waiting for the temporary Prefect server and the new MLflow store {startup_wait:.2f} s (they took "
          f"{startup:.2f} s, overlapped with the imports)")
    print("compute by call: " + ", ".join(f"{k} {v:.2f} s" for k, v in spent.items()))
    print(json.dumps({"name": "orchestration_overhead", "ratio": round(overhead / wall, 4), "goal": "<= 0.03",
                      "wall_s": round(wall, 2), "compute_s": round(compute, 2), "overhead_s": round(overhead, 2),
                      "startup_wait_s": round(startup_wait, 2), "startup_s": round(startup, 2),
                      "ratio_without_the_startup_wait": round((overhead - startup_wait) / (wall - startup_wait), 4),
                      "compute_by_call_s": {k: round(v, 2) for k, v in spent.items()}}))  # fmt: skip


if __name__ == "__main__":
    main()
