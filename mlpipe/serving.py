"""The registered model: images in, class names and probabilities out.

MLflow loads it as a pyfunc through this module (`loader_module: mlpipe.serving`, MLflow's
custom-flavour contract: `_load_pyfunc(data_path)` returns an object with `predict`). The model's
data folder holds only data: `checkpoint.pt` (tensors, read with `weights_only=True`),
`serving.json` (class map, preprocessing, decision rule) and `model.onnx` (an extra export).
No pickle and no code travels with it, so loading a registered model runs this installed code.

Every input goes through `mlpipe.images.decode` / `decode_array`, the functions ingest runs,
then the network and the decision rule evaluate used (`predict_proba`, `predict_labels`): the
served model and the evaluated one cannot differ in preprocessing.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from mlpipe import baseline as classical
from mlpipe.errors import MlpipeError
from mlpipe.dicom import has_dicom_suffix
from mlpipe.images import Quarantined, decode, decode_array
from mlpipe.metrics import apply_threshold
from mlpipe.store import code_version
from mlpipe.train.model import load_checkpoint

SPEC_FILE, WEIGHTS_FILE, ONNX_FILE, EXAMPLE_FILE = "serving.json", "checkpoint.pt", "model.onnx", "input_example.png"
FORMAT = 1
# The input columns, one per kind of image; a row fills exactly one of them.
IMAGE, PATH, ARRAY = "image", "path", "array"
INPUT_COLUMNS = (IMAGE, PATH, ARRAY)
REFUSED = "refused"  # a row that fills no input column, or several
# What `predict` returns, before one `p_<class>` column per class.
CLASS, PROBABILITY, THRESHOLD, ERROR = "class", "probability", "threshold", "error"
# Set by MLflow's scoring server in its process (`mlflow models serve`): there a `path` is a file on
# the server's disk named by a remote caller, so path input is refused and bytes are expected.
SERVING_ENV = "_MLFLOW_IS_IN_SERVING_ENVIRONMENT"
# The modules this one imports, all of them (a test checks): the code the model carries and runs
# under `mlflow models serve`, whose hash is recorded in the model and compared when loading.
SERVING_CODE = ("mlpipe.serving", "mlpipe.images", "mlpipe.dicom", "mlpipe.metrics", "mlpipe.baseline", "mlpipe.errors", "mlpipe.store",
                "mlpipe.train.model")  # fmt: skip
log = logging.getLogger(__name__)
DEFAULT_BATCH_SIZE = 256


@torch.no_grad()
def predict_proba(model: torch.nn.Module, images: np.ndarray, batch_size: int = 512,
                  device: str | torch.device = "cpu") -> np.ndarray:  # fmt: skip
    """Class probabilities (N x classes, float64) of uint8 N x H x W x C images: eval mode, no
    augmentation, float32 on `device`. The one forward pass evaluate and serving share."""
    out = [
        model(torch.from_numpy(images[i : i + batch_size]).to(device).permute(0, 3, 1, 2).float()).double().cpu().numpy()
        for i in range(0, len(images), batch_size)
    ]
    return np.concatenate(out)


def predict_labels(proba: np.ndarray, rule: dict) -> np.ndarray:
    """Hard labels from probabilities under a decision rule (`mlpipe.evaluate.decision_rule`):
    argmax, or two classes' positive probability against the threshold chosen at evaluation."""
    if rule["kind"] == "threshold":
        return apply_threshold(proba, rule["positive_index"], rule["threshold"])
    return proba.argmax(axis=1)


def load_model(path) -> torch.nn.Module:
    """The model a registered version's checkpoint describes: a deep model (`load_checkpoint`) or
    a baseline (`{"kind": "baseline", ...}`, `mlpipe.baseline.from_checkpoint`). Both are read
    with `weights_only=True`: a checkpoint is data, never code. (A deep checkpoint is read twice.)"""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(ckpt, dict) and ckpt.get("kind") == "baseline":
        return classical.from_checkpoint(ckpt)
    return load_checkpoint(path)


