"""Decoding keeps what the picture shows, and the pixel limit is the user's (issue 16, kinds 4 and 5).

Every case is a real encoded file (PNG, JPEG) made here with Pillow and decoded by `mlpipe.images.decode`,
the function ingest's workers run; assertions look at where bright and dark pixels land.
"""

import io
import sys
import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

from mlpipe.images import Quarantined, decode, decode_into
from tests.field_cases import ink_on_transparent, pattern

PILLOW_DEFAULT_LIMIT = int(1024 * 1024 * 1024 // 4 // 3)  # PIL.Image.MAX_IMAGE_PIXELS as Pillow ships it: 89,478,485


def _encode(img: Image.Image, fmt: str = "PNG", **save) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **save)
    return buf.getvalue()


def _gray(data: bytes, size: int, **kw) -> np.ndarray:
    """Decoded as size x size grayscale: H x W uint8."""
    return decode(data, size, 1, 10**9, **kw).pixels[:, :, 0]


def _rgb(data: bytes, size: int, **kw) -> np.ndarray:
    return decode(data, size, 3, 10**9, **kw).pixels


# --- transparency ------------------------------------------------------------------------------------


def test_black_strokes_on_transparent_la_land_on_white_and_stay_distinct():
    """case3: black ink (alpha 255) on a fully transparent canvas, mode LA, 3 classes x 10 items."""
    digests = set()
    for cls in range(3):
        for i in range(10):
            img = ink_on_transparent(cls, i)
            strokes = np.asarray(img)[:, :, 1] > 0
            decoded = decode(_encode(img), 32, 1, 10**6)
            assert decoded.source_mode == "LA"
            assert (decoded.pixels[:, :, 0] == np.where(strokes, 0, 255)).all()  # black strokes, white canvas
            digests.add(decoded.sha256)
    assert len(digests) == 30  # no two drawings collapse into the same picture


def test_white_strokes_on_transparent_rgba_land_on_black():
    shape = pattern(2, 5) > 150
    rgba = np.zeros((32, 32, 4), np.uint8)
    rgba[..., :3] = 255  # white ink
    rgba[..., 3] = np.where(shape, 255, 0)
    pixels = _rgb(_encode(Image.fromarray(rgba, "RGBA")), 32)
    assert (pixels[shape] == 255).all() and (pixels[~shape] == 0).all()


def test_dark_red_half_transparent_rgba_is_blended_over_white():
    rgba = np.zeros((16, 16, 4), np.uint8)
    rgba[:, :8] = (120, 0, 0, 255)  # opaque dark red on the left
    rgba[:, 8:] = (120, 0, 0, 128)  # half transparent on the right
    rgba[:4, :] = (0, 0, 0, 0)  # nothing visible at the top
    pixels = _rgb(_encode(Image.fromarray(rgba, "RGBA")), 16).astype(int)
    assert (pixels[4:, :8] == (120, 0, 0)).all()  # opaque pixels keep their colour
    assert (pixels[:4] == 255).all()  # the background is white: the visible pixels are dark
    assert np.abs(pixels[4:, 8:] - (187, 127, 127)).max() <= 1  # 120 * a + 255 * (1 - a), a = 128/255


@pytest.mark.parametrize("background, level", [("white", 255), ("black", 0)])
def test_the_background_option_overrides_the_automatic_choice(background, level):
    img = ink_on_transparent(0, 3)
    strokes = np.asarray(img)[:, :, 1] > 0
    pixels = _gray(_encode(img), 32, background=background)
    assert (pixels[strokes] == 0).all() and (pixels[~strokes] == level).all()


def test_nothing_visible_and_fully_opaque_alpha():
    empty = np.zeros((8, 8, 4), np.uint8)
    empty[..., 0] = 255  # red, but fully transparent: nothing is visible, the background is black
    assert (_rgb(_encode(Image.fromarray(empty, "RGBA")), 8) == 0).all()
    opaque = np.zeros((8, 8, 4), np.uint8)
    opaque[..., :3] = np.asarray(Image.fromarray(pattern(1, 1)).resize((8, 8)))[..., None]
    opaque[..., 3] = 255
    as_rgb = _rgb(_encode(Image.fromarray(opaque[..., :3], "RGB")), 8)
    assert (_rgb(_encode(Image.fromarray(opaque, "RGBA")), 8) == as_rgb).all()  # alpha 255: nothing changes


def test_palette_png_with_a_transparent_index_and_with_per_entry_alphas():
    index = np.zeros((16, 16), np.uint8)
    index[4:12, 4:12] = 1  # a square of colour 1 on colour 0
    img = Image.fromarray(index, "P")
    img.putpalette([0, 0, 0, 30, 30, 30] + [0] * 762)  # colour 0 black, colour 1 dark grey
    single = _gray(_encode(img, transparency=0), 16)  # index 0 transparent (tRNS with one entry)
    assert (single[4:12, 4:12] == 30).all() and single[0, 0] == 255  # dark square, white background
    per_entry = _gray(_encode(img, transparency=bytes([0, 255])), 16)  # tRNS alpha per palette entry
    assert (per_entry == single).all()
    plain = _gray(_encode(img), 16)  # no transparency: the palette's own colours
    assert (plain[4:12, 4:12] == 30).all() and plain[0, 0] == 0
    assert decode(_encode(img, transparency=0), 16, 1, 10**6).source_mode == "P"


