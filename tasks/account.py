from prefect import task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from mlpipe import tracking
from mlpipe.accounting import ledger, lines
from mlpipe.config import Trial
from mlpipe.split import trained_on
from mlpipe.store import StageResult
from mlpipe.tracking import RunRef


@task(name="account", cache_policy=NO_CACHE)
def account(snapshot: StageResult, dataset: StageResult, labelled: StageResult, splits: StageResult,
            trials: list[Trial], final: StageResult, run: RunRef) -> list[str]:  # fmt: skip
    """Where every manifest row went, stage by stage: logged as accounting.json, returned as lines."""
    entries = ledger(snapshot.report, dataset.report, labelled.report, splits.report)
    winner = next(t for t in trials if t.name == final.report["winner"])
    trained, left_out = trained_on(splits, bool(final.report.get("refit")), winner.resample.drop_label_issues)
    evaluated = splits.report["sizes"]["test"]
    text = lines(entries, trained_on=trained, evaluated_on=evaluated, left_out=left_out)
    tracking.log_dict(run, {"stages": entries, "trained_on": trained, "label_issues_left_out": left_out,
                            "evaluated_on": evaluated}, "accounting.json")  # fmt: skip
    create_markdown_artifact(key="data-accounting", markdown="# Data accounting\n\n" + "\n".join(f"- {t}" for t in text),
                             description="Where every manifest row went")  # fmt: skip
    return text
