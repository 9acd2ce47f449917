"""What every stage task does after the library call: record the stage in MLflow and Prefect."""

from __future__ import annotations

import json

from prefect.artifacts import create_markdown_artifact

from mlpipe import tracking
from mlpipe.store import StageResult
from mlpipe.tracking import RunRef


def publish(run: RunRef, result: StageResult, files: tuple[str, ...] = ()) -> StageResult:
    """`<stage>/report.json` and the stage's files into the MLflow run; a markdown summary into Prefect."""
    tracking.log_stage(run, result.stage, result.report, [result.file(f) for f in files])
    create_markdown_artifact(
        key=f"{result.stage}-report",
        markdown=_markdown(result),
        description=f"mlpipe {result.stage} report (MLflow run {run.run_id})",
    )
    return result


def _markdown(result: StageResult) -> str:
    lines = [f"# {result.stage}", "", "| key | value |", "|---|---|"]
    for key, value in result.report.items():
        text = json.dumps(value, default=str) if not isinstance(value, str) else value
        lines.append(f"| {key} | {text[:300].replace('|', '/')} |")
    return "\n".join(lines)
