"""mlpipe.burned_in on real DICOM pixels (PyPI deid-data) and on text drawn with PIL.

Which deid-data files show text (looked at as PNGs): GREYSCALE_IMAGE.dcm (BurnedInAnnotation YES:
patient name, ID, birth date, institution, study date and time across the top, scanner settings
down the left), RGB_IMAGE.dcm (no BurnedInAnnotation attribute, but name, ID, date, accession and
institution across the top and settings down the right) and ultrasound-multiframe.dcm (settings
only, no personal data in frame 0). Without text: humans/ctbrain1.dcm (a drawn face),
animals/cat.dcm (a radiograph, BurnedInAnnotation NO; its lone "R" marker is not read, and one
character would not count: MIN_ALNUM) and dicom-cookies (photographs of cookies).

Images go in at <= 1024 px on the longer side: the ultrasounds already are (1024 x 768, 800 x 600);
the cat (3072 x 2614) and the cookies (2048 x 1536) are shrunk (at their own size they give no box
either: 2.8 s and 1.6 s). find_text's time here (two shared cores at load 5-6; median of 3, wall clock and the
tesseract processes' CPU): 512 x 512 without text 0.7 s (0.35 s), with text 1.4 s (0.8 s: the
fourth pass); 1024 x 768 with text (GREYSCALE_IMAGE) 1.7 s (1.4 s), without (a cookie shrunk to
1024 x 768, RGB) 1.9 s (0.6 s). The first OCR call also pays Presidio's import (about 5 s). This
file: about 22 s.

No tesseract: the OCR tests skip, except under CI=true, where they fail (`make test` installs it).
"""

import json
import logging
import os
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image, ImageDraw, ImageFont

from mlpipe import burned_in
from mlpipe.burned_in import TextBox, find_text, ocr_available, redact, scan
from mlpipe.errors import MlpipeError

LONGEST = 1024
NAME = "JOHN DOE 1970-01-01"


def _deid(name: str) -> Path:
    import deid_data

    return Path(deid_data.__file__).parent / "data" / name


def _pixels(name: str) -> np.ndarray:
    """Frame 0 of a deid-data file as uint8 (min-max scaled when wider; the real DICOM windowing
    is mlpipe.dicom's), shrunk to <= LONGEST px on the longer side."""
    ds = pydicom.dcmread(_deid(name))
    pixels = ds.pixel_array
    if int(ds.get("NumberOfFrames", 1) or 1) > 1:
        pixels = pixels[0]
    if pixels.dtype != np.uint8:
        pixels = pixels.astype(np.float64)
        pixels = ((pixels - pixels.min()) / max(np.ptp(pixels), 1) * 255).round().astype(np.uint8)
    h, w = pixels.shape[:2]
    if max(h, w) > LONGEST:
        scale = LONGEST / max(h, w)
        pixels = np.asarray(Image.fromarray(pixels).resize((round(w * scale), round(h * scale)), Image.LANCZOS))
    return pixels


@pytest.fixture(scope="module")
def ocr():
    if not ocr_available():
        reason = burned_in._ocr_problem() or burned_in.NOT_INSTALLED
        if os.environ.get("CI", "").lower() in ("true", "1"):
            pytest.fail(f"CI: {reason}")
        pytest.skip(reason)


@pytest.fixture(scope="module")
def found(ocr):
    """find_text on a file, once per file for the module: {name: (pixels, boxes)}."""
    cache = {}

    def get(name):
        if name not in cache:
            pixels = _pixels(name)
            cache[name] = (pixels, find_text(pixels))
        return cache[name]

    return get


def _covered(mask: np.ndarray, boxes, pad: int = 2) -> float:
    """Fraction of the True pixels of `mask` inside some padded box."""
    inside = np.zeros_like(mask)
    for b in boxes:
        inside[max(0, b.top - pad):b.bottom + pad, max(0, b.left - pad):b.right + pad] = True
    return float((mask & inside).sum() / max(mask.sum(), 1))


def _ink(pixels: np.ndarray) -> np.ndarray:
    """Annotation pixels of the header bands: >= 100 in the brightest channel (the bands' background
    is 0 or 40, GREYSCALE's text 100-197, RGB's 255)."""
    return (pixels if pixels.ndim == 2 else pixels.max(axis=2)) >= 100


# Bands with only annotation text in them (rows, columns), checked pixel by pixel: the name, ID,
# birth date, institution, study date and time line of each still ultrasound.
HEADER = {"ultrasounds/GREYSCALE_IMAGE.dcm": (slice(0, 22), slice(0, 1024)),
          "ultrasounds/RGB_IMAGE.dcm": (slice(0, 56), slice(0, 900))}


