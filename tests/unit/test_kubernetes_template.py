"""The Kubernetes work-pool template, rendered offline the way prefect-kubernetes' worker renders it."""

from __future__ import annotations

import asyncio
import json
import re
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml
from jsonschema import Draft202012Validator
from prefect.client.schemas.objects import WorkPool
from prefect.client.schemas.responses import DeploymentResponse

from deployments.kubernetes.dry_run import (
    PREFECT_FILE,
    TEMPLATE,
    DryRunError,
    deployment_from_prefect_file,
    load_template,
    main,
    render,
)

UPSTREAM_DROPPED = {"backoff_limit", "cpu_limit"}  # fixed at 0 / deliberately unset in our template


def pool(template: dict[str, Any] | None = None) -> WorkPool:
    return WorkPool(name="mlpipe-k8s", type="kubernetes", base_job_template=template or load_template())


def rendered(job_variables: dict[str, Any], deployment: DeploymentResponse | None = None, **kw: Any) -> dict[str, Any]:
    return asyncio.run(render(pool(**kw), deployment or deployment_from_prefect_file("gpu-nightly"), job_variables))


def container(manifest: dict[str, Any]) -> dict[str, Any]:
    (only,) = manifest["spec"]["template"]["spec"]["containers"]
    return only


def env_of(manifest: dict[str, Any]) -> dict[str, str]:
    entries = container(manifest)["env"]
    names = [e["name"] for e in entries]
    assert len(names) == len(set(names)), names  # a duplicate would make the last one win silently
    return {e["name"]: e.get("value") for e in entries}


def test_a_flow_run_becomes_a_gpu_job_on_the_shared_state_volume():
    manifest = rendered({"gpus": 4, "image": "registry.example.com/mlpipe:1.2", "state_pvc": "team-state"})
    pod = manifest["spec"]["template"]["spec"]
    main_container, env = container(manifest), env_of(manifest)

    assert manifest["kind"] == "Job" and manifest["spec"]["backoffLimit"] == 0  # Prefect retries, not Kubernetes
    assert manifest["spec"]["ttlSecondsAfterFinished"] == 86400
    assert main_container["image"] == "registry.example.com/mlpipe:1.2"
    assert main_container["resources"]["limits"]["nvidia.com/gpu"] == 4
    assert main_container["resources"]["requests"] == {"cpu": "8", "memory": "32Gi"}
    assert main_container["args"] == ["prefect", "flow-run", "execute"]

    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in main_container["volumeMounts"]}
    assert volumes[mounts[env["MLPIPE_HOME"]]]["persistentVolumeClaim"] == {"claimName": "team-state"}
    assert volumes[mounts["/dev/shm"]]["emptyDir"] == {"medium": "Memory", "sizeLimit": "8Gi"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]

    assert env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    # the worker passes on its own Prefect settings too: this one is set in the test session as well ("False")
    assert env["PREFECT_SERVER_ANALYTICS_ENABLED"].lower() == "false" and env["NO_ALBUMENTATIONS_UPDATE"] == "1"
    assert env["PREFECT_LOGGING_EXTRA_LOGGERS"] == "mlpipe"
    assert uuid.UUID(env["PREFECT__FLOW_RUN_ID"])  # the run the command executes
    assert env["PREFECT_FLOW_RUN_EXECUTE_SIGTERM_BEHAVIOR"] == "reschedule"  # an evicted pod's run is rescheduled
    labels = manifest["metadata"]["labels"]
    assert (
        labels["prefect.io/deployment-name"] == "gpu-nightly" and labels["prefect.io/flow-name"] == "training-pipeline"
    )


def test_flow_run_job_variables_go_over_the_deployments_with_env_merged():
    deployment = DeploymentResponse(
        name="custom", flow_id=uuid.uuid4(), entrypoint="flows/training_pipeline.py:training_pipeline",
        job_variables={"gpus": 2, "env": {"FROM_DEPLOYMENT": "a", "MLFLOW_TRACKING_URI": "http://tracking:80"}},
    )  # fmt: skip
    manifest = rendered({"memory_limit": "96Gi", "env": {"FROM_RUN": "b"}}, deployment)
    env = env_of(manifest)
    assert container(manifest)["resources"]["limits"] == {"nvidia.com/gpu": 2, "memory": "96Gi"}
    assert env["FROM_DEPLOYMENT"] == "a" and env["FROM_RUN"] == "b"
    assert env["MLFLOW_TRACKING_URI"] == "http://tracking:80"  # a job's env wins over the template's


