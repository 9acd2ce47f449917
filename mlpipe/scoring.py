"""scoring: a source scored by the registered serving model, anonymized by the model's policy,
with counts, a confidence histogram and a drift check against the training split.

The source is listed and read the way ingest reads a dataset (`open_source`, `read_manifest`,
`Source.resolve`), decoded by the serving model (`mlpipe.images.decode`, ingest's own function),
and its manifest columns go through the anonymization policy of the run that trained the model
(`apply_policy`, fail closed). What leaves this module for MLflow is aggregates; the predictions
table carries the manifest's row number, the item id (the same content hash anonymize uses) and
the anonymized columns, never a raw path or personal value.
"""

from __future__ import annotations

import re
import uuid
from collections import Counter

import numpy as np
import pandas as pd

from mlpipe.anonymize import apply_policy, identifier_index, key_id, raw_identifier_values, residual_scan
from mlpipe.config import AnonymizeConfig, SourceConfig
from mlpipe.drift import drift_report, pixel_statistics
from mlpipe.errors import MlpipeError
from mlpipe import dicom
from mlpipe.ingest import IMAGEFOLDER_LABEL, open_source, read_manifest
from mlpipe.predict import Input, read_bytes, resolve_input
from mlpipe.serving import CLASS, ERROR, IMAGE, ImageClassifier
from mlpipe.store import StageResult, stage_dir, write_json

ROW, ITEM_ID = "row", "item_id"
CONFIDENCE_BINS = 10


def check_same_key(key: bytes, training_key_id: str | None) -> None:
    """Refuse a pseudonym key other than the training run's (by their one-way ids): its pseudonyms
    would not match the training data's, silently. Raises MlpipeError naming both ids."""
    if training_key_id is not None and key_id(key) != training_key_id:
        raise MlpipeError(f"the pseudonym key here (id {key_id(key)}) is not the one the model's training run used "
                          f"(id {training_key_id}): set the same key (anonymize.key_env or key_secret_block)")  # fmt: skip


def anonymized_columns(frame: pd.DataFrame, source: SourceConfig, policy: AnonymizeConfig, key: bytes) -> pd.DataFrame:
    """The manifest's columns under the model's anonymization policy (image paths never leave).
    Raises MlpipeError, naming them, for columns the policy does not cover, and when the residual
    scan finds a raw identifier left (fail closed, as the anonymize stage)."""
    folder_label = (IMAGEFOLDER_LABEL,) if source.layout in ("imagefolder", "dicom") else ()  # the listing's own column
    columns = [c for c in frame.columns if c not in (source.image_column, *folder_label) and not c.startswith("__")]
    dicom_columns = [c for c in frame.attrs.get("dicom_columns", []) if c in columns]
    if dicom_columns:  # DICOM header columns: the Basic Profile's policy, as training's anonymize stage gives them
        profile, _ = dicom.profile_policies(dicom_columns, policy.policy, policy.dicom_dates)
        policy = policy.model_copy(update={"policy": {**profile, **policy.policy}})
    missing = [c for c in columns if c not in policy.policy]
    if missing:
        raise MlpipeError(f"scored manifest column(s) without a policy in the model's anonymization policy: "
                          f"{', '.join(missing)}; drop them from the manifest or retrain with a policy for them")  # fmt: skip
    identifiers = identifier_index(raw_identifier_values(frame, columns, policy, source.image_column, dicom_columns))
    applied, _ = apply_policy(frame, columns, policy, key, identifiers)
    digits_only = set(dicom.digit_columns(frame, dicom_columns))
    leaks = residual_scan(applied[[c for c in applied.columns if c not in digits_only]].fillna(""), identifiers)
    if leaks:
        raise MlpipeError(f"scoring stopped: raw identifiers remain after the policy in column(s) {', '.join(sorted(leaks))}")
    return suppress_rare_combinations(applied, policy).reset_index(drop=True)


def suppress_rare_combinations(applied: pd.DataFrame, policy: AnonymizeConfig) -> pd.DataFrame:
    """k-anonymity for a scored table: rows whose quasi-identifier combination occurs fewer than
    `policy.k` times keep their row (every image gets its answer) but lose those values (""),
    where training's anonymize stage drops the row."""
    quasi = [c for c in applied.columns if policy.policy[c].quasi_identifier]
    if not quasi or applied.empty:
        return applied
    sizes = applied.groupby(quasi, dropna=False)[quasi[0]].transform("size")
    return applied.assign(**{c: applied[c].where(sizes >= policy.k, "") for c in quasi})


