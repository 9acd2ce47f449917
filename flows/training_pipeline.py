"""The pipeline as a Prefect flow: eight stages, one MLflow parent run."""

from __future__ import annotations

from prefect import flow
from prefect.runtime import flow_run

from mlpipe.config import PipelineConfig
from tasks import account, anonymize, evaluate, ingest, label, pipeline_run, refit, resample, search, split, train
from tasks.ingest import decide_auto
from tasks.run import end_mlflow_runs


@flow(
    name="training-pipeline",
    log_prints=True,
    on_failure=[end_mlflow_runs("FAILED")],
    on_crashed=[end_mlflow_runs("KILLED")],
    on_cancellation=[end_mlflow_runs("KILLED")],
)
def training_pipeline(config: PipelineConfig = PipelineConfig()) -> dict:  # noqa: B008 (pydantic default is the UI form)
    config = decide_auto(config)  # auto values from a sample of the data, recorded decided
    with pipeline_run(config) as run:
        snapshot = ingest(config.source, config.ingest, run)
        dataset = anonymize(snapshot, config.anonymize, config.source, run)
        labelled = label(dataset, config.label, run)
        splits = split(labelled, config.split, run)
        trials = config.trials()
        training_sets = resample(splits, trials, run)
        trained = train(splits, training_sets, trials, config.search, run)
        best = search(trained, config.search, run)
        final = refit(best, splits, trials, config.search, run)
        outcome = evaluate(final, splits, config.evaluate, config.ingest, run)
        accounting = account(snapshot, dataset, labelled, splits, trials, final, run)
    return {"flow_run_id": str(flow_run.id), **run.model_dump(), **outcome, "accounting": accounting}
