from prefect import task
from prefect.cache_policies import NO_CACHE

from mlpipe.config import LabelConfig
from mlpipe.label import label as label_items
from mlpipe.store import StageResult
from mlpipe.tracking import RunRef
from tasks._publish import publish


@task(name="label", cache_policy=NO_CACHE)
def label(dataset: StageResult, config: LabelConfig, run: RunRef) -> StageResult:
    """Majority vote over annotators; ties and unlabelled items go to the review queue."""
    return publish(run, label_items(dataset, config), files=("label_map.json", "review_queue.csv", "review_tasks.json"))
