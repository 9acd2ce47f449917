"""Decoding image files: bytes in, normalized pixels and content hashes out, or a reason.

`decode_into` is what ingest's workers run over a chunk of files: it writes pixels straight
into the memory-mapped cache and sends back only hashes, so arrays never cross a pipe.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# Perceptual hashes of tiny images say little: an 8x8 scan of a "1" hashes like every other "1".
MIN_SIDE_FOR_PHASH = 32
PHASH_SIDE, PHASH_BITS = 32, 8


class Quarantined(Exception):
    """An image that cannot be used; the message is the reason recorded for its row."""


@dataclass(frozen=True)
class Decoded:
    pixels: np.ndarray  # H x W x C uint8 at training resolution
    sha256: str  # of the normalized decoded pixels (JPEG: at its decode scale), not of the file bytes
    thumb: np.ndarray | None  # 32x32 grayscale for the perceptual hash; None when too small to hash
    source_mode: str


class Summary(NamedTuple):
    """What a worker sends back for a decoded image; its pixels went to the memmap."""

    sha256: str
    phash: int | None
    source_mode: str


def decode(data: bytes, image_size: int, channels: int, max_pixels: int) -> Decoded:
    """Decode one file's bytes. Callers turn Pillow's DecompressionBombWarning into an error
    around their loop (`decode_into` does): set per image, it costs as much as a small PNG's hash."""
    if not data:
        raise Quarantined("empty file")
    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.width * img.height > max_pixels:  # checked on the header, before decoding
                raise Quarantined("over the pixel limit")
            if img.format == "JPEG":  # libjpeg decodes at 1/2, 1/4 or 1/8 scale, never below the target
                img.draft(None, (image_size, image_size))
            img.load()
            source_mode = img.mode
            ImageOps.exif_transpose(img, in_place=True)  # in place: no copy when nothing turns
            normalized = normalize_mode(img, channels)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise Quarantined("over the pixel limit") from None
    except UnidentifiedImageError:
        raise Quarantined("not an image") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:  # truncated or corrupt data
        raise Quarantined(f"truncated or corrupt ({type(exc).__name__})") from None
    raw = normalized.tobytes()  # one copy out of Pillow, shared by the hash and (often) the pixels
    width, height = normalized.size
    depth = len(normalized.getbands())
    digest = hashlib.sha256(f"({height}, {width}, {depth})".encode() + raw).hexdigest()
    if normalized.size == (image_size, image_size):
        small, resized = normalized, np.frombuffer(raw, np.uint8).reshape(height, width, depth)
    else:  # reducing_gap: box-reduce first, then resample; same look, a fraction of the time
        small = normalized.resize((image_size, image_size), Image.Resampling.BILINEAR, reducing_gap=3.0)
        resized = np.frombuffer(small.tobytes(), np.uint8).reshape(image_size, image_size, depth)
    # The hash of the training-resolution image when that is large enough: the perceptual hash
    # only looks at a 32x32 thumbnail, and shrinking 224 px costs less than shrinking 4,000 px.
    if small is normalized and depth == 1 and small.size == (PHASH_SIDE, PHASH_SIDE):
        thumb = resized[:, :, 0]
    else:
        thumb = phash_thumbnail(small if image_size >= MIN_SIDE_FOR_PHASH else normalized)
    return Decoded(pixels=resized, sha256=digest, thumb=thumb, source_mode=source_mode)


def decode_into(pixels_path: str, rows: list[tuple[int, object]], image_size: int, channels: int, max_pixels: int,
                read=None) -> list[tuple[int, Summary | Quarantined]]:  # fmt: skip
    """Decode `(row, path)` pairs, write each image's pixels into row `row` of the memory-mapped
    cache, and return (row, hashes) or (row, reason). Perceptual hashes are computed here too,
    for the whole chunk at once, so that the work is spread over the workers.

    Runs in worker processes (local files) or threads (`read` given, for other filesystems).
    """
    cache = np.load(pixels_path, mmap_mode="r+")
    results: list[tuple[int, Decoded | Quarantined]] = []
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        for row, item in rows:
            if isinstance(item, Quarantined):
                results.append((row, item))
                continue
            try:
                if read is None:
                    with open(item, "rb") as f:
                        data = f.read()
                else:
                    data = read(item)
                decoded = decode(data, image_size, channels, max_pixels)
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


def normalize_mode(img: Image.Image, channels: int) -> Image.Image:
    """Any Pillow mode to 8-bit L (channels=1) or RGB (channels=3).

    16-bit and 32-bit integer images are scaled by their type's range (not clipped, which would
    turn most 16-bit scans white); alpha is composited over black; palette images are expanded
    with their transparency; CMYK goes through Pillow's conversion.
    """
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
    if img.mode in ("RGBA", "LA", "PA"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        img = Image.alpha_composite(background, rgba).convert("RGB")
    target = "L" if channels == 1 else "RGB"
    return img if img.mode == target else img.convert(target)


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
