import json
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


BAD_INPUT = [
    (["run", "--set", "train.lrr=1"], "unknown key 'train.lrr'"),
    (["run", "--set", "train.epochs=zero"], "train.epochs"),
    (["run", "--config", "missing.yaml"], "config file not found"),
    (["predict", "nothing-here.png"], "no such file or folder: nothing-here.png"),
    (["predict", "."], "no image files in ."),
    (["predict", "--batch-size", "0", "."], "--batch-size must be at least 1"),
    (["predict", "--device", "cuda", "."], "--device cuda: no CUDA device"),
]
# Every bad input through `mlpipe`'s own entry point in one Python process (each process start
# costs seconds of imports): the exit status and what it wrote to stderr, per input.
DRIVER = """
import contextlib, io, json, sys
from flows.cli import main
answers = []
for args in json.loads(sys.argv[1]):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            code = main(args)
        except SystemExit as exit:
            code = exit.code
    answers.append([code, err.getvalue()])
print(json.dumps(answers))
"""


@pytest.fixture(scope="module")
def bad_input_answers(tmp_path_factory) -> list:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # the same answers on a machine with a GPU
    done = subprocess.run([sys.executable, "-c", DRIVER, json.dumps([a for a, _ in BAD_INPUT])], capture_output=True,
                          text=True, cwd=tmp_path_factory.mktemp("empty"), env=env)  # fmt: skip
    assert done.returncode == 0 and done.stderr == "", done.stderr  # nothing printed on import either
    return json.loads(done.stdout.splitlines()[-1])


@pytest.mark.parametrize("case", range(len(BAD_INPUT)), ids=[n for _, n in BAD_INPUT])
def test_bad_input_is_one_line_and_exit_2(bad_input_answers, case):
    code, stderr = bad_input_answers[case]
    needle = BAD_INPUT[case][1]
    assert code == 2
    assert stderr.strip().count("\n") == 0 and needle in stderr
    assert "Traceback" not in stderr


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