@pytest.mark.parametrize("name", ["ultrasounds/GREYSCALE_IMAGE.dcm", "ultrasounds/RGB_IMAGE.dcm"])
def test_personal_data_lines_of_the_ultrasounds_are_found(found, name):
    pixels, boxes = found(name)
    rows, cols = HEADER[name]
    header = np.zeros(pixels.shape[:2], bool)
    header[rows, cols] = _ink(pixels)[rows, cols]
    # every annotation pixel of the header line lies in a box, but the lone "M" (sex) of GREYSCALE's line
    assert _covered(header, boxes) >= 0.95
    assert len(boxes) >= 20 and all(isinstance(b, TextBox) for b in boxes)
    assert all(0 <= b.left < b.right <= pixels.shape[1] and 0 <= b.top < b.bottom <= pixels.shape[0] for b in boxes)


def test_settings_of_the_multiframe_ultrasound_are_found(found):
    pixels, boxes = found("ultrasounds/ultrasound-multiframe.dcm")
    left_column = [b for b in boxes if b.right < 100 and b.top < 300]  # "18Hz 15cm 2D 59% ... 2.5MHz"
    assert len(left_column) >= 6
    assert pixels.shape == (600, 800, 3)


@pytest.mark.parametrize("name", ["ultrasounds/GREYSCALE_IMAGE.dcm", "ultrasounds/RGB_IMAGE.dcm"])
def test_redact_blacks_out_the_text(found, name):
    pixels, boxes = found(name)
    before = pixels.copy()
    out = redact(pixels, boxes)
    assert out.shape == pixels.shape and out.dtype == pixels.dtype
    assert np.array_equal(pixels, before)  # a copy: the input is unchanged
    rows, cols = HEADER[name]
    assert _ink(out)[rows, cols].sum() <= 0.03 * _ink(pixels)[rows, cols].sum()  # GREYSCALE's "M" is left


def test_redacted_ultrasound_reads_no_text_where_the_boxes_were(found):
    pixels, boxes = found("ultrasounds/GREYSCALE_IMAGE.dcm")
    again = find_text(redact(pixels, boxes))
    assert not [b for b in again if any(b.overlap(o) for o in boxes)]
    assert len(again) <= len(boxes) // 5  # on these files: none (RGB_IMAGE: 3 settings words of 34)


@pytest.mark.parametrize("name", ["humans/ctbrain1.dcm", "animals/cat.dcm", "dicom-cookies/image1.dcm"])
def test_images_without_text_give_no_box(found, name):
    assert found(name)[1] == []


def _phantom(n: int = 512) -> np.ndarray:
    y, x = np.mgrid[:n, :n]
    disc = np.hypot(x - n / 2, y - n / 2) < n * 0.35
    blob = 60 * np.exp(-((x - n * 0.45) ** 2 + (y - n * 0.55) ** 2) / (2 * (n * 0.08) ** 2))
    return np.where(disc, 90 + blob, 10).astype(np.uint8)


def test_smooth_synthetic_images_give_no_box(ocr):
    gradient = np.tile(np.linspace(0, 255, 640).astype(np.uint8), (480, 1))
    assert find_text(gradient) == []
    assert find_text(np.stack([gradient.T] * 3, axis=-1)) == []
    assert not scan(_phantom()).has_text


def _font(size: int):
    fonts = sorted(Path("/usr/share/fonts").rglob("*.ttf")) if Path("/usr/share/fonts").is_dir() else []
    preferred = [f for f in fonts if f.name in ("DejaVuSans.ttf", "LiberationSans-Regular.ttf")] or fonts
    return ImageFont.truetype(str(preferred[0]), size) if preferred else ImageFont.load_default(size=size)


def test_drawn_name_and_date_are_found_and_covered(ocr, caplog):
    background = _phantom()
    picture = Image.fromarray(background)
    draw = ImageDraw.Draw(picture)
    draw.text((24, 20), NAME, fill=230, font=_font(22))
    pixels = np.asarray(picture)
    drawn = pixels != background
    cols = np.flatnonzero(drawn.any(axis=0))
    rows = np.flatnonzero(drawn.any(axis=1))
    with caplog.at_level(logging.DEBUG):
        result = scan(pixels)
    assert result.has_text and result.n_boxes == 3  # JOHN, DOE, 1970-01-01
    assert _covered(drawn, result.boxes) == 1.0  # every drawn pixel is in a padded box ...
    for b in result.boxes:  # ... and no box strays from the drawn line
        assert cols[0] - 3 <= b.left and b.right <= cols[-1] + 4 and rows[0] - 3 <= b.top and b.bottom <= rows[-1] + 4
    assert [b.n_chars for b in result.boxes] == [4, 3, 10]
    # what was read stays inside: not in the boxes, the summary or any log line
    record = json.dumps(result.summary()) + repr(result) + caplog.text
    assert not any(word in record for word in ("JOHN", "DOE", "1970"))
    assert (redact(pixels, result.boxes)[drawn] == 0).all()


