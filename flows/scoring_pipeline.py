"""Scoring as a Prefect flow: the registered model on a source, one MLflow scoring run."""

from __future__ import annotations

import tempfile

from prefect import flow
from prefect.runtime import flow_run

from mlpipe.config import ScoringConfig
from mlpipe.scoring import summary_lines
from tasks.run import scoring_run
from tasks.score import deliver, fetch_model, score


@flow(name="scoring-pipeline", log_prints=True)
def scoring_pipeline(config: ScoringConfig = ScoringConfig()) -> dict:  # noqa: B008 (pydantic default is the UI form)
    with scoring_run(config) as run, tempfile.TemporaryDirectory() as workdir:
        model = fetch_model(config.model, workdir, run)
        scored = score(model, config, run)
        written = deliver(scored, config.destination, run)
    print("\n".join(summary_lines(scored.report)))
    return {"flow_run_id": str(flow_run.id), **run.model_dump(), "model_version": model.get("version"),
            "predictions": written, **scored.report}
