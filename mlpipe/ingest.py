"""ingest: a manifest of image paths in, a validated, content-addressed snapshot out.

Every row ends in exactly one of three places: kept, quarantined (with a reason), or dropped as
an exact duplicate of a kept row (with the row it duplicates). `rows_in == kept + quarantined +
duplicates` is checked, not hoped for. Each image is decoded once, here, into one uint8 array at
training resolution that every later stage reads.

Reasons and reports name rows by their manifest position, never by path: raw file names often
hold a person's name, and ingest runs before anonymization.
"""

from __future__ import annotations

import hashlib
import warnings
from collections import Counter
from pathlib import Path, PurePosixPath

import numpy as np
import pandas as pd
from PIL import Image, ImageOps, UnidentifiedImageError

from mlpipe.config import IngestConfig, SourceConfig
from mlpipe.errors import MlpipeError
from mlpipe.sample import materialize_sample
from mlpipe.store import StageResult, code_version, stable_hash, stage_dir, state_dir, write_json

ROW, SHA, PIXEL_INDEX = "__row", "__sha256", "__pixel_index"


class Quarantined(Exception):
    """An image that cannot be used; the message is the reason recorded for its row."""


def resolve_source(source: SourceConfig) -> Path:
    uri = source.uri
    if uri == "sample://digits":
        return materialize_sample(state_dir() / "sample")
    if uri.startswith("file://"):
        uri = uri.removeprefix("file://")
    elif "://" in uri:
        raise MlpipeError(f"unsupported source scheme in '{uri}' (supported: a directory, file://, sample://digits)")
    root = Path(uri).expanduser()
    if not root.is_dir():
        raise MlpipeError(f"source directory not found: {uri}")
    return root.resolve()


def read_manifest(root: Path, source: SourceConfig) -> pd.DataFrame:
    path = root / source.manifest
    if not path.is_file():
        raise MlpipeError(f"manifest not found: {source.manifest} in the source directory")
    try:
        # Everything as text: the manifest is data to validate, not to interpret.
        frame = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8")
    except (UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise MlpipeError(f"manifest {source.manifest} is not readable CSV: {type(exc).__name__}") from None
    if source.image_column not in frame.columns:
        raise MlpipeError(
            f"manifest is missing column '{source.image_column}' (source.image_column); it has: {', '.join(frame.columns)}"
        )
    reserved = {ROW, SHA, PIXEL_INDEX} & set(frame.columns)
    if reserved:
        raise MlpipeError(f"manifest uses reserved column name(s): {', '.join(sorted(reserved))}")
    return frame


def manifest_sha256(root: Path, source: SourceConfig) -> str:
    return hashlib.sha256((root / source.manifest).read_bytes()).hexdigest()


def ingest(source: SourceConfig, config: IngestConfig) -> StageResult:
    root = resolve_source(source)
    frame = read_manifest(root, source)
    manifest_digest = manifest_sha256(root, source)

    pixels, kept_rows, hashes = [], [], []
    quarantine: list[tuple[int, str]] = []
    duplicates: list[tuple[int, int, str]] = []
    first_row_of: dict[str, int] = {}
    for row, rel in enumerate(frame[source.image_column]):
        try:
            native, resized = decode_image(root, rel, config)
        except Quarantined as why:
            quarantine.append((row, str(why)))
            continue
        digest = hashlib.sha256(f"{native.shape}".encode() + native.tobytes()).hexdigest()
        if digest in first_row_of:
            duplicates.append((row, first_row_of[digest], digest[:16]))
            continue
        first_row_of[digest] = row
        kept_rows.append(row)
        hashes.append(digest)
        pixels.append(resized)

    rows_in = len(frame)
    if len(kept_rows) + len(quarantine) + len(duplicates) != rows_in:  # the accounting must close
        raise MlpipeError("ingest lost rows: kept + quarantined + duplicates != rows in manifest")
    reasons = Counter(reason for _, reason in quarantine)
    if not kept_rows:
        summary = ", ".join(f"{n} {r}" for r, n in reasons.most_common()) or "empty manifest"
        raise MlpipeError(f"no usable images after quarantine: all {rows_in} rows were rejected ({summary})")

    # Only positions and hashes are kept: the snapshot holds no copy of the manifest's personal
    # data. Anonymize re-reads the manifest and checks it against `manifest_sha256`.
    items = pd.DataFrame({ROW: kept_rows, SHA: hashes, PIXEL_INDEX: np.arange(len(kept_rows))})
    fingerprint = stable_hash(manifest_digest, hashes, quarantine, config)[:16]
    report = {
        "rows_in": rows_in,
        "kept": len(kept_rows),
        "quarantined": len(quarantine),
        "duplicates": len(duplicates),
        "quarantine_reasons": dict(reasons),
        "fingerprint": fingerprint,
        "manifest_sha256": manifest_digest,
        "image_shape": list(pixels[0].shape),
        "columns": [c for c in frame.columns],
    }
    key = stable_hash(fingerprint, code_version("mlpipe.ingest"))[:16]
    with stage_dir("ingest", key) as out:
        np.save(out / "pixels.npy", np.stack(pixels))
        items.to_parquet(out / "items.parquet", index=False)
        pd.DataFrame(quarantine, columns=["row", "reason"]).to_csv(out / "quarantine.csv", index=False)
        pd.DataFrame(duplicates, columns=["row", "duplicate_of_row", "sha256_prefix"]).to_csv(
            out / "duplicates.csv", index=False
        )
        write_json(out / "report.json", report)
    return StageResult.at("ingest", key, report)


def decode_image(root: Path, rel: str, config: IngestConfig) -> tuple[np.ndarray, np.ndarray]:
    """(native pixels, pixels at training resolution) in the configured channel layout."""
    path = safe_path(root, rel)
    mode = "L" if config.channels == 1 else "RGB"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                if img.width * img.height > config.max_pixels:
                    raise Quarantined("over the pixel limit")
                img.load()
                img = ImageOps.exif_transpose(img).convert(mode)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise Quarantined("over the pixel limit") from None
    except UnidentifiedImageError:
        raise Quarantined("not an image") from None
    except (OSError, SyntaxError, ValueError) as exc:  # truncated or corrupt data
        raise Quarantined(f"undecodable ({type(exc).__name__})") from None
    native = np.asarray(img)
    resized = np.asarray(img.resize((config.image_size, config.image_size), Image.Resampling.BILINEAR))
    if resized.ndim == 2:
        resized = resized[:, :, None]
    return native, resized


def safe_path(root: Path, rel: str) -> Path:
    """The file `rel` names inside `root`, or `Quarantined` if it is absent or escapes the root."""
    if not rel.strip():
        raise Quarantined("empty path")
    if PurePosixPath(rel).is_absolute() or Path(rel).is_absolute() or (len(rel) > 1 and rel[1] == ":"):
        raise Quarantined("absolute path")
    full = (root / rel).resolve()  # resolves symlinks too, so a link out of the root is caught here
    if not full.is_relative_to(root.resolve()):
        raise Quarantined("path escapes the dataset root")
    if not full.is_file():
        raise Quarantined("missing file")
    return full
