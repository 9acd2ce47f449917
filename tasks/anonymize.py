from prefect import task

from mlpipe.anonymize import anonymize as anonymize_dataset
from mlpipe.anonymize import key_id, load_key
from mlpipe.burned_in import ocr_available
from mlpipe.config import AnonymizeConfig, SourceConfig
from mlpipe.store import StageResult
from mlpipe.tracking import RunRef
from tasks._cache import PERSISTED, StageCache
from tasks._publish import cached_stage
from tasks.secrets import pseudonym_key


def _key_fingerprint(inputs: dict) -> dict:
    """New pseudonyms when the key changes: its one-way id is part of the cache key (never the key);
    a new scan for burned-in text when OCR becomes available (or goes)."""
    return {"pseudonym_key": key_id(pseudonym_key(inputs["config"]) or load_key(inputs["config"])[0]),
            "ocr": ocr_available()}  # fmt: skip


@task(name="anonymize", cache_policy=StageCache(stage="anonymize", modules=(
      "mlpipe.anonymize", "mlpipe.dicom", "mlpipe.deid", "mlpipe.kanonymity", "mlpipe.burned_in"),
      fingerprint=_key_fingerprint), **PERSISTED)  # fmt: skip
def pseudonymized(snapshot: StageResult, config: AnonymizeConfig, source: SourceConfig) -> StageResult:
    """Apply the per-column privacy policy; fails closed on any column without one."""
    return anonymize_dataset(snapshot, config, source, secret_key=pseudonym_key(config))


def anonymize(snapshot: StageResult, config: AnonymizeConfig, source: SourceConfig, run: RunRef) -> StageResult:
    return cached_stage(pseudonymized, run, snapshot, config, source)