@dataclass(frozen=True)
class Preprocessing:
    """What ingest did to every training image, recorded in the model (`ingest.*` of the run)."""

    image_size: int
    channels: int
    background: str = "auto"
    max_pixels: int = 40_000_000
    dicom_window: str | list[float] = "header"  # ingest.dicom.window: how a DICOM input's grey levels become 8 bits
    dicom_frames: str = "middle"  # ingest.dicom.frames: the frame a multi-frame DICOM input is scored on ("all": middle)

    @classmethod
    def of(cls, ingest_config: Any) -> Preprocessing:
        window = ingest_config.dicom.window
        return cls(ingest_config.image_size, ingest_config.channels, ingest_config.background, ingest_config.max_pixels,
                   window if isinstance(window, str) else list(window), ingest_config.dicom.frames)  # fmt: skip


@dataclass
class DecodedBatch:
    """A batch of inputs after decoding: pixels of the rows that decoded (N_ok x H x W x C uint8),
    their row positions, each row's content hash (None when it failed) and each row's error."""

    pixels: np.ndarray
    rows: np.ndarray
    sha256: list[str | None] = field(default_factory=list)
    errors: list[str | None] = field(default_factory=list)


class ImageClassifier:
    """The serving model. `predict(DataFrame)` takes one image per row in one of the columns
    `image` (encoded bytes: PNG, JPEG, TIFF, ...; base64 over HTTP), `path` (a local file) or
    `array` (uint8 H x W or H x W x 1/3/4, any size), and returns one row per input row:
    `class` (name), `probability` (of that class), `p_<class>` per class, `threshold` (two
    classes: the decision rule's), and `error` (why a row has no prediction; None when it has).
    A bad row never fails the batch."""

    def __init__(self, model: torch.nn.Module, class_names: list[str], preprocessing: Preprocessing, rule: dict,
                 device: str = "cpu", batch_size: int = DEFAULT_BATCH_SIZE):  # fmt: skip
        self.model = model.eval().to(device)
        self.class_names = list(class_names)
        self.preprocessing = preprocessing
        self.rule = rule
        self.device = device
        self.batch_size = batch_size
        self.drift_reference: dict | None = None  # the training split's profile (`mlpipe.drift`), set by `load`

    @property
    def columns(self) -> list[str]:
        """The output columns, in order."""
        binary = [THRESHOLD] if self.rule["kind"] == "threshold" else []
        return [CLASS, PROBABILITY, *probability_columns(self.class_names), *binary, ERROR]

    def decode(self, frame: pd.DataFrame) -> DecodedBatch:
        """Decode each row's image the way ingest does (`mlpipe.images.decode`). One thread: a
        pool of threads measured slower (benchmarks/predict.py: 0.665 against 0.795 of the bare
        loop on 64 px PNGs), as small images spend their time in Python, under the GIL."""
        p = self.preprocessing
        size, channels = p.image_size, p.channels
        results = [self._decode_one(item) for item in _inputs(frame)]
        ok = [k for k, r in enumerate(results) if not isinstance(r, Quarantined)]
        pixels = np.stack([results[k].pixels for k in ok]) if ok else np.zeros((0, size, size, channels), np.uint8)
        return DecodedBatch(pixels, np.asarray(ok, dtype=np.int64),
                       [None if isinstance(r, Quarantined) else r.sha256 for r in results],
                       [str(r) if isinstance(r, Quarantined) else None for r in results])  # fmt: skip

    def _decode_one(self, item: tuple[str, Any]):
        kind, value = item
        p = self.preprocessing
        if kind == REFUSED:
            return Quarantined(value)
        try:
            if kind == ARRAY:
                return decode_array(value, p.image_size, p.channels, p.max_pixels, p.background, thumbnail=False)
            data = _read_path(value) if kind == PATH else _as_bytes(value)
            if data[128:132] == b"DICM" or (kind == PATH and has_dicom_suffix(str(value))):
                window = p.dicom_window if isinstance(p.dicom_window, str) else tuple(p.dicom_window)
                return decode(data, p.image_size, p.channels, p.max_pixels, p.background, thumbnail=False,
                              frame=p.dicom_frames, window=window)  # fmt: skip
            return decode(data, p.image_size, p.channels, p.max_pixels, p.background, thumbnail=False)
        except Quarantined as why:
            return why

    def score(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(probabilities N x classes, label indices N) of decoded uint8 N x H x W x C pixels."""
        if len(pixels) == 0:
            return np.zeros((0, len(self.class_names))), np.zeros(0, np.int64)
        proba = predict_proba(self.model, pixels, self.batch_size, self.device)
        return proba, predict_labels(proba, self.rule).astype(np.int64)

    def table(self, decoded: DecodedBatch, proba: np.ndarray, labels: np.ndarray) -> pd.DataFrame:
        """The output frame, one row per input row (failed rows: no class, NaN probabilities)."""
        n, rows = len(decoded.errors), decoded.rows
        every = np.full((n, len(self.class_names)), np.nan)
        every[rows] = proba
        names = np.full(n, None, dtype=object)
        names[rows] = np.asarray(self.class_names, dtype=object)[labels]
        chosen = np.full(n, np.nan)
        chosen[rows] = proba[np.arange(len(labels)), labels]
        columns = {CLASS: pd.Series(names, dtype=object), PROBABILITY: chosen,
                   **{c: every[:, k] for k, c in enumerate(probability_columns(self.class_names))}}  # fmt: skip
        if self.rule["kind"] == "threshold":
            columns[THRESHOLD] = np.full(n, float(self.rule["threshold"]))
        columns[ERROR] = pd.Series(decoded.errors, dtype=object)  # object, not pandas' str: None stays None
        return pd.DataFrame(columns)

    def predict(self, model_input: Any, params: dict | None = None) -> pd.DataFrame:
        """MLflow's pyfunc entry point; see the class docstring. `params` is unused."""
        decoded = self.decode(_as_frame(model_input))
        return self.table(decoded, *self.score(decoded.pixels))


def code_files() -> list[Path]:
    """The source files the model carries (`SERVING_CODE` and their packages' `__init__.py`),
    as paths relative to the folder holding the `mlpipe` package."""
    package = Path(__file__).resolve().parent
    files = {package / "__init__.py"}
    for module in SERVING_CODE:
        path = package.joinpath(*module.split(".")[1:]).with_suffix(".py")
        files |= {path, *(p / "__init__.py" for p in path.parents if package in p.parents)}
    return sorted(p.relative_to(package.parent) for p in files)


def probability_columns(class_names: Iterable[str]) -> list[str]:
    return [f"p_{name}" for name in class_names]


def _as_frame(model_input: Any) -> pd.DataFrame:
    if isinstance(model_input, pd.DataFrame):
        return model_input
    if isinstance(model_input, dict):
        return pd.DataFrame(model_input)
    raise MlpipeError(f"the model takes a DataFrame with one of the columns {', '.join(INPUT_COLUMNS)}; "
                      f"got {type(model_input).__name__}")  # fmt: skip


def _inputs(frame: pd.DataFrame) -> Iterable[tuple[str, Any]]:
    """(column, value) of each row: the one input column it fills; a row with none or several
    yields (REFUSED, reason), so that it is reported, not guessed at."""
    present = [c for c in INPUT_COLUMNS if c in frame.columns]
    if not present:
        raise MlpipeError(f"the input has none of the columns {', '.join(INPUT_COLUMNS)} "
                          f"(got {', '.join(map(str, frame.columns)) or 'no columns'})")  # fmt: skip
    for values in zip(*(frame[c] for c in present), strict=True):
        filled = [(c, v) for c, v in zip(present, values, strict=True) if not _missing(v)]
        if len(filled) == 1:
            yield filled[0]
        else:
            yield REFUSED, ("no image in the row" if not filled else
                            f"several inputs in one row ({', '.join(c for c, _ in filled)})")  # fmt: skip


def _missing(value: Any) -> bool:
    if value is None:
        return True
    return isinstance(value, float) and np.isnan(value)


def _as_bytes(value: Any) -> bytes:
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    raise Quarantined(f"image is not bytes ({type(value).__name__}); over HTTP send base64 in the 'image' column")


def _read_path(value: Any) -> bytes:
    if os.environ.get(SERVING_ENV, "").lower() == "true":
        raise Quarantined("path input is refused by a server (it would read the server's own files); send the "
                          "image bytes, base64-encoded, in the 'image' column")  # fmt: skip
    if not isinstance(value, str | os.PathLike):
        raise Quarantined(f"path is not a string ({type(value).__name__})")
    try:
        with open(value, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise Quarantined("missing file") from None  # ingest's word for it
    except OSError:
        raise Quarantined("unreadable file") from None


def save(folder: Path, checkpoint: Path, class_names: list[str], preprocessing: Preprocessing, rule: dict,
         example: np.ndarray, model_kind: str, onnx: Path | None = None, reference: dict | None = None) -> Path:  # fmt: skip
    """Write the model's data folder: weights, `serving.json` (with `reference`, the training
    split's drift profile, `mlpipe.drift.reference_profile`), a PNG input example (an anonymized
    test image: re-encoded from pixels, no metadata) and the ONNX export if any."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(checkpoint, folder / WEIGHTS_FILE)
    if onnx is not None and Path(onnx).exists():
        shutil.copyfile(onnx, folder / ONNX_FILE)
    Image.fromarray(example[:, :, 0] if example.shape[2] == 1 else example).save(folder / EXAMPLE_FILE)
    spec = {"format": FORMAT, "class_names": class_names, "preprocessing": preprocessing.__dict__,
            "decision_rule": {k: v for k, v in rule.items() if k in _RULE_KEYS}, "model": model_kind,
            "input_columns": list(INPUT_COLUMNS), "resize": "Pillow bilinear, reducing_gap 3 (mlpipe.images)",
            "code_version": code_version(*SERVING_CODE), "drift_reference": reference}  # fmt: skip
    (folder / SPEC_FILE).write_text(json.dumps(spec, indent=2), encoding="utf-8")
    return folder


_RULE_KEYS = ("kind", "positive_class", "positive_index", "negative_class", "threshold", "threshold_source")


def load(folder: str | Path, device: str = "cpu", batch_size: int = DEFAULT_BATCH_SIZE) -> ImageClassifier:
    """The `ImageClassifier` a data folder written by `save` describes. Raises MlpipeError when
    the folder is not one (a missing or newer `serving.json`)."""
    folder = Path(folder)
    try:
        spec = json.loads((folder / SPEC_FILE).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise MlpipeError(f"{folder} is not an mlpipe model folder (no {SPEC_FILE})") from None
    if spec.get("format") != FORMAT:
        raise MlpipeError(f"{folder}: serving format {spec.get('format')} is not the {FORMAT} this mlpipe reads")
    if spec.get("code_version") != code_version(*SERVING_CODE):
        log.warning("this model was saved by other mlpipe decode/serving code (%s, here %s): its answers here may "
                    "differ from those of `mlflow models serve`, which runs the code inside the model",
                    spec.get("code_version"), code_version(*SERVING_CODE))  # fmt: skip
    module = load_model(folder / WEIGHTS_FILE)
    model = ImageClassifier(module, spec["class_names"], Preprocessing(**spec["preprocessing"]), spec["decision_rule"],
                            device, batch_size)  # fmt: skip
    model.drift_reference = spec.get("drift_reference")
    return model


def example_image(folder: str | Path) -> bytes:
    """The input example's encoded PNG bytes."""
    return (Path(folder) / EXAMPLE_FILE).read_bytes()


def _load_pyfunc(data_path: str) -> ImageClassifier:
    """MLflow's `loader_module` hook: the model in `data_path` (the pyfunc flavour's `data`)."""
    return load(data_path)
