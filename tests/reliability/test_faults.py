"""Faults (issue 9): each injected for real where this machine allows it, each with the outcome a
user relies on asserted.

    fault                                      pass criterion                                     test
    a DDP worker SIGKILLed mid-epoch           resumes; metrics equal an uninterrupted run         rank 1: tests/unit/test_train.py
                                                                                                   ::test_sigkill_of_one_rank_...;
                                                                                                   rank 0 (the writer): here
    the flow process SIGKILLed mid-search      the rerun repeats no finished trial; no MLflow      here (tests/flows/test_crash.py:
                                               run left RUNNING                                    a kill inside a one-trial grid)
    the artifact store full / read-only        one-line error naming the store; checkpoints load;  here (a real tmpfs, filled or
                                               the previous @champion and its tags untouched       remounted read-only)
    the MLflow server down at start            fails at once, in one line                          tests/unit/test_provenance.py
                                                                                                   ::test_an_unreachable_...
    the MLflow server down mid-run             retried within bounds, then a one-line error        here (a real `mlflow server`,
                                               naming the server; local stage outputs kept;        killed; then restarted on the
                                               a restart within the retry window is ridden out     same port)
    a checkpoint file truncated                detected, the previous good one used (or the        here
                                               trial starts over); metrics as if uninterrupted

Every flow here reads the embedded sample with personal-data canaries planted (tests/privacy.py),
and after each test the canary scan runs over everything it wrote: the state directory (stage
files, checkpoints, the local MLflow store and artifacts), the MLflow server's database and
artifacts, the Prefect database its flows ran on and every log. None may hold a canary, faults
and failure messages included.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from mlpipe import tracking
from mlpipe.config import PipelineConfig, TrainConfig
from mlpipe.errors import MlpipeError
from mlpipe.train import worker
from mlpipe.train.launch import launch
from mlpipe.train.spec import TrialResult, TrialSpec, WorkerSpec
from tests.privacy import files_under, scan
from tests.servers import BIN, free_port, start, stop, wait_for
from tests.flows.test_crash import _workers
from tests.unit.test_train import FAST, _without_timing, kill_rank_when_logged, worker_data

# A flow small enough to run several times: one trial, one epoch (two where a fault must land mid-training),
# no threshold for the registry gate, so the first model a test registers becomes @champion.
FLOW = {"train.epochs": 1, "train.nproc": 1, "search.grid": {"train.lr": [0.003]}, "evaluate.bootstrap_resamples": 100,
        "evaluate.thresholds": {}}  # fmt: skip


@pytest.fixture(scope="module")
def harness():
    """A temporary Prefect server for this module's in-process flow runs."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(autouse=True)
def source(canary_sample, tmp_path, request) -> Path:
    """The data every flow here reads: the sample with canaries planted. After the test, the
    canary scan over all it wrote (under tmp_path; and the test harness's Prefect database)."""
    yield canary_sample
    places = [tmp_path]
    if "harness" in request.fixturenames:
        from prefect.settings import get_current_settings

        database = get_current_settings().server.database.connection_url.get_secret_value()
        places.append(Path(database.split("///", 1)[1]))
    written = files_under(*places)
    assert written
    assert scan(written) == []


def _flow(source: Path, overrides: dict):
    from flows.training_pipeline import training_pipeline

    config = PipelineConfig().with_overrides({**FLOW, "source.uri": str(source), **overrides})
    return training_pipeline(config, return_state=True)


def _error_of(state) -> BaseException:
    assert state.is_failed(), state
    with pytest.raises(BaseException) as caught:
        state.result()
    return caught.value


def _one_line_error(state) -> str:
    """The failed run's error: an MlpipeError of one line."""
    err = _error_of(state)
    assert isinstance(err, MlpipeError), repr(err)
    assert "\n" not in str(err)
    return str(err)


def _history(folder: Path) -> list[dict]:
    return _without_timing(json.loads((folder / "result.json").read_text())["history"])


