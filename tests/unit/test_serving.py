"""The serving model (mlpipe.serving), `mlpipe predict`'s library (mlpipe.predict) and the drift
check (mlpipe.drift): no MLflow server, tiny models and images made here."""

import io
import math
import os

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from mlpipe import serving
from mlpipe.config import IngestConfig, SourceConfig
from mlpipe.drift import drift_report, pixel_statistics, psi, reference_profile
from mlpipe.errors import MlpipeError
from mlpipe.images import decode
from mlpipe.ingest import ingest, snapshot_rows
from mlpipe.predict import Input, list_inputs, predict_inputs, write_predictions
from mlpipe.train.model import build_model

NAMES = ["cat", "dog", "eel"]


def _encode(array: np.ndarray, fmt: str = "PNG", **save) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt, **save)
    return buf.getvalue()


def _checkpoint(path, channels=1, size=16, classes=3):
    torch.manual_seed(0)
    model = build_model("small_cnn", channels, classes, size)
    torch.save({"model_state": model.state_dict(), "model": "small_cnn", "in_channels": channels, "num_classes": classes,
                "image_size": size, "mean": torch.full((channels,), 0.5), "std": torch.full((channels,), 0.25)}, path)  # fmt: skip
    return path


@pytest.fixture
def classifier(tmp_path):
    folder = serving.save(tmp_path / "model", _checkpoint(tmp_path / "ckpt.pt"), NAMES, serving.Preprocessing(16, 1),
                          {"kind": "argmax"}, np.zeros((16, 16, 1), np.uint8), "small_cnn",
                          reference={"class_shares": [1 / 3] * 3})  # fmt: skip
    return serving.load(folder)


def _images(rng):
    """Images as users hold them: other sizes, modes and formats than the training 16 x 16 L."""
    return {
        "rgb-40x30.png": _encode(rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)),
        "rgba.png": _encode(rng.integers(0, 100, (20, 20, 4), dtype=np.uint8)),  # dark ink: "auto" puts it on white
        "gray16.png": _encode(rng.integers(0, 65535, (24, 24), dtype=np.uint16)),
        "photo.jpg": _encode(rng.integers(0, 255, (64, 48, 3), dtype=np.uint8), "JPEG", quality=90),
        "scan.tif": _encode(rng.integers(0, 255, (33, 17), dtype=np.uint8), "TIFF"),
    }


