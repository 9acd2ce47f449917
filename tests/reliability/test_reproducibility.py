"""Reproducibility (issue 9): two runs with the same seed and data give byte-identical split files
and identical CPU test metrics, and `mlpipe reproduce` reruns a run from its MLflow record alone.

Two small flow runs serve every test, each a `mlpipe` process with Prefect's temporary server as a
user's: the original (`mlpipe run`, state directory A, MLflow store in A; tests/cli_runs.py's
`small_run`, whose printed summary tests/flows/test_training_pipeline.py checks too) and its
reproduction (`mlpipe reproduce`, a fresh state directory B, A's store), run while everything of A
but its MLflow store is moved away. The refusals stop before any flow runs.
"""

from __future__ import annotations

import hashlib
import math
import shutil
import subprocess
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from mlpipe.reproduce import compare
from mlpipe.store import code_version
from tests.cli_runs import mlpipe_cli as _cli

pytestmark = pytest.mark.slow
STORE_FILES = ("mlflow.db", "mlartifacts")  # what of A stays in place while B reproduces it


@pytest.fixture(scope="module")
def world(small_run):
    """A private copy of the sample (the refusal test changes a byte of it) and a small config."""
    return {"root": small_run.root, "data": small_run.data, "config": small_run.config}


def _run_id(stdout: str) -> str:
    return next(line.split()[-1] for line in stdout.splitlines() if line.startswith("MLflow run:"))


@pytest.fixture(scope="module")
def original(small_run):
    """`mlpipe run --config small.yaml` in state directory A (tests/cli_runs.py)."""
    home, done = small_run.home, small_run.done
    assert done.returncode == 0, done.stderr[-3000:]
    uri = f"sqlite:///{home / 'mlflow.db'}"
    return {"home": home, "uri": uri, "run_id": _run_id(done.stdout), "client": MlflowClient(uri)}


@pytest.fixture(scope="module")
def reproduced(world, original):
    """`mlpipe reproduce` with nothing of A reachable but its MLflow store."""
    home, aside, target = original["home"], world["root"] / "A-aside", world["root"] / "B"
    aside.mkdir()
    moved = [p.name for p in home.iterdir() if p.name not in STORE_FILES]
    for name in moved:
        (home / name).rename(aside / name)
    try:
        done = _cli("reproduce", original["run_id"], "--tracking-uri", original["uri"], "--state-dir", str(target))
    finally:
        for name in moved:
            (aside / name).rename(home / name)
    assert "MLflow run:" in done.stdout, done.stderr[-3000:]  # the flow ran (exit 1: the metrics differ)
    return {"home": target, "done": done, "stdout": done.stdout, "run_id": _run_id(done.stdout)}


def _files(home: Path, stage: str) -> dict[str, str]:
    folder = home / "work" / stage
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}  # fmt: skip


def _test_metrics(client: MlflowClient, run_id: str) -> dict[str, str]:
    """Exact: each value as its float hex (NaN equals NaN; 0.1 never equals 0.1 + 1 ulp)."""
    return {k: float(v).hex() for k, v in client.get_run(run_id).data.metrics.items() if k.startswith("test_")}


def test_same_seed_and_data_give_byte_identical_split_files_and_identical_cpu_metrics(original, reproduced):
    """Two runs, each in its own state directory and computing every stage (the second one's cache
    tags say so): the split stage writes the same bytes, and training gives the same numbers."""
    first, second = _files(original["home"], "split"), _files(reproduced["home"], "split")
    assert {Path(p).name for p in first} >= {"manifest.parquet", "assignments.csv", "train.npz", "val.npz", "test.npz"}
    assert first == second
    client = original["client"]
    tags = client.get_run(reproduced["run_id"]).data.tags
    assert {tags[f"mlpipe.cache.{s}"] for s in ("ingest", "anonymize", "label", "split", "resample")} == {"miss"}
    metrics = _test_metrics(client, original["run_id"])
    assert len(metrics) >= 6 and "test_macro_f1" in metrics
    assert _test_metrics(client, reproduced["run_id"]) == metrics


