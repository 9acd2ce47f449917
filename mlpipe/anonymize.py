"""anonymize: the privacy gate. Nothing downstream sees a raw personal value.

- Fails closed: a manifest column without a policy stops the run.
- Pseudonyms are HMAC-SHA256 under a secret key (never an unkeyed hash, which anyone can
  recompute from a guessed name); the same value and key always give the same pseudonym, so
  grouping by subject still works.
- Free text loses every value of the row's identifier columns and anything that looks like an
  e-mail address or phone number.
- Images are re-encoded from pixels alone (no EXIF, text chunks or ICC profile can survive)
  under content-hash file names; the raw file name is discarded.
- A residual scan over everything this stage writes must find no raw identifier value, or the
  run stops.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import io
import logging
import os
import posixpath
import re
import secrets
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import ahocorasick
import numpy as np
import pandas as pd
from PIL import Image

from mlpipe import dicom
from mlpipe.config import AnonymizeConfig, ColumnPolicy, SourceConfig
from mlpipe.accounting import check_drop
from mlpipe.errors import MlpipeError
from mlpipe.ingest import IMAGEFOLDER_LABEL, NEAR_DUP, PIXEL_INDEX, ROW, SHA, layout_of, snapshot_rows
from mlpipe.kanonymity import local_suppression, record_suppression
from mlpipe.store import StageResult, code_version, final_path, stable_hash, stage_dir, state_dir, write_json

log = logging.getLogger(__name__)

ITEM_ID = "item_id"
NEAR_DUP_GROUP = "near_dup_group"  # ingest's near-duplicate group: kept together by split
IDENTIFIER_ACTIONS = ("drop", "pseudonymize", "remap_uid", "shift_date")
TEXT_ACTIONS = ("keep", "generalize_date", "redact_text")  # outputs that can still carry raw text
# Recognizers for free text, beyond the row's own identifier values.
EMAIL = re.compile(r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+")
PHONE = re.compile(r"(?<!\w)\+?\d[\d ().-]{7,}\d(?!\w)")
DATE = re.compile(r"\b\d{4}-\d{2}-\d{2}\b")
NAME_LIKE = re.compile(r"[A-Z][a-z'-]+(?: [A-Z][a-z'-]+){1,3}")


def load_key(config: AnonymizeConfig) -> tuple[bytes, str]:
    """(key, where it came from). The environment wins; otherwise a local 0600 key file, reused."""
    env = os.environ.get(config.key_env)
    if env:
        return env.encode(), f"env:{config.key_env}"
    path = state_dir() / "secrets" / "pseudonym.key"
    if not path.exists():
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
    log.warning(
        "No %s set: pseudonyms use the local key file in the state directory. "
        "Set %s to share pseudonyms across machines.", config.key_env, config.key_env,
    )
    return path.read_text().strip().encode(), "local key file"


def pseudonym(value: str, key: bytes) -> str:
    return "" if value == "" else "p_" + hmac.new(key, value.encode(), hashlib.sha256).hexdigest()[:20]


def pseudonyms(values: pd.Series, key: bytes) -> list[str]:
    """`pseudonym` for a whole column: each distinct value hashed once, from a pre-keyed HMAC."""
    keyed = hmac.new(key, digestmod=hashlib.sha256)

    def one(value: str) -> str:
        if value == "":
            return ""
        h = keyed.copy()
        h.update(value.encode())
        return "p_" + h.hexdigest()[:20]

    codes, uniques = pd.factorize(values)
    mapped = np.array([one(v) for v in uniques], dtype=object)
    return mapped[codes].tolist()


def key_id(key: bytes) -> str:
    """A public handle of the key, so that a rotation shows in the record; it reveals nothing of it."""
    return hmac.new(key, b"mlpipe key id", hashlib.sha256).hexdigest()[:8]


def generalize_date(values: pd.Series, granularity: str) -> tuple[pd.Series, int]:
    parsed = pd.to_datetime(values.where(values != ""), errors="coerce", format="mixed")
    fmt = "%Y" if granularity == "year" else "%Y-%m"
    out = parsed.dt.strftime(fmt).fillna("")
    return out, int(((values != "") & parsed.isna()).sum())


PRESIDIO_ENTITIES = (
    "EMAIL_ADDRESS", "PHONE_NUMBER", "US_SSN", "CREDIT_CARD", "IP_ADDRESS", "IBAN_CODE", "URL", "DATE_TIME",
)  # fmt: skip
# Every one of those patterns needs a digit, an @ or a web address: text without them is skipped.
_MAY_HOLD_PATTERN_PII = re.compile(r"[0-9@]|www\.|://")


@functools.cache
def presidio_engines():
    """Presidio's analyzer with its pattern recognizers on a blank spaCy pipeline: no model
    download, and tldextract pinned to its bundled public-suffix list (no network at first use)."""
    import spacy
    import tldextract
    import tldextract.tldextract as tldextract_module
    from presidio_analyzer import AnalyzerEngine, RecognizerRegistry
    from presidio_analyzer.nlp_engine import SpacyNlpEngine
    from presidio_analyzer.predefined_recognizers import (
        CreditCardRecognizer, DateRecognizer, EmailRecognizer, IbanRecognizer, IpRecognizer, PhoneRecognizer,
        UrlRecognizer, UsSsnRecognizer,
    )  # fmt: skip
    from presidio_anonymizer import AnonymizerEngine

    tldextract_module.TLD_EXTRACTOR = tldextract.TLDExtract(suffix_list_urls=(), cache_dir=None)
    nlp = SpacyNlpEngine(models=[{"lang_code": "en", "model_name": "blank"}])
    nlp.nlp = {"en": spacy.blank("en")}  # tokens only: the recognizers are patterns, not NER
    registry = RecognizerRegistry(supported_languages=["en"])
    for recognizer in (EmailRecognizer, PhoneRecognizer, UsSsnRecognizer, CreditCardRecognizer, IpRecognizer,
                       IbanRecognizer, UrlRecognizer, DateRecognizer):  # fmt: skip
        registry.add_recognizer(recognizer())
    return AnalyzerEngine(registry=registry, nlp_engine=nlp, supported_languages=["en"]), AnonymizerEngine()


def identifier_index(values) -> ahocorasick.Automaton | None:
    """An Aho-Corasick automaton over raw identifier values (3+ characters): finds all of them in a
    text in one pass, however many there are."""
    words = {v for v in values if len(v) >= 3}
    if not words:
        return None
    automaton = ahocorasick.Automaton(ahocorasick.STORE_LENGTH)
    for word in words:
        automaton.add_word(word)
    automaton.make_automaton()
    return automaton


def redact_text(text: str, identifiers: ahocorasick.Automaton | list[str] | None) -> tuple[str, Counter]:
    """Redact free text; return it with counts per kind of finding.

    Three layers: every raw value of the declared identifier columns, from any row (exact,
    whatever it looks like); Presidio's pattern recognizers (e-mail, phone, SSN, card with Luhn,
    IP, IBAN, URL, date); then our own e-mail/date/phone patterns as a floor (Presidio validates,
    e.g. rejects 555 phone numbers and known-invalid SSNs, but a fake number in a note is still a
    number to hide).
    """
    index = identifiers if isinstance(identifiers, ahocorasick.Automaton | None) else identifier_index(identifiers)
    found: Counter = Counter()
    if index is not None:
        matches = list(index.iter_long(text))  # longest, non-overlapping: (end index, length)
        if matches:
            pieces, last = [], 0
            for end, length in matches:
                pieces += [text[last : end - length + 1], "[REDACTED]"]
                last = end + 1
            text = "".join(pieces) + text[last:]
            found["IDENTIFIER"] += len(matches)
    if _MAY_HOLD_PATTERN_PII.search(text):
        analyzer, anonymizer = presidio_engines()
        results = analyzer.analyze(text=text, language="en", entities=list(PRESIDIO_ENTITIES))
        if results:
            found.update(r.entity_type for r in results)
            text = anonymizer.anonymize(text=text, analyzer_results=results).text
        for pattern, tag in ((EMAIL, "EMAIL_ADDRESS"), (DATE, "DATE_TIME"), (PHONE, "PHONE_NUMBER")):
            text, n = pattern.subn(f"<{tag}>", text)
            found[tag] += n
    return text, found


def suggest_policy(values: pd.Series) -> str:
    """A policy for an undeclared column from a scan of its values (the values are never shown)."""
    sample = values[values != ""].head(500).astype(str)
    if sample.empty:
        return "drop (empty)"

    def share(pattern: re.Pattern) -> float:
        return float(sample.map(lambda v: bool(pattern.fullmatch(v.strip()))).mean())

    if share(EMAIL) > 0.5:
        return "drop (e-mail-like)"
    if pd.to_datetime(sample, errors="coerce", format="mixed").notna().mean() > 0.8:  # before phones:
        return "generalize_date (date-like)"  # 1980-01-02 also looks like a phone number
    if share(PHONE) > 0.5:
        return "drop (phone-like)"
    if pd.to_numeric(sample, errors="coerce").notna().mean() > 0.8:
        return "generalize_number (numeric)"
    if share(NAME_LIKE) > 0.5:
        return "drop (name-like)"
    if sample.str.split().str.len().mean() >= 4:
        return "redact_text (free text)"
    if sample.nunique() > 0.5 * len(sample):
        return "pseudonymize (identifier-like)"
    return "keep (few distinct values; check they are not personal)"


def check_policy(items: pd.DataFrame, columns: list[str], config: AnonymizeConfig) -> None:
    """Fail closed: every column needs a policy, and every policy a column (a typo hides one)."""
    missing = [c for c in columns if c not in config.policy]
    if missing:
        hints = ", ".join(f"{c} (suggest {suggest_policy(items[c].astype(str))})" for c in missing)
        raise MlpipeError(f"no anonymization policy for column(s): {hints}; set anonymize.policy.<column>")
    unknown = sorted(set(config.policy) - set(columns))
    if unknown:
        raise MlpipeError(f"anonymize.policy names column(s) not in the manifest: {', '.join(unknown)}")


def generalize_number(values: pd.Series, bins: list[float]) -> tuple[pd.Series, int]:
    """Numbers to their bin, as "[low, high)"; unparseable or out-of-range values become ""."""
    numbers = pd.to_numeric(values.where(values != ""), errors="coerce").to_numpy(dtype=float)
    edges = np.asarray(bins, dtype=float)
    labels = np.array([f"[{lo:g}, {hi:g})" for lo, hi in zip(edges[:-1], edges[1:], strict=True)] + [""], dtype=object)
    slot = np.searchsorted(edges, numbers, side="right") - 1  # bin i holds edges[i] <= x < edges[i + 1]
    inside = (slot >= 0) & (slot < len(edges) - 1) & ~np.isnan(numbers)
    out = labels[np.where(inside, slot, len(labels) - 1)]
    return pd.Series(out, index=values.index), int(((values != "").to_numpy() & ~inside).sum())


def shifted_dates(values: pd.Series, column: str, patients: pd.Series, key: bytes, year: bool) -> tuple[list[str], int]:
    """Dates moved by each row's patient's keyed offset (`mlpipe.deid.date_offset_days`), or to
    their year (`year`). DICOM DA/DT columns (by keyword) in DICOM form; other columns are parsed
    as dates and written YYYY-MM-DD. Returns (values, how many non-empty values were unparseable: "")."""
    from mlpipe import deid

    vr = dicom.vr_of(column)
    offsets: dict[str, int] = {}
    out = []
    for value, patient in zip(values.tolist(), patients.tolist(), strict=True):
        if patient not in offsets:
            offsets[patient] = deid.date_offset_days(patient, key)
        if vr in ("DA", "DT"):
            out.append(deid.year_only(value, vr, for_column=True) if year else deid.shift_date(value, vr, offsets[patient]))
        else:
            day = pd.to_datetime(value, errors="coerce", format="mixed") if value else pd.NaT
            out.append("" if pd.isna(day) else f"{day.year:04d}" if year else
                       (day + pd.Timedelta(days=offsets[patient])).strftime("%Y-%m-%d"))  # fmt: skip
    return out, sum(bool(v) and not o for v, o in zip(values.tolist(), out, strict=True))


def date_subjects(items: pd.DataFrame) -> pd.Series:
    """Whose keyed date offset each row's dates move by (raw values: never written out): its
    PatientID; for a row without one, its study ("study " + StudyInstanceUID: a study is one
    patient's, and intervals within it are kept); with neither, "" (one offset for all such rows).
    Without the study, every file whose Patient ID was blanked upstream shared one offset: one
    known date would have given away all of theirs."""
    blank = pd.Series([""] * len(items), index=items.index)
    patient = items["PatientID"].astype(str) if "PatientID" in items.columns else blank
    study = items["StudyInstanceUID"].astype(str).str.strip() if "StudyInstanceUID" in items.columns else blank
    return patient.where(patient.str.strip() != "", ("study " + study).where(study != "", ""))


def remapped_uids(values: pd.Series, key: bytes) -> list[str]:
    """DICOM UIDs (multi-valued: "\\"-separated) to their keyed replacements (`mlpipe.deid.remap_uid`)."""
    from mlpipe import deid

    codes, uniques = pd.factorize(values)
    mapped = np.array(["\\".join(deid.remap_uid(u, key) for u in v.split("\\")) if v else "" for v in uniques], dtype=object)
    return mapped[codes].tolist()


def apply_policy(
    items: pd.DataFrame, columns: list[str], config: AnonymizeConfig, key: bytes, identifiers: ahocorasick.Automaton | None
) -> tuple[pd.DataFrame, dict[str, int]]:
    """The policy, column by column: a table of text in, its anonymized columns and counts out.

    `identifiers` (see `identifier_index`) are redacted from free text. A "drop" column is
    simply not in the output. shift_date offsets are per patient (`date_subjects`): the row's raw
    PatientID, else its study, else one offset for all such rows.
    """
    out: dict[str, list[str] | pd.Series] = {}
    counts: dict[str, int] = {}
    patients = functools.cache(lambda: date_subjects(items))  # only a table with dates to shift needs them
    for column in columns:
        policy: ColumnPolicy = config.policy[column]
        values = items[column].astype(str)
        if policy.action == "remap_uid":
            out[column] = remapped_uids(values, key)
        elif policy.action == "shift_date":
            out[column], counts[f"{column}.unparseable"] = shifted_dates(values, column, patients(), key,
                                                                        config.dicom_dates == "year")  # fmt: skip
        elif policy.action == "generalize_date" and dicom.vr_of(column) in ("DA", "DT"):
            out[column], counts[f"{column}.unparseable"] = shifted_dates(values, column, patients(), key, True)
        elif policy.action == "keep":
            out[column] = values
        elif policy.action == "pseudonymize":
            out[column] = pseudonyms(values, key)
        elif policy.action == "generalize_date":
            out[column], counts[f"{column}.unparseable"] = generalize_date(values, policy.granularity)
        elif policy.action == "generalize_number":
            out[column], counts[f"{column}.unbinned"] = generalize_number(values, policy.bins)
        elif policy.action == "truncate":
            out[column] = values.str[: policy.keep_chars]
        elif policy.action == "redact_text":
            redacted = [redact_text(text, identifiers) for text in values]
            out[column] = [text for text, _ in redacted]
            for kind, n in sum((found for _, found in redacted), Counter()).items():
                counts[f"{column}.redacted.{kind}"] = n
    return pd.DataFrame({c: list(v) if not isinstance(v, pd.Series) else v.to_numpy() for c, v in out.items()},
                        index=items.index), counts  # fmt: skip


def anonymize(
    snapshot: StageResult, config: AnonymizeConfig, source: SourceConfig, secret_key: bytes | None = None
) -> StageResult:
    """`secret_key`: the key from a Prefect Secret block, resolved by the caller (this library
    never imports Prefect); without it the key comes from the environment or the local key file.

    DICOM header columns (ingest's report `dicom.columns`) get the Basic Profile's policy unless
    `config.policy` names them (`mlpipe.dicom.profile_policies`); DICOM images with burned-in text
    are quarantined or redacted (`burned_in`); `config.write_dicom` also writes each DICOM file
    de-identified (`mlpipe.deid.deidentify`). k-anonymity: `config.suppression`."""
    items, removed_duplicates = snapshot_rows(snapshot, source)
    if layout_of(source) in ("imagefolder", "dicom") and IMAGEFOLDER_LABEL not in config.policy:  # the folder name
        config = config.model_copy(update={"policy": {**config.policy, IMAGEFOLDER_LABEL: ColumnPolicy(action="keep")}})
    dicom_info = snapshot.report.get("dicom") or {}
    dicom_columns = [c for c in dicom_info.get("columns", []) if c in items.columns]
    user_policy = dict(config.policy)
    profile, policy_sources = dicom.profile_policies(dicom_columns, config.policy, config.dicom_dates)
    config = config.model_copy(update={"policy": {**profile, **config.policy}})
    columns = [c for c in items.columns if c not in (source.image_column,) and not c.startswith("__")]
    check_policy(items, columns, config)
    key, key_source = (secret_key, f"prefect-secret:{config.key_secret_block}") if secret_key else load_key(config)

    raw_values = raw_identifier_values(items, columns, config, source.image_column, dicom_columns)
    identifiers = identifier_index(raw_values)
    applied, counts = apply_policy(items, columns, config, key, identifiers)
    out = pd.concat(
        [pd.DataFrame({ITEM_ID: items[SHA].str[:16], PIXEL_INDEX: items[PIXEL_INDEX], NEAR_DUP_GROUP: items[NEAR_DUP]}),
         applied], axis=1,
    )  # fmt: skip

    # Hash outputs (item ids, pseudonyms) cannot carry raw text and would only match by chance.
    # Removed exact duplicates keep only their non-personal ("keep") values and the item they
    # duplicate: enough for label to see whether the copies were labelled alike.
    keep_cols = [c for c in columns if config.policy[c].action == "keep"]
    item_of_row = dict(zip(items[ROW], out[ITEM_ID], strict=True))
    duplicates = removed_duplicates[keep_cols].assign(**{ITEM_ID: removed_duplicates[ROW].map(item_of_row)})
    digits_only = set(dicom.digit_columns(items, dicom_columns))  # numbers, dates, UIDs: no text to leak
    scanned = [c for c in columns if config.policy[c].action in TEXT_ACTIONS and c not in digits_only]
    leaks = residual_scan(pd.concat([out[scanned], duplicates[[c for c in keep_cols if c in scanned]]]).fillna(""),
                          identifiers, set(dicom_columns), value_sources(items, columns, config, raw_values))  # fmt: skip
    if leaks:
        found = ", ".join(f"{column} ({kind})" for column, kind in sorted(leaks.items()))
        raise MlpipeError(f"anonymization left personal data in column(s) {found}; refusing to continue "
                          f"(set anonymize.policy.<column> to drop, pseudonymize or redact_text)")  # fmt: skip

    burned = burned_in(items, source, config, snapshot) if dicom_columns else BurnedIn()
    quarantined = pd.DataFrame({"row": [int(items[ROW].iloc[i]) for i in burned.quarantine],
                                "reason": list(burned.quarantine.values())})  # fmt: skip
    out = out.drop(index=out.index[list(burned.quarantine)])
    quasi = [c for c in columns if config.policy[c].quasi_identifier and config.policy[c].action != "drop"]
    suppress = local_suppression if config.suppression == "cells" else record_suppression
    out, suppression = suppress(out, quasi, config.k)
    removed = {**{f"quarantined ({why})": n for why, n in Counter(burned.quarantine.values()).items()},
               f"suppressed by k-anonymity (k={config.k})": suppression.rows_suppressed}  # fmt: skip
    if not suppression.k_reached:
        raise MlpipeError(f"k-anonymity (k={config.k}) cannot be reached over {', '.join(quasi)} with {len(out)} rows; "
                          "lower anonymize.k or mark fewer quasi-identifiers")  # fmt: skip
    if out.empty:
        raise MlpipeError(f"anonymize left no row ({', '.join(f'{n} {why}' for why, n in removed.items() if n)}); "
                          f"generalize the quasi-identifiers more or use anonymize.suppression cells")  # fmt: skip
    check_drop("anonymize", len(items), removed, config.max_drop_fraction)
    report = {
        "rows": len(out),
        "removed": removed,
        "quasi_identifiers": quasi,
        "k": config.k,
        "k_achieved": suppression.k_achieved,
        "rows_suppressed": suppression.rows_suppressed,
        "suppression": suppression.to_dict(),
        "policy": {c: config.policy[c].model_dump() for c in columns},
        "counts": counts,
        "key_source": key_source,
        "key_id": key_id(key),
        "residual_scan": {"raw_values_checked": len(raw_values), "hits": 0, "digit_columns_exempt": sorted(digits_only)},
        "images_reencoded": len(out),
    }
    if dicom_columns:
        from mlpipe.deid import method_record

        report["dicom"] = {"profile": dicom.PROFILE_NAME, "method": method_record(config.dicom_dates, bool(burned.redacted)),
                           "policy_sources": dict(Counter(
            v.split(":")[0] for v in policy_sources.values())), "burned_in": burned.summary,
            "not_columns": dicom_info.get("not_columns", {})}  # fmt: skip
    stage_key = stable_hash(snapshot.key, config, source.image_column, key_id(key), burned.ocr,
                            code_version("mlpipe.anonymize", "mlpipe.dicom", "mlpipe.deid", "mlpipe.kanonymity",
                                         "mlpipe.burned_in"))[:16]  # fmt: skip
    pixels = np.load(snapshot.file("pixels.npy"), mmap_mode="r")
    with stage_dir("anonymize", stage_key) as tmp:
        if burned.redacted:  # the stage's own copy of the pixel cache, with the redacted images
            pixels = _with_redactions(pixels, burned.redacted, items, tmp / "pixels.npy")
        write_clean_images(pixels, out, tmp / "images")
        if config.write_dicom and dicom_columns:
            user_columns = [c for c in dicom_columns if c in user_policy and user_policy[c].action != "keep"]
            report["dicom"]["written"] = write_deidentified_dicom(items.loc[out.index], source, config, key, burned,
                                                                  tmp / "dicom", out[ITEM_ID], user_columns)  # fmt: skip
        out.to_parquet(tmp / "items.parquet", index=False)
        duplicates.to_parquet(tmp / "duplicates.parquet", index=False)
        quarantined.to_csv(tmp / "quarantine.csv", index=False)
        write_json(tmp / "report.json", report)
    pixels_file = final_path("anonymize", stage_key) / "pixels.npy" if burned.redacted else snapshot.file("pixels.npy")
    return StageResult.at("anonymize", stage_key, report, pixels=pixels_file)


@dataclass
class BurnedIn:
    """What `burned_in` found: {position in items: quarantine reason}, {position: redacted image
    at native resolution (8-bit) and its boxes}, whether OCR ran, and counts for the report."""

    quarantine: dict[int, str] = field(default_factory=dict)
    redacted: dict[int, tuple[np.ndarray, list]] = field(default_factory=dict)
    ocr: bool = False
    summary: dict = field(default_factory=dict)


# Modalities where burned-in text is common (ultrasound, captures, angiography, radiographs,
# endoscopy, photos, mammography): `text_scan` auto reads these with OCR when the header does not
# say NO. CT, MR, PET and NM images rarely carry it and cost a second of OCR each: auto trusts
# their header and counts them; `text_scan: always` reads every image.
OCR_MODALITIES = frozenset({"US", "SC", "OT", "XA", "RF", "ES", "XC", "GM", "SM", "DX", "CR", "MG", "IO", "PX", "DG", ""})


def burned_in(items: pd.DataFrame, source: SourceConfig, config: AnonymizeConfig, snapshot: StageResult) -> BurnedIn:
    """Burned-in text in DICOM images, by header and by OCR (`mlpipe.burned_in`).

    A row whose BurnedInAnnotation says YES is flagged by its header. OCR reads each DICOM image
    at native resolution (ingest's window) whose header does not say NO: with config.text_scan
    always, every one; auto (when tesseract is installed), those of OCR_MODALITIES; never, none.
    Images OCR reads run on threads (tesseract runs as a process). Flagged rows are quarantined,
    or with config.burned_in "redact" the text boxes OCR found are blacked out (a YES image where
    OCR finds no box is quarantined: what cannot be located cannot be redacted). Every image is
    counted under its header value and whether OCR read it, and why not.
    """
    from mlpipe import burned_in as ocr
    from mlpipe.dicom import FRAME, decode_dicom
    from mlpipe.ingest import open_source

    if config.text_scan == "always" and not ocr.ocr_available():
        raise MlpipeError("anonymize.text_scan always: tesseract is not installed (apt-get install tesseract-ocr)")
    available = config.text_scan != "never" and ocr.ocr_available()
    says = items["BurnedInAnnotation"].astype(str).str.strip().str.upper() if "BurnedInAnnotation" in items else None
    modality = items["Modality"].astype(str).str.strip().str.upper() if "Modality" in items else None
    result = BurnedIn(ocr=available)
    counts: Counter = Counter()
    src = open_source(source)
    window = (snapshot.report.get("dicom") or {}).get("window", "header")
    window = tuple(window) if isinstance(window, list) else window
    headers: dict[int, str] = {}
    to_read: list[int] = []
    for position, frame in enumerate(items[FRAME]):
        if frame == "":
            continue
        header = headers[position] = says.iloc[position] if says is not None else ""
        counts[f"header {header or 'absent'}"] += 1
        kind = modality.iloc[position] if modality is not None else ""
        if header == "NO":
            continue
        if not available:
            counts["not scanned (text_scan never)" if config.text_scan == "never" else "not scanned (no OCR)"] += 1
        elif config.text_scan == "always" or kind in OCR_MODALITIES:
            to_read.append(position)
        else:
            counts[f"not scanned (modality {kind}; text_scan always scans it)"] += 1

    def read(position: int):
        native, _ = decode_dicom(src.read(src.resolve(items[source.image_column].iloc[position])),
                                 int(items[FRAME].iloc[position]), window, 1 << 62)  # fmt: skip
        boxes = ocr.find_text(native)
        return position, (native if boxes else None), boxes

    with ThreadPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1))) as pool:
        found = {position: (native, boxes) for position, native, boxes in pool.map(read, to_read)}
    counts["scanned by OCR"] += len(found)
    counts["text found by OCR"] += sum(bool(boxes) for _, boxes in found.values())
    for position, header in headers.items():
        native, boxes = found.get(position, (None, []))
        if header == "YES" and (config.burned_in == "quarantine" or not boxes):
            result.quarantine[position] = "burned-in annotation (header)"
        elif boxes and config.burned_in == "quarantine":
            result.quarantine[position] = "burned-in text (OCR)"
        elif boxes:
            result.redacted[position] = (ocr.redact(native, boxes), boxes)
    result.summary = {"burned_in": config.burned_in, "text_scan": config.text_scan, "ocr_ran": bool(found), **counts,
                      "quarantined": len(result.quarantine), "redacted": len(result.redacted)}  # fmt: skip
    if counts["not scanned (no OCR)"]:
        log.warning("%d DICOM images were not scanned for burned-in text: tesseract is not installed "
                    "(anonymize.text_scan auto); their header alone decided", counts["not scanned (no OCR)"])  # fmt: skip
    return result


def _with_redactions(pixels: np.ndarray, redacted: dict, items: pd.DataFrame, path: Path) -> np.ndarray:
    """A copy of the pixel cache at `path` where each redacted image replaces its row, resized as
    ingest resizes (`mlpipe.images.decode_array`)."""
    from mlpipe.images import decode_array

    out = np.lib.format.open_memmap(path, mode="w+", dtype=pixels.dtype, shape=pixels.shape)
    out[:] = pixels
    size, channels = pixels.shape[1], pixels.shape[3]
    for position, (image, _) in redacted.items():
        out[int(items[PIXEL_INDEX].iloc[position])] = decode_array(image, size, channels, 1 << 62, thumbnail=False).pixels
    out.flush()
    return out


def write_deidentified_dicom(items: pd.DataFrame, source: SourceConfig, config: AnonymizeConfig, key: bytes,
                             burned: BurnedIn, folder: Path, item_ids: pd.Series, user_columns: list[str] = ()) -> dict:  # fmt: skip
    """Each kept DICOM file once, de-identified (`mlpipe.deid.deidentify`, the date offset of its
    `date_subjects`, as the columns'), as `<item id of its first kept item>.dcm`. `user_columns`: header
    attributes the user's anonymize.policy gives an action other than keep: removed from the file
    too (the manifest's generalized text is no valid value of their VR). A file with burned-in
    text redacted in a scanned frame gets those boxes blacked out in every frame (a loop's overlay
    text sits in the same place; frames OCR did not read are not trusted), stored uncompressed.
    Returns counts."""
    import pydicom

    from mlpipe import deid
    from mlpipe.dicom import DICOM_FILE
    from mlpipe.ingest import open_source

    src = open_source(source)
    folder.mkdir()
    written, reports = 0, Counter()
    boxes_of = {p: b for p, (_, b) in burned.redacted.items()}  # positions are index labels (a RangeIndex)
    for _, group in items[items[DICOM_FILE] != ""].groupby(DICOM_FILE, sort=False):
        first = group.index[0]
        ds = pydicom.dcmread(io.BytesIO(src.read(src.resolve(group[source.image_column].iloc[0]))), force=True)
        boxes = [box for i in group.index for box in boxes_of.get(i, [])]
        report = deid.deidentify(ds, key, patient=date_subjects(group).iloc[0], dates=config.dicom_dates,
                                 clean_pixels=bool(boxes))  # fmt: skip
        for keyword in user_columns:
            if keyword in ds:
                delattr(ds, keyword)
                reports["removed by anonymize.policy"] += 1
        if boxes:
            _black_out(ds, boxes)
        ds.save_as(folder / f"{item_ids.loc[first]}.dcm", enforce_file_format=True)
        written += 1
        reports.update({k: v for k, v in report.to_dict().items() if isinstance(v, int)})
    return {"files": written, **reports}


def _black_out(ds, boxes: list) -> None:
    """Fill `boxes` (pixels of a frame: left, top, width, height), padded by 2, in every frame with
    the darkest stored value (the brightest for MONOCHROME1), and store the pixel data again,
    uncompressed and interleaved (pydicom's `set_pixel_data`; YBR data becomes RGB, as decoded)."""
    array = ds.pixel_array
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    stack = (array if frames > 1 else array[None]).copy()
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip()
    dark = stack.max() if photometric == "MONOCHROME1" else stack.min()
    for box in boxes:
        stack[:, max(box.top - 2, 0) : box.top + box.height + 2, max(box.left - 2, 0) : box.left + box.width + 2] = dark
    colour = stack.ndim == 4
    bits = 8 if colour else int(ds.get("BitsStored", 8 * stack.dtype.itemsize))
    ds.set_pixel_data(stack if frames > 1 else stack[0], "RGB" if colour else photometric, bits,
                      generate_instance_uid=False)  # fmt: skip


def raw_identifier_values(items: pd.DataFrame, columns: list[str], config: AnonymizeConfig, image_column: str,
                          dicom_columns: list[str] = ()) -> set[str]:  # fmt: skip
    """Every raw value that must not survive: identifier columns, columns that get generalized
    (a full date of birth), and the image paths and file stems (file names often are a name).
    Of the DICOM header columns only the identifying ones count (`mlpipe.dicom.identifier_columns`):
    the profile also removes descriptions whose words a kept attribute may rightly hold."""
    generalized = ("generalize_date", "generalize_number", "truncate")
    identifying = set(dicom.identifier_columns(list(dicom_columns)))
    personal = [c for c in columns if config.policy[c].action in (*IDENTIFIER_ACTIONS, *generalized)
                and (c not in dicom_columns or c in identifying)]  # fmt: skip
    values = {v for c in personal for v in items[c].astype(str).tolist()}  # lists iterate 10x faster than Series
    paths = items[image_column].astype(str).tolist()
    values.update(paths)
    values.update(posixpath.splitext(posixpath.basename(p))[0] for p in paths)
    return {v for v in values if len(v) >= 3}


def value_sources(items: pd.DataFrame, columns: list[str], config: AnonymizeConfig, raw_values: set[str]) -> dict:
    """{raw identifier value: the policy-changed columns holding it}, for naming where a residual
    hit came from (the value itself is never shown)."""
    out: dict[str, list[str]] = {}
    for column in columns:
        if config.policy[column].action != "keep":
            for value in set(items[column].astype(str).tolist()) & raw_values:
                out.setdefault(value, []).append(column)
    for value in raw_values - set(out):
        out[value] = ["an image file name"]
    return out


def residual_scan(frame: pd.DataFrame, identifiers: ahocorasick.Automaton | None, no_phone: set[str] = frozenset(),
                  sources: dict[str, list[str]] | None = None) -> dict[str, str]:  # fmt: skip
    """{column: kind of hit} for raw identifier values and e-mail/phone patterns; empty is a pass.

    Names the column and the kind, never the value; with `sources` ({raw value: columns it came
    from}) also the columns whose raw value was found. Raw values are matched with the
    Aho-Corasick automaton of `identifier_index`: one pass over each column, however many values
    (a value-by-value search is quadratic in the rows). `no_phone`: columns left out of the phone
    pattern (DICOM header strings such as software versions "1.2.3.4567": phone numbers in a
    DICOM header are in attributes the profile removes).
    """
    automaton = identifiers
    hits = {}
    for column in frame.columns:
        if frame[column].dtype.kind in "iuf":
            continue
        blob = "\n".join(map(str, frame[column].tolist()))
        found = next(automaton.iter(blob), None) if automaton is not None else None
        if found is not None:
            end, length = found
            origin = sorted((sources or {}).get(blob[end - length + 1 : end + 1], []))
            hits[column] = "raw identifier value" + (f" of {', '.join(origin)} in some row" if origin else "")
        elif EMAIL.search(blob):
            hits[column] = "e-mail pattern"
        elif column not in no_phone and PHONE.search(blob):
            hits[column] = "phone pattern"
    return hits


def write_clean_images(pixels: np.ndarray, items: pd.DataFrame, folder: Path) -> None:
    """Re-encode from the decoded pixel array only: no metadata from the source file can survive.
    On threads: Pillow's PNG encoder (zlib) releases the GIL. zlib level 1, not Pillow's default 6:
    on 128 px CT slices (benchmarks/dicom.py's) a third of the time for files 16% larger."""
    folder.mkdir()

    def save(pair) -> None:
        item_id, index = pair
        array = np.asarray(pixels[index])
        Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array).save(folder / f"{item_id}.png", compress_level=1)

    pairs = list(zip(items[ITEM_ID], items[PIXEL_INDEX], strict=True))
    if len(pairs) < 256:
        for pair in pairs:
            save(pair)
        return
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        list(pool.map(save, pairs, chunksize=64))
