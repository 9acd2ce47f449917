import os

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from mlpipe.config import IngestConfig, SourceConfig
from mlpipe.errors import MlpipeError
from mlpipe.ingest import ingest


def _ingest(root, **kw):
    return ingest(SourceConfig(uri=str(root), **kw), IngestConfig())


def test_every_row_is_accounted_for(state, sample_root):
    result = _ingest(sample_root)
    r = result.report
    assert r["rows_in"] == len(pd.read_csv(sample_root / "manifest.csv"))
    assert r["rows_in"] == r["kept"] + r["quarantined"] + r["duplicates"]
    assert r["duplicates"] == 3
    assert r["quarantine_reasons"] == {
        "not an image": 1, "undecodable (OSError)": 1, "missing file": 1, "path escapes the dataset root": 1,
    }
    pixels = np.load(result.file("pixels.npy"))
    assert pixels.shape == (r["kept"], 16, 16, 1) and pixels.dtype == np.uint8


def test_quarantine_names_rows_never_paths(state, sample_root):
    result = _ingest(sample_root)
    text = result.file("quarantine.csv").read_text() + result.file("duplicates.csv").read_text()
    assert ".png" not in text and "images/" not in text


def test_fingerprint_is_stable_and_content_sensitive(state, dataset_copy):
    first = _ingest(dataset_copy).report["fingerprint"]
    assert _ingest(dataset_copy).report["fingerprint"] == first
    frame = pd.read_csv(dataset_copy / "manifest.csv", dtype=str, keep_default_na=False)
    victim = dataset_copy / frame["image"].iloc[20]
    data = np.asarray(Image.open(victim)).copy()
    data[0, 0] = 255 - data[0, 0]
    Image.fromarray(data).save(victim)
    assert _ingest(dataset_copy).report["fingerprint"] != first


def test_symlink_and_absolute_escapes_are_refused(state, dataset_copy, tmp_path):
    outside = tmp_path / "secret.png"
    outside.write_bytes((dataset_copy / "images" / "corrupt_scan.png").read_bytes())
    os.symlink(outside, dataset_copy / "images" / "link.png")
    frame = pd.read_csv(dataset_copy / "manifest.csv", dtype=str, keep_default_na=False)
    extra = pd.DataFrame([{**frame.iloc[0].to_dict(), "image": "images/link.png"},
                          {**frame.iloc[0].to_dict(), "image": str(outside)}])
    pd.concat([frame, extra]).to_csv(dataset_copy / "manifest.csv", index=False)
    reasons = _ingest(dataset_copy).report["quarantine_reasons"]
    assert reasons["path escapes the dataset root"] == 2
    assert reasons["absolute path"] == 1


def test_missing_image_column_is_a_one_line_error(state, dataset_copy):
    with pytest.raises(MlpipeError, match="missing column 'path'"):
        _ingest(dataset_copy, image_column="path")


def test_empty_dataset_after_quarantine_is_an_error(state, tmp_path):
    root = tmp_path / "broken"
    root.mkdir()
    (root / "a.png").write_bytes(b"junk")
    pd.DataFrame({"image": ["a.png", "../b.png"]}).to_csv(root / "manifest.csv", index=False)
    with pytest.raises(MlpipeError, match="no usable images after quarantine: all 2 rows"):
        _ingest(root)


def test_missing_source_and_manifest(state, tmp_path):
    with pytest.raises(MlpipeError, match="source directory not found"):
        _ingest(tmp_path / "nowhere")
    with pytest.raises(MlpipeError, match="manifest not found"):
        _ingest(tmp_path)
