"""Search: trials cached and resumable; ranking on validation data only."""

import json
import os
import time

import pytest
from pydantic import ValidationError

from mlpipe.anonymize import anonymize
from mlpipe.config import AnonymizeConfig, IngestConfig, LabelConfig, PipelineConfig, SearchConfig, SourceConfig
from mlpipe.errors import MlpipeError
from mlpipe.ingest import ingest
from mlpipe.label import label
from mlpipe.resample import resample
from mlpipe.split import split
from mlpipe.train.launch import parallel_slots, run_in_threads, train, trial_dir


@pytest.fixture
def prepared(state, sample_root):
    source = SourceConfig(uri=str(sample_root))
    labelled = label(anonymize(ingest(source, IngestConfig()), AnonymizeConfig(), source), LabelConfig(find_label_issues=False))
    config = PipelineConfig().with_overrides({"train.epochs": 2, "train.nproc": 1})
    splits = split(labelled, config.split)
    trials = config.trials()[:2]
    return splits, resample(splits, trials), trials


def test_a_rerun_after_a_kill_repeats_no_finished_trial(prepared):
    splits, resampled, trials = prepared
    first = train(splits, resampled, trials, {}, None)
    assert first.report["reused_trials"] == 0
    done, killed = (trial_dir(splits, resampled, t, "") for t in trials)
    finished_at = (done / "result.json").stat().st_mtime_ns
    (killed / "result.json").unlink()  # as if the flow died while the second trial trained
    second = train(splits, resampled, trials, {}, None)
    launched = json.loads(second.file("launch-0.json").read_text())["trials"]
    assert [t["name"] for t in launched] == [trials[1].name]  # only the unfinished trial ran again
    assert (done / "result.json").stat().st_mtime_ns == finished_at
    assert "resumed after epoch 1" in second.file("launch-0.log").read_text()  # from its last.pt
    assert second.report["reused_trials"] == 1
    by_name = {t["trial"]: t for t in second.report["trials"]}
    assert by_name[trials[0].name]["cached"] and by_name[trials[0].name]["history"]  # curves for the new MLflow run
    assert by_name[trials[0].name]["val_metrics"] == first.report["trials"][0]["val_metrics"]
    third = train(splits, resampled, trials, {}, None)
    assert third.report["reused_trials"] == 2 and not third.file("launch-0.json").exists()


def test_a_changed_trial_config_is_a_new_trial(prepared):
    splits, resampled, trials = prepared
    changed = trials[0].model_copy(update={"train": trials[0].train.model_copy(update={"lr": 0.123})})
    assert trial_dir(splits, resampled, trials[0], "") != trial_dir(splits, resampled, changed, "")


def _entry(name, params, f1, acc, loss=0.5):
    return {"trial": name, "params": params, "val_metrics": {"val_macro_f1": f1, "val_accuracy": acc, "val_loss": loss},
            "best_epoch": 1, "epochs_run": 2, "seconds": 1.0}  # fmt: skip


def test_ties_break_on_the_declared_secondary_metric():
    from mlpipe.search import leaderboard

    trials = [_entry("t0", {}, 0.9, 0.80, 0.3), _entry("t1", {}, 0.9, 0.85, 0.4), _entry("t2", {}, 0.8, 0.99, 0.1)]
    assert leaderboard(trials, "val_macro_f1", "val_accuracy")["trial"].tolist() == ["t1", "t0", "t2"]
    assert leaderboard(trials, "val_macro_f1", "val_loss")["trial"].tolist() == ["t0", "t1", "t2"]  # lower loss wins


@pytest.mark.parametrize("axes", [1, 2, 3])
def test_grid_figure_for_one_two_and_more_axes(axes, tmp_path):
    import itertools

    from mlpipe.search import grid_figure, leaderboard

    values = {"train.lr": [0.1, 0.01], "resample.strategy": ["none", "smote"], "train.batch_size": [16, 32]}
    keys = list(values)[:axes]
    trials = [_entry(f"t{i}", dict(zip(keys, combo, strict=True)), 0.5 + 0.01 * i, 0.5)
              for i, combo in enumerate(itertools.product(*(values[k] for k in keys)))]  # fmt: skip
    fig = grid_figure(leaderboard(trials, "val_macro_f1"), "val_macro_f1")
    fig.savefig(tmp_path / "grid.png")
    assert (tmp_path / "grid.png").stat().st_size > 5000


def test_successive_halving_keeps_the_best_third_and_continues_from_checkpoints(state, sample_root):
    source = SourceConfig(uri=str(sample_root))
    labelled = label(anonymize(ingest(source, IngestConfig()), AnonymizeConfig(), source), LabelConfig(find_label_issues=False))
    config = PipelineConfig().with_overrides({
        "train.epochs": 9, "train.nproc": 1, "train.patience": 9,
        "search.strategy": "halving", "search.halving_factor": 3, "search.min_epochs": 1,
        "search.grid": {"train.lr": [0.0003, 0.003, 0.01], "resample.strategy": ["none", "random_over", "class_weight"]},
    })  # fmt: skip
    splits = split(labelled, config.split)
    trials = config.trials()
    resampled = resample(splits, trials)
    result = train(splits, resampled, trials, {}, None, search=config.search)
    report = result.report
    assert [r["budget"] for r in report["rungs"]] == [1, 3, 9]
    assert [len(r["trials"]) for r in report["rungs"]] == [9, 3, 1]
    epochs = {t["trial"]: t["epochs_run"] for t in report["trials"]}
    survivor = report["rungs"][-1]["trials"][0]
    assert epochs[survivor] == 9 and sorted(epochs.values()) == [1] * 6 + [3, 3, 9]
    assert report["trial_epochs"] == 21 and report["full_grid_trial_epochs"] == 81
    # the rung-2 trials were the best three of rung 1, on the search metric
    first = {t: e for t, e in epochs.items()}
    assert set(report["rungs"][1]["trials"]) <= set(first)
    log = "".join(p.read_text() for p in sorted(result.file("").glob("launch-*.log")))
    assert log.count("resumed after epoch 0") == 3 and log.count("resumed after epoch 2") == 1  # continued, not restarted


