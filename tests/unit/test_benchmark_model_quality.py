"""benchmarks/model_quality.py: the comparison it makes and the panel it documents (no pipeline runs here)."""

import importlib.util
import sys
from pathlib import Path

import pytest

from mlpipe import datasets

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("model_quality", ROOT / "benchmarks" / "model_quality.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["model_quality"] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def _report(**baselines):
    return {"metrics": {"test_macro_f1": 0.9}, "best_baseline": "logistic_regression",
            "baselines": {k: {"test_macro_f1": v, "val_macro_f1": 0.99 if k == "logistic_regression" else 0.5}
                          for k, v in baselines.items()}}  # fmt: skip


def test_the_best_baseline_is_the_highest_on_test_not_the_one_validation_chose(bench):
    got = bench.scores(_report(logistic_regression=0.80, rbf_svc=0.88), "x", tolerate_missing=False)
    assert got["baseline"] == "rbf_svc" and got["baseline_macro_f1"] == 0.88
    assert got["ratio"] == pytest.approx(0.9 / 0.88, abs=1e-4)
    assert got["val_chosen_baseline"] == "logistic_regression"


def test_a_report_without_baselines_stops_the_benchmark_unless_it_is_a_smoke_test(bench):
    report = {"metrics": {"test_macro_f1": 0.9}}
    with pytest.raises(SystemExit, match="no classical baselines"):
        bench.scores(report, "digits-8", tolerate_missing=False)
    with pytest.raises(SystemExit, match="no classical baselines"):
        bench.scores({**report, "baselines": {}}, "digits-8", tolerate_missing=False)
    assert bench.scores(report, "digits-8", tolerate_missing=True)["ratio"] is None


def test_the_panel_is_the_documented_one(bench):
    doc = (ROOT / "benchmarks" / "model_quality.py").read_text().split('"""')[1]
    names = [e.name for e in bench.PANEL]
    assert names == ["digits-8", *(f"digits-{s}-{r}" for s in (16, 32, 64) for r in ("nearest", "bilinear")),
                     "digits-long-tailed", "digits-noisy", "fashion-long-tailed-3000", "fashion-balanced-10000"]  # fmt: skip
    for entry in bench.PANEL:
        assert entry.goal == (1.03 if entry.name.startswith("fashion-") else 1.00)
        if entry.name.startswith("fashion-"):
            assert entry.overrides == datasets.FASHION_OVERRIDES
        elif entry.name.split("-")[1].isdigit():
            assert entry.overrides == {"ingest.image_size": int(entry.name.split("-")[1])}
        else:
            assert entry.overrides == {} and f"`{entry.name}`" in doc
