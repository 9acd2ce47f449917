"""docs/performance.md is what benchmarks/run_all.py printed: one row per benchmark script, each
row exactly as run_all renders it from that benchmark's JSON line in docs/benchmarks.jsonl (or its
"not measured yet" row when it has none), and the model-quality panel from model_quality's line."""

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
    by_name = {r["benchmark"]: r for r in results}
    rows = _rows(run_all)
    assert len(by_name) == len(results) and set(by_name) <= {b.name for b in run_all.BENCHMARKS}
    assert [r["benchmark"] for r in results] == [b.name for b in run_all.BENCHMARKS if b.name in by_name]
    assert len(rows) == len(run_all.BENCHMARKS)
    for bench, row in zip(run_all.BENCHMARKS, rows, strict=True):
        if bench.name not in by_name:
            assert row == run_all.pending_row(bench)
            continue
        result = by_name[bench.name]
        where = row.rsplit(" | ", 1)[1].removesuffix(" |")
        assert "cores" in where and "GiB" in where
        assert row == run_all.row(bench, result, where)
        assert {"name", "ratio", "goal"} <= set(result)
    text = (ROOT / "docs" / "performance.md").read_text()
    shown = text.split(run_all.PANEL_BEGIN, 1)[1].split(run_all.PANEL_END, 1)[0].strip()
    assert shown == run_all.panel(by_name.get("model_quality"))


def test_writing_some_benchmarks_keeps_every_other_row_and_line(tmp_path, monkeypatch):
    run_all = _run_all()
    doc, lines = tmp_path / "performance.md", tmp_path / "benchmarks.jsonl"
    doc.write_text((ROOT / "docs" / "performance.md").read_text())
    lines.write_text((ROOT / "docs" / "benchmarks.jsonl").read_text())
    monkeypatch.setattr(run_all, "DOC", doc)
    monkeypatch.setattr(run_all, "LINES", lines)
    results, rows = run_all.recorded()
    bench = next(b for b in run_all.BENCHMARKS if b.name == "model_quality")
    entry = {"name": "digits-8", "data": "the sample", "image_size": 8, "deep_macro_f1": 0.9, "baseline": "rbf_svc",
             "baseline_macro_f1": 0.8, "ratio": 1.125, "goal": 1.0, "seconds": 100.0, "met": True}  # fmt: skip
    result = {"name": "model_quality", "ratio": 1.125, "goal": "g", "met": {"digits-8": True}, "all_met": True,
              "entries": [entry], "benchmark": "model_quality"}  # fmt: skip
    new_row = run_all.row(bench, result, "x86_64, 2 cores, 24 GiB")
    run_all.write({**rows, "model_quality": new_row}, {**results, "model_quality": result})
    after_results, after_rows = run_all.recorded()
    assert after_rows == {**rows, "model_quality": new_row}
    assert after_results == {**results, "model_quality": result}
    assert [json.loads(line)["benchmark"] for line in lines.read_text().splitlines()] == [
        b.name for b in run_all.BENCHMARKS if b.name in after_results]
    panel = doc.read_text().split(run_all.PANEL_BEGIN, 1)[1].split(run_all.PANEL_END, 1)[0].strip().splitlines()
    assert panel[:2] == run_all.PANEL_HEADER.splitlines()
    assert panel[2:] == ["| `digits-8` | the sample | 8 | 0.9 | rbf_svc | 0.8 | 1.125 | >= 1.00 | 100.0 | yes |"]
