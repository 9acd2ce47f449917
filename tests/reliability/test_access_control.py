"""Access control (issue 9, README "Deploying securely"): the servers as deployed securely, on
127.0.0.1, and one real `mlpipe run` against them.

- PostgreSQL whose roles `mlflow` and `prefect` log in over TCP with a password (scram-sha-256;
  the superuser only over a Unix socket in a 0700 folder).
- MLflow's basic-auth app (`mlflow server --app-name basic-auth`) on that database: a random
  admin password and its user store in this test's folder (MLFLOW_AUTH_CONFIG_PATH), no access
  for users without a grant (default_permission NO_PERMISSIONS); the pipeline logs as its own
  non-admin user `mlpipe`.
- `prefect server start` with PREFECT_SERVER_API_AUTH_STRING, on PostgreSQL too.

Unauthenticated and wrongly authenticated calls are refused, the right credentials work, and
after a pipeline run no secret (the pseudonymization key, the auth strings and passwords, the
database passwords, the Flask secret key), raw or base64-encoded as in a Basic header, appears
in the CLI's output, the state directory, MLflow (params, tags, metric names, artifacts, the
logged model, the registry) or Prefect (logs, flow and task runs, artifacts, events).
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import secrets
import shutil
import subprocess
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import pytest
import requests

from tests.servers import BIN, PG_BIN, _as_postgres, free_port, start, stop, wait_for

pytestmark = pytest.mark.slow

EXPERIMENT = "access-control"
REGISTERED_MODEL = "mlpipe-classifier"
# One trial of one epoch: the run exercises every stage and every kind of write, fast.
FAST = ["--set", f"experiment={EXPERIMENT}", "--set", "train.epochs=1", "--set", "train.nproc=1",
        "--set", 'search.grid={"train.lr": [0.003]}', "--set", "evaluate.bootstrap_resamples=100"]  # fmt: skip
# What would let a process talk to a server or a bucket without being given it explicitly here.
AMBIENT = ("PREFECT_API_URL", "PREFECT_API_KEY", "PREFECT_API_AUTH_STRING", "PREFECT_SERVER_API_AUTH_STRING",
           "PREFECT_PROFILES_PATH", "PREFECT_HOME", "MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME",
           "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN", "MLPIPE_PSEUDONYM_KEY", "MLPIPE_HOME",
           "PGPASSWORD", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "MLFLOW_S3_ENDPOINT_URL")  # fmt: skip


# --- secrets and the scanner ---------------------------------------------------------------------


@dataclass(frozen=True)
class Secret:
    name: str
    value: str
    user: str | None = None  # a password: `user:value` is what a Basic header carries, base64-encoded


def _b64_windows(raw: bytes) -> list[bytes]:
    """The base64 characters that depend on `raw` alone, at each of the 3 byte alignments it can
    have inside a longer encoded blob (standard and URL-safe alphabets)."""
    out = []
    for shift in range(3):
        encoded = base64.b64encode(b"\0" * shift + raw)
        first, end = -(-8 * shift // 6), (8 * shift + 8 * len(raw)) // 6
        window = encoded[first:end]
        out += [window, window.replace(b"+", b"-").replace(b"/", b"_")]
    return out


def needles(secret: Secret) -> dict[bytes, str]:
    """Every form of the secret to look for -> how it is described in a failure."""
    raw = secret.value.encode()
    found = {raw: secret.name}
    found.update({w: f"{secret.name} (base64)" for w in _b64_windows(raw)})
    if secret.user is not None:
        found.update(
            {
                w: f"{secret.name} (base64 of {secret.user}:...)"
                for w in _b64_windows(f"{secret.user}:{secret.value}".encode())
            }
        )
    return found


class Scanner:
    def __init__(self, secrets_: list[Secret]):
        self.needles: dict[bytes, str] = {}
        for secret in secrets_:
            self.needles.update(needles(secret))
        self.hits: list[str] = []  # each test also asserts it looked at enough: zero hits in nothing prove nothing

    def blob(self, data: bytes | str, where: str) -> None:
        data = data.encode() if isinstance(data, str) else data
        self.hits += [f"{what} in {where}" for needle, what in self.needles.items() if needle in data]
        if data[:4] == b"PK\x03\x04":  # torch checkpoints, pt2 exports: look inside compressed members too
            with contextlib.suppress(zipfile.BadZipFile), zipfile.ZipFile(io.BytesIO(data)) as archive:
                for member in archive.namelist():
                    self.blob(archive.read(member), f"{where}!{member}")

    def tree(self, root: Path, where: str) -> int:
        files = [p for p in sorted(root.rglob("*")) if p.is_file() and not p.is_symlink()]
        for path in files:
            self.blob(path.read_bytes(), f"{where}/{path.relative_to(root)}")
            self.blob(str(path.relative_to(root)), f"{where}: the file name {path.relative_to(root)}")
        return len(files)


# --- servers -------------------------------------------------------------------------------------


@dataclass
class Stack:
    secrets: dict[str, Secret]
    pg_port: int
    mlflow_url: str
    prefect_api: str
    base: Path
    pg_log: Path

    def secret(self, name: str) -> str:
        return self.secrets[name].value

    def mlflow_auth(self, user: str = "mlpipe") -> tuple[str, str]:
        return user, self.secret(f"mlflow_{user}_password")

    @contextlib.contextmanager
    def mlflow_client(self, user: str | None = "mlpipe"):
        """An MlflowClient with `user`'s credentials in the environment (None: no credentials)."""
        from mlflow.tracking import MlflowClient

        creds = (
            {}
            if user is None
            else dict(zip(("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"), self.mlflow_auth(user), strict=True))
        )
        cleared = {
            k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")
        }
        with mock.patch.dict(os.environ, {**cleared, **creds}, clear=True):
            yield MlflowClient(self.mlflow_url)

    @contextlib.contextmanager
    def prefect_client(self, auth_string: str | None):
        from prefect.client.orchestration import get_client
        from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings

        with temporary_settings({PREFECT_API_URL: self.prefect_api, PREFECT_API_AUTH_STRING: auth_string}), \
                get_client(sync_client=True) as client:  # fmt: skip
            yield client


