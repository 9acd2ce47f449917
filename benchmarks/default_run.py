"""Wall time of `mlpipe run` with no arguments (the embedded sample on CPU), per stage and in total.

    .venv/bin/python benchmarks/default_run.py [--repeat N]

Each repeat starts from an empty state directory (no caches), as a new user would. Stage
times come from the run's own console log: each stage ends at its task's "Finished" line and
starts where the previous one ended. Startup is process start to "Beginning flow run"
(imports, temporary Prefect server, MLflow parent run); shutdown is the flow's end to process
exit (waiting for the server to record every task run, stopping it). Ends with one JSON line; ratio = total / 180 s (goal <= 1).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime

GOAL_S = 180.0
STAGES = ["ingest", "anonymize", "label", "split", "resample", "train", "search", "evaluate"]
STAMP = re.compile(r"^(\d\d:\d\d:\d\d\.\d{3}) \| \w+\s+\| (.*)$")


def _t(stamp: str) -> float:
    return (datetime.strptime(stamp, "%H:%M:%S.%f") - datetime(1900, 1, 1)).total_seconds()


def one_run() -> dict:
    with tempfile.TemporaryDirectory() as home:
        env = {**os.environ, "MLPIPE_HOME": home}
        env.pop("MLFLOW_TRACKING_URI", None)
        wall_start, started = datetime.now(), time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "flows.cli", "run"], capture_output=True, text=True, env=env, cwd=home)
        total = time.perf_counter() - started
        wall_end = datetime.now()
    if done.returncode != 0:
        sys.exit(f"mlpipe run failed ({done.returncode}): {done.stderr.strip().splitlines()[-1:]}")
    log = (done.stdout + done.stderr).splitlines()
    events = [(m.group(1), m.group(2)) for m in map(STAMP.match, log) if m]
    begin = next(_t(s) for s, msg in events if "Beginning flow run" in msg)
    stages, previous = {}, begin
    for stage in STAGES:
        end = next(_t(s) for s, msg in events if re.search(rf"Task run '{stage}-\w+' - Finished", msg))
        stages[stage] = round(end - previous, 2)
        previous = end
    flow_end = next(_t(s) for s, msg in events if "Flow run" in msg and "Finished in state" in msg)
    # Log stamps and these two readings share the local wall clock.
    startup = begin - _t(wall_start.strftime("%H:%M:%S.%f")[:-3])
    shutdown = _t(wall_end.strftime("%H:%M:%S.%f")[:-3]) - flow_end
    return {"total_s": round(total, 2), "startup_s": round(startup, 2), "stages_s": stages,
            "shutdown_s": round(shutdown, 2),
            "test_macro_f1": float(re.search(r"macro_f1=([\d.]+)", done.stdout).group(1))}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=1)
    runs = [one_run() for _ in range(parser.parse_args().repeat)]
    for i, r in enumerate(runs):
        print(f"run {i}: total {r['total_s']:.1f}s  startup {r['startup_s']:.1f}s  "
              + "  ".join(f"{k} {v:.1f}s" for k, v in r["stages_s"].items()) + f"  shutdown {r['shutdown_s']:.1f}s")  # fmt: skip
    total = statistics.median(r["total_s"] for r in runs)
    stages = {s: statistics.median(r["stages_s"][s] for r in runs) for s in STAGES}
    print(json.dumps({"name": "mlpipe_run_default_wall", "ratio": round(total / GOAL_S, 3), "goal": "<= 1.0 (180 s)",
                      "total_s": total, "goal_s": GOAL_S, "stages_s": stages, "repeats": len(runs),
                      "cpus": os.cpu_count(), "runs": runs}))  # fmt: skip


if __name__ == "__main__":
    main()
