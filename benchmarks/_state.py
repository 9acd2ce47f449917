"""A fresh state directory for a benchmark that runs the flow in its own process."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def fresh_state(name: str) -> Path:
    """Empty MLPIPE_HOME (local MLflow store, Prefect results inside it), quiet imports, the
    project importable."""
    home = Path(tempfile.mkdtemp(prefix=f"mlpipe-bench-{name}-"))
    os.environ.update({"MLPIPE_HOME": str(home), "PREFECT_LOCAL_STORAGE_PATH": str(home / "prefect-results"),
                       "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "NO_ALBUMENTATIONS_UPDATE": "1"})  # fmt: skip
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    sys.path.insert(0, str(ROOT))
    return home
