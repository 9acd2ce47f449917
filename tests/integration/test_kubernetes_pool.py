"""The Kubernetes pool and its deployments as users create them with the CLI on a real Prefect server; no cluster
and no worker: the dry run renders each flow run's Job from what the server stores."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml
from prefect.client.orchestration import get_client
from prefect.settings import PREFECT_API_URL, temporary_settings

from deployments.kubernetes.dry_run import PREFECT_FILE, TEMPLATE
from tests.servers import BIN, ROOT

pytestmark = pytest.mark.slow


def cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        args, check=False, env=env, cwd=ROOT, capture_output=True, text=True, stdin=subprocess.DEVNULL
    )


@pytest.fixture(scope="module")
def k8s_pool(prefect_stack) -> dict[str, str]:
    prefect = [str(BIN / "prefect"), "--no-prompt"]
    for args in (
        ["work-pool", "create", "mlpipe-k8s", "--type", "kubernetes", "--base-job-template", str(TEMPLATE)],
        ["deploy", "--prefect-file", str(PREFECT_FILE.relative_to(ROOT)), "--all"],
    ):
        done = cli(prefect_stack.env, *prefect, *args)
        assert done.returncode == 0, f"prefect {' '.join(args)}: {done.stdout[-2000:]}{done.stderr[-2000:]}"
    return prefect_stack.env


def test_the_pool_and_deployments_are_stored_as_declared(k8s_pool, prefect_stack):
    declared = {d["name"]: d for d in yaml.safe_load(PREFECT_FILE.read_text())["deployments"]}
    with temporary_settings({PREFECT_API_URL: prefect_stack.api_url}), get_client(sync_client=True) as client:
        pool = client.read_work_pool("mlpipe-k8s")
        stored = {name: client.read_deployment_by_name(f"training-pipeline/{name}") for name in declared}
        with pytest.raises(Exception, match="gpus") as refused:  # the pool's variables schema is enforced server-side
            client.create_flow_run_from_deployment(stored["gpu-manual"].id, job_variables={"gpus": -1})
    assert "422" in str(refused.value) or "Validation" in type(refused.value).__name__
    assert pool.type == "kubernetes" and pool.base_job_template == json.loads(TEMPLATE.read_text())
    for name, deployment in stored.items():
        assert deployment.work_pool_name == "mlpipe-k8s"
        assert deployment.job_variables == declared[name]["work_pool"]["job_variables"]
        assert deployment.pull_steps == [
            {"prefect.deployments.steps.set_working_directory": {"directory": "/opt/mlpipe"}}
        ]
    assert [s.schedule.cron for s in stored["gpu-nightly"].schedules] == ["0 2 * * *"]


def test_the_dry_run_renders_a_flow_run_of_the_stored_deployment(k8s_pool, prefect_stack):
    done = cli(k8s_pool, sys.executable, "deployments/kubernetes/dry_run.py", "--server", "--deployment", "gpu-manual",
               "--job-variables", '{"gpus": 2, "env": {"MLPIPE_PROFILE": "it"}}')  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    manifest = yaml.safe_load(done.stdout)
    with temporary_settings({PREFECT_API_URL: prefect_stack.api_url}), get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name("training-pipeline/gpu-manual")
        pool = client.read_work_pool("mlpipe-k8s")
    (container,) = manifest["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 2  # the flow run's value over the deployment's 1
    assert container["image"] == deployment.job_variables["image"]
    volumes = {v["name"]: v for v in manifest["spec"]["template"]["spec"]["volumes"]}
    assert volumes["state"]["persistentVolumeClaim"]["claimName"] == deployment.job_variables["state_pvc"]
    assert env["MLPIPE_HOME"] == "/var/lib/mlpipe" and env["MLPIPE_PROFILE"] == "it"
    assert env["PREFECT_API_URL"] == prefect_stack.api_url  # the worker hands its API on to the pod
    labels = manifest["metadata"]["labels"]
    assert labels["prefect.io/deployment-id"] == str(deployment.id)
    assert labels["prefect.io/work-pool-id"] == str(pool.id)

    refused = cli(k8s_pool, sys.executable, "deployments/kubernetes/dry_run.py", "--server",
                  "--job-variables", '{"gpus": "two"}')  # fmt: skip
    assert (
        refused.returncode == 1
        and refused.stderr.strip() == "dry run: job variable gpus: 'two' is not of type 'integer'"
    )
