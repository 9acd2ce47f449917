from prefect import task
from prefect.cache_policies import NO_CACHE

from mlpipe.config import IngestConfig, SourceConfig
from mlpipe.ingest import ingest as ingest_snapshot
from mlpipe.store import StageResult
from mlpipe.tracking import RunRef
from tasks._publish import publish


@task(name="ingest", cache_policy=NO_CACHE)
def ingest(source: SourceConfig, config: IngestConfig, run: RunRef) -> StageResult:
    """Decode and validate every image once; quarantine and dedupe with full accounting."""
    return publish(run, ingest_snapshot(source, config), files=("quarantine.csv", "duplicates.csv"))
