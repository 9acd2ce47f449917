"""Data accounting: every row that enters a stage leaves it kept or removed for a named reason,
and a stage that removes more than the user's limit stops instead of training on what is left.

Pure functions over the stage reports; the CLI prints `lines(...)` and tracking logs `ledger(...)`.
"""

from __future__ import annotations

from collections.abc import Mapping

from mlpipe.errors import MlpipeError


def check_drop(stage: str, rows_in: int, removed: Mapping[str, int], limit: float) -> None:
    """Raise a one-line `MlpipeError` when `sum(removed) / rows_in > limit` (the stage's
    `max_drop_fraction`), naming the stage, the count and each reason."""
    total = sum(removed.values())
    if rows_in and total / rows_in > limit:
        reasons = ", ".join(f"{n} {why}" for why, n in sorted(removed.items(), key=lambda kv: -kv[1]) if n)
        raise MlpipeError(
            f"{stage} removed {total} of {rows_in} rows ({total / rows_in:.0%}: {reasons}); "
            f"{stage}.max_drop_fraction is {limit:g}: fix the data or raise the limit"
        )


def ledger(ingest: dict, anonymize: dict, label: dict, split: dict) -> list[dict]:
    """One entry per stage from the stage reports: rows in, rows out and what went where.
    Rows out of one stage are rows into the next; `closes` says that the entry adds up."""
    sizes = split["sizes"]
    entries = [
        {"stage": "ingest", "rows_in": ingest["rows_in"], "kept": ingest["kept"],
         "removed": {**{f"quarantined: {r}": n for r, n in ingest["quarantine_reasons"].items()},
                     "exact duplicates": ingest["duplicates"]}},
        {"stage": "anonymize", "rows_in": ingest["kept"], "kept": anonymize["rows"],
         "removed": anonymize.get("removed") or {f"suppressed (k-anonymity, k={anonymize['k']})": anonymize["rows_suppressed"]}},
        {"stage": "label", "rows_in": label["items"], "kept": label["labelled"],
         "removed": {**{f"review: {why}": n for why, n in label["review_queue"].items()},
                     "dropped ties": label.get("dropped_ties", 0)},
         "flagged_kept": label.get("label_issues", {}).get("flagged", 0)},
        {"stage": "split", "rows_in": label["labelled"], "kept": sum(sizes.values()), "removed": {}, "sizes": sizes},
    ]
    for entry in entries:
        entry["closes"] = entry["kept"] + sum(entry["removed"].values()) == entry["rows_in"]
    return entries


def lines(entries: list[dict], trained_on: int | None = None, evaluated_on: int | None = None,
          left_out: int = 0) -> list[str]:  # fmt: skip
    """The account as one line per stage, for the end of `mlpipe run`. `trained_on`: the items the
    shipped model trained on; `left_out`: training-split items flagged as likely label errors and
    left out of them (resample.drop_label_issues, opt-in)."""
    out = []
    for e in entries:
        removed = _removed_text(e["removed"])
        extra = f"; {e['flagged_kept']} likely label errors flagged, kept" if e.get("flagged_kept") else ""
        if e["stage"] == "split":
            s = e["sizes"]
            out.append(f"split      {e['rows_in']} in: train {s['train']}, val {s['val']}, test {s['test']}")
        else:
            out.append(f"{e['stage']:<10} {e['rows_in']} in, {e['kept']} kept; {removed}{extra}")
    if trained_on is not None:
        dropped = f" ({left_out} flagged as likely label errors left out: resample.drop_label_issues)" if left_out else ""
        out.append(f"train      trained on {trained_on}{dropped}")
    if evaluated_on is not None:
        out.append(f"evaluate   evaluated on {evaluated_on} (the whole test split)")
    return out


# ledger keys "quarantined: REASON" or "quarantined (REASON)", and "review: WHY"; how a line names them
_GROUPED = {"quarantined": "quarantined", "review": "sent to review"}


def _removed_text(removed: Mapping[str, int]) -> str:
    """`removed` for a person: reasons of one kind under one count, e.g. "quarantined 3 (not an
    image 2; truncated DICOM pixel data 1), exact duplicates 1" or "sent to review 26 (unlabelled)";
    "none removed" when nothing was."""
    groups: dict[str, list[tuple[str, int]]] = {}
    for key, n in removed.items():
        if not n:
            continue
        kind, reason = key, ""
        for head in _GROUPED:
            if key.startswith(f"{head}: "):
                kind, reason = _GROUPED[head], key[len(head) + 2:]
            elif key.startswith(f"{head} (") and key.endswith(")"):
                kind, reason = _GROUPED[head], key[len(head) + 2:-1]
        groups.setdefault(kind, []).append((reason, n))
    parts = []
    for kind, reasons in groups.items():
        total = sum(n for _, n in reasons)
        named = [r for r in reasons if r[0]]
        if not named:
            parts.append(f"{kind} {total}")
        elif len(reasons) == 1:
            parts.append(f"{kind} {total} ({named[0][0]})")
        else:
            parts.append(f"{kind} {total} (" + "; ".join(f"{r} {n}" if r else f"other {n}" for r, n in reasons) + ")")
    return ", ".join(parts) or "none removed"
