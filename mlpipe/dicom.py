"""dicom: DICOM files in, 8-bit pixels and header columns out (pydicom).

- Pixels: pydicom decodes (native and, through pylibjpeg, JPEG, JPEG-LS, JPEG 2000 and RLE
  transfer syntaxes); then the Modality LUT (Rescale Slope/Intercept, PS3.3 C.11.1), a VOI
  transform (the header's VOI LUT or window, a fixed window, or the frame's own range; PS3.3
  C.11.2), MONOCHROME1 inverted so that bright is dense in every image, and the VOI output
  scaled to 0-255. Colour images (RGB, YBR_*: converted to RGB by pydicom) are scaled from
  Bits Stored to 8 bits.
- Header columns: every top-level, non-private, non-sequence, non-bulk attribute (curves and
  overlays, groups 50xx and 60xx, neither) becomes a text column named by its DICOM keyword, so that the anonymization policy governs it like any
  manifest column. Private tags, sequences and bulk data never become columns (counted).
- Multi-frame files give one item (`first`, `middle`) or one item per frame (`all`), the
  frames of a file kept together by split.

Headers are read with `stop_before_pixels` and cached per (path, size, mtime) for the process:
the manifest is read by the Prefect cache key, ingest and anonymize, and a header costs far
less than its pixels but is not free.
"""

from __future__ import annotations

import functools
import hashlib
import io
import posixpath
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Literal

import numpy as np

from mlpipe.errors import MlpipeError
from mlpipe.images import Quarantined

DICOM_SUFFIXES = (".dcm", ".dicom", ".dic")
FRAME = "__frame"  # hidden manifest column: the frame of a DICOM file this row is (row order within the file)
DICOM_FILE = "__dicom_file"  # hidden manifest column: the row index of the file's first row (frames of one file)
# Value representations (PS3.5 6.2) whose values are numbers: never names or dates.
NUMERIC_VRS = frozenset({"DS", "IS", "US", "UL", "SS", "SL", "FL", "FD", "SV", "UV", "AT"})
# Bulk data and sequences: no column (pixel data, overlays, curves, LUT data, nested datasets).
BULK_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "UN", "SQ"})
Window = Literal["header", "minmax"] | tuple[float, float]
Frames = Literal["first", "middle", "all"]


def has_dicom_suffix(path: str) -> bool:
    return posixpath.splitext(path)[1].lower() in DICOM_SUFFIXES


def is_dicom(data: bytes) -> bool:
    """True when `data` has the DICOM Part 10 preamble and 'DICM' prefix (PS3.10 7.1)."""
    return data[128:132] == b"DICM"


def _pydicom():
    import pydicom  # lazy: a run without DICOM never pays its import

    global _QUIET
    if not _QUIET:  # pydicom warns (and logs, with tracebacks of failed decoders) for what ingest already
        # reports as a quarantine reason: off, so that a run's output is the account, not library noise
        import logging
        import warnings

        warnings.filterwarnings("ignore", category=UserWarning, module=r"pydicom(\..*)?$")
        logging.getLogger("pydicom").setLevel(logging.CRITICAL)
        _QUIET = True
    return pydicom


_QUIET = False


def preload() -> None:
    """Import pydicom and its data dictionary now (before worker processes fork)."""
    _pydicom()
    import pydicom.datadict  # noqa: F401


@dataclass(frozen=True)
class PixelModule:
    """What decoding a file's frames needs of its header, kept from the header read so that
    decoding parses only the pixel data element, not the whole header again (a CT header of 258
    elements costs as much to parse as its 512 x 512 pixels to decode): the file meta, every
    attribute of group 0028 (Image Pixel, Modality LUT, VOI LUT, palette) and of group 7FE0 before
    the pixel data (extended offset table), the byte offset of the pixel data element, and a
    digest of every byte before it (`decode_dicom` uses the module only for the same bytes)."""

    dataset: object  # pydicom Dataset: file_meta and those attributes
    offset: int
    digest: bytes


@dataclass(frozen=True)
class Header:
    """One file's header as text: {keyword: value} for the attributes that become columns, the
    counts of what did not (private tags, sequences), and the file's `PixelModule` (None when
    the header was read without one)."""

    columns: dict[str, str]
    frames: int
    private_tags: int
    sequences: int
    pixels: PixelModule | None = field(default=None, compare=False, repr=False)


