import tempfile
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run

from mlpipe import tracking
from mlpipe.config import EvaluateConfig, IngestConfig
from mlpipe.evaluate import artifact_files
from mlpipe.evaluate import evaluate as evaluate_on_test
from mlpipe.serving import Preprocessing
from mlpipe.store import StageResult
from mlpipe.tracking import RunRef
from tasks._publish import publish


@task(name="evaluate", cache_policy=NO_CACHE)
def evaluate(best: StageResult, splits: StageResult, config: EvaluateConfig, ingest: IngestConfig, run: RunRef) -> dict:
    """The winner (and the current champion) on the test set, once; register the serving model
    (with `ingest`'s preprocessing); the registry gate."""
    with tempfile.TemporaryDirectory() as scratch:
        champion = tracking.champion(run, config.registered_model_name, Path(scratch))
        links = {"MLflow run": f"{run.tracking_uri} run {run.run_id}", "Prefect flow run": str(flow_run.id)}
        result, _ = evaluate_on_test(best, splits, config, champion, links, Preprocessing.of(ingest))
    report = result.report
    tracking.log_metrics(run, {**report["metrics"], **report["baseline_metrics"]})
    publish(run, result, files=artifact_files(report))
    registered = tracking.log_model(run, result.file("serving"), config.registered_model_name,
                                    result.file("checkpoint"), report["class_names"])  # fmt: skip
    tracking.record_gate(run, config.registered_model_name, registered["version"], report["gate"])
    return {"metrics": report["metrics"], "gate": report["gate"]["decision"], **registered,
            "registered_as": report["gate"]["registered"]["model"], "best_baseline": report["best_baseline"],
            "baselines": {name: {k: v for k, v in entry.items() if k.startswith("test_")}
                          for name, entry in report["baselines"].items()}}  # fmt: skip