@pytest.mark.parametrize("mode", ["L", "RGB", "I;16", "1"])
def test_png_colour_key_transparency_in_non_palette_modes(mode):
    """tRNS in an L, RGB, 16-bit or 1-bit PNG: pixels equal to the key are transparent."""
    ink = np.zeros((16, 16), bool)
    ink[3:13, 6:10] = True  # a dark bar: everything else has the key value (white) and is transparent
    if mode == "L":
        img, key = Image.fromarray(np.where(ink, 10, 255).astype(np.uint8), "L"), 255
    elif mode == "RGB":
        rgb = np.where(ink[..., None], 10, 255).astype(np.uint8).repeat(3, axis=2)
        img, key = Image.fromarray(rgb, "RGB"), (255, 255, 255)
    elif mode == "I;16":
        img, key = Image.fromarray(np.where(ink, 2570, 65535).astype(np.uint16)), 65535
    else:
        img, key = Image.fromarray(np.where(ink, 0, 255).astype(np.uint8), "L").convert("1"), 255
    data = _encode(img, transparency=key)
    assert Image.open(io.BytesIO(data)).info.get("transparency") is not None  # the file really carries a key
    white = _gray(data, 16, background="white")
    black = _gray(data, 16, background="black")
    assert (white[ink] <= 10).all() and (black[ink] <= 10).all()  # the bar itself is opaque
    assert (white[~ink] == 255).all() and (black[~ink] == 0).all()  # the key colour is transparent
    assert (_gray(data, 16) == white).all()  # auto: dark visible pixels, so white


# --- modes and orientation ---------------------------------------------------------------------------


def test_sixteen_bit_png_is_scaled_not_clipped():
    array = np.zeros((16, 16), np.uint16)
    array[:, :8] = 65535  # left half full scale
    array[8:, 8:] = 32896  # bottom right mid grey (128 * 257)
    img = Image.fromarray(array)
    assert img.mode == "I;16"
    decoded = decode(_encode(img), 16, 1, 10**6)
    assert decoded.source_mode == "I;16"
    pixels = decoded.pixels[:, :, 0]
    assert (pixels[:, :8] == 255).all() and (pixels[:8, 8:] == 0).all() and (pixels[8:, 8:] == 128).all()


def test_cmyk_jpeg_keeps_its_colours():
    cmyk = np.zeros((16, 16, 4), np.uint8)
    cmyk[:, :8, 0] = 255  # left: full cyan -> RGB (0, 255, 255)
    cmyk[:, 8:, 3] = 255  # right: full black
    data = _encode(Image.fromarray(cmyk, "CMYK"), "JPEG", quality=95)
    decoded = decode(data, 16, 3, 10**6)
    assert decoded.source_mode == "CMYK"
    left, right = decoded.pixels[:, :6].astype(int), decoded.pixels[:, 10:].astype(int)
    assert left[..., 0].mean() < 30 and left[..., 1].mean() > 225 and left[..., 2].mean() > 225
    assert right.mean() < 30


@pytest.mark.parametrize("orientation, bright_side", [(6, "right"), (8, "left")])
def test_exif_orientation_turns_the_picture(orientation, bright_side):
    rgb = np.zeros((40, 20, 3), np.uint8)
    rgb[:20] = 255  # the top half of a portrait picture is white
    exif = Image.Exif()
    exif[0x0112] = orientation  # 6: turn 90 degrees clockwise to display; 8: counter-clockwise
    pixels = _gray(_encode(Image.fromarray(rgb), "JPEG", exif=exif, quality=95), 16)
    left, right = pixels[:, :6].mean(), pixels[:, 10:].mean()
    bright, dark = (right, left) if bright_side == "right" else (left, right)
    assert bright > 200 and dark < 50


def test_la_and_rgba_with_partial_alpha_as_grayscale_and_rgb():
    """A soft (anti-aliased) black disc on transparency: the edge blends to grey, the centre is black."""
    yy, xx = np.mgrid[0:32, 0:32]
    radius = np.hypot(yy - 15.5, xx - 15.5)
    alpha = np.clip((12 - radius) * 64, 0, 255).astype(np.uint8)  # opaque inside, a 4 px soft edge
    la = Image.fromarray(np.dstack([np.zeros_like(alpha), alpha]), "LA")
    rgba = Image.fromarray(np.dstack([np.zeros((32, 32, 3), np.uint8), alpha]), "RGBA")
    expected = np.rint(255 * (1 - alpha / 255)).astype(int)  # black over white
    for img in (la, rgba):
        gray = _gray(_encode(img), 32).astype(int)
        assert np.abs(gray - expected).max() <= 1
        assert (_rgb(_encode(img), 32).astype(int) - expected[..., None]).__abs__().max() <= 1


