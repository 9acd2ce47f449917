from prefect import task

from mlpipe.config import Trial
from mlpipe.resample import resample as resample_training_split
from mlpipe.store import StageResult, stable_hash
from mlpipe.tracking import RunRef
from tasks._cache import PERSISTED, StageCache
from tasks._publish import cached_stage


def _resample_configs(inputs: dict) -> list[str]:
    """Only the trials' distinct resample configs matter: a new learning rate reuses the sets."""
    return sorted({stable_hash(t.resample) for t in inputs["trials"]})


@task(name="resample", cache_policy=StageCache(stage="resample", modules=("mlpipe.resample",), config=_resample_configs),
      **PERSISTED)  # fmt: skip
def training_sets(splits: StageResult, trials: list[Trial]) -> StageResult:
    """One rebalanced training set per distinct resample config of the grid; val and test untouched."""
    return resample_training_split(splits, trials)


def resample(splits: StageResult, trials: list[Trial], run: RunRef) -> StageResult:
    return cached_stage(training_sets, run, splits, trials, files=("class_counts.png",))
