from prefect import task

from mlpipe.config import SplitConfig
from mlpipe.split import split as split_stratified_grouped
from mlpipe.store import StageResult
from mlpipe.tracking import RunRef
from tasks._cache import PERSISTED, StageCache
from tasks._publish import cached_stage, log_splits


@task(name="split", cache_policy=StageCache(stage="split", modules=("mlpipe.split",)), **PERSISTED)
def splits(labelled: StageResult, config: SplitConfig) -> StageResult:
    """Stratified train/val/test, grouped by the pseudonymized subject."""
    return split_stratified_grouped(labelled, config)


def split(labelled: StageResult, config: SplitConfig, run: RunRef) -> StageResult:
    result = cached_stage(splits, run, labelled, config, files=("manifest.parquet", "class_counts.png"))
    log_splits(run, result)  # train, val and test as MLflow datasets of the run
    return result