# --- a checkpoint file truncated -----------------------------------------------------------------


@pytest.mark.parametrize("damaged", [("last.pt",), ("last.pt", "last.prev.pt")], ids=["last", "last-and-previous"])
def test_a_truncated_checkpoint_is_detected_and_the_previous_good_one_used(tmp_path, capsys, damaged):
    """A trial paused after 2 of 3 epochs; its `last.pt` cut to half its size (and, in the second
    case, `last.prev.pt` too). Resumed, it completes: the log names the unreadable file and the one
    used, and the history equals an uninterrupted 3-epoch run's."""
    pixels, train_set, val_set = worker_data(tmp_path, 120)
    cfg = TrainConfig(**{**FAST, "epochs": 3, "patience": 10, "augment": TrainConfig().augment})
    (tmp_path / "clean").mkdir()
    (tmp_path / "cut").mkdir()

    def spec(stop_after: int | None) -> Path:
        trials = [TrialSpec(name="trial-000", train=cfg, train_set=train_set, out_dir=str(tmp_path / "clean")),
                  TrialSpec(name="trial-001", train=cfg, train_set=train_set, out_dir=str(tmp_path / "cut"),
                            stop_after=stop_after)]  # fmt: skip
        path = tmp_path / "spec.json"
        path.write_text(WorkerSpec(pixels=pixels, val_set=val_set, num_classes=3, trials=trials).model_dump_json())
        return path

    worker.main(["--spec", str(spec(stop_after=2))])  # trial-000: 3 epochs; trial-001 pauses after 2
    cut = tmp_path / "cut"
    assert torch.load(cut / "last.pt", weights_only=True)["epoch"] == 1
    assert torch.load(cut / "last.prev.pt", weights_only=True)["epoch"] == 0  # the one before it, kept
    for name in damaged:
        data = (cut / name).read_bytes()
        (cut / name).write_bytes(data[: len(data) // 2])
    capsys.readouterr()

    worker.main(["--spec", str(spec(stop_after=None))])  # trial-000 is done and skipped; trial-001 resumes
    log = capsys.readouterr().out
    assert re.search(rf"trial-001 WARNING: checkpoint {re.escape(str(cut / 'last.pt'))} is unreadable \(truncated or corrupt", log)
    if len(damaged) == 1:
        assert "trial-001 resuming from the previous good checkpoint last.prev.pt (epoch 0)" in log
        assert "trial-001 resumed after epoch 0" in log
    else:
        assert "trial-001 WARNING: the previous checkpoint last.prev.pt is unreadable" in log and "starts over" in log
        assert "resumed after" not in log
    result = TrialResult.model_validate_json((cut / "result.json").read_text())
    assert result.epochs_run == 3 and not result.paused
    assert _history(cut) == _history(tmp_path / "clean")  # epochs 1..3 as if never interrupted
    assert (cut / "last.pt.corrupt").exists()  # kept for inspection, never again a fallback
    for name in ("last.pt", "last.prev.pt", "checkpoint.pt"):
        torch.load(cut / name, weights_only=True)  # every checkpoint left behind loads
    assert not list(cut.glob("*.tmp"))


# --- a DDP worker SIGKILLed ----------------------------------------------------------------------


@pytest.mark.slow
def test_sigkill_of_rank_zero_mid_epoch_resumes_to_the_uninterrupted_result(tmp_path, state, monkeypatch):
    """tests/unit/test_train.py kills rank 1; here rank 0 dies, the rank that writes the
    checkpoints and logs to MLflow. One launch of two identical trials on 2 gloo processes with
    train.max_restarts 1: trial-000 trains undisturbed, trial-001 loses rank 0 in its second epoch.
    torchrun restarts both ranks, trial-000 is skipped as done, trial-001 resumes; the two results
    are equal, and MLflow holds one value per epoch for trial-001."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    pixels, train_set, val_set = worker_data(tmp_path, 12_000)  # about 2 s an epoch: room to land the kill
    cfg = TrainConfig(**{**FAST, "epochs": 3, "batch_size": 32, "patience": 10, "nproc": 2, "max_restarts": 1,
                         "augment": TrainConfig().augment})  # fmt: skip
    parent = tracking.start_run("faults", "ddp", {}, {})
    run_ids, trials = {}, []
    for i in range(2):
        name = f"trial-{i:03d}"
        (tmp_path / name).mkdir()
        run_ids[name] = tracking.start_child_run(parent, name, {})
        trials.append(TrialSpec(name=name, train=cfg, train_set=train_set, out_dir=str(tmp_path / name),
                                run_id=run_ids[name]))  # fmt: skip
    spec_path = tmp_path / "spec.json"
    spec_path.write_text(WorkerSpec(pixels=pixels, val_set=val_set, num_classes=3, tracking_uri=parent.tracking_uri,
                                    trials=trials).model_dump_json())  # fmt: skip
    log_path, killed = tmp_path / "launch.log", []
    killer = kill_rank_when_logged(spec_path, log_path, 0, "trial-001 epoch   0/3", killed)
    launch(spec_path, nproc=2, max_restarts=1, log_path=log_path, cpu=True)
    killer.join()
    log = log_path.read_text()
    assert killed, "rank 0 was never killed"
    before, after = log.split("trial-001 resumed after epoch", 1)  # it restarted, from the checkpoint
    assert "trial-001 epoch   2/3" not in before  # the kill landed before the last epoch
    assert "trial-000 epoch" not in after  # the finished trial was not trained again
    assert _history(tmp_path / "trial-001") == _history(tmp_path / "trial-000")
    for name in ("trial-000", "trial-001"):
        assert TrialResult.model_validate_json((tmp_path / name / "result.json").read_text()).world_size == 2
    client = MlflowClient(parent.tracking_uri)
    steps = [m.step for m in client.get_metric_history(run_ids["trial-001"], "val_macro_f1")]
    assert sorted(steps) == [0, 1, 2]  # one value per epoch, none repeated after the resume
    values = {run: [m.value for m in sorted(client.get_metric_history(run_ids[run], "val_macro_f1"), key=lambda m: m.step)]
              for run in run_ids}  # fmt: skip
    assert values["trial-000"] == values["trial-001"]


# --- the flow process SIGKILLed mid-search -------------------------------------------------------

SEARCH = ["--set", "train.epochs=3", "--set", "train.nproc=1", "--set", "search.grid={train.lr: [0.003, 0.004]}",
          "--set", "evaluate.bootstrap_resamples=100"]  # fmt: skip


def _mlpipe(home: Path, code: Path, output: Path, *args: str) -> subprocess.Popen:
    """`mlpipe ARGS`, printing into `output` (a file the canary scan reads too, as it reads the
    Prefect database in PREFECT_HOME)."""
    env = {**os.environ, "MLPIPE_HOME": str(home), "MLFLOW_TRACKING_URI": f"sqlite:///{home / 'mlflow.db'}",
           "PYTHONPATH": str(code), "PREFECT_HOME": str(home / "prefect")}  # fmt: skip
    env.pop("PREFECT_API_URL", None)  # its own temporary Prefect server, as a user's `mlpipe run`
    with output.open("w") as out:
        return subprocess.Popen([sys.executable, "-m", "flows.cli", *args], env=env, cwd=home, text=True,
                                stdout=out, stderr=subprocess.STDOUT)  # fmt: skip


def _snapshot_code(target: Path) -> Path:
    """The code both runs import: stage and trial keys include code versions, so an edit of the
    working tree between the kill and the rerun would (rightly) make every stage new."""
    root = Path(__file__).resolve().parents[2]
    for package in ("mlpipe", "tasks", "flows"):
        shutil.copytree(root / package, target / package, ignore=shutil.ignore_patterns("__pycache__"))
    return target


@pytest.mark.slow
def test_a_flow_killed_during_the_second_trial_reruns_without_repeating_the_first(tmp_path, source):
    """A grid of two trials trained one after the other (3 epochs each); `mlpipe run` is
    SIGKILLed once the second trial has saved its first epoch. The rerun takes the first trial
    as it is (its files untouched, not one epoch trained again, its curves copied into the new
    MLflow child run) and resumes the second; afterwards no MLflow run is RUNNING: the killed
    run's parent and children were ended KILLED by the rerun itself."""
    home = tmp_path / "state"
    home.mkdir()
    code = _snapshot_code(tmp_path / "code")
    killed_log, rerun_log = tmp_path / "killed.log", tmp_path / "rerun.log"
    flow = _mlpipe(home, code, killed_log, "run", *SEARCH, "--set", f"source.uri={source}")
    second: Path | None = None
    deadline = time.time() + 420
    while time.time() < deadline:
        assert flow.poll() is None, killed_log.read_text()
        if second is None:
            for spec in home.glob("work/train/.tmp-*/launch-0.json"):
                with contextlib.suppress(OSError, ValueError, IndexError):
                    second = Path(json.loads(spec.read_text())["trials"][1]["out_dir"])
        elif (second / "last.pt").exists():
            break
        time.sleep(0.1)
    assert second is not None and (second / "last.pt").exists(), "the second trial never saved an epoch"
    flow.send_signal(signal.SIGKILL)  # no hook, no finally block runs
    flow.wait()
    assert not (second / "result.json").exists(), "the kill came after the second trial had finished"
    first = next(p for p in home.glob("work/trials/*") if p != second)
    kept = {name: ((first / name).read_bytes(), (first / name).stat().st_mtime_ns)
            for name in ("result.json", "checkpoint.pt", "last.pt")}  # fmt: skip
    client = MlflowClient(f"sqlite:///{home / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("mlpipe").experiment_id
    killed = {r.info.run_id: r for r in client.search_runs([experiment])}
    assert {r.info.status for r in killed.values()} == {"RUNNING"} and len(killed) == 3  # parent + 2 trials
    gone = time.time() + 30
    while _workers(home) and time.time() < gone:
        time.sleep(0.5)
    assert not _workers(home)

    rerun = _mlpipe(home, code, rerun_log, "run", *SEARCH, "--set", f"source.uri={source}")
    assert rerun.wait(timeout=600) == 0, rerun_log.read_text()
    assert kept == {name: ((first / name).read_bytes(), (first / name).stat().st_mtime_ns) for name in kept}
    (train_dir,) = [p for p in home.glob("work/train/*") if not p.name.startswith(".")]
    report = json.loads((train_dir / "report.json").read_text())
    assert report["reused_trials"] == 1
    assert {t["trial"]: t["cached"] for t in report["trials"]} == {"trial-000": True, "trial-001": False}
    log = (train_dir / "launch-0.log").read_text()
    assert "trial-000" not in log  # not one epoch of the finished trial again
    resumed = re.search(r"trial-001 resumed after epoch (\d)", log)  # from its last.pt
    assert resumed and f"trial-001 epoch {int(resumed[1]):3d}/3" not in log

    runs = client.search_runs([experiment])
    assert "RUNNING" not in {r.info.status for r in runs}
    assert {client.get_run(run_id).info.status for run_id in killed} == {"KILLED"}
    assert {client.get_run(run_id).data.tags.get("mlpipe.ended_by") for run_id in killed} == {"crash hygiene"}
    new = [r for r in runs if r.info.run_id not in killed]
    assert {r.info.status for r in new} == {"FINISHED"} and len(new) == 3

    def curve(runs, trial):
        (run,) = [r for r in runs if r.data.tags.get("mlflow.runName") == trial]
        return [(m.step, m.value) for m in sorted(client.get_metric_history(run.info.run_id, "val_macro_f1"),
                                                  key=lambda m: m.step)]  # fmt: skip

    # The reused trial's per-epoch curve, as its worker logged it in the killed run, is in the new run too.
    assert curve(new, "trial-000") == curve(killed.values(), "trial-000") and len(curve(new, "trial-000")) == 3


# --- the artifact store full or read-only --------------------------------------------------------


class ArtifactDisk:
    """The local artifact store (`$MLPIPE_HOME/mlartifacts`) on a small tmpfs of its own, to be
    filled (ENOSPC) or remounted read-only (EROFS): real filesystem conditions, which even root
    cannot write past. Where mounting is not allowed (no CAP_SYS_ADMIN), MLflow's local artifact
    repository is made to raise the same errors instead (`simulated` says which)."""

    def __init__(self, root: Path, monkeypatch: pytest.MonkeyPatch):
        self.root, self.error = root, None
        root.mkdir(parents=True)
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=32m", "tmpfs", str(root)], check=False,
                                 capture_output=True)  # fmt: skip
        self.simulated = mounted.returncode != 0
        if self.simulated:
            warnings.warn(f"no tmpfs here ({mounted.stderr.decode().strip()}): artifact store faults are simulated",
                          stacklevel=2)  # fmt: skip
            from mlflow.store.artifact.local_artifact_repo import LocalArtifactRepository

            for method in ("log_artifact", "log_artifacts"):
                original = getattr(LocalArtifactRepository, method)
                monkeypatch.setattr(LocalArtifactRepository, method, self._failing(original))

    def _failing(self, original):
        def write(repo, *args, **kwargs):
            if self.error is not None:
                raise OSError(self.error, os.strerror(self.error))
            return original(repo, *args, **kwargs)

        return write

    def fill(self) -> None:
        if self.simulated:
            self.error = errno.ENOSPC
            return
        fd = os.open(self.root / ".filler", os.O_WRONLY | os.O_CREAT)
        try:
            for chunk in (1 << 20, 4096, 1):  # to the last byte
                with contextlib.suppress(OSError):
                    while os.write(fd, b"\0" * chunk):
                        pass
        finally:
            os.close(fd)

    def read_only(self) -> None:
        if self.simulated:
            self.error = errno.EROFS
        else:
            subprocess.run(["mount", "-o", "remount,ro", str(self.root)], check=True)

    def close(self) -> None:
        if not self.simulated:
            subprocess.run(["umount", "-l", str(self.root)], check=True)


@pytest.fixture
def artifact_disk(state, monkeypatch):
    disk = ArtifactDisk(state / "mlartifacts", monkeypatch)
    yield disk
    stored = files_under(disk.root)
    assert scan(stored) == []  # the canary scan, before the tmpfs (and what it holds) goes
    disk.close()


def _champion_record(client: MlflowClient, name: str) -> tuple[str, dict[str, str]]:
    version = client.get_model_version_by_alias(name, "champion")
    return str(version.version), dict(version.tags)


@pytest.mark.slow
def test_a_full_artifact_store_fails_the_run_in_one_line_and_leaves_the_champion(harness, state, artifact_disk, source):
    """A first run makes version 1 @champion. The second (another learning rate: a new trial)
    finds the artifact store full from its trial's first epoch on: it fails with one line naming
    the store, every checkpoint on disk loads, @champion is still version 1 with the same tags,
    its checkpoint in the store still loads, and no MLflow run is left RUNNING."""
    first = _flow(source, {"train.epochs": 2})
    assert first.is_completed(), first
    summary = first.result()
    client = MlflowClient(summary["tracking_uri"])
    name = summary["registered_model"]
    before = _champion_record(client, name)
    assert before[0] == summary["version"] == "1"

    trials = set(state.glob("work/trials/*"))
    filled = threading.Event()

    def fill_once_the_new_trial_trains() -> None:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not filled.is_set():
            if any((p / "last.pt").exists() for p in set(state.glob("work/trials/*")) - trials):
                artifact_disk.fill()
                filled.set()
            time.sleep(0.05)

    filler = threading.Thread(target=fill_once_the_new_trial_trains, daemon=True)
    filler.start()
    second = _flow(source, {"train.epochs": 2, "search.grid": {"train.lr": [0.004]}})
    filled.set()
    filler.join()
    message = _one_line_error(second)
    assert message.startswith(f"MLflow artifact store {(state / 'mlartifacts').as_uri()}"), message
    assert "ENOSPC" in message
    print(f"\nfull artifact store ({'simulated' if artifact_disk.simulated else 'tmpfs'}): {message}")

    checkpoints = list(state.glob("work/trials/*/*.pt"))
    assert len(checkpoints) >= 2 * 3  # both trials: last.pt, last.prev.pt, checkpoint.pt
    for path in checkpoints:
        torch.load(path, weights_only=True)
    assert not list(state.glob("work/trials/*/*.tmp"))
    assert _champion_record(client, name) == before
    versions = client.search_model_versions(f"name = '{name}'")
    assert all(not v.aliases or str(v.version) == before[0] for v in versions)
    ref = tracking.RunRef(**{k: summary[k] for k in tracking.RunRef.model_fields})
    champion = tracking.champion(ref, name, state / "download")
    assert champion["version"] == before[0]
    torch.load(champion["checkpoint"], weights_only=True)
    experiment = client.get_experiment_by_name("mlpipe").experiment_id
    statuses = {r.info.run_id: r.info.status for r in client.search_runs([experiment])}
    assert "RUNNING" not in statuses.values()
    assert statuses[summary["run_id"]] == "FINISHED"


def test_a_read_only_artifact_store_fails_registration_in_one_line_and_leaves_the_champion(state, artifact_disk):
    """The registration step alone (what evaluate does last), against an artifact store remounted
    read-only between two pipeline runs: the second run's model logging fails with one line naming
    the store, nothing moves @champion, and the parent run ends FAILED (not RUNNING)."""
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 2))
    checkpoint = state / "checkpoint.pt"
    torch.save({"model_state": model.state_dict()}, checkpoint)
    with tracking.pipeline_run("faults", "first", {}, {}) as run:
        registered = tracking.log_model(run, model, "faults-model", [1, 2, 2], checkpoint, ["a", "b"])
        gate = {"decision": "promote", "reasons": ["no champion yet; thresholds met"], "champion_version": None}
        tracking.record_gate(run, "faults-model", registered["version"], gate)
    client = MlflowClient(run.tracking_uri)
    before = _champion_record(client, "faults-model")

    artifact_disk.read_only()
    with pytest.raises(MlpipeError) as caught, tracking.pipeline_run("faults", "second", {}, {}) as second:
        tracking.log_stage(second, "split", {"rows": 3})  # deferred: it fails in the background
        tracking.log_model(second, model, "faults-model", [1, 2, 2], checkpoint, ["a", "b"])
        tracking.record_gate(second, "faults-model", "2", {**gate, "champion_version": before[0]})  # never reached
    message = str(caught.value)
    assert "\n" not in message and "EROFS" in message
    assert message.startswith(f"MLflow artifact store {(state / 'mlartifacts').as_uri()}"), message
    print(f"\nread-only artifact store ({'simulated' if artifact_disk.simulated else 'tmpfs'}): {message}")
    assert _champion_record(client, "faults-model") == before
    assert client.get_run(second.run_id).info.status == "FAILED"


