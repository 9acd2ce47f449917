"""Issue 19, item 5: `mlpipe run --set source.uri=DIR` on an ImageFolder tree works with no other
setting of layout, channels, size, policy or labels; what the data decided is printed, recorded
as the run's params and config.yaml (reproducible without detecting again), and in ingest's report."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytestmark = pytest.mark.slow

TINTS = {"red": (190, 30, 30), "green": (30, 190, 30), "blue": (30, 30, 190)}


def _rgb_folder(root: Path) -> Path:
    """3 classes x 20 RGB images of 24x20 px: a class tint over noise (every image distinct)."""
    rng = np.random.default_rng(0)
    for name, tint in TINTS.items():
        (root / name).mkdir(parents=True)
        for i in range(20):
            noise = rng.integers(0, 64, (20, 24, 3))
            Image.fromarray((noise + np.array(tint)).clip(0, 255).astype(np.uint8)).save(root / name / f"{i}.png")
    return root


def test_mlpipe_run_on_a_folder_needs_only_its_uri(tmp_path):
    from mlflow.tracking import MlflowClient

    from mlpipe.config import USER_GRID, load_config
    from mlpipe.ingest import resolve_config

    root = _rgb_folder(tmp_path / "photos")
    home = tmp_path / "state"
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "PREFECT_API_URL")}
    env.update(MLPIPE_HOME=str(home), CUDA_VISIBLE_DEVICES="")
    # Only the budget shrinks (2 epochs a trial; the auto grid's two trials stay): nothing about the data.
    done = subprocess.run([sys.executable, "-m", "flows.cli", "run", "--set", f"source.uri={root}", "--set", "train.epochs=2"],
                          capture_output=True, text=True, cwd=tmp_path, env=env, timeout=900)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    decided = next(line for line in done.stderr.splitlines() if "auto settings decided" in line)
    assert ("source.layout imagefolder, ingest.channels 3 (32 of 32 sampled images in colour), ingest.image_size 24 "
            "(median longer side 24 px)") in decided  # fmt: skip
    assert re.search(r"Test metrics: +accuracy=", done.stdout)

    run_id = re.search(r"MLflow run: +(\w+)", done.stdout).group(1)
    client = MlflowClient(f"sqlite:///{home / 'mlflow.db'}")
    params = client.get_run(run_id).data.params
    assert (params["source.layout"], params["ingest.channels"], params["ingest.image_size"]) == ("imagefolder", "3", "24")
    assert json.loads(params["search.grid"]) == USER_GRID and json.loads(params["label.columns"]) == ["class"]
    assert params["anonymize.policy"] == "{}" and params["split.group_column"] == "null"
    recorded = load_config(client.download_artifacts(run_id, "config.yaml", str(tmp_path)))
    assert resolve_config(recorded)[1] == {}  # nothing left to detect: `mlpipe reproduce` reruns these values

    ingest_report = json.loads(next((home / "work" / "ingest").glob("*/report.json")).read_text())
    assert ingest_report["image_shape"] == [24, 24, 3] and ingest_report["kept"] == 60
    assert ingest_report["detected"]["sizes"] == {"24x20": 32} and ingest_report["detected"]["colour_images"] == 32
    label_map = json.loads(next((home / "work" / "label").glob("*/label_map.json")).read_text())
    assert sorted(label_map) == sorted(TINTS)
