"""ingest: any dataset source in, an immutable, validated, decode-once snapshot out.

Every row ends in exactly one of three places: kept, quarantined (with a reason), or removed
as an exact duplicate of a kept row. `rows_in == kept + quarantined + duplicates` is checked,
not hoped for. Each image is decoded once, on a thread pool, into one uint8 array at training
resolution that every later stage reads (memory-mapped). A second run over an unchanged source
decodes nothing: a scan key (listing, sizes, mtimes, config, code) finds the earlier snapshot.

Reports name rows by manifest position, never by path: raw file names often hold a person's
name, and ingest runs before anonymization.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import posixpath
import stat
from collections import Counter
import multiprocessing
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Literal

import fsspec
import numpy as np
import pandas as pd
import pandera.pandas as pa
from PIL import Image
from tqdm import tqdm

from mlpipe.config import (  # IMAGEFOLDER_LABEL: importers of this module name it from here
    AUTO_SAMPLE_IMAGES, IMAGEFOLDER_LABEL, SAMPLE_GROUP_COLUMN, DataFacts, DicomConfig, IngestConfig, PipelineConfig,
    SourceConfig, clamped_side, resolve_auto,
)  # fmt: skip
from mlpipe import dicom
from mlpipe.accounting import check_drop
from mlpipe.errors import MlpipeError
from mlpipe.images import Quarantined, Summary, decode, decode_into
from mlpipe.sample import materialize_sample
from mlpipe.store import StageResult, code_version, final_path, stable_hash, stage_dir, state_dir, write_json

ROW, SHA, PIXEL_INDEX, NEAR_DUP = "__row", "__sha256", "__pixel_index", "__near_dup_group"
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
MANIFEST_SUFFIXES = (".csv", ".parquet", ".jsonl", ".ndjson")
PROCESS_POOL_MIN_IMAGES = 1000  # below this, starting worker processes costs more than it saves


@dataclass
class Source:
    """A dataset root on any fsspec filesystem, with path checks that keep reads inside it."""

    fs: fsspec.AbstractFileSystem
    root: str
    uri: str
    _real_dirs: dict[str, str] = field(default_factory=dict, repr=False)
    _stats: dict[str, tuple[int, str]] = field(default_factory=dict, repr=False)  # from resolve

    @property
    def local(self) -> bool:
        return "file" in self.fs.protocol or "local" in self.fs.protocol

    def _real_dir(self, path: str) -> str:
        # Files share few folders: resolving each folder once keeps symlink checks cheap.
        if path not in self._real_dirs:
            self._real_dirs[path] = os.path.realpath(path)
        return self._real_dirs[path]

    def _inside(self, real: str) -> bool:
        root = self._real_dir(self.root)
        return real == root or real.startswith(root.rstrip("/") + "/")

    def resolve(self, rel: str) -> str:
        """The full path of `rel` inside the root, or `Quarantined` if it is unsafe or absent."""
        if not rel.strip():
            raise Quarantined("empty path")
        posix = rel.replace("\\", "/")
        if posix.startswith("/") or (len(posix) > 1 and posix[1] == ":"):
            raise Quarantined("absolute path")
        normal = posixpath.normpath(posix)
        if normal == ".." or normal.startswith("../"):
            raise Quarantined("path escapes the dataset root")
        full = f"{self.root.rstrip('/')}/{normal}"
        if self.local:  # symlinks, in the folders or the file itself: compare where they really point
            folder, _, name = full.rpartition("/")
            real_folder = self._real_dir(folder)  # cached per folder, and so is its inside-root check
            if not self._inside(real_folder):  # decided before touching anything out there
                raise Quarantined("path escapes the dataset root")
            real = f"{real_folder.rstrip('/')}/{name}"
            try:
                st = os.lstat(real)  # one call answers: link? regular file? size? mtime?
                if stat.S_ISLNK(st.st_mode):
                    real = os.path.realpath(real)
                    st = os.stat(real)
                    if not self._inside(real):
                        raise Quarantined("path escapes the dataset root")
            except OSError:
                raise Quarantined("missing file") from None
            if not stat.S_ISREG(st.st_mode):
                raise Quarantined("missing file")
            self._stats[real] = (st.st_size, str(st.st_mtime_ns))
            return real
        if not self.fs.isfile(full):
            raise Quarantined("missing file")
        return full

    def read(self, full: str) -> bytes:
        if self.local:
            with open(full, "rb") as f:
                return f.read()
        return self.fs.cat_file(full)

    def stat(self, full: str) -> tuple[int, str]:
        """(size, modification time): what decides whether an earlier snapshot can be reused."""
        if full in self._stats:
            return self._stats[full]
        info = self.fs.info(full)
        return int(info.get("size") or 0), str(info.get("mtime") or info.get("created") or "")


def open_source(source: SourceConfig) -> Source:
    if source.uri == "sample://digits":
        root = str(materialize_sample(state_dir() / "sample"))
        return Source(fsspec.filesystem("file"), root, source.uri)
    try:
        fs, root = fsspec.core.url_to_fs(source.uri)
    except (ValueError, ImportError) as exc:
        raise MlpipeError(f"unsupported source '{source.uri}': {exc}") from None
    root = root.rstrip("/") or "/"
    if not fs.isdir(root):
        raise MlpipeError(f"source directory not found: {source.uri}")
    return Source(fs, root, source.uri)


def read_manifest(src: Source, source: SourceConfig, frames: dicom.Frames = "middle") -> tuple[pd.DataFrame, str]:
    """(the manifest as text columns, sha256 of what was read): CSV, Parquet or JSONL, or an
    ImageFolder or DICOM listing. The file is read once; the digest is of those same bytes and,
    when the rows name DICOM files, of the header columns they gain (`with_dicom_headers`;
    `frames` is ingest.dicom.frames).

    Every column is text, the same in every format: a CSV cell as written (`keep_default_na=False`,
    an empty cell is ""); a JSONL value as its JSON text (`_read_jsonl`); a Parquet value as
    Python's `str` of it, integers with nulls included ("0", never "0.0"). Nulls, missing keys
    and NaN are "", like CSV's empty cell. Raises `MlpipeError` for an unreadable manifest.
    """
    source = with_layout(src, source)
    if source.layout in ("imagefolder", "dicom"):
        listing = _imagefolder_listing(src, source)
        return _dicom_rows(src, listing, source, frames, hashlib.sha256(listing.to_csv(index=False).encode()).hexdigest())
    path = posixpath.join(src.root, source.manifest)
    if not src.fs.isfile(path):
        raise MlpipeError(f"manifest not found: {source.manifest} in the source directory")
    suffix = posixpath.splitext(source.manifest)[1].lower()
    try:
        data = src.fs.cat_file(path)
        if suffix == ".parquet":  # nullable dtypes: an integer column with nulls stays integer (Int64), not float
            frame = pd.read_parquet(io.BytesIO(data), dtype_backend="numpy_nullable")
        elif suffix in (".jsonl", ".ndjson"):
            frame = _read_jsonl(data)
        else:  # text as text: the manifest is data to validate, not to interpret
            frame = pd.read_csv(io.BytesIO(data), dtype=str, keep_default_na=False, encoding="utf-8")
        frame.columns = [str(c) for c in frame.columns]
        frame = frame.astype(object).where(frame.notna(), "").astype(str)  # null -> "", as CSV's empty cell
    except Exception as exc:  # noqa: BLE001 - hostile bytes: pyarrow alone raises KeyError, TypeError, ArrowException
        raise MlpipeError(f"manifest {source.manifest} is not readable: {type(exc).__name__}") from None
    if source.image_column not in frame.columns:
        raise MlpipeError(
            f"manifest is missing column '{source.image_column}' (source.image_column); it has: {', '.join(frame.columns)}"
        )
    reserved = {ROW, SHA, PIXEL_INDEX, NEAR_DUP, dicom.FRAME, dicom.DICOM_FILE} & set(frame.columns)
    if reserved:
        raise MlpipeError(f"manifest uses reserved column name(s): {', '.join(sorted(reserved))}")
    return _dicom_rows(src, frame.reset_index(drop=True), source, frames, hashlib.sha256(data).hexdigest())


def _dicom_rows(src: Source, frame: pd.DataFrame, source: SourceConfig, frames: dicom.Frames, digest: str):
    """`with_dicom_headers`, and the digest extended by the header table when there was any DICOM row."""
    frame = with_dicom_headers(src, frame, source, frames)
    if dicom.FRAME not in frame.columns:
        return frame, digest
    headers = frame.drop(columns=[source.image_column]).to_csv(index=False).encode()
    return frame, hashlib.sha256(digest.encode() + headers).hexdigest()


def _dicom_path(src: Source, rel: str, layout: str) -> str | None:
    """The full path of `rel` when it names a DICOM file (the dicom layout; a .dcm-like suffix; no
    image suffix and the DICM preamble), else None. Unsafe or missing paths are None: ingest
    quarantines them with their own reason."""
    suffix = posixpath.splitext(rel)[1].lower()
    if layout != "dicom" and not dicom.has_dicom_suffix(rel) and suffix in IMAGE_SUFFIXES:
        return None
    if not rel or "\x00" in rel or len(rel) > 4096:  # validate_manifest quarantines these rows
        return None
    try:
        full = src.resolve(rel)
    except (Quarantined, ValueError, OSError):  # unsafe, absent, or a name the OS refuses: ingest says why
        return None
    if layout == "dicom" or dicom.has_dicom_suffix(rel):
        return full
    try:
        with src.fs.open(full, "rb") as f:
            return full if dicom.is_dicom(f.read(132)) else None
    except OSError:
        return None


def _read_local_headers(keys: list[tuple[str, int, str]]) -> list[dicom.Header | str]:
    """`dicom.read_header` of local files, in a worker process."""
    return [dicom.read_header(partial(open, key[0], "rb"), key) for key in keys]


def _dicom_headers(src: Source, paths: list[str | None]) -> list[dicom.Header | str | None]:
    """The header of each path (None for None), from the process's cache where it has them. Many
    local files are read by worker processes (a header is a few milliseconds of Python each)."""
    keys = [None if full is None else (full, *src.stat(full)) for full in paths]
    missing = [key for key in dict.fromkeys(k for k in keys if k is not None) if key not in dicom.cached_headers()]
    if src.local and len(missing) >= PROCESS_POOL_MIN_IMAGES // 5 and (os.cpu_count() or 1) > 1:
        workers = min(8, os.cpu_count() or 1)
        dicom.preload()  # imported once here, not in every worker
        chunks = [missing[i : i + 64] for i in range(0, len(missing), 64)]
        with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("fork")) as pool:
            for chunk, headers in zip(chunks, pool.map(_read_local_headers, chunks), strict=True):
                dicom.remember_headers(dict(zip(chunk, headers, strict=True)))
    opener = open if src.local else src.fs.open
    return [None if key is None else dicom.read_header(partial(opener, key[0], "rb"), key) for key in keys]


def with_dicom_headers(src: Source, frame: pd.DataFrame, source: SourceConfig, frames: dicom.Frames = "middle") -> pd.DataFrame:
    """`frame` with, for rows that name DICOM files, every header attribute as a text column
    (`mlpipe.dicom.header_of`; "" where a file lacks it), the hidden columns `__frame` (the frame
    this row decodes; "" for other rows) and `__dicom_file` (the first row of its file), and a
    multi-frame file's row repeated per frame when `frames` is "all". Unchanged when no row names
    a DICOM file. Raises `MlpipeError` when a header keyword is already a manifest column."""
    paths = [_dicom_path(src, rel, source.layout) for rel in frame[source.image_column]]
    if not any(paths):
        return frame
    headers = _dicom_headers(src, paths)
    keywords = list(dict.fromkeys(k for h in headers if isinstance(h, dicom.Header) for k in h.columns))
    clash = sorted(set(keywords) & set(frame.columns))
    if clash:
        raise MlpipeError(f"manifest column(s) {', '.join(clash)} have the name of a DICOM attribute its files carry; "
                          "rename them (the header's value becomes that column)")  # fmt: skip
    repeat, frame_of, header_table = [], [], {k: [] for k in keywords}
    for row, header in enumerate(headers):
        if header is None:
            indices: list[int | None] = [None]
        elif isinstance(header, str):  # unreadable header: one row; decoding names the reason
            indices = [0]
        else:
            indices = list(dicom.frame_indices(header.frames, frames))
        for index in indices:
            repeat.append(row)
            frame_of.append("" if index is None else str(index))
            for k in keywords:
                header_table[k].append(header.columns.get(k, "") if isinstance(header, dicom.Header) else "")
    out = frame.iloc[repeat].reset_index(drop=True)
    out = pd.concat([out, pd.DataFrame(header_table, dtype=object).astype(str)], axis=1)
    first_row = pd.Series(range(len(repeat))).groupby(pd.Series(repeat)).transform("min")
    out[dicom.FRAME] = frame_of
    out[dicom.DICOM_FILE] = [str(first_row[i]) if frame_of[i] != "" else "" for i in range(len(repeat))]
    out.attrs["dicom_columns"] = keywords
    out.attrs["dicom_dropped"] = {
        "private_tags": sum(h.private_tags for h in headers if isinstance(h, dicom.Header)),
        "sequences": sum(h.sequences for h in headers if isinstance(h, dicom.Header)),
    }
    return out


class _JsonFloat(float):
    """A JSON number with a fraction or exponent that remembers how it was written ("0.50", "1e3")."""

    text: str

    def __new__(cls, text: str) -> _JsonFloat:
        number = super().__new__(cls, text)
        number.text = text
        return number


_JSON_CONSTANTS = {"NaN": None, "Infinity": "inf", "-Infinity": "-inf"}  # NaN is a null, as in Parquet and pandas


def _json_text(value: object) -> str | None:
    """A top-level JSON value as manifest text: strings as they are, numbers as written
    (0 -> "0", 0.5 -> "0.5", 1.0 -> "1.0", 1e3 -> "1e3"), true/false as written, null -> None (""), NaN -> None,
    +-Infinity -> "inf"/"-inf", arrays and objects as compact JSON."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, _JsonFloat):
        return value.text
    if isinstance(value, int):
        return str(value)
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _read_jsonl(data: bytes) -> pd.DataFrame:
    """JSON Lines (one object per non-blank line, UTF-8) as text columns, in first-seen key order,
    without pandas' type inference: a column of integers with nulls stays "0", "1", "2" (pandas
    reads it as float, "0.0"). A missing key or null is None (made "" by the caller). Raises
    ValueError for a line that is not a JSON object or a string that is not valid Unicode
    (a lone surrogate escape), RecursionError for absurd nesting."""
    records = []
    # split("\n"), not splitlines(): U+2028 and friends may sit inside a JSON string
    for number, line in enumerate(data.decode("utf-8-sig").split("\n"), start=1):
        if not line.strip():
            continue
        record = json.loads(line, parse_float=_JsonFloat, parse_constant=_JSON_CONSTANTS.__getitem__)
        if not isinstance(record, dict):
            raise ValueError(f"line {number} is not a JSON object")
        records.append({key: _json_text(value) for key, value in record.items()})
    columns = list(dict.fromkeys(key for record in records for key in record))
    table = {key: [record.get(key) for record in records] for key in columns}
    for key, values in table.items():  # lone surrogates ("\udc80") parse, but no file system or Parquet takes them
        (key + "".join(v for v in values if v is not None)).encode("utf-8")
    return pd.DataFrame(table, columns=columns, dtype=object)


