"""The pipeline as users deploy it: `prefect deploy` from prefect.yaml onto a real Prefect server,
a process worker, and an MLflow tracking server on PostgreSQL, all on 127.0.0.1."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlparse

import mlflow
import pytest
from mlflow.tracking import MlflowClient
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
from prefect.deployments import run_deployment
from prefect.settings import PREFECT_API_URL, temporary_settings

from tests.servers import S3_ACCESS_VARS, ArtifactStore

pytestmark = pytest.mark.slow
CHANGED = {"experiment": "deployed", "train": {"epochs": 2, "nproc": 1}, "search": {"grid": {"train.lr": [0.004]}},
           "evaluate": {"bootstrap_resamples": 100}}  # fmt: skip


def test_deployments_carry_their_schedules_and_the_config_form(prefect_stack):
    with temporary_settings({PREFECT_API_URL: prefect_stack.api_url}), get_client(sync_client=True) as client:
        nightly = client.read_deployment_by_name("training-pipeline/nightly")
        manual = client.read_deployment_by_name("training-pipeline/manual")
    assert [s.schedule.cron for s in nightly.schedules] == ["0 2 * * *"]
    assert nightly.schedules[0].schedule.timezone == "Europe/Berlin"
    assert manual.schedules == [] and manual.work_pool_name == nightly.work_pool_name == "mlpipe-process"
    with temporary_settings({PREFECT_API_URL: prefect_stack.api_url}), get_client(sync_client=True) as client:
        scoring = client.read_deployment_by_name("scoring-pipeline/scoring-nightly")
        assert client.read_deployment_by_name("scoring-pipeline/scoring-manual").schedules == []
    assert [s.schedule.cron for s in scoring.schedules] == ["0 4 * * *"]
    assert "drift_threshold" in scoring.parameter_openapi_schema["definitions"]["ScoringConfig"]["properties"]
    schema = manual.parameter_openapi_schema
    train = schema["definitions"]["TrainConfig"]["properties"]
    assert train["lr"]["exclusiveMinimum"] == 0 and "description" in train["lr"]
    assert set(train["optimizer"]["enum"]) >= {"sgd", "adam", "adamw"}  # a dropdown in the form


def test_a_manual_run_with_changed_parameters_completes_on_the_worker_and_logs_to_mlflow_on_postgres(
    prefect_stack, mlflow_server, artifact_store, tmp_path
):
    with temporary_settings({PREFECT_API_URL: prefect_stack.api_url}):
        flow_run = run_deployment("training-pipeline/manual", parameters={"config": CHANGED}, timeout=900)
    assert flow_run.state.is_completed(), flow_run.state
    client = MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name("deployed")
    (parent,) = client.search_runs([experiment.experiment_id], f"tags.`prefect.flow_run_id` = '{flow_run.id}'")
    assert parent.info.status == "FINISHED"
    assert parent.data.params["train.epochs"] == "2" and parent.data.params["search.grid"] == '{"train.lr": [0.004]}'
    assert parent.data.tags["prefect.deployment"] == "manual" and parent.data.tags["mlpipe.trigger"] == "api"
    assert parent.data.tags["prefect.flow_run_url"].startswith(prefect_stack.ui_url)
    paths = {a.path for a in client.list_artifacts(parent.info.run_id, "split")}
    assert "split/report.json" in paths  # uploaded through the server's artifact proxy

    # The proxy stores them in the S3 bucket; the worker had no S3 credentials or endpoint.
    assert not set(S3_ACCESS_VARS) & set(prefect_stack.env)
    assert parent.info.artifact_uri.startswith("mlflow-artifacts:")  # clients never see the s3:// destination
    run_keys = _objects(artifact_store, parent.info.artifact_uri)
    assert {"config.yaml", "split/report.json", "evaluate/report.json", "evaluate/model_card.md"} <= set(run_keys)
    assert any(k.startswith("model_checkpoint/") for k in run_keys)
    model = client.get_logged_model(parent.data.tags["mlpipe.model_uri"].removeprefix("models:/"))
    assert {"MLmodel", "data/serving/checkpoint.pt", "data/serving/serving.json", "requirements.txt"} <= set(
        _objects(artifact_store, model.artifact_location))  # the pyfunc serving model, through the proxy too
    downloaded = mlflow.artifacts.download_artifacts(run_id=parent.info.run_id, artifact_path="evaluate/model_card.md",
                                                     dst_path=str(tmp_path), tracking_uri=mlflow_server)  # fmt: skip
    body = artifact_store.client().get_object(Bucket=artifact_store.bucket, Key=run_keys["evaluate/model_card.md"])
    assert Path(downloaded).read_bytes() == body["Body"].read() != b""

    rerun_config = {**CHANGED, "search": {"grid": {"train.lr": [0.008]}}}  # a rerun that changes the learning rate only
    with temporary_settings({PREFECT_API_URL: prefect_stack.api_url}):
        rerun = run_deployment("training-pipeline/manual", parameters={"config": rerun_config}, timeout=900)
        with get_client(sync_client=True) as prefect:
            runs = prefect.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[rerun.id])))
    assert rerun.state.is_completed(), rerun.state
    states = {r.name.rsplit("-", 1)[0]: r.state.name for r in runs}
    assert [states[s] for s in ("ingest", "anonymize", "label", "split", "resample")] == ["Cached"] * 5
    assert states["train"] == "Completed"
    (second,) = client.search_runs([experiment.experiment_id], f"tags.`prefect.flow_run_id` = '{rerun.id}'")
    assert second.data.tags["mlpipe.previous_run_id"] == parent.info.run_id

    # The scoring deployment on the same worker: the registered version scores the sample, its run links the version.
    registered = parent.data.tags["mlpipe.registered_model"]
    scoring_config = {"model": f"models:/{registered}", "destination": str(tmp_path / "scored")}
    with temporary_settings({PREFECT_API_URL: prefect_stack.api_url}):
        scored = run_deployment("scoring-pipeline/scoring-manual", parameters={"config": scoring_config}, timeout=600)
    assert scored.state.is_completed(), scored.state
    (scoring_run,) = client.search_runs([client.get_experiment_by_name("mlpipe-scoring").experiment_id],
                                        f"tags.`prefect.flow_run_id` = '{scored.id}'")  # fmt: skip
    assert scoring_run.data.tags["mlpipe.registered_model"] == registered
    assert scoring_run.data.tags["mlpipe.training_run_id"] == parent.info.run_id
    (written,) = (tmp_path / "scored").glob("predictions-*.csv")
    assert len(written.read_text().splitlines()) - 1 == scoring_run.data.metrics["rows"] > 1000


def _objects(store: ArtifactStore, artifact_uri: str) -> dict[str, str]:
    """The bucket's objects under an `mlflow-artifacts:` URI, by path relative to it -> full key."""
    prefix = f"{store.prefix}/{urlparse(artifact_uri).path.strip('/')}/"
    pages = store.client().get_paginator("list_objects_v2").paginate(Bucket=store.bucket, Prefix=prefix)
    return {o["Key"].removeprefix(prefix): o["Key"] for page in pages for o in page.get("Contents", [])}


