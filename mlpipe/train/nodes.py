"""Where a multi-node launch meets: its rendezvous settings and the descriptors that `mlpipe join`
on the other nodes picks up.

The node that runs the pipeline hosts the c10d rendezvous at `train.rdzv_endpoint` and, while
its torchrun runs, leaves a descriptor in `<state>/launches/<rdzv id>.json`: the torchrun
argv the other nodes run. The state directory is on storage every node mounts at the same
path, so the spec, the data and the trial folders the argv names are there for them too.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from collections.abc import Iterator
from pathlib import Path

from mlpipe.config import TrainConfig
from mlpipe.store import state_path, write_json


@dataclasses.dataclass(frozen=True)
class Nodes:
    """`count` machines meeting at a c10d rendezvous on `endpoint`, each waiting `timeout_s` for the rest."""

    count: int
    endpoint: str
    timeout_s: int

    @classmethod
    def of(cls, cfg: TrainConfig) -> Nodes | None:
        """None for a one-machine job (torchrun --standalone)."""
        return cls(cfg.nnodes, cfg.rdzv_endpoint, cfg.rdzv_timeout_s) if cfg.nnodes > 1 else None

    def torchrun_args(self, rdzv_id: str, host: bool) -> list[str]:
        # The launching node hosts the store explicitly: on a busy port it fails at once instead
        # of joining whatever store is there, and nodes sharing a host never race to host it.
        return [
            f"--nnodes={self.count}", "--rdzv-backend=c10d", f"--rdzv-endpoint={self.endpoint}",
            f"--rdzv-id={rdzv_id}", f"--rdzv-conf=join_timeout={self.timeout_s},is_host={int(host)}",
        ]  # fmt: skip


def launches_dir() -> Path:
    return state_path() / "launches"


@contextlib.contextmanager
def announced(rdzv_id: str, argv: list[str], nproc: int, cpu: bool, log_path: Path) -> Iterator[None]:
    """The descriptor of a launch (`argv`: torchrun's, without the Python executable), there
    while the block runs; written whole (a rename), so a joining node never reads half of it."""
    launches_dir().mkdir(parents=True, exist_ok=True)
    path = launches_dir() / f"{rdzv_id}.json"
    tmp = write_json(path.with_suffix(".tmp"), {"rdzv_id": rdzv_id, "argv": argv, "nproc": nproc, "cpu": cpu,
                                                "log": str(log_path)})  # fmt: skip
    os.replace(tmp, path)
    try:
        yield
    finally:
        path.unlink(missing_ok=True)


def announcements() -> list[dict]:
    """The descriptors of the launches running now, oldest first."""
    found = []
    for path in launches_dir().glob("*.json"):
        with contextlib.suppress(OSError, ValueError):  # ended (and removed) while this looked
            found.append((path.stat().st_mtime_ns, json.loads(path.read_text(encoding="utf-8"))))
    return [descriptor for _, descriptor in sorted(found, key=lambda f: f[0])]
