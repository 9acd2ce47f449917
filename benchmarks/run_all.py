"""Every benchmark in benchmarks/ on this machine, one after the other, with its documented
command, and the table of docs/performance.md made from their JSON lines.

    .venv/bin/python benchmarks/run_all.py                 # all of them (about 85 minutes on 2 cores); prints the table
    .venv/bin/python benchmarks/run_all.py --write         # ... and puts it into docs/performance.md
    .venv/bin/python benchmarks/run_all.py --only rerun overhead
    .venv/bin/python benchmarks/run_all.py --only model_quality --write   # these rows only; the others stay as recorded

The rows are the CPU rows (this machine has no GPU; the GPU commands are in docs/performance.md).
Each row: the exact command, the measured figure against its anchor (the reference loop, bare
PIL decoding, the full grid, the first run, or the goal itself where there is no other anchor),
the ratio and its goal, and the machine. `--write` replaces the rows between the markers in
docs/performance.md and writes every benchmark's whole JSON line to docs/benchmarks.jsonl; with
`--only`, the chosen benchmarks' rows and lines replace theirs and the others keep what was
recorded. A benchmark with no recorded line has a "not measured yet" row. The model-quality panel
(one row per dataset, from model_quality's line) goes between its own markers.
Ends with one JSON line; ratio = benchmarks that met their goal / benchmarks run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DOC = ROOT / "docs" / "performance.md"
LINES = ROOT / "docs" / "benchmarks.jsonl"
BEGIN, END = "<!-- run_all: cpu rows begin -->", "<!-- run_all: cpu rows end -->"
PANEL_BEGIN, PANEL_END = "<!-- run_all: model-quality panel begin -->", "<!-- run_all: model-quality panel end -->"


@dataclass(frozen=True)
class Benchmark:
    script: str
    anchor: str
    figure: Callable[[dict], str]  # the measured figure against its anchor, from the JSON line
    met: Callable[[dict], bool]
    args: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        return self.script.removesuffix(".py")

    @property
    def command(self) -> str:
        return " ".join([".venv/bin/python", f"benchmarks/{self.script}", *self.args])


def _ingest(j: dict) -> str:
    return "; ".join(f"{k}: {v['images']:,} images, ingest {v['ingest_s']} s vs bare {v['bare_s']} s ({v['ratio']})"
                     for k, v in j.items() if isinstance(v, dict) and "bare_s" in v) + f"; scaling x10 {j['scaling']}"  # fmt: skip


def _quality(j: dict) -> str:
    entries = j["entries"]
    worst = min(entries, key=lambda e: -1 if e["ratio"] is None else e["ratio"])
    slowest = max(entries, key=lambda e: e["seconds"])
    return (f"{sum(e['met'] for e in entries)} of {len(entries)} datasets met their goal; lowest ratio {worst['ratio']} "
            f"({worst['name']}); slowest run {slowest['seconds']} s ({slowest['name']}); the panel is below")


BENCHMARKS = [
    Benchmark("train_throughput.py", "the reference loop (same arch, batch, resolution, mode)",
              lambda j: f"{j['arch']}@{j['res']} {j['mode']} on {j['device']}: trainer {j['trainer_img_per_s']} img/s vs "
                        f"reference {j['reference_img_per_s']} img/s; real input path {j['pipeline_img_per_s']} img/s "
                        f"({j['pipeline_ratio']} of the trainer)",
              lambda j: j["ratio"] >= 0.95),
    Benchmark("ingest.py", "bare PIL decoding (one thread, decode only)", _ingest,
              lambda j: j["ratio"] >= 0.8 and j["scaling"] <= j["scaling_goal"]),
    Benchmark("search.py", "the full grid (9 trials x 9 epochs)",
              lambda j: f"successive halving {j['halving_trial_epochs']} trial-epochs ({j['halving_s']} s) vs grid "
                        f"{j['grid_trial_epochs']} ({j['grid_s']} s); same winner {j['same_winner']}, within CI "
                        f"{j['within_ci']}; 2 launches side by side {j['parallel_s']} s ({j['parallel_wall_ratio']} of the grid)",
              lambda j: j["ratio"] <= 0.35 and (j["same_winner"] or j["within_ci"])),
    Benchmark("rerun.py", "the first run (same state directory)",
              lambda j: f"data stages on the rerun {j['rerun_stages_s']} s vs {j['first_stages_s']} s on the first run "
                        f"({', '.join(sorted(set(j['rerun_states'].values())))}); window {j['rerun_window_s']} s vs "
                        f"{j['first_window_s']} s ({j['window_ratio']})",
              lambda j: j["ratio"] <= 0.05),
    Benchmark("overhead.py", "the run's wall time",
              lambda j: f"overhead {j['overhead_s']} s of {j['wall_s']} s wall (compute {j['compute_s']} s); of it the "
                        f"wait for the temporary servers {j['startup_wait_s']} s; without that wait "
                        f"{j['ratio_without_the_startup_wait']}",
              lambda j: j["ratio"] <= 0.03),
    Benchmark("default_run.py", "the goal (180 s)",
              lambda j: f"`mlpipe run` {j['total_s']:.1f} s from an empty state directory",
              lambda j: j["ratio"] <= 1),
    Benchmark("anonymize.py", "the goal (100,000 rows/s)",
              lambda j: f"{j['structured']['large_rows_per_s']:,} structured rows/s at {j['structured']['large_rows']:,} rows "
                        f"(growth x10 {j['structured']['growth']}); with free text {j['all']['large_rows_per_s']:,} rows/s; "
                        f"lowest recall {min(j['recall'].values())}",
              lambda j: j["ratio"] >= 1 and j["structured"]["growth"] <= 12 and min(j["recall"].values()) >= 0.95),
    Benchmark("kanonymity.py", "record suppression (rows removed; same 1,200 rows, k = 5)",
              lambda j: f"{', '.join(j['quasi'])}, k={j['k']}: cell suppression keeps {j['rows_kept_cells']:,} of "
                        f"{j['rows_in']:,} rows (k achieved {j['k_achieved_cells']}; {j['cells_suppressed_total']} QI cells, "
                        f"entropy lost {j['information_loss']['cells']['entropy_loss_total']:.1%}) vs record suppression "
                        f"{j['rows_kept_records']:,} (entropy lost {j['information_loss']['records']['entropy_loss_total']:.1%}); "
                        f"{j['large_rows']:,} rows x 3 QIs in {j['seconds']['cells_large']} s",
              lambda j: j["rows_kept_cells"] == j["rows_in"] and j["k_achieved_cells"] >= j["k"]),
    Benchmark("dicom.py", "a bare pydicom loop (dcmread + pixel_array per file, one thread)",
              lambda j: f"{j['slices']:,} CT slices 512 px 16-bit ({j['files_mb']:,} MB): ingest {j['ingest_s']} s + anonymize "
                        f"{j['anonymize_s']} s vs bare pydicom {j['anchor_s']} s; {j['kept']:,} kept; the per-file work alone "
                        f"in one pass {j['one_pass_floor_s']} s (at best {j['floor_ratio']} here); OCR "
                        + (f"{j['ocr_s_per_image']} s/image" if j["ocr_s_per_image"] is not None else "not measured"),
              lambda j: j["ratio"] >= 0.7 and j["kept"] == j["slices"]),
    Benchmark("split_resample.py", "n log n growth (x 1.25)",
              lambda j: f"split {j['split']['large']:,} rows growth {j['split']['growth']} (bound {j['split']['nlogn_bound']:.2f}); "
                        f"SMOTE {j['smote']['large']:,} items growth {j['smote']['growth']} (bound {j['smote']['nlogn_bound']:.2f})",
              lambda j: j["ratio"] <= 1),
    Benchmark("predict.py", "a bare loop of the same model (read, PIL decode, resize, forward; batch 256)",
              lambda j: f"{j['images']:,} {j['side']} px PNGs at {j['image_size']} px: `mlpipe predict` "
                        f"{j['predict_images_per_s']:,} images/s vs bare {j['bare_images_per_s']:,} images/s; the whole "
                        f"command (start, model download) {j['cli_wall_s']} s",
              lambda j: j["ratio"] >= 0.8),
    Benchmark("model_quality.py", "the best classical baseline (highest test macro-F1, same split), per dataset", _quality,
              lambda j: j["all_met"] and not j.get("fast")),
    Benchmark("test_suite.py", "the goal (25 minutes, the CI aim)",
              lambda j: f"{j['passed']} passed in {j['wall_s']:.0f} s (exit {j['exit_code']})",
              lambda j: j["ratio"] <= 1 and j["exit_code"] == 0,
              ("--deselect", "tests/unit/test_performance_doc.py::" + "test_the_cpu_table_is_what_run_all_renders_from_the_recorded_json_lines")),
]  # fmt: skip


def machine() -> str:
    import torch

    memory = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                  if line.startswith("MemTotal"))  # fmt: skip
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{platform.machine()}, {os.cpu_count()} cores, {memory / 2**20:.0f} GiB, {gpu}, "
            f"Python {platform.python_version()}, torch {torch.__version__}")  # fmt: skip


def run(bench: Benchmark) -> dict:
    """The benchmark as its docstring says, in a process of its own; its last JSON line."""
    started = time.perf_counter()
    done = subprocess.run([sys.executable, str(HERE / bench.script), *bench.args], cwd=ROOT, capture_output=True,
                          text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})  # fmt: skip
    wall = time.perf_counter() - started
    last = next((line for line in reversed(done.stdout.splitlines()) if line.startswith("{")), None)
    if last is None:
        sys.exit(f"{bench.command} printed no JSON line (exit {done.returncode}): {done.stderr.strip()[-500:]}")
    return {**json.loads(last), "benchmark": bench.name, "benchmark_wall_s": round(wall, 1)}


def row(bench: Benchmark, result: dict, where: str) -> str:
    met = "yes" if bench.met(result) else "**no**"
    cells = [f"`{bench.name}`", f"`{bench.command}`", bench.figure(result), bench.anchor, str(result["ratio"]),
             result["goal"], met, where]  # fmt: skip
    return "| " + " | ".join(c.replace("|", "/") for c in cells) + " |"


def pending_row(bench: Benchmark) -> str:
    """The row of a benchmark with no recorded JSON line."""
    return f"| `{bench.name}` | `{bench.command}` | not measured yet | {bench.anchor} | - | - | not run | - |"


HEADER = "| benchmark | command | measured | anchor | ratio | goal | met | machine |\n|---|---|---|---|---|---|---|---|"
PANEL_HEADER = ("| dataset | data | px | deep macro-F1 | best baseline (on test) | its macro-F1 | ratio | goal | run s "
                "(goal 300) | met |\n|---|---|---|---|---|---|---|---|---|---|")  # fmt: skip


def panel(result: dict | None) -> str:
    """model_quality's entries, one row each; a line saying so when it has not been run."""
    if result is None:
        return "Not measured yet: `.venv/bin/python benchmarks/run_all.py --only model_quality --write`."
    rows = []
    for e in result["entries"]:
        cells = [f"`{e['name']}`", e["data"], str(e["image_size"]), str(e.get("deep_macro_f1", "-")),
                 str(e.get("baseline") or e.get("error", "-")), str(e.get("baseline_macro_f1", "-")), str(e["ratio"]),
                 f">= {e['goal']:.2f}", str(e["seconds"]), "yes" if e["met"] else "**no**"]  # fmt: skip
        rows.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    return "\n".join([PANEL_HEADER, *rows])


