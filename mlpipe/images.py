"""Decoding image files: bytes in, normalized pixels and content hashes out, or a reason.

`decode_into` is what ingest's workers run over a chunk of files: it writes pixels straight
into the memory-mapped cache and sends back only hashes, so arrays never cross a pipe.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from typing import Literal, NamedTuple

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# Perceptual hashes of tiny images say little: an 8x8 scan of a "1" hashes like every other "1".
MIN_SIDE_FOR_PHASH = 32
PHASH_SIDE, PHASH_BITS = 32, 8

Background = Literal["auto", "white", "black"]
BACKGROUND_LEVELS = {"white": 255, "black": 0}  # 8-bit level of the flat colour behind transparent pixels
ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")

# `ingest.max_pixels` is the only pixel limit: `decode` compares width x height from the header
# with it before anything is decoded. Pillow's own check (`MAX_IMAGE_PIXELS`, about 89.5 Mpx: a
# DecompressionBombWarning, an error above twice that) would refuse images the user allowed, and
# making its warning an error takes `warnings.catch_warnings`, process-wide state that threads
# decoding at the same time undo for each other (the quarantine then changed from run to run).
Image.MAX_IMAGE_PIXELS = None


class Quarantined(Exception):
    """An image that cannot be used; the message is the reason recorded for its row."""


@dataclass(frozen=True)
class Decoded:
    pixels: np.ndarray  # H x W x C uint8 at training resolution
    sha256: str  # of the normalized decoded pixels (JPEG: at its decode scale), not of the file bytes
    thumb: np.ndarray | None  # 32x32 grayscale for the perceptual hash; None when too small to hash or not asked for
    source_mode: str


class Summary(NamedTuple):
    """What a worker sends back for a decoded image; its pixels went to the memmap."""

    sha256: str
    phash: int | None
    source_mode: str


def decode(data: bytes, image_size: int, channels: int, max_pixels: int, background: Background = "auto",
           thumbnail: bool = True, frame: int | None = None, window="header", module=None) -> Decoded:  # fmt: skip
    """Decode one file's bytes into `image_size` x `image_size` x `channels` uint8 pixels.

    DICOM (the Part 10 preamble, or `frame` given: the caller knows it is DICOM) goes through
    `mlpipe.dicom.decode_dicom` with `window`, `frame` (None: the first) and `module` (the file's
    `mlpipe.dicom.PixelModule`, if its header was read), then the same mode normalization and
    resize as any image.

    `max_pixels` (width x height, read from the header before decoding) is the only size limit;
    larger images raise `Quarantined("over the pixel limit")`. `background` is what transparent
    pixels are composited over (see `normalize_mode`). `thumbnail=False` skips the perceptual
    hash's thumbnail (serving needs no deduplication). Raises `Quarantined` with the reason for
    empty, unidentifiable, truncated or corrupt data. Touches no `warnings` state, so the same
    bytes give the same result on any thread, every time.
    """
    if not data:
        raise Quarantined("empty file")
    if frame is not None or data[128:132] == b"DICM":
        from mlpipe.dicom import decode_dicom  # lazy: pydicom loads only for DICOM

        array, mode = decode_dicom(data, frame, window, max_pixels, module)
        img = Image.fromarray(array, mode="L" if array.ndim == 2 else "RGB")
        return _to_training_size(normalize_mode(img, channels, background), image_size, mode, thumbnail)
    if Image.MAX_IMAGE_PIXELS is not None:  # set again by other code in this process: max_pixels decides
        Image.MAX_IMAGE_PIXELS = None
    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.width * img.height > max_pixels:  # checked on the header, before decoding
                raise Quarantined("over the pixel limit")
            if img.format == "JPEG":  # libjpeg decodes at 1/2, 1/4 or 1/8 scale, never below the target
                img.draft(None, (image_size, image_size))
            img.load()
            source_mode = img.mode
            ImageOps.exif_transpose(img, in_place=True)  # in place: no copy when nothing turns
            normalized = normalize_mode(img, channels, background)
    except Image.DecompressionBombError:  # only if Pillow's limit was set again while this image opened
        raise Quarantined("over the pixel limit") from None
    except UnidentifiedImageError:
        raise Quarantined("not an image") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:  # truncated or corrupt data
        raise Quarantined(f"truncated or corrupt ({type(exc).__name__})") from None
    return _to_training_size(normalized, image_size, source_mode, thumbnail)


# uint8 arrays users hand to the serving model: H x W (grayscale), H x W x 1, 3 (RGB) or 4 (RGBA).
ARRAY_MODES = {1: "L", 3: "RGB", 4: "RGBA"}


def decode_array(array: np.ndarray, image_size: int, channels: int, max_pixels: int,
                 background: Background = "auto", thumbnail: bool = True) -> Decoded:  # fmt: skip
    """An in-memory uint8 image (H x W, or H x W x 1/3/4 channels: L, RGB, RGBA) through the
    same mode normalization and resize as `decode`, so an array and its PNG give equal pixels.
    Raises `Quarantined` for another dtype, rank or channel count, or above `max_pixels`."""
    array = np.asarray(array)
    if array.dtype != np.uint8 or array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in ARRAY_MODES):
        raise Quarantined(f"not an image array (dtype {array.dtype}, shape {array.shape}; "
                          "want uint8 H x W or H x W x 1, 3 or 4)")  # fmt: skip
    if array.shape[0] * array.shape[1] > max_pixels:
        raise Quarantined("over the pixel limit")
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise Quarantined("empty image")
    mode = "L" if array.ndim == 2 else ARRAY_MODES[array.shape[2]]
    img = Image.fromarray(np.ascontiguousarray(array[:, :, 0] if array.ndim == 3 and mode == "L" else array), mode=mode)
    return _to_training_size(normalize_mode(img, channels, background), image_size, mode, thumbnail)


def _to_training_size(normalized: Image.Image, image_size: int, source_mode: str, thumbnail: bool = True) -> Decoded:
    """A mode-normalized image resized to the training resolution, with its content hash and
    (`thumbnail`) the perceptual hash's thumbnail. The one resize ingest and serving share."""
    raw = normalized.tobytes()  # one copy out of Pillow, shared by the hash and (often) the pixels
    width, height = normalized.size
    depth = len(normalized.getbands())
    digest = hashlib.sha256(f"({height}, {width}, {depth})".encode() + raw).hexdigest()
    if normalized.size == (image_size, image_size):
        small, resized = normalized, np.frombuffer(raw, np.uint8).reshape(height, width, depth)
    else:  # reducing_gap: box-reduce first, then resample; same look, a fraction of the time
        small = normalized.resize((image_size, image_size), Image.Resampling.BILINEAR, reducing_gap=3.0)
        resized = np.frombuffer(small.tobytes(), np.uint8).reshape(image_size, image_size, depth)
    if not thumbnail:
        thumb = None
    # The hash of the training-resolution image when that is large enough: the perceptual hash
    # only looks at a 32x32 thumbnail, and shrinking 224 px costs less than shrinking 4,000 px.
    elif small is normalized and depth == 1 and small.size == (PHASH_SIDE, PHASH_SIDE):
        thumb = resized[:, :, 0]
    else:
        thumb = phash_thumbnail(small if image_size >= MIN_SIDE_FOR_PHASH else normalized)
    return Decoded(pixels=resized, sha256=digest, thumb=thumb, source_mode=source_mode)


