"""label: one label per item from annotator votes (or a plain label column), and a frozen class map.

Majority vote; a tie or an item with no vote goes to the review queue instead of being guessed,
and review items never reach training. The queue goes out as a Label Studio project
(review_tasks.json: inline anonymized images, the label-error model's guesses as
pre-annotations; labeling_config.xml) and its export comes back through label.reviewed. The
class map (label -> index) is written once here and every later stage reads it, so indices
cannot drift between training and evaluation.
"""

from __future__ import annotations

import base64
import hashlib
import json
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd

from mlpipe.accounting import check_drop
from mlpipe.anonymize import ITEM_ID, NEAR_DUP_GROUP
from mlpipe.config import LabelConfig
from mlpipe.errors import MlpipeError
from mlpipe.ingest import PIXEL_INDEX
from mlpipe.store import StageResult, code_version, stable_hash, stage_dir, write_json

LABEL, TARGET = "label", "y"
LABEL_ISSUE = "label_issue"  # flagged as a likely label error (advisory)


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


def dawid_skene(votes: np.ndarray, num_classes: int, max_iter: int = 100, tol: float = 1e-5) -> np.ndarray:
    """Posterior class probabilities per item (items x classes) from annotator votes (items x
    annotators, class codes, -1 = no vote) by Dawid and Skene's EM (1979): each annotator gets a
    confusion matrix, so a reliable annotator outweighs a careless one and majority ties resolve.

    Follows crowd-kit's DawidSkene step for step (majority-vote start, error rows clipped at 1e-10,
    stop when the evidence lower bound per vote gains less than `tol`); a test holds it to
    crowd-kit's answers. Items without a vote get a uniform row.
    """
    eps = 1e-10
    n_items, n_annotators = votes.shape
    voted = votes >= 0
    onehot = np.zeros((n_items, n_annotators, num_classes))  # onehot[i, a, l]: annotator a said l on item i
    onehot[voted] = np.eye(num_classes)[votes[voted]]
    counts = onehot.sum(axis=1)
    n_votes = counts.sum(axis=1, keepdims=True)
    probas = np.divide(counts, n_votes, out=np.full_like(counts, 1 / num_classes), where=n_votes > 0)
    has_vote = n_votes[:, 0] > 0

    def m_step(probas):
        errors = np.einsum("ial,ik->alk", onehot, probas)  # [annotator, observed, true]
        observed = onehot.any(axis=0)  # labels each annotator used at all
        errors = np.where(observed[:, :, None], np.clip(errors, eps, None), 0.0)
        return errors / errors.sum(axis=1, keepdims=True)

    priors, errors = probas[has_vote].mean(axis=0), m_step(probas)
    loss = -np.inf
    for _ in range(max_iter):
        with np.errstate(divide="ignore"):
            log_errors = np.log(errors)
        log_errors = np.where(np.isfinite(log_errors), log_errors, 0.0)  # only observed labels are ever read
        log_priors = np.log(np.clip(priors, eps, None))
        log_lik = log_priors + np.einsum("ial,alk->ik", onehot, log_errors)
        probas = np.exp(log_lik - log_lik.max(axis=1, keepdims=True))
        probas /= probas.sum(axis=1, keepdims=True)
        probas[~has_vote] = 1 / num_classes
        priors, errors = probas[has_vote].mean(axis=0), m_step(probas)
        with np.errstate(divide="ignore"):
            log_errors = np.where(errors > 0, np.log(np.where(errors > 0, errors, 1)), 0.0)
        expectation = (n_votes[has_vote] * probas[has_vote] * np.log(np.clip(priors, eps, None))).sum() + np.einsum(
            "ial,alk,ik->", onehot, log_errors, probas
        )
        clipped = np.clip(probas[has_vote], eps, None)
        new_loss = (expectation - (clipped * np.log(clipped)).sum()) / max(int(voted.sum()), 1)
        if new_loss - loss < tol:
            break
        loss = new_loss
    return probas


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


