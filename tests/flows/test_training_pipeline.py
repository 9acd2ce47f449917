"""The whole flow on the embedded sample, under Prefect's test harness, with real 2-process DDP.

One run serves every assertion (it costs about a minute); the checks are grouped by what a
user relies on.
"""

import contextlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from mlflow.tracking import MlflowClient
from PIL import Image
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, LogFilter, LogFilterFlowRunId

import mlpipe.evaluate
import mlpipe.split
from mlpipe.config import PipelineConfig
from mlpipe.ingest import resolve_config
from mlpipe.sample import PERSONAL_COLUMNS
from tests.flows.serving_checks import same_answers, write_test_split
from tests.privacy import CANARIES, canaries_in, files_under, plant_canaries, scan

pytestmark = pytest.mark.slow
STAGES = ["ingest", "anonymize", "label", "split", "resample", "train", "search", "evaluate"]
CHECKED_FLOOR = 0.6  # macro-F1; always predicting the majority class scores about 0.03 here


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    home = tmp_path_factory.mktemp("state")
    mp = pytest.MonkeyPatch()
    mp.setenv("MLPIPE_HOME", str(home))
    mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{home / 'mlflow.db'}")
    mp.delenv("MLPIPE_PSEUDONYM_KEY", raising=False)
    yield home
    mp.undo()


@pytest.fixture(scope="module")
def finished(harness, env):
    from flows.training_pipeline import training_pipeline

    config = PipelineConfig().with_overrides({"train.nproc": 2, "train.epochs": 10})
    reads = []
    mp = pytest.MonkeyPatch()
    original = mlpipe.split.load_index

    def spy(splits, parts):
        reads.extend(parts)
        return original(splits, parts)

    mp.setattr(mlpipe.split, "load_index", spy)
    state = training_pipeline(config, return_state=True)
    mp.undo()
    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    return {"state": state, "config": config, "reads": reads, "client": client, "home": env}