def decode_into(pixels_path: str, rows: list[tuple[int, object]], image_size: int, channels: int, max_pixels: int,
                background: Background = "auto", read=None, window="header") -> list[tuple[int, Summary | Quarantined]]:  # fmt: skip
    """Decode `(row, path)` pairs (`(row, (path, frame))` for a DICOM frame), write each image's pixels into row `row` of the memory-mapped
    cache, and return (row, hashes) or (row, reason). Perceptual hashes are computed here too,
    for the whole chunk at once, so that the work is spread over the workers.

    Runs in worker processes (local files) or threads (`read` given, for other filesystems); it
    shares no state between calls, so the outcome does not depend on which thread ran what.
    """
    cache = np.load(pixels_path, mmap_mode="r+")
    results: list[tuple[int, Decoded | Quarantined]] = []
    for row, item in rows:
        if isinstance(item, Quarantined):
            results.append((row, item))
            continue
        path, frame = item if isinstance(item, tuple) else (item, None)
        try:
            if read is None:
                with open(path, "rb") as f:
                    data = f.read()
            else:
                data = read(path)
            module = None
            if frame is not None:  # a DICOM frame: its header was read (and its PixelModule kept) before
                from mlpipe.dicom import pixel_module

                module = pixel_module(path)
            decoded = decode(data, image_size, channels, max_pixels, background, frame=frame, window=window, module=module)
        except Quarantined as why:
            results.append((row, why))
            continue
        except OSError:
            results.append((row, Quarantined("unreadable file")))
            continue
        cache[row] = decoded.pixels
        results.append((row, decoded))
    cache.flush()
    del cache
    thumbs = [d.thumb for _, d in results if isinstance(d, Decoded) and d.thumb is not None]
    hashes = iter(perceptual_hashes(np.stack(thumbs)) if thumbs else [])
    return [
        (row, Summary(d.sha256, next(hashes) if d.thumb is not None else None, d.source_mode))
        if isinstance(d, Decoded) else (row, d)
        for row, d in results
    ]  # fmt: skip


