from prefect import get_run_logger, task

from mlpipe import tracking
from mlpipe.config import IngestConfig, PipelineConfig, SourceConfig
from mlpipe.ingest import describe_decided, resolve_config, source_fingerprint
from mlpipe.ingest import ingest as ingest_snapshot
from mlpipe.store import StageResult
from mlpipe.tracking import RunRef
from tasks._cache import PERSISTED, StageCache
from tasks._publish import cached_stage

FILES = ("quarantine.csv", "duplicates.csv", "near_duplicates.csv", "validation.json")


def decide_auto(config: PipelineConfig) -> PipelineConfig:
    """The flow's config with its auto values decided from a sample of the data, once, before the
    MLflow run opens: the run records the decided values (params, config.yaml), so that
    `mlpipe reproduce` needs no detection. `mlpipe run` has decided them already (nothing to do)."""
    resolved, decided, detection = resolve_config(config)
    if decided:
        get_run_logger().info(describe_decided(decided, detection))
    return resolved


@task(name="ingest", cache_policy=StageCache(stage="ingest", modules=("mlpipe.ingest", "mlpipe.dicom"),
      fingerprint=lambda inputs: {"source": source_fingerprint(inputs["source"], inputs["config"].dicom.frames)}),
      **PERSISTED)  # fmt: skip
def snapshot(source: SourceConfig, config: IngestConfig) -> StageResult:
    """Decode and validate every image once; quarantine and dedupe with full accounting."""
    return ingest_snapshot(source, config)


def ingest(source: SourceConfig, config: IngestConfig, run: RunRef) -> StageResult:
    result = cached_stage(snapshot, run, source, config, files=FILES)
    tracking.set_tags(run, {"mlpipe.data_fingerprint": result.report["fingerprint"]})
    tracking.log_dataset(run, "snapshot", result.report["fingerprint"], source.uri)
    return result
