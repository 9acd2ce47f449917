"""search: the grid's trials side by side, and the winner, chosen on validation data only."""

from __future__ import annotations

import pandas as pd

from mlpipe.config import SearchConfig
from mlpipe.store import StageResult, code_version, stable_hash, stage_dir, write_json

TIE_BREAK = "val_accuracy"


def leaderboard(trials: list[dict], metric: str) -> pd.DataFrame:
    """One row per trial, best first; ties on `metric` break on validation accuracy, then grid order."""
    rows = [
        {"trial": t["trial"], **{f"param.{k}": v for k, v in t["params"].items()}, **t["val_metrics"],
         "best_epoch": t["best_epoch"], "epochs_run": t["epochs_run"], "seconds": t["seconds"]}
        for t in trials
    ]  # fmt: skip
    table = pd.DataFrame(rows)
    table["_order"] = range(len(table))
    table = table.sort_values([metric, TIE_BREAK, "_order"], ascending=[False, False, True], kind="stable")
    return table.drop(columns="_order").reset_index(drop=True)


def search(trained: StageResult, config: SearchConfig) -> StageResult:
    table = leaderboard(trained.report["trials"], config.metric)
    winner = next(t for t in trained.report["trials"] if t["trial"] == table.loc[0, "trial"])
    report = {
        "metric": config.metric,
        "trials": len(table),
        "winner": winner["trial"],
        "winner_params": winner["params"],
        "winner_run_id": winner["run_id"],
        "winner_val_metrics": winner["val_metrics"],
        "winner_best_epoch": winner["best_epoch"],
        "cross_validated_folds": trained.report.get("folds"),
        "leaderboard": table[["trial", config.metric]].to_dict(orient="records"),
    }
    key = stable_hash(trained.key, config, code_version("mlpipe.search"))[:16]
    with stage_dir("search", key) as out:
        table.to_csv(out / "results.csv", index=False)
        write_json(out / "report.json", report)
    checkpoint = {"checkpoint": trained.file(winner["checkpoint"])} if winner["checkpoint"] else {}  # kfold: refit
    return StageResult.at("search", key, report, **checkpoint)