# --- the MLflow server down mid-run --------------------------------------------------------------


class MlflowServer:
    """A real `mlflow server` (SQLite, local artifacts) on 127.0.0.1, killed and started again on
    the same port at will."""

    def __init__(self, base: Path):
        self.base, self.port, self.proc, self.starts = base, free_port(), None, 0
        self.url = f"http://127.0.0.1:{self.port}"
        self.artifacts = base / "artifacts"

    def start(self) -> None:
        self.starts += 1
        log = self.base / f"server-{self.starts}.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
        self.proc = start([str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{self.base / 'mlflow.db'}",
                           "--artifacts-destination", str(self.artifacts), "--host", "127.0.0.1",
                           "--port", str(self.port), "--workers", "1"], log, env)  # fmt: skip
        wait_for(f"{self.url}/health", "mlflow server", self.proc, log)

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def stage_reports(self) -> int:
        return len(list(self.artifacts.rglob("ingest/report.json")))


@pytest.fixture
def mlflow_server(tmp_path):
    server = MlflowServer(tmp_path / "mlflow-server")
    server.base.mkdir()
    server.start()
    yield server
    stop(server.proc)


def _when_logged(server: MlflowServer, then, timeout_s: float = 300) -> threading.Thread:
    """Run `then()` in a thread once one more run's first stage (ingest) report has reached the server."""
    seen = server.stage_reports()

    def watch() -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if server.stage_reports() > seen:
                then()
                return
            time.sleep(0.1)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


