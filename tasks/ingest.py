from prefect import task

from mlpipe import tracking
from mlpipe.config import IngestConfig, SourceConfig
from mlpipe.ingest import ingest as ingest_snapshot
from mlpipe.ingest import source_fingerprint
from mlpipe.store import StageResult
from mlpipe.tracking import RunRef
from tasks._cache import PERSISTED, StageCache
from tasks._publish import cached_stage

FILES = ("quarantine.csv", "duplicates.csv", "near_duplicates.csv", "validation.json")


@task(name="ingest", cache_policy=StageCache(stage="ingest", modules=("mlpipe.ingest",),
      fingerprint=lambda inputs: {"source": source_fingerprint(inputs["source"])}), **PERSISTED)  # fmt: skip
def snapshot(source: SourceConfig, config: IngestConfig) -> StageResult:
    """Decode and validate every image once; quarantine and dedupe with full accounting."""
    return ingest_snapshot(source, config)


def ingest(source: SourceConfig, config: IngestConfig, run: RunRef) -> StageResult:
    result = cached_stage(snapshot, run, source, config, files=FILES)
    tracking.set_tags(run, {"mlpipe.data_fingerprint": result.report["fingerprint"]})
    tracking.log_dataset(run, "snapshot", result.report["fingerprint"], source.uri)
    return result
