"""split: stratified train/val/test, grouped so that one subject never spans two splits.

Two rounds of scikit-learn's StratifiedGroupKFold: the first holds out one fold as test, the
second one fold of the rest as validation. Fractions are therefore met to the nearest fold
(1/round(1/fraction)), which is the price of keeping groups whole. The checks after the split
fail the run rather than let a leaky or class-starved split through.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold

from mlpipe.anonymize import ITEM_ID, NEAR_DUP_GROUP
from mlpipe.config import SplitConfig
from mlpipe.errors import MlpipeError
from mlpipe.ingest import PIXEL_INDEX
from mlpipe.label import LABEL, TARGET
from mlpipe.store import StageResult, code_version, stable_hash, stage_dir, write_json

SPLITS = ("train", "val", "test")


def _holdout(y: np.ndarray, groups: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(rest, held-out) positions: one fold of round(1/fraction) stratified group folds."""
    # scikit-learn refuses more folds than the largest class has items; tiny data gets fewer,
    # larger folds (a held-out share above `fraction`) instead of a crash.
    n_splits = max(2, min(round(1 / fraction), int(np.bincount(y).max())))
    folds = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    return next(folds.split(np.zeros(len(y)), y, groups))


def assign_splits(y: np.ndarray, groups: np.ndarray, config: SplitConfig) -> np.ndarray:
    """An array of 'train' / 'val' / 'test', one per item."""
    rest, test = _holdout(y, groups, config.test_fraction, config.seed)
    val_share = config.val_fraction / (1 - config.test_fraction)
    train_pos, val_pos = _holdout(y[rest], groups[rest], val_share, config.seed + 1)
    out = np.empty(len(y), dtype=object)
    out[test] = "test"
    out[rest[val_pos]] = "val"
    out[rest[train_pos]] = "train"
    return out


def combined_groups(subjects: pd.Series, near_dups: pd.Series | None) -> np.ndarray:
    """Items linked by subject or by near-duplicate group form one group: neither may span splits."""
    codes, _ = pd.factorize(subjects)
    parent = list(range(int(codes.max(initial=-1)) + 1))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    if near_dups is not None:
        first_subject: dict[str, int] = {}
        for code, dup in zip(codes, near_dups, strict=True):
            if dup:
                parent[find(code)] = find(first_subject.setdefault(dup, code))
    return np.array([find(c) for c in codes])


def check_stratifiable(labels: pd.Series, groups: pd.Series) -> None:
    per_class = pd.DataFrame({"label": labels, "group": groups}).groupby("label")["group"].nunique()
    small = per_class[per_class < len(SPLITS)]
    if len(small):
        detail = ", ".join(f"'{name}' ({n} group(s))" for name, n in small.items())
        raise MlpipeError(f"too few items to stratify: class {detail}; each class needs items from at least 3 groups")


def check_split(frame: pd.DataFrame, group_col: str) -> None:
    owners = frame.groupby(group_col)["split"].nunique()
    if (owners > 1).any():
        raise MlpipeError(f"split leak: {int((owners > 1).sum())} group(s) span more than one split")
    for name in SPLITS:
        absent = sorted(set(frame[LABEL]) - set(frame.loc[frame["split"] == name, LABEL]))
        if absent:
            raise MlpipeError(
                f"too few items to stratify: class(es) {', '.join(map(repr, absent))} absent from the {name} split"
            )


def split(labelled: StageResult, config: SplitConfig) -> StageResult:
    items = pd.read_parquet(labelled.file("items.parquet"))
    if config.group_column is not None and config.group_column not in items.columns:
        raise MlpipeError(f"split.group_column '{config.group_column}' is not a column of the labelled data")
    group_col = config.group_column or ITEM_ID
    items["group"] = combined_groups(items[group_col], items.get(NEAR_DUP_GROUP))
    check_stratifiable(items[LABEL], items["group"])

    items["split"] = assign_splits(items[TARGET].to_numpy(), items["group"].to_numpy(), config)
    check_split(items, "group")
    gap = proportion_gap(items)
    if gap > config.tolerance:
        raise MlpipeError(
            f"class proportions differ by {gap:.3f} between splits (split.tolerance is {config.tolerance}); "
            f"too few groups per class to stratify this closely"
        )

    table = items[[ITEM_ID, group_col, "group", LABEL, TARGET, PIXEL_INDEX, "split"]].sort_values(ITEM_ID)
    report = {
        "sizes": {name: int((items["split"] == name).sum()) for name in SPLITS},
        "groups": {name: int(items.loc[items["split"] == name, "group"].nunique()) for name in SPLITS},
        "class_counts": {
            name: {str(k): int(v) for k, v in items.loc[items["split"] == name, LABEL].value_counts().sort_index().items()}
            for name in SPLITS
        },
        "group_column": group_col,
        "proportion_gap_linf": round(gap, 4),
        "seed": config.seed,
    }
    key = stable_hash(labelled.key, config, code_version("mlpipe.split"))[:16]
    with stage_dir("split", key) as out:
        table.to_csv(out / "assignments.csv", index=False)
        table[[ITEM_ID, "split", LABEL]].reset_index(drop=True).to_parquet(out / "manifest.parquet", index=False)
        _chart(report, out / "class_counts.png")
        for name in SPLITS:
            part = table[table["split"] == name]
            np.savez(out / f"{name}.npz", pixel_index=part[PIXEL_INDEX].to_numpy(), y=part[TARGET].to_numpy())
        (out / "label_map.json").write_text(labelled.file("label_map.json").read_text())
        write_json(out / "report.json", report)
    return StageResult.at("split", key, report, pixels=labelled.file("pixels"))


def proportion_gap(items: pd.DataFrame) -> float:
    """L-infinity distance between the splits' class proportions (0: identical class mixes)."""
    shares = pd.crosstab(items["split"], items[LABEL], normalize="index")
    return float((shares.max(axis=0) - shares.min(axis=0)).max())


def _chart(report: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    classes = sorted({c for counts in report["class_counts"].values() for c in counts})
    fig, ax = plt.subplots(figsize=(1.5 + 0.45 * len(classes), 3.5))
    for i, name in enumerate(SPLITS):
        counts = report["class_counts"][name]
        ax.bar(np.arange(len(classes)) + i * 0.27, [counts.get(c, 0) for c in classes], 0.27, label=name)
    ax.set_xticks(np.arange(len(classes)) + 0.27, classes)
    ax.set_ylabel("items")
    ax.set_title(f"Class counts per split (L-inf gap {report['proportion_gap_linf']:.3f})")
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=110, metadata={"Software": None})  # no version stamp: same split, same bytes
    plt.close(fig)


def load_split(splits: StageResult, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 NHWC, integer labels) of one split, read from the decode-once pixel cache."""
    part = np.load(splits.file(f"{name}.npz"))
    pixels = np.load(splits.file("pixels"), mmap_mode="r")
    return np.ascontiguousarray(pixels[part["pixel_index"]]), part["y"]


def class_names(splits: StageResult) -> list[str]:
    mapping = json.loads(splits.file("label_map.json").read_text())
    return [name for name, _ in sorted(mapping.items(), key=lambda kv: kv[1])]
