import tempfile
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run

from mlpipe import tracking
from mlpipe.config import EvaluateConfig, IngestConfig
from mlpipe.evaluate import artifact_files, per_class_metrics, run_description
from mlpipe.evaluate import evaluate as evaluate_on_test
from mlpipe.serving import Preprocessing
from mlpipe.store import StageResult
from mlpipe.tracking import RunRef
from tasks._publish import dataset_links, publish


@task(name="evaluate", cache_policy=NO_CACHE)
def evaluate(best: StageResult, splits: StageResult, config: EvaluateConfig, ingest: IngestConfig, run: RunRef) -> dict:
    """The winner (and the current champion) on the test set, once; register the serving model
    (with `ingest`'s preprocessing); the registry gate."""
    with tempfile.TemporaryDirectory() as scratch:
        champion = tracking.champion(run, config.registered_model_name, Path(scratch))
        links = {"MLflow run": f"{run.tracking_uri} run {run.run_id}", "Prefect flow run": str(flow_run.id)}
        result, _ = evaluate_on_test(best, splits, config, champion, links, Preprocessing.of(ingest))
    report = result.report
    publish(run, result, files=artifact_files(report))
    tracking.log_metrics(run, report["baseline_metrics"])
    registered = register(run, result, splits, config.registered_model_name)
    tracking.record_gate(run, config.registered_model_name, registered["version"], report["gate"])
    tracking.set_description(run, run_description(report, registered))
    return {"metrics": report["metrics"], "gate": report["gate"]["decision"], **registered,
            "registered_as": report["gate"]["registered"]["model"], "best_baseline": report["best_baseline"],
            "baselines": {name: {k: v for k, v in entry.items() if k.startswith("test_")}
                          for name, entry in report["baselines"].items()}}  # fmt: skip


def register(run: RunRef, result: StageResult, splits: StageResult, registered_name: str) -> dict:
    """Log and register the serving model (its card as the version's description), then the test
    metrics, linked to the test dataset and to that model: MLflow shows them on both. Should
    registering fail, the run still gets the test metrics it measured."""
    report = result.report
    test_metrics, test_set = {**report["metrics"], **per_class_metrics(report)}, dataset_links(splits).get("test")
    card = result.file("model_card.md").read_text(encoding="utf-8")
    try:
        registered = tracking.log_model(run, result.file("serving"), registered_name, result.file("checkpoint"),
                                        report["class_names"], description=card)  # fmt: skip
    except BaseException:
        tracking.log_metrics(run, test_metrics, dataset=test_set)
        raise
    tracking.log_metrics(run, test_metrics, dataset=test_set, model_id=registered["model_id"])
    return registered