def test_flow_completes_and_returns_the_headline(finished):
    assert finished["state"].is_completed()
    summary = finished["state"].result()
    assert summary["metrics"]["test_macro_f1"] > CHECKED_FLOOR
    run = finished["client"].get_run(summary["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.tags["prefect.flow_run_id"] == summary["flow_run_id"]
    assert run.data.metrics["test_macro_f1"] == pytest.approx(summary["metrics"]["test_macro_f1"])


def test_every_stage_report_is_in_the_parent_run(finished):
    client, run_id = finished["client"], finished["state"].result()["run_id"]
    for stage in STAGES:
        assert f"{stage}/report.json" in {a.path for a in client.list_artifacts(run_id, stage)}, stage
    evaluated = {a.path for a in client.list_artifacts(run_id, "evaluate")}
    for name in ("confusion_matrix.png", "roc_pr_curves.png", "reliability.png", "misclassified.png", "gradcam.png",
                 "gate.json", "model_card.md", "model.onnx"):  # fmt: skip
        assert f"evaluate/{name}" in evaluated


def test_one_child_run_per_trial_and_a_registered_model(finished):
    client, summary = finished["client"], finished["state"].result()
    parent = client.get_run(summary["run_id"])
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{summary['run_id']}'")
    assert len(children) == len(finished["config"].trials()) == 2
    assert all(c.info.status == "FINISHED" and "val_macro_f1" in c.data.metrics for c in children)
    assert {c.data.params["train.lr"] for c in children} == {"0.002", "0.006"}
    versions = client.search_model_versions(f"name = '{finished['config'].evaluate.registered_model_name}'")
    assert summary["version"] in {str(v.version) for v in versions}


def test_mlflow_holds_what_its_ui_shows_a_model_trainer(finished, tmp_path):
    """What issue 19 found missing in MLflow's UI, checked on the record it reads."""
    client, summary = finished["client"], finished["state"].result()
    parent = client.get_run(summary["run_id"])
    experiment = client.get_experiment(parent.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    assert experiment.tags["mlflow.note.content"]
    for key in ("mlflow.user", "mlflow.source.name", "mlflow.source.type"):  # Created by, Source
        assert parent.data.tags.get(key), key
    assert parent.data.tags["mlflow.note.content"].startswith("Trained trial-")
    # Each trial's run spans its own training: sequential trials do not overlap, and the
    # duration is the worker's own measure of the trial plus at most a few seconds.
    train = json.loads(Path(client.download_artifacts(parent.info.run_id, "train/report.json", str(tmp_path))).read_text())
    spans = []
    for trial in train["trials"]:
        run = client.get_run(trial["run_id"])
        took = (run.info.end_time - run.info.start_time) / 1000
        assert trial["seconds"] <= took <= trial["seconds"] + 45, (trial["trial"], took, trial["seconds"])
        spans.append((run.info.start_time, run.info.end_time))
        assert run.data.tags["mlflow.source.name"] == parent.data.tags["mlflow.source.name"]
        assert run.data.metrics["best_epoch"] == trial["best_epoch"]
        assert run.data.metrics["best_val_macro_f1"] == pytest.approx(trial["val_metrics"]["val_macro_f1"])
        assert f"Best epoch {trial['best_epoch']} of" in run.data.tags["mlflow.note.content"]
    (_, a_end), (b_start, _) = sorted(spans)
    assert b_start >= a_end - 1000, "trial runs overlap: they were not started when their training started"
    # Per-class test metrics under the class names; train/val/test as datasets of the run.
    evaluated = client.download_artifacts(parent.info.run_id, "evaluate/report.json", str(tmp_path))
    names = json.loads(Path(evaluated).read_text())["class_names"]
    for name in names:
        for metric in ("precision", "recall", "f1"):
            assert f"test_{metric}/{name}" in parent.data.metrics
    inputs = {d.dataset.name: (d.dataset.digest, {t.key: t.value for t in d.tags}) for d in parent.inputs.dataset_inputs}
    assert {k: v[1]["mlflow.data.context"] for k, v in inputs.items() if k != "snapshot"} == \
        {"train": "training", "val": "validation", "test": "testing"}  # fmt: skip
    sizes = json.loads(Path(client.download_artifacts(parent.info.run_id, "split/report.json", str(tmp_path))).read_text())["sizes"]
    for split in ("train", "val", "test"):
        profile = json.loads(next(d.dataset.profile for d in parent.inputs.dataset_inputs if d.dataset.name == split))
        assert profile["num_rows"] == sizes[split]
    # The logged model's test metrics name the test dataset ("Datasets used"); the version's description is its card.
    version = client.get_model_version(finished["config"].evaluate.registered_model_name, summary["version"])
    model = client.get_logged_model(summary["model_id"])
    linked = {(m.key, m.dataset_name, m.dataset_digest) for m in model.metrics if m.dataset_name}
    assert ("test_macro_f1", "test", inputs["test"][0]) in linked
    card = Path(client.download_artifacts(parent.info.run_id, "evaluate/model_card.md", str(tmp_path))).read_text()
    assert version.description == card[:5000]


def test_registry_gate_tags_the_version_and_promote_rolls_back(finished, tmp_path, capsys):
    from flows.cli import main

    client, summary = finished["client"], finished["state"].result()
    name = finished["config"].evaluate.registered_model_name
    version = client.get_model_version(name, summary["version"])
    gate = json.loads(Path(client.download_artifacts(summary["run_id"], "evaluate/gate.json", str(tmp_path))).read_text())
    assert version.tags["mlpipe.gate.decision"] == gate["decision"] == summary["gate"]
    assert json.loads(version.tags["mlpipe.class_names"]) == [str(d) for d in range(10)]
    alias = "champion" if gate["decision"] == "promote" else "challenger"
    assert str(client.get_model_version_by_alias(name, alias).version) == summary["version"]
    assert main(["promote", "--version", summary["version"], "--model", name]) == 0  # a rollback, by hand
    assert str(client.get_model_version_by_alias(name, "champion").version) == summary["version"]
    tags = client.get_model_version(name, summary["version"]).tags
    assert tags["mlpipe.gate.decision"] == "manual promote" and "previous champion" in tags["mlpipe.gate.reasons"]
    assert main(["promote", "--version", "999", "--model", name]) == 2
    assert "cannot promote" in capsys.readouterr().err


def test_trials_see_train_and_val_only_and_the_test_set_is_read_once(finished):
    # resample: train (one config in the grid); evaluate: test, once; account: the train split's
    # labels and flags again (no pixels), for the count the shipped model trained on.
    assert finished["reads"] == ["train.npz", "test.npz", "train.npz"]


def test_run_is_reproducible_from_its_mlflow_record(finished, tmp_path):
    client, summary = finished["client"], finished["state"].result()
    local = client.download_artifacts(summary["run_id"], "config.yaml", str(tmp_path))
    recorded = PipelineConfig.model_validate(yaml.safe_load(Path(local).read_text()))
    assert recorded == resolve_config(finished["config"])[0]  # the config as run: its auto values decided
    assert "auto" not in (recorded.source.layout, recorded.ingest.channels, recorded.ingest.image_size, recorded.search.grid)
    tags = client.get_run(summary["run_id"]).data.tags
    assert {"mlpipe.code_version", "mlpipe.lib.torch", "prefect.flow_run_id", "mlpipe.data_fingerprint"} <= set(tags)
    ingest_report = json.loads(Path(client.download_artifacts(summary["run_id"], "ingest/report.json", str(tmp_path))).read_text())
    inputs = client.get_run(summary["run_id"]).inputs.dataset_inputs
    snapshot = [i.dataset.digest for i in inputs if i.dataset.name == "snapshot"]
    assert snapshot == [ingest_report["fingerprint"]] == [tags["mlpipe.data_fingerprint"]]


def test_no_personal_value_reaches_mlflow_logs_or_file_names(finished):

    home: Path = finished["home"]
    manifest = pd.read_csv(home / "sample" / "digits-v1" / "manifest.csv", dtype=str, keep_default_na=False)
    secrets = {v for c in (*PERSONAL_COLUMNS, "subject_id") for v in manifest[c] if v}
    secrets |= {Path(p).stem for p in manifest["image"] if len(Path(p).stem) > 8}
    assert len(secrets) > 1000

    haystacks = {"mlflow.db": (home / "mlflow.db").read_bytes().decode("latin-1")}
    for path in home.rglob("*"):
        if "sample" in path.relative_to(home).parts:  # the source data itself
            continue
        haystacks[f"name:{path.relative_to(home)}"] = path.name
        if path.is_file():
            haystacks[str(path.relative_to(home))] = path.read_bytes().decode("latin-1")
    flow_run_id = finished["state"].result()["flow_run_id"]
    with get_client(sync_client=True) as client:
        logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
    assert logs
    haystacks["prefect logs"] = "\n".join(log.message for log in logs)

    leaks = {where: v for where, text in haystacks.items() for v in secrets if v in text}
    assert leaks == {}


def test_kfold_cross_validates_every_trial_and_refits_the_winner(harness, env, tmp_path):
    from flows.training_pipeline import training_pipeline

    config = PipelineConfig().with_overrides({
        "experiment": "kfold", "split.mode": "kfold", "split.folds": 3, "train.epochs": 3,
        "search.grid": {"train.lr": [0.002, 0.006]}, "search.max_parallel": 2,  # 6 fold trainings, 2 launches
    })  # fmt: skip
    state = training_pipeline(config, return_state=True)
    assert state.is_completed()
    with get_client(sync_client=True) as prefect:
        runs = prefect.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id])))
    launches = sorted(r.name for r in runs if r.name.startswith("train-launch"))
    assert launches == ["train-launch-0", "train-launch-1"] and all(r.state.is_completed() for r in runs)
    summary, client = state.result(), MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    parent = client.get_run(summary["run_id"])
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{summary['run_id']}'")
    by_name = {c.info.run_name: c for c in children}
    assert set(by_name) == {"trial-000", "trial-001", "refit"}
    for name in ("trial-000", "trial-001"):  # per-fold curves under fold prefixes, the fold mean as the trial's
        metrics = by_name[name].data.metrics
        assert {"fold0/val_macro_f1", "fold1/val_macro_f1", "fold2/val_macro_f1", "val_macro_f1"} <= set(metrics)
        folds = [metrics[f"fold{k}/val_macro_f1"] for k in range(3)]
        history = client.get_metric_history(by_name[name].info.run_id, "fold0/val_macro_f1")
        assert len(history) == 3 and min(folds) <= metrics["val_macro_f1"] <= max(folds)
    evaluated = json.loads(Path(client.download_artifacts(summary["run_id"], "evaluate/report.json", str(tmp_path))).read_text())
    assert evaluated["model"] == "refit on train+val"
    assert evaluated["refit"]["trial"] == by_name["refit"].data.params["trial"]