def with_layout(src: Source, source: SourceConfig) -> SourceConfig:
    """`source` with layout auto decided (any other value is returned unchanged): manifest when
    the root holds `source.manifest` (sample://digits does), else imagefolder when a subfolder
    of the root holds an image or DICOM file, else dicom when the root itself holds DICOM files.
    Raises MlpipeError, in one line, when it is none of them."""
    if source.layout != "auto":
        return source
    try:
        if src.fs.isfile(posixpath.join(src.root, source.manifest)):
            return source.model_copy(update={"layout": "manifest"})
        entries = sorted(src.fs.ls(src.root, detail=True), key=lambda e: e["name"])
        for entry in entries:
            if entry["type"] == "directory" and any(
                _listed(src, path, "imagefolder") for path in src.fs.find(entry["name"])
            ):
                return source.model_copy(update={"layout": "imagefolder"})
        if any(entry["type"] == "file" and _listed(src, entry["name"], "dicom") for entry in entries):
            return source.model_copy(update={"layout": "dicom"})
    except OSError as err:  # no permission, a storage error: one line, not a traceback
        raise MlpipeError(f"the source directory cannot be listed ({type(err).__name__}: {err.strerror or 'unreadable'})") from None
    tables = [posixpath.basename(e["name"]) for e in entries
              if e["type"] == "file" and e["name"].lower().endswith(MANIFEST_SUFFIXES)]  # fmt: skip
    hint = f"; it holds {', '.join(tables[:3])}: set source.manifest" if tables else ""
    raise MlpipeError(f"manifest not found: {source.manifest} in the source directory, nor a class folder of images "
                      f"(root/<class>/<image>), nor DICOM files, for source.layout auto{hint}")  # fmt: skip


