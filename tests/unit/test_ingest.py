import csv
import io
import json
import os

import fsspec
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from mlpipe.config import IngestConfig, SourceConfig
from mlpipe.errors import MlpipeError
from mlpipe.ingest import Source, ingest, near_duplicate_groups, open_source, read_manifest
from mlpipe.split import combined_groups

CFG = IngestConfig(image_size=16, max_drop_fraction=1.0)  # broken rows are the point here; the drop limit has its own tests


def _png(pixels, mode=None, **save) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels, mode=mode).save(buf, format=save.pop("format", "PNG"), **save)
    return buf.getvalue()


def _digit(seed=0, size=8):
    return np.random.default_rng(seed).integers(0, 255, (size, size), dtype=np.uint8)


def _dataset(root, files: dict[str, bytes], manifest_paths: list[str] | None = None):
    root.mkdir(parents=True, exist_ok=True)
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    paths = manifest_paths if manifest_paths is not None else list(files)
    pd.DataFrame({"image": paths, "note": ["x"] * len(paths)}).to_csv(root / "manifest.csv", index=False)
    return root


def _run(root, **source):
    return ingest(SourceConfig(uri=str(root), **source), CFG)


def _accounted(report):
    assert report["rows_in"] == report["kept"] + report["quarantined"] + report["duplicates"]


def test_sample_every_row_is_accounted_for(state, sample_root):
    r = _run(sample_root).report
    _accounted(r)
    assert r["rows_in"] == len(pd.read_csv(sample_root / "manifest.csv"))
    assert r["duplicates"] == 3
    assert r["quarantine_reasons"] == {
        "empty file": 1, "truncated or corrupt (OSError)": 1, "missing file": 1, "path escapes the dataset root": 1,
    }


BAD = {
    "corrupt": ("corrupt", "truncated or corrupt"),
    "truncated": (None, "truncated or corrupt"),
    "empty": (b"", "empty file"),
    "not an image": (b"name,email\nAnn,ann@x.org\n", "not an image"),
}


@pytest.mark.parametrize("kind", list(BAD))
def test_each_broken_file_kind_is_quarantined_with_its_reason(state, tmp_path, kind):
    data, reason = BAD[kind]
    whole = _png(_digit(size=64))
    if data is None:
        data = whole[: len(whole) // 2]
    elif data == "corrupt":  # flipped bytes inside the image data: the checksum fails
        data = whole[:60] + bytes(x ^ 0xFF for x in whole[60:120]) + whole[120:]
    root = _dataset(tmp_path / "d", {"good.png": _png(_digit()), "bad.png": data})
    result = _run(root)
    r = result.report
    _accounted(r)
    assert r["kept"] == 1 and r["quarantined"] == 1
    assert list(r["quarantine_reasons"])[0].startswith(reason)
    table = pd.read_csv(result.file("quarantine.csv"))
    assert table["row"].tolist() == [1] and table["reason"].iloc[0].startswith(reason)
    assert "bad.png" not in result.file("quarantine.csv").read_text()  # paths only as a hash


def test_missing_absolute_escaping_and_oversized_rows(state, tmp_path):
    outside = tmp_path / "outside.png"
    outside.write_bytes(_png(_digit(5)))
    root = _dataset(tmp_path / "d", {"ok.png": _png(_digit()), "big.png": _png(_digit(size=300))},
                    ["ok.png", "gone.png", str(outside), "../outside.png", "sub/../../outside.png", "big.png", ""])  # fmt: skip
    result = ingest(SourceConfig(uri=str(root)), IngestConfig(image_size=16, max_pixels=200 * 200, max_drop_fraction=1.0))
    r = result.report
    _accounted(r)
    assert r["kept"] == 1
    assert r["quarantine_reasons"] == {
        "missing file": 1, "absolute path": 1, "path escapes the dataset root": 2, "over the pixel limit": 1,
        "invalid manifest row (path length 1-4096)": 1,
    }
    validation = json.loads(result.file("validation.json").read_text())["failure_cases"]
    assert validation == [{"row": 6, "column": "image", "check": "path length 1-4096"}]


def test_a_symlink_out_of_the_root_can_neither_be_read_nor_copied(state, tmp_path, monkeypatch):
    secret = tmp_path / "secret.png"
    secret_pixels = np.full((8, 8), 77, np.uint8)
    secret.write_bytes(_png(secret_pixels))
    root = _dataset(tmp_path / "d", {"ok.png": _png(_digit())}, ["ok.png", "link.png", "../secret.png"])
    os.symlink(secret, root / "link.png")
    reads = []
    original = Source.read
    monkeypatch.setattr(Source, "read", lambda self, full: reads.append(full) or original(self, full))
    result = _run(root)
    assert result.report["quarantine_reasons"] == {"path escapes the dataset root": 2}
    assert all("secret" not in r for r in reads)
    pixels = np.load(result.file("pixels.npy"))
    assert not any((p[:, :, 0] == 77).all() for p in pixels)
    _accounted(result.report)


def test_modes_are_normalized_and_exif_orientation_applied(state, tmp_path):
    rgb = np.zeros((20, 10, 3), np.uint8)
    rgb[:10] = 255  # top half white in a portrait image
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when displayed
    rotated = io.BytesIO()
    Image.fromarray(rgb).save(rotated, format="JPEG", exif=exif)
    sixteen = io.BytesIO()
    Image.fromarray(np.full((8, 8), 32896, np.uint16)).save(sixteen, format="PNG")  # 128 * 257
    palette = Image.fromarray(_digit(size=8)).convert("P")
    pal_buf = io.BytesIO()
    palette.save(pal_buf, format="PNG", transparency=0)
    cmyk = io.BytesIO()
    Image.new("CMYK", (8, 8), (0, 0, 0, 0)).save(cmyk, format="JPEG")
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., 0] = 255  # red, fully transparent: composited over black
    files = {
        "exif.jpg": rotated.getvalue(), "16bit.png": sixteen.getvalue(), "palette.png": pal_buf.getvalue(),
        "cmyk.jpg": cmyk.getvalue(), "rgba.png": _png(rgba, mode="RGBA"), "gray.png": _png(_digit(3)),
    }  # fmt: skip
    result = ingest(SourceConfig(uri=str(_dataset(tmp_path / "d", files))), IngestConfig(image_size=8, channels=3))
    r = result.report
    assert r["kept"] == 6 and r["quarantined"] == 0
    assert set(r["source_modes"]) >= {"RGB", "I;16", "P", "CMYK", "RGBA", "L"}
    pixels = np.load(result.file("pixels.npy"))
    assert pixels.shape == (6, 8, 8, 3) and pixels.dtype == np.uint8
    exif_img, sixteen_img, _, cmyk_img, rgba_img, _ = pixels
    # after the EXIF rotation the white half is on the right, not the top
    assert exif_img[:, 6:].mean() > 200 and exif_img[:, :2].mean() < 50
    assert (sixteen_img == 128).all()  # scaled by the 16-bit range, not clipped to white
    assert (cmyk_img > 250).all()  # CMYK (0,0,0,0) is white
    assert (rgba_img == 0).all()