def test_serving_decodes_every_image_to_the_pixels_ingest_trained_on(classifier, state, tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    files = _images(np.random.default_rng(0))
    for name, data in files.items():
        (root / name).write_bytes(data)
    pd.DataFrame({"image": list(files), "note": ["x"] * len(files)}).to_csv(root / "manifest.csv", index=False)
    source = SourceConfig(uri=str(root))
    snapshot = ingest(source, IngestConfig(image_size=16, channels=1, near_duplicate_distance=None))
    items, _ = snapshot_rows(snapshot, source)
    cache = np.load(snapshot.file("pixels.npy"))
    decoded = classifier.decode(pd.DataFrame({"image": list(files.values())}))
    assert decoded.errors == [None] * len(files) and len(items) == len(files)
    for row, index in zip(items["__row"], items["__pixel_index"], strict=True):
        assert np.array_equal(decoded.pixels[row], cache[index]), list(files)[row]


def test_an_array_gives_the_pixels_of_its_png(classifier):
    rng = np.random.default_rng(1)
    arrays = [rng.integers(0, 255, shape, dtype=np.uint8) for shape in ((30, 20), (30, 20, 1), (30, 20, 3), (30, 20, 4))]
    from_arrays = classifier.predict(pd.DataFrame({"array": arrays}))
    from_bytes = classifier.predict(pd.DataFrame({"image": [_encode(a[:, :, 0] if a.ndim == 3 and a.shape[2] == 1
                                                                    else a) for a in arrays]}))  # fmt: skip
    pd.testing.assert_frame_equal(from_arrays, from_bytes)


def test_bad_rows_are_reported_and_the_rest_are_answered(classifier, tmp_path):
    good = _encode(np.full((16, 16), 200, np.uint8))
    frame = pd.DataFrame({"image": [good, b"junk", None, good, b""],
                          "array": [None, None, None, np.zeros((4, 4)), None]})  # fmt: skip
    out = classifier.predict(frame)
    assert list(out.columns) == ["class", "probability", "p_cat", "p_dog", "p_eel", "error"]
    assert list(out["error"]) == [None, "not an image", "no image in the row", "several inputs in one row (image, array)",
                                  "empty file"]  # fmt: skip
    assert out["class"].iloc[0] in NAMES and out["class"].iloc[1:].isna().all()
    assert out[["p_cat", "p_dog", "p_eel"]].iloc[0].sum() == pytest.approx(1.0)
    assert out["probability"].iloc[0] == out[["p_cat", "p_dog", "p_eel"]].iloc[0].max()
    refused = classifier.predict(pd.DataFrame({"array": [np.zeros((4, 4), np.float32)], "path": [None]}))
    assert refused["error"].iloc[0].startswith("not an image array (dtype float32")
    missing = classifier.predict(pd.DataFrame({"path": [str(tmp_path / "nope.png")]}))
    assert missing["error"].iloc[0] == "missing file"
    with pytest.raises(MlpipeError, match="none of the columns image, path, array"):
        classifier.predict(pd.DataFrame({"pixels": [good]}))


def test_a_server_refuses_path_input(classifier, tmp_path, monkeypatch):
    file = tmp_path / "x.png"
    file.write_bytes(_encode(np.zeros((16, 16), np.uint8)))
    assert classifier.predict(pd.DataFrame({"path": [str(file)]}))["error"].iloc[0] is None
    monkeypatch.setenv(serving.SERVING_ENV, "true")  # what MLflow's scoring server sets in its process
    assert "refused by a server" in classifier.predict(pd.DataFrame({"path": [str(file)]}))["error"].iloc[0]


class _Fixed(torch.nn.Module):
    """Probabilities (0.7, 0.3) for every image."""

    def forward(self, x):
        return torch.tensor([[0.7, 0.3]]).expand(len(x), 2)


def test_two_classes_decide_by_the_threshold_chosen_at_evaluation():
    rule = {"kind": "threshold", "positive_class": "lesion", "positive_index": 1, "threshold": 0.25}
    model = serving.ImageClassifier(_Fixed(), ["normal", "lesion"], serving.Preprocessing(8, 1), rule)
    out = model.predict(pd.DataFrame({"array": [np.zeros((8, 8), np.uint8)]}))
    assert out["class"].iloc[0] == "lesion"  # 0.3 >= 0.25, although argmax says normal
    assert out["probability"].iloc[0] == pytest.approx(0.3) and out["threshold"].iloc[0] == 0.25


def test_the_model_folder_records_what_serving_needs_and_refuses_a_foreign_one(classifier, tmp_path, caplog):
    import json

    spec = json.loads((tmp_path / "model" / serving.SPEC_FILE).read_text())
    assert spec["class_names"] == NAMES and spec["preprocessing"] == {"image_size": 16, "channels": 1,
                                                                     "background": "auto", "max_pixels": 40_000_000,
                                                                     "dicom_window": "header", "dicom_frames": "middle"}  # fmt: skip
    assert spec["decision_rule"] == {"kind": "argmax"} and classifier.drift_reference == {"class_shares": [1 / 3] * 3}
    assert not caplog.text  # loaded by the code that saved it: no warning
    assert Image.open(tmp_path / "model" / serving.EXAMPLE_FILE).size == (16, 16)
    with pytest.raises(MlpipeError, match="not an mlpipe model folder"):
        serving.load(tmp_path)
    (tmp_path / "model" / serving.SPEC_FILE).write_text(json.dumps({**spec, "code_version": "0123456789abcdef"}))
    with caplog.at_level("WARNING", logger="mlpipe.serving"):
        serving.load(tmp_path / "model")
    assert "saved by other mlpipe decode/serving code (0123456789abcdef" in caplog.text
    (tmp_path / "model" / serving.SPEC_FILE).write_text(json.dumps({**spec, "format": 99}))
    with pytest.raises(MlpipeError, match="serving format 99"):
        serving.load(tmp_path / "model")


def test_predict_lists_folders_manifests_and_files_like_ingest(tmp_path):
    root = tmp_path / "in"
    (root / "a").mkdir(parents=True)
    for rel in ("a/1.png", "b.jpg", "notes.txt", "a/2.TIF"):
        (root / rel).write_bytes(b"x")
    _, folder = list_inputs([str(root)])
    assert [i.name for i in folder] == ["a/1.png", "a/2.TIF", "b.jpg"]
    pd.DataFrame({"image": ["b.jpg", "../escape.png", "gone.png"], "name": ["Jane", "Joe", "Ann"]}).to_csv(
        root / "list.csv", index=False)
    _, rows = list_inputs([str(root / "list.csv")])
    assert [(i.name, i.row) for i in rows] == [("b.jpg", 0), ("../escape.png", 1), ("gone.png", 2)]
    assert [str(i.full) for i in rows[1:]] == ["path escapes the dataset root", "missing file"]
    _, files = list_inputs([str(root / "b.jpg"), str(root / "a/1.png")])
    assert [i.name for i in files] == [str(root / "b.jpg"), str(root / "a/1.png")]
    with pytest.raises(MlpipeError, match="no such file or folder"):
        list_inputs([str(root / "b.jpg"), str(root / "nothing.png")])


def test_predict_writes_one_row_per_input_with_its_reason(classifier, tmp_path):
    good = tmp_path / "good.png"
    good.write_bytes(_encode(np.full((20, 20), 90, np.uint8)))
    (tmp_path / "bad.png").write_bytes(b"not a png")
    inputs = [Input("good.png", str(good)), Input("bad.png", str(tmp_path / "bad.png")),
              Input("gone.png", str(tmp_path / "gone.png")), Input("good-again.png", str(good))]  # fmt: skip
    counts = write_predictions(predict_inputs(classifier, inputs, None, batch_size=3), tmp_path / "out" / "p.csv")
    table = pd.read_csv(tmp_path / "out" / "p.csv")
    assert list(table["source"]) == ["good.png", "bad.png", "gone.png", "good-again.png"]
    assert list(table["error"].fillna("")) == ["", "not an image", "missing file", ""]
    assert table["class"].iloc[0] == table["class"].iloc[3] and table["p_cat"].iloc[0] == table["p_cat"].iloc[3]
    assert counts["images"] == 4 and sum(counts["predicted"].values()) == 2
    assert counts["failed"] == {"not an image": 1, "missing file": 1}


def test_psi_is_the_textbook_formula_and_zero_for_equal_shares():
    assert psi([0.5, 0.5], [0.5, 0.5]) == 0
    assert psi([0.5, 0.5], [0.9, 0.1]) == pytest.approx(0.4 * math.log(1.8) - 0.4 * math.log(0.2))
    assert psi([1.0, 0.0], [0.0, 1.0]) == pytest.approx(2 * (1 - 1e-4) * math.log(1e4))  # empty bins floored, finite


def test_drift_is_flagged_for_inverted_images_and_not_for_a_fresh_sample():
    rng = np.random.default_rng(0)

    def dark(n):  # dark scans with a bright blob: mean about 40
        images = rng.integers(0, 30, (n, 16, 16, 1), dtype=np.uint8)
        images[:, 4:10, 4:10] = 220
        return images

    train, labels = dark(600), rng.integers(0, 3, 600)
    reference = reference_profile(train, labels, 3)
    assert sum(reference["class_shares"]) == pytest.approx(1) and reference["images"] == 600
    fresh = drift_report(reference, pixel_statistics(dark(300)), rng.integers(0, 3, 300), 0.25)
    assert not fresh["drifted"] and max(fresh["psi"].values()) < 0.1, fresh["psi"]
    inverted = drift_report(reference, pixel_statistics(255 - dark(300)), rng.integers(0, 3, 300), 0.25)
    assert inverted["drifted"] and "pixel_mean" in inverted["drifted_checks"]
    one_class = drift_report(reference, pixel_statistics(dark(300)), np.zeros(300, np.int64), 0.25)
    assert one_class["drifted_checks"] == ["class"]


def test_the_model_pins_its_requirements_to_the_lock(tmp_path):
    from importlib.metadata import version

    from mlpipe import tracking

    lock = tmp_path / "requirements.lock"
    lock.write_text("torch==9.9.9\nnumpy==1.2.3 ; python_version >= '3.11'\n# a comment\n")
    pins = dict(r.split("==") for r in tracking.serving_requirements(lock))
    assert pins["torch"] == "9.9.9" and pins["numpy"] == "1.2.3"  # the lock wins
    assert pins["pandas"] == version("pandas")  # not in this lock: the installed version
    assert set(pins) == set(tracking.SERVING_PACKAGES)
    real = dict(r.split("==") for r in tracking.serving_requirements())
    assert real["torch"] == version("torch") and real["mlflow"] == version("mlflow")  # the lock matches the install


def test_a_pyfunc_that_is_not_mlpipe_serving_is_refused_before_loading(tmp_path, monkeypatch):
    import mlflow.pyfunc

    from mlpipe import tracking

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    (tmp_path / "data").mkdir()
    mlflow.pyfunc.save_model(str(tmp_path / "foreign"), loader_module="some_package.loader",
                             data_path=str(tmp_path / "data"), pip_requirements=["torch"])  # fmt: skip
    with pytest.raises(MlpipeError, match="not an mlpipe serving model"):
        tracking.load_serving_model(str(tmp_path / "foreign"), tmp_path / "work")
    with pytest.raises(MlpipeError, match="cannot load model models:/absent@champion"):
        tracking.load_serving_model("models:/absent@champion", tmp_path / "work")


def test_a_registered_version_is_found_in_the_state_directorys_store(tmp_path, monkeypatch):
    """Without MLFLOW_TRACKING_URI, models:/ URIs resolve in the store `mlpipe run` writes
    ($MLPIPE_HOME/mlflow.db), not in a new, empty ./mlflow.db (MLflow's own default); a missing
    alias says how to name a version instead. MLflow's process-wide tracking URI, left set by an
    earlier call in the process (CI: a test's server, stopped since), decides nothing either."""
    from mlflow.tracking._tracking_service import utils

    from mlpipe import tracking

    monkeypatch.setattr(utils, "_tracking_uri", "http://127.0.0.1:9")  # nothing listens on port 9 (discard)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MLPIPE_HOME", str(tmp_path / "state"))
    monkeypatch.chdir(tmp_path)
    client = tracking._client()
    client.create_registered_model("m")
    run = client.create_run(client.create_experiment("e", artifact_location=str(tmp_path / "artifacts"))).info.run_id
    client.create_model_version("m", f"runs:/{run}/model", run)
    with pytest.raises(MlpipeError, match=r"^models:/m/1 is not an MLflow model"):  # found: a version with no model in it
        tracking.load_serving_model("models:/m/1", tmp_path / "work")
    assert not (tmp_path / "mlflow.db").exists() and "MLFLOW_TRACKING_URI" not in os.environ
    assert utils._tracking_uri == "http://127.0.0.1:9"  # put back as it was
    with pytest.raises(MlpipeError, match=r"no version of m holds @champion .*mlpipe promote --model m --version VERSION$"):
        tracking.load_serving_model("models:/m@champion", tmp_path / "work")
    with pytest.raises(MlpipeError, match=r"no version of m holds @challenger .*--model models:/m/VERSION$"):
        tracking.load_serving_model("models:/m@challenger", tmp_path / "work")  # promote moves @champion only


def test_predict_reads_image_files_named_by_url_on_their_own_filesystem(classifier):
    import fsspec

    memory = fsspec.filesystem("memory")
    memory.pipe("/scans/a.png", _encode(np.full((20, 20), 30, np.uint8)))
    memory.pipe("/scans/b.png", b"broken")
    src, inputs = list_inputs(["memory://scans/a.png", "memory://scans/b.png"])
    table = pd.concat(predict_inputs(classifier, inputs, src))
    assert list(table["source"]) == ["memory://scans/a.png", "memory://scans/b.png"]
    assert table["error"].iloc[0] is None and table["error"].iloc[1] == "not an image"
    _, folder = list_inputs(["memory://scans"])
    assert [i.name for i in folder] == ["a.png", "b.png"]


def test_scored_rows_keep_their_answer_and_lose_rare_quasi_identifiers():
    from mlpipe.config import AnonymizeConfig
    from mlpipe.scoring import check_same_key, metric_name, suppress_rare_combinations

    policy = AnonymizeConfig(policy={"zip": {"action": "truncate", "keep_chars": 3, "quasi_identifier": True},
                                     "note": "keep"}, k=2)  # fmt: skip
    applied = pd.DataFrame({"zip": ["101", "101", "202"], "note": ["a", "b", "c"]})
    out = suppress_rare_combinations(applied, policy)
    assert list(out["zip"]) == ["101", "101", ""] and list(out["note"]) == ["a", "b", "c"]  # every row stays
    check_same_key(b"k1", None)  # no record of the training key: nothing to compare
    from mlpipe.anonymize import key_id

    check_same_key(b"k1", key_id(b"k1"))
    with pytest.raises(MlpipeError, match="not the one the model's training run used"):
        check_same_key(b"k2", key_id(b"k1"))
    assert metric_name("T-shirt/top (2)") == "T-shirt/top _2_"


def test_the_model_carries_every_module_serving_runs(classifier, tmp_path):
    """A fresh interpreter that loads a model folder and answers one image imports no mlpipe module
    outside `serving.code_files()`: the copy inside a registered model is enough to serve it."""
    import json
    import subprocess
    import sys

    code = (f"import json, sys, numpy as np, pandas as pd; from mlpipe import serving; "
            f"m = serving.load({str(tmp_path / 'model')!r}); m.predict(pd.DataFrame({{'array': [np.zeros((9, 9), np.uint8)]}})); "
            "print(json.dumps(sorted(n for n in sys.modules if n.split('.')[0] == 'mlpipe')))")  # fmt: skip
    loaded = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    carried = {".".join(p.with_suffix("").parts).removesuffix(".__init__") for p in serving.code_files()}
    assert "mlpipe.serving" in loaded and set(loaded) <= carried, set(loaded) - carried


def test_a_dicom_file_is_scored_with_the_training_window_and_frame(classifier, tmp_path):
    """New images may be DICOM, as bytes or a path: decoded through ingest's DICOM path with the
    training run's ingest.dicom.window and frames (recorded in the model)."""
    from tests.dicom_data import deid_data_file, pydicom_file

    ct = pydicom_file("CT_small.dcm")
    loop = deid_data_file("ultrasounds/ultrasound-multiframe.dcm")  # 30 frames, RGB
    out = classifier.predict(pd.DataFrame({"path": [str(ct), str(loop), str(tmp_path / "none.dcm")]}))
    assert out["error"].iloc[0] is None and out["error"].iloc[1] is None and out["error"].iloc[2] is not None
    decoded = classifier.decode(pd.DataFrame({"image": [ct.read_bytes()]}))
    expected = decode(ct.read_bytes(), 16, 1, 40_000_000, thumbnail=False, frame="middle", window="header")
    assert np.array_equal(decoded.pixels[0], expected.pixels)
    import dataclasses

    trained = classifier.preprocessing
    classifier.preprocessing = dataclasses.replace(trained, dicom_window=[40, 400])  # soft tissue: other pixels
    try:
        windowed = classifier.decode(pd.DataFrame({"image": [ct.read_bytes()]}))
    finally:
        classifier.preprocessing = trained
    assert not np.array_equal(windowed.pixels[0], decoded.pixels[0])