def _random_secrets() -> dict[str, Secret]:
    prefect_password = secrets.token_urlsafe(18)
    found = [
        Secret("pseudonym_key", secrets.token_hex(32)),
        Secret("prefect_auth_string", f"admin:{prefect_password}"),
        Secret("prefect_auth_password", prefect_password, user="admin"),
        Secret("mlflow_admin_password", secrets.token_urlsafe(18), user="admin"),
        Secret("mlflow_mlpipe_password", secrets.token_urlsafe(18), user="mlpipe"),
        Secret("mlflow_outsider_password", secrets.token_urlsafe(18), user="outsider"),
        Secret("mlflow_flask_secret_key", secrets.token_urlsafe(24)),
        Secret("mlflow_db_password", secrets.token_urlsafe(18), user="mlflow"),
        Secret("prefect_db_password", secrets.token_urlsafe(18), user="prefect"),
    ]
    return {s.name: s for s in found}


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in AMBIENT}
    return {**env, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "NO_ALBUMENTATIONS_UPDATE": "1", **extra}


def _checked(cmd: list[str], what: str, **kwargs) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, check=False, capture_output=True, text=True, **kwargs)
    assert done.returncode == 0, f"{what} failed ({done.returncode}):\n{done.stdout[-2000:]}{done.stderr[-2000:]}"
    return done


@contextlib.contextmanager
def _postgres(found: dict[str, Secret]):
    """Roles `mlflow` and `prefect`, each owning its database, with a password over TCP (scram)."""
    if PG_BIN is None:
        pytest.fail("PostgreSQL is not installed (Debian: apt-get install postgresql); .ci/run installs it")
    base = Path(tempfile.mkdtemp(prefix="mlpipe-acl-postgres-"))  # 0700: its Unix socket is the superuser's door
    data, port, log = base / "data", free_port(), base / "server.log"
    if os.geteuid() == 0:
        shutil.chown(base, "postgres")
    _checked(_as_postgres([str(PG_BIN / "initdb"), "-D", str(data), "-U", "postgres", "--auth-local=trust",
                           "--auth-host=scram-sha-256"]), "initdb")  # fmt: skip
    started = subprocess.run(_as_postgres([str(PG_BIN / "pg_ctl"), "-D", str(data), "-l", str(log), "-w", "-o",
                                           f"-h 127.0.0.1 -p {port} -k {base}", "start"]), check=False, capture_output=True, text=True)  # fmt: skip
    if started.returncode != 0:
        pytest.fail(
            f"PostgreSQL did not start:\n{started.stderr[-1000:]}\n{log.read_text()[-3000:] if log.exists() else ''}"
        )
    try:
        sql = "".join(f"CREATE ROLE {role} LOGIN PASSWORD '{found[f'{role}_db_password'].value}';\n"
                      f"CREATE DATABASE {role} OWNER {role};\n" for role in ("mlflow", "prefect"))  # fmt: skip
        psql = [str(PG_BIN / "psql"), "-h", str(base), "-p", str(port), "-U", "postgres", "-d", "postgres", "-q",
                "-v", "ON_ERROR_STOP=1"]  # fmt: skip
        _checked(_as_postgres(psql), "creating the roles", input=sql)  # the passwords via stdin, never in argv
        yield port, log
    finally:
        subprocess.run(
            _as_postgres([str(PG_BIN / "pg_ctl"), "-D", str(data), "-m", "fast", "stop"]),
            check=False,
            capture_output=True,
        )
        shutil.rmtree(base, ignore_errors=True)