def test_names_with_spaces_and_unicode_work(state, tmp_path):
    root = _dataset(tmp_path / "d", {"scans/José Müller 01.png": _png(_digit(1)), "scans/日本 2.png": _png(_digit(2))})
    assert _run(root).report["kept"] == 2


def test_second_run_reuses_the_snapshot_and_one_pixel_changes_the_fingerprint(state, tmp_path):
    root = _dataset(tmp_path / "d", {f"{i}.png": _png(_digit(i)) for i in range(5)})
    first = _run(root)
    second = _run(root)
    assert first.report["cache"] == "miss" and second.report["cache"] == "hit"
    assert second.report["fingerprint"] == first.report["fingerprint"] and second.key == first.key
    pixels = _digit(3)
    pixels[0, 0] ^= 1
    (root / "3.png").write_bytes(_png(pixels))
    third = _run(root)
    assert third.report["cache"] == "miss" and third.report["fingerprint"] != first.report["fingerprint"]


@pytest.mark.parametrize("fmt", ["parquet", "jsonl"])
def test_parquet_and_jsonl_manifests(state, tmp_path, fmt):
    root = _dataset(tmp_path / "d", {f"{i}.png": _png(_digit(i)) for i in range(3)})
    frame = pd.read_csv(root / "manifest.csv")
    if fmt == "parquet":
        frame.to_parquet(root / "m.parquet")
    else:
        frame.to_json(root / "m.jsonl", orient="records", lines=True)
    assert _run(root, manifest=f"m.{fmt}").report["kept"] == 3


def test_file_and_memory_urls(state, tmp_path):
    root = _dataset(tmp_path / "d", {f"{i}.png": _png(_digit(i)) for i in range(3)})
    assert _run(f"file://{root}").report["kept"] == 3
    mem = fsspec.filesystem("memory")
    for i in range(3):
        mem.pipe(f"/mlpipe-test/{i}.png", _png(_digit(i)))
    mem.pipe("/mlpipe-test/manifest.csv", (root / "manifest.csv").read_bytes())
    try:
        result = _run("memory://mlpipe-test")
    finally:
        mem.rm("/mlpipe-test", recursive=True)
    assert result.report["kept"] == 3