def normalize_mode(img: Image.Image, channels: int, background: Background = "auto") -> Image.Image:
    """Any Pillow mode to 8-bit L (channels=1) or RGB (channels=3), same width and height.

    16-bit and 32-bit integer images are scaled by their type's range (not clipped, which would
    turn most 16-bit scans white); CMYK, YCbCr and the rest go through Pillow's conversion.
    Transparency of every kind (an alpha band: RGBA, LA, PA; a palette's tRNS alphas or
    transparent index; a PNG colour key in L, RGB, 1 or 16-bit images, `img.info["transparency"]`)
    is composited over a flat background (`flatten_alpha`), so what the picture shows stays visible.
    """
    key_alpha = _colour_key_alpha(img)  # before any conversion: the key is in the file's own values
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        array = np.asarray(img)
        scale = 65535.0 if img.mode.startswith("I;16") or (img.mode == "I" and array.max(initial=0) <= 65535) else None
        if scale is None:  # 32-bit: stretch the observed range
            low, high = float(array.min(initial=0)), float(array.max(initial=0))
            array = (array - low) / max(high - low, 1e-12) * 255.0
        else:
            array = array.astype(np.float64) / scale * 255.0
        img = Image.fromarray(np.clip(np.rint(array), 0, 255).astype(np.uint8), mode="L")
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    elif img.mode in ("PA", "RGBa", "La"):
        img = img.convert("RGBA")
    elif key_alpha is not None:
        img = img.convert("L" if img.mode in ("1", "L") else "RGB")
        img.putalpha(key_alpha)  # L -> LA, RGB -> RGBA
    if img.mode in ("RGBA", "LA"):
        img = flatten_alpha(img, background)
    target = "L" if channels == 1 else "RGB"
    return img if img.mode == target else img.convert(target)


def flatten_alpha(img: Image.Image, background: Background = "auto") -> Image.Image:
    """An RGBA (LA) image composited over a flat colour: RGB (L), same size, 8-bit.

    `background`: "white" (255), "black" (0), or "auto": white when the visible pixels are dark,
    black otherwise. "Dark" means the alpha-weighted mean luminance (ITU-R 601, 0-255) of the
    colour under the alpha is below 128, so black ink on a transparent canvas lands on white and
    white ink on black; an image with nothing visible (alpha 0 everywhere) gets black. Fully
    opaque images come back unchanged whatever the setting.
    """
    alpha = img.getchannel("A")
    colour = img.convert("RGB" if img.mode == "RGBA" else "L")  # drops alpha, keeps the colour under it
    low, _ = alpha.getextrema()
    if low == 255:
        return colour
    level = _auto_background(colour, alpha) if background == "auto" else BACKGROUND_LEVELS[background]
    fill = level if colour.mode == "L" else (level, level, level)
    return Image.composite(colour, Image.new(colour.mode, colour.size, fill), alpha)