@contextlib.contextmanager
def _mlflow(found: dict[str, Secret], pg_port: int, base: Path):
    base.mkdir()
    config = base / "basic_auth.ini"
    config.touch(mode=0o600)
    config.write_text(
        "[mlflow]\n"
        "default_permission = NO_PERMISSIONS\n"
        f"database_uri = sqlite:///{base / 'basic_auth.db'}\n"
        "admin_username = admin\n"
        f"admin_password = {found['mlflow_admin_password'].value}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
    )
    port, log = free_port(), base / "server.log"
    # The database password reaches libpq through PGPASSWORD: not in the URI, the command line or `ps`.
    env = _clean_env(MLFLOW_AUTH_CONFIG_PATH=str(config), MLFLOW_FLASK_SERVER_SECRET_KEY=found["mlflow_flask_secret_key"].value,
                     PGPASSWORD=found["mlflow_db_password"].value)  # fmt: skip
    proc = start([str(BIN / "mlflow"), "server", "--app-name", "basic-auth",
                  "--backend-store-uri", f"postgresql+psycopg2://mlflow@127.0.0.1:{pg_port}/mlflow",
                  "--artifacts-destination", str(base / "artifacts"),
                  "--host", "127.0.0.1", "--port", str(port), "--workers", "1"], log, env, cwd=base)  # fmt: skip
    url = f"http://127.0.0.1:{port}"

    def ready() -> None:
        wait_for(f"{url}/health", "mlflow server (basic-auth)", proc, log)
        admin = ("admin", found["mlflow_admin_password"].value)
        for user in ("mlpipe", "outsider"):  # neither is an admin; with no grant, neither sees anything
            made = requests.post(f"{url}/api/2.0/mlflow/users/create", auth=admin, timeout=30,
                                 json={"username": user, "password": found[f"mlflow_{user}_password"].value})  # fmt: skip
            assert made.ok, (
                f"creating MLflow user {user}: {made.status_code} {made.text[:500]}\n{log.read_text()[-3000:]}"
            )

    try:
        yield url, ready  # started; `ready()` waits for it and creates the users
    finally:
        stop(proc)


@contextlib.contextmanager
def _prefect(found: dict[str, Secret], pg_port: int, base: Path):
    base.mkdir()
    port, log = free_port(), base / "server.log"
    api = f"http://127.0.0.1:{port}/api"
    env = _clean_env(PREFECT_HOME=str(base / "prefect-home"), PREFECT_UI_API_URL=api,
                     PREFECT_SERVER_API_AUTH_STRING=found["prefect_auth_string"].value,
                     PREFECT_SERVER_DATABASE_DRIVER="postgresql+asyncpg", PREFECT_SERVER_DATABASE_HOST="127.0.0.1",
                     PREFECT_SERVER_DATABASE_PORT=str(pg_port), PREFECT_SERVER_DATABASE_USER="prefect",
                     PREFECT_SERVER_DATABASE_NAME="prefect",
                     PREFECT_SERVER_DATABASE_PASSWORD=found["prefect_db_password"].value)  # fmt: skip
    proc = start(
        [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)], log, env, cwd=base
    )
    try:  # started; `ready()` waits for it (/health stays open for probes)
        yield api, lambda: wait_for(f"{api}/health", "prefect server (auth string)", proc, log)
    finally:
        stop(proc)


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> Stack:
    found = _random_secrets()
    base = tmp_path_factory.mktemp("access-control")
    with _postgres(found) as (pg_port, pg_log), \
            _mlflow(found, pg_port, base / "mlflow") as (mlflow_url, mlflow_ready), \
            _prefect(found, pg_port, base / "prefect") as (prefect_api, prefect_ready):  # fmt: skip
        mlflow_ready()  # both servers boot side by side (each migrates its own database)
        prefect_ready()
        yield Stack(
            secrets=found, pg_port=pg_port, mlflow_url=mlflow_url, prefect_api=prefect_api, base=base, pg_log=pg_log
        )