def test_a_failing_stage_fails_the_mlflow_run_instead_of_leaving_it_running(harness, env):
    from flows.training_pipeline import training_pipeline

    # The sample's four unreadable rows are past a zero drop budget: ingest stops, inside the run.
    # (A config its data cannot satisfy, e.g. a missing image column, fails before any run opens.)
    config = PipelineConfig().with_overrides({"ingest.max_drop_fraction": 0.0, "experiment": "failing"})
    state = training_pipeline(config, return_state=True)
    assert state.is_failed() and "ingest" in str(state.message)
    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    experiment = client.get_experiment_by_name("failing")
    runs = client.search_runs([experiment.experiment_id])
    assert [r.info.status for r in runs] == ["FAILED"]


def test_cli_reports_a_data_error_in_one_line(env, tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "flows.cli", "run", "--set", "source.image_column=scan_path"],
        capture_output=True, text=True, cwd=tmp_path, env={**os.environ, "MLPIPE_HOME": str(tmp_path / "s")},
    )  # fmt: skip
    assert done.returncode == 1
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("mlpipe: error: manifest is missing column 'scan_path'")


def test_each_stage_publishes_a_prefect_artifact_and_training_reports_progress(finished):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    flow_run_id = finished["state"].result()["flow_run_id"]
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
    keys = {a.key for a in artifacts}
    assert {f"{stage}-report" for stage in STAGES} <= keys
    progress = [a for a in artifacts if a.key == "train-progress"]
    assert progress and float(progress[0].data) == 100.0