@pytest.mark.parametrize(
    ("job_variables", "message"),
    [
        ({"gpus": -1}, "gpus: -1 is less than the minimum of 0"),
        ({"gpus": "2"}, "gpus: '2' is not of type 'integer'"),
        ({"gpus": None}, "gpus: None is not of type 'integer'"),
        ({"memory_limit": "48GB"}, "memory_limit: '48GB' does not match"),
        ({"gpu": 2}, "unknown job variable(s) gpu"),
        ({"tolerations": [{"key": "nvidia.com/gpu", "operatr": "Exists"}]}, "tolerations[0].operatr is not a field"),
    ],
)
def test_bad_job_variables_are_refused(job_variables, message):
    with pytest.raises(DryRunError) as refused:
        rendered(job_variables)
    assert message in str(refused.value) and "\n" not in str(refused.value)


def test_the_command_line_prints_the_job_or_one_line_of_error(capsys):
    main(["--deployment", "gpu-manual", "--job-variables", '{"gpus": 2}'])
    manifest = yaml.safe_load(capsys.readouterr().out)
    assert container(manifest)["resources"]["limits"]["nvidia.com/gpu"] == 2
    assert manifest["metadata"]["labels"]["prefect.io/deployment-name"] == "gpu-manual"
    with pytest.raises(SystemExit, match=r"^dry run: job variable gpus: -1 is less than the minimum of 0$"):
        main(["--job-variables", '{"gpus": -1}'])


def broken(tmp_path: Path, change) -> Path:
    template = json.loads(TEMPLATE.read_text())
    change(template)
    path = tmp_path / "template.json"
    path.write_text(json.dumps(template))
    return path


def test_an_invalid_template_is_refused_with_the_reason(tmp_path):
    def pod(t):
        return t["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]

    def misspelt_field(t):
        pod(t)["containers"][0]["volumeMount"] = pod(t)["containers"][0].pop("volumeMounts")

    def undeclared_placeholder(t):
        pod(t)["priorityClassName"] = "{{ priority_class }}"

    def string_for_an_integer(t):
        # the client would quietly turn "100" into 100; the API server refuses a string
        t["variables"]["properties"]["finished_job_ttl"] = {"type": "string", "default": "100", "title": "TTL"}

    def invalid_schema(t):
        t["variables"]["properties"]["gpus"]["type"] = "count"

    def missing_container_name(t):
        del pod(t)["containers"][0]["name"]

    cases = [
        (misspelt_field, "spec.template.spec.containers[0].volumeMount is not a field"),
        (undeclared_placeholder, "placeholders without a variable: priority_class"),
        (string_for_an_integer, "spec.ttlSecondsAfterFinished has the wrong type: '100'"),
        (invalid_schema, "not a base job template: SchemaError: properties.gpus.type: 'count' is not valid"),
        (
            missing_container_name,
            "Job is missing required attributes at the following paths: /spec/template/spec/containers/0/name",
        ),
    ]
    for change, message in cases:
        with pytest.raises(DryRunError, match=re.escape(message)):
            rendered({}, template=load_template(broken(tmp_path, change)))
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(DryRunError, match="bad.json: not a base job template"):
        load_template(tmp_path / "bad.json")


def test_every_variable_is_a_documented_form_field_and_the_deployments_values_validate():
    schema = load_template()["variables"]
    for name, spec in schema["properties"].items():
        assert spec.get("description") and (spec.get("title") or "$ref" in str(spec)), name
    validator = Draft202012Validator(schema)
    spec = yaml.safe_load(PREFECT_FILE.read_text())
    assert {d["name"] for d in spec["deployments"]} == {"gpu-nightly", "gpu-manual"}
    for deployment in spec["deployments"]:
        job_variables = deployment["work_pool"]["job_variables"]
        assert deployment["work_pool"]["name"] == "mlpipe-k8s" and {"image", "gpus", "state_pvc"} <= set(job_variables)
        validator.validate(job_variables)
        assert list(validator.iter_errors({**job_variables, "gpus": "1"}))  # the schema does refuse


def test_the_template_keeps_the_installed_workers_configuration_and_variables():
    from prefect_kubernetes.worker import KubernetesWorker

    upstream = KubernetesWorker.get_default_base_job_template()
    ours = load_template()
    assert set(ours["job_configuration"]) == set(upstream["job_configuration"])
    assert set(upstream["variables"]["properties"]) - set(ours["variables"]["properties"]) == UPSTREAM_DROPPED
    assert (
        ours["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]["containers"][0]["args"]
        == "{{ command }}"
    )
