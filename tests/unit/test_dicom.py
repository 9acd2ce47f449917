"""DICOM ingest (mlpipe.dicom, images.decode's DICOM branch, ingest's DICOM listing and headers),
checked on the real DICOM files pydicom's wheel and deid-data ship. pydicom's own fetch helpers
(get_testdata_file) go to the network and are never called: the files are found by path."""

import hashlib
import io
import json
import pickle
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
from PIL import Image
from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset

from mlpipe import deid, dicom
from mlpipe.config import IMAGEFOLDER_LABEL, ColumnPolicy, DicomConfig, IngestConfig, SourceConfig
from mlpipe.dicom import Header, decode_dicom, frame_indices, header_of, read_header
from mlpipe.errors import MlpipeError
from mlpipe.images import Quarantined, decode
from mlpipe.ingest import NEAR_DUP, ROW, _listed, detect, ingest, open_source, read_manifest, with_layout

TEST_FILES = Path(pydicom.__file__).parent / "data" / "test_files"
DEID_DATA = Path(pydicom.__file__).parent.parent / "deid_data" / "data"
NO_LIMIT = 1 << 40


def _path(name: str) -> Path:
    """A file of pydicom's test_files, or of deid-data ("deid:animals/cat.dcm"); skipped when absent."""
    path = DEID_DATA / name[5:] if name.startswith("deid:") else TEST_FILES / name
    if not path.is_file():
        pytest.skip(f"{name} is not in this pydicom / deid-data install")
    return path


def _bytes(name: str) -> bytes:
    return _path(name).read_bytes()


def _ds(name_or_bytes, **kw) -> Dataset:
    raw = name_or_bytes if isinstance(name_or_bytes, bytes) else _bytes(name_or_bytes)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pydicom.dcmread(io.BytesIO(raw), force=True, **kw)