# --- the pixel limit ---------------------------------------------------------------------------------


SIZES = [(20, 20), (40, 40), (60, 60), (80, 80), (100, 30), (30, 100), (71, 71), (50, 99)]
MAX_PIXELS = 5_000  # 80x80, 71x71 and 50x99 are above it


def _decode_on_threads(tmp_path, files: list[bytes], run: int, max_pixels: int = MAX_PIXELS, size: int = 16):
    """Decode `files` as ingest does for them (`decode_into` on a thread pool, here one file per
    task for as much interleaving as possible) into a memmap of N x size x size x 1.
    Returns (quarantined rows, per-row sha256 or reason, the pixels)."""
    pixels_path = tmp_path / f"pixels-{run}.npy"
    np.lib.format.open_memmap(pixels_path, mode="w+", dtype=np.uint8, shape=(len(files), size, size, 1)).flush()
    rows = [(row, row) for row in range(len(files))]
    with ThreadPoolExecutor(max_workers=8) as pool:
        def task(chunk):
            return decode_into(str(pixels_path), chunk, size, 1, max_pixels, read=files.__getitem__)

        parts = list(pool.map(task, [[r] for r in rows]))
    results = [result for part in parts for _, result in part]
    quarantined = frozenset(row for row, result in enumerate(results) if isinstance(result, Quarantined))
    return quarantined, tuple(getattr(result, "sha256", str(result)) for result in results), np.load(pixels_path)


def test_max_pixels_is_the_only_limit_and_the_same_on_8_threads_20_times(tmp_path, monkeypatch):
    """Pillow's own limit, set (as Pillow ships it, or by other code) below some images that
    `max_pixels` allows, must not decide: here 1,000 px, so 40x40 would be a DecompressionBombWarning
    and 60x60 a DecompressionBombError. Only images above MAX_PIXELS are quarantined, every run."""
    files = [_encode(Image.fromarray(np.resize(pattern(k % 3, k), (h, w)), "L")) for k, (w, h) in enumerate(SIZES * 2)]
    expected = frozenset(row for row, (w, h) in enumerate(SIZES * 2) if w * h > MAX_PIXELS)
    outcomes = set()
    for run in range(20):
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1_000)
        outcomes.add(_decode_on_threads(tmp_path, files, run)[:2])
    assert len(outcomes) == 1, "the same files gave different results on different runs"
    (quarantined, _), = outcomes
    assert quarantined == expected


def test_decoding_leaves_the_process_wide_warning_filters_alone(tmp_path, monkeypatch):
    """`warnings.catch_warnings` and `simplefilter` change filters for every thread at once."""
    callers = []

    def recording(original):
        def wrapper(*args, **kwargs):
            callers.append(sys._getframe(1).f_globals.get("__name__", ""))
            return original(*args, **kwargs)

        return wrapper

    for name in ("catch_warnings", "simplefilter", "filterwarnings"):
        monkeypatch.setattr(warnings, name, recording(getattr(warnings, name)))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", PILLOW_DEFAULT_LIMIT)
    files = [_encode(Image.fromarray(pattern(0, k), "L")) for k in range(4)]
    quarantined, _, _ = _decode_on_threads(tmp_path, files, 0)
    assert not quarantined
    assert [c for c in callers if c.startswith("mlpipe")] == []


def test_an_image_above_pillows_default_limit_decodes_under_a_raised_max_pixels(tmp_path, monkeypatch):
    """Field case 4: 9500 x 9500 = 90.25 Mpx, above Pillow's 89,478,485, decoded the way ingest
    decodes (threads, `decode_into`) with max_pixels 200 M; quarantined with the default 40 M.
    Pillow's limit is set to its shipped value first."""
    img = Image.fromarray(pattern(0, 1), "L").resize((9500, 9500), Image.Resampling.NEAREST)
    data = _encode(img, compress_level=1)
    del img
    assert 9500 * 9500 > PILLOW_DEFAULT_LIMIT
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", PILLOW_DEFAULT_LIMIT)
    quarantined, _, pixels = _decode_on_threads(tmp_path, [data], 0, max_pixels=200_000_000, size=32)
    assert not quarantined
    expected = np.asarray(Image.fromarray(pattern(0, 1), "L"))
    assert np.abs(pixels[0, :, :, 0].astype(int) - expected).mean() < 8  # the same picture, shrunk back
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", PILLOW_DEFAULT_LIMIT)
    with pytest.raises(Quarantined, match="over the pixel limit"):
        decode(data, 32, 1, 40_000_000)