def test_cli_success_prints_the_summary_and_no_traceback(small_run):
    """`mlpipe run` on a copy of the sample, one trial of two epochs: tests/cli_runs.py's run, which
    tests/reliability/test_reproducibility.py then reproduces."""
    done = small_run.done
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.strip().splitlines()
    at = lines.index("Data accounting (rows per stage):")
    summary, accounting = lines[at - 8 : at], [line.split()[0] for line in lines[at + 1 :]]
    assert "Traceback" not in done.stdout + done.stderr
    assert "Error" not in "\n".join(lines[:at]) + done.stderr  # the account below names quarantine reasons
    assert [line.split(":")[0] for line in summary] == [
        "Prefect flow run", "MLflow experiment", "MLflow run", "Tracking URI", "Registered model", "Test metrics",
        "Baselines", "Registry gate",
    ]
    assert "macro_f1=" in summary[-3] and summary[-1].split()[-1] in ("promote", "reject")
    assert "logistic_regression macro_f1=" in summary[-2] and "rbf_svc macro_f1=" in summary[-2]
    assert accounting == ["ingest", "anonymize", "label", "split", "train", "evaluate"]
    assert "ingest     1103 in, 1096 kept; " in lines[at + 1]  # the sample's 4 broken rows and 3 duplicates


def test_pseudonym_key_from_a_prefect_secret_block(harness):
    from prefect.blocks.system import Secret

    from mlpipe.config import AnonymizeConfig
    from mlpipe.errors import MlpipeError
    from tasks.secrets import pseudonym_key

    assert pseudonym_key(AnonymizeConfig()) is None
    Secret(value="block-held-key").save("mlpipe-test-key", overwrite=True)
    assert pseudonym_key(AnonymizeConfig(key_secret_block="mlpipe-test-key")) == b"block-held-key"
    with pytest.raises(MlpipeError, match="Prefect Secret block 'absent-key' not found"):
        pseudonym_key(AnonymizeConfig(key_secret_block="absent-key"))


