"""Multi-node launches: rendezvous settings, the torchrun command, announcements, and a real two-node
job on this machine (two torchrun agents on 127.0.0.1, gloo on CPU)."""

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mlpipe.anonymize import anonymize
from mlpipe.config import AnonymizeConfig, IngestConfig, LabelConfig, PipelineConfig, SourceConfig, TrainConfig
from mlpipe.errors import MlpipeError
from mlpipe.ingest import ingest
from mlpipe.label import label
from mlpipe.resample import resample
from mlpipe.split import split
from mlpipe.store import StageResult
from mlpipe.train import launch as launch_module
from mlpipe.train.launch import Progress, keyed, torchrun_command, train, trial_dir
from mlpipe.train.nodes import Nodes, launches_dir

ROOT = Path(__file__).resolve().parents[2]


def test_torchrun_command_for_several_nodes(tmp_path):
    nodes = Nodes.of(TrainConfig(nnodes=2, rdzv_endpoint="node0:29400", rdzv_timeout_s=60))
    cmd = torchrun_command(tmp_path / "s.json", 4, 1, nodes.torchrun_args("launch-0-ab12", host=True))
    assert "--standalone" not in cmd
    rdzv = ["--nnodes=2", "--rdzv-backend=c10d", "--rdzv-endpoint=node0:29400", "--rdzv-id=launch-0-ab12",
            "--rdzv-conf=join_timeout=60,is_host=1"]  # fmt: skip
    assert cmd[3:8] == rdzv  # torchrun's own options, before the worker module
    assert cmd[-4:] == ["-m", "mlpipe.train.worker", "--spec", str(tmp_path / "s.json")]
    assert {"--nproc-per-node=4", "--max-restarts=1"} <= set(cmd)
    joining = nodes.torchrun_args("launch-0-ab12", host=False)
    assert joining[:-1] == rdzv[:-1] and joining[-1] == "--rdzv-conf=join_timeout=60,is_host=0"
    assert Nodes.of(TrainConfig()) is None


def test_where_a_job_meets_is_not_part_of_any_key():
    splits = StageResult(stage="split", path="/s", key="s" * 16, report={})
    resampled = StageResult(stage="resample", path="/r", key="r" * 16, report={})
    base = PipelineConfig().with_overrides({"search.grid": {}}).trials()[0]

    def folder(**train) -> Path:
        return trial_dir(splits, resampled, base.model_copy(update={"train": TrainConfig(**train)}), "")

    one = folder(nnodes=2, rdzv_endpoint="node0:29400")
    assert folder(nnodes=2, rdzv_endpoint="node7:1234", rdzv_timeout_s=60) == one
    assert folder(nnodes=3, rdzv_endpoint="node0:29400") != one  # the world size changes the results
    assert folder() != one
    assert "rdzv_endpoint" not in keyed(TrainConfig()) and keyed(TrainConfig())["nnodes"] == 1


def test_a_launch_is_announced_while_it_runs_with_a_new_id_each_time(state, tmp_path, monkeypatch):
    seen = []

    def fake_torchrun(argv, log_path, env):
        (descriptor,) = [json.loads(p.read_text()) for p in launches_dir().glob("*.json")]
        seen.append((argv, descriptor))

    monkeypatch.setattr(launch_module, "run_torchrun", fake_torchrun)
    nodes = Nodes(2, "127.0.0.1:29400", 30)
    for _ in range(2):
        launch_module.launch(tmp_path / "launch-0.json", 1, 0, tmp_path / "launch-0.log", cpu=True, nodes=nodes)
    assert list(launches_dir().glob("*")) == []  # removed when the launch ended
    for argv, descriptor in seen:
        assert descriptor["log"] == str(tmp_path / "launch-0.log") and descriptor["nproc"] == 1
        assert descriptor["argv"] == [a.replace("is_host=1", "is_host=0") for a in argv[1:]]
        assert f"--rdzv-id={descriptor['rdzv_id']}" in argv
    assert seen[0][1]["rdzv_id"] != seen[1][1]["rdzv_id"]  # a rerun of the same spec is a new launch to join