def test_reproduce_reruns_a_run_from_its_mlflow_record_alone(original, reproduced):
    assert reproduced["done"].returncode == 0, reproduced["stdout"][-2000:]
    client, new = original["client"], reproduced["run_id"]
    assert new != original["run_id"]
    tags = client.get_run(new).data.tags
    assert tags["mlpipe.reproduces"] == original["run_id"]
    assert tags["mlpipe.reproduction"] == "identical"
    verdict = [line for line in reproduced["stdout"].splitlines() if line.startswith("Reproduction:")]
    count = len(_test_metrics(client, new))
    assert verdict == [
        f"Reproduction:      identical: all {count} test metrics equal run {original['run_id']}'s exactly"
    ]
    assert _test_metrics(client, new) == _test_metrics(client, original["run_id"])
    recorded = client.get_run(original["run_id"]).data.tags
    assert tags["mlpipe.data_fingerprint"] == recorded["mlpipe.data_fingerprint"]
    assert tags["mlpipe.code_version"] == recorded["mlpipe.code_version"]
    assert client.get_run(new).data.params == client.get_run(original["run_id"]).data.params
    assert "mlpipe: warning" not in reproduced["done"].stderr  # same libraries


def _one_error(done: subprocess.CompletedProcess) -> str:
    lines = [line for line in done.stderr.splitlines() if line.startswith("mlpipe:")]
    assert done.returncode == 2 and "Reproduction:" not in done.stdout, done.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("mlpipe: error: cannot reproduce run"), done.stderr[-3000:]
    return lines[0]


def _parent_runs(client: MlflowClient) -> int:
    experiments = [e.experiment_id for e in client.search_experiments()]
    return sum("mlflow.parentRunId" not in r.data.tags for r in client.search_runs(experiments))


def test_reproduce_refuses_when_one_byte_of_the_data_changed(world, original, tmp_path):
    manifest = world["data"] / "manifest.csv"
    before, runs = manifest.read_bytes(), _parent_runs(original["client"])
    at = before.index(b"No remarks.") + len(b"No remarks")
    manifest.write_bytes(before[:at] + b"!" + before[at + 1 :])
    try:
        done = _cli("reproduce", original["run_id"], "--tracking-uri", original["uri"], "--state-dir", tmp_path / "C")
    finally:
        manifest.write_bytes(before)
    line = _one_error(done)
    recorded = original["client"].get_run(original["run_id"]).data.tags["mlpipe.data_fingerprint"]
    assert f"data fingerprint differs (recorded {recorded}, now " in line and "code version" not in line
    assert _parent_runs(original["client"]) == runs  # nothing ran
    assert not (tmp_path / "C").exists()  # and nothing is left: the same --state-dir may be named again


def test_reproduce_refuses_another_code_version(original, tmp_path):
    """A copy of the store whose record names other code."""
    shutil.copy(original["home"] / "mlflow.db", tmp_path / "copy.db")  # artifacts stay where the run logged them
    uri = f"sqlite:///{tmp_path / 'copy.db'}"
    MlflowClient(uri).set_tag(original["run_id"], "mlpipe.code_version", "0123456789abcdef")
    done = _cli("reproduce", original["run_id"], "--tracking-uri", uri, "--state-dir", str(tmp_path / "D"))
    assert f"code version differs (recorded 0123456789abcdef, now {code_version()})" in _one_error(done)


def test_reproduce_refuses_a_used_state_dir_and_an_unknown_run(original, tmp_path):
    used = tmp_path / "used"
    (used / "work").mkdir(parents=True)
    done = _cli("reproduce", original["run_id"], "--tracking-uri", original["uri"], "--state-dir", str(used))
    assert done.returncode == 2 and "is not new and empty" in done.stderr
    done = _cli("reproduce", "0" * 32, "--tracking-uri", original["uri"], "--state-dir", str(tmp_path / "E"))
    assert done.returncode == 2 and f"MLflow run {'0' * 32} not found" in done.stderr


def test_verdict_is_exact_and_fails_only_on_cpu():
    same = compare("r", {"test_a": 0.5, "test_b": math.nan}, {"test_a": 0.5, "test_b": math.nan}, ["cpu"])
    assert (same.identical, same.exit_code, same.word) == (True, 0, "identical")
    off = compare("r", {"test_a": 0.5}, {"test_a": math.nextafter(0.5, 1)}, ["cpu"])
    assert (off.identical, off.exit_code) == (False, 1)
    assert "test_a 0.5 recorded, 0.5000000000000001 now" in off.lines[0]
    assert compare("r", {"test_a": 0.5}, {"test_a": 0.6}, ["cuda"]).exit_code == 0  # reported, not failed
    assert compare("r", {"test_a": 0.5}, {}, ["cpu"]).exit_code == 1  # a metric gone is a difference
