"""Real-browser tests: headless Chromium (Debian's) opens the Prefect UI and starts a custom run
of the manual deployment with a changed parameter, which completes; then opens that run in
MLflow's UI as a model trainer would. Screenshots land in test-artifacts/."""

from __future__ import annotations

import re
import shutil
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
from prefect.settings import PREFECT_API_URL, temporary_settings

pytestmark = pytest.mark.slow
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]  # fmt: skip
EXPERIMENT = "from-the-ui"
EPOCHS = 2  # a trial's budget, set in the form too (CI time)


@pytest.fixture(scope="module")
def ui_run(prefect_stack):
    """The flow run a user starts from the Prefect UI's custom-run form, once finished."""
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    with temporary_settings({PREFECT_API_URL: prefect_stack.api_url}), get_client(sync_client=True) as client:
        manual = client.read_deployment_by_name("training-pipeline/manual")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1200})
        page.goto(f"{prefect_stack.ui_url}/deployments/deployment/{manual.id}/run")
        _field(page, "Experiment (Optional)").locator("textarea, input").first.fill(EXPERIMENT)  # the changed parameter
        # The budget as a user shortens it in the form: train.epochs (int or None) switched to int and set. The
        # default (train.steps, 167 epochs a trial on the sample) took 3 of CI's minutes and no check here needs it.
        epochs = _field(page, "Epochs (Optional)")
        epochs.get_by_role("button", name="int", exact=True).click()
        epochs.locator("input[type=number]").fill(str(EPOCHS))
        page.screenshot(path=str(ARTIFACTS / "prefect-ui-custom-run-form.png"))
        _submit(page)
        run = _wait_for_run(prefect_stack.api_url, manual.id, timeout_s=900)  # the UI's run, to its end
        page.goto(f"{prefect_stack.ui_url}/flow-runs/flow-run/{run.id}")
        page.wait_for_timeout(3000)
        page.screenshot(path=str(ARTIFACTS / "prefect-ui-flow-run-completed.png"))
        browser.close()
    return run


def _submit(page) -> None:
    """Submit the form, as a user would until the run is created: Prefect's server answers 503 when its
    SQLite database is busy (an error "clients can retry on"; its Python client retries, the UI shows
    "Something went wrong"), and then the user clicks Submit again. Any other answer, or none, fails
    here at once, not after the 15 minutes the test then waited for a run nobody had created."""
    for _ in range(5):
        with page.expect_response(lambda r: r.request.method == "POST" and r.url.endswith("/create_flow_run"),
                                  timeout=120_000) as answer:  # fmt: skip
            page.get_by_role("button", name="Submit").click()
        if answer.value.status != 503:
            break
        page.wait_for_timeout(2000)
    assert answer.value.status == 201, f"the UI's create_flow_run: {answer.value.status} {answer.value.text()[:500]}"


def _field(page, label: str):
    """The custom-run form's property whose label is exactly `label` (Train's "Epochs", not "Max Epochs")."""
    title = page.locator(".schema-form-property__label", has_text=re.compile(rf"^{re.escape(label)}$"))
    return title.locator("xpath=ancestor::div[contains(concat(' ', @class, ' '), ' schema-form-property ')][1]")


def test_a_custom_run_started_in_the_prefect_ui_completes(ui_run):
    assert ui_run.state.is_completed(), ui_run.state
    assert ui_run.parameters["config"]["experiment"] == EXPERIMENT
    assert ui_run.parameters["config"]["train"]["epochs"] == EPOCHS


def test_the_mlflow_ui_shows_the_run_as_a_model_trainer_expects(ui_run, mlflow_server):
    """The experiment, the parent run, a trial and the model version, in MLflow's own UI."""
    assert ui_run.state.is_completed(), ui_run.state
    client = MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    runs = client.search_runs([experiment.experiment_id])
    parent = next(r for r in runs if r.data.tags.get("prefect.flow_run_id") == str(ui_run.id))
    trial = next(r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id
                 and r.info.run_name.startswith("trial-"))  # fmt: skip
    name, version = parent.data.tags["mlpipe.registered_model"].split("/")
    model_id = client.get_run(parent.info.run_id).outputs.model_outputs[0].model_id
    shown = mlflow_ui_texts(mlflow_server, experiment.experiment_id, parent.info.run_id, trial.info.run_id, name, version,
                            model_id, ARTIFACTS)  # fmt: skip
    check_mlflow_ui(shown, parent, trial)


