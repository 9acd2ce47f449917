"""Crash hygiene and provenance in the MLflow record."""

import os
import types

from mlflow.tracking import MlflowClient

from mlpipe import tracking
from tasks.run import end_mlflow_runs


def _parent_with_child(flow_run_id: str, owner: dict[str, str]) -> tuple[tracking.RunRef, str]:
    parent = tracking.start_run("crash", "flow", {"train.lr": "0.1"}, {"prefect.flow_run_id": flow_run_id, **owner})
    return parent, tracking.start_child_run(parent, "trial-000", {"train.lr": "0.1"})


def test_the_crash_and_cancel_hooks_end_the_parent_and_its_children(state):
    parent, child = _parent_with_child("fr-1", {})
    other, _ = _parent_with_child("fr-2", {})
    hook = end_mlflow_runs("KILLED")
    hook(None, types.SimpleNamespace(id="fr-1", parameters={"config": {"experiment": "crash"}}), None)
    client = MlflowClient(parent.tracking_uri)
    assert client.get_run(parent.run_id).info.status == "KILLED"
    assert client.get_run(child).info.status == "KILLED"
    assert client.get_run(other.run_id).info.status == "RUNNING"  # another flow run's: untouched


def test_reconcile_ends_runs_whose_process_is_gone_and_spares_live_ones(state, capsys):
    """`mlpipe reconcile` (tests/reliability/test_faults.py kills a real `mlpipe run`; its rerun
    calls the same reconcile)."""
    from flows.cli import main

    dead = {**tracking.owner_tags(), "mlpipe.pid": "999999999"}
    gone, gone_child = _parent_with_child("fr-3", dead)
    alive, _ = _parent_with_child("fr-4", tracking.owner_tags())  # this test's own process
    reused = {**tracking.owner_tags(), "mlpipe.pid_started": "1.000"}  # the pid exists, but it is another process
    recycled, recycled_child = _parent_with_child("fr-5", reused)
    assert main(["reconcile"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("ended 4 MLflow run(s) whose flow process is gone, as KILLED: ")
    ended = out.strip().split(": ", 1)[1].split(", ")
    client = MlflowClient(gone.tracking_uri)
    assert sorted(ended) == sorted([gone.run_id, gone_child, recycled.run_id, recycled_child])
    assert client.get_run(gone.run_id).info.status == "KILLED"
    assert client.get_run(alive.run_id).info.status == "RUNNING"


def test_previous_run_of_the_same_deployment_and_the_param_diff(state):
    first = tracking.start_run("prov", "a", {"train.lr": "0.1", "anonymize.k": "5"}, {"prefect.deployment": "manual"})
    tracking.start_run("prov", "b", {"train.lr": "0.9"}, {"prefect.deployment": "nightly"})
    second = tracking.start_run("prov", "c", {"train.lr": "0.2", "anonymize.k": "5"}, {"prefect.deployment": "manual"})
    run_id, params = tracking.previous_run(second, "manual")
    assert run_id == first.run_id
    assert tracking.param_diff(params, {"train.lr": "0.2", "anonymize.k": "5"}) == {"train.lr": {"before": "0.1", "after": "0.2"}}
    assert tracking.previous_run(first, "manual") is None


def test_an_unreachable_tracking_server_fails_at_once_in_one_line(state, monkeypatch):
    import socket
    import time

    import pytest

    from mlpipe.errors import MlpipeError

    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
    started = time.perf_counter()
    with pytest.raises(MlpipeError, match=rf"MLflow tracking server http://127.0.0.1:{port} is unreachable \(ConnectionError"):
        tracking.start_run("x", "y", {}, {})
    assert time.perf_counter() - started < 10


def test_writes_inside_a_pipeline_run_leave_the_caller_at_once_and_all_land_before_it_ends(state, monkeypatch):
    import threading

    gate = threading.Event()
    original = tracking.MlflowClient.log_dict

    def slow_log_dict(self, *args, **kwargs):  # a slow artifact store
        assert gate.wait(10)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(tracking.MlflowClient, "log_dict", slow_log_dict)
    with tracking.pipeline_run("deferred", "flow", {}, {}) as run:
        tracking.log_stage(run, "split", {"rows": 3})  # would block until the gate opens, were it synchronous
        tracking.set_tags(run, {"after": "yes"})
        gate.set()
    client = MlflowClient(run.tracking_uri)
    finished = client.get_run(run.run_id)
    assert finished.info.status == "FINISHED" and finished.data.tags["after"] == "yes"
    assert [a.path for a in client.list_artifacts(run.run_id, "split")] == ["split/report.json"]


def test_a_failed_deferred_write_fails_the_run_instead_of_vanishing(state, monkeypatch):
    import pytest

    def broken(self, *args, **kwargs):
        raise OSError("artifact store is read-only")

    monkeypatch.setattr(tracking.MlflowClient, "log_dict", broken)
    with pytest.raises(OSError, match="read-only"):
        with tracking.pipeline_run("deferred", "flow", {}, {}) as run:
            tracking.log_stage(run, "split", {"rows": 3})
    assert MlflowClient(run.tracking_uri).get_run(run.run_id).info.status == "FAILED"


def test_mlflows_process_wide_tracking_uri_is_put_back_even_by_overlapping_threads(monkeypatch):
    """Two threads of one process (a thread task runner) each log a model to their own store: the
    second waits for the first's block, so neither puts back the other's URI and none stays set."""
    import threading

    from mlflow.tracking._tracking_service import utils

    monkeypatch.setattr(utils, "_tracking_uri", None)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    a_inside, a_may_leave, b_inside = threading.Event(), threading.Event(), threading.Event()

    def a() -> None:
        with tracking._fluent_tracking_uri("sqlite:////tmp/a.db"):
            a_inside.set()
            a_may_leave.wait(10)

    def b() -> None:
        a_inside.wait(10)
        with tracking._fluent_tracking_uri("sqlite:////tmp/b.db"):
            b_inside.set()

    threads = [threading.Thread(target=a), threading.Thread(target=b)]
    for thread in threads:
        thread.start()
    assert a_inside.wait(10)
    assert not b_inside.wait(0.5)  # b waits while a's store is set
    a_may_leave.set()
    for thread in threads:
        thread.join(10)
    assert b_inside.is_set() and utils._tracking_uri is None and "MLFLOW_TRACKING_URI" not in os.environ
