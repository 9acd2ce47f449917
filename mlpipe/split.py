"""split: stratified train/val/test, grouped so that one subject never spans two splits.

Two rounds of scikit-learn's StratifiedGroupKFold: the first holds out one fold as test, the
second one fold of the rest as validation. Fractions are therefore met to the nearest fold
(1/round(1/fraction)), which is the price of keeping groups whole. The checks after the split
fail the run rather than let a leaky or class-starved split through.
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold

from mlpipe.anonymize import ITEM_ID, NEAR_DUP_GROUP
from mlpipe.config import SplitConfig
from mlpipe.errors import MlpipeError
from mlpipe.ingest import PIXEL_INDEX
from mlpipe.label import LABEL, LABEL_ISSUE, TARGET
from mlpipe.store import StageResult, code_version, stable_hash, stage_dir, write_csv, write_json

SPLITS = ("train", "val", "test")


def _holdout(y: np.ndarray, groups: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(rest, held-out) positions: one fold of round(1/fraction) stratified group folds."""
    # scikit-learn refuses more folds than the largest class has items, or than there are groups
    # (6 patients for a 0.15 share's 7 folds); tiny data gets fewer, larger folds (a held-out share
    # above `fraction`) instead of a crash.
    n_splits = max(2, min(round(1 / fraction), int(np.bincount(y).max()), len(np.unique(groups))))
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


def assign_folds(y: np.ndarray, groups: np.ndarray, config: SplitConfig) -> tuple[np.ndarray, np.ndarray]:
    """kfold mode: (split per item, fold per item). The test split is held out as in holdout mode;
    the rest forms `config.folds` stratified group folds (-1 for test). Fold 0 doubles as the
    'val' split, so every holdout consumer still works."""
    rest, test = _holdout(y, groups, config.test_fraction, config.seed)
    left = len(np.unique(groups[rest]))
    if left < config.folds:  # scikit-learn's ValueError, as the user's words
        raise MlpipeError(f"too few groups for split.folds={config.folds}: {left} left after the test split; "
                          "lower split.folds or use split.mode holdout")  # fmt: skip
    folds = np.full(len(y), -1)
    splitter = StratifiedGroupKFold(n_splits=config.folds, shuffle=True, random_state=config.seed + 1)
    with warnings.catch_warnings():  # "least populated class" is checked below, with a clearer message
        warnings.simplefilter("ignore", UserWarning)
        for fold, (_, held) in enumerate(splitter.split(np.zeros(len(rest)), y[rest], groups[rest])):
            folds[rest[held]] = fold
    out = np.where(folds == 0, "val", "train").astype(object)
    out[test] = "test"
    return out, folds


def check_folds(frame: pd.DataFrame, folds: int) -> None:
    part = frame[frame["fold"] >= 0]
    owners = part.groupby("group")["fold"].nunique()
    if (owners > 1).any():
        raise MlpipeError(f"split leak: {int((owners > 1).sum())} group(s) span more than one fold")
    for fold in range(folds):
        absent = sorted(set(part[LABEL]) - set(part.loc[part["fold"] == fold, LABEL]))
        if absent:
            raise MlpipeError(
                f"too few groups for split.folds={folds}: class(es) {', '.join(map(repr, absent))} absent from fold "
                f"{fold}; lower split.folds or use split.mode holdout"
            )


# A DICOM file whose Patient ID was blanked before it reached us belongs to its study (Study Instance
# UID, Type 1 in every image IOD; a study is one patient's), not to one group of every such file.
GROUP_FALLBACKS = {"PatientID": "StudyInstanceUID"}


def group_values(items: pd.DataFrame, column: str) -> pd.Series:
    """Each item's group as text: its `column` value, else (for PatientID) "study " + its
    StudyInstanceUID, else "" (no value: such items are one group, so that none of them can leak)."""
    values = items[column].fillna("").astype(str).str.strip()
    fallback = GROUP_FALLBACKS.get(column)
    if fallback in items.columns:
        study = items[fallback].fillna("").astype(str).str.strip()
        values = values.mask((values == "") & (study != ""), "study " + study)
    return values


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


def leak_report(items: pd.DataFrame, group_col: str) -> dict[str, int]:
    """How many subjects, near-duplicate groups and identical images (item ids are pixel hashes)
    appear in more than one split. `check_split` has already failed the run if any is non-zero;
    the report states it per kind so a reader can see what was checked."""
    def spanning(column: str) -> int:
        values = items[column].where(items[column].astype(str) != "")
        return int(items.groupby(values)["split"].nunique().gt(1).sum())

    report = {"subjects_across_splits": spanning(group_col), "identical_images_across_splits": spanning(ITEM_ID)}
    if NEAR_DUP_GROUP in items.columns:
        report["near_duplicate_groups_across_splits"] = spanning(NEAR_DUP_GROUP)
    return report


