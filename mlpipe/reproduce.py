"""Reproducing a pipeline run from its MLflow record alone: the resolved config (`config.yaml`),
the data fingerprint and the code version it recorded.

Before anything runs, the code version and the data fingerprint must equal the recorded ones:
with other code or other data a rerun is a new experiment, not a reproduction. Library versions
that differ are a warning: the rerun then answers whether the upgrade changed the results.

A reproduction computes every stage again in a fresh state directory. Every cache the pipeline
has lives in the state directory and is keyed on it (Prefect's stage cache, ingest's snapshots,
resampled sets, trial folders), so a fresh one reuses nothing, where a cache-refresh switch would
have to reach each of them and stay in step with every cache added later.

The verdict compares the test metrics exactly: on CPU a seeded run repeats bit for bit. CUDA
kernels are not all deterministic, so a difference on a GPU is reported without failing.
"""

from __future__ import annotations

import contextlib
import math
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from mlpipe.config import PipelineConfig
from mlpipe.errors import MlpipeError
from mlpipe.store import code_version, library_versions, state_path

CODE_TAG = "mlpipe.code_version"
DATA_TAG = "mlpipe.data_fingerprint"
LIBRARY_TAG = "mlpipe.lib."
REPRODUCES_TAG = "mlpipe.reproduces"  # on the new parent run: the run it reproduces
VERDICT_TAG = "mlpipe.reproduction"  # on the new parent run: identical | differs
REPRODUCES_ENV = "MLPIPE_REPRODUCES"  # how `mlpipe reproduce` tells the flow (tasks/run.py) what it reproduces


def fresh_state_dir(requested: Path | None, run_id: str) -> Path:
    """`requested`, which must be new or empty, else a new folder under `<state>/reproductions/`."""
    if requested is None:
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        base = state_path() / "reproductions" / f"{run_id}-{stamp}"
        path, n = base, 1
        while path.exists():
            path, n = base.with_name(f"{base.name}-{n}"), n + 1
        return path
    path = requested.expanduser().resolve()
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise MlpipeError(f"state directory {path} is not new and empty: a reproduction computes every stage afresh, "
                          f"and a used one would hand it cached stages and trials")  # fmt: skip
    return path


@contextlib.contextmanager
def cleared_on_refusal(home: Path) -> Iterator[None]:
    """A refusal leaves the state directory as it found it (new or empty), so a retry may name it again."""
    existed = home.exists()
    try:
        yield
    except MlpipeError:
        shutil.rmtree(home, ignore_errors=True)
        if existed:
            home.mkdir()
        raise


def write_config(home: Path, record_config: str) -> Path:
    """The recorded config into the fresh state directory, for `load_config` (and for the reader)."""
    home.mkdir(parents=True, exist_ok=True)
    path = home / "reproduced-config.yaml"
    path.write_text(record_config, encoding="utf-8")
    return path


def data_fingerprint(config: PipelineConfig) -> str:
    """The recorded kind of fingerprint (ingest's snapshot fingerprint: manifest bytes, decoded
    pixels, quarantine, ingest config) of the config's source as it is now. Ingest computes it in
    the current state directory, a fresh one, so nothing is reused; the flow's ingest then finds
    that snapshot there instead of decoding twice. (The cheaper source fingerprint, Prefect's
    cache key, holds file modification times: a copy of the same data would not match.)"""
    from mlpipe.ingest import ingest

    return ingest(config.source, config.ingest).report["fingerprint"]


def check(run_id: str, status: str, tags: dict[str, str], config: PipelineConfig) -> list[str]:
    """Raise a one-line `MlpipeError` naming what differs from the record (code version first:
    the data fingerprint is computed only with the recorded code); return warnings."""
    if status != "FINISHED":
        raise MlpipeError(f"cannot reproduce run {run_id}: it is {status}; only a FINISHED run has test metrics")
    missing = [t for t in (CODE_TAG, DATA_TAG) if not tags.get(t)]
    if missing:
        raise MlpipeError(f"cannot reproduce run {run_id}: its record lacks {' and '.join(missing)}")
    now = code_version()
    if now != tags[CODE_TAG]:
        raise MlpipeError(f"cannot reproduce run {run_id}: code version differs (recorded {tags[CODE_TAG]}, now {now}); "
                          f"check out the code it ran")  # fmt: skip
    data = data_fingerprint(config)
    if data != tags[DATA_TAG]:
        raise MlpipeError(f"cannot reproduce run {run_id}: data fingerprint differs (recorded {tags[DATA_TAG]}, now {data}, "
                          f"source {config.source.uri})")  # fmt: skip
    recorded = {k.removeprefix(LIBRARY_TAG): v for k, v in tags.items() if k.startswith(LIBRARY_TAG)}
    changed = [f"{name} {recorded.get(name, 'unrecorded')} recorded, {v} now"
               for name, v in library_versions().items() if recorded.get(name) != v]  # fmt: skip
    if changed:
        return [f"library versions differ from the record ({'; '.join(changed)}): the metrics may differ"]
    return []


@dataclass
class Verdict:
    identical: bool
    lines: list[str]
    exit_code: int

    @property
    def word(self) -> str:
        return "identical" if self.identical else "differs"


def compare(run_id: str, recorded: dict[str, float], now: dict[str, float], devices: list[str],
            key_ids: tuple[str | None, str | None] = (None, None)) -> Verdict:  # fmt: skip
    """Exact comparison of the test metrics (NaN equals NaN). `devices`: where either run trained."""
    differ = [f"{k} {recorded.get(k)!r} recorded, {now.get(k)!r} now"
              for k in sorted(recorded.keys() | now.keys()) if not _same(recorded.get(k), now.get(k))]  # fmt: skip
    gpu = any(d != "cpu" for d in devices)
    if not recorded:
        differ.append("the recorded run has no test metrics")
    if not differ:
        lines = [f"Reproduction:      identical: all {len(recorded)} test metrics equal run {run_id}'s exactly"]
    else:
        lines = [f"Reproduction:      DIFFERS from run {run_id}: {'; '.join(differ)}"]
        if gpu:
            lines.append(f"                   trained on {', '.join(devices)}: GPU kernels are not all deterministic, "
                         f"so this is reported, not failed")  # fmt: skip
    if key_ids[0] and key_ids[1] and key_ids[0] != key_ids[1]:
        lines.append(f"                   pseudonym key differs (key id {key_ids[0]} recorded, {key_ids[1]} now): "
                     f"pseudonyms, and files that hold them, differ; share a key through anonymize.key_env")  # fmt: skip
    return Verdict(identical=not differ, lines=lines, exit_code=1 if differ and not gpu else 0)


def _same(a: float | None, b: float | None) -> bool:
    if a is None or b is None:
        return False
    return a == b or (math.isnan(a) and math.isnan(b))
