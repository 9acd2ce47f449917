"""Faults (issue 9): each injected for real where this machine allows it, each with the outcome a
user relies on asserted.

    fault                                      pass criterion                                     test
    a DDP worker SIGKILLed mid-epoch           resumes; metrics equal an uninterrupted run         here: rank 1, then rank 0 (the
                                                                                                   writer), in one launch
    the flow process SIGKILLed mid-search      the rerun repeats no finished trial and takes the   here; `mlpipe reconcile`:
                                               data stages from the cache; no MLflow run left      tests/unit/test_provenance.py
                                               RUNNING, no server or worker left alive
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

import numpy as np
import psutil
import pytest
import torch
from mlflow.tracking import MlflowClient

from mlpipe import serving, tracking
from mlpipe.config import PipelineConfig, TrainConfig
from mlpipe.errors import MlpipeError
from mlpipe.train import worker
from mlpipe.train.launch import launch
from mlpipe.train.spec import TrialResult, TrialSpec, WorkerSpec
from tests.privacy import files_under, scan
from tests.servers import BIN, free_port, start, stop, wait_for
from tests.unit.test_serving import _checkpoint
from tests.unit.test_train import FAST, _without_timing, kill_rank_when_logged, worker_data

# A flow small enough to run several times: one trial, one epoch (two where a fault must land mid-training),
# no threshold for the registry gate and no baseline to beat (a one-epoch CNN loses to one), so the first
# model a test registers becomes @champion.
FLOW = {"train.epochs": 1, "train.nproc": 1, "search.grid": {"train.lr": [0.003]}, "evaluate.bootstrap_resamples": 100,
        "evaluate.thresholds": {}, "evaluate.baseline": False}  # fmt: skip


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
def test_sigkill_of_either_rank_mid_epoch_resumes_to_the_uninterrupted_result(tmp_path, state, monkeypatch):
    """One launch of three identical trials on 2 gloo processes with train.max_restarts 2:
    trial-000 trains undisturbed, trial-001 loses rank 1 in its second epoch and trial-002 loses
    rank 0 (the rank that writes the checkpoints and logs to MLflow) in its second epoch. Each
    time torchrun restarts both ranks, the finished trials are skipped as done and the interrupted
    one resumes from its checkpoint; all three results are equal, and MLflow holds one value per
    epoch for each."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    pixels, train_set, val_set = worker_data(tmp_path, 12_000)  # about 2 s an epoch: room to land the kill
    cfg = TrainConfig(**{**FAST, "epochs": 3, "batch_size": 32, "patience": 10, "nproc": 2, "max_restarts": 2,
                         "augment": TrainConfig().augment})  # fmt: skip
    parent = tracking.start_run("faults", "ddp", {}, {})
    run_ids, trials = {}, []
    for i in range(3):
        name = f"trial-{i:03d}"
        (tmp_path / name).mkdir()
        run_ids[name] = tracking.start_child_run(parent, name, {})
        trials.append(TrialSpec(name=name, train=cfg, train_set=train_set, out_dir=str(tmp_path / name),
                                run_id=run_ids[name]))  # fmt: skip
    spec_path = tmp_path / "spec.json"
    spec_path.write_text(WorkerSpec(pixels=pixels, val_set=val_set, num_classes=3, tracking_uri=parent.tracking_uri,
                                    trials=trials).model_dump_json())  # fmt: skip
    log_path, killed = tmp_path / "launch.log", {1: [], 0: []}
    killers = [kill_rank_when_logged(spec_path, log_path, 1, "trial-001 epoch   0/3", killed[1]),
               kill_rank_when_logged(spec_path, log_path, 0, "trial-002 epoch   0/3", killed[0])]  # fmt: skip
    launch(spec_path, nproc=2, max_restarts=2, log_path=log_path, cpu=True)
    for killer in killers:
        killer.join()
    log = log_path.read_text()
    assert killed[1] and killed[0], f"killed: {killed}"
    for trial, done in (("trial-001", ["trial-000"]), ("trial-002", ["trial-000", "trial-001"])):
        before, after = log.split(f"{trial} resumed after epoch", 1)  # it restarted, from the checkpoint
        assert f"{trial} epoch   2/3" not in before  # the kill landed before the last epoch
        assert not any(f"{other} epoch" in after for other in done)  # finished trials are not trained again
        assert _history(tmp_path / trial) == _history(tmp_path / "trial-000")
    for name in run_ids:
        assert TrialResult.model_validate_json((tmp_path / name / "result.json").read_text()).world_size == 2
    client = MlflowClient(parent.tracking_uri)
    values = {}
    for run in run_ids:
        history = sorted(client.get_metric_history(run_ids[run], "val_macro_f1"), key=lambda m: m.step)
        assert [m.step for m in history] == [0, 1, 2]  # one value per epoch, none repeated after a resume
        values[run] = [m.value for m in history]
    assert values["trial-000"] == values["trial-001"] == values["trial-002"]


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


