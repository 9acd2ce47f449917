from prefect import task
from prefect.cache_policies import NO_CACHE

from mlpipe import tracking
from mlpipe.config import SearchConfig
from mlpipe.search import search as select_winner
from mlpipe.store import StageResult
from mlpipe.tracking import RunRef
from tasks._publish import publish


@task(name="search", cache_policy=NO_CACHE)
def search(trained: StageResult, config: SearchConfig, run: RunRef) -> StageResult:
    """Rank the trials on validation data and pick the winner."""
    result = select_winner(trained, config)
    tracking.log_metrics(run, {f"best_{k}": v for k, v in result.report["winner_val_metrics"].items()})
    return publish(run, result, files=("results.csv", "grid.png"))