def _listed(src: Source, path: str, layout: str) -> bool:
    """Whether a listing for `layout` takes the file at `path`: imagefolder takes images and DICOM
    files, dicom only DICOM files. DICOM: a .dcm-like suffix, or no suffix and the DICM preamble."""
    name = posixpath.basename(path)
    suffix = posixpath.splitext(name)[1].lower()
    if dicom.has_dicom_suffix(name) or (layout == "imagefolder" and suffix in IMAGE_SUFFIXES):
        return True
    if suffix or name.startswith("."):
        return False
    try:
        with src.fs.open(path, "rb") as f:
            return dicom.is_dicom(f.read(132))
    except OSError:
        return False


def layout_of(source: SourceConfig) -> str:
    """source.layout, auto decided by `with_layout` (opens the source only for auto)."""
    return source.layout if source.layout != "auto" else with_layout(open_source(source), source).layout


def _imagefolder_listing(src: Source, source: SourceConfig) -> pd.DataFrame:
    """`root/<class>/.../file` -> rows (image, class); files outside a class folder are listed too,
    with an empty class, and so are symlinked folders, so that they are quarantined rather than ignored
    (the dicom layout lists only DICOM files, and a file outside a folder is fine there)."""
    rows = []
    for full, info in sorted(src.fs.find(src.root, detail=True).items()):
        rel = posixpath.relpath(full, src.root)
        linked_folder = bool(info.get("islink")) and src.fs.isdir(full)  # never walked: listed, so resolve refuses it
        if linked_folder or _listed(src, full, source.layout):
            rows.append({source.image_column: rel,
                         IMAGEFOLDER_LABEL: rel.split("/")[0] if "/" in rel or linked_folder else ""})  # fmt: skip
    return pd.DataFrame(rows, columns=[source.image_column, IMAGEFOLDER_LABEL])


