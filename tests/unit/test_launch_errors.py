"""A failed trial says why: the worker's own exception, the trial and the rank, in one line that
points at the launch log, which is kept in `<state>/failed/` when the stage fails (issue 16, kind 2)."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from mlpipe.config import TrainConfig
from mlpipe.errors import MlpipeError
from mlpipe.store import final_path, kept_logs, stage_dir
from mlpipe.train import worker
from mlpipe.train.launch import launch, run_torchrun
from mlpipe.train.spec import TrialSpec, WorkerSpec
from tests.unit.test_train import worker_data

FOOTER = [  # what torchrun prints after a worker failed without `record`: the old message's "error" line
    "torch.distributed.elastic.multiprocessing.errors.ChildFailedError: ",
    "============================================================",
    "mlpipe.train.worker FAILED",
    "Root Cause (first observed failure):",
    "  rank      : 0 (local_rank: 0)",
    "  exitcode  : 1 (pid: 4242)",
    "  error_file: <N/A>",
    "  traceback : To enable traceback see: https://pytorch.org/docs/stable/elastic/errors.html",
    "============================================================",
]


def _fake_torchrun(tmp_path: Path, lines: list[str], code: int = 1) -> list[str]:
    """A stand-in for torchrun's command line: prints `lines`, exits with `code`."""
    script = tmp_path / "fake_torchrun.py"
    script.write_text(f"import sys\nprint('\\n'.join({lines!r}))\nsys.exit({code})\n")
    return [sys.executable, str(script)]


def test_the_workers_exception_is_the_message_not_torchruns_footer(tmp_path):
    lines = ["trial-000 epoch   0/3 ...", "mlpipe-worker-error: trial-001 rank 1: ValueError: bad input x",
             "Traceback (most recent call last):", *[f'  File "w.py", line {i}' for i in range(60)],
             "ValueError: bad input x", "mlpipe-worker-error: trial-001 rank 0: RuntimeError: a consequence",
             *FOOTER]  # fmt: skip
    with pytest.raises(MlpipeError) as err:
        run_torchrun(_fake_torchrun(tmp_path, lines), tmp_path / "launch-0.log", dict(os.environ))
    assert str(err.value) == (f"training failed: ValueError: bad input x (trial-001, rank 1; "
                              f"full log: {tmp_path / 'launch-0.log'})")  # fmt: skip


def test_without_a_worker_exception_the_exit_code_and_torchruns_root_cause(tmp_path):
    killed = [line.replace("To enable traceback see: https://pytorch.org/docs/stable/elastic/errors.html",
                           "Signal 9 (SIGKILL) received by PID 4242") for line in FOOTER]  # fmt: skip
    with pytest.raises(MlpipeError, match=r"^training failed \(torchrun exit code 1\): Signal 9 \(SIGKILL\) "):
        run_torchrun(_fake_torchrun(tmp_path, killed), tmp_path / "launch-0.log", dict(os.environ))
    with pytest.raises(MlpipeError) as err:
        lines = ["RendezvousTimeoutError: no peers", *FOOTER]
        run_torchrun(_fake_torchrun(tmp_path, lines), tmp_path / "l.log", dict(os.environ))
    assert "exit code 1): RendezvousTimeoutError: no peers (full log:" in str(err.value)
    assert "To enable traceback" not in str(err.value)


def test_the_worker_error_line_is_one_bounded_line(monkeypatch):
    monkeypatch.setenv("RANK", "3")
    line = worker.error_line(ValueError("\nfirst line\nsecond line"), "trial-002")
    assert line == "mlpipe-worker-error: trial-002 rank 3: ValueError: first line"
    long = worker.error_line(RuntimeError("x" * 5000), None)
    assert long.startswith("mlpipe-worker-error: - rank 3: RuntimeError: xxx") and len(long) < 400
    assert worker.error_line(KeyError(), "t") == "mlpipe-worker-error: t rank 3: KeyError"