def mlflow_ui_texts(url: str, experiment_id: str, run_id: str, trial_id: str, model: str, version: str, model_id: str,
                    screenshots: Path) -> dict[str, str]:  # fmt: skip
    """The visible text of each page, opened as mlpipe links them (in MLflow's "Model training"
    view: MLflow 3.17's UI picks its view from the URL or the user's last choice, not from the
    experiment's kind tag): the experiment, the parent run, a trial, the model version and the
    logged model; a full-page screenshot of each."""
    from playwright.sync_api import sync_playwright

    from mlpipe.tracking import MODEL_TRAINING_VIEW

    pages = {"experiment": f"#/experiments/{experiment_id}", "parent-run": f"#/experiments/{experiment_id}/runs/{run_id}",
             "trial-run": f"#/experiments/{experiment_id}/runs/{trial_id}", "model-version": f"#/models/{model}/versions/{version}",
             "logged-model": f"#/experiments/{experiment_id}/models/{model_id}"}  # fmt: skip
    ready = {"experiment": "Duration", "parent-run": "Description", "trial-run": "best_val_macro_f1",
             "model-version": "Model card", "logged-model": "Datasets used"}  # fmt: skip
    texts = {}
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
        page = browser.new_page(viewport={"width": 1600, "height": 1300})
        for key, route in pages.items():
            page.goto(f"{url}/{route}?{MODEL_TRAINING_VIEW}")
            page.get_by_text(ready[key]).first.wait_for(timeout=60_000)
            page.wait_for_timeout(1500)  # the rest of the page's requests
            page.screenshot(path=str(screenshots / f"mlflow-ui-{key}.png"), full_page=True)
            texts[key] = page.inner_text("body")
        browser.close()
    return texts


def check_mlflow_ui(shown: dict[str, str], parent, trial) -> None:
    experiment = shown["experiment"]
    assert parent.info.run_name in experiment and "Detect Issues" not in experiment  # runs, not the GenAI overview
    for dataset in parent.inputs.dataset_inputs:  # train, val, test (and the snapshot) with their contexts
        assert f"{dataset.dataset.name} ({dataset.dataset.digest})" in experiment, dataset.dataset.name
    for context in ("Training", "Validation", "Testing"):
        assert context in experiment, context
    run = shown["parent-run"]
    assert parent.data.tags["mlflow.note.content"][:80] in run  # the description
    assert re.search(r"Created by\s+" + re.escape(parent.data.tags["mlflow.user"]), run)
    assert re.search(r"Source\s+" + re.escape(Path(parent.data.tags["mlflow.source.name"]).name), run)
    assert re.search(r"Child runs\s+trial-", run)
    assert "test_f1/" in run and "best_val_macro_f1" in run
    trial_page = shown["trial-run"]
    best = int(trial.data.metrics["best_epoch"])
    assert f"Best epoch {best} of" in trial_page and re.search(rf"best_epoch\s+{best}\b", trial_page)  # description, metric
    assert "Evaluations" not in trial_page  # the model-training view, not GenAI's
    minutes = (trial.info.end_time - trial.info.start_time) / 60_000
    shown_duration = re.search(r"Duration\s+([\d.]+)(s|min)", trial_page)
    assert shown_duration, "no duration on the trial's page"
    value = float(shown_duration[1]) / (60 if shown_duration[2] == "s" else 1)
    assert abs(value - minutes) <= 0.1 + 0.05 * minutes, (shown_duration[0], minutes)
    assert "Model card" in shown["model-version"] and "Test metrics" in shown["model-version"]
    assert re.search(r"Datasets used\s+test \(#", shown["logged-model"])


def _wait_for_run(api_url: str, deployment_id, timeout_s: float):
    """The deployment's flow run whose config names the experiment set in the form, once final."""
    deadline = time.time() + timeout_s
    with temporary_settings({PREFECT_API_URL: api_url}), get_client(sync_client=True) as client:
        while time.time() < deadline:
            runs = client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])))
            mine = [r for r in runs if (r.parameters.get("config") or {}).get("experiment") == EXPERIMENT]
            if mine and mine[0].state is not None and mine[0].state.is_final():
                return mine[0]
            time.sleep(2)
    pytest.fail(f"no finished run from the UI within {timeout_s} s")
