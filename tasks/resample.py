from prefect import task
from prefect.cache_policies import NO_CACHE

from mlpipe.config import Trial
from mlpipe.resample import resample as resample_training_split
from mlpipe.store import StageResult
from mlpipe.tracking import RunRef
from tasks._publish import publish


@task(name="resample", cache_policy=NO_CACHE)
def resample(splits: StageResult, trials: list[Trial], run: RunRef) -> StageResult:
    """One rebalanced training set per distinct resample config of the grid; val and test untouched."""
    return publish(run, resample_training_split(splits, trials), files=("class_counts.png",))