def _auto_background(colour: Image.Image, alpha: Image.Image) -> int:
    """255 (white) when the alpha-weighted mean luminance of `colour` is below 128, else 0."""
    luma = np.asarray(colour if colour.mode == "L" else colour.convert("L"))
    weights = np.asarray(alpha)
    total_weight = int(weights.sum(dtype=np.uint64))
    if total_weight == 0:
        return 0
    step = max(1, (1 << 20) // max(1, luma.shape[1]))  # about a megapixel at a time: bounded memory on huge scans
    weighted = sum(
        int(np.einsum("ij,ij->", luma[r : r + step], weights[r : r + step], dtype=np.uint64))
        for r in range(0, luma.shape[0], step)
    )
    return 255 if weighted < 128 * total_weight else 0


def _colour_key_alpha(img: Image.Image) -> Image.Image | None:
    """An L alpha mask (0 where the pixel equals the PNG colour key, 255 elsewhere) for a
    non-palette image with `img.info["transparency"]`; None when there is no such key."""
    key = img.info.get("transparency")
    if key is None or isinstance(key, bytes) or img.mode in ("P", *ALPHA_MODES):
        return None
    array = np.asarray(img.convert("L") if img.mode == "1" else img)  # Pillow gives mode 1's key as 0 or 255
    if np.ndim(key) != array.ndim - 2 or (array.ndim == 3 and len(key) != array.shape[2]):  # a level, or one per band
        return None
    match = array == key if array.ndim == 2 else (array == np.asarray(key, dtype=array.dtype)).all(axis=2)
    return Image.fromarray(np.where(match, 0, 255).astype(np.uint8), mode="L")


def phash_thumbnail(img: Image.Image) -> np.ndarray | None:
    """imagehash.phash's first step (grayscale, 32x32 Lanczos); the DCT runs later, batched."""
    if min(img.size) < MIN_SIDE_FOR_PHASH:
        return None
    if img.mode == "L" and img.size == (PHASH_SIDE, PHASH_SIDE):  # already the thumbnail: no copies
        return np.asarray(img)
    return np.asarray(img.convert("L").resize((PHASH_SIDE, PHASH_SIDE), Image.Resampling.LANCZOS))


def perceptual_hashes(thumbs: np.ndarray) -> list[int]:
    """imagehash.phash (hash_size 8) for a batch of 32x32 thumbnails as 64-bit ints.

    The same algorithm as imagehash (2-D DCT-II, the 8x8 lowest frequencies against their
    median), computed for all images at once: per image, imagehash's own call cost 110 us, three
    times the decoding of a small PNG. A test checks equality with imagehash.
    """
    if len(thumbs) == 0:
        return []
    # Only the 8 lowest frequencies are kept, so the 2-D DCT-II is two small matrix products
    # (scipy's unnormalized convention: 2 * sum x[n] cos(pi k (2n + 1) / 2N)).
    n = np.arange(PHASH_SIDE)
    basis = 2.0 * np.cos(np.pi * np.arange(PHASH_BITS)[:, None] * (2 * n[None, :] + 1) / (2 * PHASH_SIDE))
    coeffs = basis @ thumbs.astype(np.float64) @ basis.T  # (8 x 32) (N x 32 x 32) (32 x 8)
    flat = coeffs.reshape(len(thumbs), -1)
    bits = flat > np.median(flat, axis=1, keepdims=True)
    return [int.from_bytes(row.tobytes(), "big") for row in np.packbits(bits, axis=1)]