def test_halving_budgets():
    from mlpipe.train.launch import budgets

    trials = PipelineConfig().with_overrides({"train.epochs": 20}).trials()
    halving = PipelineConfig().with_overrides({"search.strategy": "halving", "search.min_epochs": 2}).search
    assert budgets(trials, halving) == [2, 6, 18, 20]
    assert budgets(trials, PipelineConfig().search) == [None]


def test_parallel_trials_run_as_separate_launches_with_the_results_of_one_launch(prepared, state, monkeypatch):
    splits, resampled, trials = prepared
    monkeypatch.setattr(os, "cpu_count", lambda: 1)  # one thread a process either way: results must be identical
    one = train(splits, resampled, trials, {}, None)
    monkeypatch.setenv("MLPIPE_HOME", str(state.parent / "second"))  # fresh trial folders, same splits
    two = train(splits, resampled, trials, {}, None, search=SearchConfig(max_parallel=2))
    assert one.report["reused_trials"] == two.report["reused_trials"] == 0
    launched = [[t["name"] for t in json.loads(two.file(f"launch-{i}.json").read_text())["trials"]] for i in (0, 1)]
    assert launched == [[trials[0].name], [trials[1].name]]
    assert "[trial-" in two.file("launch-0.log").read_text() and "[trial-" in two.file("launch-1.log").read_text()
    for a, b in zip(one.report["trials"], two.report["trials"], strict=True):
        assert a["trial"] == b["trial"] and a["train_items"] == b["train_items"]
        assert b["val_metrics"] == a["val_metrics"]


class _Job:
    def __init__(self, name, fail=False):
        self.name, self.fail, self.ran = name, fail, False

    def run(self):
        time.sleep(0.2)
        self.ran = True
        if self.fail:
            raise MlpipeError(f"training failed (torchrun exit code 1): {self.name} broke")


def test_a_failed_launch_lets_the_others_finish_then_fails_naming_it():
    jobs = [_Job("launch-0", fail=True), _Job("launch-1"), _Job("launch-2")]
    with pytest.raises(MlpipeError, match="1 of 3 training launches failed; first: .*launch-0 broke"):
        run_in_threads(jobs)
    assert all(job.ran for job in jobs)  # the finished trials are kept for the rerun


def test_parallel_slots_split_gpus_into_disjoint_slices(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5,6,7")
    auto, two = SearchConfig(max_parallel="auto"), SearchConfig(max_parallel=2)
    assert parallel_slots(auto, cuda=True, nproc=1, jobs=9) == ["3", "5", "6", "7"]
    assert parallel_slots(auto, cuda=True, nproc=2, jobs=9) == ["3,5", "6,7"]
    assert parallel_slots(auto, cuda=True, nproc=1, jobs=2) == ["3", "5"]  # never more launches than trials
    with pytest.raises(MlpipeError, match="max_parallel=3 with train.nproc=2 needs 6 GPUs; 4 visible"):
        parallel_slots(SearchConfig(max_parallel=3), cuda=True, nproc=2, jobs=9)
    assert parallel_slots(SearchConfig(), cuda=True, nproc=4, jobs=9) == [None]  # max_parallel 1: inherit
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    assert len(parallel_slots(auto, cuda=False, nproc=2, jobs=9)) == 4
    assert len(parallel_slots(two, cuda=False, nproc=1, jobs=9)) == 2


def test_parallel_search_settings_are_checked():
    with pytest.raises(ValidationError, match="dask_address is set but search.task_runner is not 'dask'"):
        SearchConfig(dask_address="tcp://127.0.0.1:8786")
    with pytest.raises(ValidationError, match="at least 1 or 'auto'"):
        SearchConfig(max_parallel=0)


def test_two_runs_sharing_trials_never_train_one_twice(prepared):
    """Concurrent runs (threads here; processes take the same file locks) lock the trial folders:
    the second waits, then reuses what the first trained instead of training into the same folder."""
    from concurrent.futures import ThreadPoolExecutor

    splits, resampled, trials = prepared
    with ThreadPoolExecutor(2) as pool:
        first, second = pool.map(lambda _: train(splits, resampled, trials, {}, None), range(2))
    trained = [len(trials) - r.report["reused_trials"] for r in (first, second)]
    assert sorted(trained) == [0, len(trials)]  # every trial trained exactly once
    assert [t["val_metrics"] for t in first.report["trials"]] == [t["val_metrics"] for t in second.report["trials"]]
