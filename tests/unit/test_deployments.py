from pathlib import Path

import yaml

from mlpipe.config import load_config

ROOT = Path(__file__).resolve().parents[2]


def test_prefect_yaml_declares_nightly_and_manual():
    spec = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    deployments = {d["name"]: d for d in spec["deployments"]}
    assert set(deployments) == {"nightly", "manual"}
    nightly = deployments["nightly"]["schedules"][0]
    assert nightly["cron"] and nightly["timezone"]
    assert deployments["manual"]["schedules"] == []
    for d in deployments.values():
        path, func = d["entrypoint"].split(":")
        assert (ROOT / path).is_file() and f"def {func}(" in (ROOT / path).read_text()
        assert d["work_pool"]["name"] == "mlpipe-process"


def test_environment_parameter_files_validate():
    files = sorted((ROOT / "deployments").glob("*.yaml"))
    assert files
    for path in files:
        load_config(path)


def test_flow_parameter_schema_is_a_usable_ui_form():
    from prefect.utilities.callables import parameter_schema

    from flows.training_pipeline import training_pipeline

    schema = parameter_schema(training_pipeline).model_dump()
    assert list(schema["properties"]) == ["config"]  # the config is the only parameter
    sections = schema["definitions"]
    assert {"SourceConfig", "TrainConfig", "SearchConfig", "ResampleConfig"} <= set(sections)
    strategy = sections["ResampleConfig"]["properties"]["strategy"]
    assert "smote" in strategy["enum"] and strategy["description"]  # a dropdown with help text
    assert sections["TrainConfig"]["properties"]["steps"]["minimum"] == 1  # bounds are validated
