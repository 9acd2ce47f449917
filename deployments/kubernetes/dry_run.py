"""Render the Kubernetes Job that a worker of the `mlpipe-k8s` pool would create for a flow run, without a cluster.

    python deployments/kubernetes/dry_run.py [--deployment gpu-nightly] [--job-variables '{"gpus": 2}']
    python deployments/kubernetes/dry_run.py --server   # the deployment and pool as stored on PREFECT_API_URL

The job variables (the deployment's, then the flow run's on top) are checked against the pool's variables schema,
the manifest is built by prefect-kubernetes' own `resolve_for_flow_run` (the worker's code path), and the result
must read back as a `V1Job` unchanged: a misspelt or mistyped field fails here instead of in the cluster.
Prints the manifest as YAML; any problem is one line on stderr and exit status 1.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import yaml
from jsonschema import Draft202012Validator, SchemaError
from jsonschema.exceptions import best_match
from kubernetes_asyncio.client import ApiClient, V1Job
from prefect.client.schemas.objects import Flow, FlowRun, WorkPool
from prefect.client.schemas.responses import DeploymentResponse
from prefect.flows import load_flow_arguments_from_entrypoint
from prefect.utilities.templating import PlaceholderType, find_placeholders
from prefect_kubernetes.worker import KubernetesWorkerJobConfiguration
from pydantic import ValidationError

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
TEMPLATE = HERE / "base-job-template.json"
PREFECT_FILE = HERE / "prefect.yaml"
# prefect-kubernetes requires these in every pod spec (its base manifest check) although they are Job fields;
# the API server drops them with a warning, so they are the only keys allowed to be dropped.
WORKER_ONLY_KEYS = {"spec.template.spec.parallelism", "spec.template.spec.completions"}


class DryRunError(Exception):
    """A problem with the template, the job variables or the rendered manifest, in one line."""


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, ValidationError):
        return "; ".join(error["msg"] for error in exc.errors())
    if isinstance(exc, SchemaError):
        return f"{'.'.join(map(str, exc.absolute_path))}: {exc.message}"
    return " ".join(str(exc).split())


def load_template(path: Path = TEMPLATE) -> dict[str, Any]:
    """The base job template, checked as the server checks it plus: every placeholder names a declared variable."""
    try:
        template = json.loads(path.read_text())
        variables, job_configuration = template["variables"], template["job_configuration"]
        Draft202012Validator.check_schema(variables)
    except (OSError, ValueError, KeyError, TypeError, SchemaError) as exc:
        raise DryRunError(f"{path.name}: not a base job template: {type(exc).__name__}: {_one_line(exc)}") from exc
    declared = set(variables.get("properties", {}))
    used = {p.name for p in _placeholders(job_configuration) if p.type is PlaceholderType.STANDARD}
    if undeclared := sorted(used - declared):
        raise DryRunError(f"{path.name}: placeholders without a variable: {', '.join(undeclared)}")
    return template


def _placeholders(value: Any) -> Iterator[Any]:
    if isinstance(value, str):
        yield from find_placeholders(value)
    elif isinstance(value, dict | list):
        for item in value.values() if isinstance(value, dict) else value:
            yield from _placeholders(item)


def merge_job_variables(deployment: dict[str, Any], flow_run: dict[str, Any]) -> dict[str, Any]:
    """The flow run's job variables over the deployment's, `env` merged key by key (as the worker merges them)."""
    merged = {**deployment, **flow_run}
    if isinstance(deployment.get("env"), dict) and isinstance(flow_run.get("env"), dict):
        merged["env"] = {**deployment["env"], **flow_run["env"]}
    return merged


def check_job_variables(variables_schema: dict[str, Any], job_variables: dict[str, Any]) -> None:
    """Stricter than the server, which ignores unknown names and lets null through for any variable with a default."""
    properties = variables_schema.get("properties", {})
    if unknown := sorted({name.split(".")[0] for name in job_variables} - set(properties)):
        raise DryRunError(f"unknown job variable(s) {', '.join(unknown)}; the pool declares {', '.join(properties)}")
    values = {name: spec["default"] for name, spec in properties.items() if spec.get("default") is not None}
    values.update({name: value for name, value in job_variables.items() if "." not in name})
    if error := best_match(Draft202012Validator(variables_schema).iter_errors(values)):
        where = ".".join(str(part) for part in error.absolute_path) or "job variables"
        raise DryRunError(f"job variable {where}: {error.message}")


class _OfflineClient:
    """Stands in for the Prefect API: answers the worker's one read (the flow) and refuses the rest, which a
    template needs only for block or variable references."""

    def __init__(self, flow: Flow) -> None:
        self._flow = flow

    async def read_flow(self, flow_id: uuid.UUID) -> Flow:
        return self._flow

    def __getattr__(self, name: str) -> Any:
        raise DryRunError(f"the template needs the Prefect API ({name}); run with --server")


async def render(
    work_pool: WorkPool, deployment: DeploymentResponse, job_variables: dict[str, Any], client: Any = None
) -> dict[str, Any]:
    """The Job manifest for a new flow run of `deployment` with `job_variables`; offline unless a client is given."""
    if work_pool.type != "kubernetes":
        raise DryRunError(f"work pool {work_pool.name} is of type {work_pool.type}, not kubernetes")
    check_job_variables(
        work_pool.base_job_template["variables"], merge_job_variables(deployment.job_variables or {}, job_variables)
    )
    flow_run = FlowRun(
        name="dry-run", flow_id=deployment.flow_id, deployment_id=deployment.id, job_variables=dict(job_variables)
    )
    if client is None:
        client = _OfflineClient(Flow(id=deployment.flow_id, name=flow_name(deployment.entrypoint or "")))
    try:
        configuration = await KubernetesWorkerJobConfiguration.resolve_for_flow_run(
            flow_run, client=client, work_pool=work_pool, worker_name="dry-run", deployment=deployment
        )
    except ValueError as exc:  # pydantic's ValidationError is one
        raise DryRunError(f"job configuration: {_one_line(exc)}") from exc
    await validate_manifest(configuration.job_manifest)
    return configuration.job_manifest


async def validate_manifest(manifest: dict[str, Any]) -> V1Job:
    """Read the manifest as the Kubernetes client's `V1Job`; a key it drops or a value it changes is an error."""
    async with ApiClient() as api:
        try:
            job = api.deserialize(SimpleNamespace(data=json.dumps(manifest)), "V1Job")
        except (ValueError, TypeError, AttributeError) as exc:
            raise DryRunError(f"job manifest is not a V1Job: {_one_line(exc)}") from exc
        read_back = api.sanitize_for_serialization(job)
    if problems := list(_differences(manifest, read_back, "")):
        raise DryRunError(f"job manifest is not a V1Job: {'; '.join(problems)}")
    return job