def _workers(home: Path) -> list[psutil.Process]:
    """The torchrun workers of runs in `home`."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if "mlpipe.train.worker" in cmdline and str(home) in cmdline:
            found.append(proc)
    return found


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
    SIGKILLed (no hook, no finally block runs) once the second trial has saved its first epoch.
    Its temporary Prefect server and torchrun workers stop by themselves. The rerun takes the data
    stages from Prefect's cache and the first trial as it is (its files untouched, not one epoch
    trained again, its curves copied into the new MLflow child run) and resumes the second;
    afterwards no MLflow run is RUNNING: the killed run's parent and children were ended KILLED by
    the rerun itself (`mlpipe reconcile` alone: tests/unit/test_provenance.py)."""
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
    servers = [c for c in psutil.Process(flow.pid).children() if "prefect.server.api.server" in " ".join(c.cmdline())]
    assert len(servers) == 1, "no temporary Prefect server under mlpipe run"
    flow.send_signal(signal.SIGKILL)  # no hook, no finally block runs
    flow.wait()
    _, alive = psutil.wait_procs(servers, timeout=30)  # the watchdog stops the orphaned temporary server
    assert not alive, "the temporary Prefect server outlived the killed mlpipe run"
    assert not (second / "result.json").exists(), "the kill came after the second trial had finished"
    first = next(p for p in home.glob("work/trials/*") if p != second)
    kept = {name: ((first / name).read_bytes(), (first / name).stat().st_mtime_ns)
            for name in ("result.json", "checkpoint.pt", "last.pt")}  # fmt: skip
    client = MlflowClient(f"sqlite:///{home / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("mlpipe").experiment_id
    killed = {r.info.run_id: r for r in client.search_runs([experiment])}
    assert {r.info.status for r in killed.values()} == {"RUNNING"} and len(killed) == 3  # parent + 2 trials
    gone = time.time() + 30
    while _workers(home) and time.time() < gone:  # the kernel's parent-death signal stops torchrun
        time.sleep(0.5)
    assert not _workers(home)

    rerun = _mlpipe(home, code, rerun_log, "run", *SEARCH, "--set", f"source.uri={source}")
    assert rerun.wait(timeout=600) == 0, rerun_log.read_text()
    cached = set(re.findall(r"Task run '(\w+)-\w+' - Finished in state Cached", rerun_log.read_text()))
    assert {"ingest", "anonymize", "label", "split", "resample"} <= cached
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


def test_a_read_only_artifact_store_fails_registration_in_one_line_and_leaves_the_champion(state, artifact_disk,
                                                                                           monkeypatch):  # fmt: skip
    """The registration step alone (what evaluate does last), against an artifact store remounted
    read-only between two pipeline runs: the second run's model logging fails with one line naming
    the store, nothing moves @champion, and the parent run ends FAILED (not RUNNING). Model logging
    leaves MLflow's process-wide tracking URI as it found it."""
    from mlflow.tracking import fluent
    from mlflow.tracking._tracking_service import utils

    monkeypatch.setattr(utils, "_tracking_uri", None)
    monkeypatch.setattr(fluent, "_active_experiment_id", None)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_ID", raising=False)
    checkpoint = _checkpoint(state / "checkpoint.pt", classes=2)
    model = serving.save(state / "serving", checkpoint, ["a", "b"], serving.Preprocessing(16, 1), {"kind": "argmax"},
                         np.zeros((16, 16, 1), np.uint8), "small_cnn")  # fmt: skip
    with tracking.pipeline_run("faults", "first", {}, {}) as run:
        registered = tracking.log_model(run, model, "faults-model", checkpoint, ["a", "b"])
        gate = {"decision": "promote", "reasons": ["no champion yet; thresholds met"], "champion_version": None}
        tracking.record_gate(run, "faults-model", registered["version"], gate)
    # a later call in this process, or a child it starts, reaches no store or experiment it did not name
    assert utils._tracking_uri is None and fluent._active_experiment_id is None
    assert "MLFLOW_EXPERIMENT_ID" not in os.environ
    client = MlflowClient(run.tracking_uri)
    before = _champion_record(client, "faults-model")

    artifact_disk.read_only()
    with pytest.raises(MlpipeError) as caught, tracking.pipeline_run("faults", "second", {}, {}) as second:
        tracking.log_stage(second, "split", {"rows": 3})  # deferred: it fails in the background
        tracking.log_model(second, model, "faults-model", checkpoint, ["a", "b"])
        tracking.record_gate(second, "faults-model", "2", {**gate, "champion_version": before[0]})  # never reached
    message = str(caught.value)
    assert "\n" not in message and "EROFS" in message
    assert message.startswith(f"MLflow artifact store {(state / 'mlartifacts').as_uri()}"), message
    print(f"\nread-only artifact store ({'simulated' if artifact_disk.simulated else 'tmpfs'}): {message}")
    assert _champion_record(client, "faults-model") == before
    assert client.get_run(second.run_id).info.status == "FAILED"


# --- the MLflow server down mid-run --------------------------------------------------------------


class MlflowServer:
    """A real `mlflow server` (SQLite, local artifacts) on 127.0.0.1, killed, stopped and started
    again on the same port at will."""

    def __init__(self, base: Path):
        self.base, self.port, self.proc, self.starts = base, free_port(), None, 0
        self.url = f"http://127.0.0.1:{self.port}"
        self.artifacts = base / "artifacts"

    def start(self) -> float:
        """Start it; returns the seconds until it answered /health (its restart time, measured)."""
        began = time.monotonic()
        self.starts += 1
        log = self.base / f"server-{self.starts}.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
        # Without MLflow's job execution (GenAI jobs, which mlpipe never submits): its runner and seven huey
        # consumers cost ~28 s of CPU a start here, each restart included, and the restart measured below is
        # the tracking server's own.
        env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
        self.proc = start([str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{self.base / 'mlflow.db'}",
                           "--artifacts-destination", str(self.artifacts), "--host", "127.0.0.1",
                           "--port", str(self.port), "--workers", "1"], log, env)  # fmt: skip
        wait_for(f"{self.url}/health", "mlflow server", self.proc, log)
        return time.monotonic() - began

    def kill(self) -> None:
        """A crash (SIGKILL): answers being written are cut off."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def stop(self, timeout_s: float = 120) -> None:
        """The first half of a restart, as systemd or Kubernetes stop a server (SIGTERM): uvicorn
        closes its port and finishes the answers it is writing. Returns once the port refuses
        connections."""
        import socket

        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
            except OSError:
                self.proc.wait(timeout=timeout_s)
                return
            time.sleep(0.05)
        pytest.fail(f"mlflow server still accepts connections {timeout_s} s after SIGTERM")

    def stage_reports(self) -> int:
        return len(list(self.artifacts.rglob("ingest/report.json")))


@pytest.fixture
def tracking_server(tmp_path):
    """This test's own server (not tests/servers.py's `mlflow_server`, which stays up only while a test uses it)."""
    server = MlflowServer(tmp_path / "mlflow-server")
    server.base.mkdir()
    server.start()
    yield server
    stop(server.proc)


class Calls:
    """Every tracking API request this process sends to `url` (MLflow's client goes through
    `requests.Session.request`, its urllib3 retries inside the call; /health probes left out):
    when it began and ended, and whether an answer came back."""

    def __init__(self, url: str, monkeypatch: pytest.MonkeyPatch):
        import requests

        self.url, self.calls, self.changed = url, [], threading.Condition()
        original = requests.Session.request

        def request(session, method, url, *args, **kwargs):
            if not str(url).startswith(self.url) or str(url).endswith("/health"):
                return original(session, method, url, *args, **kwargs)
            call = {"path": str(url).removeprefix(self.url), "began": time.monotonic(), "ended": None,
                    "answered": False}  # fmt: skip
            with self.changed:
                self.calls.append(call)
                self.changed.notify_all()
            try:
                response = original(session, method, url, *args, **kwargs)
                call["answered"] = True
                return response
            finally:
                call["ended"] = time.monotonic()

        monkeypatch.setattr(requests.Session, "request", request)

    def begun_after(self, moment: float) -> list[dict]:
        return [c for c in list(self.calls) if c["began"] >= moment]

    def waiting_since(self, moment: float, give_up: threading.Event) -> dict | None:
        """The first request begun after `moment` that is still without an answer, once there is one
        (None if `give_up` is set first)."""
        with self.changed:
            while not give_up.is_set():
                if found := [c for c in self.begun_after(moment) if not c["answered"]]:
                    return found[0]
                self.changed.wait(0.2)
        return None


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


def _shortest_retry_window_s() -> float:
    """`tracking.retry_window_s()` without the jitter: the least time a refused request is retried."""
    jitter = float(os.environ.get("MLFLOW_HTTP_REQUEST_BACKOFF_JITTER") or 0)
    return tracking.retry_window_s() - jitter * (int(os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"]) - 1)


def _mlflow_default_retry_window_s(monkeypatch: pytest.MonkeyPatch) -> float:
    """How long MLflow's own defaults retry one refused request: what a run without mlpipe's bounds
    could spend on a single call to a dead server."""
    from mlflow import environment_variables as mlflow_env

    with monkeypatch.context() as m:
        for var in (mlflow_env.MLFLOW_HTTP_REQUEST_MAX_RETRIES, mlflow_env.MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR,
                    mlflow_env.MLFLOW_HTTP_REQUEST_BACKOFF_JITTER):  # fmt: skip
            m.setenv(var.name, str(var.default))
        return tracking.retry_window_s()


@pytest.mark.slow
def test_the_tracking_server_dying_mid_run_fails_in_bounded_time_and_a_restart_is_ridden_out(
    harness, state, tracking_server, monkeypatch, source
):  # fmt: skip
    """Killed (SIGKILL) after the first stage logged, the server stays down: the run fails with one
    line naming the server, and the stages it computed stay on disk. Bounded: with a short retry
    window W (here 2 retries, 2 s), no request waits on the dead server much longer than W, only
    one or two requests do (the deferred writes stop at the first failure), and the whole run ends
    sooner than MLflow's own defaults would retry a single request.

    Then a restart, during the next run: the server is stopped as a restart stops it (SIGTERM: the
    answers it is writing are finished, the port closes), and started again only once the run has
    sent a request to the stopped server, so that the run is waiting on it. The client runs with
    mlpipe's own retry policy, lengthened only if this machine's measured restart time needs it
    (window >= 3 x the restart just measured). The run completes, every request sent during the
    outage got its answer, no stage report is lost, and the first run's stages are reused.

    Why not SIGKILL for the restart: a crash can cut an answer after its headers (IncompleteRead),
    which no HTTP client retries for a POST (it may have been applied: runs/create would make a
    second run). That is a crash, not a restart, and on a loaded machine it is what this test hit
    when the kill landed on runs/create."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_server.url)
    for key, value in {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                       "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}.items():  # fmt: skip
        monkeypatch.setenv(key, value)
    window = tracking.retry_window_s()
    assert window == _shortest_retry_window_s() == 2.0
    unbounded = _mlflow_default_retry_window_s(monkeypatch)
    calls = Calls(tracking_server.url, monkeypatch)
    killed_at = []
    watcher = _when_logged(tracking_server, lambda: (tracking_server.kill(), killed_at.append(time.monotonic())))
    failed = _flow(source, {})
    ended = time.monotonic()
    watcher.join()
    assert killed_at, "the server was never killed"
    message = _one_line_error(failed)
    assert message.startswith(f"MLflow tracking server {tracking_server.url} stopped answering during the run"), message
    assert "gave up after 2 retries over about 2 s" in message
    # Each request that waited on the dead server: from the kill (or its start, if later) to its failure.
    waits = [(c["path"], c["ended"] - max(c["began"], killed_at[0])) for c in list(calls.calls)
             if not c["answered"] and c["ended"] is not None and c["ended"] > killed_at[0]]  # fmt: skip
    print(f"\nserver killed; the run failed {ended - killed_at[0]:.1f} s later (retry window {window:.0f} s; "
          f"MLflow's defaults: {unbounded:.0f} s a request); requests that waited on it: "
          + ", ".join(f"{p} {s:.2f} s" for p, s in waits) + f"\n{message}")  # fmt: skip
    assert not [c for c in calls.begun_after(killed_at[0]) if c["answered"]]  # nothing answered a dead server
    assert 1 <= len(waits) <= 2, waits  # the first failed write stops the others: no window per pending write
    assert all(s < 2 * window for _, s in waits), waits  # W of backoff, plus refused connects
    assert ended - killed_at[0] < unbounded, f"took {ended - killed_at[0]:.0f} s to fail"
    reports = list(state.glob("work/*/*/report.json"))
    computed = {p.parent.parent.name for p in reports} & {"ingest", "anonymize", "label", "split", "resample"}
    assert "ingest" in computed
    for path in reports:
        json.loads(path.read_text())  # complete
    assert not list(state.glob("work/*/.tmp-*"))  # no stage left half-written

    for key, value in tracking.HTTP_RETRY_DEFAULTS.items():  # mlpipe's own retry policy from here on
        monkeypatch.setenv(key, value)
    restart_s = tracking_server.start()  # this machine's restart time, now
    retries = int(tracking.HTTP_RETRY_DEFAULTS["MLFLOW_HTTP_REQUEST_MAX_RETRIES"])
    while _shortest_retry_window_s() < 3 * restart_s:
        retries += 1
        monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", str(retries))
    window = _shortest_retry_window_s()
    restart: dict[str, float] = {}
    run_over = threading.Event()

    def stop_wait_start() -> None:
        restart["stop"] = time.monotonic()
        tracking_server.stop()
        restart["down"] = time.monotonic()
        first = calls.waiting_since(restart["stop"], run_over)  # the run is waiting on the stopped server
        if first is None:
            return
        restart["waiting"] = first["began"]
        tracking_server.start()
        restart["up"] = time.monotonic()

    watcher = _when_logged(tracking_server, stop_wait_start)
    survived = _flow(source, {})
    run_over.set()
    watcher.join()
    assert "up" in restart, f"the run sent no request while the server was stopped, or it did not come back: {restart}"
    down_s, waited_s = restart["up"] - restart["down"], restart["up"] - restart["waiting"]
    # The requests sent from the SIGTERM on, less those the stopping server still answered.
    riders = [c for c in calls.begun_after(restart["stop"]) if c["began"] < restart["up"]
              and not (c["answered"] and c["ended"] <= restart["down"])]  # fmt: skip
    print(f"restart measured before the run: {restart_s:.1f} s; during it: stopped in "
          f"{restart['down'] - restart['stop']:.1f} s, down {down_s:.1f} s; the first request waited {waited_s:.1f} s "
          f"of a {window:.0f} s retry window "
          f"({retries} retries); {len(riders)} request(s) sent while it was down")  # fmt: skip
    assert survived.is_completed(), f"restart took {waited_s:.1f} s of a {window:.0f} s window: {_error_of(survived)!r}"
    assert riders and all(c["answered"] for c in riders), riders  # each got its answer: ridden out
    assert any(c["ended"] >= restart["up"] for c in riders), riders  # ... after the restart
    assert waited_s < window
    summary = survived.result()
    client = MlflowClient(tracking_server.url)
    run = client.get_run(summary["run_id"])
    assert run.info.status == "FINISHED"
    for stage in ("ingest", "anonymize", "label", "split", "resample", "train", "search", "evaluate"):
        assert f"{stage}/report.json" in {a.path for a in client.list_artifacts(summary["run_id"], stage)}, stage
    assert {run.data.tags[f"mlpipe.cache.{s}"] for s in computed} == {"hit"}  # the failed run's stages, reused
