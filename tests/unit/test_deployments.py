from pathlib import Path

import yaml

from mlpipe.config import load_config

ROOT = Path(__file__).resolve().parents[2]


def test_prefect_yaml_declares_nightly_and_manual_training_and_scoring():
    spec = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    deployments = {d["name"]: d for d in spec["deployments"]}
    assert set(deployments) == {"nightly", "manual", "scoring-nightly", "scoring-manual"}
    for scheduled, manual, flow in (("nightly", "manual", "training_pipeline"),
                                    ("scoring-nightly", "scoring-manual", "scoring_pipeline")):  # fmt: skip
        cron = deployments[scheduled]["schedules"][0]
        assert cron["cron"] and cron["timezone"] and cron["active"]
        assert deployments[manual]["schedules"] == []
        assert deployments[scheduled]["entrypoint"] == deployments[manual]["entrypoint"] == f"flows/{flow}.py:{flow}"
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


def test_scoring_flow_form_is_one_config_with_the_model_source_and_drift_threshold():
    from prefect.utilities.callables import parameter_schema

    from flows.scoring_pipeline import scoring_pipeline

    schema = parameter_schema(scoring_pipeline).model_dump()
    assert list(schema["properties"]) == ["config"]
    fields = schema["definitions"]["ScoringConfig"]["properties"]
    assert {"model", "source", "destination", "drift_threshold", "batch_size"} <= set(fields)
    assert fields["model"]["default"] == "models:/mlpipe-classifier@champion"
    assert fields["drift_threshold"]["exclusiveMinimum"] == 0 and fields["drift_threshold"]["description"]