def test_canaries_never_reach_anything_the_pipeline_writes(harness, env, tmp_path):
    from prefect.settings import get_current_settings

    from flows.training_pipeline import training_pipeline
    from mlpipe.sample import write_sample_digits

    root = plant_canaries(write_sample_digits(tmp_path / "canary-data"))
    config = PipelineConfig().with_overrides({
        "source.uri": str(root), "experiment": "canary", "train.epochs": 2, "search.grid": {"train.lr": [0.003]},
    })  # fmt: skip
    state = training_pipeline(config, return_state=True)
    assert state.is_completed()
    summary = state.result()
    assert summary["metrics"]["test_macro_f1"] > 0  # it really ran

    # The scanner sees every canary where it was planted ...
    assert {kind for _, kind in scan([p for p in root.rglob("*") if p.is_file()])} == set(CANARIES)
    # ... and in nothing the pipeline wrote.
    settings = get_current_settings()
    database = settings.server.database.connection_url.get_secret_value()
    assert "sqlite" in database
    places = [Path(env), Path(settings.home), Path(database.split("///", 1)[1])]  # MLflow + state, Prefect home, DB
    written = [f for f in files_under(*places, besides=[tmp_path]) if "sample" not in f.parts]
    assert len(written) > 50 and any(f.suffix == ".pt" for f in written) and any(f.suffix == ".db" for f in written)
    assert scan(written) == []


