"""Issue 16, kind 3: a training section that cannot work on the ingested images is refused at
config validation (one line, naming the transform or the architecture), before any stage runs."""

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from mlpipe.config import PipelineConfig, default_augmentation, load_config
from mlpipe.errors import MlpipeError

ROOT = Path(__file__).resolve().parents[2]


def _policy(*transforms):
    return {"transform": {"__class_fullname__": "Compose", "p": 1.0, "transforms": list(transforms)}}


AFFINE = {"__class_fullname__": "Affine", "p": 0.7, "rotate": [-10, 10], "border_mode": 0}
SUN_FLARE = {"__class_fullname__": "RandomSunFlare", "p": 0.3}  # field case 6
# field case 17
NORMALIZE = {"__class_fullname__": "Normalize", "p": 1.0, "mean": [0.5], "std": [0.5], "max_pixel_value": 255.0}
TO_TENSOR = {"__class_fullname__": "ToTensorV2", "p": 1.0}


# The probes need decided channels and size (auto ones are probed once the data decides them,
# tests/unit/test_autodetect.py): the sample's, unless a test sets its own.
DECIDED = {"channels": 1, "image_size": 16}


def _refusal(**sections) -> str:
    data = {"search": {"grid": {}}, **sections, "ingest": {**DECIDED, **sections.get("ingest", {})}}
    with pytest.raises(MlpipeError) as err:
        sets = [f"{key}={yaml.safe_dump(value, default_flow_style=True).strip()}" for key, value in _flat(data)]
        load_config(None, sets)
    message = str(err.value)
    assert "\n" not in message
    return message


def _flat(data, prefix=""):
    for key, value in data.items():
        if isinstance(value, dict) and key not in ("augment", "grid"):
            yield from _flat(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def _accepted(**sections) -> PipelineConfig:
    return PipelineConfig.model_validate({"search": {"grid": {}}, **sections, "ingest": {**DECIDED, **sections.get("ingest", {})}})


def test_a_three_channel_transform_on_grayscale_is_refused_naming_it_and_the_channels():
    message = _refusal(ingest={"channels": 1}, train={"augment": _policy(AFFINE, SUN_FLARE)})
    assert "RandomSunFlare needs 3 channels; ingest.channels is 1" in message


def test_the_same_transform_is_accepted_on_rgb():
    _accepted(ingest={"channels": 3}, train={"augment": _policy(AFFINE, SUN_FLARE)})


@pytest.mark.parametrize(("transform", "name", "cause"), [(NORMALIZE, "Normalize", "float32"),
                                                           (TO_TENSOR, "ToTensorV2", "torch.Tensor")])  # fmt: skip
def test_a_policy_that_leaves_uint8_is_refused_naming_the_transform(transform, name, cause):
    message = _refusal(train={"augment": _policy(AFFINE, transform)})
    assert f"train.augment: {name} outputs" in message and cause in message


def test_a_transform_inside_a_nested_composition_is_probed_too():
    one_of = {"__class_fullname__": "OneOf", "p": 0.1, "transforms": [AFFINE, NORMALIZE]}
    assert "Normalize outputs float32" in _refusal(train={"augment": _policy(one_of)})


def test_a_shape_change_and_an_unknown_transform_are_refused():
    resize = {"__class_fullname__": "Resize", "p": 1.0, "height": 8, "width": 8}
    assert "Resize changes the image shape" in _refusal(train={"augment": _policy(resize)})
    assert "not a valid albumentations policy" in _refusal(train={"augment": _policy({"__class_fullname__": "Nope"})})


@pytest.mark.parametrize("channels", [1, 3])
def test_the_default_policy_and_no_policy_are_accepted(channels):
    _accepted(ingest={"channels": channels}, train={"augment": default_augmentation()})
    _accepted(ingest={"channels": channels}, train={"augment": None})


def test_an_rgb_policy_is_accepted_on_rgb():
    colour = [{"__class_fullname__": "ColorJitter", "p": 0.5}, {"__class_fullname__": "HueSaturationValue", "p": 0.5},
              {"__class_fullname__": "RGBShift", "p": 0.5}]  # fmt: skip
    _accepted(ingest={"channels": 3, "image_size": 32}, train={"augment": _policy(AFFINE, *colour)})


def test_an_architecture_below_its_smallest_input_is_refused_with_the_size_it_needs():
    message = _refusal(ingest={"image_size": 16}, train={"model": "convnext_tiny"})
    assert "train.model convnext_tiny needs ingest.image_size >= 32 (got 16)" in message
    _accepted(ingest={"image_size": 32}, train={"model": "convnext_tiny"})
    _accepted(ingest={"image_size": 8}, train={"model": "resnet18"})


def test_a_grid_axis_is_probed_per_combination():
    message = _refusal(ingest={"image_size": 16}, search={"grid": {"train.model": ["small_cnn", "convnext_tiny"]}})
    assert message.startswith("config error: search.grid: train.model convnext_tiny needs ingest.image_size >= 32")
    grid = {"train.augment": [default_augmentation(), _policy(SUN_FLARE)]}
    assert "RandomSunFlare needs 3 channels" in _refusal(search={"grid": grid})
    grid = {"train.model": ["small_cnn", "resnet18"], "train.augment": [default_augmentation(), None]}
    config = _accepted(search={"grid": grid})
    assert len(config.trials()) == 4


def test_a_base_value_the_grid_replaces_is_not_probed():
    """Every trial overrides train.model, so the base model never trains: not refused for it."""
    grid = {"train.model": ["small_cnn"]}
    _accepted(ingest={"image_size": 16}, train={"model": "convnext_tiny"}, search={"grid": grid})


def test_mlpipe_run_refuses_the_field_case_before_any_stage(tmp_path):
    """ingest.channels is auto: the grayscale scans decide 1, and that refuses the policy."""
    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    rows = ["image,subject,label"]
    for i in range(6):
        Image.fromarray(np.full((32, 32), 40 * i, np.uint8), "L").save(data / "images" / f"{i}.png")
        rows.append(f"images/{i}.png,s{i},{i % 2}")
    (data / "manifest.csv").write_text("\n".join(rows) + "\n")
    config = tmp_path / "case.yaml"
    config.write_text(yaml.safe_dump({
        "experiment": "fieldcase", "source": {"uri": "data"}, "search": {"grid": {}},
        "anonymize": {"policy": {"subject": "pseudonymize", "label": "keep"}},
        "label": {"columns": ["label"]}, "split": {"group_column": "subject"},
        "train": {"epochs": 2, "augment": _policy(AFFINE, SUN_FLARE)},
    }))  # fmt: skip
    home = tmp_path / "state"
    env = {**os.environ, "MLPIPE_HOME": str(home), "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
           "PYTHONPATH": str(ROOT)}  # fmt: skip
    env.pop("PREFECT_API_URL", None)
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "flows.cli", "run", "--config", str(config)], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    seconds = time.monotonic() - started
    lines = (done.stdout + done.stderr).strip().splitlines()
    assert done.returncode == 2, lines
    assert lines[-1].startswith("mlpipe: error: config error: train.augment: RandomSunFlare needs 3 channels"), lines
    assert seconds < 30
    assert not (home / "work").exists() and not (tmp_path / "mlflow.db").exists()