def _text(value) -> str:
    """An element's value as text: "" for none and for bytes, multiple values joined by backslash."""
    if value is None or isinstance(value, bytes | bytearray):
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, Sequence) and len(value) > 1:  # pydicom's MultiValue, a MutableSequence
        return "\\".join(str(v) for v in value)
    return str(value)


@functools.lru_cache(maxsize=4096)
def _column_of(tag: int) -> tuple[str, str]:
    """(column name, dictionary VR) of a public tag: pydicom's keyword, else "(gggg,eeee)"; the
    first VR of "US or SS", "UN" for a tag the dictionary lacks."""
    from pydicom.datadict import dictionary_VR, keyword_for_tag

    try:
        vr = dictionary_VR(tag).split(" or ")[0]
    except KeyError:
        vr = "UN"
    return keyword_for_tag(tag) or f"({tag >> 16:04X},{tag & 0xFFFF:04X})", vr


def header_of(dataset) -> Header:
    """The columns a dataset gives (see the module docstring). Keywords are pydicom's data
    dictionary names; a public tag the dictionary lacks is named "(gggg,eeee)". Private tags,
    sequences and bulk data are skipped by tag and raw VR, before pydicom converts their values
    (converting the private tags of a CT header cost 4 times the read). An explicit-VR element is
    converted by pydicom's `convert_value` straight from its raw bytes (what `dataset[tag]` does,
    without building and storing a DataElement); any other, or one that fails so, by `dataset[tag]`."""
    from pydicom.charset import convert_encodings
    from pydicom.values import convert_value

    charset = dataset.get_item(0x00080005)  # Specific Character Set, for names and text
    encodings = convert_encodings(dataset[0x00080005].value) if charset is not None and charset.value else None
    columns, private, sequences = {}, 0, 0
    for tag, raw in dataset.items():  # raw elements: only the kept ones are converted, below
        group = tag >> 16
        if group & 1:
            private += 1
            continue
        if group == 0x0002 or not tag & 0xFFFF or tag == 0x7FE00010 or group >> 8 in (0x50, 0x60):
            continue  # file meta, group lengths, pixel data, curves and overlays (the profile removes their data)
        name, known = _column_of(tag)
        vr = known if not raw.VR or raw.VR == "UN" else raw.VR  # pydicom reads a known tag's UN by the dictionary
        if vr == "SQ":
            sequences += 1
            continue
        if vr in BULK_VRS:
            continue
        if getattr(raw, "is_raw", False) and raw.VR == vr:  # explicit VR, as pydicom would read it
            try:
                columns[name] = _text(convert_value(vr, raw, encodings))
                continue
            except Exception:  # noqa: BLE001, S110 - pydicom's own conversion below decides (or raises)
                pass
        element = dataset[tag]
        if element.VR in BULK_VRS:  # an implicit-VR file: the dictionary's VR decided late
            sequences += element.VR == "SQ"
            continue
        columns[name] = _text(element.value)
    frames = int(str(dataset.get("NumberOfFrames", 1) or 1).strip() or 1) if _is_int(dataset.get("NumberOfFrames")) else 1
    return Header(columns, max(frames, 1), private, sequences)


def _is_int(value) -> bool:
    try:
        int(str(value).strip())
        return True
    except (TypeError, ValueError):
        return False


_HEADERS: dict[tuple[str, int, str], Header | str] = {}
_HEADER_CACHE_SIZE = 200_000


def read_header(opener, key: tuple[str, int, str]) -> Header | str:
    """The header of the file `opener()` opens (a binary, seekable file object), with its
    `PixelModule`, or the reason it cannot be read (ingest's quarantine words). Cached per `key`
    (path, size, mtime) for the process."""
    if key in _HEADERS:
        return _HEADERS[key]
    pydicom = _pydicom()
    try:
        with opener() as f:
            dataset = pydicom.dcmread(f, stop_before_pixels=True, force=True)
            if "Rows" not in dataset and "PixelData" not in dataset:
                result: Header | str = _no_pixels(dataset, getattr(dataset, "preamble", None) is not None)
            else:
                result = replace(header_of(dataset), pixels=_pixel_module(dataset, f))
    except Exception as exc:  # noqa: BLE001 - hostile bytes: pydicom raises many kinds
        result = f"truncated or corrupt DICOM ({type(exc).__name__})"
    remember_headers({key: result})
    return result