def _save(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds.save_as(buf)
    return buf.getvalue()


def _dd(data: bytes, frame=None, window="header", max_pixels=NO_LIMIT) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return decode_dicom(data, frame, window, max_pixels)[0]


def _modality(ds: Dataset, frame: int | None = None) -> np.ndarray:
    """Stored values -> Modality LUT output (PS3.3 C.11.1), written out here: x * slope + intercept."""
    array = ds.pixel_array if frame is None else ds.pixel_array[frame]
    slope, intercept = float(ds.get("RescaleSlope", 1) or 1), float(ds.get("RescaleIntercept", 0) or 0)
    return array.astype(np.float64) * slope + intercept


def _ps33_linear(x: np.ndarray, c: float, w: float) -> np.ndarray:
    """PS3.3 C.11.2.1.2.1 (LINEAR), written from the standard's text, y in 0..255 (unrounded)."""
    low, high = c - 0.5 - (w - 1) / 2, c - 0.5 + (w - 1) / 2
    inside = ((x - (c - 0.5)) / (w - 1) + 0.5) * 255.0
    return np.where(x <= low, 0.0, np.where(x > high, 255.0, inside))


def _minmax(x: np.ndarray) -> np.ndarray:
    return (x - x.min()) / (x.max() - x.min()) * 255.0


def _close_to(decoded: np.ndarray, expected: np.ndarray) -> None:
    """`decoded` is `expected` (0..255 floats) rounded: never more than half a level away."""
    assert decoded.shape == expected.shape and decoded.dtype == np.uint8
    gap = np.abs(decoded.astype(np.float64) - expected)
    assert gap.max() <= 0.5 + 1e-9, f"{int((gap > 0.5 + 1e-9).sum())} pixels off, worst by {gap.max():.3f}"


def _monochrome1(name: str) -> bytes:
    """The same stored pixels as `name`, declared MONOCHROME1 (no MONOCHROME1 file ships with pydicom)."""
    ds = _ds(name)
    ds.PhotometricInterpretation = "MONOCHROME1"
    return _save(ds)


# --- decode_dicom: windows ------------------------------------------------------------------------


def test_ct_soft_tissue_window_saturates_more_than_minmax():
    data, ds = _bytes("CT_small.dcm"), _ds("CT_small.dcm")
    hu = _modality(ds)
    assert float(ds.RescaleIntercept) == -1024 and hu.min() < -160 and hu.max() > 240  # wider than the window
    minmax, soft = _dd(data, window="minmax"), _dd(data, window=(40, 400))
    saturated = lambda a: int(((a == 0) | (a == 255)).sum())  # noqa: E731
    # minmax: only values within half a level of the darkest and brightest reach the ends
    ends = np.rint(_minmax(hu))
    assert saturated(minmax) == int(((ends == 0) | (ends == 255)).sum()) < 10
    outside = int(((hu <= 40 - 0.5 - 399 / 2) | (hu > 40 - 0.5 + 399 / 2)).sum())
    assert saturated(soft) >= outside > 10 * saturated(minmax)
    assert saturated(soft) > saturated(minmax)


@pytest.mark.parametrize("window", [(40, 400), (-600, 1500)], ids=["soft-tissue", "lung"])
def test_fixed_window_is_the_ps33_linear_formula_in_hounsfield_units(window):
    ds = _ds("CT_small.dcm")
    hu = _modality(ds)
    expected = _ps33_linear(hu, *window)
    out = _dd(_bytes("CT_small.dcm"), window=window)
    _close_to(out, expected)
    c, w = window
    assert (out[hu <= c - 0.5 - (w - 1) / 2] == 0).all() and (out[hu > c - 0.5 + (w - 1) / 2] == 255).all()
    # a few pixels by hand: stored value, the slope/intercept, the formula
    for r, col in [(0, 0), (64, 64), (100, 30), (20, 110)]:
        x = float(ds.pixel_array[r, col]) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        if x <= c - 0.5 - (w - 1) / 2:
            y = 0.0
        elif x > c - 0.5 + (w - 1) / 2:
            y = 255.0
        else:
            y = ((x - (c - 0.5)) / (w - 1) + 0.5) * 255.0
        assert abs(int(out[r, col]) - y) <= 0.5 + 1e-9, (r, col, x, y, out[r, col])


def test_ct_without_window_attributes_header_falls_back_to_its_own_range():
    ds = _ds("CT_small.dcm")
    assert "WindowCenter" not in ds and "VOILUTSequence" not in ds
    data = _bytes("CT_small.dcm")
    header, minmax = _dd(data, window="header"), _dd(data, window="minmax")
    assert np.array_equal(header, minmax)
    _close_to(minmax, _minmax(_modality(ds)))
    assert minmax.min() == 0 and minmax.max() == 255


def test_mr_header_window_uses_its_window_center_and_width():
    ds = _ds("MR_small.dcm")
    assert (float(ds.WindowCenter), float(ds.WindowWidth)) == (600.0, 1600.0)
    data = _bytes("MR_small.dcm")
    out = _dd(data, window="header")
    _close_to(out, _ps33_linear(_modality(ds), 600, 1600))
    assert np.array_equal(out, _dd(data, window=(600, 1600)))
    assert not np.array_equal(out, _dd(data, window="minmax"))  # the header window really was used


def test_header_window_with_several_values_takes_the_first():
    ds = _ds("examples_overlay.dcm")  # WindowCenter [450, 200], WindowWidth [790, 443]
    assert len(ds.WindowCenter) == 2 and float(ds.WindowCenter[0]) == 450 and float(ds.WindowWidth[0]) == 790
    data = _bytes("examples_overlay.dcm")
    out = _dd(data, window="header")
    assert np.array_equal(out, _dd(data, window=(450, 790)))
    _close_to(out, _ps33_linear(_modality(ds), 450, 790))


def test_voi_lut_sequence_wins_over_the_window_attributes():
    ds = _ds("MR_small.dcm")  # has WindowCenter/Width 600/1600 too
    ramp = Dataset()
    ramp.LUTDescriptor = [4096, 0, 16]  # 4096 entries from stored value 0, 16-bit output
    ramp.add_new(0x00283006, "OW", (np.arange(4096, dtype=np.uint16) * 16).tobytes())  # LUT Data: 16 x
    ds.VOILUTSequence = [ramp]
    out = _dd(_save(ds), window="header")
    expected = np.clip(ds.pixel_array.astype(np.float64), 0, 4095) * 16 / 65535 * 255
    _close_to(out, expected)
    assert out.max() == 134  # 2145 * 16 / 65535 * 255 = 133.5; the 600/1600 window would give 255


def test_sigmoid_voi_function():
    ds = _ds("MR_small.dcm")
    ds.VOILUTFunction = "SIGMOID"
    expected = 255.0 / (1.0 + np.exp(-4.0 * (_modality(ds) - 600.0) / 1600.0))  # PS3.3 C.11.2.1.3.1
    _close_to(_dd(_save(ds), window="header"), expected)


@pytest.mark.parametrize("window", ["header", "minmax", (40, 400), (-600, 1500)], ids=str)
def test_monochrome1_is_inverted(window):
    normal = _dd(_bytes("CT_small.dcm"), window=window).astype(int)
    inverted = _dd(_monochrome1("CT_small.dcm"), window=window).astype(int)
    assert normal.std() > 10  # not a flat image
    assert np.abs(inverted - (255 - normal)).max() <= 1  # rounding of a .5 may differ by one
    assert (inverted == 255 - normal).mean() > 0.99


def test_monochrome1_source_mode_names_it():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, mode = decode_dicom(_monochrome1("CT_small.dcm"), None, "header", NO_LIMIT)
    assert mode == "DICOM MONOCHROME1 16-bit"


# --- decode_dicom: transfer syntaxes, colour, frames --------------------------------------------

LOSSLESS_PAIRS = [
    ("MR_small.dcm", "MR_small_RLE.dcm", "RLE Lossless"),
    ("MR_small.dcm", "MR_small_jp2klossless.dcm", "JPEG 2000 Image Compression (Lossless Only)"),
    ("MR_small.dcm", "MR_small_jpeg_ls_lossless.dcm", "JPEG-LS Lossless Image Compression"),
    ("MR_small.dcm", "MR_small_bigendian.dcm", "Explicit VR Big Endian"),
    ("MR_small.dcm", "MR_small_implicit.dcm", "Implicit VR Little Endian"),
    ("SC_rgb_rle.dcm", "SC_rgb_gdcm_KY.dcm", "JPEG 2000 Image Compression"),  # lossy syntax, lossless stream
    ("SC_rgb_rle.dcm", "SC_rgb_jpeg_gdcm.dcm", "JPEG Lossless, Non-Hierarchical, First-Order Prediction"),
    ("rtdose.dcm", "rtdose_rle.dcm", "RLE Lossless"),
]


@pytest.mark.parametrize("original,variant,syntax", LOSSLESS_PAIRS, ids=[p[1] for p in LOSSLESS_PAIRS])
def test_lossless_variants_decode_to_the_same_pixels(original, variant, syntax):
    a, b = _ds(original), _ds(variant)
    assert b.file_meta.TransferSyntaxUID.name.startswith(syntax)
    assert np.array_equal(a.pixel_array, b.pixel_array)  # the premise: the files truly share pixels
    frame = 5 if int(a.get("NumberOfFrames", 1) or 1) > 1 else None
    for window in ("header", "minmax"):
        x, y = _dd(_bytes(original), frame, window), _dd(_bytes(variant), frame, window)
        assert x.dtype == np.uint8 and x.std() > 5
        assert np.array_equal(x, y), f"{variant} differs from {original} under {window}"


@pytest.mark.parametrize("name,shape", [
    ("SC_rgb_rle.dcm", (100, 100, 3)),
    ("examples_rgb_color.dcm", (240, 320, 3)),
    ("SC_ybr_full_422_uncompressed.dcm", (100, 100, 3)),
    ("examples_jpeg2k.dcm", (480, 640, 3)),  # YBR_RCT, JPEG 2000 lossless
    ("deid:ultrasounds/RGB_IMAGE.dcm", (768, 1024, 3)),
])  # fmt: skip
def test_colour_files_give_h_w_3_as_pydicom_decodes_them(name, shape):
    out = _dd(_bytes(name))
    assert out.shape == shape and out.dtype == np.uint8
    assert np.array_equal(out, _ds(name).pixel_array)  # 8-bit colour: pydicom's RGB as it is
    assert np.abs(out.astype(int)[..., 0] - out[..., 2]).max() > 8  # really colour


@pytest.mark.parametrize("name", ["SC_rgb_rle_16bit.dcm", "SC_rgb_rle_32bit.dcm"])
def test_wide_rgb_is_scaled_from_bits_stored_to_8_bits(name):
    eight = _ds("SC_rgb_rle.dcm").pixel_array.astype(np.uint64)
    wide = _ds(name)
    bits = int(wide.BitsStored)
    assert np.array_equal(wide.pixel_array.astype(np.uint64), eight * ((2**bits - 1) // 255))  # the premise
    assert np.array_equal(_dd(_bytes(name)), _dd(_bytes("SC_rgb_rle.dcm")))


def test_palette_colour_goes_through_its_lookup_table():
    ds = _ds("examples_palette.dcm")
    assert ds.PhotometricInterpretation == "PALETTE COLOR" and ds.RedPaletteColorLookupTableDescriptor[2] == 16
    out = _dd(_bytes("examples_palette.dcm"))
    rgb = pydicom.pixels.apply_color_lut(ds.pixel_array, ds).astype(np.float64)
    assert out.shape == (350, 800, 3)
    _close_to(out, rgb / 65535 * 255)


@pytest.mark.parametrize("frame", [0, 3, 14])
def test_multiframe_monochrome_frame_is_that_frame_of_pixel_array_windowed(frame):
    ds = _ds("rtdose.dcm")
    assert int(ds.NumberOfFrames) == 15 and "WindowCenter" not in ds
    window = (1_000_000, 300_000)  # the dose grid's stored units (no Rescale Slope/Intercept)
    out = _dd(_bytes("rtdose.dcm"), frame, window)
    _close_to(out, _ps33_linear(_modality(ds, frame), *window))
    assert out.std() > 10


@pytest.mark.parametrize("name,frame,window", [
    ("MR_small.dcm", None, "minmax"),  # stored 127..2145: the darkest pixel should be 0, is 15
    ("rtdose.dcm", 3, "minmax"),  # 798000..1254000
    ("rtdose.dcm", 3, "header"),  # no window in the header: the frame's own range too
])  # fmt: skip
def test_minmax_is_the_frames_own_range(name, frame, window):
    out = _dd(_bytes(name), frame, window)
    assert (out.min(), out.max()) == (0, 255)
    _close_to(out, _minmax(_modality(_ds(name), frame)))


def test_multiframe_frames_differ_and_none_is_the_first_and_past_the_end_is_the_last():
    data = _bytes("rtdose.dcm")
    frames = [_dd(data, i) for i in range(15)]
    assert len({f.tobytes() for f in frames}) == 15
    assert np.array_equal(_dd(data, None), frames[0])
    assert np.array_equal(_dd(data, 99), frames[14])


@pytest.mark.parametrize("name,frame", [
    ("deid:ultrasounds/ultrasound-multiframe.dcm", 0),
    ("deid:ultrasounds/ultrasound-multiframe.dcm", 17),
    ("examples_ybr_color.dcm", 29),
    ("SC_rgb_rle_2frame.dcm", 1),
])  # fmt: skip
def test_multiframe_colour_frame_is_that_frame_of_pixel_array(name, frame):
    ds = _ds(name)
    out = _dd(_bytes(name), frame)
    expected = ds.pixel_array[frame]
    assert out.shape == expected.shape == (int(ds.Rows), int(ds.Columns), 3)
    assert np.array_equal(out, expected)
    other = 1 if frame != 1 else 0
    assert not np.array_equal(out, ds.pixel_array[other])  # the frames really differ


def _private_sop_class(name: str) -> bytes:
    """`name` with a SOP class no dictionary knows (a vendor's private one)."""
    ds = _ds(name)
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = "1.2.826.0.1.3680043.9.7.1"
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def _truncated_half(name: str) -> bytes:
    data = _bytes(name)
    return data[: len(data) // 2]


@pytest.mark.parametrize("make,reason", [
    (lambda: _bytes("MR_truncated.dcm"), "truncated DICOM pixel data"),
    (lambda: _truncated_half("CT_small.dcm"), "truncated DICOM pixel data"),
    (lambda: _bytes("rtplan.dcm"), "DICOM without pixel data (RT Plan Storage)"),
    (lambda: _bytes("reportsi.dcm"), "DICOM without pixel data (Basic Text SR Storage)"),
    (lambda: _bytes("dicomdirtests/DICOMDIR"), "DICOM without pixel data (Media Storage Directory Storage)"),
    (lambda: _bytes("waveform_ecg.dcm"), "DICOM without pixel data (12-lead ECG Waveform Storage)"),
    (lambda: _private_sop_class("rtplan.dcm"), "DICOM without pixel data"),
    (lambda: _bytes("nested_priv_SQ.dcm"), "DICOM lacks a required Image Pixel attribute"),
    (lambda: _bytes("JPEG-lossy.dcm"), "DICOM pixel data the installed decoders fail on (JPEG Extended (Process 2 and 4): corrupt, or a variant they do not read)"),
    (lambda: b"patient list, not an image\n" * 20, "not an image"),  # a text file named .dcm: no DICM preamble, no pixels
])  # fmt: skip
def test_broken_files_are_quarantined_with_their_reason(make, reason):
    with pytest.raises(Quarantined) as caught:
        _dd(make())
    assert str(caught.value) == reason


def test_over_the_pixel_limit_before_decoding():
    ct = _bytes("CT_small.dcm")
    assert _dd(ct, max_pixels=128 * 128).shape == (128, 128)  # exactly at the limit: fine
    with pytest.raises(Quarantined, match="^over the pixel limit$"):
        _dd(ct, max_pixels=128 * 128 - 1)
    cat = _ds("deid:animals/cat.dcm", stop_before_pixels=True)
    assert (int(cat.Rows), int(cat.Columns), cat.Modality) == (2614, 3072, "DX")
    with pytest.raises(Quarantined, match="^over the pixel limit$"):
        _dd(_bytes("deid:animals/cat.dcm"), max_pixels=2614 * 3072 - 1)


# --- images.decode ------------------------------------------------------------------------------


@pytest.mark.parametrize("name,channels,frame,mode", [
    ("CT_small.dcm", 1, None, "DICOM MONOCHROME2 16-bit"),
    ("CT_small.dcm", 3, None, "DICOM MONOCHROME2 16-bit"),
    ("SC_rgb_rle.dcm", 3, None, "DICOM RGB 8-bit"),
    ("SC_rgb_rle.dcm", 1, None, "DICOM RGB 8-bit"),
    ("rtdose.dcm", 1, 7, "DICOM MONOCHROME2 32-bit"),
    ("examples_ybr_color.dcm", 3, 4, "DICOM YBR_FULL_422 8-bit"),
    ("deid:ultrasounds/GREYSCALE_IMAGE.dcm", 1, None, "DICOM MONOCHROME2 8-bit"),
])  # fmt: skip
def test_images_decode_gives_training_size_and_a_dicom_source_mode(name, channels, frame, mode):
    decoded = decode(_bytes(name), 32, channels, NO_LIMIT, frame=frame, window="header")
    assert decoded.pixels.shape == (32, 32, channels) and decoded.pixels.dtype == np.uint8
    assert decoded.source_mode == mode
    assert decoded.pixels.std() > 3  # an image, not a flat field
    if channels == 3 and "MONOCHROME" in mode:
        assert np.array_equal(decoded.pixels[..., 0], decoded.pixels[..., 2])


def test_images_decode_passes_window_and_frame_to_the_dicom_decoder():
    ct = _bytes("CT_small.dcm")
    for window in ("minmax", (40, 400)):
        native = decode(ct, 128, 1, NO_LIMIT, window=window).pixels[..., 0]  # native size: no resize
        assert np.array_equal(native, _dd(ct, window=window))
    dose = _bytes("rtdose.dcm")
    assert np.array_equal(decode(dose, 10, 1, NO_LIMIT, frame=9).pixels[..., 0], _dd(dose, 9))
    assert decode(dose, 10, 1, NO_LIMIT, frame=9).sha256 != decode(dose, 10, 1, NO_LIMIT, frame=8).sha256
    # lossless variants: the same content hash (what ingest's exact-duplicate check compares)
    mr, mr_rle = (decode(_bytes(n), 32, 1, NO_LIMIT) for n in ("MR_small.dcm", "MR_small_RLE.dcm"))
    assert mr.sha256 == mr_rle.sha256
    with pytest.raises(Quarantined, match="^over the pixel limit$"):
        decode(ct, 32, 1, 100)


def test_images_decode_of_a_bare_dataset_needs_the_frame():
    """No Part 10 preamble: not recognized by its bytes, decoded when the caller says it is DICOM."""
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    write_dataset(fp, _ds("CT_small.dcm"))
    bare = fp.getvalue()
    assert bare[128:132] != b"DICM"
    with pytest.raises(Quarantined, match="^not an image$"):
        decode(bare, 16, 1, NO_LIMIT)
    decoded = decode(bare, 128, 1, NO_LIMIT, frame=0, window="minmax")
    assert np.array_equal(decoded.pixels[..., 0], _dd(_bytes("CT_small.dcm"), window="minmax"))


# --- headers --------------------------------------------------------------------------------------


def test_header_of_ct_small():
    ds = _ds("CT_small.dcm", stop_before_pixels=True)
    header = header_of(ds)
    private = sum(e.tag.is_private for e in ds)
    sequences = sum(e.VR == "SQ" and not e.tag.is_private for e in ds)
    assert (header.private_tags, header.sequences, header.frames) == (private, sequences, 1)
    assert private > 100 and sequences == 1  # CT_small: 179 private tags, OtherPatientIDsSequence
    c = header.columns
    assert (c["PatientName"], c["PatientID"], c["Modality"], c["Rows"], c["Columns"]) == (
        "CompressedSamples^CT1", "1CT1", "CT", "128", "128")  # fmt: skip
    assert c["ImageType"] == "ORIGINAL\\PRIMARY\\AXIAL"  # multi-valued: joined by a backslash
    assert c["RescaleIntercept"] == "-1024"
    assert c["AccessionNumber"] == ""  # present, empty
    assert "OtherPatientIDsSequence" not in c and "PixelData" not in c
    assert all(isinstance(v, str) for v in c.values())
    unnamed = re.compile(r"\([0-9A-F]{4},[0-9A-F]{4}\)")
    assert all(pydicom.datadict.tag_for_keyword(k) is not None or unnamed.fullmatch(k) for k in c)
    assert not any(pydicom.tag.Tag(pydicom.datadict.tag_for_keyword(k)).is_private for k in c if not k.startswith("("))


def test_header_frames_and_read_header_reasons_and_cache():
    assert header_of(_ds("rtdose.dcm", stop_before_pixels=True)).frames == 15
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about the invalid IS value
        assert header_of(_ds("badVR.dcm", stop_before_pixels=True)).frames == 1  # NumberOfFrames "1A": 1
    calls = []

    def opener(name):
        def open_():
            calls.append(name)
            return io.BytesIO(_bytes(name))
        return open_

    assert read_header(opener("rtplan.dcm"), ("test:rtplan", 1, "a")) == "DICOM without pixel data (RT Plan Storage)"
    text = b"patient list, not an image\n" * 20  # named .dcm, no DICM preamble: what ingest says of any non-image
    assert read_header(lambda: io.BytesIO(text), ("test:text", len(text), "a")) == "not an image"
    first = read_header(opener("CT_small.dcm"), ("test:ct", 1, "a"))
    assert isinstance(first, Header) and first.columns["Modality"] == "CT"
    assert read_header(opener("MR_small.dcm"), ("test:ct", 1, "a")) is first  # cached by key: not opened again
    assert calls == ["rtplan.dcm", "CT_small.dcm"]
    other = read_header(opener("MR_small.dcm"), ("test:ct", 1, "b"))  # another mtime: read again
    assert other.columns["Modality"] == "MR"

    def broken():
        raise ValueError("boom")

    assert read_header(broken, ("test:broken", 1, "a")) == "truncated or corrupt DICOM (ValueError)"

    # A transfer syntax no dictionary knows (a vendor's private one): the header is still read
    # (pydicom raises on is_deflated for such a UID), decoding names the syntax.
    private = _bytes("CT_small.dcm").replace(b"1.2.840.10008.1.2.1\x00", b"1.2.3.4.5.6.7.8.9.1\x00", 1)
    header = read_header(lambda: io.BytesIO(private), ("test:private", len(private), "a"))
    assert isinstance(header, Header) and header.columns["Modality"] == "CT" and header.pixels is None
    with pytest.raises(Quarantined, match=r"^DICOM compression without an installed decoder \(1.2.3.4.5.6.7.8.9.1\)$"):
        _dd(private)


def _pydicom_columns(ds: Dataset) -> dict[str, str]:
    """The columns header_of should give, by pydicom's own way: iterating a dataset converts every
    element (DataElement values, ambiguous and UN VRs resolved as pydicom resolves them)."""
    out = {}
    for elem in ds:
        tag = elem.tag
        if (tag.is_private or tag.group == 2 or tag.element == 0 or tag == 0x7FE00010 or tag.group >> 8 in (0x50, 0x60)
                or elem.VR in dicom.BULK_VRS):  # fmt: skip
            continue
        value = elem.value
        text = "" if value is None or isinstance(value, bytes) else str(value)
        if elem.VM > 1 and not isinstance(value, str):
            text = "\\".join(str(v) for v in value)
        out[elem.keyword or f"({tag.group:04X},{tag.element:04X})"] = text
    return out


def _every_test_file() -> list[Path]:
    """Every file of pydicom's test_files (most have no .dcm suffix)."""
    return sorted(p for p in TEST_FILES.rglob("*") if p.is_file())


def test_header_columns_are_pydicoms_own_values_for_every_test_file():
    """header_of converts explicit-VR elements from their raw bytes (faster than `dataset[tag]`):
    on every file pydicom ships (implicit and explicit VR, big endian, character sets, UN, bad
    values), its columns are those pydicom's own element access gives."""
    compared = 0
    for path in _every_test_file():
        raw = path.read_bytes()
        try:
            expected = _pydicom_columns(_ds(raw, stop_before_pixels=True))
        except Exception:  # noqa: BLE001 - a file pydicom itself cannot convert: nothing to compare to
            continue
        assert header_of(_ds(raw, stop_before_pixels=True)).columns == expected, path.name
        compared += 1
    assert compared >= 150, compared


def test_decoding_through_the_pixel_module_is_decoding_the_whole_file():
    """read_header keeps each file's PixelModule; decode_dicom with it parses only the pixel data
    element: the same pixels (or the same reason) as a full read, for every file pydicom ships and
    every window. With another file's bytes the module is not used (a full read instead)."""
    used = 0
    for n, path in enumerate(_every_test_file()):
        raw = path.read_bytes()
        header = read_header(lambda raw=raw: io.BytesIO(raw), (f"module:{n}", len(raw), "a"))
        if not isinstance(header, Header):
            continue
        module = pickle.loads(pickle.dumps(header.pixels))  # as it comes back from a worker process
        if module is not None:
            used += dicom._from_pixel_module(raw, module) is not None
        for frame, window in ((0, "header"), (header.frames - 1, "minmax"), (0, (40.0, 400.0))):
            outcome = []
            for with_module in (None, module):
                try:
                    outcome.append(decode_dicom(raw, frame, window, NO_LIMIT, with_module))
                except Quarantined as why:
                    outcome.append(str(why))
            full, through = outcome
            if isinstance(full, str) or isinstance(through, str):
                assert full == through, path.name
            else:
                assert np.array_equal(full[0], through[0]) and full[1] == through[1], (path.name, frame, window)
    assert used >= 80, used  # 92 of pydicom 3.0.2's files: the others have no transfer syntax, or are deflated
    ct, mr = _bytes("CT_small.dcm"), _bytes("MR_small.dcm")
    ct_module = read_header(lambda: io.BytesIO(ct), ("module:ct", len(ct), "a")).pixels
    assert dicom._from_pixel_module(mr, ct_module) is None  # another file's bytes
    assert np.array_equal(decode_dicom(mr, 0, "header", NO_LIMIT, ct_module)[0], _dd(mr))
    changed = bytearray(ct)
    changed[ct_module.offset - 40] ^= 0xFF  # one byte of the header before the pixel data
    assert dicom._from_pixel_module(bytes(changed), ct_module) is None


def test_ingest_parses_each_dicom_header_once(state, tmp_path, monkeypatch):
    """A folder of DICOM files: the header pass reads each file's header, and decoding parses the
    pixel data element alone (through the PixelModule), not the whole file again."""
    from tests.dicom_data import ct_folder

    folder = ct_folder(tmp_path / "ct", per_class=4, side=32)
    reads = []
    real = pydicom.dcmread
    monkeypatch.setattr(pydicom, "dcmread", lambda *a, **kw: reads.append(kw.get("stop_before_pixels", False)) or real(*a, **kw))
    result = ingest(SourceConfig(uri=str(folder.root)), _cfg())
    assert result.report["kept"] == 8
    assert reads == [True] * 8  # eight headers; no full read


@pytest.mark.parametrize("frames,policy,expected", [
    (1, "first", [0]), (1, "middle", [0]), (1, "all", [0]),
    (15, "first", [0]), (15, "middle", [7]), (10, "middle", [5]), (3, "all", [0, 1, 2]),
])  # fmt: skip
def test_frame_indices(frames, policy, expected):
    assert frame_indices(frames, policy) == expected


# --- ingest -----------------------------------------------------------------------------------------


def _cfg(channels=1, frames="middle", **kw) -> IngestConfig:
    return IngestConfig(image_size=32, channels=channels, workers=1, max_drop_fraction=1.0,
                        dicom=DicomConfig(frames=frames), **kw)  # fmt: skip


def _tree(root: Path, files: dict[str, str | bytes]) -> Path:
    """root/<rel> for each rel: a copy of a real file (its name) or the bytes given."""
    for rel, what in files.items():
        target = root / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(what, bytes):
            target.write_bytes(what)
        else:
            shutil.copyfile(_path(what), target)
    return root


CLASS_TREE = {
    "ct/CT_small.dcm": "CT_small.dcm",
    "ct/693_J2KI.dcm": "693_J2KI.dcm",
    "ct/rtplan.dcm": "rtplan.dcm",  # no pixel data: quarantined
    "mr/MR_small.dcm": "MR_small.dcm",
    "mr/MR_small_RLE.dcm": "MR_small_RLE.dcm",  # the same pixels: an exact duplicate
    "mr/MR_truncated.dcm": "MR_truncated.dcm",  # quarantined
    "mr/IM0001": "examples_overlay.dcm",  # no suffix: listed by its DICM preamble
    "mr/README": b"Scans exported from the PACS by Dr. Example, 2024.\n" * 5,  # no suffix, not DICOM: not listed
    "us/examples_rgb_color.dcm": "examples_rgb_color.dcm",
    "us/examples_palette.dcm": "examples_palette.dcm",
}
LISTED = sorted(k for k in CLASS_TREE if k != "mr/README")
HIDDEN = [dicom.FRAME, dicom.DICOM_FILE]


def test_listed_takes_dicom_by_suffix_or_preamble(tmp_path):
    root = _tree(tmp_path / "d", CLASS_TREE)
    src = open_source(SourceConfig(uri=str(root)))
    assert _listed(src, str(root / "mr/IM0001"), "imagefolder") and _listed(src, str(root / "mr/IM0001"), "dicom")
    readme, notes, photo = str(root / "mr/README"), str(root / "mr/notes.txt"), str(root / "mr/photo.png")
    assert not _listed(src, readme, "imagefolder") and not _listed(src, readme, "dicom")
    Path(notes).write_bytes(_bytes("MR_small.dcm"))  # a suffix that is neither: not opened, not listed
    assert not _listed(src, notes, "imagefolder")
    Path(photo).write_bytes(b"\x89PNG")
    assert _listed(src, photo, "imagefolder") and not _listed(src, photo, "dicom")


def test_ingest_of_class_folders_of_dicom_files(state, tmp_path):
    root = _tree(tmp_path / "d", CLASS_TREE)
    source = SourceConfig(uri=str(root))
    src = open_source(source)
    assert with_layout(src, source).layout == "imagefolder"

    frame, _ = read_manifest(src, source)
    assert sorted(frame["image"]) == LISTED  # IM0001 listed by its preamble, README not
    assert dict(zip(frame["image"], frame[IMAGEFOLDER_LABEL], strict=True))["mr/IM0001"] == "mr"
    by = frame.set_index("image")
    assert by.loc["ct/CT_small.dcm", "PatientName"] == "CompressedSamples^CT1"
    assert by.loc["mr/IM0001", "Modality"] == "MR" and by.loc["us/examples_rgb_color.dcm", "Modality"] == "US"
    assert by.loc["mr/MR_small.dcm", "WindowCenter"] == "600"
    assert by.loc["ct/rtplan.dcm", "Modality"] == ""  # an unreadable-as-image header gives no values
    assert set(HIDDEN) <= set(frame.columns)
    assert (frame[dicom.FRAME] == "0").all()
    assert frame[dicom.DICOM_FILE].tolist() == [str(i) for i in range(len(frame))]

    result = ingest(source, _cfg())
    r = result.report
    assert r["rows_in"] == len(LISTED) == r["kept"] + r["quarantined"] + r["duplicates"]
    assert (r["kept"], r["quarantined"], r["duplicates"]) == (6, 2, 1)
    assert r["quarantine_reasons"] == {"DICOM without pixel data (RT Plan Storage)": 1, "truncated DICOM pixel data": 1}
    assert {"PatientName", "PatientID", "Modality", "StudyDate", "Rows", IMAGEFOLDER_LABEL, "image"} <= {*r["columns"]}
    assert not set(HIDDEN) & set(r["columns"])

    d = r["dicom"]
    assert (d["files"], d["items"], d["frames"], d["window"]) == (len(LISTED), len(LISTED), "middle", "header")
    private = sequences = 0
    for rel in LISTED:  # written out from pydicom: what the headers with pixel attributes hold
        ds = _ds((root / rel).read_bytes(), stop_before_pixels=True)
        if "Rows" in ds:
            private += sum(e.tag.is_private for e in ds)
            sequences += sum(e.VR == "SQ" and not e.tag.is_private for e in ds)
    assert private > 100 and sequences > 0
    assert d["not_columns"] == {"private_tags": private, "sequences": sequences}
    assert {"PatientName", "Modality", "PhotometricInterpretation"} <= set(d["columns"])
    assert all(isinstance(c, str) and (pydicom.datadict.tag_for_keyword(c) or c.startswith("(")) for c in d["columns"])
    text = json.dumps(r)
    for value in ("CompressedSamples", "1CT1", "JFK IMAGING", "IM0001", "CT_small", "README"):
        assert value not in text, value  # names of columns and files' counts only, no value, no path

    quarantine = pd.read_csv(result.file("quarantine.csv"))
    assert list(quarantine.columns) == ["row", "reason"]
    rows = dict(zip(frame["image"], range(len(frame)), strict=True))
    assert dict(zip(quarantine["row"], quarantine["reason"], strict=True)) == {
        rows["ct/rtplan.dcm"]: "DICOM without pixel data (RT Plan Storage)",
        rows["mr/MR_truncated.dcm"]: "truncated DICOM pixel data",
    }
    assert ".dcm" not in result.file("quarantine.csv").read_text()
    duplicates = pd.read_csv(result.file("duplicates.csv"))
    assert duplicates.values.tolist() == [[rows["mr/MR_small_RLE.dcm"], rows["mr/MR_small.dcm"]]]
    pixels = np.load(result.file("pixels.npy"))
    assert pixels.shape == (len(LISTED), 32, 32, 1)
    expected = decode((root / "mr/IM0001").read_bytes(), 32, 1, NO_LIMIT, frame=0).pixels
    assert np.array_equal(pixels[rows["mr/IM0001"]], expected)


def test_detect_reads_dicom_sizes_and_colour(state, tmp_path):
    root = _tree(tmp_path / "d", CLASS_TREE)
    detection = detect(SourceConfig(uri=str(root)))
    assert detection.layout == "imagefolder" and detection.rows == len(LISTED) and detection.dicom
    frame, _ = read_manifest(open_source(SourceConfig(uri=str(root))), SourceConfig(uri=str(root)))
    sizes = {frame["image"][i.row]: i.size for i in detection.images}
    assert sizes["ct/CT_small.dcm"] == (128, 128) and sizes["mr/IM0001"] == (484, 300)
    assert sizes["us/examples_rgb_color.dcm"] == (320, 240)
    colour = {frame["image"][i.row]: i.colour for i in detection.images}
    assert colour["us/examples_rgb_color.dcm"] is True and colour["ct/CT_small.dcm"] is None  # grey: not decoded
    assert detection.facts().channels == 3 and detection.facts().dicom


def test_flat_folder_of_dicom_files_is_the_dicom_layout(state, tmp_path):
    root = _tree(tmp_path / "flat", {
        "CT_small.dcm": "CT_small.dcm", "MR_small.dcm": "MR_small.dcm", "IM0002": "examples_rgb_color.dcm",
        "README": b"not a scan\n" * 20, "photo.png": b"\x89PNG not listed in the dicom layout",
    })  # fmt: skip
    source = SourceConfig(uri=str(root))
    src = open_source(source)
    assert with_layout(src, source).layout == "dicom"
    frame, _ = read_manifest(src, source)
    assert sorted(frame["image"]) == ["CT_small.dcm", "IM0002", "MR_small.dcm"]
    assert sorted(frame["Modality"]) == ["CT", "MR", "US"]
    r = ingest(source, _cfg(channels=3)).report
    assert (r["rows_in"], r["kept"], r["quarantined"], r["duplicates"]) == (3, 3, 0, 0)
    assert r["dicom"]["files"] == 3 and r["source_modes"] == {
        "DICOM MONOCHROME2 16-bit": 2, "DICOM RGB 8-bit": 1}  # fmt: skip


MULTI = {
    "a/rtdose.dcm": "rtdose.dcm",  # 15 frames, MONOCHROME2
    "b/SC_rgb_rle_2frame.dcm": "SC_rgb_rle_2frame.dcm",  # 2 frames, RGB
    "c/CT_small.dcm": "CT_small.dcm",
}


def test_multiframe_all_gives_a_row_per_frame_in_one_near_duplicate_group(state, tmp_path):
    root = _tree(tmp_path / "mf", MULTI)
    source = SourceConfig(uri=str(root))
    frame, _ = read_manifest(open_source(source), source, "all")
    assert len(frame) == 15 + 2 + 1
    per_file = frame.groupby("image")[dicom.FRAME].apply(list).to_dict()
    assert per_file == {"a/rtdose.dcm": [str(i) for i in range(15)], "b/SC_rgb_rle_2frame.dcm": ["0", "1"],
                        "c/CT_small.dcm": ["0"]}  # fmt: skip
    for _, rows in frame.groupby("image"):  # __dicom_file: the file's first row, the same for all its frames
        assert set(rows[dicom.DICOM_FILE]) == {str(rows.index.min())}

    result = ingest(source, _cfg(channels=3, frames="all"))
    r = result.report
    assert r["rows_in"] == 18 == r["kept"] + r["quarantined"] + r["duplicates"]
    assert r["quarantined"] == 0 and (r["dicom"]["files"], r["dicom"]["items"]) == (3, 18)
    items = pd.read_parquet(result.file("items.parquet"))
    files = frame["image"].to_numpy()[items[ROW].to_numpy()]
    groups = {name: set(items.loc[files == name, NEAR_DUP]) for name in MULTI}
    assert len(groups["a/rtdose.dcm"]) == 1 and "" not in groups["a/rtdose.dcm"]
    assert len(groups["b/SC_rgb_rle_2frame.dcm"]) == 1 and "" not in groups["b/SC_rgb_rle_2frame.dcm"]
    assert groups["a/rtdose.dcm"] != groups["b/SC_rgb_rle_2frame.dcm"]
    duplicate_rows = pd.read_csv(result.file("duplicates.csv"))["row"]
    assert (files == "a/rtdose.dcm").sum() + (frame["image"].iloc[duplicate_rows] == "a/rtdose.dcm").sum() == 15
    pixels = np.load(result.file("pixels.npy"))
    row9 = frame.index[(frame["image"] == "a/rtdose.dcm") & (frame[dicom.FRAME] == "9")][0]
    assert np.array_equal(pixels[row9], decode(_bytes("rtdose.dcm"), 32, 3, NO_LIMIT, frame=9).pixels)


@pytest.mark.parametrize("policy,index", [("first", 0), ("middle", 7)])
def test_multiframe_first_or_middle_gives_one_row(state, tmp_path, policy, index):
    root = _tree(tmp_path / "mf", MULTI)
    source = SourceConfig(uri=str(root))
    frame, _ = read_manifest(open_source(source), source, policy)
    assert frame.groupby("image")[dicom.FRAME].apply(list).to_dict() == {
        "a/rtdose.dcm": [str(index)], "b/SC_rgb_rle_2frame.dcm": [str(2 // 2 if policy == "middle" else 0)],
        "c/CT_small.dcm": ["0"]}  # fmt: skip
    result = ingest(source, _cfg(channels=3, frames=policy))
    assert result.report["rows_in"] == 3 and result.report["kept"] == 3
    row = frame.index[frame["image"] == "a/rtdose.dcm"][0]
    expected = decode(_bytes("rtdose.dcm"), 32, 3, NO_LIMIT, frame=index).pixels
    assert np.array_equal(np.load(result.file("pixels.npy"))[row], expected)
    other = decode(_bytes("rtdose.dcm"), 32, 3, NO_LIMIT, frame=index + 1).pixels
    assert not np.array_equal(expected, other)


def _png(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (40, 40), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def test_manifest_pointing_at_dicom_files_gains_their_header_columns(state, tmp_path):
    files = {"scans/CT_small.dcm": "CT_small.dcm", "scans/one": "MR_small.dcm", "img/a.png": _png(1)}
    root = _tree(tmp_path / "m", files)
    pd.DataFrame({"image": ["scans/CT_small.dcm", "scans/one", "img/a.png"], "label": ["x", "y", "z"]}).to_csv(
        root / "manifest.csv", index=False)  # fmt: skip
    source = SourceConfig(uri=str(root))
    src = open_source(source)
    assert with_layout(src, source).layout == "manifest"
    frame, digest = read_manifest(src, source)
    assert frame["label"].tolist() == ["x", "y", "z"]
    assert frame["Modality"].tolist() == ["CT", "MR", ""] and frame["PatientID"].tolist()[0] == "1CT1"
    assert frame[dicom.FRAME].tolist() == ["0", "0", ""] and frame[dicom.DICOM_FILE].tolist() == ["0", "1", ""]
    assert digest != hashlib.sha256((root / "manifest.csv").read_bytes()).hexdigest()  # headers count too
    r = ingest(source, _cfg()).report
    assert (r["rows_in"], r["kept"]) == (3, 3)
    assert {"label", "PatientName", "Modality"} <= set(r["columns"]) and dicom.FRAME not in r["columns"]
    assert r["dicom"]["files"] == 2 and r["dicom"]["items"] == 2
    assert r["source_modes"] == {"DICOM MONOCHROME2 16-bit": 2, "L": 1}


def test_manifest_column_named_like_a_header_keyword_stops(state, tmp_path):
    root = _tree(tmp_path / "m", {"scans/CT_small.dcm": "CT_small.dcm"})
    pd.DataFrame({"image": ["scans/CT_small.dcm"], "Modality": ["chest"]}).to_csv(root / "manifest.csv", index=False)
    with pytest.raises(MlpipeError) as caught:
        ingest(SourceConfig(uri=str(root)), _cfg())
    message = str(caught.value)
    assert "Modality" in message and "\n" not in message
    assert "PatientName" not in message  # only the clashing column is named


# --- anonymization of header columns --------------------------------------------------------------


@pytest.mark.parametrize("column,dates,action", [
    ("PatientName", "shift", "drop"),
    ("PatientID", "shift", "pseudonymize"),
    ("StudyInstanceUID", "shift", "remap_uid"),
    ("StudyDate", "shift", "shift_date"),
    ("StudyDate", "year", "generalize_date"),
    ("PatientBirthDate", "year", "generalize_date"),
    ("DateOfGainCalibration", "shift", "shift_date"),  # an unlisted date: shifted too
    ("StudyTime", "shift", "keep"),
    ("StudyTime", "year", "drop"),
    ("Manufacturer", "shift", "keep"),  # not in Table E.1-1: kept
    ("Rows", "shift", "keep"),
    ("SecondaryReviewerName", "shift", "drop"),  # an unlisted person name: dropped
    ("InstitutionName", "shift", "drop"),
    ("SeriesDescription", "shift", "drop"),
])  # fmt: skip
def test_profile_policies(column, dates, action):
    policies, sources = dicom.profile_policies([column], {}, dates)
    assert policies[column].action == action
    if action == "generalize_date":
        assert policies[column].granularity == "year"
    assert sources[column].endswith(f": {action}")
    listed = deid.profile_action(tag_for_keyword(column)) is not None
    assert listed == (column not in ("Manufacturer", "Rows", "SecondaryReviewerName", "DateOfGainCalibration"))
    assert sources[column].startswith("profile (Table E.1-1)" if listed else "not in Table E.1-1")


def test_unlisted_date_is_not_credited_to_the_profile():
    assert deid.profile_action(tag_for_keyword("DateOfGainCalibration")) is None  # the premise
    policies, sources = dicom.profile_policies(["DateOfGainCalibration"], {}, "shift")
    assert policies["DateOfGainCalibration"].action == "shift_date"
    assert sources["DateOfGainCalibration"] == "not in Table E.1-1: shift_date"


def test_profile_policies_leave_unlisted_free_text_and_unknown_names_to_the_user():
    assert dicom.vr_of("DetectorDescription") == "LT"
    columns = ["DetectorDescription", "CalibrationNotes", "(0009,0010)", "NotAKeyword", "PatientName"]
    policies, sources = dicom.profile_policies(columns, {}, "shift")
    assert set(policies) == set(sources) == {"PatientName"}  # the run stops and asks for the others


def test_user_policy_wins_over_the_profile():
    user = {"PatientName": ColumnPolicy(action="keep"), "Manufacturer": ColumnPolicy(action="drop")}
    policies, sources = dicom.profile_policies(["PatientName", "Manufacturer", "PatientID"], user, "shift")
    assert "PatientName" not in policies and "Manufacturer" not in policies  # the user's own policy applies
    assert sources["PatientName"] == sources["Manufacturer"] == "anonymize.policy"
    assert policies["PatientID"].action == "pseudonymize"


def test_identifier_columns():
    columns = ["PatientID", "AccessionNumber", "InstitutionName", "PatientName", "StudyDate", "StudyInstanceUID",
               "SeriesDescription", "BodyPartExamined", "Modality", "Rows", "StudyTime",
               "InstitutionAddress"]  # fmt: skip
    found = dicom.identifier_columns(columns)
    assert {"PatientID", "AccessionNumber", "InstitutionName", "PatientName", "StudyDate", "StudyInstanceUID",
            "InstitutionAddress"} <= set(found)  # fmt: skip
    assert not {"SeriesDescription", "BodyPartExamined", "Modality", "Rows", "StudyTime"} & set(found)


def test_digit_columns():
    frame = pd.DataFrame({
        "Rows": ["128", "64"], "StudyDate": ["20040119", ""], "SeriesInstanceUID": ["1.2.3", "1.2.4"],
        "ContentDate": ["20040119", "unknown"], "PatientID": ["12345", "678"], "WindowCenter": ["600", "-40\\40"],
    })  # fmt: skip
    found = dicom.digit_columns(frame, [*frame.columns, "Columns"])
    assert found == ["Rows", "StudyDate", "SeriesInstanceUID", "WindowCenter"]  # PatientID: LO, not a digit VR
