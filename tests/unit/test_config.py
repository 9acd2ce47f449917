import pytest

from mlpipe.config import PipelineConfig, flat_params, load_config, parse_set
from mlpipe.errors import MlpipeError


def test_defaults_are_valid_and_grid_has_two_to_four_trials():
    config = PipelineConfig()
    assert config.source.uri == "sample://digits"
    assert 2 <= len(config.trials()) <= 4


def test_yaml_file_and_sets_are_applied_in_order(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lr: 0.05\n  epochs: 3\nsplit:\n  seed: 7\n")
    config = load_config(path, ["train.lr=0.01", "search.grid={}"])
    assert (config.train.lr, config.train.epochs, config.split.seed) == (0.01, 3, 7)
    assert len(config.trials()) == 1


@pytest.mark.parametrize(
    ("yaml_text", "needle"),
    [
        ("train:\n  lrr: 0.1\n", "unknown key 'train.lrr'"),
        ("trian:\n  lr: 0.1\n", "unknown key 'trian'"),
        ("train:\n  lr: fast\n", "train.lr"),
        ("train:\n  epochs: -1\n", "train.epochs"),
        ("resample:\n  strategy: bogus\n", "resample.strategy"),
        ("- a list\n", "mapping"),
        ("train: [unclosed\n", "not valid YAML"),
    ],
)
def test_bad_files_give_one_line_naming_the_key(tmp_path, yaml_text, needle):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml_text)
    with pytest.raises(MlpipeError) as err:
        load_config(path)
    assert needle in str(err.value)
    assert "\n" not in str(err.value)


def test_yaml_python_tags_are_refused_not_executed(tmp_path):
    path = tmp_path / "evil.yaml"
    path.write_text("train: !!python/object/apply:os.system ['touch hacked']\n")
    with pytest.raises(MlpipeError):
        load_config(path)
    assert not (tmp_path / "hacked").exists()


@pytest.mark.parametrize(
    ("assignment", "needle"),
    [("train.nope=1", "unknown key 'train.nope'"), ("nope.lr=1", "unknown key 'nope'"), ("train.lr", "dotted.key=value")],
)
def test_bad_sets_are_one_line_errors(assignment, needle):
    with pytest.raises(MlpipeError) as err:
        load_config(None, [assignment])
    assert needle in str(err.value)


def test_set_values_are_typed():
    assert parse_set("train.lr=0.01") == ("train.lr", 0.01)
    assert parse_set("label.columns=[a, b]") == ("label.columns", ["a", "b"])
    assert parse_set("train.nproc=auto") == ("train.nproc", "auto")


def test_grid_keys_are_validated_before_anything_runs():
    with pytest.raises(MlpipeError, match="search.grid"):
        load_config(None, ["search.grid={train.lr: [0.1, -1]}"])
    with pytest.raises(MlpipeError, match="cannot vary per trial"):
        load_config(None, ["search.grid={split.seed: [1, 2]}"])
    with pytest.raises(MlpipeError, match="unknown key"):
        load_config(None, ["search.grid={train.lrr: [0.1]}"])


def test_trials_carry_their_overrides():
    config = load_config(None, ["search.grid={train.lr: [0.1, 0.2], resample.strategy: [none, smote]}"])
    trials = config.trials()
    assert len(trials) == 4
    assert {(t.train.lr, t.resample.strategy) for t in trials} == {(a, b) for a in (0.1, 0.2) for b in ("none", "smote")}
    assert [t.name for t in trials] == ["trial-000", "trial-001", "trial-002", "trial-003"]


def test_a_file_policy_replaces_the_default_policy_whole(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("anonymize:\n  policy:\n    mrn: pseudonymize\n")
    assert list(load_config(path).anonymize.policy) == ["mrn"]


def test_flat_params_cover_every_section():
    params = flat_params(PipelineConfig())
    assert params["train.lr"] == "0.003"
    assert {p.split(".")[0] for p in params} >= {"source", "ingest", "anonymize", "label", "split", "resample",
                                                 "train", "search", "evaluate"}
    assert all(len(v) < 6000 for v in params.values())


@pytest.mark.parametrize(
    ("sets", "needle"),
    [
        (["train.nnodes=2"], "train: nnodes 2 needs rdzv_endpoint"),
        (["train.rdzv_endpoint=node0"], "train.rdzv_endpoint: must be host:port"),
        (["train.rdzv_endpoint=node0:70000"], "train.rdzv_endpoint: must be host:port with a port in 1..65535"),
        (["train.nnodes=0"], "train.nnodes"),
        (["train.rdzv_timeout_s=5"], "train.rdzv_timeout_s"),
        (["train.nnodes=2", "train.rdzv_endpoint=node0:29400", "search.max_parallel=2"],
         "train.nnodes 2 needs search.max_parallel 1"),
        (["train.rdzv_endpoint=node0:29400", "search.max_parallel=auto", "search.grid={train.nnodes: [1, 2]}"],
         "search.grid: train.nnodes 2 needs search.max_parallel 1"),
    ],
)  # fmt: skip
def test_multi_node_settings_are_checked(sets, needle):
    with pytest.raises(MlpipeError) as err:
        load_config(None, sets)
    assert needle in str(err.value)
    assert "\n" not in str(err.value)


def test_multi_node_settings_load():
    config = load_config(None, ["train.nnodes=4", "train.rdzv_endpoint=[fd00::1]:29400", "train.rdzv_timeout_s=60"])
    assert (config.train.nnodes, config.train.rdzv_endpoint, config.train.rdzv_timeout_s) == (4, "[fd00::1]:29400", 60)
    assert PipelineConfig().train.nnodes == 1 and PipelineConfig().train.rdzv_endpoint is None
