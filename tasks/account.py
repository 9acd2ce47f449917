from prefect import task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from mlpipe import tracking
from mlpipe.accounting import ledger, lines
from mlpipe.store import StageResult
from mlpipe.tracking import RunRef


@task(name="account", cache_policy=NO_CACHE)
def account(snapshot: StageResult, dataset: StageResult, labelled: StageResult, splits: StageResult,
            final: StageResult, run: RunRef) -> list[str]:  # fmt: skip
    """Where every manifest row went, stage by stage: logged as accounting.json, returned as lines."""
    entries = ledger(snapshot.report, dataset.report, labelled.report, splits.report)
    sizes = splits.report["sizes"]
    trained_on = sizes["train"] + (sizes["val"] if final.report.get("refit") else 0)
    text = lines(entries, trained_on=trained_on, evaluated_on=sizes["test"])
    tracking.log_dict(run, {"stages": entries, "trained_on": trained_on, "evaluated_on": sizes["test"]},
                      "accounting.json")  # fmt: skip
    create_markdown_artifact(key="data-accounting", markdown="# Data accounting\n\n" + "\n".join(f"- {t}" for t in text),
                             description="Where every manifest row went")  # fmt: skip
    return text
