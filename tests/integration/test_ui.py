"""One real-browser test: headless Chromium (Debian's) opens the Prefect UI, starts a custom run
of the manual deployment with a changed parameter, and the run completes."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
from prefect.settings import PREFECT_API_URL, temporary_settings

pytestmark = pytest.mark.slow
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]  # fmt: skip


def test_a_custom_run_started_in_the_prefect_ui_completes(prefect_stack):
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    with temporary_settings({PREFECT_API_URL: prefect_stack.api_url}), get_client(sync_client=True) as client:
        manual = client.read_deployment_by_name("training-pipeline/manual")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1200})
        page.goto(f"{prefect_stack.ui_url}/deployments/deployment/{manual.id}/run")
        label = page.locator(".schema-form-property__label", has_text="Experiment (Optional)")
        field = label.locator("xpath=ancestor::div[contains(concat(' ', @class, ' '), ' schema-form-property ')][1]")
        field.locator("textarea, input").first.fill("from-the-ui")  # the changed parameter
        page.screenshot(path=str(ARTIFACTS / "prefect-ui-custom-run-form.png"))
        page.get_by_role("button", name="Submit").click()
        run = _wait_for_run(prefect_stack.api_url, manual.id, timeout_s=900)  # the UI's run, to its end
        page.goto(f"{prefect_stack.ui_url}/flow-runs/flow-run/{run.id}")
        page.wait_for_timeout(3000)
        page.screenshot(path=str(ARTIFACTS / "prefect-ui-flow-run-completed.png"))
        browser.close()
    assert run.state.is_completed(), run.state
    assert run.parameters["config"]["experiment"] == "from-the-ui"


def _wait_for_run(api_url: str, deployment_id, timeout_s: float):
    """The deployment's flow run whose config names the experiment set in the form, once final."""
    deadline = time.time() + timeout_s
    with temporary_settings({PREFECT_API_URL: api_url}), get_client(sync_client=True) as client:
        while time.time() < deadline:
            runs = client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])))
            mine = [r for r in runs if (r.parameters.get("config") or {}).get("experiment") == "from-the-ui"]
            if mine and mine[0].state is not None and mine[0].state.is_final():
                return mine[0]
            time.sleep(2)
    pytest.fail(f"no finished run from the UI within {timeout_s} s")