def png_data_uri(path: Path) -> str:
    """`data:image/png;base64,...` of a PNG file, for Label Studio's `data.image`: the browser shows
    it with no file server and no storage connection. Raises MlpipeError when the file is missing."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise MlpipeError(f"anonymized image missing: {Path(path).parent.name}/{Path(path).name} "
                          f"(the anonymize stage's output is incomplete; rerun it)") from None  # fmt: skip
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def labeling_config(class_names: list[str]) -> str:
    """Label Studio's labeling interface for the review queue (XML text): the image, the reason and
    votes that sent it to review, and one Choice per class under Choices name="label" (the control
    `read_label_studio` reads). Class names are XML-escaped (&, <, quotes) by ElementTree."""
    view = ET.Element("View")
    ET.SubElement(view, "Image", name="image", value="$image", zoom="true")
    ET.SubElement(view, "Text", name="why", value="$why")
    choices = ET.SubElement(view, "Choices", name="label", toName="image", choice="single", showInline="true")
    for name in class_names:
        ET.SubElement(choices, "Choice", value=name)
    ET.indent(view)
    return ET.tostring(view, encoding="unicode") + "\n"


def label_studio_tasks(review: pd.DataFrame, images: Path, predictions: dict[str, dict] | None = None) -> list[dict]:
    """The review queue as a Label Studio import file (a JSON list of tasks).

    `review`: rows of (item_id, reason, votes). Each task's `data` holds `image`, the anonymized
    PNG the anonymize stage wrote (`images/<item_id>.png`, re-encoded from pixels, no source
    metadata) as a base64 data URI; `item_id` (a content hash); and `why`, the reason and the
    annotators' votes as text (labels only, never who voted). `predictions`: {item_id: {"label",
    "score" (probability, 0-1), "model_version"}}; an item in it gets one Label Studio
    pre-annotation of the "label" control. A pre-annotation is a suggestion, not a review:
    `read_label_studio` reads only annotations.
    """
    predictions = predictions or {}
    tasks = []
    for item_id, reason, votes in zip(review[ITEM_ID], review["reason"], review["votes"], strict=True):
        task = {"data": {"image": png_data_uri(images / f"{item_id}.png"), "item_id": item_id,
                         "why": f"{reason}; votes: {votes or 'none'}"}, "meta": {"reason": reason}}  # fmt: skip
        if item_id in predictions:
            guess = predictions[item_id]
            task["predictions"] = [{"model_version": guess["model_version"], "score": guess["score"],
                                    "result": [{"from_name": "label", "to_name": "image", "type": "choices",
                                                "value": {"choices": [guess["label"]]}}]}]  # fmt: skip
        tasks.append(task)
    return tasks


# Keys of a JSON-MIN record that are not the "label" control: the task data and Label Studio's own.
_JSON_MIN_OTHER = {"image", "item_id", "why", "id", "annotator", "annotation_id", "created_at", "updated_at",
                   "lead_time"}


def read_label_studio(path) -> pd.DataFrame:
    """Labels from a Label Studio export of the review tasks, JSON or JSON-MIN: a table of
    (item_id, label); an item nobody labelled has label "".

    JSON: the choices of the "label" control (or, when a task has none, of any choices control:
    projects made from another labeling config, e.g. Label Studio's image-classification template's
    "choice") over the task's submitted annotations; the last one wins. Cancelled (skipped)
    annotations and `predictions` (pre-annotations, not reviews) are ignored. JSON-MIN: the record's
    "label" field (a string, or a list for several choices), else its one non-data field.
    Raises ValueError/KeyError/TypeError/AttributeError on other JSON (apply_reviewed words them).
    """
    tasks = json.loads(Path(path).read_text(encoding="utf-8"))
    rows = []
    for task in tasks:
        if "annotations" in task:  # full JSON export
            item = task["data"]["item_id"]
            results = [r for a in task["annotations"] if not a.get("was_cancelled") for r in a.get("result", [])
                       if r.get("type", "choices") == "choices"]  # fmt: skip
            ours = [r for r in results if r.get("from_name", "label") == "label"]
            choices = [c for r in ours or results for c in r.get("value", {}).get("choices", [])]
            rows.append((item, choices[-1] if choices else ""))
        else:  # JSON-MIN: the data fields plus one field per control, named after it
            choice = task.get("label", next((v for k, v in task.items() if k not in _JSON_MIN_OTHER), ""))
            if isinstance(choice, dict):  # a multi-choice control: {"choices": [...]}
                choice = choice["choices"]
            rows.append((task["item_id"], choice if isinstance(choice, str) else (choice or [""])[-1]))
    return pd.DataFrame(rows, columns=[ITEM_ID, LABEL])


def consensus(votes: pd.DataFrame, config: LabelConfig) -> tuple[pd.Series, pd.Series, pd.Series]:
    """(labels, review reasons, tied label sets) per item, by majority vote or Dawid-Skene."""
    if config.consensus == "majority":
        decided = [majority_vote(list(row), config.min_agreement) for row in votes.itertuples(index=False)]
        labels = pd.Series([lab for lab, _ in decided], index=votes.index, dtype=object)
        reasons = pd.Series([why for _, why in decided], index=votes.index, dtype=object)
        tied = pd.Series([_top(Counter(v for v in row if v)) for row in votes.itertuples(index=False)], index=votes.index)
        return labels, reasons, tied
    names = sorted({v for v in votes.to_numpy().ravel() if v})
    codes = votes.apply(lambda col: col.map({n: i for i, n in enumerate(names)})).fillna(-1).to_numpy(dtype=int)
    probas = dawid_skene(codes, max(len(names), 1))
    voted = (codes >= 0).any(axis=1)
    best = probas.max(axis=1)
    tied_sets = [{names[k] for k in np.flatnonzero(p >= b - 1e-9)} for p, b in zip(probas, best, strict=True)]
    labels = pd.Series([names[k] if v else None for k, v in zip(probas.argmax(axis=1), voted, strict=True)],
                       index=votes.index, dtype=object)  # fmt: skip
    reasons = pd.Series(None, index=votes.index, dtype=object)
    reasons[best < config.min_agreement] = "low agreement"
    reasons[[len(t) > 1 for t in tied_sets]] = "tie"
    reasons[~voted] = "unlabelled"
    labels[reasons.notna()] = None
    return labels, reasons, pd.Series(tied_sets, index=votes.index)


def _top(counts: Counter) -> set[str]:
    return {label for label, n in counts.items() if n == max(counts.values())}


def apply_tie_policy(votes: pd.DataFrame, labels: pd.Series, reasons: pd.Series, tied: pd.Series, config: LabelConfig):
    """(labels, reasons, dropped mask) after the configured tie policy. "review" leaves ties in the
    queue; "drop" removes them from training and queue alike (counted in the report); "prefer"
    takes the preferred annotator's vote when it is one of the tied labels, else reviews."""
    is_tie = reasons.eq("tie")
    dropped = pd.Series(False, index=labels.index)
    if config.tie_policy == "drop":
        dropped = is_tie
    elif config.tie_policy == "prefer":
        for i in labels.index[is_tie]:
            choice = votes.at[i, config.prefer_annotator]
            if choice in tied[i]:
                labels[i], reasons[i] = choice, None
    return labels, reasons, dropped


