"""The train stage: every trial of the grid, trained by one torchrun launch of `mlpipe.train.worker`.

The caller creates an MLflow child run per trial and passes the ids in; rank 0 of the worker
logs per-epoch metrics into them. The worker reads only training and validation data.

Several machines (`train.nnodes` > 1): this node hosts the c10d rendezvous at
`train.rdzv_endpoint` and announces each launch in `<state>/launches/` (`mlpipe.train.nodes`);
`mlpipe join` (`join()`) on every other node runs each announced launch's torchrun there,
logging beside the spec (`launch-N.<hostname>.log`). A launch that the other nodes do not join
within `train.rdzv_timeout_s` fails. MLPIPE_HOME must be on storage every node mounts at the
same path, and the MLflow tracking URI reachable from every node: rank 0 may be on any of them.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import contextvars
import ctypes
import dataclasses
import fcntl
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

import numpy as np

from mlpipe.config import SearchConfig, TrainConfig, Trial
from mlpipe.errors import MlpipeError
from mlpipe.resample import training_set, training_set_for
from mlpipe.split import class_names, cv_folds, development_parts, training_items
from mlpipe.store import StageResult, code_version, final_path, stable_hash, stage_dir, write_json
from mlpipe.train.nodes import Nodes, announced, announcements
from mlpipe.train.model import build_model
from mlpipe.train.spec import NewRun, TrialResult, TrialSpec, WorkerSpec, is_done, resolve_budget

log = logging.getLogger(__name__)


def uses_cuda(cfg: TrainConfig) -> bool:
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise MlpipeError("train.device is cuda but no CUDA device is available")
    return cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())


def resolve_nproc(cfg: TrainConfig, search: SearchConfig | None = None) -> int:
    """`auto`: one process per visible GPU, or one CPU process; in a search with
    `max_parallel: auto`, one GPU a trial (the trials run side by side instead)."""
    if cfg.nproc != "auto":
        return cfg.nproc
    if not uses_cuda(cfg):
        return 1
    return 1 if search is not None and search.max_parallel == "auto" else max(1, len(visible_gpus()))


def torchrun_command(spec_path: Path, nproc: int, max_restarts: int, rendezvous: list[str] | None = None) -> list[str]:
    """`rendezvous`: `Nodes.torchrun_args` for a multi-node job; by default a local rendezvous on
    a free port (--standalone), so parallel jobs never collide."""
    return [
        sys.executable, "-m", "torch.distributed.run",
        *(rendezvous or ["--standalone"]),
        f"--nproc-per-node={nproc}",
        f"--max-restarts={max_restarts}",
        "-m", "mlpipe.train.worker", "--spec", str(spec_path),
    ]  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Launch:
    """One torchrun job: a spec of trials and where it runs. Picklable, so a Prefect task runner
    (thread, process or Dask) can carry it to the process that starts torchrun."""

    spec_path: Path
    nproc: int
    max_restarts: int
    log_path: Path
    cpu: bool
    threads: int | None = None  # CPU threads per process; None: the cores / nproc
    devices: str | None = None  # CUDA_VISIBLE_DEVICES for this job; None: inherit
    nodes: Nodes | None = None  # several machines; None: this one

    @property
    def name(self) -> str:
        return self.log_path.stem

    def run(self) -> None:
        launch(self.spec_path, self.nproc, self.max_restarts, self.log_path, self.cpu, self.threads, self.devices,
               self.nodes)  # fmt: skip


def launch(
    spec_path: Path, nproc: int, max_restarts: int, log_path: Path, cpu: bool,
    threads: int | None = None, devices: str | None = None, nodes: Nodes | None = None,
) -> None:  # fmt: skip
    """Run torchrun, stream its output to the log, fail with the worker's exception. With `nodes`,
    announced to `mlpipe join` on the other nodes while it runs."""
    env = torchrun_env(cpu, nproc, threads, devices)
    if nodes is None:
        run_torchrun(torchrun_command(spec_path, nproc, max_restarts), log_path, env)
        return
    rdzv_id = f"{log_path.stem}-{uuid.uuid4().hex[:12]}"  # new for every launch: joining nodes run each id once
    joiners = torchrun_command(spec_path, nproc, max_restarts, nodes.torchrun_args(rdzv_id, host=False))
    with announced(rdzv_id, joiners[1:], nproc, cpu, log_path):
        try:
            run_torchrun(torchrun_command(spec_path, nproc, max_restarts, nodes.torchrun_args(rdzv_id, host=True)),
                         log_path, env)  # fmt: skip
        except MlpipeError as err:
            if "RendezvousTimeoutError" not in str(err):
                raise
            raise MlpipeError(f"training failed: not all {nodes.count} nodes joined the rendezvous at {nodes.endpoint} "
                              f"within {nodes.timeout_s} s (train.rdzv_timeout_s); run `mlpipe join` on the other "
                              "nodes, with MLPIPE_HOME on the storage they share") from None  # fmt: skip


def torchrun_env(cpu: bool, nproc: int, threads: int | None, devices: str | None) -> dict[str, str]:
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "PYTHONUNBUFFERED": "1"}
    if cpu:  # share the cores instead of oversubscribing them nproc times
        env["OMP_NUM_THREADS"] = str(threads or max(1, (os.cpu_count() or 1) // nproc))
    if devices is not None:
        env["CUDA_VISIBLE_DEVICES"] = devices
    return env


def run_torchrun(argv: list[str], log_path: Path, env: dict[str, str]) -> None:
    """Run torchrun's `argv`, stream its output to the log; fail with the worker's exception (its
    `mlpipe-worker-error:` line), else with torchrun's exit code and last error line.

    torchrun runs in a process group of its own. Whatever ends this call early (an exception,
    Prefect's cancellation signal, Ctrl-C, SIGTERM) takes the whole group down with it, and a
    parent killed outright takes torchrun down through the kernel's parent-death signal, so no
    worker outlives its run.
    """
    tail: deque[str] = deque(maxlen=40)
    raised: re.Match | None = None  # the first worker exception in the output: the cause, not a consequence
    with open(log_path, "w", encoding="utf-8") as sink, _sigterm_raises():
        proc = subprocess.Popen(
            argv,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
            start_new_session=True, preexec_fn=_die_with_parent,
        )  # fmt: skip
        try:
            for line in proc.stdout:
                sink.write(line)
                sink.flush()  # the log is live: `tail -f` shows each epoch as it ends (Progress follows it)
                tail.append(line.rstrip())
                raised = raised or WORKER_ERROR.search(line)
            code = proc.wait()
        except BaseException:
            stop_process_group(proc)
            raise
    if code != 0:
        raise MlpipeError(failure_message(code, raised, list(tail), log_path))


# The line `mlpipe.train.worker.error_line` prints before a worker's exception propagates.
WORKER_ERROR = re.compile(r"mlpipe-worker-error: (?P<trial>\S+) rank (?P<rank>\d+): (?P<error>.+)$")
# torchrun's summary: its root cause's `traceback :` field, and lines that name no cause.
ROOT_CAUSE = re.compile(r"^\s*traceback\s*:\s*(?P<cause>.+)$")
NO_CAUSE = ("To enable traceback", "error_file:", "ChildFailedError")


def failure_message(code: int, raised: re.Match | None, tail: list[str], log_path: Path) -> str:
    """`training failed: ValueError: ... (trial-000, rank 0; full log: ...)` from the worker's own
    error line; without one (a worker killed by a signal, torchrun failing before any worker ran),
    torchrun's exit code and its root cause or last error line."""
    if raised is not None:
        where = f"{raised['trial']}, rank {raised['rank']}" if raised["trial"] != "-" else f"rank {raised['rank']}"
        return f"training failed: {raised['error'].strip()} ({where}; full log: {log_path})"
    causes = [m["cause"] for m in map(ROOT_CAUSE.match, tail)
              if m and not m["cause"].startswith(("To enable", "Traceback"))]  # fmt: skip
    errors = [t for t in tail if ("Error" in t or "error" in t) and not any(n in t for n in NO_CAUSE)]
    last = (causes or errors or tail or ["no output"])[-1].strip()
    return f"training failed (torchrun exit code {code}): {last} (full log: {log_path})"


def join(idle_exit_s: float | None = None, poll_s: float = 1.0) -> dict[str, str | None]:
    """This node's part of every multi-node launch announced in the state directory, each run once,
    one at a time, until no new one has come for `idle_exit_s` (None: until stopped). Returns
    each joined launch's error (None: it succeeded); a failure is logged and the next one joined."""
    outcomes: dict[str, str | None] = {}
    idle_since = time.monotonic()
    with _sigterm_raises():  # SIGTERM stops the torchrun being joined, like a cancelled launch
        while idle_exit_s is None or time.monotonic() - idle_since < idle_exit_s:
            for descriptor in announcements():
                if descriptor["rdzv_id"] not in outcomes:
                    outcomes[descriptor["rdzv_id"]] = _join_one(descriptor)
                    idle_since = time.monotonic()
            time.sleep(poll_s)
    return outcomes


def _join_one(descriptor: dict[str, Any]) -> str | None:
    log_path = Path(descriptor["log"])
    log_path = log_path.with_name(f"{log_path.stem}.{socket.gethostname()}.log")  # beside the launching node's
    log.info("joining %s (log %s)", descriptor["rdzv_id"], log_path)
    # CPU threads: this node's own OMP_NUM_THREADS if set, else its cores / nproc
    env = torchrun_env(descriptor["cpu"], descriptor["nproc"], int(os.environ.get("OMP_NUM_THREADS", 0)) or None, None)
    try:
        run_torchrun([sys.executable, *descriptor["argv"]], log_path, env)
    except (MlpipeError, OSError) as err:
        log.warning("%s failed: %s", descriptor["rdzv_id"], err)
        return str(err)
    log.info("%s done", descriptor["rdzv_id"])
    return None


def run_in_threads(jobs: list[Launch]) -> None:
    """The default fan-out: one job runs here; several run in threads (each thread only waits on
    its torchrun). Every job runs to its end, so finished trials are kept even when one fails."""
    if len(jobs) == 1:
        jobs[0].run()
        return
    with concurrent.futures.ThreadPoolExecutor(len(jobs), thread_name_prefix="torchrun") as pool:
        futures = [pool.submit(job.run) for job in jobs]
    raise_first_failure([f.exception() for f in futures], len(jobs))


def raise_first_failure(errors: list[BaseException | None], jobs: int) -> None:
    failed = [e for e in errors if e is not None]
    if len(failed) == 1 and jobs == 1:
        raise failed[0]
    if failed:
        raise MlpipeError(f"{len(failed)} of {jobs} training launches failed; first: {failed[0]}") from failed[0]


def parallel_slots(search: SearchConfig | None, cuda: bool, nproc: int, jobs: int) -> list[str | None]:
    """The CUDA_VISIBLE_DEVICES of each parallel launch (None: inherit), as many as
    `search.max_parallel` allows: GPUs are split into disjoint slices of `nproc`; on CPU the
    launches share the cores."""
    want = search.max_parallel if search is not None else 1
    if not cuda:
        return [None] * max(1, min(jobs, max(1, (os.cpu_count() or 1) // nproc) if want == "auto" else want))
    gpus = visible_gpus()
    k = max(1, min(jobs, len(gpus) // nproc if want == "auto" else want))
    if k * nproc > len(gpus):
        raise MlpipeError(f"search.max_parallel={want} with train.nproc={nproc} needs {k * nproc} GPUs; {len(gpus)} visible")
    return [None] if k == 1 else [",".join(gpus[i * nproc:(i + 1) * nproc]) for i in range(k)]


def visible_gpus() -> list[str]:
    """The GPUs this process may use, as CUDA_VISIBLE_DEVICES entries (they may be UUIDs)."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [d.strip() for d in listed.split(",") if d.strip()]
    return [str(i) for i in range(torch.cuda.device_count())]


def stop_process_group(proc: subprocess.Popen, grace_s: float = 10.0) -> None:
    """SIGTERM to torchrun's whole group (torchrun stops its workers), SIGKILL after `grace_s`."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=grace_s)
            break
        except subprocess.TimeoutExpired:
            continue
    with contextlib.suppress(ProcessLookupError):  # workers that ignored SIGTERM
        os.killpg(proc.pid, signal.SIGKILL)


def _die_with_parent() -> None:
    """In the child before exec: receive SIGTERM if the launching process dies (Linux prctl)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


@contextlib.contextmanager
def _sigterm_raises():
    """A plain process dies on SIGTERM without unwinding; while training, SIGTERM raises instead
    so the workers are stopped first. (Prefect installs its own handler; that one is kept.)"""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) not in (
        signal.SIG_DFL, None
    ):
        yield
        return

    def handler(signum, frame):
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class Progress:
    """Epochs done out of epochs planned (all trials, all folds), from the worker's output lines:
    a terminal bar (only on a terminal) and `on_progress(fraction)` for the Prefect artifact.
    An early-stopped run counts its skipped epochs as done."""

    DONE = re.compile(r"^\[(?P<name>[^\]]+)\] done: best epoch \d+ of (?P<ran>\d+)")

    def __init__(self, planned: dict[str, int], on_progress: Callable[[float], None] | None):
        from tqdm import tqdm

        self.planned, self.on_progress, self.done = planned, on_progress, 0
        self.bar = tqdm(total=sum(planned.values()), unit="epoch", desc="train", disable=None)

    def line(self, line: str) -> None:
        if line.startswith("[trial-"):  # "[trial-000] done: ...": one line per trial into the log
            log.info(line)
            self.run_done(line)
        elif " epoch " in line and " img/s" in line:
            self.epoch()

    @contextlib.contextmanager
    def following(self, logs: list[Path], every_s: float = 0.5) -> Iterator[None]:
        """Read the launches' logs as they grow (wherever the launches run, the logs are in the
        trial folders) and count their epochs, until the block ends. The logs of joining nodes
        (`launch-N.<host>.log`) are read too: rank 0, which prints, may be on any node."""
        offsets: dict[Path, int] = {}

        def poll() -> None:
            for path in [p for own in logs for p in (own, *own.parent.glob(f"{own.stem}.*.log"))]:
                with contextlib.suppress(FileNotFoundError), open(path, "rb") as f:
                    f.seek(offsets.get(path, 0))
                    chunk = f.read()
                    whole = chunk[: chunk.rfind(b"\n") + 1]
                    offsets[path] = offsets.get(path, 0) + len(whole)
                    for line in whole.decode("utf-8", errors="replace").splitlines():
                        self.line(line)

        stop = threading.Event()

        def follow() -> None:
            while not stop.wait(every_s):
                poll()

        context = contextvars.copy_context()  # Prefect's run context: logs and the artifact belong to the task
        reader = threading.Thread(target=context.run, args=(follow,), daemon=True, name="progress")
        reader.start()
        try:
            yield
        finally:
            stop.set()
            reader.join()
            poll()

    def epoch(self) -> None:
        self._advance(1)

    def run_done(self, line: str) -> None:
        match = self.DONE.match(line)
        if match:
            self._advance(self.planned.get(match["name"], 0) - int(match["ran"]))

    def _advance(self, epochs: int) -> None:
        self.done += max(epochs, 0)
        self.bar.update(max(epochs, 0))
        if self.on_progress is not None:
            self.on_progress(min(1.0, self.done / max(1, sum(self.planned.values()))))

    def finish(self) -> None:
        """Trials dropped by successive halving never run their remaining epochs: count them done."""
        self._advance(sum(self.planned.values()) - self.done)

    def close(self) -> None:
        self.bar.close()


def trial_dir(splits: StageResult, resampled: StageResult, trial: Trial, fold: str) -> Path:
    """Where one trial (one fold of it) trains, keyed by (split fingerprint, its training set,
    its config, code version): a rerun finds finished trials there and the unfinished one's
    `last.pt`, so killing a search and running it again repeats no finished trial."""
    key = stable_hash(splits.key, training_set_for(resampled, trial, fold), keyed(trial.train), fold,
                      code_version("mlpipe.train"))[:16]  # fmt: skip
    return final_path("trials", key)


# Fields that say how or where jobs run, never what they compute: no key includes them.
EXECUTION_ONLY = {"max_parallel", "task_runner", "dask_address"}  # of search
WHERE_ONLY = {"rdzv_endpoint", "rdzv_timeout_s"}  # of train (nnodes is kept: it sets the world size)


def keyed(cfg: TrainConfig) -> dict[str, Any]:
    """A train section as the trial, stage and refit keys see it."""
    return cfg.model_dump(exclude=WHERE_ONLY)


def budgets(trials: list[Trial], search: SearchConfig | None) -> list[int | None]:
    """Epoch budget per rung: one rung of full training for a grid; for successive halving
    min_epochs, x factor, ... up to the longest trial's train.epochs."""
    if search is None or search.strategy == "grid":
        return [None]
    top, budget, out = max(t.train.epochs for t in trials), search.min_epochs, []
    while budget < top:
        out.append(budget)
        budget *= search.halving_factor
    return [*out, top]


@contextlib.contextmanager
def _locked(folders: list[Path]) -> Iterator[None]:
    """Exclusive locks on trial folders (in a fixed order: no deadlock), so two runs that share a
    trial never train it into the same folder at once: the second waits, then reuses it."""
    with contextlib.ExitStack() as stack:
        for folder in sorted(set(folders)):
            folder.mkdir(parents=True, exist_ok=True)
            handle = stack.enter_context(open(folder / ".lock", "w"))
            fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def _done(folder: Path, trial: Trial, budget: int | None) -> bool:
    path = folder / "result.json"
    return path.exists() and is_done(TrialResult.model_validate_json(path.read_text()), budget, trial.train.epochs)


def train(
    splits: StageResult,
    resampled: StageResult,
    trials: list[Trial],
    run_ids: dict[str, str],
    tracking_uri: str | None,
    on_progress: Callable[[float], None] | None = None,
    search: SearchConfig | None = None,
    run_launches: Callable[[list[Launch]], None] | None = None,
    parent: tuple[str, str] | None = None,
) -> StageResult:
    """Train all trials; returns a report with one entry per trial (validation metrics only). In
    kfold mode each trial is trained once per fold and its entry holds the fold means.
    Finished trials (same data, config and code) are reused, not retrained. With
    `search.strategy: halving` the trials train in rungs of growing epoch budgets and only the
    best 1/factor (on `search.metric`) continue, each from its own checkpoint.

    `on_progress(fraction)` is called after every epoch with the share of planned epochs done.
    Up to `search.max_parallel` launches run at once, through `run_launches(jobs)` (a Prefect
    task runner in the flow; threads here by default), which returns when all have ended.

    MLflow: a trial in `run_ids` logs into that run; any other, with `parent` (parent run id,
    experiment id), into a child run its worker starts when the trial starts training.
    """
    folds = cv_folds(splits)
    how = search.model_dump(exclude=EXECUTION_ONLY) if search else None  # how trials run leaves results unchanged
    key = stable_hash(splits.key, resampled.key, [{**t.model_dump(), "train": keyed(t.train)} for t in trials], how,
                      code_version("mlpipe.train"))[:16]  # fmt: skip
    num_classes = len(class_names(splits))
    # Keys and folders from the config as given (the budget follows from it and the training set,
    # both in the key); the trials that run carry their resolved budget.
    dirs = {(t.name, fold): trial_dir(splits, resampled, t, fold) for t in trials for fold, _, _ in folds}
    trials = [budgeted(t, resampled, folds[0][0], search) for t in trials]
    fetch_weights(trials, splits)
    planned = {f"{t.name}-{fold}" if fold else t.name: t.train.epochs
               for t in trials for fold, _, _ in folds if not _done(dirs[t.name, fold], t, None)}  # fmt: skip
    progress = Progress(planned, on_progress)
    alive, rungs, launched, n = list(trials), [], set(), 0
    plan = budgets(trials, search)
    with stage_dir("train", key) as out, contextlib.closing(progress):
        for rung, budget in enumerate(plan):
            groups: dict[tuple[bool, int, int, Nodes | None], list[Trial]] = {}
            for trial in alive:  # launches per (device, nproc, restarts, nodes) combination; usually one
                cuda = uses_cuda(trial.train)
                where = (cuda, resolve_nproc(trial.train, search), trial.train.max_restarts, Nodes.of(trial.train))
                groups.setdefault(where, []).append(trial)
            for (cuda, nproc, restarts, nodes), members in groups.items():
                pending = [(t, fold, val) for t in members for fold, _, val in folds if not _done(dirs[t.name, fold], t, budget)]
                if not pending:
                    continue
                with _locked([dirs[t.name, fold] for t, fold, _ in pending]):
                    # another run may have finished some of them while this one waited for the locks
                    pending = [(t, fold, val) for t, fold, val in pending if not _done(dirs[t.name, fold], t, budget)]
                    if not pending:
                        continue
                    specs = [_trial_spec(t, fold, str(splits.file(val)), resampled, dirs[t.name, fold], run_ids.get(t.name),
                                         budget, parent)
                             for t, fold, val in pending]  # fmt: skip
                    launched.update(t.name for t, _, _ in pending)
                    slots = parallel_slots(search, cuda, nproc, len(specs))
                    jobs = []
                    for i, devices in enumerate(slots):  # trials dealt round-robin over the parallel launches
                        spec = WorkerSpec(pixels=str(splits.file("pixels")), val_set=None, num_classes=num_classes,
                                          tracking_uri=tracking_uri, trials=specs[i :: len(slots)])  # fmt: skip
                        jobs.append(Launch(write_json(out / f"launch-{n}.json", spec.model_dump()), nproc, restarts,
                                           out / f"launch-{n}.log", cpu=not cuda, devices=devices, nodes=nodes,
                                           threads=max(1, (os.cpu_count() or 1) // (nproc * len(slots)))))  # fmt: skip
                        n += 1
                    with progress.following([job.log_path for job in jobs]):
                        (run_launches or run_in_threads)(jobs)
            rungs.append({"budget": budget, "trials": [t.name for t in alive]})
            if budget is None or len(alive) <= 1 or rung == len(plan) - 1:
                break
            score = {t.name: _trial_entry(t, {f: dirs[t.name, f] for f, _, _ in folds}, None, False)["val_metrics"][search.metric]
                     for t in alive}  # fmt: skip
            keep = max(1, -(-len(alive) // search.halving_factor))
            alive = sorted(alive, key=lambda t: -score[t.name])[:keep]  # stable: ties keep grid order
        progress.finish()
        results = [_trial_entry(t, {fold: dirs[t.name, fold] for fold, _, _ in folds}, run_ids.get(t.name),
                                cached=t.name not in launched, parent_id=parent[0] if parent else None)
                   for t in trials]  # fmt: skip
        report = {
            "trials": results, "num_classes": num_classes, "folds": len(folds) if folds[0][0] else None,
            "reused_trials": sum(r["cached"] for r in results),
            "strategy": search.strategy if search else "grid", "rungs": rungs,
            "trial_epochs": sum(r["epochs_run"] for r in results),
            "full_grid_trial_epochs": sum(t.train.epochs for t in trials) * len(folds),
        }  # fmt: skip
        write_json(out / "report.json", report)
    return StageResult.at("train", key, report, pixels=splits.file("pixels"))


def budgeted(trial: Trial, resampled: StageResult, fold: str, search: SearchConfig | None) -> Trial:
    """The trial with its train section resolved (`resolve_budget`) for its own training set
    (SMOTE and oversampling make it larger) and world size."""
    items = len(np.load(training_set_for(resampled, trial, fold))["y"])
    world = resolve_nproc(trial.train, search) * trial.train.nnodes
    return trial.model_copy(update={"train": resolve_budget(trial.train, items, world)})


def fetch_weights(trials: list[Trial], splits: StageResult) -> None:
    """Download (or find in the local cache or file) each distinct `train.pretrained` once, here,
    before any launch: ranks then read the cache, and a missing file or no network stops the
    stage in one line instead of in every rank."""
    shape = np.load(splits.file("pixels"), mmap_mode="r").shape  # (N, H, W, C)
    for model, weights in sorted({(t.train.model, t.train.pretrained) for t in trials if t.train.pretrained}):
        build_model(model, shape[3], len(class_names(splits)), shape[1], weights)


def _trial_entry(trial: Trial, folds: dict[str, Path], run_id: str | None, cached: bool, parent_id: str | None = None) -> dict:
    """A trial's report entry; with several folds, metrics are fold means (and their spread).
    A reused trial carries its history, so its new MLflow run still gets the per-epoch curves.
    The MLflow run its worker started is taken only when it belongs to this pipeline run
    (`parent_id`): another run sharing the trial folder may have trained it last."""
    runs = [TrialResult.model_validate_json((folder / "result.json").read_text()) for folder in folds.values()]
    entry = {"trial": trial.name, "params": trial.params, "run_id": run_id, "cached": cached}
    if len(runs) == 1:
        only = runs[0]
        return {**entry, **only.model_dump(exclude={"history", "checkpoint", "run_id", "ended_ms"}),
                # a reused trial's run and end time belong to the run that trained it
                "run_id": run_id or (only.run_id if not cached and only.parent_run_id == parent_id else None),
                "ended_ms": None if cached else only.ended_ms,
                "checkpoint": str(next(iter(folds.values())) / "checkpoint.pt"),
                "history": only.history if cached else None}  # fmt: skip
    metrics = {k: [r.val_metrics[k] for r in runs] for k in runs[0].val_metrics}
    return {
        **entry,
        "val_metrics": {k: float(np.mean(v)) for k, v in metrics.items()},
        "val_metrics_std": {k: float(np.std(v)) for k, v in metrics.items()},
        "fold_val_metrics": [r.val_metrics for r in runs],
        "best_epoch": int(round(float(np.mean([r.best_epoch for r in runs])))),
        "epochs_run": sum(r.epochs_run for r in runs),
        "stopped_early": all(r.stopped_early for r in runs),
        "world_size": runs[0].world_size, "device": runs[0].device, "amp": runs[0].amp,
        "train_items": runs[0].train_items,
        "seconds": round(sum(r.seconds for r in runs), 3),
        "ended_ms": None if cached or None in (ended := [r.ended_ms for r in runs]) else max(ended),
        "checkpoint": None,  # no single fold model saw all the data: the winner is refit
        "history": None,
    }  # fmt: skip


def _trial_spec(
    trial: Trial, fold: str, val_set: str, resampled: StageResult, folder: Path, run_id: str | None, budget: int | None,
    parent: tuple[str, str] | None = None,
) -> TrialSpec:  # fmt: skip
    folder.mkdir(parents=True, exist_ok=True)
    new_run = None
    if run_id is None and parent is not None:
        new_run = NewRun(parent_run_id=parent[0], experiment_id=parent[1], params=trial.flat_params())
    return TrialSpec(
        stop_after=budget,
        name=f"{trial.name}-{fold}" if fold else trial.name,
        train=trial.train,
        train_set=training_set_for(resampled, trial, fold),
        out_dir=str(folder),
        run_id=run_id,
        new_run=new_run,
        val_set=val_set,
        metric_prefix=f"{fold}/" if fold else "",
    )


def needs_refit(splits: StageResult, search: SearchConfig) -> bool:
    return search.refit or splits.report.get("mode") == "kfold"


def refit(
    best: StageResult, splits: StageResult, trials: list[Trial], run_id: str | None, tracking_uri: str | None
) -> StageResult:
    """The winning trial retrained on train+val (all folds) for its best epoch count, no
    validation left to stop on; its checkpoint replaces the search winner's for the test."""
    trial = next(t for t in trials if t.name == best.report["winner"])
    epochs = best.report["winner_best_epoch"] + 1
    index, y, _ = training_items(splits, development_parts(splits), trial.resample.drop_label_issues)
    pixels = np.load(splits.file("pixels"), mmap_mode="r")
    data = training_set(pixels, index, y, trial.resample, class_names(splits))
    cfg = resolve_budget(trial.train, len(data["y"]), resolve_nproc(trial.train) * trial.train.nnodes, epochs)
    key = stable_hash(best.key, splits.key, keyed(cfg), code_version("mlpipe.train"))[:16]
    with stage_dir("refit", key) as out:
        np.savez(out / "train.npz", **data)
        spec = WorkerSpec(pixels=str(splits.file("pixels")), val_set=None, num_classes=len(class_names(splits)),
                          tracking_uri=tracking_uri,
                          trials=[TrialSpec(name=f"{trial.name}-refit", train=cfg, train_set=str(out / "train.npz"),
                                            out_dir=str(out), run_id=run_id)])  # fmt: skip
        spec_path = write_json(out / "launch.json", spec.model_dump())
        with contextlib.closing(Progress({f"{trial.name}-refit": epochs}, None)) as progress, progress.following([out / "launch.log"]):
            launch(spec_path, resolve_nproc(cfg), cfg.max_restarts, out / "launch.log", cpu=not uses_cuda(cfg),
                   nodes=Nodes.of(cfg))  # fmt: skip
        result = TrialResult.model_validate_json((out / "result.json").read_text())
        report = {**best.report, "refit": {"trial": trial.name, "epochs": epochs, "train_items": result.train_items,
                                           "synthetic": int(data["synthetic"].sum()), "seconds": result.seconds,
                                           "run_id": run_id}}  # fmt: skip
        write_json(out / "report.json", report)
    return StageResult.at("refit", key, report, checkpoint=final_path("refit", key) / "checkpoint.pt")
