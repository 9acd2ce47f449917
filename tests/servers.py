"""Real servers on 127.0.0.1, started here for the session's first test that needs them and stopped
after its last (`pytest_runtest_teardown` below): PostgreSQL (Debian's package), moto's standalone
S3 server, an MLflow tracking server with PostgreSQL as its backend store and an S3 bucket on moto
as its artifact store (proxied: clients upload and download through the MLflow server and hold no
S3 credentials), a Prefect server, a process work pool with a worker, and the deployments from
prefect.yaml."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
PG_BIN = next((p for p in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)), None)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(url: str, what: str, proc: subprocess.Popen, log: Path, timeout_s: float = 180) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"{what} exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        with contextlib.suppress(requests.RequestException):
            if requests.get(url, timeout=2).ok:
                return
        time.sleep(0.5)
    pytest.fail(f"{what} did not answer at {url} within {timeout_s} s:\n{log.read_text()[-3000:]}")


def start(cmd: list[str], log: Path, env: dict[str, str], cwd: Path | None = None) -> subprocess.Popen:
    return subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env, cwd=cwd, start_new_session=True)


def stop(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, 15)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)


# The session fixtures below; a test that uses any of them keeps every one running until it is done.
STACK_FIXTURES = frozenset({"postgres", "artifact_store", "mlflow_server", "_prefect_server", "prefect_stack"})
_running: list[Callable[[], None]] = []  # how to stop what is up, in the order it started


def _stopping(how: Callable[[], None]) -> Callable[[], None]:
    """`how`, to be called once: by the fixture's teardown or, earlier, by `pytest_runtest_teardown`."""

    def once() -> None:
        if once in _running:
            _running.remove(once)
            how()

    _running.append(once)
    return once


@pytest.hookimpl(trylast=True)
def pytest_runtest_teardown(item, nextitem) -> None:
    """Stop the servers once the last test that uses them is done, not at the session's end: idle,
    they still took ~6% of a core (the Prefect server's services and the worker's polls, MLflow's job
    consumers), for the 20 minutes of tests that followed the load test in CI."""
    if not _running or not STACK_FIXTURES & set(item.fixturenames):
        return
    items = item.session.items
    if any(STACK_FIXTURES & set(later.fixturenames) for later in items[items.index(item) + 1 :]):
        return
    for stop_one in reversed(list(_running)):
        stop_one()


def _as_postgres(cmd: list[str]) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


