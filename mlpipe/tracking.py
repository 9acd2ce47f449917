"""The only module that imports MLflow.

Everything goes through explicit run ids (`MlflowClient`), never MLflow's global "active run":
tasks may run in threads, and the training worker logs from another process into a run the
flow created. The layout of a pipeline run:

    parent run (one per flow run)   params: the resolved config; config.yaml; tags
      <stage>/report.json           one folder per stage, plus that stage's files
      child runs                    one per trial, with per-epoch metrics
      model                         the winner, registered in the Model Registry
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import errno
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from mlpipe.errors import MlpipeError
from mlpipe.store import state_dir

for _noisy in ("alembic", "mlflow.store.db.utils", "mlflow.tracking._tracking_service.client"):
    logging.getLogger(_noisy).setLevel(logging.WARNING)

# Bounded retries against an HTTP tracking server, unless the environment sets its own. MLflow's
# defaults retry a request 7 times, 4 to 120 s apart (about 4 minutes), and wait 120 s for each
# answer. Here: 5 retries, 0, 4, 8, 16 and 32 s apart (+ up to 1 s of jitter each), so a server
# that refuses connections fails a request after about a minute (`retry_window_s()`) while a
# restart of the server within that minute is ridden out; one that accepts but never answers,
# after 6 x 30 s plus the same minute. The training worker inherits these through its environment.
HTTP_RETRY_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "5", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "2",
                       "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}  # fmt: skip
for _name, _value in HTTP_RETRY_DEFAULTS.items():
    os.environ.setdefault(_name, _value)


def retry_window_s() -> float:
    """The longest one request to an HTTP tracking server that refuses connections is retried,
    under the current settings (urllib3's backoff: none before the first retry, then factor x 2^k,
    at most 120 s each)."""
    retries = int(os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"])
    factor = float(os.environ["MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"])
    jitter = float(os.environ.get("MLFLOW_HTTP_REQUEST_BACKOFF_JITTER") or 0)
    return sum(min(120.0, factor * 2 ** (k - 1)) + jitter for k in range(2, retries + 1))

import mlflow  # noqa: E402
from mlflow.entities import Metric, Param, RunStatus, RunTag  # noqa: E402
from mlflow.exceptions import MlflowException  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME  # noqa: E402

_BATCH = 100  # MLflow's log_batch limit for params
_METRIC_BATCH = 1000  # and for metrics


class RunRef(BaseModel):
    """Enough to reach a run from any process."""

    run_id: str
    experiment_id: str
    experiment_name: str
    tracking_uri: str


def tracking_uri() -> str:
    """`$MLFLOW_TRACKING_URI`, else a SQLite store in the project's state directory. Credentials
    in an HTTP URI (`http://user:password@host`, which MLflow accepts) are moved out of it, see
    `without_credentials`."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        clean = without_credentials(uri)
        if clean != uri:
            os.environ["MLFLOW_TRACKING_URI"] = clean  # what MLflow itself and child processes read
        return clean
    return f"sqlite:///{state_dir() / 'mlflow.db'}"


def without_credentials(uri: str) -> str:
    """The URI without its user:password, which move to MLFLOW_TRACKING_USERNAME/PASSWORD (those
    already set win, as they would in MLflow). The URI is printed, put in the Prefect artifact and
    the model card, and written into training specs on shared storage: a password in it leaked there."""
    from urllib.parse import unquote, urlsplit, urlunsplit

    if not uri.startswith(("http://", "https://")) or "@" not in uri.split("://", 1)[1].split("/", 1)[0]:
        return uri
    parts = urlsplit(uri)
    if parts.username is None or parts.password is None:
        return uri  # no password to leak
    os.environ.setdefault("MLFLOW_TRACKING_USERNAME", unquote(parts.username))
    os.environ.setdefault("MLFLOW_TRACKING_PASSWORD", unquote(parts.password))
    return urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))


