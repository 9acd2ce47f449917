"""`mlpipe`: run the pipeline, or write the sample dataset.

    mlpipe run [--config FILE] [--set dotted.key=value ...]
    mlpipe check [--config FILE] [--set dotted.key=value ...]
    mlpipe config [--config FILE] [--set dotted.key=value ...] [--schema]
    mlpipe reproduce RUN_ID [--tracking-uri URI] [--state-dir DIR]
    mlpipe sample-data DIR
    mlpipe predict [--model URI] [--output FILE] [--batch-size N] [--device D] SOURCE [SOURCE ...]
    mlpipe promote --version N
    mlpipe reconcile
    mlpipe serve [--name N] [--cron EXPR --timezone TZ] [--config FILE]
    mlpipe join [--idle-exit SECONDS]

Bad input ends with one line on stderr and a non-zero exit: 2 for usage and config errors,
1 for a pipeline that failed (and for data that `mlpipe check` or the run's start finds unusable).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

# Before Prefect, MLflow or albumentations are imported: no telemetry, no update checks.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "mlpipe")
os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")  # library logs outside a flow
# The temporary server's start, not 20 s: on a busy 2-core machine it takes longer.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")

from flows import ephemeral  # noqa: E402

from mlpipe.config import load_config  # noqa: E402
from mlpipe.errors import MlpipeError  # noqa: E402


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mlpipe", description="Prefect + MLflow pipeline for image classifiers.")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the pipeline (default: the embedded sample://digits on CPU)")
    run.add_argument("--config", type=Path, help="YAML file validated against PipelineConfig")
    run.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                     help="override one config value, e.g. --set train.lr=0.01 (repeatable)")  # fmt: skip
    check = sub.add_parser("check", help="validate the config and its data in seconds, without a run: source, "
                           "columns against the policy, labels, class counts, model and augmentation, a sample "
                           "of images; exit 1 with one line per problem")  # fmt: skip
    show = sub.add_parser("config", help="print the config as YAML (defaults, then the file, then each --set)")
    show.add_argument("--schema", action="store_true", help="print PipelineConfig's JSON schema instead")
    for command in (check, show):
        command.add_argument("--config", type=Path, help="YAML file validated against PipelineConfig")
        command.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                             help="override one config value (repeatable)")  # fmt: skip
    again = sub.add_parser("reproduce", help="rerun an MLflow run from its record (config, data fingerprint, code "
                           "version) in a fresh state directory; exit 1 if its test metrics differ on CPU")  # fmt: skip
    again.add_argument("run_id", metavar="RUN_ID", help="the pipeline's parent MLflow run")
    again.add_argument("--tracking-uri", help="MLflow store holding the run (default: as mlpipe run); the new run goes there too")
    again.add_argument("--state-dir", type=Path, help="new or empty directory to recompute in (default: a new one in "
                       "<state>/reproductions/)")  # fmt: skip
    predict = sub.add_parser("predict", help="score new images with a registered model; write predictions.csv")
    predict.add_argument("sources", nargs="+", metavar="SOURCE", help="a folder or fsspec URL (every image under it), "
                         "a manifest (.csv, .parquet, .jsonl; paths relative to its folder), or image files")  # fmt: skip
    predict.add_argument("--model", default="models:/mlpipe-classifier@champion", help="MLflow model URI")
    predict.add_argument("--output", type=Path, default=Path("predictions.csv"), help="CSV to write")
    predict.add_argument("--batch-size", type=int, default=256, help="images per forward pass")
    predict.add_argument("--device", default="cpu", help="cpu (what `mlflow models serve` runs: the same numbers), "
                         "cuda, cuda:N, or auto (cuda when available)")  # fmt: skip
    predict.add_argument("--image-column", default="image", help="a manifest's column of image paths")
    sample = sub.add_parser("sample-data", help="write the embedded dataset as a manifest plus image files")
    sample.add_argument("dir", type=Path)
    promote = sub.add_parser("promote", help="move the @champion alias to a model version (a rollback), recorded")
    promote.add_argument("--version", required=True, help="registered model version to make champion")
    promote.add_argument("--model", default="mlpipe-classifier", help="registered model name")
    promote.add_argument("--reason", default="manual promote (mlpipe promote)", help="recorded on the version")
    sub.add_parser("reconcile", help="end MLflow runs left RUNNING by flow runs killed outright, as KILLED")
    serve = sub.add_parser("serve", help="serve the pipeline as a deployment from this process (no work pool or worker)")
    serve.add_argument("--name", default="mlpipe-serve", help="deployment name")
    serve.add_argument("--cron", help="schedule, e.g. '0 2 * * *' (timezone: --timezone)")
    serve.add_argument("--timezone", default="UTC")
    serve.add_argument("--config", type=Path, help="YAML file: the deployment's default parameters")
    join = sub.add_parser("join", help="on another node: run this node's part of each multi-node launch (train.nnodes)")
    join.add_argument("--idle-exit", type=float, metavar="SECONDS", help="exit after this long without a new launch")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "sample-data":
            return _sample_data(args.dir)
        if args.command == "predict":
            return _predict(args)
        if args.command == "promote":
            return _promote(args.model, args.version, args.reason)
        if args.command == "reconcile":
            return _reconcile()
        if args.command == "serve":
            return _serve(args.name, args.cron, args.timezone, load_config(args.config, []))
        if args.command == "join":
            return _join(args.idle_exit)
        if args.command == "reproduce":
            return _reproduce(args.run_id, args.tracking_uri, args.state_dir)
        if args.command == "config" and args.schema:
            return _print_schema()
        config = load_config(args.config, args.sets)
        if args.command == "config":
            return _print_config(config)
        if args.command == "check":
            return _check(config)
    except MlpipeError as err:
        print(f"mlpipe: error: {err}", file=sys.stderr)
        return 2
    config = _decide_auto(config)
    if isinstance(config, int):
        return config
    return _run(config, prepare_in_background())


def _decide_auto(config):
    """The config with its auto values decided from the data before anything starts (no Prefect
    server, no MLflow store), so that a config they make invalid is refused in seconds; or the
    exit code after one line on stderr: 1 for unreadable data, 2 for an invalid decided config."""
    from mlpipe.ingest import DataError, describe_decided, resolve_config

    try:
        resolved, decided, detection = resolve_config(config)
    except MlpipeError as err:
        print(f"mlpipe: error: {err}", file=sys.stderr)
        return 1 if isinstance(err, DataError) else 2
    if decided:
        print(f"mlpipe: {describe_decided(decided, detection)}", file=sys.stderr)
    return resolved


def _check(config) -> int:
    """`mlpipe.check.check_config`: the summary on stdout, one line per problem on stderr; 1 if any."""
    from mlpipe.check import check_config

    report = check_config(config)
    print("\n".join(report.summary))
    for line in report.warnings:
        print(f"mlpipe: warning: {line}", file=sys.stderr)
    for line in report.problems:
        print(f"mlpipe: error: {line}", file=sys.stderr)
    return 1 if report.problems else 0


def _print_config(config) -> int:
    from mlpipe.config import to_yaml

    print(to_yaml(config), end="")
    return 0


def _print_schema() -> int:
    import json

    from mlpipe.config import PipelineConfig

    print(json.dumps(PipelineConfig.model_json_schema(), indent=2))
    return 0


def _reproduce(run_id: str, uri: str | None, state_dir: Path | None) -> int:
    """The record through MLflow only; refused (exit 2) unless code and data match it; then `_run`
    with that config in a fresh state directory (no cache can answer), the new run tagged
    `mlpipe.reproduces`, and the verdict on its test metrics."""
    from mlpipe import reproduce, tracking

    uri = uri or tracking.tracking_uri()
    home = reproduce.fresh_state_dir(state_dir, run_id)
    quiet = {"MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": os.environ.get("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")}
    with _environ(MLPIPE_HOME=str(home), MLFLOW_TRACKING_URI=uri, **{reproduce.REPRODUCES_ENV: run_id}, **quiet):
        record = tracking.run_record(run_id, uri)
        with reproduce.cleared_on_refusal(home):
            config = load_config(reproduce.write_config(home, record.config_yaml))
            warnings = reproduce.check(run_id, record.status, record.tags, config)
        for warning in warnings:
            print(f"mlpipe: warning: {warning}", file=sys.stderr)
        print(f"mlpipe: reproducing run {run_id} in {home}", file=sys.stderr)
        from prefect.settings import PREFECT_LOCAL_STORAGE_PATH, temporary_settings

        with temporary_settings(updates={PREFECT_LOCAL_STORAGE_PATH: home / "prefect-results"}):
            return _run(config, prepare_in_background(), then=lambda summary: _verdict(record, summary["run_id"]))


def _verdict(record, new_run_id: str) -> int:
    from mlpipe import reproduce, tracking

    new = tracking.run_record(new_run_id, record.tracking_uri)
    verdict = reproduce.compare(record.run_id, record.test_metrics, new.test_metrics,
                                sorted({*record.train_devices, *new.train_devices}),
                                (record.pseudonym_key_id, new.pseudonym_key_id))  # fmt: skip
    tracking.tag_run(new_run_id, {reproduce.VERDICT_TAG: verdict.word}, record.tracking_uri)
    print("\n".join(verdict.lines))
    return verdict.exit_code


@contextlib.contextmanager
def _environ(**updates: str) -> Iterator[None]:
    """Environment variables for the block, restored after it (`main` may run in a test's process)."""
    before = {k: os.environ.get(k) for k in updates}
    os.environ.update(updates)
    try:
        yield
    finally:
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextlib.contextmanager
def _results_in_state_dir() -> Iterator[None]:
    """Cached stage results (small JSON handles) beside the stage folders they name: in the state
    directory as it is resolved when the flow starts (`MLPIPE_HOME`, else `./.mlpipe`), unless
    PREFECT_LOCAL_STORAGE_PATH is set. Applied here, not when this module is imported: an import
    (a test's, a library user's) must not point Prefect at the working directory's `.mlpipe`.
    Prefect reads its settings once, at its own import, so the setting goes into the current
    settings context (this process, `main` called in-process included) and into the environment
    (flow-run processes `flow.serve` starts); both are restored after the block."""
    if os.environ.get("PREFECT_LOCAL_STORAGE_PATH"):
        yield
        return
    from prefect.settings import PREFECT_LOCAL_STORAGE_PATH, temporary_settings

    from mlpipe.store import state_path

    path = state_path() / "prefect-results"
    with _environ(PREFECT_LOCAL_STORAGE_PATH=str(path)), temporary_settings(updates={PREFECT_LOCAL_STORAGE_PATH: path}):
        yield


def _predict(args: argparse.Namespace) -> int:
    """Score images with the serving model (the pyfunc `mlflow models serve` answers with)."""
    import tempfile

    import torch
    from tqdm import tqdm

    from mlpipe import tracking
    from mlpipe.predict import list_inputs, predict_inputs, write_predictions

    if args.batch_size < 1:
        raise MlpipeError(f"--batch-size must be at least 1, not {args.batch_size}")
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise MlpipeError(f"--device {device}: no CUDA device is visible here (use cpu or auto)")
    src, inputs = list_inputs(args.sources, args.image_column)
    if not inputs:
        raise MlpipeError(f"no image files in {' '.join(args.sources)} (suffixes: png, jpg, tif, ...)")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    with tempfile.TemporaryDirectory() as scratch:
        model, info = tracking.load_serving_model(args.model, Path(scratch), device, args.batch_size)
        with tqdm(total=len(inputs), unit="img", desc="predict", disable=None) as bar:
            counts = write_predictions(predict_inputs(model, inputs, src, args.batch_size, bar.update), args.output)
    version = f" (version {info['version']})" if "version" in info else ""
    failed = sum(counts["failed"].values())
    print(f"{args.model}{version}: {counts['images']} images, {counts['images'] - failed} predicted, {failed} failed")
    for reason, n in counts["failed"].items():
        print(f"  failed: {reason} {n}")
    print(f"wrote {args.output}")
    return 0


def _promote(model: str, version: str, reason: str) -> int:
    from mlpipe import tracking

    previous = tracking.promote(model, version, reason)
    print(f"{model}: champion is now version {version} (was {previous or 'none'})")
    return 0


def _serve(name: str, cron: str | None, timezone: str, config) -> int:
    """`flow.serve`: the deployment runs in this process, started from the UI, the API or its
    schedule; needs a Prefect server (PREFECT_API_URL)."""
    from prefect.schedules import Cron

    from flows.training_pipeline import training_pipeline

    schedules = [Cron(cron, timezone=timezone)] if cron else []
    with _results_in_state_dir():
        training_pipeline.serve(name=name, schedules=schedules, parameters={"config": config.model_dump(mode="json")})
    return 0


def _join(idle_exit: float | None) -> int:
    """Launches are found in MLPIPE_HOME/launches/, on the storage the nodes share; 1 if one failed."""
    from mlpipe.train.launch import join

    logging.basicConfig(format="%(asctime)s %(message)s")
    logging.getLogger("mlpipe").setLevel(logging.INFO)
    outcomes = join(idle_exit)
    print(f"joined {len(outcomes)} launch(es), {sum(e is not None for e in outcomes.values())} failed")
    return int(any(e is not None for e in outcomes.values()))


def _reconcile() -> int:
    from mlpipe import tracking

    ended = tracking.reconcile()
    print(f"ended {len(ended)} MLflow run(s) whose flow process is gone, as KILLED" + (f": {', '.join(ended)}" if ended else ""))
    return 0


def _sample_data(target: Path) -> int:
    from mlpipe.sample import write_sample_digits

    if target.exists() and any(target.iterdir()):
        raise MlpipeError(f"{target} exists and is not empty")
    root = write_sample_digits(target)
    print(f"wrote {root / 'manifest.csv'} and {root / 'images'}/")
    return 0


class ExpectedErrorTraceback(logging.Filter):
    """Prefect logs a failed task with its traceback. For an `MlpipeError` (bad input, a failed
    check) the message already says everything, so the console gets the message alone."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], MlpipeError):
            record.exc_info, record.exc_text = None, None
        return True


def prepare_in_background() -> Callable[[], None]:
    """Prefect's temporary server and a new local MLflow store take seconds each to come up;
    started first, they do so on the other core while the flow imports. Returns the wait for both."""
    server = ephemeral.start_in_background()
    from mlpipe import tracking

    store = tracking.create_store_in_background()

    def ready() -> None:
        if store is not None:
            store.wait()
        tracking.connect()  # while the server may still be starting
        if server is not None:
            server.join()

    return ready


def _run(config, ready: Callable[[], None] = lambda: None, then: Callable[[dict], int] | None = None) -> int:
    from flows.training_pipeline import training_pipeline

    ready()
    for name in ("prefect.flow_runs", "prefect.task_runs"):
        logging.getLogger(name).addFilter(ExpectedErrorTraceback())
    logging.getLogger("mlpipe").setLevel(logging.INFO)
    with _results_in_state_dir(), ephemeral.flow_run_settings():
        state = training_pipeline(config, return_state=True)
    ephemeral.settle_and_stop(str(state.state_details.flow_run_id))
    try:
        summary = state.result()
    except MlpipeError as err:
        print(f"mlpipe: error: {err}", file=sys.stderr)
        return 1
    except Exception as err:  # noqa: BLE001 - anything else: one line; the Prefect log above has the details
        reason = str(err).splitlines()[0] if str(err) else ""
        print(f"mlpipe: error: pipeline failed: {type(err).__name__}: {reason}", file=sys.stderr)
        return 1
    _print_summary(summary)
    return then(summary) if then else 0


def _print_summary(summary: dict) -> None:
    metrics = summary["metrics"]
    print()
    print(f"Prefect flow run:  {summary['flow_run_id']}")
    print(f"MLflow experiment: {summary['experiment_name']} (id {summary['experiment_id']})")
    print(f"MLflow run:        {summary['run_id']}")
    print(f"Tracking URI:      {summary['tracking_uri']}")
    registered_as = summary.get("registered_as", "deep model")
    print(f"Registered model:  {summary['registered_model']} version {summary['version']}"
          + (f" (the {registered_as}, not the deep model)" if registered_as != "deep model" else ""))  # fmt: skip
    headline = ("accuracy", "balanced_accuracy", "macro_f1", "roc_auc", "pr_auc", "roc_auc_ovr", "log_loss", "ece")
    print("Test metrics:      " + "  ".join(f"{k}={metrics[f'test_{k}']:.4f}" for k in headline if f"test_{k}" in metrics))
    if summary.get("baselines"):
        print("Baselines:         " + "  ".join(f"{name} macro_f1={m['test_macro_f1']:.4f}" for name, m in summary["baselines"].items())
              + f" (best on validation: {summary['best_baseline']})")  # fmt: skip
    print(f"Registry gate:     {summary['gate']}")
    print("Data accounting (rows per stage):")
    for line in summary.get("accounting", []):
        print(f"  {line}")


if __name__ == "__main__":
    sys.exit(main())
