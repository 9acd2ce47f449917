import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")

from mlpipe.config import PipelineConfig  # noqa: E402
from mlpipe.sample import write_sample_digits  # noqa: E402
from tests.privacy import plant_canaries  # noqa: E402

# Real servers on 127.0.0.1 (PostgreSQL, S3, MLflow, Prefect + worker), started once for the session
# by whichever test first needs them: the integration tests and the reliability load test share them.
pytest_plugins = ["tests.servers"]


@pytest.fixture(scope="session")
def sample_root(tmp_path_factory) -> Path:
    """The embedded dataset, written once per session; tests copy it before changing it."""
    return write_sample_digits(tmp_path_factory.mktemp("sample") / "digits")


@pytest.fixture(scope="session")
def canary_sample(tmp_path_factory) -> Path:
    """The embedded dataset with personal-data canaries planted (tests.privacy)."""
    return plant_canaries(write_sample_digits(tmp_path_factory.mktemp("canary-sample") / "digits"))


@pytest.fixture
def state(tmp_path, monkeypatch) -> Path:
    """A private state directory (work files, key file, MLflow store) per test."""
    home = tmp_path / "state"
    monkeypatch.setenv("MLPIPE_HOME", str(home))
    monkeypatch.delenv("MLPIPE_PSEUDONYM_KEY", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return home


@pytest.fixture
def dataset_copy(sample_root, tmp_path) -> Path:
    target = tmp_path / "data"
    shutil.copytree(sample_root, target)
    return target


@pytest.fixture
def config(sample_root) -> PipelineConfig:
    return PipelineConfig().with_overrides({"source.uri": str(sample_root)})