WORDS = [  # (text, confidence, left, top, width, height) in the caller's pixels
    ("JOHN", 90.0, 10, 10, 40, 12), ("1970-01-01", 41.0, 60, 10, 90, 12),  # words
    ("R", 95.0, 10, 200, 10, 12), ("=-", 95.0, 300, 50, 12, 4),  # < 2 letters or digits
    ("es)", 43.0, 100, 88, 392, 26),  # 5 box heights per character: not a word
    ("DOE", 39.0, 10, 40, 30, 12), (" ", 95.0, 0, 0, 5, 5)]  # under MIN_CONFIDENCE; a space


def test_word_rules_on_a_stand_in_ocr(monkeypatch):
    """The rules between tesseract's words and the boxes, on a stand-in for Presidio's TesseractOCR
    that answers WORDS in each pass's pixels: no tesseract needed."""
    from presidio_image_redactor import TesseractOCR

    calls = []

    def perform_ocr(self, picture, **kwargs):
        calls.append(kwargs["config"])
        scale = picture.width / 512
        words = WORDS if answer else []
        keys = ("left", "top", "width", "height")
        places = {key: [round(w[i] * scale) for w in words] for i, key in enumerate(keys, 2)}
        return {"text": [w[0] for w in words], "conf": [w[1] for w in words], **places}

    monkeypatch.setattr(TesseractOCR, "perform_ocr", perform_ocr)
    monkeypatch.setattr(burned_in, "ocr_available", lambda: True)
    answer = True
    boxes = find_text(np.zeros((512, 512), np.uint8))
    assert boxes == [TextBox(10, 10, 40, 12, 90.0, 4), TextBox(60, 10, 90, 12, 41.0, 10)]  # 4 passes, merged
    assert calls == ["--psm 3"] * 3 + ["--psm 11"]  # the sparse pass only once text is found
    assert {f.name for f in fields(TextBox)} == {"left", "top", "width", "height", "confidence", "n_chars"}
    calls.clear()
    answer = False
    assert find_text(np.zeros((512, 512, 3), np.uint8)) == [] and calls == ["--psm 3"] * 3


def test_redact_contract_without_ocr():
    image = np.full((10, 12, 3), 200, np.uint16)
    box = TextBox(left=2, top=3, width=4, height=2, confidence=90.0, n_chars=3)
    out = redact(image, [box], pad=1)
    assert out.shape == image.shape and out.dtype == np.uint16 and (image == 200).all()
    assert (out[2:6, 1:7] == 0).all() and out.sum() == 200 * (10 * 12 - 4 * 6) * 3
    edge = redact(image[..., 0], [TextBox(-5, 8, 30, 9, 50.0, 2)], pad=2)  # clipped to the image
    assert (edge[6:] == 0).all() and (edge[:6] == 200).all()
    assert np.array_equal(redact(image, []), image)
    with pytest.raises(MlpipeError, match="pad must be >= 0"):
        redact(image, [box], pad=-1)


def test_missing_tesseract_is_one_clear_line(monkeypatch):
    monkeypatch.setattr(burned_in.shutil, "which", lambda name: None)
    ocr_available.cache_clear()
    try:
        assert not ocr_available()
        with pytest.raises(MlpipeError) as err:
            find_text(np.zeros((32, 32), np.uint8))
        assert str(err.value) == "tesseract is not installed: apt-get install tesseract-ocr"
    finally:
        ocr_available.cache_clear()


@pytest.mark.parametrize("bad", [np.zeros((8, 8), np.float32), np.zeros((8, 8, 4), np.uint8),
                                 np.zeros((0, 8), np.uint8), [[0, 1], [2, 3]]])
def test_find_text_takes_only_8_bit_gray_or_rgb(bad):
    with pytest.raises(MlpipeError, match="burned-in text check"):
        find_text(bad)


def test_import_loads_no_ocr():
    heavy = ("presidio_image_redactor", "pytesseract", "cv2")
    code = f"import sys, mlpipe.burned_in; print([m for m in {heavy!r} if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"