@dataclass
class PipelineRun:
    done: subprocess.CompletedProcess
    home: Path
    flow_run_id: str
    run_id: str


@pytest.fixture(scope="module")
def pipeline(stack) -> PipelineRun:
    """One `mlpipe run` (the CLI, as users run it) against both servers, with every credential in
    its environment the way the README says to pass it."""
    home, cwd = stack.base / "mlpipe-home", stack.base / "cwd"
    cwd.mkdir()
    env = _clean_env(MLPIPE_HOME=str(home), PREFECT_HOME=str(stack.base / "client-prefect-home"),
                     PREFECT_API_URL=stack.prefect_api, PREFECT_API_AUTH_STRING=stack.secret("prefect_auth_string"),
                     MLFLOW_TRACKING_URI=stack.mlflow_url, MLFLOW_TRACKING_USERNAME="mlpipe",
                     MLFLOW_TRACKING_PASSWORD=stack.secret("mlflow_mlpipe_password"),
                     MLPIPE_PSEUDONYM_KEY=stack.secret("pseudonym_key"))  # fmt: skip
    done = subprocess.run([str(BIN / "mlpipe"), "run", *FAST], check=False, env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=900, stdin=subprocess.DEVNULL)  # fmt: skip
    assert done.returncode == 0, f"mlpipe run failed ({done.returncode}):\n{done.stdout[-4000:]}\n{done.stderr[-6000:]}"
    fields = dict(
        line.split(":", 1) for line in done.stdout.splitlines() if line.startswith(("Prefect flow run:", "MLflow run:"))
    )
    return PipelineRun(
        done=done, home=home, flow_run_id=fields["Prefect flow run"].strip(), run_id=fields["MLflow run"].strip()
    )


# --- the database --------------------------------------------------------------------------------


NO_PASSFILE = "/nonexistent/.pgpass"  # no ~/.pgpass may supply a password behind the test's back


@pytest.mark.parametrize("role", ["mlflow", "prefect"])
def test_database_roles_log_in_over_tcp_only_with_their_password(stack, role):
    import psycopg2

    def connect(**password):
        return psycopg2.connect(host="127.0.0.1", port=stack.pg_port, user=role, dbname=role, passfile=NO_PASSFILE,
                                connect_timeout=10, **password)  # fmt: skip

    with pytest.raises(psycopg2.OperationalError, match="no password supplied"):
        connect()
    with pytest.raises(psycopg2.OperationalError, match="password authentication failed"):
        connect(password="wrong-" + secrets.token_hex(8))
    with pytest.raises(psycopg2.OperationalError, match="password authentication failed"):  # the superuser: socket only
        psycopg2.connect(host="127.0.0.1", port=stack.pg_port, user="postgres", dbname="postgres", password="postgres",
                         passfile=NO_PASSFILE, connect_timeout=10)  # fmt: skip
    with contextlib.closing(connect(password=stack.secret(f"{role}_db_password"))) as conn, conn.cursor() as cur:
        cur.execute("select current_user")
        assert cur.fetchone() == (role,)


# --- MLflow --------------------------------------------------------------------------------------

MLFLOW_PROTECTED = [
    ("GET", "/api/2.0/mlflow/experiments/search?max_results=1", None),
    ("POST", "/api/2.0/mlflow/experiments/create", {"name": "intruder"}),
    ("GET", "/ajax-api/2.0/mlflow/experiments/search?max_results=1", None),  # what the web UI calls
    ("GET", "/api/2.0/mlflow/registered-models/search", None),
    ("GET", "/api/2.0/mlflow-artifacts/artifacts", None),  # the artifact proxy
    ("GET", "/api/2.0/mlflow/users/get?username=admin", None),
]