@pytest.fixture(scope="session")
def postgres() -> str:
    if PG_BIN is None:
        pytest.fail("PostgreSQL is not installed (Debian: apt-get install postgresql); .ci/run installs it")
    base = Path(tempfile.mkdtemp(prefix="mlpipe-postgres-"))  # not under pytest's 0700 root-owned folder
    data, port = base / "data", free_port()
    if os.geteuid() == 0:
        shutil.chown(base, "postgres")
    subprocess.run(_as_postgres([str(PG_BIN / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres"]),
                   check=True, capture_output=True)  # fmt: skip
    log = base / "server.log"
    subprocess.run(_as_postgres([str(PG_BIN / "pg_ctl"), "-D", str(data), "-l", str(log), "-w", "-o",
                                 f"-h 127.0.0.1 -p {port} -k {base}", "start"]), check=True, capture_output=True)  # fmt: skip

    def stop_postgres() -> None:
        subprocess.run(_as_postgres([str(PG_BIN / "pg_ctl"), "-D", str(data), "-m", "fast", "stop"]),
                       capture_output=True)  # fmt: skip
        shutil.rmtree(base, ignore_errors=True)

    stopping = _stopping(stop_postgres)
    subprocess.run(_as_postgres([str(PG_BIN / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "mlflow"]),
                   check=True, capture_output=True)  # fmt: skip
    yield f"postgresql+psycopg2://postgres@127.0.0.1:{port}/mlflow"
    stopping()


# Dummy credentials moto accepts; only the MLflow server (and tests reading the bucket) get them.
S3_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
# What would let a process reach the bucket itself; the worker's env drops them so uploads must go through the proxy.
S3_ACCESS_VARS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE", "MLFLOW_S3_ENDPOINT_URL")


@dataclass
class ArtifactStore:
    endpoint: str
    bucket: str
    prefix: str  # under which the MLflow server's `mlflow-artifacts:/<path>` lands as `<prefix>/<path>`

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=S3_CREDENTIALS["AWS_ACCESS_KEY_ID"],
                            aws_secret_access_key=S3_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
                            region_name=S3_CREDENTIALS["AWS_DEFAULT_REGION"])  # fmt: skip


@pytest.fixture(scope="session")
def artifact_store(tmp_path_factory) -> ArtifactStore:
    """moto's S3 server with an empty bucket."""
    base = tmp_path_factory.mktemp("moto")
    port, log = free_port(), base / "server.log"
    proc = start([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)], log, {**os.environ, **S3_CREDENTIALS})
    stopping = _stopping(lambda: stop(proc))
    store = ArtifactStore(endpoint=f"http://127.0.0.1:{port}", bucket="mlpipe-artifacts", prefix="mlflow")
    wait_for(f"{store.endpoint}/", "moto s3 server", proc, log)
    store.client().create_bucket(Bucket=store.bucket)
    yield store
    stopping()


@pytest.fixture(scope="session")
def mlflow_server(postgres, artifact_store, tmp_path_factory) -> str:
    base = tmp_path_factory.mktemp("mlflow")
    port, log = free_port(), base / "server.log"
    # Without MLflow's job execution (GenAI jobs, which mlpipe never submits): its runner and seven huey consumers
    # took ~28 s of CPU to start, while the Prefect server boots beside it, and ~1% of a core idle after.
    env = {**os.environ, **S3_CREDENTIALS, "MLFLOW_S3_ENDPOINT_URL": artifact_store.endpoint,
           "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # fmt: skip
    destination = f"s3://{artifact_store.bucket}/{artifact_store.prefix}"
    proc = start([str(BIN / "mlflow"), "server", "--backend-store-uri", postgres, "--artifacts-destination",
                  destination, "--host", "127.0.0.1", "--port", str(port), "--workers", "1"], log, env)  # fmt: skip
    stopping = _stopping(lambda: stop(proc))
    url = f"http://127.0.0.1:{port}"
    wait_for(f"{url}/health", "mlflow server", proc, log)
    yield url
    stopping()


@dataclass
class PrefectStack:
    api_url: str
    ui_url: str
    env: dict[str, str]
    home: Path  # MLPIPE_HOME of the worker's flow runs
    base: Path  # everything the stack writes: PREFECT_HOME (its database), server and worker logs, `home`


def _prefect_env(base: Path, port: int) -> dict[str, str]:
    """The environment of the stack's Prefect server, CLI calls and worker (these also get MLFLOW_TRACKING_URI)."""
    api = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_HOME": str(base / "prefect-home"), "PREFECT_API_URL": api,
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_UI_API_URL": api,
           "MLPIPE_PROJECT_DIR": str(ROOT), "MLPIPE_HOME": str(base / "mlpipe-home"),
           "NO_ALBUMENTATIONS_UPDATE": "1"}  # fmt: skip
    for name in ("PREFECT_PROFILES_PATH", "MLFLOW_TRACKING_URI", *S3_ACCESS_VARS):
        env.pop(name, None)
    return env


@dataclass
class _PrefectServer:
    proc: subprocess.Popen
    port: int
    base: Path
    log: Path


@pytest.fixture(scope="session")
def _prefect_server(tmp_path_factory) -> _PrefectServer:
    """`prefect server start`, not yet waited for: it needs nothing of the other servers, so it boots
    while PostgreSQL, S3 and MLflow start (prefect_stack asks for it first, then waits)."""
    base = tmp_path_factory.mktemp("prefect")
    port, log = free_port(), base / "server.log"
    server = start([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)], log,
                   _prefect_env(base, port))  # fmt: skip
    stopping = _stopping(lambda: stop(server))
    yield _PrefectServer(proc=server, port=port, base=base, log=log)
    stopping()


@pytest.fixture(scope="session")
def prefect_stack(_prefect_server, mlflow_server) -> PrefectStack:
    """`prefect server start`, the process work pool, `prefect deploy --all` from prefect.yaml and a worker."""
    base, port = _prefect_server.base, _prefect_server.port
    api = f"http://127.0.0.1:{port}/api"
    env = {**_prefect_env(base, port), "MLFLOW_TRACKING_URI": mlflow_server}
    wait_for(f"{api}/health", "prefect server", _prefect_server.proc, _prefect_server.log)
    prefect = [str(BIN / "prefect"), "--no-prompt"]
    for cmd in (["work-pool", "create", "mlpipe-process", "--type", "process"], ["deploy", "--all"]):
        done = subprocess.run(prefect + cmd, env=env, cwd=ROOT, capture_output=True, text=True, stdin=subprocess.DEVNULL)
        assert done.returncode == 0, f"prefect {' '.join(cmd)}: {done.stdout[-2000:]}{done.stderr[-2000:]}"
    worker_log = base / "worker.log"
    worker = start(prefect + ["worker", "start", "--pool", "mlpipe-process", "--limit", "2"], worker_log,
                   {**env, "PREFECT_WORKER_QUERY_SECONDS": "2"}, cwd=ROOT)  # polls every 2 s, not 10: a freed slot is used at once
    stopping = _stopping(lambda: stop(worker))
    yield PrefectStack(api_url=api, ui_url=f"http://127.0.0.1:{port}", env=env, home=base / "mlpipe-home", base=base)
    stopping()
