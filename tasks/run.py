"""The MLflow parent run of a flow run, tagged with where it came from."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from prefect.runtime import deployment, flow_run

from mlpipe import tracking
from mlpipe.config import PipelineConfig, flat_params, to_yaml
from mlpipe.store import code_version, library_versions
from mlpipe.tracking import RunRef


def provenance_tags() -> dict[str, str]:
    tags = {
        "prefect.flow_run_id": str(flow_run.id),
        "prefect.flow_run_name": str(flow_run.name),
        "prefect.deployment": str(deployment.name or ""),
        "mlpipe.trigger": "deployment" if deployment.id else "cli",
        "mlpipe.code_version": code_version(),
        **{f"mlpipe.lib.{name}": v for name, v in library_versions().items()},
    }
    if flow_run.ui_url:
        tags["prefect.flow_run_url"] = str(flow_run.ui_url)
    return tags


@contextlib.contextmanager
def pipeline_run(config: PipelineConfig) -> Iterator[RunRef]:
    """Open the parent run with the resolved config as params and `config.yaml`; close it FINISHED or FAILED."""
    with tracking.pipeline_run(config.experiment, str(flow_run.name), flat_params(config), provenance_tags()) as run:
        tracking.log_text(run, to_yaml(config), "config.yaml")
        yield run
