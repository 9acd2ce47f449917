"""Parallel training launches through a Prefect task runner: threads or processes on this
machine, or a Dask cluster (prefect-dask)."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator

from prefect import Task
from prefect.concurrency.sync import concurrency
from prefect.futures import wait
from prefect.task_runners import ProcessPoolTaskRunner, TaskRunner, ThreadPoolTaskRunner

from mlpipe.config import SearchConfig, Trial
from mlpipe.train.launch import Launch, raise_first_failure, uses_cuda, visible_gpus


def task_runner(search: SearchConfig, workers: int) -> TaskRunner:
    if search.task_runner == "process":
        return ProcessPoolTaskRunner(max_workers=workers)
    if search.task_runner == "dask":
        from prefect_dask import DaskTaskRunner

        logging.getLogger("distributed").setLevel(logging.WARNING)  # its INFO lines would bury the trials'
        if search.dask_address:
            return DaskTaskRunner(address=search.dask_address)
        return DaskTaskRunner(cluster_kwargs={"n_workers": workers, "threads_per_worker": 1, "processes": True,
                                              "host": "127.0.0.1", "dashboard_address": ":0"})  # fmt: skip
    return ThreadPoolTaskRunner(max_workers=workers)


def fan_out(search: SearchConfig, launch_task: Task) -> Callable[[list[Launch]], None]:
    """`run_launches` for the library: one job runs in the calling task; several are submitted as
    `launch_task` runs to the configured task runner, and all are waited on before any failure is raised."""

    def run_launches(jobs: list[Launch]) -> None:
        if len(jobs) == 1:
            jobs[0].run()
            return
        with task_runner(search, len(jobs)) as runner:
            futures = [runner.submit(launch_task, {"job": job}) for job in jobs]
            wait(futures)
            states = [f.state for f in futures]
        raise_first_failure([_error(s) for s in states], len(jobs))

    return run_launches


def _error(state) -> BaseException | None:
    if state.is_completed():
        return None
    try:
        state.result(raise_on_failure=True)
    except BaseException as err:  # noqa: BLE001 - handed on to raise_first_failure
        return err
    return RuntimeError(f"training launch ended {state.name}")


GPU_LIMIT = "mlpipe-gpu"


@contextlib.contextmanager
def gpu_slots(trials: list[Trial], limit: str = GPU_LIMIT) -> Iterator[int]:
    """Hold this machine's GPUs on Prefect's global concurrency limit `mlpipe-gpu` while training
    (create it once: `prefect gcl create mlpipe-gpu --limit <GPUs>`): overlapping runs queue for
    them instead of sharing a GPU. CPU-only training takes no slot. Without the limit defined,
    Prefect lets the run through (strict=False) and says so in the log."""
    gpus = len(visible_gpus()) if any(uses_cuda(t.train) for t in trials) else 0
    if gpus == 0:
        yield 0
        return
    with concurrency(limit, occupy=gpus, strict=False):
        yield gpus