def score_source(model: ImageClassifier, source: SourceConfig, policy: AnonymizeConfig, key: bytes,
                 drift_threshold: float, batch_size: int = 256) -> StageResult:  # fmt: skip
    """Score every row of `source` with `model`; write `predictions.csv` (one row per manifest
    row: row, item_id, anonymized columns, the model's columns) and `report.json` (counts per
    class and per failure reason, the confidence histogram, `mlpipe.drift.drift_report`).
    Raises MlpipeError when the model carries no drift reference or the source is unreadable."""
    if model.drift_reference is None:
        raise MlpipeError("the model carries no training profile for the drift check: retrain it with this mlpipe")
    src = open_source(source)
    frame, digest = read_manifest(src, source)
    applied = anonymized_columns(frame, source, policy, key)
    taken = {ROW, ITEM_ID, *model.columns}  # a manifest column of the same name keeps its values under another
    applied = applied.rename(columns={c: f"manifest_{c}" for c in applied.columns if c in taken})
    tables, means, stds, labels, confidence = [], [], [], [], []
    for start in range(0, len(frame), batch_size):
        paths = frame[source.image_column].iloc[start : start + batch_size].tolist()
        data = [read_bytes(Input(rel, resolve_input(src, rel)), src) for rel in paths]
        decoded = model.decode(pd.DataFrame({IMAGE: pd.Series([d if isinstance(d, bytes) else None for d in data],
                                                              dtype=object)}))  # fmt: skip
        for i, d in enumerate(data):
            if not isinstance(d, bytes):
                decoded.errors[i] = str(d)  # why the file was not read, as ingest's quarantine says it
        proba, predicted = model.score(decoded.pixels)
        table = model.table(decoded, proba, predicted)
        table.insert(0, ITEM_ID, [h[:16] if h else None for h in decoded.sha256])
        tables.append(table)
        mean, std = pixel_statistics(decoded.pixels)
        means.append(mean)
        stds.append(std)
        labels.append(predicted)
        confidence.append(proba[np.arange(len(predicted)), predicted])
    table = pd.concat(tables, ignore_index=True) if tables else pd.DataFrame(columns=[ITEM_ID, *model.columns])
    out = pd.concat([pd.DataFrame({ROW: np.arange(len(frame))}), table[[ITEM_ID]], applied,
                     table.drop(columns=[ITEM_ID])], axis=1)  # fmt: skip
    predicted_all = np.concatenate(labels) if labels else np.zeros(0, np.int64)
    drift = drift_report(model.drift_reference, (np.concatenate(means), np.concatenate(stds)), predicted_all,
                         drift_threshold) if len(predicted_all) else None  # fmt: skip
    conf = np.concatenate(confidence) if confidence else np.zeros(0)
    counts, edges = np.histogram(conf, bins=CONFIDENCE_BINS, range=(0.0, 1.0))
    report = {
        "rows": len(frame), "predicted": int(out[CLASS].notna().sum()), "failed": int(out[ERROR].notna().sum()),
        "predicted_per_class": {name: int(n) for name, n in sorted(Counter(out[CLASS].dropna()).items())},
        "failed_per_reason": dict(Counter(out[ERROR].dropna()).most_common()),
        "confidence_histogram": {"edges": edges.round(2).tolist(), "counts": counts.tolist()},
        "mean_confidence": float(conf.mean()) if len(conf) else None,
        "drift": drift, "manifest_sha256": digest,
    }  # fmt: skip
    key_hash = uuid.uuid4().hex[:16]  # every scoring run its own folder: nothing is reused
    with stage_dir("scoring", key_hash) as folder:
        out.to_csv(folder / "predictions.csv", index=False)
        write_json(folder / "report.json", report)
        confidence_figure(report["confidence_histogram"], len(conf)).savefig(folder / "confidence.png", dpi=100,
                                                                           metadata={"Software": None})  # fmt: skip
    return StageResult.at("scoring", key_hash, report)


def confidence_figure(histogram: dict, scored: int):
    """The predicted class's probability over the scored images, as a bar chart: `histogram` is
    {"edges": bin edges in 0-1, "counts": images per bin}, `scored` the image count in the title.
    Returns a closed figure (savefig still works)."""
    import matplotlib

    matplotlib.use("Agg")  # headless
    import matplotlib.pyplot as plt

    edges, counts = histogram["edges"], histogram["counts"]
    fig, ax = plt.subplots(figsize=(5, 3.2), layout="constrained")
    ax.bar(edges[:-1], counts, width=np.diff(edges), align="edge", edgecolor="black")
    ax.set_xlabel("probability of the predicted class")
    ax.set_ylabel("images")
    ax.set_title(f"Confidence of {scored} scored images")
    plt.close(fig)
    return fig


def metric_name(name: str) -> str:
    """A class name as MLflow accepts it in a metric key (letters, digits, _ - . / and space)."""
    return re.sub(r"[^A-Za-z0-9_\-. /]", "_", name)


def summary_lines(report: dict) -> list[str]:
    """What the CLI and the Prefect artifact show: counts, failures, drift."""
    lines = [f"scored {report['rows']} rows: {report['predicted']} predicted, {report['failed']} failed",
             "  per class: " + ", ".join(f"{k} {v}" for k, v in report["predicted_per_class"].items())]  # fmt: skip
    lines += [f"  failed: {reason} {n}" for reason, n in report["failed_per_reason"].items()]
    drift = report["drift"]
    if drift is None:
        lines.append("  drift: not checked (no image was scored)")
    else:
        psi = ", ".join(f"{k} {v:.3f}" for k, v in drift["psi"].items())
        lines.append(f"  drift (PSI, threshold {drift['threshold']}): {psi}"
                     + (f"; DRIFTED: {', '.join(drift['drifted_checks'])}" if drift["drifted"] else "; no drift"))  # fmt: skip
    return lines