def check_stratifiable(labels: pd.Series, groups: pd.Series, blank: int = 0, group_column: str | None = None) -> None:
    """Raises MlpipeError naming each class with items from fewer than 3 groups, and how many items
    had no `group_column` value (`blank`: they are one group, so that none of them can leak)."""
    per_class = pd.DataFrame({"label": labels, "group": groups}).groupby("label")["group"].nunique()
    small = per_class[per_class < len(SPLITS)]
    if len(small):
        detail = ", ".join(f"'{name}' ({n} group(s))" for name, n in small.items())
        why = f"; {blank} item(s) have no {group_column} value and are one group" if blank else ""
        raise MlpipeError(f"too few items to stratify: class {detail}; each class needs items from at least 3 groups{why}")


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
    values = group_values(items, group_col)
    items["group"] = combined_groups(values, items.get(NEAR_DUP_GROUP))
    blank = int((values == "").sum()) if config.group_column else 0
    check_stratifiable(items[LABEL], items["group"], blank, group_col)

    y, groups = items[TARGET].to_numpy(), items["group"].to_numpy()
    if config.mode == "kfold":
        items["split"], items["fold"] = assign_folds(y, groups, config)
        check_folds(items, config.folds)
    else:
        items["split"], items["fold"] = assign_splits(y, groups, config), -1
    check_split(items, "group")
    gap = max(proportion_gap(items), proportion_gap(items[items["fold"] >= 0], by="fold"))
    step = group_step(items, "fold" if config.mode == "kfold" else "split")
    if gap > max(config.tolerance, step):
        raise MlpipeError(
            f"class proportions differ by {gap:.3f} between splits (split.tolerance is {config.tolerance}; one "
            f"group moves a share by {step:.3f}); too few groups per class to stratify this closely"
        )

    if LABEL_ISSUE not in items:  # a label stage output from before the flag column
        items[LABEL_ISSUE] = False
    columns = dict.fromkeys([ITEM_ID, group_col, "group", LABEL, TARGET, PIXEL_INDEX, "split", "fold", LABEL_ISSUE])
    table = items[list(columns)].sort_values(ITEM_ID)  # once each: group_column null groups by ITEM_ID itself
    report = {
        "sizes": {name: int((items["split"] == name).sum()) for name in SPLITS},
        "groups": {name: int(items.loc[items["split"] == name, "group"].nunique()) for name in SPLITS},
        "class_counts": {
            name: {str(k): int(v) for k, v in items.loc[items["split"] == name, LABEL].value_counts().sort_index().items()}
            for name in SPLITS
        },
        "mode": config.mode,
        "folds": [int((items["fold"] == f).sum()) for f in range(config.folds)] if config.mode == "kfold" else None,
        "group_column": group_col,
        "items_without_group": blank,  # no group_column value: one group together
        "proportion_gap_linf": round(gap, 4),
        "group_step": round(step, 4),
        "leaks": leak_report(items, group_col),
        "seed": config.seed,
    }
    key = stable_hash(labelled.key, config, code_version("mlpipe.split"))[:16]
    with stage_dir("split", key) as out:
        write_csv(table, out / "assignments.csv")  # labels and groups come from the manifest
        columns = [ITEM_ID, "split", LABEL] + (["fold"] if config.mode == "kfold" else [])
        table[columns].reset_index(drop=True).to_parquet(out / "manifest.parquet", index=False)
        _chart(report, out / "class_counts.png")
        for name in SPLITS:
            part = table[table["split"] == name]
            np.savez(out / f"{name}.npz", pixel_index=part[PIXEL_INDEX].to_numpy(), y=part[TARGET].to_numpy(),
                     label_issue=part[LABEL_ISSUE].to_numpy(bool))  # fmt: skip
        for fold in range(config.folds if config.mode == "kfold" else 0):
            part = table[table["fold"] == fold]
            np.savez(out / f"fold-{fold}.npz", pixel_index=part[PIXEL_INDEX].to_numpy(), y=part[TARGET].to_numpy(),
                     label_issue=part[LABEL_ISSUE].to_numpy(bool))  # fmt: skip
        (out / "label_map.json").write_text(labelled.file("label_map.json").read_text())
        write_json(out / "report.json", report)
    return StageResult.at("split", key, report, pixels=labelled.file("pixels"))


def group_step(items: pd.DataFrame, by: str = "split") -> float:
    """The finest balance whole groups allow: moving one typical group (the median group size)
    changes a class's share of the smallest part by median / size. A gap within one step is the
    arithmetic of small data, not a failed stratification, so the tolerance check allows it."""
    sizes = items[by].value_counts() if by != "fold" else items.loc[items["fold"] >= 0, "fold"].value_counts()
    if sizes.empty:
        return 0.0
    return float(items.groupby("group").size().median() / sizes.min())


