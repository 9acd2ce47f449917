"""The quality bar's structural rules, checked on the source itself."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
STAGES = ["ingest", "anonymize", "label", "split", "resample", "train", "search", "refit", "evaluate"]


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def _sources(*folders):
    return [p for f in folders for p in sorted((ROOT / f).rglob("*.py"))]


def test_library_never_imports_prefect():
    offenders = [p for p in _sources("mlpipe") if any(n.split(".")[0] == "prefect" for n in _imports(p))]
    assert offenders == []


def test_only_the_tracking_module_imports_mlflow():
    importers = [p.relative_to(ROOT).as_posix() for p in _sources("mlpipe", "tasks", "flows", "deployments")
                 if any(n.split(".")[0] == "mlflow" for n in _imports(p))]  # fmt: skip
    assert importers == ["mlpipe/tracking.py"]


@pytest.mark.parametrize(
    ("module", "forbidden"),
    [
        ("mlpipe.config, mlpipe.ingest, mlpipe.anonymize, mlpipe.label, mlpipe.split, mlpipe.resample, "
         "mlpipe.train.launch, mlpipe.search, mlpipe.evaluate, mlpipe.tracking", ["prefect"]),
        ("mlpipe.train.worker", ["prefect", "mlflow", "imblearn"]),
    ],
)
def test_imports_at_run_time(module, forbidden):
    code = f"import sys, {module}; print([m for m in {forbidden!r} if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"


def _task_functions():
    for path in _sources("tasks"):
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.FunctionDef) and any(
                isinstance(d, ast.Call) and getattr(d.func, "id", "") == "task" for d in node.decorator_list
            ):
                yield path, node


def _task_name(node: ast.FunctionDef) -> str:
    call = next(d for d in node.decorator_list if isinstance(d, ast.Call) and getattr(d.func, "id", "") == "task")
    return next(k.value.value for k in call.keywords if k.arg == "name")


def test_tasks_are_thin_wrappers():
    tasks = list(_task_functions())
    # train's parallel launches, the data account, and the scoring flow's three
    assert sorted(_task_name(n) for _, n in tasks) == sorted([*STAGES, "train-launch", "account", *SCORING])
    for path, node in tasks:
        statements = sum(isinstance(n, ast.stmt) for n in ast.walk(node)) - 1
        assert statements <= 14, f"{path.name}:{node.name} has {statements} statements"
        assert not _imports(path) & {"numpy", "pandas", "torch", "sklearn", "imblearn"}, path.name


SCORING = ["fetch-model", "score", "deliver"]


def test_scoring_flow_body_reads_like_a_table_of_contents():
    tree = ast.parse((ROOT / "flows" / "scoring_pipeline.py").read_text())
    flow = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "scoring_pipeline")
    with_block = next(n for n in flow.body if isinstance(n, ast.With))
    assert all(isinstance(s, ast.Assign) and isinstance(s.value, ast.Call) for s in with_block.body)
    assert [s.value.func.id for s in with_block.body] == ["fetch_model", "score", "deliver"]
    assert len(flow.body) <= 3


def test_flow_body_reads_like_a_table_of_contents():
    tree = ast.parse((ROOT / "flows" / "training_pipeline.py").read_text())
    flow = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "training_pipeline")
    with_block = next(n for n in flow.body if isinstance(n, ast.With))
    called = []
    for stmt in with_block.body:
        assert isinstance(stmt, ast.Assign) and isinstance(stmt.value, ast.Call), ast.dump(stmt)
        func = stmt.value.func
        called.append(func.id if isinstance(func, ast.Name) else func.attr)
    assert [c for c in called if c in STAGES] == STAGES
    assert len(called) <= len(STAGES) + 2  # the stages, plus expanding the grid and the data account
    assert len(flow.body) <= 3