def validate_manifest(frame: pd.DataFrame, source: SourceConfig) -> tuple[dict[int, str], list[dict]]:
    """pandera, lazily: every failing row and check. Returns ({row: reason}, failure cases).

    Failure cases name row, column and check, never the value (it may be personal data).
    """
    column = source.image_column
    checks = [
        pa.Check.str_length(min_value=1, max_value=4096, error="path length 1-4096"),
        pa.Check(lambda s: ~s.str.contains("\x00", regex=False), element_wise=False, error="no NUL byte"),
    ]
    if source.layout == "imagefolder":
        schema = pa.DataFrameSchema({column: pa.Column(str, checks),
                                     IMAGEFOLDER_LABEL: pa.Column(str, pa.Check.str_length(min_value=1, error="in a class folder"))})  # fmt: skip
    else:
        schema = pa.DataFrameSchema({column: pa.Column(str, checks)})
    try:
        schema.validate(frame, lazy=True)
        return {}, []
    except pa.errors.SchemaErrors as err:
        cases = err.failure_cases
    failures = [
        {"row": None if pd.isna(c["index"]) else int(c["index"]), "column": c["column"], "check": str(c["check"])}
        for c in cases.to_dict(orient="records")
    ]
    return {f["row"]: f"invalid manifest row ({f['check']})" for f in reversed(failures) if f["row"] is not None}, failures


def source_fingerprint(source: SourceConfig, frames: dicom.Frames = "middle") -> str:
    """What a snapshot of `source` depends on, without decoding anything: the manifest's bytes,
    each row's validity, and the size and modification time of every file it lists. Prefect's
    cache key for ingest, and the library's own."""
    src = open_source(source)
    source = with_layout(src, source)
    frame, digest = read_manifest(src, source, frames)
    invalid, _ = validate_manifest(frame, source)
    return _fingerprint(src, source, digest, _check_paths(src, frame, source, invalid))


def _fingerprint(src: Source, source: SourceConfig, digest: str, checked: list) -> str:
    stats = [src.stat(c) if isinstance(c, str) else (*src.stat(c[0]), c[1]) if isinstance(c, tuple) else str(c)
             for c in checked]  # fmt: skip
    return stable_hash(digest, stats, source.layout, source.image_column)[:16]


def _check_paths(src: Source, frame: pd.DataFrame, source: SourceConfig, invalid: dict) -> list:
    """Per row: its full path, (full path, frame) for a DICOM row, or `Quarantined` with the reason."""
    checked: list = []
    frames = frame[dicom.FRAME].tolist() if dicom.FRAME in frame.columns else [""] * len(frame)
    for row, rel in enumerate(frame[source.image_column]):
        if row in invalid:
            checked.append(Quarantined(invalid[row]))
            continue
        try:
            full = src.resolve(rel)
            checked.append((full, int(frames[row])) if frames[row] != "" else full)
        except Quarantined as why:
            checked.append(why)
    return checked


# --- what auto values are decided from ---------------------------------------------------------

COLOUR_LEVELS = 8  # a pixel is coloured when its R, G and B spread over more than this many levels (of 255) ...
COLOUR_SHARE = 0.01  # ... and an image has colour when at least this share of its pixels is coloured
COLOUR_PROBE_SIDE = 32  # images are judged at this side (bilinear): JPEG's chroma noise averages out
GRAY_MODES = {"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"}  # Pillow modes without colour


@dataclass
class SampledImage:
    """One sampled row: its manifest position, header size (width, height) and mode, whether it
    has colour (None: not decoded), and the reason it cannot be used (ingest's words), if any."""

    row: int
    size: tuple[int, int] | None = None
    mode: str | None = None
    colour: bool | None = None
    problem: str | None = None


