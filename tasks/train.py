from prefect import task
from prefect.cache_policies import NO_CACHE

from mlpipe import tracking
from mlpipe.config import SearchConfig, Trial
from mlpipe.store import StageResult, kept_logs
from mlpipe.train.launch import Launch
from mlpipe.train.launch import train as train_trials
from mlpipe.tracking import RunRef
from tasks._publish import dataset_links, publish, publish_trials, training_progress
from tasks._runners import fan_out, gpu_slots


@task(name="train", cache_policy=NO_CACHE)
def train(
    splits: StageResult, resampled: StageResult, trials: list[Trial], search: SearchConfig, run: RunRef
) -> StageResult:
    """Every trial in one torchrun launch (DDP); one nested MLflow run per trial, which its worker
    starts when the trial starts training. Cross-validation folds of a trial share its run, made here."""
    kfold = splits.report.get("mode") == "kfold"
    run_ids = {t.name: tracking.start_child_run(run, t.name, t.flat_params()) for t in trials} if kfold else {}
    tracking.prepare_model_logging(run)  # in the background, while the trials train
    try:
        with gpu_slots(trials):
            result = train_trials(splits, resampled, trials, run_ids, run.tracking_uri, training_progress(), search,
                                  fan_out(search, train_launch), parent=(run.run_id, run.experiment_id))  # fmt: skip
    except BaseException as err:
        tracking.log_kept_logs(run, kept_logs(err))  # the launch logs of the failed stage
        for run_id in {*run_ids.values(), *tracking.running_children(run)}:
            tracking.end_run(run, run_id, failed=True)
        raise
    publish_trials(run, result, trials, validation=dataset_links(splits).get("val"))
    return publish(run, result, files=tuple(p.name for p in result.file("").glob("launch-*")))


@task(name="train-launch", cache_policy=NO_CACHE, task_run_name="train-{job.name}")
def train_launch(job: Launch) -> None:
    """One of several torchrun launches running side by side (`search.max_parallel`)."""
    job.run()
