"""Parallel trials through Prefect's task runners: threads and processes here, and a real local
Dask cluster (prefect-dask) standing in for a remote one."""

import dataclasses
import json
import os
import time
from pathlib import Path

import pytest
from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterName

from mlpipe.anonymize import anonymize
from mlpipe.config import AnonymizeConfig, IngestConfig, LabelConfig, PipelineConfig, SearchConfig, SourceConfig
from mlpipe.errors import MlpipeError
from mlpipe.ingest import ingest
from mlpipe.label import label
from mlpipe.resample import resample
from mlpipe.split import split
from mlpipe.train.launch import train
from tasks._runners import fan_out
from tasks.train import train_launch

pytestmark = pytest.mark.slow


@dataclasses.dataclass(frozen=True)
class Stamp:
    """A stand-in for a torchrun launch: records which process ran it, and whether all its
    `peers` had started while it ran (a barrier, not a timing window: load cannot fake it)."""

    path: Path
    fail: bool = False
    peers: tuple[Path, ...] = ()

    def run(self) -> None:
        self.path.with_suffix(".started").touch()
        deadline = time.time() + 120
        while not all(p.with_suffix(".started").exists() for p in self.peers) and time.time() < deadline:
            time.sleep(0.05)
        together = all(p.with_suffix(".started").exists() for p in self.peers)
        self.path.write_text(json.dumps({"pid": os.getpid(), "together": together}))
        if self.fail:
            raise MlpipeError(f"training failed (torchrun exit code 1): {self.path.name} broke")


@task(cache_policy=NO_CACHE)
def stamp(job: Stamp) -> None:
    job.run()


@pytest.mark.parametrize("runner", ["thread", "process"])
def test_launches_run_side_by_side_through_the_task_runner(harness, runner, tmp_path):
    paths = (tmp_path / "a", tmp_path / "b")
    jobs = [Stamp(path, peers=paths) for path in paths]
    fan_out(SearchConfig(max_parallel=2, task_runner=runner), stamp)(jobs)
    a, b = (json.loads(job.path.read_text()) for job in jobs)
    assert a["together"] and b["together"]  # each saw the other start while it ran: side by side
    if runner == "process":
        assert len({a["pid"], b["pid"], os.getpid()}) == 3


def test_a_failed_launch_fails_the_fan_out_after_the_others_finish(harness, tmp_path):
    jobs = [Stamp(tmp_path / "a", fail=True), Stamp(tmp_path / "b")]
    with pytest.raises(MlpipeError, match="1 of 2 training launches failed; first: .*a broke"):
        fan_out(SearchConfig(max_parallel=2), stamp)(jobs)
    assert jobs[1].path.exists()


def test_trials_train_on_a_real_local_dask_cluster(harness, state, sample_root):
    from distributed import Client, LocalCluster, get_task_stream

    source = SourceConfig(uri=str(sample_root))
    labelled = label(anonymize(ingest(source, IngestConfig()), AnonymizeConfig(), source), LabelConfig(find_label_issues=False))
    config = PipelineConfig().with_overrides({"train.epochs": 1, "train.nproc": 1})
    splits = split(labelled, config.split)
    trials = config.trials()[:2]
    resampled = resample(splits, trials)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address=":0") as cluster, \
         Client(cluster) as client, get_task_stream(client) as stream:  # fmt: skip
        search = SearchConfig(max_parallel=2, task_runner="dask", dask_address=cluster.scheduler_address)
        trained = train(splits, resampled, trials, {}, None, search=search, run_launches=fan_out(search, train_launch))
    workers = {event["worker"] for event in stream.data}  # the stream is read back when its block ends
    assert len(workers) == 2  # one launch on each Dask worker
    assert [t["trial"] for t in trained.report["trials"]] == [t.name for t in trials]
    assert all(t["epochs_run"] == 1 and 0 <= t["val_metrics"]["val_macro_f1"] <= 1 for t in trained.report["trials"])
    with get_client(sync_client=True) as prefect:
        runs = prefect.read_task_runs(task_run_filter=TaskRunFilter(name=TaskRunFilterName(like_="train-launch-")))
    assert {r.name for r in runs if r.state.is_completed()} >= {"train-launch-0", "train-launch-1"}


def test_overlapping_runs_queue_for_the_gpus_on_the_global_concurrency_limit(harness, monkeypatch):
    import threading

    import tasks._runners as runners
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate

    with get_client(sync_client=True) as client:
        client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name="test-gpu", limit=1))
    monkeypatch.setattr(runners, "uses_cuda", lambda cfg: True)  # as on a one-GPU machine
    monkeypatch.setattr(runners, "visible_gpus", lambda: ["0"])
    trials, windows = PipelineConfig().trials()[:1], []

    def one_run() -> None:
        with runners.gpu_slots(trials, limit="test-gpu") as held:
            started = time.time()
            time.sleep(1.5)
            windows.append((started, time.time(), held))

    threads = [threading.Thread(target=one_run) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    (a_start, a_end, held), (b_start, _, _) = sorted(windows)
    assert held == 1 and b_start >= a_end - 0.05  # the second waited for the first's GPU
    monkeypatch.setattr(runners, "uses_cuda", lambda cfg: False)
    with runners.gpu_slots(trials, limit="test-gpu") as held:  # CPU training takes no slot
        assert held == 0