def _no_pixels(dataset, preamble: bool) -> str:
    """The reason for a file pydicom parsed (force=True parses any bytes) without pixel data: a
    DICOM file (its DICM preamble) of a non-image kind, named by its SOP class as the DICOM
    dictionary (PS3.6 Annex A, through pydicom) names it, e.g. "DICOM without pixel data (Basic
    Text SR Storage)", or "(Media Storage Directory Storage)" for a DICOMDIR; an unknown or
    missing class is left unnamed. Without the preamble, no DICOM at all (a text file named .dcm):
    then ingest's and predict's words for any file that is no image."""
    if not preamble:
        return "not an image"
    meta = getattr(dataset, "file_meta", None)
    uid = (meta.get("MediaStorageSOPClassUID") if meta is not None else None) or dataset.get("SOPClassUID")
    known = isinstance(uid, _pydicom().uid.UID) and uid.name != str(uid)  # name is the UID itself when unknown
    return f"DICOM without pixel data ({uid.name})" if known else "DICOM without pixel data"


_PIXEL_TAGS = frozenset({0x7FE00008, 0x7FE00009, 0x7FE00010})  # Float, Double Float and Pixel Data
_PIXEL_GROUPS = (0x0028, 0x7FE0)


def _pixel_module(dataset, f) -> PixelModule | None:
    """The `PixelModule` of a header `dcmread(f, stop_before_pixels=True)` just read: `f` stands at
    the start of the pixel data element (pydicom rewinds to it). None for a deflated file (its
    offsets are those of the inflated stream) or one without a transfer syntax."""
    pydicom = _pydicom()
    meta = getattr(dataset, "file_meta", None)
    syntax = meta.get("TransferSyntaxUID") if meta is not None else None
    # pydicom raises for a UID that is no transfer syntax it knows (a private one): checked first
    if not isinstance(syntax, pydicom.uid.UID) or not syntax.is_transfer_syntax or syntax.is_deflated:
        return None
    offset = f.tell()
    kept = pydicom.Dataset()
    kept.file_meta = meta
    kept.update({tag: raw for tag, raw in dataset.items() if tag >> 16 in _PIXEL_GROUPS})
    f.seek(0)
    return PixelModule(kept, offset, hashlib.blake2b(f.read(offset), digest_size=16).digest())


def _from_pixel_module(data: bytes, module: PixelModule):
    """The dataset `decode_dicom` needs, from `module` and the pixel data element of `data` (parsed
    alone); None when `data` is not the file the module was read from."""
    pydicom = _pydicom()
    offset = module.offset
    if hashlib.blake2b(data[:offset], digest_size=16).digest() != module.digest:
        return None
    syntax = module.dataset.file_meta.TransferSyntaxUID
    fp = io.BytesIO(data)
    fp.seek(offset)
    tail = pydicom.filereader.read_dataset(fp, syntax.is_implicit_VR, syntax.is_little_endian)
    if not _PIXEL_TAGS & set(tail.keys()):
        return None
    ds = pydicom.Dataset()
    ds.file_meta = module.dataset.file_meta
    ds.update(module.dataset)
    ds.update(tail)
    return ds


def cached_headers() -> dict:
    """The process's header cache ({(path, size, mtime): Header or reason}); read it, do not change it."""
    return _HEADERS


def remember_headers(headers: dict) -> None:
    """Add headers read elsewhere (a worker process) to the process's cache."""
    if len(_HEADERS) + len(headers) > _HEADER_CACHE_SIZE:
        _HEADERS.clear()
        _PIXEL_MODULES.clear()
    _HEADERS.update(headers)
    _PIXEL_MODULES.update({key[0]: h.pixels for key, h in headers.items() if isinstance(h, Header) and h.pixels})


_PIXEL_MODULES: dict[str, PixelModule] = {}  # by path: decoding finds the module of the header read last


def pixel_module(path: str) -> PixelModule | None:
    """The `PixelModule` of the header read last from `path` in this process (or before a worker
    forked from it), None if none was."""
    return _PIXEL_MODULES.get(path)