def test_imagefolder_layout_takes_the_class_from_the_folder(state, tmp_path):
    root = tmp_path / "tree"
    for k, label in enumerate(("cat", "dog")):
        for i in range(2):
            (root / label).mkdir(parents=True, exist_ok=True)
            (root / label / f"{i}.png").write_bytes(_png(_digit(10 * k + i)))
    (root / "stray.png").write_bytes(_png(_digit(99)))
    result = _run(root, layout="imagefolder")
    assert result.report["kept"] == 4 and result.report["quarantine_reasons"] == {"invalid manifest row (in a class folder)": 1}
    assert result.report["columns"] == ["image", "class"]


def test_near_duplicates_are_grouped_and_kept_together(state, tmp_path):
    base = np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8)
    noisy = base.copy()
    noisy[0, 0] ^= 8  # a re-encode's worth of difference
    other = np.random.default_rng(1).integers(0, 255, (64, 64), dtype=np.uint8)
    root = _dataset(tmp_path / "d", {"a.png": _png(base), "b.png": _png(noisy), "c.png": _png(other)})
    result = _run(root)
    assert result.report["near_duplicate_groups"] == 1 and result.report["near_duplicate_items"] == 2
    groups = pd.read_csv(result.file("near_duplicates.csv"))
    assert groups["row"].tolist() == [0, 1] and groups["group"].nunique() == 1
    # split treats a near-duplicate group like a subject: members never land in different splits
    merged = combined_groups(pd.Series(["s1", "s2", "s3"]), pd.Series(["n0", "n0", ""]))
    assert merged[0] == merged[1] != merged[2]


def test_near_duplicate_banding_finds_every_close_pair():
    rng = np.random.default_rng(0)
    hashes = [int(h) for h in rng.integers(0, 2**63, 200, dtype=np.int64)]
    hashes[10] = hashes[3] ^ 0b101  # distance 2
    hashes[20] = hashes[3] ^ (1 << 40)  # distance 1
    hashes[30] = hashes[7] ^ 0b111  # distance 3: beyond the limit
    groups = near_duplicate_groups(hashes, 2)
    assert groups[3] == groups[10] == groups[20] == 3
    assert groups[7] == -1 and groups[30] == -1


def test_one_line_errors_for_unreadable_inputs(state, tmp_path):
    root = _dataset(tmp_path / "d", {"a.png": _png(_digit())})
    with pytest.raises(MlpipeError, match="missing column 'path'"):
        _run(root, image_column="path")
    with pytest.raises(MlpipeError, match="source directory not found"):
        _run(tmp_path / "nowhere")
    with pytest.raises(MlpipeError, match="manifest not found"):
        _run(root, manifest="other.csv")
    (root / "bad.parquet").write_bytes(b"not parquet")
    with pytest.raises(MlpipeError, match="manifest bad.parquet is not readable") as err:
        _run(root, manifest="bad.parquet")
    assert "\n" not in str(err.value)


def test_too_few_survivors_is_an_error(state, tmp_path):
    root = _dataset(tmp_path / "d", {"a.png": b"junk"}, ["a.png", "../b.png"])
    with pytest.raises(MlpipeError, match="no usable images after quarantine: 0 of 2 rows survive"):
        _run(root)
    ok = _dataset(tmp_path / "e", {"a.png": _png(_digit()), "b.png": b""})
    with pytest.raises(MlpipeError, match="1 of 2 rows survive, ingest.min_rows is 2"):
        ingest(SourceConfig(uri=str(ok)), IngestConfig(min_rows=2, max_drop_fraction=1.0))


def test_batched_perceptual_hash_equals_imagehash():
    import imagehash

    from mlpipe.images import perceptual_hashes, phash_thumbnail

    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (40 + 7 * i, 50, 3), dtype=np.uint8)) for i in range(12)]
    ours = perceptual_hashes(np.stack([phash_thumbnail(img) for img in images]))
    theirs = [int(str(imagehash.phash(img)), 16) for img in images]
    assert ours == theirs


def test_a_symlinked_folder_out_of_the_root_is_refused(state, tmp_path):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "x.png").write_bytes(_png(_digit(7)))
    root = _dataset(tmp_path / "d", {"ok.png": _png(_digit())}, ["ok.png", "linked/x.png", "linked/absent.png"])
    os.symlink(outside, root / "linked")
    result = _run(root)
    assert result.report["quarantine_reasons"] == {"path escapes the dataset root": 2}
    _accounted(result.report)


# --- issue 16: decoding keeps what the picture shows; every manifest column is text -----------------