def _differences(sent: Any, read: Any, path: str) -> Iterator[str]:
    if isinstance(sent, dict) and isinstance(read, dict):
        for key, value in sent.items():
            if value is None:  # null is "unset" to the API server and dropped by the client
                continue
            if key not in read:
                if f"{path}{key}" in WORKER_ONLY_KEYS:
                    continue
                yield f"{path}{key} is not a field"
            else:
                yield from _differences(value, read[key], f"{path}{key}.")
    elif isinstance(sent, list) and isinstance(read, list) and len(sent) == len(read):
        for index, (item, item_read) in enumerate(zip(sent, read, strict=True)):
            yield from _differences(item, item_read, f"{path.rstrip('.')}[{index}].")
    # A bare number is a valid quantity; the client model types quantities as strings.
    elif sent != read and not (type(sent) in (int, float) and str(sent) == read):
        yield f"{path.rstrip('.')} has the wrong type: {sent!r}"


def flow_name(entrypoint: str) -> str:
    """The flow's name from its decorator, read without importing the flow (and torch with it)."""
    path, _, function = entrypoint.rpartition(":")
    try:
        return load_flow_arguments_from_entrypoint(f"{ROOT / path}:{function}").get("name", function.replace("_", "-"))
    except (OSError, ValueError, SyntaxError) as exc:
        raise DryRunError(f"entrypoint {entrypoint!r}: {_one_line(exc)}") from exc


def deployment_from_prefect_file(name: str, prefect_file: Path = PREFECT_FILE) -> DeploymentResponse:
    """The deployment as `prefect deploy --prefect-file` would register it (the parts a worker reads)."""
    spec = yaml.safe_load(prefect_file.read_text())
    found = {d["name"]: d for d in spec.get("deployments", [])}
    if name not in found:
        raise DryRunError(f"{prefect_file.name} has no deployment {name!r} (it has {', '.join(found)})")
    entry = found[name]
    return DeploymentResponse(
        name=name,
        flow_id=uuid.uuid4(),
        entrypoint=entry["entrypoint"],
        work_pool_name=entry["work_pool"]["name"],
        job_variables=entry["work_pool"].get("job_variables") or {},
        parameters=entry.get("parameters") or {},
    )


async def render_from_server(deployment_name: str, job_variables: dict[str, Any]) -> dict[str, Any]:
    """Render against PREFECT_API_URL: the deployment, its pool's template and block references as stored there."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound
    from prefect.settings import get_current_settings

    if not (url := get_current_settings().api.url):
        raise DryRunError("--server needs PREFECT_API_URL")  # else Prefect would start a throwaway server
    async with get_client() as client:
        try:
            deployment = await client.read_deployment_by_name(deployment_name)
        except ObjectNotFound as exc:
            raise DryRunError(f"no deployment {deployment_name} on {url}") from exc
        try:
            work_pool = await client.read_work_pool(deployment.work_pool_name)
        except ObjectNotFound as exc:
            raise DryRunError(f"no work pool {deployment.work_pool_name} on {url}") from exc
        return await render(work_pool, deployment, job_variables, client=client)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--deployment", default="gpu-nightly", help="a deployment of deployments/kubernetes/prefect.yaml"
    )
    parser.add_argument("--job-variables", default="{}", help="the flow run's job variables, a JSON object")
    parser.add_argument("--template", type=Path, default=TEMPLATE, help="the pool's base job template")
    parser.add_argument("--server", action="store_true", help="read deployment and pool from PREFECT_API_URL")
    args = parser.parse_args(argv)
    try:
        try:
            job_variables = json.loads(args.job_variables)
        except ValueError as exc:
            raise DryRunError(f"--job-variables is not JSON: {exc}") from exc
        if not isinstance(job_variables, dict):
            raise DryRunError("--job-variables must be a JSON object")
        deployment = deployment_from_prefect_file(args.deployment)
        if args.server:
            name = f"{flow_name(deployment.entrypoint or '')}/{deployment.name}"
            manifest = asyncio.run(render_from_server(name, job_variables))
        else:
            work_pool = WorkPool(
                name=deployment.work_pool_name, type="kubernetes", base_job_template=load_template(args.template)
            )
            manifest = asyncio.run(render(work_pool, deployment, job_variables))
    except DryRunError as exc:
        sys.exit(f"dry run: {exc}")
    yaml.safe_dump(manifest, sys.stdout, sort_keys=False)


if __name__ == "__main__":
    main()
