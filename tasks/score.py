"""The scoring-pipeline's tasks: fetch the model, score the source, deliver the predictions."""

from __future__ import annotations

from pathlib import Path

import fsspec
import yaml
from prefect import task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from mlpipe import serving, tracking
from mlpipe.anonymize import load_key
from mlpipe.config import AnonymizeConfig, PipelineConfig, ScoringConfig
from mlpipe.scoring import check_same_key, metric_name, score_source, summary_lines
from mlpipe.store import StageResult, state_dir
from mlpipe.tracking import RunRef
from tasks.secrets import pseudonym_key


@task(name="fetch-model", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=5)
def fetch_model(model_uri: str, workdir: str, run: RunRef) -> dict:
    """Download the serving model; tag the scoring run with the version it scores with; read the
    anonymization policy of the run that trained it (its logged config.yaml)."""
    folder, meta, info = tracking.download_serving_model(model_uri, Path(workdir))
    training_run = info.get("training_run_id") or meta.run_id
    record = tracking.run_record(training_run)
    policy = PipelineConfig.model_validate(yaml.safe_load(record.config_yaml)).anonymize
    tracking.set_tags(run, {"mlpipe.model_uri": model_uri, "mlpipe.training_run_id": training_run,
                            "mlpipe.registered_model": f"{info.get('registered_model')}/{info.get('version')}"})  # fmt: skip
    return {"folder": str(folder), "training_run_id": training_run, "policy": policy.model_dump(mode="json"),
            "pseudonym_key_id": record.pseudonym_key_id, **info}  # fmt: skip


@task(name="score", cache_policy=NO_CACHE)
def score(model: dict, config: ScoringConfig, run: RunRef) -> StageResult:
    """Every row of the source through the model; counts, confidence and drift into MLflow."""
    policy = AnonymizeConfig.model_validate(model["policy"])
    key = pseudonym_key(policy) or load_key(policy)[0]
    check_same_key(key, model["pseudonym_key_id"])
    classifier = serving.load(model["folder"], batch_size=config.batch_size)
    scored = score_source(classifier, config.source, policy, key, config.drift_threshold, config.batch_size)
    report = scored.report
    drift = report["drift"] or {"psi": {}, "drifted": None}  # None: no image scored, nothing to compare
    tracking.log_stage(run, "scoring", report, [scored.file("confidence.png")])
    tracking.log_metrics(run, {"rows": report["rows"], "predicted": report["predicted"], "failed": report["failed"],
                               **{f"predicted_{metric_name(c)}": n for c, n in report["predicted_per_class"].items()},
                               **{f"psi_{name}": v for name, v in drift["psi"].items()},
                               **({"drifted": float(drift["drifted"])} if drift["drifted"] is not None else {})})  # fmt: skip
    tracking.set_tags(run, {"mlpipe.drift": {True: "drifted", False: "ok", None: "no-data"}[drift["drifted"]]})
    create_markdown_artifact(key="scoring-report", markdown="# Scoring\n\n" + "\n".join(f"- {line.strip()}"
                             for line in summary_lines(report)), description="Counts, failures and drift")  # fmt: skip
    return scored


@task(name="deliver", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=5)
def deliver(scored: StageResult, destination: str, run: RunRef) -> str:
    """Write predictions-<MLflow run id>.csv into `destination` (a folder path or fsspec URL;
    empty: <state dir>/scoring). Returns where it went."""
    folder = destination.rstrip("/") or str(state_dir() / "scoring")
    fs, path = fsspec.core.url_to_fs(folder)
    fs.makedirs(path, exist_ok=True)
    target = f"{folder}/predictions-{run.run_id}.csv"
    with fsspec.open(target, "wb") as out:
        out.write(scored.file("predictions.csv").read_bytes())
    return target