@pytest.mark.slow
def test_the_tracking_server_dying_mid_run_fails_in_bounded_time_and_a_restart_is_ridden_out(
    harness, state, mlflow_server, monkeypatch, source
):  # fmt: skip
    """Killed after the first stage logged, the server stays down: the run fails within a bounded
    time (short retry settings here; mlpipe's defaults are in `tracking.HTTP_RETRY_DEFAULTS`), with
    one line naming the server, and the stages it computed stay on disk. Then, with a retry window
    longer than a restart, the server is killed and at once started again on the same port during
    the next run: that run completes, loses no stage report, and reuses the first run's stages."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.url)
    for key, value in {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                       "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}.items():  # fmt: skip
        monkeypatch.setenv(key, value)
    assert tracking.retry_window_s() == 2.0
    killed_at = []
    watcher = _when_logged(mlflow_server, lambda: (mlflow_server.kill(), killed_at.append(time.monotonic())))
    failed = _flow(source, {})
    ended = time.monotonic()
    watcher.join()
    assert killed_at, "the server was never killed"
    message = _one_line_error(failed)
    assert message.startswith(f"MLflow tracking server {mlflow_server.url} stopped answering during the run"), message
    assert "gave up after 2 retries over about 2 s" in message
    print(f"\nserver killed; the run failed {ended - killed_at[0]:.1f} s later: {message}")
    assert ended - killed_at[0] < 60, f"took {ended - killed_at[0]:.0f} s to fail"  # MLflow's own defaults: minutes a request
    reports = list(state.glob("work/*/*/report.json"))
    computed = {p.parent.parent.name for p in reports} & {"ingest", "anonymize", "label", "split", "resample"}
    assert "ingest" in computed
    for path in reports:
        json.loads(path.read_text())  # complete
    assert not list(state.glob("work/*/.tmp-*"))  # no stage left half-written

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "7")  # 2 + 4 + ... + 64 s: longer than a restart here
    mlflow_server.start()
    outage = []

    def restart() -> None:
        mlflow_server.kill()
        began = time.monotonic()
        mlflow_server.start()
        outage.append(time.monotonic() - began)

    watcher = _when_logged(mlflow_server, restart)
    survived = _flow(source, {})
    watcher.join()
    print(f"server down {outage[0] if outage else None:.1f} s during the second run (retry window "
          f"{tracking.retry_window_s():.0f} s)")
    assert outage and outage[0] < tracking.retry_window_s(), outage
    assert survived.is_completed(), _error_of(survived)
    summary = survived.result()
    client = MlflowClient(mlflow_server.url)
    run = client.get_run(summary["run_id"])
    assert run.info.status == "FINISHED"
    for stage in ("ingest", "anonymize", "label", "split", "resample", "train", "search", "evaluate"):
        assert f"{stage}/report.json" in {a.path for a in client.list_artifacts(summary["run_id"], stage)}, stage
    assert {run.data.tags[f"mlpipe.cache.{s}"] for s in computed} == {"hit"}  # the failed run's stages, reused
