from prefect import task
from prefect.cache_policies import NO_CACHE

from mlpipe.config import SplitConfig
from mlpipe.split import split as split_stratified_grouped
from mlpipe.store import StageResult
from mlpipe.tracking import RunRef
from tasks._publish import publish


@task(name="split", cache_policy=NO_CACHE)
def split(labelled: StageResult, config: SplitConfig, run: RunRef) -> StageResult:
    """Stratified train/val/test, grouped by the pseudonymized subject."""
    return publish(run, split_stratified_grouped(labelled, config), files=("manifest.parquet", "class_counts.png"))