def create_store_in_background() -> subprocess.Popen | None:
    """Create a new local SQLite store in a process of its own (MLflow runs its schema migrations:
    a second or two), so that it happens on another core while the flow imports; `wait()` for
    it before the first MLflow call. None when there is nothing to create. Should it fail, the
    run's first MLflow call fails the same way, with the error."""
    uri = tracking_uri()
    if not uri.startswith("sqlite:///") or Path(uri.removeprefix("sqlite:///")).exists():
        return None
    return subprocess.Popen([sys.executable, "-c", "from mlpipe import tracking; tracking._client().search_experiments()"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip


def connect() -> None:
    """Open the tracking store now (MLflow keeps it per URI): a local SQLite store costs most of a
    second to open (its module imports, the engine, the schema check)."""
    _client().search_experiments(max_results=1)


@contextlib.contextmanager
def _fluent_tracking_uri(uri: str, experiment_id: str | None = None) -> Iterator[None]:
    """MLflow's process-wide tracking URI (its fluent API's, and the store `models:/` URIs resolve in),
    and its active experiment when `experiment_id` is given, set for the block, then put back as they
    were. `mlflow.set_tracking_uri` and `set_experiment` keep their value in module globals and also
    write `$MLFLOW_TRACKING_URI` and `$MLFLOW_EXPERIMENT_ID`: left set, a later call in the same process
    (the next flow run of a worker, `mlpipe predict` after a run, a test) or a child it starts would
    still reach this store, whatever the variables said before. One block at a time per process
    (threads of a task runner wait): interleaved, they would put each other's values back."""
    from mlflow.tracking import fluent
    from mlflow.tracking._tracking_service import utils  # the globals have no public getters

    with _FLUENT_LOCK:
        saved = (utils._tracking_uri, fluent._active_experiment_id,
                 {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_ID")})  # fmt: skip
        mlflow.set_tracking_uri(uri)
        try:
            if experiment_id is not None:
                mlflow.set_experiment(experiment_id=experiment_id)
            yield
        finally:
            mlflow.set_tracking_uri(saved[0])  # None included: MLflow's tracer state is reset with it
            fluent._active_experiment_id = saved[1]
            for name, value in saved[2].items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value


_FLUENT_LOCK = threading.RLock()


def _client(uri: str | None = None) -> MlflowClient:
    return MlflowClient(tracking_uri=without_credentials(uri) if uri else tracking_uri())


# MLflow 3's UI opens an experiment without this tag in its GenAI view, where runs are
# "Evaluations"; "custom_model_development" is the model-training view (runs, charts, models).
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")
# MLflow 3.17's UI shows an experiment in its GenAI or its "Model training" view by this URL
# parameter, else by the user's last choice (the kind tag above does not decide it there):
# mlpipe's links carry it, so a user lands on runs, metrics and models.
MODEL_TRAINING_VIEW = "workflowType=machine_learning"
DESCRIPTION_TAG = "mlflow.note.content"  # the description the UI shows and edits, on runs and experiments
EXPERIMENT_DESCRIPTION = ("Image classifiers trained by mlpipe. One parent run per pipeline run (its stages' reports "
                          "and figures, test metrics, the registered model), one child run per trial.")  # fmt: skip


def _experiment_id(client: MlflowClient, name: str, uri: str) -> str:
    found = client.get_experiment_by_name(name)
    if found is None:
        location = None
        if uri.startswith("sqlite:"):  # local default: artifacts beside the database, not in ./mlruns
            location = (state_dir() / "mlartifacts" / name).as_uri()
        try:
            client.create_experiment(name, artifact_location=location)
        except mlflow.exceptions.MlflowException:  # created concurrently by another run
            pass
        found = client.get_experiment_by_name(name)
    # Also on experiments made before the tags existed; a description the user wrote is kept.
    wanted = {EXPERIMENT_KIND[0]: EXPERIMENT_KIND[1], DESCRIPTION_TAG: EXPERIMENT_DESCRIPTION}
    for key, value in wanted.items():
        if key not in found.tags:
            client.set_experiment_tag(found.experiment_id, key, value)
    return found.experiment_id


# The tags MLflow's fluent API puts on every run (`mlflow.start_run`): who started it and from
# where (user, entry point, its type, the git commit when run from a checkout).
SOURCE_TAGS = ("mlflow.user", "mlflow.source.name", "mlflow.source.type", "mlflow.source.git.commit",
               "mlflow.source.git.branch", "mlflow.source.git.repoURL")  # fmt: skip


def source_tags() -> dict[str, str]:
    """`SOURCE_TAGS` as MLflow's own context providers resolve them in this process."""
    from mlflow.tracking.context.registry import resolve_tags

    return {k: v for k, v in resolve_tags().items() if k in SOURCE_TAGS}


def run_url(ref: RunRef) -> str | None:
    """The run's page in the tracking server's UI, in the model-training view; None for a local store."""
    if not ref.tracking_uri.startswith(("http://", "https://")):
        return None
    return f"{ref.tracking_uri.rstrip('/')}/#/experiments/{ref.experiment_id}/runs/{ref.run_id}?{MODEL_TRAINING_VIEW}"


def check_reachable(uri: str, timeout_s: float = 5.0) -> None:
    """A tracking server that does not answer fails the run now, in one line, instead of after
    MLflow's retries (minutes) or, worse, after training."""
    if not uri.startswith(("http://", "https://")):
        return
    import requests

    try:
        requests.get(f"{uri.rstrip('/')}/health", timeout=timeout_s).raise_for_status()
    except requests.RequestException as err:
        reason = str(err).split(": ")[-1][:160]
        raise MlpipeError(f"MLflow tracking server {uri} is unreachable ({type(err).__name__}: {reason})") from None


class _Writes:
    """One pipeline run's MLflow writes, off the flow's critical path: they run in submission
    order on a background thread, so a stage's report and files upload while the next stage
    computes. A failed write raises at the run's next write or at `close()`, and the run ends
    only after all its writes have landed, so nothing is lost silently. Run creation and every
    read stay synchronous; none reads what a pending write changes (pending writes touch only
    this flow run's runs, which nothing reads before the run ends)."""

    def __init__(self, ref: RunRef | None = None) -> None:
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="mlflow-writes")
        self._pending: list[concurrent.futures.Future] = []
        self._ref, self._failed = ref, False

    def submit(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        if any(f.done() and f.exception() for f in self._pending):
            self.close()
        self._pending.append(self._pool.submit(self._run, fn, args, kwargs))

    def _run(self, fn: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
        # After a failed write the rest are skipped: the run fails with the first error anyway, and
        # against a tracking server that is down each would be retried for a whole retry window.
        if self._failed:
            return None
        try:
            return fn(*args, **kwargs)
        except OSError as err:
            self._failed = True
            if self._ref is not None and err.errno in _STORE_ERRNOS:
                raise artifact_store_error(self._ref, err) from err
            raise
        except BaseException:
            self._failed = True
            raise

    def close(self) -> None:
        """Wait for every pending write; raise the first error."""
        self._pool.shutdown(wait=True)
        errors = [f.exception() for f in self._pending]
        self._pending = []
        first = next((e for e in errors if e is not None), None)
        if first is not None:
            raise first


_deferred: dict[str, _Writes] = {}  # parent run id -> its writes, while its pipeline_run is open

# A write the artifact store refused: full, read-only, over quota, no permission, failing disk.
_STORE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO, errno.EFBIG}


def artifact_store_error(ref: RunRef, err: OSError) -> MlpipeError:
    """An artifact write that failed, as one line naming the store."""
    where = f"of {ref.tracking_uri}"
    with contextlib.suppress(Exception):
        where = _client(ref.tracking_uri).get_experiment(ref.experiment_id).artifact_location
    code = errno.errorcode.get(err.errno or 0, "")
    return MlpipeError(f"MLflow artifact store {where} refused a write ({code}: {err.strerror or err}); "
                       f"the run is failed, its logged files are incomplete")  # fmt: skip


def tracking_server_down(ref: RunRef, err: BaseException) -> MlpipeError | None:
    """A failure caused by an HTTP tracking server that stopped answering mid-run (it still does
    not answer), as one line naming the server; None for any other failure."""
    uri = ref.tracking_uri
    if not uri.startswith(("http://", "https://")) or not isinstance(err, Exception):
        return None
    if not isinstance(err, MlflowException) and uri.split("://", 1)[1].rstrip("/") not in str(err):
        return None  # not an MLflow call (a training failure that names the server counts: its worker logs there)
    try:
        check_reachable(uri)
    except MlpipeError:
        retries = os.environ.get("MLFLOW_HTTP_REQUEST_MAX_RETRIES")
        return MlpipeError(f"MLflow tracking server {uri} stopped answering during the run; gave up after {retries} "
                           f"retries over about {retry_window_s():.0f} s (MLFLOW_HTTP_REQUEST_MAX_RETRIES, "
                           f"MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR); finished stages are kept for the rerun")  # fmt: skip
    return None


def _write(ref: RunRef, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
    writes = _deferred.get(ref.run_id)
    if writes is None:
        fn(*args, **kwargs)
    else:
        writes.submit(fn, *args, **kwargs)


def start_run(experiment: str, run_name: str, params: dict[str, str], tags: dict[str, str]) -> RunRef:
    uri = tracking_uri()
    check_reachable(uri)
    client = _client(uri)
    experiment_id = _experiment_id(client, experiment, uri)
    run = client.create_run(experiment_id, run_name=run_name, tags={**source_tags(), **tags})
    _log_params(client, run.info.run_id, params)
    return RunRef(run_id=run.info.run_id, experiment_id=experiment_id, experiment_name=experiment, tracking_uri=uri)


TRIAL_TAG = "mlpipe.trial"


def start_child_run(parent: RunRef, name: str, params: dict[str, str], tags: dict[str, str] | None = None) -> str:
    """A child run of `parent`, started now, with the parent's source and user tags."""
    return child_run(parent.tracking_uri, parent.experiment_id, parent.run_id, name, params, tags)


def child_run(uri: str | None, experiment_id: str, parent_id: str, name: str, params: dict[str, str],
              tags: dict[str, str] | None = None, reuse: bool = False) -> str:  # fmt: skip
    """The id of a new child run of run `parent_id`, started now (its start time is the UI's
    duration start), tagged `mlpipe.trial=name` and with the parent's source and user tags.
    `reuse`: the child of that name if one exists already (a restarted or resumed trial)."""
    client = _client(uri)
    if reuse:
        found = client.search_runs([experiment_id], f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{parent_id}' and "
                                   f"tags.`{TRIAL_TAG}` = '{name}'", max_results=1)  # fmt: skip
        if found:
            return found[0].info.run_id
    parent = client.get_run(parent_id)
    if parent.info.status != "RUNNING":  # e.g. a rank that outlived a cancelled flow: its run would never end
        raise MlpipeError(f"MLflow run {parent_id} has ended ({parent.info.status}); no trial run is started under it")
    inherited = {k: v for k, v in parent.data.tags.items() if k in SOURCE_TAGS}
    run = client.create_run(experiment_id, run_name=name, tags={
        **inherited, MLFLOW_PARENT_RUN_ID: parent_id, MLFLOW_RUN_NAME: name, TRIAL_TAG: name, **(tags or {})})  # fmt: skip
    _log_params(client, run.info.run_id, params)
    return run.info.run_id


def running_children(ref: RunRef) -> list[str]:
    """Ids of the parent run's child runs that are still RUNNING."""
    children = _client(ref.tracking_uri).search_runs(
        [ref.experiment_id], f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{ref.run_id}' and attributes.status = 'RUNNING'")
    return [c.info.run_id for c in children]


def _log_params(client: MlflowClient, run_id: str, params: dict[str, str]) -> None:
    items = [Param(k, str(v)) for k, v in params.items()]
    for i in range(0, len(items), _BATCH):
        client.log_batch(run_id, params=items[i : i + _BATCH])


def end_run(ref: RunRef, run_id: str | None = None, failed: bool = False, end_time_ms: int | None = None) -> None:
    """End the run (default: the parent) FINISHED or FAILED, at `end_time_ms` (ms since the epoch)
    when given (a trial ends when its training ended, not when the stage publishes it), else now."""
    status = RunStatus.to_string(RunStatus.FAILED if failed else RunStatus.FINISHED)
    _write(ref, _client(ref.tracking_uri).set_terminated, run_id or ref.run_id, status=status, end_time=end_time_ms)


@contextlib.contextmanager
def pipeline_run(experiment: str, run_name: str, params: dict[str, str], tags: dict[str, str]) -> Iterator[RunRef]:
    """The parent run: FINISHED when the block completes, FAILED when it raises. Never left RUNNING.
    Its writes are deferred (see `_Writes`) and have all landed before it ends."""
    ref = start_run(experiment, run_name, params, tags)
    writes = _deferred[ref.run_id] = _Writes(ref)
    try:
        yield ref
    except BaseException as err:
        del _deferred[ref.run_id]
        with contextlib.suppress(Exception):  # the block's error is the one to report
            writes.close()
        _fail(ref, err)
        raise
    del _deferred[ref.run_id]
    try:
        writes.close()
    except Exception as err:
        _fail(ref, err)
        raise
    end_run(ref)


def _fail(ref: RunRef, err: BaseException) -> None:
    """End the run FAILED, or, when the tracking server is what failed, raise that in one line
    without trying (it would only retry for another window): once this process has exited and the
    server is back, the next run's reconcile (or `mlpipe reconcile`) ends the run as KILLED."""
    down = tracking_server_down(ref, err)
    if down is not None:
        raise down from err
    end_run(ref, failed=True)


def set_tags(ref: RunRef, tags: dict[str, str], run_id: str | None = None) -> None:
    batch = [RunTag(k, str(v)) for k, v in tags.items()]
    _write(ref, _client(ref.tracking_uri).log_batch, run_id or ref.run_id, tags=batch)


def log_metrics(ref: RunRef, metrics: dict[str, float], step: int = 0, run_id: str | None = None,
                dataset: tuple[str, str] | None = None, model_id: str | None = None) -> None:  # fmt: skip
    """Metrics into the run (default: the parent). `dataset`: (name, digest) of the `mlflow.data`
    dataset they were measured on (`log_split_datasets`); `model_id`: the logged model they
    measure. MLflow's UI lists a logged model's "Datasets used" from exactly these links."""
    if dataset is None and model_id is None:
        _write(ref, metric_logger(run_id or ref.run_id, ref.tracking_uri), metrics, step)
        return
    now = int(time.time() * 1000)
    name, digest = dataset or (None, None)
    batch = [Metric(k, float(v), now, step, model_id=model_id, dataset_name=name, dataset_digest=digest)
             for k, v in metrics.items()]  # fmt: skip
    for i in range(0, len(batch), _METRIC_BATCH):
        _write(ref, _client(ref.tracking_uri).log_batch, run_id or ref.run_id, metrics=batch[i : i + _METRIC_BATCH])


def set_description(ref: RunRef, text: str, run_id: str | None = None) -> None:
    """The run's description (markdown), shown at the top of its page in MLflow's UI."""
    set_tags(ref, {DESCRIPTION_TAG: text}, run_id)


def log_history(ref: RunRef, history: list[dict[str, float]], run_id: str) -> None:
    """Per-epoch metrics of a reused trial, one batch per epoch."""
    log = metric_logger(run_id, ref.tracking_uri)
    for entry in history:
        _write(ref, log, {k: v for k, v in entry.items() if k != "epoch"}, int(entry["epoch"]))


def metric_logger(run_id: str, uri: str | None) -> EpochLogger:
    """A callable for the training worker's rank 0: one batched request per epoch."""
    return EpochLogger(run_id, uri)


class EpochLogger:
    """Per-epoch metrics in one `log_batch` request each (a `log_metric` per value costs ~11 ms
    on SQLite), plus MLflow's system metrics (CPU, memory, GPU) while the trial trains."""

    def __init__(self, run_id: str, uri: str | None):
        self.run_id, self.uri, self.client, self.monitor = run_id, uri, _client(uri), None

    def __call__(self, metrics: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])

    def catch_up(self, history: list[dict[str, float]], prefix: str = "") -> None:
        """After a resume: log the saved epochs MLflow has not seen yet, so every step has exactly one value."""
        logged = {m.step for m in self.client.get_metric_history(self.run_id, prefix + "train_loss")}
        for entry in history:
            if entry["epoch"] not in logged:
                self({prefix + k: v for k, v in entry.items() if k != "epoch"}, int(entry["epoch"]))

    def start_system_metrics(self, interval_s: float = 10.0) -> None:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        self.monitor = SystemMetricsMonitor(self.run_id, sampling_interval=interval_s, resume_logging=True,
                                            tracking_uri=self.uri)  # fmt: skip
        self.monitor.start()

    def stop_system_metrics(self) -> None:
        if self.monitor is not None:
            self.monitor.finish()
            self.monitor = None


def log_stage(ref: RunRef, stage: str, report: dict[str, Any], files: list[Path] = (), run_id: str | None = None) -> None:
    """`<stage>/report.json` plus the stage's files, in the parent run (or a child run)."""
    client = _client(ref.tracking_uri)
    target = run_id or ref.run_id
    _write(ref, client.log_dict, target, report, f"{stage}/report.json")
    for path in files:
        _write(ref, client.log_artifact, target, str(path), artifact_path=stage)


def log_kept_logs(ref: RunRef, folder: Path | None) -> None:
    """A failed stage's kept logs (`store.kept_logs`) in the parent run, under `failed/<folder>/`.
    Never raises: called while the stage's own error is on its way to the user."""
    if folder is not None:
        with contextlib.suppress(Exception):
            _write(ref, _client(ref.tracking_uri).log_artifacts, ref.run_id, str(folder), f"failed/{folder.name}")


def log_text(ref: RunRef, text: str, artifact_file: str) -> None:
    _write(ref, _client(ref.tracking_uri).log_text, ref.run_id, text, artifact_file)


def log_dataset(ref: RunRef, name: str, digest: str, source_uri: str) -> None:
    """The snapshot as an `mlflow.data` dataset input: the UI shows which data (by digest) a run saw."""
    from mlflow.data.http_dataset_source import HTTPDatasetSource
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import DatasetInput, InputTag

    dataset = MetaDataset(source=HTTPDatasetSource(url=source_uri), name=name, digest=digest)
    _write(ref, _client(ref.tracking_uri).log_inputs, ref.run_id,
           datasets=[DatasetInput(dataset._to_mlflow_entity(), tags=[InputTag("mlflow.data.context", "ingest")])])  # fmt: skip


# A split's MLflow dataset context, as MLflow's own autologging names them.
SPLIT_CONTEXTS = {"train": "training", "val": "validation", "test": "testing"}


def log_split_datasets(ref: RunRef, splits: dict[str, Any], source_uri: str) -> None:
    """Each split (name -> DataFrame of its anonymized rows: item id, label) as an `mlflow.data`
    dataset input of the run, with MLflow's digest, schema and row count, context `training`,
    `validation` or `testing`, and `source_uri` as its source."""
    from mlflow.entities import DatasetInput, InputTag

    inputs = [DatasetInput(dataset._to_mlflow_entity(), tags=[InputTag("mlflow.data.context", SPLIT_CONTEXTS.get(name, name))])
              for name, dataset in _datasets(splits, source_uri).items()]  # fmt: skip
    _write(ref, _client(ref.tracking_uri).log_inputs, ref.run_id, datasets=inputs)


def dataset_links(splits: dict[str, Any]) -> dict[str, tuple[str, str]]:
    """split name -> (dataset name, digest) of `log_split_datasets`' datasets (the digest is
    MLflow's, of the rows alone), to link metrics to: `log_metrics(dataset=...)`."""
    return {name: (d.name, d.digest) for name, d in _datasets(splits, "").items()}


def _datasets(splits: dict[str, Any], source_uri: str) -> dict[str, Any]:
    from mlflow.data.http_dataset_source import HTTPDatasetSource
    from mlflow.data.pandas_dataset import from_pandas

    return {name: from_pandas(frame, source=HTTPDatasetSource(url=source_uri), name=name, targets="label")
            for name, frame in splits.items()}  # fmt: skip


def prepare_model_logging(ref: RunRef) -> None:
    """Queue model logging's one-time costs behind the run's pending writes, to be paid in the
    background (while the trials train) instead of on the way to the registry: torch.export's
    imports and MLflow's map of installed packages (it checks the model's requirements against
    it), about two seconds on two cores. Nothing to gain outside a pipeline run."""
    if ref.run_id in _deferred:
        _write(ref, _warm_model_logging)


def _warm_model_logging() -> None:
    import mlflow.pyfunc  # noqa: F401
    from mlflow.utils import requirements_utils

    with contextlib.suppress(Exception):  # a private helper: should it move, log_model pays the cost itself
        requirements_utils._init_packages_to_modules_map()


# What `mlpipe.serving` imports when MLflow loads the model (torchvision and timm build the
# network, scipy comes with scikit-learn's metrics); pinned to the lock's versions in the model.
SERVING_PACKAGES = ("mlflow", "torch", "torchvision", "timm", "numpy", "pandas", "pillow", "scikit-learn", "scipy",
                    "pydicom", "pylibjpeg", "pylibjpeg-libjpeg", "pylibjpeg-openjpeg", "pylibjpeg-rle")  # DICOM inputs
LOCK_FILE = Path(__file__).resolve().parent.parent / "requirements.lock"


def serving_requirements(lock: Path = LOCK_FILE) -> list[str]:
    """`name==version` of each serving package: the lock's pin when the lock is at hand (a
    checkout), else the installed version (an installed wheel has no lock). Raises MlpipeError
    when a package is neither pinned nor installed."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    pins = {}
    if lock.exists():
        for line in lock.read_text(encoding="utf-8").splitlines():
            name, sep, pinned = line.partition("==")
            if sep:
                pins[name.strip().lower()] = pinned.split(";")[0].split()[0]
    requirements = []
    for name in SERVING_PACKAGES:
        try:
            requirements.append(f"{name}=={pins.get(name) or installed(name)}")
        except PackageNotFoundError:
            raise MlpipeError(f"the serving model needs {name}, which is neither in {lock.name} nor installed") from None
    return requirements


def serving_signature(class_names: list[str]) -> Any:
    """The pyfunc's signature: one image per row in `image` (bytes; base64 over HTTP), `path` (a
    local file) or `array` (uint8 H x W [x C], any size); out: class, its probability, one
    probability per class, the threshold (two classes) and the row's error, if any."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import AnyType, ColSpec, Schema

    from mlpipe import serving

    inputs = Schema([ColSpec("binary", serving.IMAGE, required=False), ColSpec("string", serving.PATH, required=False),
                     ColSpec(AnyType(), serving.ARRAY, required=False)])  # fmt: skip
    outputs = [ColSpec("string", serving.CLASS, required=False), ColSpec("double", serving.PROBABILITY, required=False),
               *(ColSpec("double", c, required=False) for c in serving.probability_columns(class_names)),
               *([ColSpec("double", serving.THRESHOLD)] if len(class_names) == 2 else []),  # two classes: a threshold
               ColSpec("string", serving.ERROR, required=False)]  # fmt: skip
    return ModelSignature(inputs=inputs, outputs=Schema(outputs))


def log_model(ref: RunRef, data: Path, registered_name: str, checkpoint: Path, class_names: list[str],
              description: str = "") -> dict[str, str]:  # fmt: skip
    """Log and register the serving model: an MLflow pyfunc whose `loader_module` is
    `mlpipe.serving` and whose data is `data` (`mlpipe.serving.save`'s folder: weights, class map,
    preprocessing, decision rule, ONNX), with its signature, an input example (the folder's
    anonymized test image), pinned requirements and mlpipe's code (`code_paths`, so that
    `mlflow models serve` needs no mlpipe install). The training checkpoint goes beside it, for
    later champion comparisons. `description` (the model card, markdown) becomes the version's
    description. Returns model_uri, model_id (the logged model), registered_model and version."""
    try:
        return _log_model(ref, data, registered_name, checkpoint, class_names, description)
    except OSError as err:  # the version is not made champion: record_gate is never reached
        if err.errno in _STORE_ERRNOS:
            raise artifact_store_error(ref, err) from err
        raise


def _log_model(ref: RunRef, data: Path, registered_name: str, checkpoint: Path, class_names: list[str],
               description: str) -> dict[str, str]:  # fmt: skip
    import mlflow.pyfunc
    import pandas as pd
    from mlflow.models import Model

    from mlpipe import serving

    # LoggedModels live in the run's experiment: Model.log takes it from the active one.
    with _fluent_tracking_uri(ref.tracking_uri, ref.experiment_id), tempfile.TemporaryDirectory() as scratch:
        code = Path(scratch) / "mlpipe"  # the modules serving runs, and nothing else of the package
        for rel in serving.code_files():
            (Path(scratch) / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(Path(serving.__file__).parent.parent / rel, Path(scratch) / rel)
        info = Model.log(  # mlflow.pyfunc.log_model's own call, which also takes the run (it has no run_id)
            artifact_path=None,
            name="model",
            flavor=mlflow.pyfunc,
            run_id=ref.run_id,
            loader_module="mlpipe.serving",
            data_path=str(data),
            code_paths=[str(code)],
            registered_model_name=registered_name,
            signature=serving_signature(class_names),
            input_example=pd.DataFrame({serving.IMAGE: [serving.example_image(data)]}),
            pip_requirements=serving_requirements(),
        )
    version = str(info.registered_model_version)
    client = _client(ref.tracking_uri)
    client.log_artifact(ref.run_id, str(checkpoint), CHECKPOINT_DIR)
    client.set_model_version_tag(registered_name, version, "mlpipe.class_names", json.dumps(class_names))
    if description:
        client.update_model_version(registered_name, version, description=description[:MAX_DESCRIPTION])
        client.set_logged_model_tags(info.model_id, {DESCRIPTION_TAG: description[:MAX_DESCRIPTION]})
    if not client.get_registered_model(registered_name).description:  # one the user wrote is kept
        client.update_registered_model(registered_name, description=REGISTERED_MODEL_DESCRIPTION)
    set_tags(ref, {"mlpipe.model_uri": info.model_uri, "mlpipe.registered_model": f"{registered_name}/{version}"})
    return {"model_uri": info.model_uri, "model_id": info.model_id, "registered_model": registered_name,
            "version": version}  # fmt: skip


MAX_DESCRIPTION = 5000  # MLflow's limit on a model version's description, in characters
REGISTERED_MODEL_DESCRIPTION = (
    "Image classifier trained by the mlpipe training pipeline. Each version's description is its model card "
    "(data, split, metrics with 95% intervals, baseline, gate decision); `@champion` serves, `@challenger` "
    "is the latest version the gate did not promote.")  # fmt: skip


CHECKPOINT_DIR = "model_checkpoint"


def champion(ref: RunRef, registered_name: str, workdir: Path) -> dict | None:
    """The current `@champion`: version, its checkpoint (downloaded into `workdir`) and class map."""
    client = _client(ref.tracking_uri)
    try:
        version = client.get_model_version_by_alias(registered_name, "champion")
    except MlflowException:
        return None  # no registered model, or no champion yet
    path = client.download_artifacts(version.run_id, f"{CHECKPOINT_DIR}/checkpoint.pt", str(workdir))
    names = json.loads(version.tags.get("mlpipe.class_names", "null"))
    return {"version": str(version.version), "checkpoint": path, "class_names": names}


ALIAS_ATTEMPTS = 8


def set_alias(client: MlflowClient, registered_name: str, alias: str, version: str) -> None:
    """Point `alias` at `version`, even while other runs set the same alias. MLflow's stores set an
    alias by a read and then an insert or update (`session.merge`), so when two runs set an alias
    that does not exist yet at the same moment, one insert collides with the other's and the
    server answers with a unique-constraint error (seen with 8 runs on PostgreSQL). The second try
    finds the row and updates it: the last writer wins, as with any alias."""
    for attempt in range(1, ALIAS_ATTEMPTS + 1):
        try:
            client.set_registered_model_alias(registered_name, alias, version)
            return
        except MlflowException as err:
            text = str(err).lower()
            if attempt == ALIAS_ATTEMPTS or not ("unique constraint" in text or "uniqueviolation" in text):
                raise
            time.sleep(0.05 * attempt)


def record_gate(ref: RunRef, registered_name: str, version: str, gate: dict) -> None:
    """The gate's decision onto the new version (tags) and the aliases: `champion` on promotion,
    `challenger` otherwise."""
    client = _client(ref.tracking_uri)
    tags = {"mlpipe.gate.decision": gate["decision"], "mlpipe.gate.reasons": "; ".join(gate["reasons"])[:5000],
            "mlpipe.gate.previous_champion": str(gate.get("champion_version"))}  # fmt: skip
    for key, value in tags.items():
        client.set_model_version_tag(registered_name, version, key, value)
    alias = "champion" if gate["decision"] == "promote" else "challenger"
    set_alias(client, registered_name, alias, version)
    set_tags(ref, {"mlpipe.gate.decision": gate["decision"]})


def promote(registered_name: str, version: str, reason: str, uri: str | None = None) -> str | None:
    """Move `champion` to `version` by hand (a rollback), recorded on the version. Returns the
    previous champion's version."""
    client = _client(uri or tracking_uri())
    try:
        client.get_model_version(registered_name, version)
    except MlflowException as err:
        raise MlpipeError(f"cannot promote {registered_name} version {version}: {str(err).splitlines()[0]}") from None
    try:
        previous = str(client.get_model_version_by_alias(registered_name, "champion").version)
    except MlflowException:
        previous = None
    set_alias(client, registered_name, "champion", version)
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    client.set_model_version_tag(registered_name, version, "mlpipe.gate.decision", "manual promote")
    client.set_model_version_tag(registered_name, version, "mlpipe.gate.reasons", f"{reason} at {stamp}; previous champion {previous}")
    return previous


# --- provenance and crash hygiene --------------------------------------------------------------

OWNER_TAGS = ("mlpipe.host", "mlpipe.pid", "mlpipe.pid_started")


def owner_tags() -> dict[str, str]:
    """Which process owns a RUNNING run: `reconcile` ends runs whose process is gone."""
    import socket

    import psutil

    me = psutil.Process()
    return {"mlpipe.host": socket.gethostname(), "mlpipe.pid": str(me.pid), "mlpipe.pid_started": f"{me.create_time():.3f}"}


def previous_run(ref: RunRef, deployment: str) -> tuple[str, dict[str, str]] | None:
    """(run id, params) of the latest earlier parent run of the same deployment ('' for the CLI)
    in this experiment."""
    client = _client(ref.tracking_uri)
    started = client.get_run(ref.run_id).info.start_time
    runs = client.search_runs(
        [ref.experiment_id], f"attributes.start_time < {started}" + (f" and tags.`prefect.deployment` = '{deployment}'" if deployment else ""),
        order_by=["attributes.start_time DESC"], max_results=20,
    )  # fmt: skip
    for run in runs:
        is_parent = MLFLOW_PARENT_RUN_ID not in run.data.tags
        same = run.data.tags.get("prefect.deployment", "") == deployment
        if run.info.run_id != ref.run_id and is_parent and same:
            return run.info.run_id, run.data.params
    return None


def param_diff(before: dict[str, str], after: dict[str, str]) -> dict[str, dict[str, str | None]]:
    return {k: {"before": before.get(k), "after": after.get(k)}
            for k in sorted(set(before) | set(after)) if before.get(k) != after.get(k)}  # fmt: skip


def log_dict(ref: RunRef, data: Any, artifact_file: str) -> None:
    _write(ref, _client(ref.tracking_uri).log_dict, ref.run_id, data, artifact_file)


def end_flow_run(flow_run_id: str, experiment: str, status: str, uri: str | None = None) -> list[str]:
    """End every RUNNING run (parent and children) of a Prefect flow run as `status` (FAILED or
    KILLED). For Prefect's on_failure / on_crashed / on_cancellation hooks."""
    client = _client(uri)
    check_reachable(client.tracking_uri)  # a server that is down: fail now, not after a retry window
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return []
    parents = client.search_runs([found.experiment_id], f"tags.`prefect.flow_run_id` = '{flow_run_id}'")
    return [run_id for parent in parents for run_id in _end_tree(client, found.experiment_id, parent.info.run_id, status)]


def _end_tree(client: MlflowClient, experiment_id: str, parent_id: str, status: str) -> list[str]:
    children = client.search_runs([experiment_id], f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{parent_id}'")
    ended = []
    for run_id in [parent_id, *(c.info.run_id for c in children)]:
        if client.get_run(run_id).info.status == "RUNNING":
            client.set_terminated(run_id, status=status)
            client.set_tag(run_id, "mlpipe.ended_by", "crash hygiene")
            ended.append(run_id)
    return ended


def reconcile(uri: str | None = None) -> list[str]:
    """End the RUNNING parent runs (and their children) whose owning process on this host is
    gone, as KILLED: a flow killed outright (SIGKILL, power loss) ran no hook. Returns run ids."""
    import socket

    import psutil

    client, host, ended = _client(uri), socket.gethostname(), []
    experiments = [e.experiment_id for e in client.search_experiments()]
    if not experiments:
        return []
    for run in client.search_runs(experiments, "attributes.status = 'RUNNING' and tags.`mlpipe.host` != ''",
                                  max_results=1000):  # fmt: skip
        tags = run.data.tags
        if tags.get("mlpipe.host") != host or MLFLOW_PARENT_RUN_ID in tags:
            continue
        try:
            alive = f"{psutil.Process(int(tags['mlpipe.pid'])).create_time():.3f}" == tags["mlpipe.pid_started"]
        except (psutil.NoSuchProcess, KeyError, ValueError):
            alive = False
        if not alive:
            ended += _end_tree(client, run.info.experiment_id, run.info.run_id, "KILLED")
    return ended


# --- reproducing a run from its record ---------------------------------------------------------


class RunRecord(BaseModel):
    """What `mlpipe reproduce` reads of a pipeline's parent run, through MLflow alone."""

    run_id: str
    tracking_uri: str
    status: str
    config_yaml: str  # the resolved config, as the run logged it
    tags: dict[str, str]
    test_metrics: dict[str, float]
    train_devices: list[str]  # where the trials trained (train/report.json): "cpu", "cuda"
    pseudonym_key_id: str | None  # anonymize/report.json: a one-way handle of the key, never the key


def run_record(run_id: str, uri: str | None = None) -> RunRecord:
    uri = uri or tracking_uri()
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():  # MLflow would create one
        raise MlpipeError(f"no MLflow store at {uri}")
    client = _client(uri)
    try:
        run = client.get_run(run_id)
    except MlflowException as err:
        raise MlpipeError(f"MLflow run {run_id} not found at {uri} ({str(err).splitlines()[0][:160]})") from None
    tags = run.data.tags
    if MLFLOW_PARENT_RUN_ID in tags:
        raise MlpipeError(f"MLflow run {run_id} is a trial's child run; name its parent run {tags[MLFLOW_PARENT_RUN_ID]}")
    import tempfile

    with tempfile.TemporaryDirectory() as scratch:
        config = _artifact_text(client, run_id, "config.yaml", scratch)
        if config is None:
            raise MlpipeError(f"MLflow run {run_id} has no config.yaml artifact: not an mlpipe pipeline run")
        train = json.loads(_artifact_text(client, run_id, "train/report.json", scratch) or "{}")
        anonymize = json.loads(_artifact_text(client, run_id, "anonymize/report.json", scratch) or "{}")
    return RunRecord(
        run_id=run_id, tracking_uri=uri, status=run.info.status, config_yaml=config, tags=dict(tags),
        test_metrics={k: v for k, v in run.data.metrics.items() if k.startswith("test_")},
        train_devices=sorted({str(t["device"]) for t in train.get("trials", []) if t.get("device")}),
        pseudonym_key_id=anonymize.get("key_id"),
    )  # fmt: skip


def _artifact_text(client: MlflowClient, run_id: str, path: str, scratch: str) -> str | None:
    try:
        return Path(client.download_artifacts(run_id, path, scratch)).read_text(encoding="utf-8")
    except (MlflowException, OSError):
        return None


def tag_run(run_id: str, tags: dict[str, str], uri: str | None = None) -> None:
    """Tags on a run outside a pipeline run (it may have ended), written now."""
    _client(uri).log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])


def load_serving_model(model_uri: str, workdir: Path, device: str = "cpu", batch_size: int = 256) -> tuple[Any, dict]:
    """The registered serving model as MLflow's pyfunc wrapper (the schema enforcement a server
    applies) around this installed `mlpipe.serving` code, and what it is (`download_serving_model`)."""
    from mlflow.pyfunc import PyFuncModel

    from mlpipe import serving

    folder, meta, info = download_serving_model(model_uri, workdir)
    impl = serving.load(folder, device=device, batch_size=batch_size)
    return PyFuncModel(model_meta=meta, model_impl=impl), info


def download_serving_model(model_uri: str, workdir: Path) -> tuple[Path, Any, dict]:
    """(the model's data folder, its MLmodel, what it is: model_uri, registered_model, version,
    training_run_id) of a serving model downloaded into `workdir`.

    `model_uri`: `models:/NAME@alias`, `models:/NAME/VERSION`, `runs:/...` or a local folder. Its
    MLmodel must name `mlpipe.serving` as loader: any other model is refused (MlpipeError), never
    loaded, because loading a foreign pyfunc can unpickle code. The code copy inside the model is
    not run; this process's mlpipe is."""
    from mlflow.models import Model

    info = _model_version_info(model_uri)
    # An alias is resolved once: the version downloaded is the version recorded, even if the alias moves meanwhile.
    source = f"models:/{info['registered_model']}/{info['version']}" if info else model_uri
    # MLflow resolves a models:/ URI through its process-wide tracking and registry URIs, not the tracking_uri
    # passed below: with MLFLOW_TRACKING_URI unset, that was ./mlflow.db (made empty in the working directory),
    # and after an earlier set_tracking_uri in this process, that earlier store.
    try:
        with _fluent_tracking_uri(tracking_uri()):
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=str(workdir),
                                                             tracking_uri=tracking_uri()))  # fmt: skip
    except (MlflowException, OSError) as err:
        raise MlpipeError(f"cannot load model {model_uri}: {_first_line(err)}") from None
    try:
        meta = Model.load(str(local))
    except (OSError, MlflowException):
        raise MlpipeError(f"{model_uri} is not an MLflow model (no MLmodel file)") from None
    flavour = meta.flavors.get("python_function", {})
    if flavour.get("loader_module") != "mlpipe.serving":
        raise MlpipeError(f"{model_uri} is not an mlpipe serving model (loader {flavour.get('loader_module')!r}); "
                          "models registered before pyfunc serving need a retrain")  # fmt: skip
    return local / flavour["data"], meta, {**info, "model_uri": model_uri}


def _model_version_info(model_uri: str) -> dict:
    """name, version and run id of a `models:/NAME@alias` or `models:/NAME/VERSION` URI's
    registered version; {} for other URIs (runs:/, a folder, MLflow 3's logged models `models:/m-...`)."""
    rest = model_uri.removeprefix("models:/")
    if rest == model_uri or ("@" not in rest and "/" not in rest):
        return {}
    name, _, ref = rest.partition("@")
    client = _client()
    try:
        if ref:
            version = client.get_model_version_by_alias(name, ref)
        else:
            name, _, number = name.partition("/")
            version = client.get_model_version(name, number)
    except MlflowException as err:
        hint = ""
        if ref and "alias" in str(err).lower() and "not found" in str(err).lower():
            hint = (f": no version of {name} holds @{ref} (a version the registry gate rejected gets none); name one, "
                    f"--model models:/{name}/VERSION")  # fmt: skip
            if ref == "champion":  # what promote moves
                hint += f", or give it the alias: mlpipe promote --model {name} --version VERSION"
        raise MlpipeError(f"cannot load model {model_uri}: {_first_line(err).rstrip('.')}{hint}") from None
    return {"registered_model": version.name, "version": str(version.version), "training_run_id": version.run_id}


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