@pytest.mark.parametrize(
    ("method", "path", "body"), MLFLOW_PROTECTED, ids=[p.split("?")[0] for _, p, _ in MLFLOW_PROTECTED]
)
def test_mlflow_refuses_calls_without_valid_credentials(stack, method, path, body):
    url = stack.mlflow_url + path
    wrong = [None, ("admin", "wrong-" + secrets.token_hex(8)), ("mlpipe", stack.secret("mlflow_admin_password")),
             ("nobody", stack.secret("mlflow_mlpipe_password"))]  # fmt: skip
    for auth in wrong:
        answer = requests.request(method, url, json=body, auth=auth, timeout=30)
        assert answer.status_code == 401, (auth and auth[0], answer.status_code, answer.text[:300])
    bearer = requests.request(
        method, url, json=body, headers={"Authorization": f"Bearer {stack.secret('mlflow_admin_password')}"}, timeout=30
    )
    assert bearer.status_code == 401, bearer.text[:300]
    if method == "GET":  # the right Basic credentials: the same request answers
        answer = requests.get(url, auth=stack.mlflow_auth("admin"), timeout=30)
        assert answer.status_code == 200, answer.text[:300]


def test_mlflow_health_stays_open_for_probes_and_says_nothing(stack):
    answer = requests.get(f"{stack.mlflow_url}/health", timeout=30)
    assert answer.status_code == 200 and answer.text.strip() == "OK"


def test_mlflow_client_without_credentials_is_refused_and_with_them_works(stack):
    from mlflow.exceptions import MlflowException

    with stack.mlflow_client(None) as anonymous, pytest.raises(MlflowException, match="401|Unauthorized|credentials"):
        anonymous.search_experiments()
    with stack.mlflow_client("mlpipe") as client:
        experiment_id = client.create_experiment(f"acl-smoke-{secrets.token_hex(4)}")
        assert client.get_experiment(experiment_id).lifecycle_stage == "active"
    admin = requests.get(f"{stack.mlflow_url}/api/2.0/mlflow/users/get", params={"username": "mlpipe"},
                         auth=stack.mlflow_auth("admin"), timeout=30)  # fmt: skip
    assert admin.status_code == 200 and admin.json()["user"]["is_admin"] is False


def test_mlflow_users_are_confined_to_their_grants(stack, pipeline):
    """An authenticated user without a grant (default_permission NO_PERMISSIONS) gets 403 on the
    pipeline's experiment and cannot manage users; the pipeline's own user cannot either."""
    with stack.mlflow_client("mlpipe") as client:
        experiment_id = client.get_experiment_by_name(EXPERIMENT).experiment_id
    outsider = stack.mlflow_auth("outsider")
    got = requests.get(f"{stack.mlflow_url}/api/2.0/mlflow/experiments/get", params={"experiment_id": experiment_id},
                       auth=outsider, timeout=30)  # fmt: skip
    assert got.status_code == 403, got.text[:300]
    run = requests.get(
        f"{stack.mlflow_url}/api/2.0/mlflow/runs/get", params={"run_id": pipeline.run_id}, auth=outsider, timeout=30
    )
    assert run.status_code == 403, run.text[:300]
    listed = requests.get(
        f"{stack.mlflow_url}/api/2.0/mlflow/experiments/search", params={"max_results": 100}, auth=outsider, timeout=30
    )
    assert listed.status_code == 200 and EXPERIMENT not in listed.text
    for user in ("outsider", "mlpipe"):
        made = requests.post(f"{stack.mlflow_url}/api/2.0/mlflow/users/create", auth=stack.mlflow_auth(user), timeout=30,
                             json={"username": f"sneaky-{user}", "password": secrets.token_urlsafe(18)})  # fmt: skip
        assert made.status_code == 403, (user, made.status_code, made.text[:300])


# --- Prefect -------------------------------------------------------------------------------------

PREFECT_PROTECTED = [
    ("POST", "/flows/filter", {}),
    ("POST", "/flow_runs/filter", {}),
    ("POST", "/logs/filter", {}),
    ("POST", "/artifacts/filter", {}),
    ("GET", "/admin/settings", None),
    ("GET", "/admin/version", None),
    ("POST", "/variables/", {"name": "intruder", "value": "x"}),
]


