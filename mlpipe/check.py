"""`mlpipe check`: would a run of this config on this data get through? Answered in seconds,
without a run: no Prefect flow, no MLflow store or run, no training, nothing written except
sample://digits' files (which ingest writes anyway).

What it reads, through ingest's own functions (`open_source`, `with_layout`, `read_manifest`,
`validate_manifest`, `detect`), so it sees the data as the run will:

- the source: it exists, its layout (auto decided as the run decides it), the manifest or listing;
- a sample of images (`detect`: `AUTO_SAMPLE_IMAGES` rows spread over the source, each decoded):
  unreadable ones by row and reason, sizes, modes, and the auto values they decide;
- the decided config, revalidated whole (`resolve_auto`): train.model and train.augment are probed
  at the decided channels and size;
- the manifest's columns against anonymize.policy: each column without one gets a line and a
  suggested policy (`suggest_policy`); policy entries naming absent columns;
- label.columns and split.group_column exist;
- DICOM items whose header says BurnedInAnnotation YES: quarantined by anonymize (past
  anonymize.max_drop_fraction, a problem) or, with anonymize.burned_in redact, redacted;
- the labels (majority vote, as the label stage, before review and deduplication) against the
  split: classes, and item groups per class against what split.mode needs.

Lines name manifest rows and columns, class names and counts, never a path or a column's value:
raw file names and manifest cells may be personal data. Near-duplicate grouping, exact
duplicates and k-anonymity need every image decoded, so they are not predicted here.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field

import pandas as pd

from mlpipe import dicom
from mlpipe.anonymize import suggest_policy
from mlpipe.config import IMAGEFOLDER_LABEL, PipelineConfig, auto_overrides, resolve_auto
from mlpipe.errors import MlpipeError
from mlpipe.ingest import (
    AUTO_SAMPLE_IMAGES,
    Detection,
    _check_paths,
    describe_decided,
    detect,
    open_source,
    read_manifest,
    validate_manifest,
    with_layout,
)  # fmt: skip
from mlpipe.label import majority_vote, normalize

# Suggested policies from a column's name, first match wins (lower-cased; words split on anything
# that is not a letter or digit): personal words before label words, so `annotator_email` is dropped. Value scans (`suggest_policy`) answer for names that say nothing.
NAME_RULES: tuple[tuple[str, str, str], ...] = (
    (r"e ?mail|mail", "drop", "an e-mail address"),
    (r"phone|mobile|tel|telephone|fax", "drop", "a phone number"),
    (r"name|names|surname|firstname|lastname|fullname", "drop", "a name"),
    (r"address|street|city", "drop", "an address"),
    (r"zip|postcode|postal", "truncate", "a postcode; set keep_chars"),
    (r"dob|birth|birthday|date|day|dt", "generalize_date", "a date"),
    (r"age|weight|height|income", "generalize_number", "a number; set bins"),
    (r"note|notes|comment|comments|text|description|remark|remarks|report|summary", "redact_text", "free text"),
    (r"annotator|label|labels|class|grade|target|category|diagnosis", "keep", "a label"),
    (r"id|ids|uuid|guid|mrn|ssn|key|number|no", "pseudonymize", "an identifier"),
)


@dataclass
class CheckReport:
    """Lines for the terminal: `summary` (what was found), `warnings` (the run may still work) and
    `problems` (the run would stop); each entry is one line."""

    summary: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def suggest_for(column: str, values: pd.Series) -> str:
    """A policy for an undeclared manifest column, with why: from its name (NAME_RULES), else from
    a scan of its values (`mlpipe.anonymize.suggest_policy`; the values are never shown)."""
    words = [w for w in re.split(r"[^a-z0-9]+", re.sub(r"([a-z])([A-Z])", r"\1_\2", column).lower()) if w]
    joined = " ".join(words)
    for pattern, action, why in NAME_RULES:
        if any(re.fullmatch(pattern, w) for w in words) or re.fullmatch(pattern, joined):
            return f"{action} (its name says {why})"
    return suggest_policy(values.astype(str))


def check_config(config: PipelineConfig, images: int = AUTO_SAMPLE_IMAGES) -> CheckReport:
    """Check `config` (already loaded and valid) against its data; see the module docstring.
    Never raises `MlpipeError`: each problem becomes one line of the report."""
    report = CheckReport(summary=["config: valid"])
    try:
        src = open_source(config.source)
        source = with_layout(src, config.source)
        frame, _ = read_manifest(src, source, config.ingest.dicom.frames)
        detection = detect(source, images, config.ingest.max_pixels, config.ingest.background, decode_all=True,
                           dicom_options=config.ingest.dicom)  # fmt: skip
    except MlpipeError as err:
        report.problems.append(f"source: {err}")
        return report
    how = " (auto)" if config.source.layout == "auto" else ""
    report.summary.append(f"source: readable; layout {source.layout}{how}; {len(frame)} rows")
    _sample_lines(detection, config, report)

    decided = auto_overrides(config, detection.facts())
    try:
        resolve_auto(config, detection.facts())
    except MlpipeError as err:
        report.problems.append(str(err))
    if decided:
        report.summary.append(describe_decided(decided, detection))

    policy = decided.get("anonymize.policy", config.anonymize.policy)
    if isinstance(policy, dict) and frame.attrs.get("dicom_columns"):  # the header columns: the DICOM profile's policy
        profile, _ = dicom.profile_policies(frame.attrs["dicom_columns"], policy, config.anonymize.dicom_dates)
        policy = {**profile, **policy}
    label_columns = decided.get("label.columns", config.label.columns)
    group_column = decided.get("split.group_column", config.split.group_column)
    _column_lines(frame, source.image_column, source.layout, policy, label_columns, group_column, report)
    _burned_in_lines(frame, config, report)
    if not set(label_columns) - set(frame.columns):
        invalid, _ = validate_manifest(frame, source)
        usable = [not isinstance(c, Exception) for c in _check_paths(src, frame, source, invalid)]
        _class_lines(frame[usable], label_columns, group_column, config, report)
    report.summary.append(f"result: {len(report.problems)} problem(s), {len(report.warnings)} warning(s)")
    return report


def _burned_in_lines(frame: pd.DataFrame, config: PipelineConfig, report: CheckReport) -> None:
    """What anonymize does with the DICOM rows whose header says BurnedInAnnotation YES (read from
    every header; text OCR finds in pixels is found only by the run, which reads them). With
    burned_in redact, a YES item OCR will not read (text_scan never, no tesseract, or under auto a
    modality outside `OCR_MODALITIES`) is quarantined for sure: those count against the budget."""
    if "BurnedInAnnotation" not in frame.columns:
        return
    yes = frame["BurnedInAnnotation"].str.strip().str.upper() == "YES"
    burned = int(yes.sum())
    if not burned:
        return
    settings, limit = config.anonymize, config.anonymize.max_drop_fraction
    unread, why, remedy = _not_read_by_ocr(frame[yes], settings.text_scan)
    if settings.burned_in == "redact":
        line = (f"burned-in text: {burned} DICOM item(s) say BurnedInAnnotation YES; anonymize blacks out the text "
                "OCR locates in them and quarantines those where it locates none")  # fmt: skip
        if not unread:
            report.summary.append(line)
        elif unread / max(len(frame), 1) > limit:
            report.problems.append(f"{unread} of {len(frame)} DICOM item(s) say BurnedInAnnotation YES and OCR will not "
                                   f"read them ({why}): anonymize quarantines them, more than "
                                   f"anonymize.max_drop_fraction {limit}: anonymize would stop; with {remedy} OCR "
                                   "reads them")  # fmt: skip
        else:
            report.warnings.append(f"{line}; {unread} of them OCR will not read ({why}): quarantined")
        return
    line = f"{burned} of {len(frame)} DICOM item(s) say BurnedInAnnotation YES: anonymize quarantines them"
    if burned / max(len(frame), 1) > limit:
        instead = "anonymize.burned_in: redact" + (f" with {remedy}" if unread else "")
        report.problems.append(f"{line}, more than anonymize.max_drop_fraction {limit}: anonymize would stop; "
                               f"{instead} blacks the text out instead")  # fmt: skip
    else:
        report.warnings.append(line)


def _not_read_by_ocr(rows: pd.DataFrame, text_scan: str) -> tuple[int, str, str]:
    """(how many of `rows` anonymize's OCR will not read, why, what would make it read them), as
    `mlpipe.anonymize.burned_in` decides."""
    from mlpipe.anonymize import OCR_MODALITIES
    from mlpipe.burned_in import ocr_available

    kinds = rows["Modality"].str.strip().str.upper() if "Modality" in rows else pd.Series("", index=rows.index)
    outside = kinds[~kinds.isin(OCR_MODALITIES)]  # what text_scan auto leaves unread
    always = "anonymize.text_scan: always" if text_scan == "never" or (text_scan == "auto" and len(outside)) else ""
    if text_scan == "never":
        return len(rows), "anonymize.text_scan never", always
    if not ocr_available():
        return len(rows), "tesseract is not installed", " and ".join(filter(None, ["tesseract-ocr installed", always]))
    if text_scan == "always":
        return 0, "", ""
    return len(outside), f"modality {', '.join(sorted(set(outside)))} under text_scan auto", always


def _sample_lines(detection: Detection, config: PipelineConfig, report: CheckReport) -> None:
    summary = detection.summary()
    sizes = ", ".join(f"{size} ({n})" for size, n in summary["sizes"].items()) or "none"
    modes = ", ".join(f"{mode} ({n})" for mode, n in summary["modes"].items()) or "none"
    unreadable = summary["unreadable"]
    decoded = summary["sampled"] - len(unreadable)
    report.summary.append(f"sample: {summary['sampled']} of {summary['rows']} rows read, {decoded} decoded, "
                          f"{len(unreadable)} unreadable; sizes {sizes}; modes {modes}; "
                          f"{summary['colour_images']} in colour")  # fmt: skip
    for row, reason in unreadable.items():
        report.warnings.append(f"{row}: {reason} (ingest quarantines it)")
    if detection.images and len(unreadable) / len(detection.images) > config.ingest.max_drop_fraction:
        report.problems.append(f"{len(unreadable)} of {len(detection.images)} sampled images are unreadable, more "
                               f"than ingest.max_drop_fraction {config.ingest.max_drop_fraction}: ingest would stop")  # fmt: skip


def _column_lines(frame: pd.DataFrame, image_column: str, layout: str, policy: dict, label_columns: list[str],
                  group_column: str | None, report: CheckReport) -> None:  # fmt: skip
    own = {image_column, IMAGEFOLDER_LABEL} if layout in ("imagefolder", "dicom") else {image_column}
    columns = [c for c in frame.columns if c not in own and not c.startswith("__")]
    for column in columns:
        if column not in policy:
            report.problems.append(f"manifest column '{column}' has no anonymize.policy entry: suggest "
                                   f"{suggest_for(column, frame[column])}; set anonymize.policy.{column}")  # fmt: skip
    unknown = sorted(set(policy) - set(columns) - ({IMAGEFOLDER_LABEL} if layout in ("imagefolder", "dicom") else set()))
    if unknown:
        report.problems.append(f"anonymize.policy names column(s) not in the manifest: {', '.join(unknown)}")
    missing = [c for c in label_columns if c not in frame.columns]
    if missing:
        report.problems.append(f"label.columns: not in the manifest: {', '.join(missing)}")
    for column in label_columns:
        action = _action(policy.get(column))
        if column in frame.columns and action not in (None, "keep"):
            report.problems.append(f"label column '{column}' has anonymize.policy {action}: labels must be kept")
    if group_column is not None and group_column not in frame.columns:
        report.problems.append(f"split.group_column '{group_column}' is not a manifest column")
    elif group_column is not None and _action(policy.get(group_column)) == "drop":
        report.problems.append(f"split.group_column '{group_column}' has anonymize.policy drop: split cannot group by it")
    declared = len([c for c in columns if c in policy])
    report.summary.append(f"columns: {len(columns)} besides the image column, {declared} with a policy; "
                          f"labels from {', '.join(label_columns)}; groups "
                          f"{'by ' + group_column if group_column else 'per item'}")  # fmt: skip


def _action(policy) -> str | None:
    if policy is None:
        return None
    return policy if isinstance(policy, str) else (policy.get("action") if isinstance(policy, dict) else policy.action)


def _class_lines(frame: pd.DataFrame, label_columns: list[str], group_column: str | None, config: PipelineConfig,
                 report: CheckReport) -> None:  # fmt: skip
    """Labels by majority vote over the usable rows (paths that resolve), then per class: items
    and distinct groups (raw group values: pseudonyms keep them distinct), against split's needs."""
    synonyms = {normalize(k): normalize(v) for k, v in config.label.synonyms.items()}
    votes = frame[label_columns].astype(str).map(lambda v: normalize(v, synonyms))
    labels = pd.Series([majority_vote(list(row), config.label.min_agreement)[0] for row in votes.itertuples(index=False)],
                       index=frame.index, dtype=object)  # fmt: skip
    labelled = labels.notna()
    groups = frame[group_column] if group_column in frame.columns else pd.Series(frame.index, index=frame.index)
    counts = Counter(labels[labelled])
    per_class = pd.DataFrame({"label": labels[labelled], "group": groups[labelled]}).groupby("label")["group"].nunique()
    shown = ", ".join(f"{name} {n}" for name, n in sorted(counts.items())[:20]) + (" ..." if len(counts) > 20 else "")
    report.summary.append(f"labels: {int(labelled.sum())} of {len(frame)} usable rows labelled (majority vote); "
                          f"{len(counts)} classes: {shown}")  # fmt: skip
    if config.label.classes is not None:
        allowed = {normalize(c, synonyms) for c in config.label.classes}
        unknown = sorted(set(counts) - allowed)
        if unknown:
            report.problems.append(f"label(s) not in label.classes: {', '.join(unknown[:10])}")
    if len(counts) < 2:
        report.problems.append(f"{len(counts)} class(es) have labelled items; a classifier needs at least two")
        return
    split = config.split
    if split.mode == "kfold":
        needed, why = split.folds + 1, f"split.mode kfold: one for test and one per fold ({split.folds})"
    else:
        needed, why = 3, "one each for train, val and test"
    for name, n_groups in sorted(per_class.items()):
        if n_groups < needed:
            report.problems.append(f"class '{name}': {counts[name]} item(s) in {n_groups} group(s); the split needs "
                                   f"at least {needed} groups per class ({why})")  # fmt: skip
    if split.mode == "holdout":
        # split holds out one of round(1/fraction) stratified group folds, test first, then val
        folds = max(round(1 / split.test_fraction), round((1 - split.test_fraction) / split.val_fraction))
        few = [name for name, n in per_class.items() if needed <= n < folds]
        if few:
            report.warnings.append(f"class(es) {', '.join(map(str, sorted(few)[:10]))} have fewer than {folds} groups: "
                                   f"with split fractions val {split.val_fraction}, test {split.test_fraction} one may "
                                   f"miss the val or test split, which stops the run")  # fmt: skip
