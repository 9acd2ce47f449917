"""The suite leaves the checkout's state directory alone (issue 16): on a clone where `make run`
ran first, `.mlpipe` holds a user's MLflow store, stage files and Prefect results, and no test may
read or write them. tests/conftest.py points every test at a session folder (MLPIPE_HOME,
PREFECT_HOME) and lists `.mlpipe` (sizes, mtimes) before the first test; this test, sorted after all
others, compares. `pytest_sessionfinish` repeats the check after fixture teardowns and when this
file is not selected."""

from __future__ import annotations

import os
from pathlib import Path


def test_the_suite_left_the_checkouts_state_directory_alone(checkout_changes):
    changes = checkout_changes()
    assert not changes, "the tests changed the checkout's .mlpipe:\n" + "\n".join(changes[:40])


def test_the_session_points_state_away_from_the_checkout():
    """What the guard relies on: this process's defaults lead into the session folder."""
    from mlpipe.store import state_path

    checkout = Path(__file__).resolve().parents[1]
    assert checkout not in state_path().parents and state_path() != checkout / ".mlpipe"
    assert Path(os.environ["PREFECT_HOME"]).resolve() != Path.home() / ".prefect"


def test_importing_the_cli_leaves_prefects_result_storage_alone(tmp_path):
    """The leak's cause: `flows.cli` pointed PREFECT_LOCAL_STORAGE_PATH at `./.mlpipe` when imported,
    so any process importing it (a test module) wrote Prefect results into the working directory."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("MLPIPE_HOME", "PREFECT_LOCAL_STORAGE_PATH")}
    code = ("import os, flows.cli; from prefect.settings import get_current_settings; "
            "print(os.environ.get('PREFECT_LOCAL_STORAGE_PATH')); print(get_current_settings().results.local_storage_path)")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, check=True)
    assert ".mlpipe" not in out.stdout, out.stdout
    assert not (tmp_path / ".mlpipe").exists()


def test_a_run_keeps_its_prefect_results_in_the_state_directory_it_starts_with(tmp_path, monkeypatch):
    """Where `mlpipe run` and `mlpipe serve` put cached stage results: `<state>/prefect-results`,
    resolved when the flow starts, for this process's Prefect and the processes it starts; restored after."""
    from prefect.settings import get_current_settings

    from flows.cli import _results_in_state_dir

    monkeypatch.setenv("MLPIPE_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("PREFECT_LOCAL_STORAGE_PATH", raising=False)
    before = get_current_settings().results.local_storage_path
    with _results_in_state_dir():
        assert get_current_settings().results.local_storage_path == tmp_path / "home" / "prefect-results"
        assert os.environ["PREFECT_LOCAL_STORAGE_PATH"] == str(tmp_path / "home" / "prefect-results")
    assert get_current_settings().results.local_storage_path == before
    assert "PREFECT_LOCAL_STORAGE_PATH" not in os.environ
    monkeypatch.setenv("PREFECT_LOCAL_STORAGE_PATH", str(tmp_path / "mine"))  # set by the user: kept
    with _results_in_state_dir():
        assert os.environ["PREFECT_LOCAL_STORAGE_PATH"] == str(tmp_path / "mine")
