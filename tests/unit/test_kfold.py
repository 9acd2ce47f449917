"""split.mode kfold: grouped stratified folds, every trial cross-validated, the winner refit on all folds."""

import numpy as np
import pandas as pd
import pytest

from mlpipe.anonymize import anonymize
from mlpipe.config import AnonymizeConfig, IngestConfig, LabelConfig, PipelineConfig, SourceConfig, SplitConfig
from mlpipe.errors import MlpipeError
from mlpipe.ingest import ingest
from mlpipe.label import label
from mlpipe.split import cv_folds, split


@pytest.fixture
def labelled(state, sample_root):
    source = SourceConfig(uri=str(sample_root))
    return label(anonymize(ingest(source, IngestConfig()), AnonymizeConfig(), source), LabelConfig(find_label_issues=False))


def test_kfold_split_keeps_groups_whole_and_every_class_in_every_fold(labelled):
    result = split(labelled, SplitConfig(mode="kfold", folds=4))
    table = pd.read_csv(result.file("assignments.csv"))
    rest = table[table["split"] != "test"]
    assert sorted(rest["fold"].unique()) == [0, 1, 2, 3] and (table.loc[table["split"] == "test", "fold"] == -1).all()
    assert rest.groupby("group")["fold"].nunique().max() == 1  # subjects and near-duplicates never span folds
    assert table.groupby("group")["split"].nunique().max() == 1
    for fold in range(4):
        assert set(rest.loc[rest["fold"] == fold, "label"]) == set(range(10))
    assert (rest["split"] == "val").eq(rest["fold"] == 0).all()  # fold 0 doubles as 'val'
    assert result.report["folds"] == [int((rest["fold"] == f).sum()) for f in range(4)]
    assert list(pd.read_parquet(result.file("manifest.parquet")).columns) == ["item_id", "split", "label", "fold"]
    names = [name for name, _, _ in cv_folds(result)]
    assert names == ["fold0", "fold1", "fold2", "fold3"]
    _, parts, val = cv_folds(result)[2]
    assert parts == ["fold-0.npz", "fold-1.npz", "fold-3.npz"] and val == "fold-2.npz"


def test_too_many_folds_for_the_groups_is_a_one_line_error(state, tmp_path):
    from .helpers import write_dataset

    root = write_dataset(tmp_path / "d", [0] * 60 + [1] * 60 + [2] * 12)
    source = SourceConfig(uri=str(root))
    policy = {"subject": "pseudonymize", "label": "keep"}
    data = anonymize(ingest(source, IngestConfig(image_size=8)), AnonymizeConfig(policy=policy), source)
    labelled = label(data, LabelConfig(columns=["label"], find_label_issues=False))
    split(labelled, SplitConfig(group_column="subject", mode="kfold", folds=3))  # 12 subjects of class 2 suffice
    with pytest.raises(MlpipeError, match=r"too few groups for split.folds=15: class\(es\) '2' absent from fold \d"):
        split(labelled, SplitConfig(group_column="subject", mode="kfold", folds=15))


def test_split_reports_no_leaks_per_kind(labelled):
    leaks = split(labelled, SplitConfig()).report["leaks"]
    assert leaks == {"subjects_across_splits": 0, "identical_images_across_splits": 0,
                     "near_duplicate_groups_across_splits": 0}  # fmt: skip


def test_cross_validation_then_refit_on_all_folds(labelled):
    from mlpipe.evaluate import evaluate
    from mlpipe.resample import resample
    from mlpipe.search import search
    from mlpipe.train.launch import refit, train

    config = PipelineConfig().with_overrides({
        "split.mode": "kfold", "split.folds": 3, "train.epochs": 2, "train.nproc": 1,
        "search.grid": {"resample.strategy": ["none", "random_over"]},
    })  # fmt: skip
    splits = split(labelled, config.split)
    trials = config.trials()
    resampled = resample(splits, trials)
    assert len(resampled.report["strategies"]) == 2 * 3  # per resample config and fold
    trained = train(splits, resampled, trials, {}, None)
    for entry in trained.report["trials"]:
        assert len(entry["fold_val_metrics"]) == 3
        folds_f1 = [m["val_macro_f1"] for m in entry["fold_val_metrics"]]
        assert entry["val_metrics"]["val_macro_f1"] == pytest.approx(np.mean(folds_f1))
        assert entry["checkpoint"] is None
    best = search(trained, config.search)
    assert best.report["cross_validated_folds"] == 3
    final = refit(best, splits, trials, None, None)
    development = sum(splits.report["sizes"][s] for s in ("train", "val"))
    winner_resample = next(t for t in trials if t.name == best.report["winner"]).resample.strategy
    if winner_resample == "none":
        assert final.report["refit"]["train_items"] == development
    else:
        assert final.report["refit"]["train_items"] >= development
    assert final.report["refit"]["epochs"] == best.report["winner_best_epoch"] + 1
    outcome, _ = evaluate(final, splits, config.evaluate)
    assert outcome.report["model"] == "refit on train+val" and outcome.report["test_items"] == splits.report["sizes"]["test"]
    for fitted in outcome.report["baselines"].values():  # the baselines saw train+val too
        assert fitted["train_items"] == development and fitted["notes"][-1].endswith("(refit on train+val, as the deep model was)")
    # The registry gate inside evaluate: the same model as champion gains nothing; a champion
    # with another class map is reported and skipped, never compared.
    from mlpipe.split import class_names

    checkpoint = str(final.file("checkpoint"))
    same = evaluate(final, splits, config.evaluate, {"version": "7", "checkpoint": checkpoint,
                                                     "class_names": class_names(splits)})[0].report["gate"]  # fmt: skip
    assert same["decision"] == "reject" and "paired bootstrap 95% CI excludes 0" in same["reasons"]
    assert same["champion_version"] == "7"
    other = evaluate(final, splits, config.evaluate, {"version": "8", "checkpoint": checkpoint,
                                                      "class_names": ["x", "y"]})[0].report["gate"]  # fmt: skip
    assert other["champion"] is None and any("class map differs" in r for r in other["reasons"])
    assert set(outcome.report["confidence_intervals_95"]) == {"test_accuracy", "test_balanced_accuracy", "test_macro_f1"}
    for name in ("confusion_matrix.png", "roc_pr_curves.png", "reliability.png", "misclassified.png", "gate.json"):
        assert outcome.file(name).stat().st_size > 0
    card = outcome.file("model_card.md").read_text()
    assert "## Registry gate" in card and "macro_f1: " in card and "95% CI" in card and splits.key in card