def test_the_registered_model_served_four_ways_answers_as_evaluate_recorded(finished, tmp_path):
    """pyfunc, `mlpipe predict`, `mlflow models serve` over HTTP and the ONNX export, on the test
    split's images as files: the classes evaluate recorded, probabilities within 1e-5."""
    import base64

    import onnxruntime
    import requests

    from flows.cli import main
    from mlpipe import tracking
    from tests.servers import BIN, free_port, start, stop, wait_for

    client, summary = finished["client"], finished["state"].result()
    name = finished["config"].evaluate.registered_model_name
    tracking.promote(name, summary["version"], "the serving test serves this run's model")
    uri = f"models:/{name}@champion"
    recorded = pd.read_csv(client.download_artifacts(summary["run_id"], "evaluate/predictions.csv", str(tmp_path)))
    names = [str(d) for d in range(10)]
    files = write_test_split(finished["home"], client, summary["run_id"], tmp_path / "test-images")

    model, info = tracking.load_serving_model(uri, tmp_path / "model")
    assert info["version"] == summary["version"] and info["training_run_id"] == summary["run_id"]
    same_answers(model.predict(pd.DataFrame({"path": [str(f) for f in files]})), recorded, names, "pyfunc")

    output = tmp_path / "predictions.csv"
    assert main(["predict", "--model", uri, "--output", str(output), "--batch-size", "64", str(files[0].parent)]) == 0
    cli = pd.read_csv(output, dtype={"class": str})
    assert list(cli["source"]) == [f.name for f in files]
    same_answers(cli, recorded, names, "mlpipe predict")

    (spec,) = (tmp_path / "model").rglob("serving.json")
    session = onnxruntime.InferenceSession(str(spec.parent / "model.onnx"), providers=["CPUExecutionProvider"])
    pixels = np.stack([np.asarray(Image.open(f))[None] for f in files]).astype(np.float32)  # N x 1 x H x W, 0-255
    (onnx_proba,) = session.run(None, {session.get_inputs()[0].name: pixels})
    onnx_answers = pd.DataFrame({"class": [names[k] for k in onnx_proba.argmax(1)], "error": None,
                                 **{f"p_{n}": onnx_proba[:, k] for k, n in enumerate(names)}})  # fmt: skip
    same_answers(onnx_answers, recorded, names, "onnx")

    port, log = free_port(), tmp_path / "serve.log"
    server = start([str(BIN / "mlflow"), "models", "serve", "-m", uri, "--env-manager", "local", "-h", "127.0.0.1",
                    "-p", str(port)], log, {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"})  # fmt: skip
    try:
        wait_for(f"http://127.0.0.1:{port}/ping", "mlflow models serve", server, log)
        images = [base64.b64encode(f.read_bytes()).decode() for f in files]
        payload = {"dataframe_split": {"columns": ["image"], "data": [[b] for b in images] + [[base64.b64encode(b"no").decode()]]}}
        answer = requests.post(f"http://127.0.0.1:{port}/invocations", json=payload, timeout=120)
        assert answer.status_code == 200, answer.text[:500]
        served = pd.DataFrame(answer.json()["predictions"])
        same_answers(served.iloc[:-1], recorded, names, "HTTP")
        assert list(served["class"].iloc[:-1]) == list(cli["class"])  # the server answers what mlpipe predict wrote
        assert np.abs(served.iloc[:-1][[f"p_{n}" for n in names]].to_numpy(float)
                      - cli[[f"p_{n}" for n in names]].to_numpy(float)).max() <= 1e-5  # fmt: skip
        assert served["error"].iloc[-1] == "not an image"  # a bad image is its own row's error, not a failed request
        refused = requests.post(f"http://127.0.0.1:{port}/invocations", timeout=60,
                                json={"dataframe_split": {"columns": ["path"], "data": [["/etc/passwd"]]}})  # fmt: skip
        assert "refused by a server" in refused.json()["predictions"][0]["error"]
    finally:
        stop(server)


def _scoring_run(summary: dict, name: str, source: Path, destination: Path):
    from flows.scoring_pipeline import scoring_pipeline
    from mlpipe.config import ScoringConfig, SourceConfig

    config = ScoringConfig(model=f"models:/{name}/{summary['version']}", source=SourceConfig(uri=str(source)),
                           destination=str(destination))  # fmt: skip
    state = scoring_pipeline(config, return_state=True)
    assert state.is_completed(), state.message
    return state.result()


def test_scoring_accounts_for_every_row_links_the_version_and_leaks_no_personal_data(finished, canary_sample, tmp_path):
    client, summary = finished["client"], finished["state"].result()
    name = finished["config"].evaluate.registered_model_name
    scored = _scoring_run(summary, name, canary_sample, tmp_path / "out")

    manifest = pd.read_csv(canary_sample / "manifest.csv", dtype=str, keep_default_na=False)
    predictions = pd.read_csv(scored["predictions"], dtype={"class": str})
    assert scored["rows"] == len(manifest) == len(predictions) == scored["predicted"] + scored["failed"]
    assert list(predictions["row"]) == list(range(len(manifest)))
    assert predictions["class"].notna().sum() == scored["predicted"] and predictions["error"].notna().sum() == scored["failed"]
    assert {"empty file", "missing file", "path escapes the dataset root"} <= set(scored["failed_per_reason"])
    assert not scored["drift"]["drifted"], scored["drift"]["psi"]  # the distribution the model was trained on

    run = client.get_run(scored["run_id"])
    assert run.data.tags["mlpipe.registered_model"] == f"{name}/{summary['version']}"
    assert run.data.tags["mlpipe.training_run_id"] == summary["run_id"] and run.data.tags["mlpipe.drift"] == "ok"
    assert run.data.metrics["rows"] == len(manifest) and run.data.metrics["drifted"] == 0
    assert sum(v for k, v in run.data.metrics.items() if k.startswith("predicted_")) == scored["predicted"]
    logged_files = {a.path for a in client.list_artifacts(scored["run_id"], "scoring")}
    assert logged_files == {"scoring/report.json", "scoring/confidence.png"}  # aggregates only, no predictions table
    logged = Path(client.download_artifacts(scored["run_id"], "", str(tmp_path / "logged")))
    record = json.dumps([run.data.params, run.data.tags])
    assert scan(files_under(logged, tmp_path / "out")) == [] and canaries_in(record) == set()
    assert "p_" in predictions["subject_id"].iloc[0]  # pseudonymized by the training run's policy


def test_scoring_marks_a_run_whose_images_drifted(finished, sample_root, tmp_path):
    from PIL import ImageOps

    source = tmp_path / "inverted"
    shutil.copytree(sample_root, source)
    for file in source.rglob("*.png"):
        with contextlib.suppress(OSError):  # the sample's broken files stay broken
            ImageOps.invert(Image.open(file).convert("L")).save(file)
    summary = finished["state"].result()
    scored = _scoring_run(summary, finished["config"].evaluate.registered_model_name, source, tmp_path / "out")
    assert scored["drift"]["drifted"] and "pixel_mean" in scored["drift"]["drifted_checks"], scored["drift"]["psi"]
    assert finished["client"].get_run(scored["run_id"]).data.tags["mlpipe.drift"] == "drifted"
