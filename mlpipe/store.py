"""Where stage outputs live, how they are named, and the small handles that stages pass on.

Every stage writes its files into `<state>/work/<stage>/<key>/`, where the key hashes the
stage's inputs, its own config section and its code. Directory names are hashes, never
anything derived from user data. A stage hands the next one a `StageResult` (a path, a key and
a small report), so Prefect passes and persists kilobytes, not arrays.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import threading
import time
from collections.abc import Iterator
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from mlpipe.errors import MlpipeError

PACKAGE_ROOT = Path(__file__).resolve().parent
KEY_LIBRARIES = ("torch", "numpy", "pandas", "scikit-learn", "imbalanced-learn", "albumentations", "pillow")


def state_path() -> Path:
    """Project-local state (`./.mlpipe`, or `$MLPIPE_HOME`): MLflow store, work files, local key."""
    return Path(os.environ.get("MLPIPE_HOME", ".mlpipe")).expanduser().resolve()


def state_dir() -> Path:
    """`state_path()`, created if missing."""
    path = state_path()
    path.mkdir(parents=True, exist_ok=True)
    return path


def stable_hash(*parts: Any) -> str:
    """sha256 over a canonical JSON encoding of `parts` (pydantic models are dumped first)."""
    encoded = json.dumps(
        [p.model_dump(mode="json") if isinstance(p, BaseModel) else p for p in parts],
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(encoded.encode()).hexdigest()


def code_version(*modules: str) -> str:
    """Hash of the named library modules' source (all of `mlpipe/` when none are named)."""
    digest = hashlib.sha256()
    files = (
        sorted(PACKAGE_ROOT.rglob("*.py"))
        if not modules
        else sorted(p for m in modules for p in module_files(m))
    )
    for path in files:
        digest.update(path.relative_to(PACKAGE_ROOT).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def module_files(module: str) -> list[Path]:
    rel = Path(*module.split(".")[1:])
    package = PACKAGE_ROOT / rel
    return sorted(package.rglob("*.py")) if package.is_dir() else [PACKAGE_ROOT / rel.with_suffix(".py")]


def library_versions() -> dict[str, str]:
    out = {}
    for name in KEY_LIBRARIES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "absent"
    return out


class StageResult(BaseModel):
    """What a stage hands on: where its files are, their content key, and its report."""

    stage: str
    path: str
    key: str
    report: dict[str, Any]
    files: dict[str, str] = {}  # inputs that live in an earlier stage's folder, by name

    @classmethod
    def at(cls, stage: str, key: str, report: dict[str, Any], **files: Path) -> StageResult:
        return cls(stage=stage, path=str(final_path(stage, key)), key=key, report=report,
                   files={k: str(v) for k, v in files.items()})

    def file(self, name: str) -> Path:
        return Path(self.files[name]) if name in self.files else Path(self.path) / name


@contextlib.contextmanager
def stage_dir(stage: str, key: str) -> Iterator[Path]:
    """Yield a fresh temporary directory that becomes `<state>/work/<stage>/<key>` only on success.

    Readers never see a half-written output, and a failed stage leaves nothing behind in `work/`.
    Its logs (`*.log`, the torchrun launch logs) are kept in `<state>/failed/<stage>-<key>-<time>/`
    (`kept_logs(err)`), and an `MlpipeError` that names a file of the temporary folder names the
    kept copy instead.
    """
    final = state_dir() / "work" / stage / key
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".tmp-{key}-{os.getpid()}-{threading.get_ident()}"  # per run, even runs in threads
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(mode=0o700)
    stale = final.parent / f".stale-{key}-{os.getpid()}-{threading.get_ident()}"
    try:
        yield tmp
        if final.exists():  # same key, recomputed: swap by renames so the folder is never half there
            with contextlib.suppress(FileNotFoundError):  # another run swapped it away first
                final.rename(stale)
        try:
            tmp.rename(final)
        except OSError as error:
            # Another run placed the same key between the check and the rename: same inputs, same code,
            # the same stage output. Keep theirs.
            if error.errno not in (errno.ENOTEMPTY, errno.EEXIST) or not final.is_dir():
                raise
    except BaseException as err:
        _keep_logs(stage, key, tmp, err)
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(stale, ignore_errors=True)


def _keep_logs(stage: str, key: str, tmp: Path, err: BaseException) -> None:
    """Move a failed stage's logs out of its temporary folder before that is removed, and point
    the error at them. Never raises: the stage's own error is the one to report."""
    logs = sorted(tmp.glob("*.log"))
    if not logs:
        return
    with contextlib.suppress(OSError):
        parent = state_dir() / "failed"
        parent.mkdir(exist_ok=True)
        stamp = time.strftime("%Y%m%dT%H%M%S")
        for n in range(1, 1000):  # two failures of one stage key within a second: -2, -3, ...
            kept = parent / (f"{stage}-{key}-{stamp}" + (f"-{n}" if n > 1 else ""))
            with contextlib.suppress(FileExistsError):
                kept.mkdir(mode=0o700)
                break
        for path in logs:
            os.replace(path, kept / path.name)
        with contextlib.suppress(AttributeError, TypeError):  # an exception type that takes no attributes
            err.kept_logs = kept
        cause: BaseException | None = err
        while isinstance(cause, MlpipeError):  # its message and a wrapped one's: "...; first: <launch error>"
            if cause.args and isinstance(cause.args[0], str):
                cause.args = (cause.args[0].replace(str(tmp), str(kept)), *cause.args[1:])
            cause = cause.__cause__


def kept_logs(err: BaseException) -> Path | None:
    """Where `stage_dir` kept the logs of the stage that failed with `err` (None: it kept none)."""
    return getattr(err, "kept_logs", None)


def final_path(stage: str, key: str) -> Path:
    return state_dir() / "work" / stage / key


def write_csv(frame, path: Path) -> Path:
    """A table as CSV that a spreadsheet opens as data: a text cell a spreadsheet would evaluate
    (=, +, -, @, or a tab or CR before one; plain numbers such as -1 aside) gets a leading
    apostrophe, OWASP's advice against CSV injection from manifest values."""
    import pandas as pd

    def safe(value: Any) -> Any:
        if not isinstance(value, str) or not value or value[0] not in "=+-@\t\r\n":
            return value
        try:
            float(value)
            return value
        except ValueError:
            return "'" + value

    text = frame.select_dtypes(include=["object", "string"]).columns
    out = frame.copy()
    for column in text:
        out[column] = out[column].map(safe)
    pd.DataFrame(out).to_csv(path, index=False)
    return path


def write_json(path: Path, data: Any) -> Path:
    path.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n", encoding="utf-8")
    return path
