"""`mlpipe predict`: a registered model's answers for new images, written to a CSV.

Inputs are listed the way ingest lists a dataset (`mlpipe.ingest.Source`: fsspec, paths kept
inside the root, the same image suffixes and manifest readers), read as bytes here and handed
to the serving model in its `image` column, so the CLI gets exactly what `mlflow models serve`
answers for the same bytes. A file that cannot be read or decoded is a row with an `error`;
the batch goes on.
"""

from __future__ import annotations

import posixpath
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fsspec
import pandas as pd

from mlpipe.config import SourceConfig
from mlpipe.errors import MlpipeError
from mlpipe.dicom import has_dicom_suffix
from mlpipe.images import Quarantined
from mlpipe.ingest import IMAGE_SUFFIXES, Source, open_source, read_manifest
from mlpipe.serving import CLASS, ERROR, IMAGE

MANIFEST_SUFFIXES = (".csv", ".parquet", ".jsonl", ".ndjson")
SOURCE, ROW = "source", "row"  # the user's own path (as given or relative to the folder); a manifest's row number


@dataclass(frozen=True)
class Input:
    """One image to score: how the user names it, and its full path on `source` (or why not)."""

    name: str
    full: str | Quarantined
    row: int | None = None
    fs: fsspec.AbstractFileSystem | None = None  # for image files named one by one (each may be elsewhere)


def list_inputs(sources: list[str], image_column: str = "image") -> tuple[Source | None, list[Input]]:
    """The images named by `sources`: one folder or fsspec URL (every image file under it, by
    suffix, sorted), one manifest (.csv, .parquet, .jsonl: its `image_column`, relative to the
    manifest's folder), or image files. Raises MlpipeError for a source that does not exist."""
    if len(sources) == 1:
        fs, path = _fs(sources[0])
        if fs.isdir(path):
            src = Source(fs, path.rstrip("/") or "/", sources[0])
            prefix = src.root.rstrip("/") + "/"  # fs.find lists full paths under the root: the rest is the name
            names = sorted(f.removeprefix(prefix) for f in fs.find(src.root)
                           if posixpath.splitext(f)[1].lower() in IMAGE_SUFFIXES or has_dicom_suffix(f))  # fmt: skip
            return src, [Input(name, resolve_input(src, name)) for name in names]
        if posixpath.splitext(path)[1].lower() in MANIFEST_SUFFIXES:
            folder, name = posixpath.split(sources[0].rstrip("/"))
            src = open_source(SourceConfig(uri=folder or ".", manifest=name, image_column=image_column))
            frame, _ = read_manifest(src, SourceConfig(uri=folder or ".", manifest=name, image_column=image_column))
            return src, [Input(rel, resolve_input(src, rel), row) for row, rel in enumerate(frame[image_column])]
    inputs = []
    for given in sources:
        fs, path = _fs(given)
        if not fs.exists(path):
            raise MlpipeError(f"no such file or folder: {given}")
        inputs.append(Input(given, path if fs.isfile(path) else Quarantined("not a file"), fs=fs))
    return None, inputs


def _fs(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    try:
        return fsspec.core.url_to_fs(uri)
    except (ValueError, ImportError) as exc:
        raise MlpipeError(f"unsupported source '{uri}': {exc}") from None


def resolve_input(src: Source, rel: str) -> str | Quarantined:
    """`rel`'s full path inside the source (`Source.resolve`), or why it cannot be read."""
    try:
        return src.resolve(rel)
    except Quarantined as why:
        return why


def read_bytes(item: Input, src: Source | None) -> bytes | Quarantined:
    """The file's bytes, or why not (the same reasons ingest's quarantine gives)."""
    if isinstance(item.full, Quarantined):
        return item.full
    try:
        if src is not None:
            return src.read(item.full)
        return (item.fs or fsspec.filesystem("file")).cat_file(item.full)  # the path is without its protocol
    except FileNotFoundError:
        return Quarantined("missing file")
    except OSError:
        return Quarantined("unreadable file")


def predict_inputs(model: Any, inputs: list[Input], src: Source | None, batch_size: int = 256,
                   progress: Callable[[int], None] = lambda n: None) -> Iterator[pd.DataFrame]:  # fmt: skip
    """Score `inputs` with `model` (a pyfunc taking an `image` column) `batch_size` at a time,
    yielding one frame per batch: `source` (and `row` for a manifest), then the model's columns.
    A thread reads the next batch's files while the model decodes and scores this one."""

    def read(batch: list[Input]) -> list[bytes | Quarantined]:
        return [read_bytes(item, src) for item in batch]

    batches = [inputs[i : i + batch_size] for i in range(0, len(inputs), batch_size)]
    with ThreadPoolExecutor(max_workers=1) as reader:
        pending = reader.submit(read, batches[0]) if batches else None
        for k, batch in enumerate(batches):
            data = pending.result()
            if k + 1 < len(batches):
                pending = reader.submit(read, batches[k + 1])
            answers = model.predict(pd.DataFrame({IMAGE: pd.Series([d if isinstance(d, bytes) else None for d in data],
                                                                   dtype=object)}))  # fmt: skip
            unread = [i for i, d in enumerate(data) if not isinstance(d, bytes)]
            if unread:  # the reason a file was not read, not the model's "no image in the row"
                answers.loc[unread, ERROR] = [str(data[i]) for i in unread]
            ids = {SOURCE: [item.name for item in batch]}
            if batch[0].row is not None:
                ids[ROW] = [item.row for item in batch]
            yield pd.concat([pd.DataFrame(ids), answers.reset_index(drop=True)], axis=1)
            progress(len(batch))


def write_predictions(frames: Iterator[pd.DataFrame], output: Path) -> dict:
    """Stream `frames` into one CSV at `output`; returns the counts: images, predicted per class,
    and failed per reason."""
    output.parent.mkdir(parents=True, exist_ok=True)
    classes, errors, total = Counter(), Counter(), 0
    tmp = output.with_name(output.name + ".partial")
    with open(tmp, "w", encoding="utf-8", newline="") as f:
        for k, frame in enumerate(frames):
            frame.to_csv(f, header=k == 0, index=False)
            total += len(frame)
            classes.update(frame[CLASS].dropna())
            errors.update(frame[ERROR].dropna())
    tmp.replace(output)  # a CSV that exists is complete
    return {"images": total, "predicted": dict(sorted(classes.items())), "failed": dict(errors.most_common())}
