from prefect import task
from prefect.cache_policies import NO_CACHE

from mlpipe import tracking
from mlpipe.config import EvaluateConfig
from mlpipe.evaluate import evaluate as evaluate_on_test
from mlpipe.store import StageResult
from mlpipe.tracking import RunRef
from tasks._publish import publish


@task(name="evaluate", cache_policy=NO_CACHE)
def evaluate(best: StageResult, splits: StageResult, config: EvaluateConfig, run: RunRef) -> dict:
    """The winner on the test set, once; log and register the model. Returns the headline figures."""
    result, model = evaluate_on_test(best, splits, config)
    tracking.log_metrics(run, result.report["metrics"])
    publish(run, result, files=("confusion_matrix.png", "predictions.csv"))
    registered = tracking.log_model(run, model, config.registered_model_name, result.report["input_shape"])
    return {"metrics": result.report["metrics"], **registered}

