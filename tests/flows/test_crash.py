"""A flow killed outright (SIGKILL: no hook runs) leaves no MLflow run RUNNING once `mlpipe
reconcile` or the next run has looked, no torchrun worker alive, and its finished stages reusable."""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from mlflow.tracking import MlflowClient

pytestmark = pytest.mark.slow
SETTINGS = ["--set", "train.epochs=3", "--set", "train.nproc=1", "--set", "search.grid={train.lr: [0.003]}",
            "--set", "evaluate.bootstrap_resamples=100"]  # fmt: skip


def _mlpipe(home: Path, *args: str, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "MLPIPE_HOME": str(home), "MLFLOW_TRACKING_URI": f"sqlite:///{home / 'mlflow.db'}"}
    env.pop("PREFECT_API_URL", None)  # its own ephemeral server, as a user's `mlpipe run`
    return subprocess.Popen([sys.executable, "-m", "flows.cli", *args], env=env, cwd=home, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **kwargs)  # fmt: skip


def _workers(home: Path) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if "mlpipe.train.worker" in cmdline and str(home) in cmdline:
            found.append(proc)
    return found


def test_sigkill_mid_training_leaves_nothing_running_and_the_rerun_reuses_finished_stages(tmp_path):
    home = tmp_path / "state"
    home.mkdir()
    flow = _mlpipe(home, "run", *SETTINGS)
    deadline = time.time() + 300
    while time.time() < deadline and not list(home.glob("work/trials/*/last.pt")):  # an epoch is done
        assert flow.poll() is None, flow.stdout.read()
        time.sleep(0.5)
    assert _workers(home), "training never started"
    servers = [c for c in psutil.Process(flow.pid).children() if "prefect.server.api.server" in " ".join(c.cmdline())]
    assert len(servers) == 1, "no temporary Prefect server under mlpipe run"
    flow.send_signal(signal.SIGKILL)  # no Prefect hook, no finally block runs
    flow.wait()
    gone, alive = psutil.wait_procs(servers, timeout=30)  # the watchdog stops the orphaned temporary server
    assert not alive, "the temporary Prefect server outlived the killed mlpipe run"

    client = MlflowClient(f"sqlite:///{home / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("mlpipe").experiment_id
    assert {r.info.status for r in client.search_runs([experiment])} == {"RUNNING"}  # parent and trial child
    gone = time.time() + 30
    while _workers(home) and time.time() < gone:  # the kernel's parent-death signal stops torchrun
        time.sleep(0.5)
    assert not _workers(home)

    reconciled = _mlpipe(home, "reconcile")
    assert reconciled.wait(timeout=120) == 0, reconciled.stdout.read()
    assert "ended 2 MLflow run(s)" in reconciled.stdout.read()
    assert {r.info.status for r in client.search_runs([experiment])} == {"KILLED"}

    rerun = _mlpipe(home, "run", *SETTINGS)
    out, _ = rerun.communicate(timeout=600)
    assert rerun.returncode == 0, out
    cached = set(re.findall(r"Task run '(\w+)-\w+' - Finished in state Cached", out))
    assert {"ingest", "anonymize", "label", "split", "resample"} <= cached
    assert "resumed after epoch" in "".join(p.read_text() for p in home.glob("work/train/*/launch-*.log"))
