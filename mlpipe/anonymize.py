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
import logging
import os
import re
import secrets
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from mlpipe.config import AnonymizeConfig, ColumnPolicy, SourceConfig
from mlpipe.errors import MlpipeError
from mlpipe.ingest import NEAR_DUP, PIXEL_INDEX, ROW, SHA, snapshot_rows
from mlpipe.store import StageResult, code_version, stable_hash, stage_dir, state_dir, write_json

log = logging.getLogger(__name__)

ITEM_ID = "item_id"
NEAR_DUP_GROUP = "near_dup_group"  # ingest's near-duplicate group: kept together by split
IDENTIFIER_ACTIONS = ("drop", "pseudonymize")
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


def redact_text(text: str, identifiers: list[str]) -> tuple[str, Counter]:
    """Redact free text; return it with counts per kind of finding.

    Three layers: the row's own identifier values (exact, whatever they look like); Presidio's
    pattern recognizers (e-mail, phone, SSN, card with Luhn, IP, IBAN, URL, date); then our own
    e-mail/date/phone patterns as a floor (Presidio validates, e.g. rejects 555 phone numbers
    and known-invalid SSNs, but a fake number in a note is still a number to hide).
    """
    found: Counter = Counter()
    for value in sorted({v for v in identifiers if len(v) >= 3}, key=len, reverse=True):
        if value in text:
            found["IDENTIFIER"] += text.count(value)
            text = text.replace(value, "[REDACTED]")
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
    numbers = pd.to_numeric(values.where(values != ""), errors="coerce")
    binned = pd.cut(numbers, bins=bins, right=False)
    out = binned.astype(str).where(binned.notna(), "")
    return out, int(((values != "") & binned.isna()).sum())


def k_anonymize(frame: pd.DataFrame, quasi: list[str], k: int) -> tuple[pd.DataFrame, int, int | None]:
    """Suppress rows whose quasi-identifier combination occurs fewer than k times.

    Returns (kept rows, rows suppressed, k achieved: the smallest class left).
    """
    if not quasi:
        return frame, 0, None
    sizes = frame.groupby(quasi, dropna=False)[quasi[0]].transform("size")
    kept = frame[sizes >= k]
    achieved = int(sizes[sizes >= k].min()) if len(kept) else 0
    return kept, int((sizes < k).sum()), achieved