@pytest.mark.parametrize(("method", "path", "body"), PREFECT_PROTECTED, ids=[p for _, p, _ in PREFECT_PROTECTED])
def test_prefect_refuses_calls_without_the_auth_string(stack, method, path, body):
    url = stack.prefect_api + path
    password = stack.secret("prefect_auth_password")
    wrong = [None, ("admin", "wrong-" + secrets.token_hex(8)), ("root", password), ("admin", password + "x")]
    for auth in wrong:
        answer = requests.request(method, url, json=body, auth=auth, timeout=30)
        assert answer.status_code == 401, (auth and auth[0], answer.status_code, answer.text[:300])
    for header in (f"Bearer {stack.secret('prefect_auth_string')}", "Basic !!not-base64!!", "Basic"):
        answer = requests.request(method, url, json=body, headers={"Authorization": header}, timeout=30)
        assert answer.status_code == 401, (header.split()[0], answer.status_code)
    if method == "GET":  # the right Basic credentials: the same request answers
        answer = requests.get(url, auth=("admin", password), timeout=30)
        assert answer.status_code == 200, answer.text[:300]


def test_prefect_leaves_exactly_health_and_ready_open(stack):
    """Prefect 3.8.8 exempts GET /api/health and GET /api/ready (probes) and nothing else."""
    assert requests.get(f"{stack.prefect_api}/health", timeout=30).status_code == 200
    assert requests.get(f"{stack.prefect_api}/ready", timeout=30).status_code == 200
    assert requests.post(f"{stack.prefect_api}/health", timeout=30).status_code == 401
    assert requests.get(f"{stack.prefect_api}/variables/name/system-health", timeout=30).status_code == 401


def test_prefect_client_without_the_auth_string_is_refused_and_with_it_works(stack):
    with stack.prefect_client(None) as anonymous, pytest.raises(Exception, match="401"):
        anonymous.read_flows(limit=1)
    with stack.prefect_client("admin:wrong-" + secrets.token_hex(8)) as wrong, pytest.raises(Exception, match="401"):
        wrong.read_flows(limit=1)
    with stack.prefect_client(stack.secret("prefect_auth_string")) as client:
        assert isinstance(client.read_flows(limit=1), list)
        assert client.api_healthcheck() is None


def test_prefect_event_websocket_wants_the_auth_string(stack):
    """Websockets skip HTTP middleware: Prefect checks the auth string in the first message."""
    from websockets.exceptions import ConnectionClosed, InvalidHandshake
    from websockets.sync.client import connect

    url = stack.prefect_api.replace("http://", "ws://") + "/events/out"
    for token in (None, "admin:wrong-" + secrets.token_hex(8)):
        with connect(url, subprotocols=["prefect"], open_timeout=30) as ws:
            ws.send(json.dumps({"type": "auth", "token": token}))
            with pytest.raises(ConnectionClosed) as closed:
                ws.recv(timeout=30)
        assert closed.value.rcvd.code == 1008, closed.value
    with pytest.raises((InvalidHandshake, ConnectionClosed)), connect(url, open_timeout=30) as ws:  # no legacy mode
        ws.recv(timeout=30)
    with connect(url, subprotocols=["prefect"], open_timeout=30) as ws:
        ws.send(json.dumps({"type": "auth", "token": stack.secret("prefect_auth_string")}))
        assert json.loads(ws.recv(timeout=30)) == {"type": "auth_success"}


# --- a real run, and no secret anywhere it wrote -------------------------------------------------


def test_the_pipeline_runs_against_both_authenticated_servers(stack, pipeline):
    with stack.mlflow_client("mlpipe") as client:
        run = client.get_run(pipeline.run_id)
        versions = client.search_model_versions(f"name = '{REGISTERED_MODEL}'")
    assert run.info.status == "FINISHED" and run.data.tags["prefect.flow_run_id"] == pipeline.flow_run_id
    assert run.data.tags["mlpipe.trigger"] == "cli" and "mlpipe.model_uri" in run.data.tags
    assert [v.run_id for v in versions] == [pipeline.run_id]
    with stack.prefect_client(stack.secret("prefect_auth_string")) as client:
        flow_run = client.read_flow_run(pipeline.flow_run_id)
    assert flow_run.state.is_completed(), flow_run.state
    assert not (pipeline.home / "secrets").exists()  # the key came from the environment: no key file written


