"""`mlpipe` as a user runs it (its own process and Prefect temporary server), and the one small
`mlpipe run` that two checks read: the CLI's summary of a successful run
(tests/flows/test_training_pipeline.py) and the original that `mlpipe reproduce` reruns
(tests/reliability/test_reproducibility.py). Both ran this same run on their own (the same data,
one trial of two epochs), a CI minute each; it now runs once, for whichever comes first."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SMALL = {"train": {"epochs": 2}, "search": {"grid": {"train.lr": [0.003]}}}  # one trial, two epochs
KEY = "reproducibility-test-key"  # pseudonyms (in split/assignments.csv) need the same key on both runs


def mlpipe_cli(*argv: str | Path, home: Path | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """`mlpipe ...` as a user runs it: its own process and Prefect temporary server. `home`: MLPIPE_HOME.
    Output goes through files, not pipes: a server process left behind would hold a pipe open."""
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI", "MLPIPE_HOME")}
    env.update(MLPIPE_PSEUDONYM_KEY=KEY, **({"MLPIPE_HOME": str(home)} if home else {}))
    # On a loaded machine the temporary server can take longer than Prefect's 20 s to come up.
    env.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    args = [sys.executable, "-m", "flows.cli", *map(str, argv)]
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        code = subprocess.run(
            args, check=False, env=env, cwd=ROOT, stdout=out, stderr=err, text=True, timeout=timeout
        ).returncode
        out.seek(0), err.seek(0)
        return subprocess.CompletedProcess(args, code, out.read(), err.read())


@dataclass
class SmallRun:
    root: Path  # everything below is in here
    data: Path  # a private copy of the sample (test_reproducibility changes a byte of it, and restores it)
    config: Path  # small.yaml: the copy as source.uri, and SMALL
    home: Path  # the run's state directory (MLPIPE_HOME), its MLflow store included
    done: subprocess.CompletedProcess  # `mlpipe run --config small.yaml`: exit code, stdout, stderr


@pytest.fixture(scope="session")
def small_run(tmp_path_factory, sample_root) -> SmallRun:
    root = tmp_path_factory.mktemp("small-run")
    data = root / "data"
    shutil.copytree(sample_root, data)
    config = root / "small.yaml"
    config.write_text(yaml.safe_dump({"source": {"uri": str(data)}, **SMALL}))
    home = root / "A"
    done = mlpipe_cli("run", "--config", config, home=home)
    return SmallRun(root=root, data=data, config=config, home=home, done=done)
