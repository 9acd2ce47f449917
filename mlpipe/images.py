"""Decoding one image file: bytes in, normalized pixels and content hashes out, or a reason.

Pure functions of the file's bytes, so ingest can run them on a thread pool (Pillow releases
the GIL while it decodes and resizes).
"""

from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# Perceptual hashes of tiny images say little: an 8x8 scan of a "1" hashes like every other "1".
MIN_SIDE_FOR_PHASH = 32


class Quarantined(Exception):
    """An image that cannot be used; the message is the reason recorded for its row."""


@dataclass(frozen=True)
class Decoded:
    pixels: np.ndarray  # H x W x C uint8 at training resolution
    sha256: str  # of the normalized full-resolution pixels (not the file: re-encodings match)
    phash: int | None  # 64-bit perceptual hash, None for images too small to hash meaningfully
    source_mode: str


def decode(data: bytes, image_size: int, channels: int, max_pixels: int) -> Decoded:
    if not data:
        raise Quarantined("empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                if img.width * img.height > max_pixels:  # checked on the header, before decoding
                    raise Quarantined("over the pixel limit")
                img.load()
                source_mode = img.mode
                normalized = normalize_mode(ImageOps.exif_transpose(img), channels)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise Quarantined("over the pixel limit") from None
    except UnidentifiedImageError:
        raise Quarantined("not an image") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:  # truncated or corrupt data
        raise Quarantined(f"truncated or corrupt ({type(exc).__name__})") from None
    native = np.asarray(normalized)
    digest = hashlib.sha256(f"{native.shape}".encode() + native.tobytes()).hexdigest()
    resized = np.asarray(normalized.resize((image_size, image_size), Image.Resampling.BILINEAR))
    return Decoded(
        pixels=resized[:, :, None] if resized.ndim == 2 else resized,
        sha256=digest,
        phash=perceptual_hash(normalized),
        source_mode=source_mode,
    )


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
    return img.convert("L" if channels == 1 else "RGB")


def perceptual_hash(img: Image.Image) -> int | None:
    if min(img.size) < MIN_SIDE_FOR_PHASH:
        return None
    import imagehash  # imported lazily: scipy's import costs a second

    return int(str(imagehash.phash(img)), 16)
