"""Prefect caching of the data stages, keyed on what their output depends on, across runs.

Prefect's default policy hashes the task's inputs and its own source, scoped to one flow run:
a rerun recomputes everything, and a change in a helper module goes unnoticed. `StageCache`
keys a stage on
- its input fingerprints: the upstream stage keys (content hashes), or the source's fingerprint;
- its own config section(s);
- a code version: the hash of the stage's library modules, not only the task function;
- the key library versions.
Results (small `StageResult` handles, as JSON) persist in Prefect's result storage; the files
they point at stay in the content-addressed stage folders.

Every miss is explained in the task's log by naming the components that differ from the
stage's most recent key ("anonymize: not cached, config changed: anonymize.columns.name").
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prefect import get_run_logger
from prefect.cache_policies import CachePolicy
from prefect.context import TaskRunContext
from pydantic import BaseModel

from mlpipe.store import StageResult, module_files, code_version, library_versions, stable_hash, state_dir

COMPONENTS = ("inputs", "config", "code", "libraries")


@dataclasses.dataclass
class StageCache(CachePolicy):
    stage: str = ""
    modules: tuple[str, ...] = ()
    fingerprint: Callable[[dict[str, Any]], dict[str, Any]] | None = None  # more input fingerprints
    config: Callable[[dict[str, Any]], Any] | None = None  # the config part; default: every pydantic input

    def compute_key(self, task_ctx: TaskRunContext, inputs: dict[str, Any], flow_parameters: dict[str, Any],
                    **kwargs: Any) -> str:  # fmt: skip
        components = self.components(inputs)
        key = f"mlpipe-{self.stage}-{stable_hash(components)[:32]}"
        store = task_ctx.result_store if task_ctx else None
        stored = store is not None and store.exists(key)
        if stored and not _output_present(store, key):
            _log(f"{self.stage}: cached result's folder is gone; computing it again")
            key = f"{key}-rebuilt-{time.time_ns()}"
        elif not stored:
            _log(f"{self.stage}: not cached, {explain(self.stage, components)}")
        _remember(self.stage, key, components)
        return key

    def components(self, inputs: dict[str, Any]) -> dict[str, Any]:
        upstream = {name: value.key for name, value in inputs.items() if isinstance(value, StageResult)}
        config = self.config(inputs) if self.config else {
            name: value.model_dump(mode="json") for name, value in inputs.items()
            if isinstance(value, BaseModel) and not isinstance(value, StageResult) and name != "run"
        }  # fmt: skip
        return {
            "inputs": {**upstream, **(self.fingerprint(inputs) if self.fingerprint else {}),
                       "state_dir": str(state_dir())},  # handles point into it: never shared across state dirs
            "config": config,
            "code": stage_code_version(self.modules),
            "libraries": library_versions(),
        }


@functools.lru_cache(maxsize=None)
def stage_code_version(modules: tuple[str, ...]) -> str:
    """Once per process: the code that runs is the code that was imported, even if the files
    change later (a long-lived `mlpipe serve` picks up new code only when restarted)."""
    return code_version(*imported_modules(modules))


def imported_modules(modules: tuple[str, ...]) -> list[str]:
    """The stage's library modules and every `mlpipe` module they import, transitively: a change
    in a helper module is a change of the stage's code."""
    seen: set[str] = set()
    todo = list(modules)
    while todo:
        module = todo.pop()
        if module not in seen:
            seen.add(module)
            todo.extend(_mlpipe_imports(module))
    return sorted(seen)


@functools.lru_cache(maxsize=None)
def _mlpipe_imports(module: str) -> tuple[str, ...]:
    """The `mlpipe` modules one module imports (parsed once per process, like the code version)."""
    found = []
    for path in module_files(module):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module] if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 else [])  # fmt: skip
            found.extend(n for n in names if n.split(".")[0] == "mlpipe" and n != "mlpipe")
    return tuple(found)


def explain(stage: str, components: dict[str, Any]) -> str:
    """Which components differ from the stage's most recent key, down to config fields."""
    last = _latest(stage)
    if last is None:
        return "no earlier run of this stage"
    reasons = []
    for part in COMPONENTS:
        if last.get(part) == components.get(part):
            continue
        before, now = _flat(last.get(part)), _flat(components.get(part))
        changed = sorted(k for k in before.keys() | now.keys() if before.get(k) != now.get(k))
        reasons.append(f"{part} changed" + (f": {', '.join(changed[:8])}" if changed and part != "code" else ""))
    return "; ".join(reasons) or "same key as the last run, but its result is not in the result storage"


def _flat(value: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(value, dict):
        return {prefix: value} if prefix else {"": value}
    out: dict[str, Any] = {}
    for key, inner in value.items():
        out.update(_flat(inner, f"{prefix}.{key}" if prefix else str(key)))
    return out


def _folder(stage: str) -> Path:
    folder = state_dir() / "work" / "cache-keys" / stage
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _remember(stage: str, key: str, components: dict[str, Any]) -> None:
    (_folder(stage) / f"{key}.json").write_text(json.dumps(components, sort_keys=True, default=str))


def _latest(stage: str) -> dict[str, Any] | None:
    records = sorted(_folder(stage).glob("*.json"), key=lambda p: p.stat().st_mtime_ns)
    return json.loads(records[-1].read_text()) if records else None


def _output_present(store, key: str) -> bool:
    """A persisted handle is only good while the stage folder it names exists."""
    try:
        result = store.read(key).result
    except Exception:  # noqa: BLE001 - unreadable record: treat as absent, it is recomputed
        return False
    if not isinstance(result, StageResult):
        return True
    return Path(result.path).is_dir() and all(Path(f).exists() for f in result.files.values())


def _log(message: str) -> None:
    try:
        get_run_logger().info(message)
    except Exception:  # noqa: BLE001 - no run context (a direct call): the module logger
        logging.getLogger(__name__).info(message)


# Stage results persist (small JSON handles) so a later flow run can take them from the cache.
# Where: Prefect's result storage, PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK (S3, GCS, ...) or
# PREFECT_LOCAL_STORAGE_PATH, which `mlpipe run` points into the state directory by default.
PERSISTED: dict[str, Any] = {"persist_result": True, "result_serializer": "json"}