def test_a_password_in_the_tracking_uri_moves_out_of_it(stack, capsys):
    """MLflow accepts `http://user:password@host`. mlpipe printed that URI, linked it from the
    Prefect artifact `mlflow-run` and the model card, and wrote it into the training spec
    (`train/launch-N.json`, in the state directory and logged to MLflow): the password leaked to
    all of them. Now the credentials move to MLFLOW_TRACKING_USERNAME/PASSWORD and every URI
    mlpipe hands on is clean, while the server still sees them."""
    from mlpipe import tracking
    from tasks.run import _link

    password = stack.secret("mlflow_mlpipe_password")
    with_password = stack.mlflow_url.replace("http://", f"http://mlpipe:{password}@")
    with mock.patch.dict(os.environ):
        for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
            os.environ.pop(name, None)
        os.environ["MLFLOW_TRACKING_URI"] = with_password
        assert tracking.tracking_uri() == stack.mlflow_url == os.environ["MLFLOW_TRACKING_URI"]
        assert (os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"]) == ("mlpipe", password)
        ref = tracking.start_run(f"acl-uri-{secrets.token_hex(4)}", "uri-credentials", {"p": "1"}, {})
        tracking.end_run(ref)  # MLflow prints "View run ... at <uri>" here
        assert tracking._client(with_password).get_run(ref.run_id).info.status == "FINISHED"
        link = _link(ref)
    scanner = Scanner(list(stack.secrets.values()))
    scanner.blob(ref.model_dump_json(), "the RunRef (training specs, the summary, the model card)")
    scanner.blob(link, "the Prefect artifact mlflow-run")
    scanner.blob(capsys.readouterr().out, "stdout")
    assert scanner.hits == []
    assert tracking.without_credentials("http://host:5000/x") == "http://host:5000/x"
    assert tracking.without_credentials("sqlite:///a@b/mlflow.db") == "sqlite:///a@b/mlflow.db"


def test_scanner_finds_each_form_of_a_secret(tmp_path):
    """The scan below must not pass vacuously: every form it looks for is found where it is."""
    secret = Secret("probe", secrets.token_urlsafe(18), user="alice")
    header = base64.b64encode(f"alice:{secret.value}".encode()).decode()
    embedded = base64.b64encode(b"prefix-" + secret.value.encode() + b"-suffix").decode()
    for text in (f"x={secret.value}", f"Authorization: Basic {header}", f'{{"blob": "{embedded}"}}'):
        scanner = Scanner([secret])
        scanner.blob(text, "text")
        assert scanner.hits, text
    with zipfile.ZipFile(tmp_path / "c.pt", "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("data.pkl", f"key {secret.value}")
    scanner = Scanner([secret])
    scanner.tree(tmp_path, "dir")
    assert scanner.hits == ["probe in dir/c.pt!data.pkl"]
    clean = Scanner([secret])
    clean.blob("nothing here " + secrets.token_urlsafe(18), "text")
    assert clean.hits == []


def test_no_secret_in_the_cli_output_or_the_state_directory(stack, pipeline):
    scanner = Scanner(list(stack.secrets.values()))
    scanner.blob(pipeline.done.stdout, "mlpipe run stdout")
    scanner.blob(pipeline.done.stderr, "mlpipe run stderr")
    files = scanner.tree(pipeline.home, "MLPIPE_HOME")
    assert scanner.hits == []
    assert files > 20 and any((pipeline.home / "work").rglob("checkpoint.pt")), sorted(pipeline.home.iterdir())


def test_no_secret_in_mlflow(stack, pipeline, tmp_path):
    """Every run of the experiment (parent and trials): params, tags, metric names, inputs and
    every artifact downloaded; the logged models with their files; the registry."""
    import mlflow

    scanner = Scanner(list(stack.secrets.values()))
    with stack.mlflow_client("mlpipe") as client:
        experiment = client.get_experiment_by_name(EXPERIMENT)
        scanner.blob(json.dumps(dict(experiment.tags)) + experiment.artifact_location, "experiment")
        runs = client.search_runs([experiment.experiment_id], max_results=1000)
        assert len(runs) >= 2  # the parent and its trial
        artifacts = 0
        for run in runs:
            rid = run.info.run_id
            scanner.blob(json.dumps(run.data.params), f"params of run {rid}")
            scanner.blob(json.dumps(run.data.tags), f"tags of run {rid}")
            scanner.blob(json.dumps(sorted(run.data.metrics)), f"metric names of run {rid}")
            scanner.blob(json.dumps(run.to_dictionary(), default=str), f"run {rid}")
            target = tmp_path / "runs" / rid
            target.mkdir(parents=True)
            if client.list_artifacts(rid):
                client.download_artifacts(rid, "", str(target))
                artifacts += scanner.tree(target, f"artifacts of run {rid}")
        models = client.search_logged_models([experiment.experiment_id])
        assert models, "no logged model"
        for model in models:
            scanner.blob(
                json.dumps({"params": model.params, "tags": model.tags, "name": model.name}),
                f"logged model {model.model_id}",
            )
            target = tmp_path / "models" / model.model_id
            mlflow.artifacts.download_artifacts(artifact_uri=model.artifact_location, dst_path=str(target),
                                                tracking_uri=stack.mlflow_url)  # fmt: skip
            artifacts += scanner.tree(target, f"logged model {model.model_id}")
        for version in client.search_model_versions(f"name = '{REGISTERED_MODEL}'"):
            scanner.blob(json.dumps({"tags": version.tags, "source": version.source, "description": version.description,
                                     "aliases": version.aliases}), f"model version {version.version}")  # fmt: skip
    assert scanner.hits == []
    assert artifacts > 10


def test_no_secret_in_prefect(stack, pipeline):
    """The flow run (parameters, states), its logs, its task runs (inputs, states, result
    references), its artifacts and its events, read back through the authenticated API."""
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        FlowRunFilter,
        FlowRunFilterId,
        LogFilter,
        LogFilterFlowRunId,
    )  # fmt: skip

    scanner = Scanner(list(stack.secrets.values()))
    auth = stack.secret("prefect_auth_string")
    with stack.prefect_client(auth) as client:
        flow_run = client.read_flow_run(pipeline.flow_run_id)
        scanner.blob(flow_run.model_dump_json(), "the flow run")
        scanner.blob(json.dumps(flow_run.parameters, default=str), "the flow run's parameters")
        for state in client.read_flow_run_states(pipeline.flow_run_id):
            scanner.blob(state.model_dump_json(), "a flow run state")
        logs, offset = [], 0
        while page := client.read_logs(
            LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run.id])), limit=200, offset=offset
        ):
            logs += page
            offset += len(page)
        for entry in logs:
            scanner.blob(entry.model_dump_json(), f"log line {entry.message[:60]!r}")
        task_runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run.id])))
        for task_run in task_runs:
            scanner.blob(task_run.model_dump_json(), f"task run {task_run.name}")
            for state in client.read_task_run_states(task_run.id):
                scanner.blob(state.model_dump_json(), f"a state of task run {task_run.name}")
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run.id]))
        )
        for artifact in artifacts:
            scanner.blob(artifact.model_dump_json(), f"Prefect artifact {artifact.key or artifact.id}")
    events = _events(stack, str(flow_run.id))
    settings = requests.get(f"{stack.prefect_api}/admin/settings", auth=tuple(auth.split(":", 1)), timeout=30)
    assert settings.status_code == 200
    scanner.blob(settings.text, "the server's /api/admin/settings")  # it holds the auth string and the DB password
    for event in events:
        scanner.blob(json.dumps(event), f"event {event.get('event')}")
    assert scanner.hits == []
    counts = (len(logs), len(task_runs), len(artifacts), len(events))
    assert counts[0] > 20 and counts[1] >= 8 and counts[2] >= 1 and counts[3] > 10, counts
    assert any(a.key == "mlflow-run" for a in artifacts)


def test_no_secret_in_the_servers_own_logs(stack, pipeline):
    """What operators ship to a log aggregator: the MLflow, Prefect and PostgreSQL server logs."""
    scanner = Scanner(list(stack.secrets.values()))
    for log in (stack.base / "mlflow" / "server.log", stack.base / "prefect" / "server.log", stack.pg_log):
        scanner.blob(log.read_bytes(), str(log.relative_to(log.parents[1])))
    assert scanner.hits == []
    assert "users/create" in (stack.base / "mlflow" / "server.log").read_text()  # the logs saw the traffic


def _events(stack: Stack, flow_run_id: str) -> list[dict]:
    auth = tuple(stack.secret("prefect_auth_string").split(":", 1))
    page = requests.post(f"{stack.prefect_api}/events/filter", auth=auth, timeout=30,
                         json={"filter": {"any_resource": {"id": [f"prefect.flow-run.{flow_run_id}"]}}, "limit": 50})  # fmt: skip
    page.raise_for_status()
    body, events = page.json(), []
    events += body["events"]
    while body.get("next_page"):
        body = requests.get(body["next_page"], auth=auth, timeout=30).json()
        events += body["events"]
    return events