@dataclass
class Detection:
    """What `detect` read from a sample of the source. Rows are manifest positions, never paths."""

    layout: Literal["manifest", "imagefolder", "dicom"]
    rows: int
    images: list[SampledImage]
    dicom: bool = False  # the rows name DICOM files (header columns)
    dicom_group: str | None = None  # the header attribute to group DICOM items by (`dicom_group_column`)

    def sides(self) -> list[int]:
        """max(width, height) in pixels of every sampled image whose header was read within the pixel limit."""
        return [max(i.size) for i in self.images if i.size is not None and i.problem != "over the pixel limit"]

    def facts(self) -> DataFacts:
        """The inputs of the auto rules: colour in any sampled image -> 3 channels; the median side."""
        sides = self.sides()
        return DataFacts(layout=self.layout, channels=3 if any(i.colour for i in self.images) else 1,
                         median_side=int(np.median(sides)) if sides else None, dicom=self.dicom,
                         dicom_group=self.dicom_group)  # fmt: skip

    def summary(self) -> dict:
        """JSON-able, for reports: counts, sizes and modes; no path, no value of any column."""
        facts = self.facts()
        return {
            "layout": self.layout,
            "rows": self.rows,
            "sampled": len(self.images),
            "unreadable": {f"row {i.row}": i.problem for i in self.images if i.problem},
            "sizes": dict(Counter(f"{i.size[0]}x{i.size[1]}" for i in self.images if i.size).most_common(5)),
            "modes": dict(Counter(i.mode for i in self.images if i.mode)),
            "colour_images": sum(bool(i.colour) for i in self.images),
            "channels": facts.channels,
            "median_side": facts.median_side,
        }


def sample_rows(rows: int, images: int = AUTO_SAMPLE_IMAGES) -> list[int]:
    """`images` manifest positions spread evenly over `rows` (all of them when fewer), first and last included."""
    return sorted({int(round(x)) for x in np.linspace(0, rows - 1, min(rows, images))}) if rows else []


def detect(source: SourceConfig, images: int = AUTO_SAMPLE_IMAGES, max_pixels: int = 40_000_000,
           background: str = "auto", decode_all: bool = False, dicom_options: DicomConfig | None = None) -> Detection:  # fmt: skip
    """Read `images` rows spread over the source (`sample_rows`; the same rows every time, so auto
    values decide the same from the same data): the layout, each image's header size and mode,
    and, for modes that can hold colour, its pixels at COLOUR_PROBE_SIDE through ingest's own
    `decode` (colour: see COLOUR_LEVELS). `decode_all` also decodes grayscale images, only to
    find unreadable ones: the facts never depend on it. A DICOM row's size and mode come from its
    header columns (Columns, Rows, PhotometricInterpretation; `dicom_options`: ingest.dicom).
    Raises MlpipeError (one line) for a source or manifest that cannot be read."""
    options = dicom_options or DicomConfig()
    src = open_source(source)
    source = with_layout(src, source)
    frame, _ = read_manifest(src, source, options.frames)
    frames = frame[dicom.FRAME].tolist() if dicom.FRAME in frame.columns else [""] * len(frame)
    invalid, _ = validate_manifest(frame, source)
    sampled = []
    for row in sample_rows(len(frame), images):
        image = SampledImage(row)
        sampled.append(image)
        try:
            if row in invalid:
                raise Quarantined(invalid[row])
            full = src.resolve(frame[source.image_column].iloc[row])
            index = int(frames[row]) if frames[row] != "" else None
            if index is not None and "Rows" in frame.columns and frame["Rows"].iloc[row].isdigit():
                photometric = frame["PhotometricInterpretation"].iloc[row].strip() if "PhotometricInterpretation" in frame else ""
                image.size = (int(frame["Columns"].iloc[row] or 0), int(frame["Rows"].iloc[row]))
                image.mode = "L" if photometric.startswith("MONOCHROME") or not photometric else "RGB"
                data = None
            else:
                data = src.read(full)
                image.size, image.mode = _header(data, index)
            if image.size[0] * image.size[1] > max_pixels:
                raise Quarantined("over the pixel limit")
            if image.mode not in GRAY_MODES or decode_all:
                data = src.read(full) if data is None else data
                pixels = decode(data, COLOUR_PROBE_SIDE, 3, max_pixels, background, thumbnail=False,
                                frame=index, window=options.window).pixels  # fmt: skip
                spread = pixels.max(axis=2).astype(np.int16) - pixels.min(axis=2)
                image.colour = image.mode not in GRAY_MODES and float((spread > COLOUR_LEVELS).mean()) >= COLOUR_SHARE
        except Quarantined as why:
            image.problem = str(why)
        except OSError:  # as decode_into says it
            image.problem = "unreadable file"
    return Detection(layout=source.layout, rows=len(frame), images=sampled, dicom=dicom.FRAME in frame.columns,
                     dicom_group=dicom_group_column(frame))  # fmt: skip


# The header attributes that tell whose image a DICOM file is, best first: a patient's files must
# not span splits; a study (Study Instance UID, Type 1 in every image IOD) is one patient's.
DICOM_GROUP_ATTRIBUTES = ("PatientID", "StudyInstanceUID")


def dicom_group_column(frame: pd.DataFrame) -> str | None:
    """split.group_column auto for DICOM rows: PatientID when any DICOM row has one (a row without
    one is grouped by its study: `mlpipe.split.group_values`), else StudyInstanceUID when any has
    one (files whose Patient ID was blanked before they reached us: grouping every one of them
    under "" would make one group of the whole dataset), else None."""
    if dicom.FRAME not in frame.columns:
        return None
    rows = frame[frame[dicom.FRAME] != ""]
    return next((c for c in DICOM_GROUP_ATTRIBUTES if c in rows.columns and (rows[c].str.strip() != "").any()), None)


