"""search: the grid's trials side by side, and the winner, chosen on validation data only."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # headless
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from mlpipe.config import SearchConfig  # noqa: E402
from mlpipe.store import StageResult, code_version, stable_hash, stage_dir, write_csv, write_json  # noqa: E402


def leaderboard(trials: list[dict], metric: str, tie_break: str = "val_accuracy") -> pd.DataFrame:
    """One row per trial, best first; ties on `metric` break on `tie_break` (lower loss, higher
    otherwise), then grid order."""
    rows = [
        {"trial": t["trial"], **{f"param.{k}": v for k, v in t["params"].items()}, **t["val_metrics"],
         "best_epoch": t["best_epoch"], "epochs_run": t["epochs_run"], "seconds": t["seconds"]}
        for t in trials
    ]  # fmt: skip
    table = pd.DataFrame(rows)
    table["_order"] = range(len(table))
    keys = [metric] + ([tie_break] if tie_break != metric and tie_break in table else []) + ["_order"]
    ascending = [False] + ([tie_break == "val_loss"] if len(keys) == 3 else []) + [True]
    table = table.sort_values(keys, ascending=ascending, kind="stable")
    return table.drop(columns="_order").reset_index(drop=True)


def grid_figure(table: pd.DataFrame, metric: str):
    """`leaderboard`'s table as a figure of `metric` (validation): one grid axis: bars; two: a
    heatmap; more: parallel coordinates (coloured by the metric). Constrained layout keeps titles
    and labels inside the canvas."""
    axes = [c for c in table.columns if c.startswith("param.")]
    if len(axes) == 2:
        pivot = table.pivot_table(index=axes[0], columns=axes[1], values=metric, aggfunc="max")
        fig, ax = plt.subplots(figsize=(max(5.0, 2.5 + 1.2 * pivot.shape[1]), 2.0 + 0.8 * pivot.shape[0]),
                               layout="constrained")  # fmt: skip
        image = ax.imshow(pivot.to_numpy(dtype=float), cmap="viridis")
        ax.set_xticks(range(pivot.shape[1]), [str(v) for v in pivot.columns])
        ax.set_yticks(range(pivot.shape[0]), [str(v) for v in pivot.index])
        ax.set_xlabel(axes[1].removeprefix("param."))
        ax.set_ylabel(axes[0].removeprefix("param."))
        for (i, j), value in np.ndenumerate(pivot.to_numpy(dtype=float)):
            ax.text(j, i, f"{value:.3f}", ha="center", va="center", color="white", fontsize=8)
        fig.colorbar(image, ax=ax, label=metric)
    elif len(axes) > 2:
        fig, ax = plt.subplots(figsize=(1.8 * len(axes) + 2, 4), layout="constrained")
        columns = axes + [metric]
        scaled = []
        for column in columns:  # categories and numbers alike to [0, 1], by rank of their distinct values
            values = table[column].astype(str) if column != metric else table[column]
            codes = pd.Series(pd.factorize(values, sort=True)[0], index=table.index) if column != metric else values
            span = codes.max() - codes.min()
            scaled.append((codes - codes.min()) / span if span else codes * 0 + 0.5)
        colours = plt.cm.viridis((table[metric] - table[metric].min()) / ((table[metric].max() - table[metric].min()) or 1))
        for row in range(len(table)):
            ax.plot(range(len(columns)), [s.iloc[row] for s in scaled], color=colours[row], alpha=0.8)
        ax.set_xticks(range(len(columns)), [c.removeprefix("param.") for c in columns], rotation=20)
        ax.set_yticks([])
    else:
        fig, ax = plt.subplots(figsize=(max(5.0, 0.6 * len(table) + 2), 3.8), layout="constrained")
        labels = table[axes[0]].astype(str) if axes else table["trial"]
        ax.bar(labels, table[metric])
        ax.set_xlabel(axes[0].removeprefix("param.") if axes else "trial")
        ax.set_ylabel(metric)
    ax.set_title(f"Grid search: {metric} (validation)")
    return fig


def search(trained: StageResult, config: SearchConfig) -> StageResult:
    table = leaderboard(trained.report["trials"], config.metric, config.tie_break)
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
        write_csv(table, out / "results.csv")
        fig = grid_figure(table, config.metric)
        fig.savefig(out / "grid.png", dpi=110)
        plt.close(fig)
        write_json(out / "report.json", report)
    checkpoint = {"checkpoint": trained.file(winner["checkpoint"])} if winner["checkpoint"] else {}  # kfold: refit
    return StageResult.at("search", key, report, **checkpoint)
