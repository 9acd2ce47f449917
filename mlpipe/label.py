"""label: one label per item from annotator votes (or a plain label column), and a frozen class map.

Majority vote; a tie or an item with no vote goes to the review queue instead of being guessed,
and review items never reach training. The class map (label -> index) is written once here and
every later stage reads it, so indices cannot drift between training and evaluation.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd

from mlpipe.anonymize import ITEM_ID, NEAR_DUP_GROUP
from mlpipe.config import LabelConfig
from mlpipe.errors import MlpipeError
from mlpipe.store import StageResult, code_version, stable_hash, stage_dir, write_json

LABEL, TARGET = "label", "y"


def normalize(value: str, synonyms: dict[str, str] | None = None) -> str:
    """Case and whitespace folded, then mapped through the synonyms (keys folded the same way)."""
    folded = " ".join(str(value).split()).casefold()
    return (synonyms or {}).get(folded, folded)


def majority_vote(votes: list[str], min_agreement: float = 0.0) -> tuple[str | None, str | None]:
    """(label, None) or (None, reason) with reason 'unlabelled', 'tie' or 'low agreement' (the
    winner's share of the votes cast is below `min_agreement`)."""
    counts = Counter(v for v in votes if v)
    if not counts:
        return None, "unlabelled"
    ranked = counts.most_common()
    if len(ranked) > 1 and ranked[0][1] == ranked[1][1]:
        return None, "tie"
    if ranked[0][1] / sum(counts.values()) < min_agreement:
        return None, "low agreement"
    return ranked[0][0], None


def near_duplicate_conflicts(items: pd.DataFrame, labels: pd.Series) -> pd.Series:
    """Members of a near-duplicate group whose labels disagree: one image cannot be two classes,
    so the whole group goes to review instead of training on a coin flip."""
    if NEAR_DUP_GROUP not in items.columns:
        return pd.Series(False, index=items.index)
    grouped = items[NEAR_DUP_GROUP].where(items[NEAR_DUP_GROUP] != "")
    distinct = labels.groupby(grouped).transform(lambda g: g.dropna().nunique())
    return grouped.notna() & distinct.gt(1).reindex(items.index, fill_value=False)


def duplicate_conflicts(items: pd.DataFrame, labels: pd.Series, dataset: StageResult, config: LabelConfig) -> pd.Series:
    """Kept items whose removed exact duplicates were labelled differently: the same pixels under
    two labels is a labelling error, so the item goes to review rather than keeping either label."""
    path = dataset.file("duplicates.parquet")
    flagged = pd.Series(False, index=items.index)
    if not path.exists():
        return flagged
    removed = pd.read_parquet(path)
    if removed.empty or not set(config.columns) <= set(removed.columns):
        return flagged
    votes = removed[config.columns].astype(str).map(normalize)
    removed_label = [majority_vote(list(row))[0] for row in votes.itertuples(index=False)]
    label_of = dict(zip(items[ITEM_ID], labels, strict=True))
    bad = {item for item, lab in zip(removed[ITEM_ID], removed_label, strict=True)
           if lab is not None and label_of.get(item) is not None and lab != label_of[item]}  # fmt: skip
    return items[ITEM_ID].isin(bad)


def agreement(votes: pd.DataFrame, classes: list[str]) -> dict:
    """Krippendorff's alpha (nominal; missing votes allowed) overall and per class (that class
    against the rest), from the krippendorff package."""
    import krippendorff

    codes = {name: i for i, name in enumerate(classes)}
    data = votes.apply(lambda col: col.map(codes)).to_numpy(dtype=float).T  # raters x items, NaN = no vote

    def alpha(matrix: np.ndarray) -> float | None:
        values = matrix[~np.isnan(matrix)]
        if len(np.unique(values)) < 2:
            return None  # alpha is undefined when every vote is the same
        return round(float(krippendorff.alpha(reliability_data=matrix, level_of_measurement="nominal")), 4)

    per_class = {name: alpha(np.where(np.isnan(data), np.nan, (data == i).astype(float))) for name, i in codes.items()}
    return {"krippendorff_alpha": alpha(data), "krippendorff_alpha_per_class": per_class}


def label_studio_tasks(review: pd.DataFrame) -> list[dict]:
    """The review queue as a Label Studio import file: anonymized image references only."""
    return [
        {"data": {"image": f"images/{item_id}.png", "item_id": item_id}, "meta": {"reason": reason}}
        for item_id, reason in zip(review[ITEM_ID], review["reason"], strict=True)
    ]


def read_label_studio(path) -> pd.DataFrame:
    """Labels from a Label Studio export, JSON or JSON-MIN: a table of (item_id, label).

    JSON: each task's last annotation's first choice. JSON-MIN: the flat record's choice field.
    """
    tasks = json.loads(Path(path).read_text(encoding="utf-8"))
    rows = []
    for task in tasks:
        if "annotations" in task:  # full JSON export
            item = task["data"]["item_id"]
            results = [r for a in task["annotations"] if not a.get("was_cancelled") for r in a.get("result", [])]
            choices = [c for r in results for c in r.get("value", {}).get("choices", [])]
            rows.append((item, choices[-1] if choices else ""))
        else:  # JSON-MIN: the data fields plus one field per control, named after it
            choice = next((v for k, v in task.items() if k not in ("image", "item_id", "id", "annotator",
                                                                   "annotation_id", "created_at", "updated_at",
                                                                   "lead_time")), "")  # fmt: skip
            rows.append((task["item_id"], choice if isinstance(choice, str) else (choice or [""])[0]))
    return pd.DataFrame(rows, columns=[ITEM_ID, LABEL])


def apply_tie_policy(votes: pd.DataFrame, labels: pd.Series, reasons: pd.Series, config: LabelConfig):
    """(labels, reasons, dropped mask) after the configured tie policy. "review" leaves ties in the
    queue; "drop" removes them from training and queue alike (counted in the report); "prefer"
    takes the preferred annotator's vote when it is one of the tied labels, else reviews."""
    tied = reasons.eq("tie")
    dropped = pd.Series(False, index=labels.index)
    if config.tie_policy == "drop":
        dropped = tied
    elif config.tie_policy == "prefer":
        for i in labels.index[tied]:
            counts = Counter(v for v in votes.loc[i] if v)
            top = {label for label, n in counts.items() if n == max(counts.values())}
            choice = votes.at[i, config.prefer_annotator]
            if choice in top:
                labels[i], reasons[i] = choice, None
    return labels, reasons, dropped


def label(dataset: StageResult, config: LabelConfig) -> StageResult:
    items = pd.read_parquet(dataset.file("items.parquet"))
    missing = [c for c in config.columns if c not in items.columns]
    if missing:
        raise MlpipeError(f"label column(s) not found after anonymization: {', '.join(missing)} (label.columns)")

    synonyms = {normalize(k): normalize(v) for k, v in config.synonyms.items()}
    votes = items[config.columns].astype(str).map(lambda v: normalize(v, synonyms))
    decided = [majority_vote(list(row), config.min_agreement) for row in votes.itertuples(index=False)]
    labels = pd.Series([lab for lab, _ in decided], index=items.index, dtype=object)
    review_reason = pd.Series([why for _, why in decided], index=items.index, dtype=object)
    labels, review_reason, dropped = apply_tie_policy(votes, labels, review_reason, config)

    found = sorted(set(labels.dropna()))
    allowed = None if config.classes is None else [normalize(c, synonyms) for c in config.classes]
    if allowed is not None:
        unknown = sorted(set(found) - set(allowed))
        if unknown:
            raise MlpipeError(f"unknown label(s) not in label.classes: {', '.join(unknown)}")
    if not found:
        raise MlpipeError("no item has a label: every item is unlabelled or tied")
    class_names = list(dict.fromkeys(allowed)) if allowed is not None else found
    class_map = {name: index for index, name in enumerate(class_names)}

    conflicts = near_duplicate_conflicts(items, labels)
    labels[conflicts] = None
    review_reason[conflicts] = "near-duplicate label conflict"
    conflicts = duplicate_conflicts(items, labels, dataset, config)
    labels[conflicts] = None
    review_reason[conflicts] = "duplicate label conflict"

    labelled = items[labels.notna()].copy()
    labelled[LABEL] = labels[labels.notna()]
    labelled[TARGET] = labelled[LABEL].map(class_map).astype(int)
    queued = labels.isna() & ~dropped
    review = pd.DataFrame({ITEM_ID: items.loc[queued, ITEM_ID], "reason": review_reason[queued]})

    multi = len(config.columns) > 1
    unanimous = votes.nunique(axis=1).eq(1) & votes.ne("").all(axis=1)
    report = {
        "items": len(items),
        "labelled": len(labelled),
        "review_queue": dict(Counter(review["reason"])),
        "dropped_ties": int(dropped.sum()),
        "class_counts": {name: int((labelled[LABEL] == name).sum()) for name in class_names},
        "unanimous_fraction": round(float(unanimous.mean()), 4) if multi else None,
        **(agreement(votes, class_names) if multi else {}),
        "disagreement_fraction": round(float(1 - unanimous[votes.ne("").any(axis=1)].mean()), 4) if multi else None,
        "num_classes": len(class_names),
    }
    key = stable_hash(dataset.key, config, code_version("mlpipe.label"))[:16]
    with stage_dir("label", key) as out:
        labelled.to_parquet(out / "items.parquet", index=False)
        review.to_csv(out / "review_queue.csv", index=False)
        write_json(out / "review_tasks.json", label_studio_tasks(review))
        write_json(out / "label_map.json", class_map)
        write_json(out / "report.json", report)
    return StageResult.at("label", key, report, pixels=dataset.file("pixels"))