def apply_reviewed(items: pd.DataFrame, labels: pd.Series, reasons: pd.Series, path: str, synonyms) -> pd.Series:
    """Reviewers' labels from a Label Studio export replace the consensus for the items they
    cover (a blank answer leaves the item as it was). Returns the mask of reviewed items."""
    if not Path(path).is_file():
        raise MlpipeError(f"label.reviewed: no such file: {path}")
    try:
        reviewed = read_label_studio(path)
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise MlpipeError(f"label.reviewed is not a Label Studio JSON or JSON-MIN export ({type(exc).__name__})") from None
    reviewed = reviewed[reviewed[LABEL].astype(str).str.strip() != ""]
    unknown = set(reviewed[ITEM_ID]) - set(items[ITEM_ID])
    if unknown:
        raise MlpipeError(
            f"label.reviewed names {len(unknown)} item(s) that are not in this data set (exported from other data?)"
        )
    decided = dict(zip(reviewed[ITEM_ID], reviewed[LABEL].map(lambda v: normalize(v, synonyms)), strict=True))
    mask = items[ITEM_ID].isin(decided)
    labels[mask] = items.loc[mask, ITEM_ID].map(decided)
    reasons[mask] = None
    return mask


def thumbnails(pixels: np.ndarray, index: np.ndarray, side: int = 16, chunk: int = 4096) -> np.ndarray:
    """Block-mean thumbnails (at most side x side per channel) as float32 features in [0, 1],
    read from the pixel cache in chunks so memory stays bounded."""
    _, height, width, channels = pixels.shape
    fy, fx = -(-height // side), -(-width // side)
    h, w = height // fy * fy, width // fx * fx  # crop the remainder rows/columns
    out = [np.zeros((0, h // fy * (w // fx) * channels), dtype=np.float32)]
    for start in range(0, len(index), chunk):
        block = np.asarray(pixels[index[start : start + chunk]], dtype=np.float32)[:, :h, :w]
        small = block.reshape(len(block), h // fy, fy, w // fx, fx, channels).mean(axis=(2, 4))
        out.append(small.reshape(len(block), -1) / 255.0)
    return np.concatenate(out)


def thumbnail_model():
    """The label stage's cheap classifier: standardized features, multinomial logistic regression."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))


def out_of_fold(features: np.ndarray, codes: np.ndarray, folds: int,
                seed: int = 0) -> tuple[np.ndarray | None, float | None, str | None]:  # fmt: skip
    """`thumbnail_model`'s stratified out-of-fold probabilities over (N, F) features and (N,) class
    codes: (probabilities (N, classes present, in code order), accuracy, None), or (None, None, why
    skipped) when fewer than two classes have two items each."""
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    present, dense = np.unique(codes, return_inverse=True)
    smallest = int(np.bincount(dense).min()) if len(dense) else 0
    if len(present) < 2 or smallest < 2:
        return None, None, "skipped: needs two classes with at least two items each"
    cv = StratifiedKFold(n_splits=min(folds, smallest), shuffle=True, random_state=seed)
    probs = cross_val_predict(thumbnail_model(), features, dense, cv=cv, method="predict_proba")
    return probs, float((probs.argmax(axis=1) == dense).mean()), None


def likely_label_errors(features: np.ndarray, y: np.ndarray, folds: int, min_accuracy: float,
                        seed: int = 0) -> tuple[np.ndarray, np.ndarray | None, float | None, str | None]:  # fmt: skip
    """cleanlab's `find_label_issues` on out-of-fold probabilities of a logistic regression over
    (N, F) features and (N,) class codes. Returns (mask of likely label errors, out-of-fold
    probabilities, the model's out-of-fold accuracy, None), or an all-False mask and why it was skipped.

    A flag is only as good as the model behind it: cleanlab ranks items the model finds surprising,
    so a weak model (out-of-fold accuracy below `min_accuracy`) flags hard but correct items
    (cleanlab/cleanlab#685). Then nothing is flagged and the report says why.
    """
    from cleanlab.filter import find_label_issues

    none = np.zeros(len(y), dtype=bool)
    probs, accuracy, skipped = out_of_fold(features, y, folds, seed)
    if skipped:
        return none, None, None, skipped
    if accuracy < min_accuracy:
        return none, probs, accuracy, (f"skipped: the flagging model's out-of-fold accuracy {accuracy:.3f} is below "
                                       f"label.issue_min_accuracy {min_accuracy:g}; its flags would be guesses")
    # n_jobs=1: cleanlab's process pool would fork the caller (a Prefect task, whose SIGTERM
    # handler then prints a traceback when the pool is shut down); the filter itself is cheap.
    codes = np.unique(y, return_inverse=True)[1]
    flagged = find_label_issues(labels=codes, pred_probs=probs, filter_by="prune_by_noise_rate", n_jobs=1)
    return flagged, probs, accuracy, None


def review_predictions(features: np.ndarray, codes: np.ndarray, queue: np.ndarray, class_names: list[str],
                       accuracy: float | None, min_accuracy: float) -> tuple[list[dict] | None, str]:  # fmt: skip
    """Pre-annotations for the review queue: `thumbnail_model` (the label-error model) fit on all
    (N, F) labelled features and their (N,) class codes, predicting the (M, F) `queue` features,
    items it never saw a label for. Returns ([{"label", "score" (the predicted class's probability,
    0-1)}] * M, model version naming the model, N and its out-of-fold accuracy), or (None, why
    skipped) when that `accuracy` is unknown or below `min_accuracy` (label.issue_min_accuracy): a
    weak model's suggestion anchors a reviewer without informing them.
    """
    if accuracy is None:
        return None, "skipped: no out-of-fold accuracy (needs two classes with at least two items each)"
    if accuracy < min_accuracy:
        return None, (f"skipped: the model's out-of-fold accuracy {accuracy:.3f} is below label.issue_min_accuracy "
                      f"{min_accuracy:g}")  # fmt: skip
    model = thumbnail_model().fit(features, codes)
    probs = model.predict_proba(queue)
    best = probs.argmax(axis=1)
    guesses = [{"label": class_names[model.classes_[k]], "score": round(float(p[k]), 4)}
               for k, p in zip(best, probs, strict=True)]  # fmt: skip
    return guesses, f"label-stage thumbnail logreg, n={len(codes)}, oof_acc={accuracy:.3f}"


def label(dataset: StageResult, config: LabelConfig) -> StageResult:
    items = pd.read_parquet(dataset.file("items.parquet"))
    missing = [c for c in config.columns if c not in items.columns]
    if missing:
        raise MlpipeError(f"label column(s) not found after anonymization: {', '.join(missing)} (label.columns)")

    synonyms = {normalize(k): normalize(v) for k, v in config.synonyms.items()}
    votes = items[config.columns].astype(str).map(lambda v: normalize(v, synonyms))
    labels, review_reason, tied = consensus(votes, config)
    differs = 0
    if config.consensus != "majority":  # how often the model-based consensus overrules a plain majority
        majority = [majority_vote(list(row))[0] for row in votes.itertuples(index=False)]
        differs = sum(a is not None and b is not None and a != b for a, b in zip(labels, majority, strict=True))
    labels, review_reason, dropped = apply_tie_policy(votes, labels, review_reason, tied, config)

    conflicts = near_duplicate_conflicts(items, labels)
    labels[conflicts] = None
    review_reason[conflicts] = "near-duplicate label conflict"
    conflicts = duplicate_conflicts(items, labels, dataset, config)
    labels[conflicts] = None
    review_reason[conflicts] = "duplicate label conflict"
    reviewed = pd.Series(False, index=items.index)
    if config.reviewed:
        reviewed = apply_reviewed(items, labels, review_reason, config.reviewed, synonyms)
        dropped &= ~reviewed

    found = sorted(set(labels.dropna()))
    allowed = None if config.classes is None else [normalize(c, synonyms) for c in config.classes]
    if allowed is not None:
        unknown = sorted(set(found) - set(allowed))
        if unknown:
            raise MlpipeError(f"unknown label(s) not in label.classes: {', '.join(unknown)}")
    if not found:
        raise MlpipeError("no item has a label: every item is unlabelled or tied")
    if len(found) == 1:
        raise MlpipeError(f"only one class ({found[0]!r}) has labelled items; a classifier needs at least two")
    class_names = list(dict.fromkeys(allowed)) if allowed is not None else found
    class_map = {name: index for index, name in enumerate(class_names)}

    # Advisory: flagged items keep their label, in training and in the test set alike (dropping
    # them would make the test set easier than the data); reviewers get the list.
    issues = {"enabled": config.find_label_issues, "flagged": 0, "skipped": None, "model_oof_accuracy": None,
              "action": "flagged items stay labelled (advisory); see label_issues.csv"}
    suspects = pd.DataFrame(columns=[ITEM_ID, "given_label", "suggested_label", "given_label_probability"])
    suspected = pd.Series(False, index=items.index)
    queued = labels.isna() & ~dropped
    candidates = labels.notna() & ~reviewed  # a reviewer's decision is not second-guessed
    guesses, model_version = None, "skipped: label.find_label_issues is off (its model makes the suggestions)"
    if config.find_label_issues:
        pixels = np.load(dataset.file("pixels"), mmap_mode="r")
        features = thumbnails(pixels, items.loc[candidates, PIXEL_INDEX].to_numpy())
        codes = labels[candidates].map(class_map).to_numpy(dtype=int)
        flagged, probs, accuracy, issues["skipped"] = likely_label_errors(
            features, codes, config.issue_folds, config.issue_min_accuracy
        )
        issues["model_oof_accuracy"] = None if accuracy is None else round(accuracy, 4)
        where = np.flatnonzero(flagged)
        suspected[candidates[candidates].index[where]] = True
        if len(where):
            present = np.unique(codes)  # the columns of probs
            suspects = pd.DataFrame({
                ITEM_ID: items.loc[candidates, ITEM_ID].to_numpy()[where],
                "given_label": labels[candidates].to_numpy()[where],
                "suggested_label": [class_names[present[k]] for k in probs[where].argmax(axis=1)],
                "given_label_probability": probs[where, np.searchsorted(present, codes[where])].round(4),
            })
        issues["flagged"] = len(suspects)
        issues["flagged_fraction"] = round(len(suspects) / max(int(candidates.sum()), 1), 4)
        # Pre-annotations for Label Studio: the same model (its out-of-fold accuracy just measured),
        # refit on every candidate, predicts the queue; one more fit, no second cross-validation.
        model_version = "skipped: the review queue is empty"
        if queued.any():
            queue_features = thumbnails(pixels, items.loc[queued, PIXEL_INDEX].to_numpy())
            guesses, model_version = review_predictions(features, codes, queue_features, class_names, accuracy,
                                                        config.issue_min_accuracy)  # fmt: skip

    labelled = items[labels.notna()].copy()
    labelled[LABEL] = labels[labels.notna()]
    labelled[TARGET] = labelled[LABEL].map(class_map).astype(int)
    labelled[LABEL_ISSUE] = suspected[labels.notna()]  # kept: resample.drop_label_issues may leave them out of training
    review = pd.DataFrame({ITEM_ID: items.loc[queued, ITEM_ID], "reason": review_reason[queued]})
    predictions = {} if guesses is None else {
        item: {**guess, "model_version": model_version} for item, guess in zip(review[ITEM_ID], guesses, strict=True)}

    multi = len(config.columns) > 1
    unanimous = votes.nunique(axis=1).eq(1) & votes.ne("").all(axis=1)
    voted = votes.ne("").any(axis=1)
    check_drop("label", len(items), {
        **{f"sent to review ({why})": n for why, n in Counter(review.loc[voted[queued], "reason"]).items()},
        "dropped ties": int(dropped.sum()),
    }, config.max_drop_fraction)  # items nobody voted on are waiting for labels, not lost
    report = {
        "items": len(items),
        "labelled": len(labelled),
        "review_queue": dict(Counter(review["reason"])),
        "dropped_ties": int(dropped.sum()),
        "class_counts": {name: int((labelled[LABEL] == name).sum()) for name in class_names},
        "consensus": config.consensus,
        "consensus_differs_from_majority": int(differs),
        "reviewed": int(reviewed.sum()),
        "label_issues": issues,
        "review_predictions": {"items": len(predictions), "model_version": None if guesses is None else model_version,
                               "skipped": model_version if guesses is None else None},
        "unanimous_fraction": round(float(unanimous.mean()), 4) if multi else None,
        **(agreement(votes, class_names) if multi else {}),
        "disagreement_fraction": round(float(1 - unanimous[votes.ne("").any(axis=1)].mean()), 4) if multi else None,
        "num_classes": len(class_names),
    }
    key = stable_hash(dataset.key, config, reviewed_digest(config), code_version("mlpipe.label"))[:16]
    with stage_dir("label", key) as out:
        labelled.to_parquet(out / "items.parquet", index=False)
        review.to_csv(out / "review_queue.csv", index=False)
        suspects.to_csv(out / "label_issues.csv", index=False)
        votes_text = [", ".join(f"{lab} ({n})" for lab, n in Counter(v for v in row if v).most_common())
                      for row in votes[queued].itertuples(index=False)]  # fmt: skip
        write_json(out / "review_tasks.json",
                   label_studio_tasks(review.assign(votes=votes_text), dataset.file("images"), predictions))
        (out / "labeling_config.xml").write_text(labeling_config(class_names), encoding="utf-8")
        write_json(out / "label_map.json", class_map)
        write_json(out / "report.json", report)
    return StageResult.at("label", key, report, pixels=dataset.file("pixels"))


def reviewed_digest(config: LabelConfig) -> str | None:
    """sha256 of the Label Studio export: new reviews under the same file name are new input."""
    return hashlib.sha256(Path(config.reviewed).read_bytes()).hexdigest() if config.reviewed else None
