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

import hashlib
import hmac
import logging
import os
import re
import secrets
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


def redact_text(text: str, identifiers: list[str]) -> tuple[str, int]:
    """Replace the row's identifier values and e-mail/phone/date patterns; return (text, count)."""
    count = 0
    for value in sorted({v for v in identifiers if len(v) >= 3}, key=len, reverse=True):
        if value in text:
            count += text.count(value)
            text = text.replace(value, "[REDACTED]")
    for pattern, tag in ((EMAIL, "[EMAIL]"), (DATE, "[DATE]"), (PHONE, "[PHONE]")):  # dates before phones
        text, n = pattern.subn(tag, text)
        count += n
    return text, count


def check_policy(columns: list[str], config: AnonymizeConfig) -> None:
    missing = [c for c in columns if c not in config.policy]
    if missing:
        raise MlpipeError(
            f"no anonymization policy for column(s): {', '.join(missing)} "
            f"(set anonymize.policy.<column> to keep, drop, pseudonymize, generalize_date or redact_text)"
        )


def anonymize(snapshot: StageResult, config: AnonymizeConfig, source: SourceConfig) -> StageResult:
    items, removed_duplicates = snapshot_rows(snapshot, source)
    columns = [c for c in items.columns if c not in (source.image_column,) and not c.startswith("__")]
    check_policy(columns, config)
    key, key_source = load_key(config)

    identifier_cols = [c for c in columns if config.policy[c].action in IDENTIFIER_ACTIONS]
    personal_cols = identifier_cols + [c for c in columns if config.policy[c].action == "generalize_date"]
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
        elif policy.action == "redact_text":
            redacted = [
                redact_text(text, [items.at[i, c] for c in identifier_cols] + [items.at[i, source.image_column]])
                for i, text in zip(items.index, values, strict=True)
            ]
            out[column] = [text for text, _ in redacted]
            counts[f"{column}.redactions"] = sum(n for _, n in redacted)
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
        raise MlpipeError(
            f"anonymization left {sum(leaks.values())} raw identifier value(s) in column(s) "
            f"{', '.join(sorted(leaks))}; refusing to continue (use drop or redact_text for them)"
        )
    report = {
        "rows": len(out),
        "policy": {c: config.policy[c].model_dump() for c in columns},
        "unused_policies": sorted(set(config.policy) - set(columns)),
        "counts": counts,
        "key_source": key_source,
        "key_id": key_id(key),
        "residual_raw_values": 0,
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


def residual_scan(frame: pd.DataFrame, raw_values: set[str]) -> dict[str, int]:
    """Count raw values found anywhere in each text column (0 everywhere is the only pass)."""
    hits = {}
    for column in frame.columns:
        if frame[column].dtype.kind in "iuf":
            continue
        blob = "\x00".join(frame[column].astype(str))  # one search per value, not per cell
        n = sum(1 for v in raw_values if v in blob)
        if n:
            hits[column] = n
    return hits


def write_clean_images(pixels: np.ndarray, items: pd.DataFrame, folder: Path) -> None:
    """Re-encode from the decoded pixel array only: no metadata from the source file can survive."""
    folder.mkdir()
    for item_id, index in zip(items[ITEM_ID], items[PIXEL_INDEX], strict=True):
        array = np.asarray(pixels[index])
        Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array).save(folder / f"{item_id}.png")
