import logging
import os
import subprocess
import sys

import pytest

from flows.cli import ExpectedErrorTraceback
from mlpipe.errors import MlpipeError


def _mlpipe(*args, cwd):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # the same answers on a machine with a GPU
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], capture_output=True, text=True, cwd=cwd, env=env)


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["run", "--set", "train.lrr=1"], "unknown key 'train.lrr'"),
        (["run", "--set", "train.epochs=zero"], "train.epochs"),
        (["run", "--config", "missing.yaml"], "config file not found"),
        (["predict", "nothing-here.png"], "no such file or folder: nothing-here.png"),
        (["predict", "."], "no image files in ."),
        (["predict", "--batch-size", "0", "."], "--batch-size must be at least 1"),
        (["predict", "--device", "cuda", "."], "--device cuda: no CUDA device"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, args, needle):
    done = _mlpipe(*args, cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and needle in done.stderr
    assert "Traceback" not in done.stderr


def test_sample_data_writes_the_documented_layout(tmp_path):
    done = _mlpipe("sample-data", str(tmp_path / "out"), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "out" / "manifest.csv").is_file()
    assert len(list((tmp_path / "out" / "images").glob("*.png"))) > 1000
    again = _mlpipe("sample-data", str(tmp_path / "out"), cwd=tmp_path)
    assert again.returncode == 2 and "not empty" in again.stderr


def _record(exc):
    try:
        raise exc
    except BaseException:
        return logging.getLogger("prefect.task_runs").makeRecord(
            "prefect.task_runs", logging.ERROR, __file__, 1, "Task run failed", (), sys.exc_info()
        )


def test_expected_errors_lose_their_traceback_and_others_keep_it():
    f = ExpectedErrorTraceback()
    expected, unexpected = _record(MlpipeError("bad column")), _record(RuntimeError("bug"))
    assert f.filter(expected) and expected.exc_info is None
    assert f.filter(unexpected) and unexpected.exc_info is not None