def test_an_invalid_parameter_is_refused_before_anything_runs_naming_the_field(prefect_stack):
    with temporary_settings({PREFECT_API_URL: prefect_stack.api_url}), get_client(sync_client=True) as client:
        manual = client.read_deployment_by_name("training-pipeline/manual")
        with pytest.raises(Exception, match="lr") as refused:
            client.create_flow_run_from_deployment(manual.id, parameters={"config": {"train": {"lr": -1}}})
    assert "422" in str(refused.value) or "409" in str(refused.value) or "Validation" in type(refused.value).__name__


def test_mlpipe_serve_registers_a_served_deployment_with_its_schedule(prefect_stack, tmp_path):
    import sys
    import time

    from tests.servers import start, stop

    log = tmp_path / "serve.log"
    served = start([sys.executable, "-m", "flows.cli", "serve", "--name", "it-serve", "--cron", "0 3 * * *",
                    "--timezone", "Europe/Berlin"], log, prefect_stack.env)  # fmt: skip
    try:
        deadline, found = time.time() + 120, None
        with temporary_settings({PREFECT_API_URL: prefect_stack.api_url}), get_client(sync_client=True) as client:
            while found is None and time.time() < deadline:
                assert served.poll() is None, log.read_text()[-2000:]
                try:
                    found = client.read_deployment_by_name("training-pipeline/it-serve")
                except Exception:  # noqa: BLE001 - not registered yet
                    time.sleep(1)
        assert found is not None, log.read_text()[-2000:]
        assert [(s.schedule.cron, s.schedule.timezone) for s in found.schedules] == [("0 3 * * *", "Europe/Berlin")]
        assert found.parameters["config"]["experiment"] == "mlpipe"
    finally:
        stop(served)
