from prefect import task
from prefect.cache_policies import NO_CACHE

from mlpipe import tracking
from mlpipe.config import IngestConfig, SourceConfig
from mlpipe.ingest import ingest as ingest_snapshot
from mlpipe.store import StageResult
from mlpipe.tracking import RunRef
from tasks._publish import publish


@task(name="ingest", cache_policy=NO_CACHE)
def ingest(source: SourceConfig, config: IngestConfig, run: RunRef) -> StageResult:
    """Decode and validate every image once; quarantine and dedupe with full accounting."""
    snapshot = ingest_snapshot(source, config)
    tracking.set_tags(run, {"mlpipe.data_fingerprint": snapshot.report["fingerprint"]})
    tracking.log_dataset(run, "snapshot", snapshot.report["fingerprint"], source.uri)
    return publish(run, snapshot, files=("quarantine.csv", "duplicates.csv", "near_duplicates.csv", "validation.json"))
