"""End a run on Prefect's temporary (ephemeral) server cleanly.

With no `PREFECT_API_URL`, Prefect 3.8 starts a temporary server subprocess and stops it at
interpreter exit. Task-run states reach that server as events, which its task-run recorder
writes in batches every few seconds. If the server is stopped while a batch is being written,
the recorder logs "Error flushing N events (N to retry, 0 dropped)" with CancelledError
tracebacks. The run succeeded, but users read tracebacks as failure, and the last task states
may not be recorded.

So before exit we deliver the pending events, wait until the server has recorded a final
state for every task run of the flow run, and only then stop it. This also lets our own last
line (the summary or the error) be the last line on the console.

The server takes seconds to start (a uvicorn process importing Prefect's server). `mlpipe run`
starts it first thing, in the background, so it comes up on another core while this process
imports torch and the stages, instead of after. And a flow run on it sends no heartbeats: the
server stops with this process, so nothing would watch them, and Prefect 3.8's heartbeat thread
holds every flow run's end up to a second (it sleeps in whole seconds before it sees the stop).
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Iterator

RECORDER_FLUSH_ENV = "PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_FLUSH_INTERVAL"
# Not lowered on purpose: at 0.5 s the temporary server spent a whole core while training ran.
DEFAULT_FLUSH_INTERVAL_S = 5.0


def start_in_background() -> threading.Thread | None:
    """Start the temporary server in a thread, as the first API call would (the same singleton,
    so the flow finds it running). None when a server is configured. Join the thread before
    the flow starts: until then the server may not answer yet."""
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_ENABLED

    if PREFECT_API_URL.value() or not PREFECT_SERVER_EPHEMERAL_ENABLED.value():
        return None

    def start() -> None:
        from prefect.client.orchestration import get_client
        from prefect.server.api.server import SubprocessASGIServer

        server = SubprocessASGIServer()
        try:
            server.start()
            _stop_with_this_process(server.server_process.pid)
            with get_client(sync_client=True) as client:  # a new server's first request takes ~0.4 s
                client.api_version()
        except Exception:  # noqa: BLE001 - it fails again, with Prefect's own message, at the flow's first call
            server.stop()  # else a server that was slow to answer would outlive the one the flow starts

    thread = threading.Thread(target=start, name="prefect-temporary-server", daemon=True)
    thread.start()
    return thread


@contextlib.contextmanager
def flow_run_settings() -> Iterator[None]:
    """Around a flow call: no heartbeats on the temporary server (see above)."""
    if temporary_server() is None:
        yield
        return
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

    with temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
        yield


# Prefect stops its temporary server at interpreter exit, which a SIGKILLed process never reaches.
_WATCHDOG = """
import os, signal, sys, time
parent, server = int(sys.argv[1]), int(sys.argv[2])
while os.getppid() == parent:
    time.sleep(1)
try:
    os.kill(server, signal.SIGTERM)
except ProcessLookupError:
    pass
"""


def _stop_with_this_process(server_pid: int) -> None:
    """A watchdog child that stops the temporary server once this process is gone, however it
    ended (its parent changes when this process dies; after a normal exit the server is gone
    already)."""
    import subprocess
    import sys

    subprocess.Popen([sys.executable, "-c", _WATCHDOG, str(os.getpid()), str(server_pid)],
                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip


def temporary_server():
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer._instances.get(None)
    return server if server is not None and server.server_process is not None else None


def settle_and_stop(flow_run_id: str | None, timeout_s: float = 20.0) -> bool:
    """Wait until the temporary server has recorded every task run as final, then stop it.

    Returns False when there is no temporary server (a real server is configured) or it did not
    settle within the timeout (it is stopped anyway, as Prefect would at exit).
    """
    server = temporary_server()
    if server is None:
        return False
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    EventsWorker.drain_all(timeout=timeout_s)  # task-run states travel as events
    APILogWorker.drain_all(timeout=timeout_s)
    settled = flow_run_id is None or _wait_for_recorder(flow_run_id, timeout_s)
    server.stop()
    return settled


def _wait_for_recorder(flow_run_id: str, timeout_s: float) -> bool:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    # Every task run final, unchanged for longer than one flush interval: the queue is empty.
    quiet_for = float(os.environ.get(RECORDER_FLUSH_ENV, DEFAULT_FLUSH_INTERVAL_S)) + 0.5
    deadline = time.monotonic() + timeout_s
    seen, since = None, time.monotonic()
    with get_client(sync_client=True) as client:
        while time.monotonic() < deadline:
            runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
            snapshot = sorted((str(r.id), r.state.type.value if r.state else "") for r in runs)
            if snapshot != seen or not all(r.state is not None and r.state.is_final() for r in runs):
                seen, since = snapshot, time.monotonic()
            elif time.monotonic() - since >= quiet_for:
                return True
            time.sleep(0.25)
    return False
