from prefect import task
from prefect.cache_policies import NO_CACHE

from mlpipe.anonymize import anonymize as anonymize_dataset
from mlpipe.config import AnonymizeConfig, SourceConfig
from mlpipe.store import StageResult
from mlpipe.tracking import RunRef
from tasks._publish import publish
from tasks.secrets import pseudonym_key


@task(name="anonymize", cache_policy=NO_CACHE)
def anonymize(snapshot: StageResult, config: AnonymizeConfig, source: SourceConfig, run: RunRef) -> StageResult:
    """Apply the per-column privacy policy; fails closed on any column without one."""
    return publish(run, anonymize_dataset(snapshot, config, source, secret_key=pseudonym_key(config)))
