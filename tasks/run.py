"""The MLflow parent run of a flow run: tagged with where it came from, compared with the run
before it, and never left RUNNING (the flow's failure, crash and cancellation hooks end it)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

from prefect import get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.client.orchestration import get_client
from prefect.runtime import deployment, flow_run

from mlpipe import tracking
from mlpipe.config import PipelineConfig, ScoringConfig, flat_params, to_yaml
from mlpipe.reproduce import REPRODUCES_ENV, REPRODUCES_TAG
from mlpipe.store import code_version, library_versions
from mlpipe.tracking import RunRef


def trigger() -> str:
    """schedule, api (a UI click or an API call: Prefect's open-source server records them
    alike, unless the run names a user), ui (it does), or cli (no deployment)."""
    if not deployment.id:
        return "cli"
    with get_client(sync_client=True) as client:
        run = client.read_flow_run(flow_run.id)
    if run.auto_scheduled:
        return "schedule"
    return "ui" if run.created_by is not None and run.created_by.type == "USER" else "api"


def provenance_tags() -> dict[str, str]:
    tags = {
        "prefect.flow_run_id": str(flow_run.id),
        "prefect.flow_run_name": str(flow_run.name),
        "prefect.deployment": str(deployment.name or ""),
        "mlpipe.trigger": trigger(),
        "mlpipe.code_version": code_version(),
        **{f"mlpipe.lib.{name}": v for name, v in library_versions().items()},
        **tracking.owner_tags(),
    }
    if os.environ.get(REPRODUCES_ENV):  # set by `mlpipe reproduce`
        tags[REPRODUCES_TAG] = os.environ[REPRODUCES_ENV]
    if flow_run.ui_url and not str(flow_run.ui_url).startswith("None"):  # no UI URL on the ephemeral server
        tags["prefect.flow_run_url"] = str(flow_run.ui_url)
    return tags


@contextlib.contextmanager
def pipeline_run(config: PipelineConfig) -> Iterator[RunRef]:
    """Open the parent run with the resolved config as params and `config.yaml`; close it FINISHED or FAILED."""
    ended = tracking.reconcile()  # runs of flows killed outright, which ran no hook
    if ended:
        get_run_logger().warning(f"ended {len(ended)} MLflow run(s) left RUNNING by killed flow runs as KILLED")
    params = flat_params(config)
    with tracking.pipeline_run(config.experiment, str(flow_run.name), params, provenance_tags()) as run:
        tracking.log_text(run, to_yaml(config), "config.yaml")
        tracking.set_description(run, f"mlpipe training pipeline (flow run {flow_run.name}), {len(config.trials())} "
                                      "trial(s); evaluate replaces this with the outcome.")  # fmt: skip
        _compare_with_previous(run, params)
        create_markdown_artifact(key="mlflow-run", markdown=_link(run), description="The MLflow run of this flow run")
        yield run


@contextlib.contextmanager
def scoring_run(config: ScoringConfig) -> Iterator[RunRef]:
    """The MLflow run of a scoring flow run, in `config.experiment`: the config as params,
    tagged like a pipeline run (flow run, deployment, trigger); FINISHED or FAILED at the end."""
    tags = {**provenance_tags(), "mlpipe.kind": "scoring"}
    with tracking.pipeline_run(config.experiment, str(flow_run.name), flat_params(config), tags) as run:
        create_markdown_artifact(key="mlflow-run", markdown=_link(run), description="The MLflow run of this flow run")
        yield run


def _compare_with_previous(run: RunRef, params: dict[str, str]) -> None:
    previous = tracking.previous_run(run, str(deployment.name or ""))
    if previous is None:
        return
    run_id, before = previous
    tracking.set_tags(run, {"mlpipe.previous_run_id": run_id})
    tracking.log_dict(run, {"previous_run_id": run_id, "changed": tracking.param_diff(before, params)},
                      "provenance/param_diff.json")  # fmt: skip


def _link(run: RunRef) -> str:
    where = f"experiment `{run.experiment_name}`, run `{run.run_id}` at `{run.tracking_uri}`"
    url = tracking.run_url(run)
    if url:
        return f"# MLflow run\n\n[{run.run_id}]({url}) ({where})"
    return f"# MLflow run\n\n{where}"


def end_mlflow_runs(status: str):
    """A flow hook ending the flow run's MLflow runs that are still RUNNING."""

    def hook(flow, run, state) -> None:  # noqa: ARG001 - Prefect's hook signature
        config = run.parameters.get("config") or {}
        experiment = config.experiment if isinstance(config, PipelineConfig) else config.get("experiment", "mlpipe")
        tracking.end_flow_run(str(run.id), experiment, status)

    hook.__name__ = f"end_mlflow_runs_{status.lower()}"
    return hook