def test_case3_black_strokes_on_transparent_png_train_as_120_distinct_images(state, tmp_path):
    """Field case 3: black ink on a transparent canvas (LA) used to decode to 120 black squares,
    119 of them removed as exact duplicates."""
    from tests.field_cases import ink_on_transparent, write_shapes

    root = write_shapes(tmp_path / "d", ["bar", "flat", "ring"], 40, image=ink_on_transparent)
    r = ingest(SourceConfig(uri=str(root)), IngestConfig(image_size=32)).report
    _accounted(r)
    assert (r["kept"], r["duplicates"], r["quarantined"]) == (120, 0, 0)
    assert r["source_modes"] == {"LA": 120}


def _as_csv_would_read(rows: list[dict], path) -> pd.DataFrame:
    """The same rows written as CSV by hand (None: an empty cell; not pandas, which would write a
    column of integers with nulls as 0.0) and read by read_manifest."""
    path.parent.mkdir(parents=True, exist_ok=True)
    columns = list(dict.fromkeys(key for row in rows for key in row))
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        writer.writerows([["" if row.get(c) is None else str(row[c]) for c in columns] for row in rows])
    source = SourceConfig(uri=str(path.parent), manifest=path.name)
    return read_manifest(open_source(source), source)[0]


def _read(root, manifest) -> pd.DataFrame:
    source = SourceConfig(uri=str(root), manifest=manifest)
    return read_manifest(open_source(source), source)[0]


def test_case19_jsonl_integer_labels_with_nulls_read_exactly_as_csv(state, tmp_path):
    """Field case 19: integer class codes with some nulls stay "0", "1", "2" (not "0.0");
    the nulls are "", like CSV's empty cell."""
    from tests.field_cases import write_shapes

    root = write_shapes(tmp_path / "d", ["c0", "c1", "c2"], 40, manifest="jsonl",
                        label=lambda c, i, name: None if i % 13 == 12 else c)  # fmt: skip
    frame = _read(root, "manifest.jsonl")
    assert sorted(frame["label"].unique()) == ["", "0", "1", "2"]
    assert (frame["label"] == "").sum() == 9
    rows = [json.loads(line) for line in (root / "manifest.jsonl").read_text().splitlines()]
    pd.testing.assert_frame_equal(frame, _as_csv_would_read(rows, tmp_path / "csv" / "m.csv"))


def test_jsonl_values_are_their_json_text(state, tmp_path):
    lines = [
        {"image": "0.png", "label": 0, "score": 0.5, "ratio": 1.0, "flag": True, "tags": [1, "a"]},
        {"image": "1.png", "label": None, "score": 2.25, "extra": "x"},  # a null and missing keys
    ]
    root = tmp_path / "d"
    root.mkdir()
    text = "".join(json.dumps(r) + "\n" for r in lines) + '{"image": "2.png", "score": 1e3, "ratio": 0.50}\n'
    (root / "m.jsonl").write_text(text + "\n")  # numbers as a person writes them, and a blank last line
    frame = _read(root, "m.jsonl")
    assert frame.to_dict("list") == {
        "image": ["0.png", "1.png", "2.png"], "label": ["0", "", ""], "score": ["0.5", "2.25", "1e3"],
        "ratio": ["1.0", "", "0.50"], "flag": ["true", "", ""], "tags": ['[1,"a"]', "", ""], "extra": ["", "x", ""],
    }  # fmt: skip


def test_parquet_integer_columns_with_nulls_read_exactly_as_csv(state, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = tmp_path / "d"
    root.mkdir()
    rows = [{"image": f"{i}.png", "label": [0, 1, None, 2][i], "code": [7, None, 300, 9][i],
             "score": [0.5, 1.0, None, 2.25][i], "name": ["a", None, "", "b"][i]} for i in range(4)]  # fmt: skip
    table = pa.table({"image": [r["image"] for r in rows], "label": pa.array([r["label"] for r in rows], pa.int64()),
                      "code": pa.array([r["code"] for r in rows], pa.uint16()),
                      "score": pa.array([r["score"] for r in rows], pa.float64()),
                      "name": [r["name"] for r in rows]})  # fmt: skip
    pq.write_table(table, root / "m.parquet")
    frame = _read(root, "m.parquet")
    assert frame["label"].tolist() == ["0", "1", "", "2"] and frame["code"].tolist() == ["7", "", "300", "9"]
    assert frame["score"].tolist() == ["0.5", "1.0", "", "2.25"]  # real floats stay floats
    pd.testing.assert_frame_equal(frame, _as_csv_would_read(rows, tmp_path / "csv" / "m.csv"))