def frame_indices(frames: int, policy: Frames) -> list[int]:
    """The frames of a `frames`-frame file that become items: [0], [frames // 2] or all of them."""
    if policy == "all":
        return list(range(frames))
    return [0] if policy == "first" else [frames // 2]


def decode_dicom(data: bytes, frame: int | str | None, window: Window, max_pixels: int,
                 module: PixelModule | None = None) -> tuple[np.ndarray, str]:  # fmt: skip
    """One frame of a DICOM file as 8-bit pixels: (H x W uint8 for monochrome, H x W x 3 RGB for
    colour; the source mode, e.g. "DICOM MONOCHROME1 12-bit"). `frame`: an index, None (the
    first), or a policy of `frame_indices` ("first", "middle"; "all" serves the middle one).

    `window`: "header" (the VOI LUT Sequence, else the first Window Center/Width, else the
    frame's range), "minmax" (the frame's own range), or (center, width) in output units of the
    Modality LUT (Hounsfield units for CT), applied as PS3.3 C.11.2.1.2.1 (LINEAR). Raises
    `Quarantined` for unreadable files, pixel data no installed decoder handles, and images above
    `max_pixels` (Rows x Columns, read before decoding). `module`: the file's `PixelModule` from
    its header read, if any: then only the pixel data element is parsed (the same dataset, for
    the same bytes; other bytes are parsed whole).
    """
    pydicom = _pydicom()
    try:
        ds = _from_pixel_module(data, module) if module is not None else None
        if ds is None:
            ds = pydicom.dcmread(io.BytesIO(data), force=True)
    except Exception as exc:  # noqa: BLE001
        raise Quarantined(f"truncated or corrupt DICOM ({type(exc).__name__})") from None
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise Quarantined(_no_pixels(ds, is_dicom(data)))
    rows, columns = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    if rows * columns > max_pixels:
        raise Quarantined("over the pixel limit")
    if "TransferSyntaxUID" not in getattr(ds, "file_meta", {}):  # no meta (a bare dataset): the common default
        ds.file_meta = ds.get("file_meta") or pydicom.dataset.FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = pydicom.uid.ImplicitVRLittleEndian if ds.is_implicit_VR else pydicom.uid.ExplicitVRLittleEndian
    try:
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        if isinstance(frame, str):
            frame = frame_indices(frames, "middle" if frame == "all" else frame)[0]
        ds.pixel_array_options(index=None if frames <= 1 else min(frame or 0, frames - 1))
        array = ds.pixel_array
    except Exception as exc:  # noqa: BLE001 - a corrupt stream raises what its decoder raises
        raise Quarantined(_pixel_problem(exc, ds)) from None
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip()
    bits = int(ds.get("BitsStored", ds.get("BitsAllocated", 8)) or 8)
    mode = f"DICOM {photometric} {bits}-bit"
    if array.ndim == 3 and array.shape[-1] in (3, 4) and not photometric.startswith("MONOCHROME"):
        scale = 255.0 / max(2**bits - 1, 1)
        rgb = array[..., :3] if bits == 8 else np.clip(np.rint(array[..., :3] * scale), 0, 255)
        return np.ascontiguousarray(rgb.astype(np.uint8)), mode
    if array.ndim != 2:
        raise Quarantined(f"DICOM pixel data of unexpected shape {array.shape}")
    if photometric == "PALETTE COLOR":
        rgb = pydicom.pixels.apply_color_lut(array, ds)
        return np.clip(np.rint(rgb / 257.0 if rgb.max(initial=0) > 255 else rgb), 0, 255).astype(np.uint8), mode
    low, high = (int(array.min()), int(array.max())) if array.dtype.kind in "iu" and array.size else (0, 1 << 20)
    if high - low < 1 << 20:
        # Through a lookup table over the stored levels from the lowest to the highest: every
        # transform on at most 2**16 or so values instead of every pixel, no float copy of the frame.
        if array.dtype in (np.uint8, np.uint16):  # the levels index the table as stored: no wider copy
            base, index = 0, array
        else:  # int32 (half of intp's bytes): a difference below 2**20 is exact even where the cast wraps
            base, index = low, array.astype(np.int32)
            index -= np.int32(np.int64(low).astype(np.int32))
        values = pydicom.pixels.apply_modality_lut(np.arange(base, high + 1, dtype=np.int64), ds).astype(np.float64)
        if "ModalityLUTSequence" in ds:  # a table: the values the frame holds are those of the levels present
            observed = values[np.bincount(index.ravel(), minlength=len(values)) > 0]
        else:  # Rescale Slope and Intercept: a line, whose extremes over the frame are at its extreme levels
            observed = values[[low - base, high - base]]
        table = _to_8bit(_voi(values, ds, window, observed), photometric)
        return table[index], mode
    values = pydicom.pixels.apply_modality_lut(array, ds).astype(np.float64)
    return _to_8bit(_voi(values, ds, window), photometric), mode


def _to_8bit(out: np.ndarray, photometric: str) -> np.ndarray:
    """VOI output (0..1) to uint8, MONOCHROME1 inverted (its low values are bright)."""
    if photometric == "MONOCHROME1":
        out = 1.0 - out
    return np.clip(np.rint(out * 255.0), 0, 255).astype(np.uint8)


def _pixel_problem(exc: Exception, ds) -> str:
    """Ingest's quarantine reason for an exception pydicom raised while decoding pixel data."""
    syntax = getattr(getattr(ds.file_meta, "TransferSyntaxUID", None), "name", "unknown transfer syntax")
    if isinstance(exc, NotImplementedError):  # no plugin for the transfer syntax
        return f"DICOM compression without an installed decoder ({syntax})"
    if isinstance(exc, RuntimeError):  # every installed plugin failed: corrupt data, or a variant none reads
        return f"DICOM pixel data the installed decoders fail on ({syntax}: corrupt, or a variant they do not read)"
    if isinstance(exc, AttributeError):
        return "DICOM lacks a required Image Pixel attribute"
    if isinstance(exc, ValueError) and "less than expected" in str(exc):
        return "truncated DICOM pixel data"
    return f"truncated or corrupt DICOM ({type(exc).__name__})"


def _voi(values: np.ndarray, ds, window: Window, observed: np.ndarray | None = None) -> np.ndarray:
    """Modality-LUT output to 0..1 (see `decode_dicom`). `observed`: the values the frame holds
    (when `values` is a lookup table over a range of levels), for the frame's own range."""
    if isinstance(window, tuple | list):
        return _linear_window(values, float(window[0]), float(window[1]))
    if window == "header":
        sequence = ds.get("VOILUTSequence")
        if sequence and sequence[0].get("LUTDescriptor") is not None and sequence[0].get("LUTData") is not None:
            bits = int(sequence[0].LUTDescriptor[2])
            pydicom = _pydicom()
            return pydicom.pixels.apply_voi(values, ds, 0).astype(np.float64) / max(2**bits - 1, 1)
        center, width = _first(ds.get("WindowCenter")), _first(ds.get("WindowWidth"))
        if center is not None and width is not None and width >= 1:
            if str(ds.get("VOILUTFunction", "LINEAR")).strip() == "SIGMOID":  # PS3.3 C.11.2.1.3.1
                return 1.0 / (1.0 + np.exp(-4.0 * (values - center) / width))
            return _linear_window(values, center, width)
    seen = values if observed is None else observed
    low, high = float(seen.min()), float(seen.max())  # never empty: decoding gave Rows x Columns
    return (values - low) / (high - low) if high > low else np.zeros_like(values)


def _linear_window(values: np.ndarray, center: float, width: float) -> np.ndarray:
    """PS3.3 C.11.2.1.2.1: y = ((x - (c - 0.5)) / (w - 1) + 0.5), clipped to 0..1 (width >= 1)."""
    if width < 1:
        raise MlpipeError(f"ingest.dicom.window: width must be at least 1 (got {width:g})")
    if width == 1:
        return (values >= center - 0.5).astype(np.float64)
    return np.clip((values - (center - 0.5)) / (width - 1.0) + 0.5, 0.0, 1.0)


def _first(value) -> float | None:
    if value is None or value == "":
        return None
    try:
        return float(value[0] if hasattr(value, "__len__") and not isinstance(value, str) else value)
    except (TypeError, ValueError, IndexError):
        return None


def image_size_of(header: Header) -> tuple[int, int] | None:
    """(width, height) from the header's Columns and Rows, None when absent."""
    try:
        return int(header.columns["Columns"]), int(header.columns["Rows"])
    except (KeyError, ValueError):
        return None


def has_colour(header: Header) -> bool:
    return not header.columns.get("PhotometricInterpretation", "MONOCHROME2").strip().startswith("MONOCHROME")


# --- anonymization of the header columns -------------------------------------------------------

FREE_TEXT_VRS = frozenset({"LT", "ST", "UT", "UC"})  # free text an unlisted attribute may still hold anything in
# By their VR these hold only digits and punctuation (numbers, dates, times, UIDs): a raw identifier
# "found" inside them is a coincidence of digits, and they are left out of the residual scan.
DIGIT_VRS = NUMERIC_VRS | {"DA", "DT", "TM", "UI"}
_DIGITS = frozenset("0123456789.+-\\ eE:&")
PROFILE_NAME = "DICOM PS3.15 Annex E Basic Application Level Confidentiality Profile (Table E.1-1)"


def vr_of(keyword: str) -> str | None:
    """The attribute's VR from pydicom's data dictionary ("US or SS" -> "US"), None when unknown."""
    from pydicom.datadict import dictionary_VR, tag_for_keyword

    tag = tag_for_keyword(keyword)
    if tag is None:
        return None
    try:
        return dictionary_VR(tag).split(" or ")[0]
    except KeyError:
        return None


def profile_policies(columns: list[str], user: dict, dates: str) -> tuple[dict, dict[str, str]]:
    """({column: ColumnPolicy}, {column: where its policy comes from}) for the DICOM header columns.

    The user's `anonymize.policy` wins; else the Basic Profile's action (`mlpipe.deid.column_policy`:
    remove, UIDs remapped, dates shifted, PatientID pseudonymized); else, for an attribute the
    profile does not list: person names (PN) dropped, dates (DA, DT) shifted, free text (LT, ST,
    UT, UC) left without a policy (the run stops and asks, as for any column), and the rest
    (codes, numbers, short strings such as Manufacturer) retained as the profile retains them,
    still under the residual scan. Unknown attributes get no policy either.
    """
    from pydicom.datadict import tag_for_keyword

    from mlpipe import deid
    from mlpipe.config import ColumnPolicy

    policies, sources = {}, {}
    for column in columns:
        if column in user:
            sources[column] = "anonymize.policy"
            continue
        vr = vr_of(column)
        if vr is None:
            continue
        action = deid.column_policy(column, vr, dates=dates)
        listed = deid.profile_action(tag_for_keyword(column)) is not None
        where = "profile (Table E.1-1)" if listed else "not in Table E.1-1"
        if action is None:
            where = "not in Table E.1-1"
            if vr in FREE_TEXT_VRS:
                continue
            action = "drop" if vr == "PN" else "keep"
        policies[column] = ColumnPolicy(action=action, granularity="year") if action == "generalize_date" else ColumnPolicy(action=action)
        sources[column] = f"{where}: {action}"
    return policies, sources


def digit_columns(frame, columns: list[str]) -> list[str]:
    """The DICOM columns whose VR holds only digits and punctuation and whose values all do."""
    return [c for c in columns if c in frame.columns and (vr_of(c) == "AT" or (vr_of(c) in DIGIT_VRS  # AT: "(0018,1063)"
            and all(set(v) <= _DIGITS for v in frame[c].astype(str).unique())))]  # fmt: skip


def identifier_columns(columns: list[str]) -> list[str]:
    """The DICOM columns whose raw values count as identifiers for the residual scan: names, dates,
    UIDs, and IDs, numbers, addresses and institutions by keyword. Descriptions the profile also
    removes (SeriesDescription "CHEST") are not: a kept BodyPartExamined "CHEST" is no leak."""
    import re

    pattern = re.compile(r"ID|Number|Name|Address|Telephone|Identifier|Institution|Station")
    generic = re.compile(r"Protocol|Description|TypeOf")  # ProtocolName "Free Form", TypeOfPatientID "TEXT"
    return [c for c in columns if vr_of(c) in ("PN", "DA", "DT", "UI")
            or (vr_of(c) != "CS" and pattern.search(c) and not generic.search(c))]  # codes (CS) name no one