def _header(data: bytes, frame: int | None = None) -> tuple[tuple[int, int], str]:
    """(width, height) and Pillow mode from the file's header, nothing decoded; `Quarantined` with
    ingest's reason when there is no readable header (a DICOM row, `frame` given, has none here)."""
    if frame is not None:
        decode(data, COLOUR_PROBE_SIDE, 1, 1 << 62, frame=frame)  # its header was unreadable: the reason
        raise Quarantined("not an image")
    try:
        with Image.open(io.BytesIO(data)) as img:
            return img.size, img.mode
    except Exception:  # noqa: BLE001 - decode names the reason exactly as ingest does
        decode(data, COLOUR_PROBE_SIDE, 1, 1 << 62)
        raise Quarantined("not an image") from None


def resolve_config(config: PipelineConfig) -> tuple[PipelineConfig, dict, Detection | None]:
    """(the config with every auto decided, {dotted key: value decided}, the detection or None
    when nothing needed the data). See `mlpipe.config.resolve_auto` for the rules. Raises
    MlpipeError: `DataError` when the source cannot be read, plain when the decided config is invalid."""
    # The group column left at the sample's default on a folder is decided from the data too: DICOM
    # files are grouped by patient (or study) whatever else the user set, never by item.
    needs_data = "auto" in (config.source.layout, config.ingest.channels, config.ingest.image_size) or (
        config.source.layout in ("imagefolder", "dicom") and config.split.group_column == SAMPLE_GROUP_COLUMN)
    detection = None
    if needs_data:
        try:
            detection = detect(config.source, max_pixels=config.ingest.max_pixels, background=config.ingest.background,
                               dicom_options=config.ingest.dicom)  # fmt: skip
        except MlpipeError as err:
            raise DataError(str(err)) from None
        if config.ingest.image_size == "auto" and detection.facts().median_side is None:
            raise DataError(f"ingest.image_size auto: none of the {len(detection.images)} sampled images could be "
                            f"read; set ingest.image_size")  # fmt: skip
    facts = detection.facts() if detection else None
    resolved, decided = resolve_auto(config, facts)
    return resolved, decided, detection


class DataError(MlpipeError):
    """The data, not the config, is what is wrong (the CLI exits 1, as for a failed pipeline)."""


def describe_decided(decided: dict, detection: Detection | None) -> str:
    """One line naming every decided value, and what it was decided from."""
    parts = []
    for key, value in decided.items():
        text = json.dumps(value, separators=(", ", ": ")) if not isinstance(value, str) else value
        if key == "ingest.image_size" and detection is not None:
            text += f" (median longer side {detection.facts().median_side} px)"
        elif key == "split.group_column" and detection is not None and detection.dicom:
            text = (value or "null") + (" (no DICOM file has a PatientID)" if value == "StudyInstanceUID" else
                                 " (no DICOM file has a PatientID or StudyInstanceUID)" if value is None else "")  # fmt: skip
        elif key == "ingest.channels" and detection is not None:
            colour = sum(bool(i.colour) for i in detection.images)
            text += f" ({colour} of {len(detection.images)} sampled images in colour)"
        parts.append(f"{key} {text}")
    source = f" from {len(detection.images)} sampled images" if detection else ""
    return f"auto settings decided{source}: " + ", ".join(parts)


def ingest(source: SourceConfig, config: IngestConfig) -> StageResult:
    """The snapshot of `source` at `config`'s resolution (see the module docstring). Auto values
    are normally decided before the run (`resolve_config`, which also weighs train.model); any
    left here are decided by the same rule from the same sample, without an architecture. The
    report's `detected` holds what that sample showed, whatever the config said."""
    src = open_source(source)
    source = with_layout(src, source)
    detection = None
    if config.channels == "auto" or config.image_size == "auto":
        detection = detect(source, max_pixels=config.max_pixels, background=config.background, dicom_options=config.dicom)
        facts = detection.facts()
        if facts.median_side is None and config.image_size == "auto":
            raise MlpipeError("ingest.image_size auto: none of the sampled images could be read; set ingest.image_size")
        config = config.model_copy(update={
            "channels": facts.channels if config.channels == "auto" else config.channels,
            "image_size": clamped_side(facts.median_side or 0) if config.image_size == "auto" else config.image_size,
        })  # fmt: skip
    frame, digest = read_manifest(src, source, config.dicom.frames)
    invalid, validation = validate_manifest(frame, source)

    # Check paths first (cheap), then look for an earlier snapshot of the very same files.
    checked = _check_paths(src, frame, source, invalid)
    fingerprint = _fingerprint(src, source, digest, checked)
    scan_key = stable_hash(fingerprint, config, code_version("mlpipe.ingest", "mlpipe.images"))[:16]
    cached = _cached_snapshot(scan_key)
    if cached is not None:
        return cached

    pixels_path = state_dir() / "work" / "ingest" / f".pixels-{scan_key}-{os.getpid()}.npy"
    pixels_path.parent.mkdir(parents=True, exist_ok=True)
    try:
        detection = detection or detect(source, max_pixels=config.max_pixels, background=config.background,
                                        dicom_options=config.dicom)  # fmt: skip
        decoded = _decode_all(src, checked, config, pixels_path)
        return _snapshot(decoded, digest, validation, scan_key, config, [c for c in frame.columns if not c.startswith("__")],
                         pixels_path, detection.summary(), _dicom_summary(frame, config))  # fmt: skip
    finally:
        pixels_path.unlink(missing_ok=True)