def test_a_failed_stage_keeps_its_logs_and_the_message_points_at_them(state):
    with pytest.raises(MlpipeError) as err, stage_dir("train", "0123abcd") as out:
        (out / "launch-0.log").write_text("the worker's output\n")
        (out / "launch-0.json").write_text("{}")
        raise MlpipeError(f"training failed: RuntimeError: boom (trial-000, rank 0; full log: {out / 'launch-0.log'})")
    kept = kept_logs(err.value)
    assert kept is not None and kept.parent == state / "failed" and kept.name.startswith("train-0123abcd-")
    assert sorted(p.name for p in kept.iterdir()) == ["launch-0.log"]
    assert str(err.value).endswith(f"full log: {kept / 'launch-0.log'})")
    assert (kept / "launch-0.log").read_text() == "the worker's output\n"
    assert list(final_path("train", "0123abcd").parent.iterdir()) == []  # work/ holds nothing of it


def test_a_failed_stage_without_logs_keeps_nothing(state):
    with pytest.raises(RuntimeError) as err, stage_dir("split", "k"):
        raise RuntimeError("stage failed")
    assert kept_logs(err.value) is None and not (state / "failed").exists()


SITECUSTOMIZE = textwrap.dedent('''
    """Fault injection: every torchrun worker's model fails to build (the launcher is left alone)."""
    import os

    if "LOCAL_RANK" in os.environ:
        import mlpipe.train.model

        def build_model(*args, **kwargs):
            raise RuntimeError("boom")

        mlpipe.train.model.build_model = build_model
''')


@pytest.fixture
def boom(tmp_path, monkeypatch) -> Path:
    """PYTHONPATH with a sitecustomize.py that makes each torchrun worker raise RuntimeError("boom")."""
    folder = tmp_path / "inject"
    folder.mkdir()
    (folder / "sitecustomize.py").write_text(SITECUSTOMIZE)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(folder), *filter(None, [os.environ.get("PYTHONPATH")])]))
    return folder


@pytest.mark.slow
def test_a_worker_that_raises_is_named_with_its_trial_and_rank_and_its_log_is_kept(state, boom, tmp_path):
    pixels, train_set, val_set = worker_data(tmp_path, 60)
    cfg = TrainConfig(epochs=1, batch_size=16, device="cpu", augment=None)
    spec = WorkerSpec(pixels=pixels, val_set=val_set, num_classes=3,
                      trials=[TrialSpec(name="trial-000", train=cfg, train_set=train_set,
                                        out_dir=str(tmp_path / "t0"))])  # fmt: skip
    with pytest.raises(MlpipeError) as err, stage_dir("train", "feedc0de") as out:
        (out / "launch-0.json").write_text(spec.model_dump_json())
        launch(out / "launch-0.json", nproc=1, max_restarts=0, log_path=out / "launch-0.log", cpu=True)
    message = str(err.value)
    assert message.startswith("training failed: RuntimeError: boom (trial-000, rank 0; full log: ")
    log = Path(message.split("full log: ")[1].rstrip(")"))
    assert log.parent.parent == state / "failed" and log.is_file()
    assert "RuntimeError: boom" in log.read_text()
    assert "\n" not in message


@pytest.mark.slow
def test_mlpipe_run_ends_with_the_workers_exception(tmp_path, boom):
    """The whole CLI: the user's last line names the exception, the trial and the rank, and the
    launch log, kept under the state directory and in the MLflow parent run."""
    from mlflow.tracking import MlflowClient

    home = tmp_path / "state"
    home.mkdir()
    uri = f"sqlite:///{home / 'mlflow.db'}"
    env = {**os.environ, "MLPIPE_HOME": str(home), "MLFLOW_TRACKING_URI": uri}
    env.pop("PREFECT_API_URL", None)
    settings = ["--set", "train.epochs=1", "--set", "train.nproc=1", "--set", "search.grid={train.lr: [0.003]}"]
    done = subprocess.run([sys.executable, "-m", "flows.cli", "run", *settings], env=env, cwd=home, text=True,
                          capture_output=True, timeout=600)  # fmt: skip
    assert done.returncode != 0, done.stdout + done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("mlpipe: error: training failed: RuntimeError: boom (trial-000, rank 0; full log: "), last
    log = Path(last.split("full log: ")[1].rstrip(")"))
    assert log.parent.parent == home / "failed" and "RuntimeError: boom" in log.read_text()
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("mlpipe").experiment_id])
    parent = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)
    kept = client.list_artifacts(parent.info.run_id, f"failed/{log.parent.name}")
    assert [Path(a.path).name for a in kept] == [log.name]