def anonymize(
    snapshot: StageResult, config: AnonymizeConfig, source: SourceConfig, secret_key: bytes | None = None
) -> StageResult:
    """`secret_key`: the key from a Prefect Secret block, resolved by the caller (this library
    never imports Prefect); without it the key comes from the environment or the local key file."""
    items, removed_duplicates = snapshot_rows(snapshot, source)
    columns = [c for c in items.columns if c not in (source.image_column,) and not c.startswith("__")]
    check_policy(items, columns, config)
    key, key_source = (secret_key, f"prefect-secret:{config.key_secret_block}") if secret_key else load_key(config)

    identifier_cols = [c for c in columns if config.policy[c].action in IDENTIFIER_ACTIONS]
    generalized = ("generalize_date", "generalize_number", "truncate")  # raw values must not survive either
    personal_cols = identifier_cols + [c for c in columns if config.policy[c].action in generalized]
    raw_values = _raw_values(items, personal_cols, source.image_column)
    out = pd.DataFrame({ITEM_ID: items[SHA].str[:16], PIXEL_INDEX: items[PIXEL_INDEX], NEAR_DUP_GROUP: items[NEAR_DUP]})
    counts: dict[str, int] = {}
    for column in columns:
        policy: ColumnPolicy = config.policy[column]
        values = items[column].astype(str)
        if policy.action == "keep":
            out[column] = values
        elif policy.action == "pseudonymize":
            out[column] = [pseudonym(v, key) for v in values]
        elif policy.action == "generalize_date":
            out[column], counts[f"{column}.unparseable"] = generalize_date(values, policy.granularity)
        elif policy.action == "generalize_number":
            out[column], counts[f"{column}.unbinned"] = generalize_number(values, policy.bins)
        elif policy.action == "truncate":
            out[column] = values.str[: policy.keep_chars]
        elif policy.action == "redact_text":
            redacted = [
                redact_text(text, [items.at[i, c] for c in identifier_cols] + [items.at[i, source.image_column]])
                for i, text in zip(items.index, values, strict=True)
            ]
            out[column] = [text for text, _ in redacted]
            for kind, n in sum((found for _, found in redacted), Counter()).items():
                counts[f"{column}.redacted.{kind}"] = n
        # "drop": the column is simply not carried over

    # Hash outputs (item ids, pseudonyms) cannot carry raw text and would only match by chance.
    # Removed exact duplicates keep only their non-personal ("keep") values and the item they
    # duplicate: enough for label to see whether the copies were labelled alike.
    keep_cols = [c for c in columns if config.policy[c].action == "keep"]
    item_of_row = dict(zip(items[ROW], out[ITEM_ID], strict=True))
    duplicates = removed_duplicates[keep_cols].assign(**{ITEM_ID: removed_duplicates[ROW].map(item_of_row)})
    leaks = residual_scan(
        pd.concat([out[[c for c in columns if config.policy[c].action in TEXT_ACTIONS]], duplicates[keep_cols]]).fillna(""),
        raw_values,
    )
    if leaks:
        found = ", ".join(f"{column} ({kind})" for column, kind in sorted(leaks.items()))
        raise MlpipeError(f"anonymization left personal data in column(s) {found}; refusing to continue "
                          f"(use drop, pseudonymize or redact_text for them)")  # fmt: skip
    quasi = [c for c in columns if config.policy[c].quasi_identifier and config.policy[c].action != "drop"]
    out, suppressed, k_achieved = k_anonymize(out, quasi, config.k)
    if out.empty:
        raise MlpipeError(f"k-anonymity (k={config.k}) over {', '.join(quasi)} suppressed every row; generalize more")
    report = {
        "rows": len(out),
        "quasi_identifiers": quasi,
        "k": config.k,
        "k_achieved": k_achieved,
        "rows_suppressed": suppressed,
        "policy": {c: config.policy[c].model_dump() for c in columns},
        "counts": counts,
        "key_source": key_source,
        "key_id": key_id(key),
        "residual_scan": {"raw_values_checked": len(raw_values), "hits": 0},
        "images_reencoded": len(out),
    }
    stage_key = stable_hash(snapshot.key, config, source.image_column, key_id(key), code_version("mlpipe.anonymize"))[:16]
    with stage_dir("anonymize", stage_key) as tmp:
        write_clean_images(np.load(snapshot.file("pixels.npy"), mmap_mode="r"), out, tmp / "images")
        out.to_parquet(tmp / "items.parquet", index=False)
        duplicates.to_parquet(tmp / "duplicates.parquet", index=False)
        write_json(tmp / "report.json", report)
    return StageResult.at("anonymize", stage_key, report, pixels=snapshot.file("pixels.npy"))


def _raw_values(items: pd.DataFrame, identifier_cols: list[str], image_column: str) -> set[str]:
    values = {v for c in identifier_cols for v in items[c].astype(str)}
    for path in items[image_column].astype(str):
        values.update((path, Path(path).stem))  # file names often are the person's name
    return {v for v in values if len(v) >= 3}


def residual_scan(frame: pd.DataFrame, raw_values: set[str]) -> dict[str, str]:
    """{column: kind of hit} for raw identifier values and e-mail/phone patterns; empty is a pass.

    Names the column and the kind, never the value.
    """
    hits = {}
    for column in frame.columns:
        if frame[column].dtype.kind in "iuf":
            continue
        blob = "\x00".join(frame[column].astype(str))  # one search per value, not per cell
        if any(v in blob for v in raw_values):
            hits[column] = "raw identifier value"
        elif EMAIL.search(blob):
            hits[column] = "e-mail pattern"
        elif PHONE.search(blob.replace("\x00", "\n")):
            hits[column] = "phone pattern"
    return hits


def write_clean_images(pixels: np.ndarray, items: pd.DataFrame, folder: Path) -> None:
    """Re-encode from the decoded pixel array only: no metadata from the source file can survive."""
    folder.mkdir()
    for item_id, index in zip(items[ITEM_ID], items[PIXEL_INDEX], strict=True):
        array = np.asarray(pixels[index])
        Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array).save(folder / f"{item_id}.png")
