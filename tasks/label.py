from prefect import task

from mlpipe.config import LabelConfig
from mlpipe.label import label as label_items
from mlpipe.label import reviewed_digest
from mlpipe.store import StageResult
from mlpipe.tracking import RunRef
from tasks._cache import PERSISTED, StageCache
from tasks._publish import cached_stage


@task(name="label", cache_policy=StageCache(stage="label", modules=("mlpipe.label",),
      fingerprint=lambda inputs: {"reviewed": reviewed_digest(inputs["config"])}), **PERSISTED)  # fmt: skip
def labelled(dataset: StageResult, config: LabelConfig) -> StageResult:
    """Consensus over annotators; ties and unlabelled items go to the review queue; likely label errors are flagged (kept)."""
    return label_items(dataset, config)


def label(dataset: StageResult, config: LabelConfig, run: RunRef) -> StageResult:
    files = ("label_map.json", "review_queue.csv", "review_tasks.json", "labeling_config.xml", "label_issues.csv")
    return cached_stage(labelled, run, dataset, config, files=files)
