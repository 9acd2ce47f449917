import contextlib
import os
import shutil
import tempfile
from pathlib import Path

import pytest

# Tests never read or write a user's state: not the checkout's `.mlpipe` (the default state
# directory of a run started there), not $MLPIPE_HOME, Prefect's home (~/.prefect: profiles,
# database, result storage) or a tracking server the shell points at. Set before anything imports
# Prefect, which reads its settings once; a test that needs its own sets its own (the `state`
# fixture, the subprocess helpers), everything else lands in this session's folder.
SESSION_STATE = Path(tempfile.mkdtemp(prefix="mlpipe-test-session-"))
for _name in ("MLFLOW_TRACKING_URI", "PREFECT_API_URL", "PREFECT_LOCAL_STORAGE_PATH", "PREFECT_PROFILES_PATH"):
    os.environ.pop(_name, None)
os.environ["MLPIPE_HOME"] = str(SESSION_STATE / "mlpipe-home")
os.environ["PREFECT_HOME"] = str(SESSION_STATE / "prefect-home")

CHECKOUT_STATE = Path(__file__).resolve().parents[1] / ".mlpipe"


def state_listing(root: Path) -> dict[str, tuple[int, int]]:
    """Every entry under `root` (the folder itself included) as (size, mtime_ns); {} when absent.
    A file written, replaced, appended to or removed, or one created in a folder, changes it."""
    if not root.exists():
        return {}
    out = {}
    for folder, dirs, files in os.walk(root):
        for path in [Path(folder), *(Path(folder, n) for n in dirs + files)]:
            with contextlib.suppress(FileNotFoundError):
                st = path.lstat()
                out[path.relative_to(root).as_posix()] = (st.st_size if not path.is_dir() else -1, st.st_mtime_ns)
    return out


CHECKOUT_BEFORE = state_listing(CHECKOUT_STATE)  # at the session's start, before any test ran


def checkout_state_changes() -> list[str]:
    """What changed in the checkout's `.mlpipe` since the session started, one line each."""
    after = state_listing(CHECKOUT_STATE)
    lines = [f"added   {p}" for p in sorted(after.keys() - CHECKOUT_BEFORE.keys())]
    lines += [f"removed {p}" for p in sorted(CHECKOUT_BEFORE.keys() - after.keys())]
    lines += [f"changed {p}" for p in sorted(after.keys() & CHECKOUT_BEFORE.keys()) if after[p] != CHECKOUT_BEFORE[p]]
    return lines


@pytest.fixture
def checkout_changes():
    return checkout_state_changes


def pytest_collection_modifyitems(items) -> None:
    """The checkout guard (tests/test_checkout_untouched.py) runs after every other test. The load test
    runs right after the integration tests, whose servers it shares: tests/servers.py stops them after
    their last test, and they need not idle through the reliability tests in between."""
    integration = [i for i, item in enumerate(items) if "integration" in item.path.parts]

    def key(pair: tuple[int, pytest.Item]) -> tuple[bool, float]:
        at, item = pair
        if integration and item.path.parts[-2:] == ("reliability", "test_load.py"):
            return False, integration[-1] + 0.5
        return item.path.name == "test_checkout_untouched.py", at

    items[:] = [item for _, item in sorted(enumerate(items), key=key)]


def pytest_sessionfinish(session) -> None:
    """The same check after everything (fixture teardowns too), also when the guard test was not
    selected: a suite that touched the checkout's state fails, whatever its tests said."""
    changes = checkout_state_changes()
    if changes:
        shown = "\n  ".join(changes[:20]) + (f"\n  ... and {len(changes) - 20} more" if len(changes) > 20 else "")
        session.config.get_terminal_writer().line(
            f"\nFAILED: the tests changed the checkout's state directory {CHECKOUT_STATE} "
            f"(tests must use a temporary MLPIPE_HOME):\n  {shown}", red=True, bold=True)  # fmt: skip
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_unconfigure() -> None:
    shutil.rmtree(SESSION_STATE, ignore_errors=True)


os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")

from mlpipe.config import PipelineConfig  # noqa: E402
from mlpipe.sample import write_sample_digits  # noqa: E402
from tests.privacy import plant_canaries  # noqa: E402

# Real servers on 127.0.0.1 (PostgreSQL, S3, MLflow, Prefect + worker), started once for the session
# by whichever test first needs them: the integration tests and the reliability load test share them.
# And one small `mlpipe run` (tests/cli_runs.py) that two tests read.
pytest_plugins = ["tests.servers", "tests.cli_runs"]


@pytest.fixture(scope="session")
def sample_root(tmp_path_factory) -> Path:
    """The embedded dataset, written once per session; tests copy it before changing it."""
    return write_sample_digits(tmp_path_factory.mktemp("sample") / "digits")


@pytest.fixture(scope="session")
def canary_sample(tmp_path_factory) -> Path:
    """The embedded dataset with personal-data canaries planted (tests.privacy)."""
    return plant_canaries(write_sample_digits(tmp_path_factory.mktemp("canary-sample") / "digits"))


@pytest.fixture
def state(tmp_path, monkeypatch) -> Path:
    """A private state directory (work files, key file, MLflow store) per test."""
    home = tmp_path / "state"
    monkeypatch.setenv("MLPIPE_HOME", str(home))
    monkeypatch.delenv("MLPIPE_PSEUDONYM_KEY", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return home


@pytest.fixture
def dataset_copy(sample_root, tmp_path) -> Path:
    target = tmp_path / "data"
    shutil.copytree(sample_root, target)
    return target


@pytest.fixture
def config(sample_root) -> PipelineConfig:
    return PipelineConfig().with_overrides({"source.uri": str(sample_root)})