def _decode_all(src: Source, checked: list, config: IngestConfig, pixels_path: Path) -> list[Summary | Quarantined]:
    """Decode every checked path once into the memory-mapped cache (row i at index i), with a
    progress bar on a terminal. Returns hashes and reasons in row order.

    Local files go to worker processes: per-image Python work (hashing, normalizing) holds the
    GIL, so threads gain little on small images. Other filesystems (an in-memory one lives in
    this process only) are read here and decoded on threads, where Pillow releases the GIL.
    """
    shape = (len(checked), config.image_size, config.image_size, config.channels)
    np.lib.format.open_memmap(pixels_path, mode="w+", dtype=np.uint8, shape=shape).flush()
    cores = os.cpu_count() or 1
    workers = config.workers if config.workers != "auto" else min(8, cores)
    pending = sum(not isinstance(c, Quarantined) for c in checked)
    task = partial(decode_into, str(pixels_path), image_size=config.image_size, channels=config.channels,
                   max_pixels=config.max_pixels, background=config.background, window=config.dicom.window)  # fmt: skip
    if src.local and workers > 1 and pending >= PROCESS_POOL_MIN_IMAGES:
        Image.init()  # import Pillow's plugins before forking: a child must never need the import lock
        pool = ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("fork"))
    else:
        pool = ThreadPoolExecutor(max_workers=workers)
        task = partial(task, read=None if src.local else src.read)
    rows = list(enumerate(checked))
    size = max(32, min(512, len(rows) // (workers * 8) or 1))  # a future per image costs more than a small PNG
    out: list[Summary | Quarantined] = [None] * len(rows)  # type: ignore[list-item]
    with pool, tqdm(total=len(rows), desc="ingest: decoding", unit="img", disable=None, leave=False) as bar:
        for part in pool.map(task, [rows[i : i + size] for i in range(0, len(rows), size)]):
            for row, result in part:
                out[row] = result
            bar.update(len(part))
    return out


def _dicom_summary(frame: pd.DataFrame, config: IngestConfig) -> dict | None:
    """The report's `dicom` entry (None without DICOM rows): counts, the options, the header
    columns' names (never a value), and per row the first row of its file (frames kept together)."""
    if dicom.FRAME not in frame.columns:
        return None
    is_dicom = frame[dicom.FRAME] != ""
    return {
        "files": int(frame.loc[is_dicom, dicom.DICOM_FILE].nunique()),
        "items": int(is_dicom.sum()),
        "frames": config.dicom.frames,
        "window": config.dicom.window if isinstance(config.dicom.window, str) else list(config.dicom.window),
        "columns": list(frame.attrs.get("dicom_columns", [])),
        "not_columns": frame.attrs.get("dicom_dropped", {}),
        "file_of_row": [int(f) if f != "" else -1 for f in frame[dicom.DICOM_FILE]],
    }


def _snapshot(decoded, digest, validation, scan_key, config, columns, pixels_path: Path, detected: dict,
              dicom_summary: dict | None = None) -> StageResult:  # fmt: skip
    kept_rows, hashes, phashes = [], [], []
    quarantine: list[tuple[int, str]] = []
    duplicates: list[tuple[int, int]] = []
    first_row_of: dict[str, int] = {}
    for row, result in enumerate(decoded):
        if isinstance(result, Quarantined):
            quarantine.append((row, str(result)))
            continue
        if result.sha256 in first_row_of:
            duplicates.append((row, first_row_of[result.sha256]))
            continue
        first_row_of[result.sha256] = row
        kept_rows.append(row)
        hashes.append(result.sha256)
        phashes.append(result.phash)

    rows_in = len(decoded)
    if len(kept_rows) + len(quarantine) + len(duplicates) != rows_in:  # the accounting must close
        raise MlpipeError("ingest lost rows: kept + quarantined + duplicates != rows in manifest")
    reasons = Counter(reason for _, reason in quarantine)
    if len(kept_rows) < config.min_rows:
        summary = ", ".join(f"{n} {r}" for r, n in reasons.most_common()) or "empty manifest"
        raise MlpipeError(
            f"no usable images after quarantine: {len(kept_rows)} of {rows_in} rows survive, "
            f"ingest.min_rows is {config.min_rows} ({summary})"
        )

    check_drop("ingest", rows_in, {**{f"quarantined ({r})": n for r, n in reasons.items()},
                                   "exact duplicates (identical decoded pixels)": len(duplicates)}, config.max_drop_fraction)
    file_of_row = (dicom_summary or {}).pop("file_of_row", None)
    same_file = []
    if file_of_row is not None:  # the frames of one multi-frame file: one group, as near-duplicates are
        position = {row: i for i, row in enumerate(kept_rows)}
        first: dict[int, int] = {}
        for row in kept_rows:
            if file_of_row[row] >= 0:
                first.setdefault(file_of_row[row], position[row])
                if first[file_of_row[row]] != position[row]:
                    same_file.append((first[file_of_row[row]], position[row]))
    groups = near_duplicate_groups(phashes, config.near_duplicate_distance, same_file)
    # The cache keeps a slot per manifest row (empty for rejected rows): workers wrote in place.
    items = pd.DataFrame({ROW: kept_rows, SHA: hashes, PIXEL_INDEX: kept_rows,
                          NEAR_DUP: [f"n{kept_rows[g]}" if g >= 0 else "" for g in groups]})  # fmt: skip
    fingerprint = stable_hash(digest, hashes, quarantine, config)[:16]
    report = {
        "rows_in": rows_in,
        "kept": len(kept_rows),
        "quarantined": len(quarantine),
        "duplicates": len(duplicates),
        "near_duplicate_groups": int(len({g for g in groups if g >= 0})),
        "near_duplicate_items": int(sum(g >= 0 for g in groups)),
        "quarantine_reasons": dict(reasons),
        "validation_failures": len(validation),
        "source_modes": dict(Counter(d.source_mode for d in decoded if isinstance(d, Summary))),
        "fingerprint": fingerprint,
        "manifest_sha256": digest,
        "image_shape": [config.image_size, config.image_size, config.channels],
        "columns": list(columns),
        "detected": detected,
        **({"dicom": dicom_summary} if dicom_summary else {}),
    }
    key = stable_hash(fingerprint, code_version("mlpipe.ingest", "mlpipe.images"))[:16]
    with stage_dir("ingest", key) as out:
        os.replace(pixels_path, out / "pixels.npy")
        items.to_parquet(out / "items.parquet", index=False)
        # No path column, not even hashed: an unkeyed hash of "Jane_Doe_01.png" is confirmable by
        # anyone with a list of names. The row number finds the entry in the user's own manifest.
        pd.DataFrame(quarantine, columns=["row", "reason"]).to_csv(out / "quarantine.csv", index=False)
        pd.DataFrame(duplicates, columns=["row", "duplicate_of_row"]).to_csv(out / "duplicates.csv", index=False)
        items.loc[items[NEAR_DUP] != "", [ROW, NEAR_DUP]].rename(columns={ROW: "row", NEAR_DUP: "group"}).to_csv(
            out / "near_duplicates.csv", index=False
        )
        write_json(out / "validation.json", {"failure_cases": validation})
        write_json(out / "report.json", report)
    index = state_dir() / "work" / "ingest" / "index"
    index.mkdir(parents=True, exist_ok=True)
    write_json(index / f"{scan_key}.json", {"key": key})
    return StageResult.at("ingest", key, {**report, "cache": "miss"})


def _cached_snapshot(scan_key: str) -> StageResult | None:
    entry = state_dir() / "work" / "ingest" / "index" / f"{scan_key}.json"
    if not entry.is_file():
        return None
    key = json.loads(entry.read_text())["key"]
    folder = final_path("ingest", key)
    if not (folder / "report.json").is_file() or not (folder / "pixels.npy").is_file():
        return None
    return StageResult.at("ingest", key, {**json.loads((folder / "report.json").read_text()), "cache": "hit"})


def near_duplicate_groups(phashes: list[int | None], max_distance: int | None,
                          linked: list[tuple[int, int]] = ()) -> list[int]:  # fmt: skip
    """Group index (the first member's position) per item, -1 when it has no near-duplicate.
    `linked`: pairs of positions to group whatever their hashes (the frames of one DICOM file).

    Pigeonhole banding: two 64-bit hashes within distance d agree exactly on at least one of
    d + 1 bands, so comparing only items that share a band finds every pair. Groups are the
    connected components of all close pairs (scipy), so closeness chains are followed.
    """
    n = len(phashes)
    present = np.array([i for i, h in enumerate(phashes) if h is not None], dtype=np.int64)
    pairs: list[np.ndarray] = []
    if max_distance is not None and len(present) > 1:
        values = np.array([phashes[i] for i in present], dtype=np.uint64)
        bands = max_distance + 1
        width = 64 // bands
        for b in range(bands):
            band = (values >> np.uint64(b * width)) & np.uint64((1 << width) - 1)
            order = np.argsort(band, kind="stable")
            starts = np.flatnonzero(np.r_[True, band[order][1:] != band[order][:-1]])
            ends = np.r_[starts[1:], len(order)]
            sizes = ends - starts
            # Buckets of two (the common case) in one vectorized step; larger ones pair by pair.
            a, b2 = order[starts[sizes == 2]], order[starts[sizes == 2] + 1]
            close = np.bitwise_count(values[a] ^ values[b2]) <= max_distance
            pairs.append(np.stack([present[a[close]], present[b2[close]]]))
            for lo, hi in zip(starts[sizes > 2], ends[sizes > 2], strict=True):
                members = order[lo:hi]  # all pairs of one bucket at once
                close = np.bitwise_count(values[members][:, None] ^ values[members][None, :]) <= max_distance
                x, y = np.nonzero(np.triu(close, k=1))
                pairs.append(np.stack([present[members[x]], present[members[y]]]))
    if linked:
        pairs.append(np.array(linked, dtype=np.int64).T)
    if not pairs or not sum(p.shape[1] for p in pairs):
        return [-1] * n
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    edges = np.concatenate(pairs, axis=1)
    graph = coo_matrix((np.ones(edges.shape[1], dtype=np.int8), (edges[0], edges[1])), shape=(n, n))
    _, component = connected_components(graph, directed=False)  # labels 0..k-1
    _, first, counts = np.unique(component, return_index=True, return_counts=True)
    return np.where(counts[component] > 1, first[component], -1).tolist()


def snapshot_rows(snapshot: StageResult, source: SourceConfig) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(kept rows with their hashes, removed exact-duplicate rows with the row they duplicate),
    read again from the unchanged source. The snapshot holds no copy of the manifest's personal data.
    """
    src = open_source(source)
    frame, digest = read_manifest(src, with_layout(src, source), snapshot.report.get("dicom", {}).get("frames", "middle"))
    if digest != snapshot.report["manifest_sha256"]:
        raise MlpipeError("the manifest changed since ingest; rerun the pipeline from ingest")
    kept = pd.read_parquet(snapshot.file("items.parquet"))
    rows = pd.concat([frame.iloc[kept[ROW]].reset_index(drop=True), kept], axis=1)
    dups = pd.read_csv(snapshot.file("duplicates.csv"))
    removed = frame.iloc[dups["row"]].reset_index(drop=True).assign(**{ROW: dups["duplicate_of_row"].to_numpy()})
    return rows, removed