def _between(text: str, begin: str, end: str) -> tuple[str, str, str]:
    before, rest = text.split(begin, 1)
    inside, after = rest.split(end, 1)
    return before, inside, after


def recorded() -> tuple[dict[str, dict], dict[str, str]]:
    """What docs/ holds now, by benchmark name: the JSON lines and the table rows."""
    lines = [json.loads(line) for line in LINES.read_text().splitlines()] if LINES.exists() else []
    rows = _between(DOC.read_text(), BEGIN, END)[1].strip().splitlines()[2:]
    return {r["benchmark"]: r for r in lines}, {r.split("`", 2)[1]: r for r in rows}


def write(rows: dict[str, str], results: dict[str, dict]) -> None:
    """The table (a row per benchmark, in BENCHMARKS order), the panel and the JSON lines."""
    table = "\n".join([HEADER, *(rows.get(b.name, pending_row(b)) for b in BENCHMARKS)])
    before, _, after = _between(DOC.read_text(), BEGIN, END)
    text = f"{before}{BEGIN}\n{table}\n{END}{after}"
    before, _, after = _between(text, PANEL_BEGIN, PANEL_END)
    DOC.write_text(f"{before}{PANEL_BEGIN}\n{panel(results.get('model_quality'))}\n{PANEL_END}{after}")
    LINES.write_text("".join(json.dumps(results[b.name]) + "\n" for b in BENCHMARKS if b.name in results))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--only", nargs="+", choices=[b.name for b in BENCHMARKS])
    parser.add_argument("--write", action="store_true", help="replace the CPU rows of docs/performance.md")
    args = parser.parse_args()
    chosen = [b for b in BENCHMARKS if not args.only or b.name in args.only]
    started, where = time.perf_counter(), machine()
    results, rows = [], []
    for bench in chosen:
        print(f"running {bench.command}", file=sys.stderr, flush=True)
        result = run(bench)
        results.append(result)
        rows.append(row(bench, result, where))
        print(rows[-1], file=sys.stderr, flush=True)
    table = "\n".join([HEADER, *rows])
    print(table)
    if args.write:
        kept_results, kept_rows = recorded() if args.only else ({}, {})
        write({**kept_rows, **{b.name: r for b, r in zip(chosen, rows, strict=True)}},
              {**kept_results, **{b.name: r for b, r in zip(chosen, results, strict=True)}})
    met = sum(bench.met(r) for bench, r in zip(chosen, results, strict=True))
    print(json.dumps({"name": "run_all", "ratio": round(met / len(chosen), 3), "goal": "1.0 (every goal met)",
                      "benchmarks": len(chosen), "met": met, "wall_s": round(time.perf_counter() - started, 1),
                      "machine": where, "results": {b.name: r["ratio"] for b, r in zip(chosen, results, strict=True)}}))  # fmt: skip


if __name__ == "__main__":
    main()
