"""docs/performance.md is what benchmarks/run_all.py printed: one row per benchmark script, each
row exactly as run_all renders it from that benchmark's JSON line in docs/benchmarks.jsonl."""

import importlib.util
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _run_all():
    spec = importlib.util.spec_from_file_location("run_all", ROOT / "benchmarks" / "run_all.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["run_all"] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def _rows(run_all) -> list[str]:
    text = (ROOT / "docs" / "performance.md").read_text()
    block = text.split(run_all.BEGIN, 1)[1].split(run_all.END, 1)[0].strip().splitlines()
    assert "\n".join(block[:2]) == run_all.HEADER
    return block[2:]


def test_run_all_covers_every_benchmark_script_with_the_command_its_docstring_gives():
    run_all = _run_all()
    scripts = {p.name for p in (ROOT / "benchmarks").glob("*.py") if not p.name.startswith("_")} - {"run_all.py"}
    assert {b.script for b in run_all.BENCHMARKS} == scripts
    for bench in run_all.BENCHMARKS:
        doc = (ROOT / "benchmarks" / bench.script).read_text().split('"""')[1]
        documented = f".venv/bin/python benchmarks/{bench.script}"
        assert documented in doc and bench.command.startswith(documented), f"{bench.script} documents another command"


def test_the_cpu_table_is_what_run_all_renders_from_the_recorded_json_lines():
    run_all = _run_all()
    results = [json.loads(line) for line in (ROOT / "docs" / "benchmarks.jsonl").read_text().splitlines()]
    rows = _rows(run_all)
    assert len(rows) == len(results) == len(run_all.BENCHMARKS)
    for bench, result, row in zip(run_all.BENCHMARKS, results, rows, strict=True):
        where = row.rsplit(" | ", 1)[1].removesuffix(" |")
        assert "cores" in where and "GiB" in where
        assert row == run_all.row(bench, result, where)
        assert result["benchmark"] == bench.name and {"name", "ratio", "goal"} <= set(result)
