from prefect import task
from prefect.cache_policies import NO_CACHE

from mlpipe import tracking
from mlpipe.config import SearchConfig, Trial
from mlpipe.store import StageResult, kept_logs
from mlpipe.train.launch import needs_refit
from mlpipe.train.launch import refit as refit_winner
from mlpipe.tracking import RunRef
from tasks._publish import publish


@task(name="refit", cache_policy=NO_CACHE)
def refit(best: StageResult, splits: StageResult, trials: list[Trial], config: SearchConfig, run: RunRef) -> StageResult:
    """The winner retrained on train+val (kfold mode, or search.refit); otherwise the winner as it is."""
    if not needs_refit(splits, config):
        return best
    child = tracking.start_child_run(run, "refit", {"trial": best.report["winner"], **best.report["winner_params"]})
    try:
        result = refit_winner(best, splits, trials, child, run.tracking_uri)
    except BaseException as err:
        tracking.log_kept_logs(run, kept_logs(err))
        tracking.end_run(run, child, failed=True)
        raise
    tracking.log_stage(run, "refit", result.report["refit"], [result.file("checkpoint")], run_id=child)
    tracking.end_run(run, child)
    return publish(run, result)
