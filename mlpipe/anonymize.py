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
import posixpath
import re
import secrets
from collections import Counter
from pathlib import Path

import ahocorasick
import numpy as np
import pandas as pd
from PIL import Image

from mlpipe.config import AnonymizeConfig, ColumnPolicy, SourceConfig
from mlpipe.accounting import check_drop
from mlpipe.errors import MlpipeError
from mlpipe.ingest import IMAGEFOLDER_LABEL, NEAR_DUP, PIXEL_INDEX, ROW, SHA, layout_of, snapshot_rows
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


def apply_policy(
    items: pd.DataFrame, columns: list[str], config: AnonymizeConfig, key: bytes, identifiers: ahocorasick.Automaton | None
) -> tuple[pd.DataFrame, dict[str, int]]:
    """The policy, column by column: a table of text in, its anonymized columns and counts out.

    `identifiers` (see `identifier_index`) are redacted from free text. A "drop" column is
    simply not in the output.
    """
    out: dict[str, list[str] | pd.Series] = {}
    counts: dict[str, int] = {}
    for column in columns:
        policy: ColumnPolicy = config.policy[column]
        values = items[column].astype(str)
        if policy.action == "keep":
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
    never imports Prefect); without it the key comes from the environment or the local key file."""
    items, removed_duplicates = snapshot_rows(snapshot, source)
    if layout_of(source) == "imagefolder" and IMAGEFOLDER_LABEL not in config.policy:  # the folder name is the label
        config = config.model_copy(update={"policy": {**config.policy, IMAGEFOLDER_LABEL: ColumnPolicy(action="keep")}})
    columns = [c for c in items.columns if c not in (source.image_column,) and not c.startswith("__")]
    check_policy(items, columns, config)
    key, key_source = (secret_key, f"prefect-secret:{config.key_secret_block}") if secret_key else load_key(config)

    raw_values = raw_identifier_values(items, columns, config, source.image_column)
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
    leaks = residual_scan(
        pd.concat([out[[c for c in columns if config.policy[c].action in TEXT_ACTIONS]], duplicates[keep_cols]]).fillna(""),
        identifiers,
    )
    if leaks:
        found = ", ".join(f"{column} ({kind})" for column, kind in sorted(leaks.items()))
        raise MlpipeError(f"anonymization left personal data in column(s) {found}; refusing to continue "
                          f"(use drop, pseudonymize or redact_text for them)")  # fmt: skip
    quasi = [c for c in columns if config.policy[c].quasi_identifier and config.policy[c].action != "drop"]
    out, suppressed, k_achieved = k_anonymize(out, quasi, config.k)
    if out.empty:
        raise MlpipeError(f"k-anonymity (k={config.k}) over {', '.join(quasi)} suppressed every row; generalize more")
    check_drop("anonymize", len(out) + suppressed, {f"suppressed by k-anonymity (k={config.k})": suppressed},
               config.max_drop_fraction)
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


def raw_identifier_values(items: pd.DataFrame, columns: list[str], config: AnonymizeConfig, image_column: str) -> set[str]:
    """Every raw value that must not survive: identifier columns, columns that get generalized
    (a full date of birth), and the image paths and file stems (file names often are a name)."""
    generalized = ("generalize_date", "generalize_number", "truncate")
    personal = [c for c in columns if config.policy[c].action in (*IDENTIFIER_ACTIONS, *generalized)]
    values = {v for c in personal for v in items[c].astype(str).tolist()}  # lists iterate 10x faster than Series
    paths = items[image_column].astype(str).tolist()
    values.update(paths)
    values.update(posixpath.splitext(posixpath.basename(p))[0] for p in paths)
    return {v for v in values if len(v) >= 3}


def residual_scan(frame: pd.DataFrame, identifiers: ahocorasick.Automaton | None) -> dict[str, str]:
    """{column: kind of hit} for raw identifier values and e-mail/phone patterns; empty is a pass.

    Names the column and the kind, never the value. Raw values are matched with the Aho-Corasick
    automaton of `identifier_index`: one pass over each column, however many values (a
    value-by-value search is quadratic in the rows).
    """
    automaton = identifiers
    hits = {}
    for column in frame.columns:
        if frame[column].dtype.kind in "iuf":
            continue
        blob = "\n".join(map(str, frame[column].tolist()))
        if automaton is not None and next(automaton.iter(blob), None) is not None:
            hits[column] = "raw identifier value"
        elif EMAIL.search(blob):
            hits[column] = "e-mail pattern"
        elif PHONE.search(blob):
            hits[column] = "phone pattern"
    return hits


def write_clean_images(pixels: np.ndarray, items: pd.DataFrame, folder: Path) -> None:
    """Re-encode from the decoded pixel array only: no metadata from the source file can survive."""
    folder.mkdir()
    for item_id, index in zip(items[ITEM_ID], items[PIXEL_INDEX], strict=True):
        array = np.asarray(pixels[index])
        Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array).save(folder / f"{item_id}.png")