def proportion_gap(items: pd.DataFrame, by: str = "split") -> float:
    """L-infinity distance between the splits' (or folds') class proportions (0: identical mixes)."""
    if items.empty:
        return 0.0
    shares = pd.crosstab(items[by], items[LABEL], normalize="index")
    return float((shares.max(axis=0) - shares.min(axis=0)).max())


def _chart(report: dict, path):
    """class_counts.png: items per class (names on the x axis) in each split, the legend outside
    the bars. Returns the saved, closed figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    classes = sorted({c for counts in report["class_counts"].values() for c in counts})
    fig, ax = plt.subplots(figsize=(max(5.5, 2.5 + 0.55 * len(classes)), 4), layout="constrained")
    for i, name in enumerate(SPLITS):
        counts = report["class_counts"][name]
        ax.bar(np.arange(len(classes)) + i * 0.27, [counts.get(c, 0) for c in classes], 0.27, label=name)
    ax.set_xticks(np.arange(len(classes)) + 0.27, classes)
    for label in ax.get_xticklabels():  # slanted: long class names stay apart
        label.set(rotation=35, ha="right", rotation_mode="anchor")
    ax.set_ylabel("items")
    ax.set_title(f"Class counts per split (L-inf gap {report['proportion_gap_linf']:.3f})")
    fig.legend(loc="outside lower center", ncols=len(SPLITS), fontsize="small")  # below the axes: never over a bar
    fig.savefig(path, dpi=110, metadata={"Software": None})  # no version stamp: same split, same bytes
    plt.close(fig)
    return fig


def load_split(splits: StageResult, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 NHWC, integer labels) of one split, read from the decode-once pixel cache."""
    return load_parts(splits, [f"{name}.npz"])


def cv_folds(splits: StageResult) -> list[tuple[str, list[str], str]]:
    """(name, training parts, validation part) per fold of cross-validation: kfold mode gives one
    per fold (that fold validates, the others train); holdout mode one ('', [train], val)."""
    count = len(splits.report.get("folds") or [])
    if not count:
        return [("", ["train.npz"], "val.npz")]
    return [(f"fold{k}", [f"fold-{j}.npz" for j in range(count) if j != k], f"fold-{k}.npz") for k in range(count)]


def development_parts(splits: StageResult) -> list[str]:
    """Every split file except test (train and val, or all folds): what a refit trains on."""
    _, train_parts, val_part = cv_folds(splits)[0]
    return [*train_parts, val_part]


def load_labels(splits: StageResult, parts: list[str]) -> np.ndarray:
    """The labels alone of the union of split files (no pixels read)."""
    return np.concatenate([np.load(splits.file(p))["y"] for p in parts])


def load_index(splits: StageResult, parts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(pixel-cache rows, labels) of the union of split files; no pixels read."""
    loaded = [np.load(splits.file(p)) for p in parts]
    return np.concatenate([p["pixel_index"] for p in loaded]), np.concatenate([p["y"] for p in loaded])


def training_items(splits: StageResult, parts: list[str], drop_label_issues: bool) -> tuple[np.ndarray, np.ndarray, int]:
    """(pixel-cache rows, labels, items left out) of the training parts: with
    `drop_label_issues` (resample.drop_label_issues, opt-in) the items the label stage flagged as
    likely label errors are left out. Only training parts come here; validation and test keep theirs."""
    index, y = load_index(splits, parts)
    if not drop_label_issues:
        return index, y, 0
    flagged = np.concatenate([np.load(splits.file(p)).get("label_issue", np.zeros(0, bool)) for p in parts])
    keep = ~flagged if len(flagged) == len(y) else np.ones(len(y), bool)
    return index[keep], y[keep], int((~keep).sum())


def trained_on(splits: StageResult, refit: bool, drop_label_issues: bool) -> tuple[int, int]:
    """(items the shipped model trained on, flagged items left out of them): the training parts
    (train, or train+val after a refit), less the label stage's flags when the winner dropped them.
    Synthetic resampling items are not counted: they are not rows of the data."""
    parts = development_parts(splits) if refit else cv_folds(splits)[0][1]
    index, _, left_out = training_items(splits, parts, drop_label_issues)
    return len(index), left_out


def load_parts(splits: StageResult, parts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 NHWC, labels) of the union of split files, from the pixel cache."""
    index, y = load_index(splits, parts)
    pixels = np.load(splits.file("pixels"), mmap_mode="r")
    return np.ascontiguousarray(pixels[index]), y


def class_names(splits: StageResult) -> list[str]:
    mapping = json.loads(splits.file("label_map.json").read_text())
    return [name for name, _ in sorted(mapping.items(), key=lambda kv: kv[1])]