def test_progress_reads_the_joining_nodes_logs_too(tmp_path):
    """Rank 0, the one that prints epochs, may run on a joining node."""
    progress = Progress({"trial-000": 3}, None)
    (tmp_path / "launch-0.log").write_text("")
    with contextlib.closing(progress), progress.following([tmp_path / "launch-0.log"], every_s=0.05):
        (tmp_path / "launch-0.node-b.log").write_text("".join(f"trial-000 epoch {e}/3 x 9 img/s\n" for e in range(2)))
    assert progress.done == 2


# --- real launches ------------------------------------------------------------------------------


@pytest.fixture
def prepared(state, sample_root):
    source = SourceConfig(uri=str(sample_root))
    labelled = label(anonymize(ingest(source, IngestConfig()), AnonymizeConfig(), source), LabelConfig(find_label_issues=False))
    trials = PipelineConfig().with_overrides({"search.grid": {}}).trials()
    splits = split(labelled, PipelineConfig().split)
    return splits, resample(splits, trials)


def _trials(**train) -> list:
    base = {"train.epochs": 2, "train.device": "cpu", "search.grid": {}}
    return PipelineConfig().with_overrides({**base, **{f"train.{k}": v for k, v in train.items()}}).trials()


def _history(folder: Path) -> list[dict]:
    history = json.loads((folder / "result.json").read_text())["history"]
    return [{k: v for k, v in epoch.items() if k != "img_per_s"} for epoch in history]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_nodes_train_like_one_node_with_as_many_processes(prepared, state, monkeypatch):
    """Node A is this process (train()); node B is `mlpipe join` in a subprocess. One CPU thread
    a process everywhere, as in the one-node run, so that the results can be identical."""
    splits, resampled = prepared
    monkeypatch.setattr(os, "cpu_count", lambda: 1)
    env = {**os.environ, "MLPIPE_HOME": str(state), "OMP_NUM_THREADS": "1"}
    node_b = subprocess.Popen([sys.executable, "-m", "flows.cli", "join", "--idle-exit", "20"], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    two_nodes = _trials(nproc=1, nnodes=2, rdzv_endpoint=f"127.0.0.1:{_free_port()}", rdzv_timeout_s=120)
    one_node = _trials(nproc=2)
    try:
        two = train(splits, resampled, two_nodes, {}, None)
        # The one-node run trains while node B waits out its --idle-exit (a one-node launch is announced to no
        # node, so B joins nothing more: its "joined 1 launch(es)" below says so).
        one = train(splits, resampled, one_node, {}, None)
        out, _ = node_b.communicate(timeout=120)
    finally:
        node_b.kill()
    assert node_b.returncode == 0, out
    assert "joined 1 launch(es), 0 failed" in out
    assert list(launches_dir().glob("*")) == []
    logs = [two.file("launch-0.log"), two.file(f"launch-0.{socket.gethostname()}.log")]  # node B's, beside the spec
    assert "[trial-000] done" in "".join(p.read_text() for p in logs)  # rank 0 prints, on either node
    (a,), (b,) = two.report["trials"], one.report["trials"]
    assert a["world_size"] == b["world_size"] == 2
    assert a["val_metrics"] == b["val_metrics"]
    histories = [_history(trial_dir(splits, resampled, t, "")) for t in (two_nodes[0], one_node[0])]
    assert histories[0] == histories[1] and len(histories[0]) == 2


@pytest.mark.slow
def test_a_launch_no_node_joins_fails_after_the_timeout(prepared):
    splits, resampled = prepared
    endpoint = f"127.0.0.1:{_free_port()}"
    started = time.monotonic()
    with pytest.raises(MlpipeError, match=rf"not all 2 nodes joined the rendezvous at {endpoint} within 10 s"):
        train(splits, resampled, _trials(nproc=1, nnodes=2, rdzv_endpoint=endpoint, rdzv_timeout_s=10), {}, None)
    assert time.monotonic() - started < 10 + 60  # the timeout plus torchrun's start-up on a busy machine
    assert list(launches_dir().glob("*")) == []
