"""Anonymization throughput and free-text recall.

    .venv/bin/python benchmarks/anonymize.py [--small 10000] [--large 100000] [--notes 2000]

Throughput: a generated manifest with 8 structured columns (pseudonymize, drop x3,
generalize_date, generalize_number, truncate, keep) and one free-text column (redact_text, a
third of the notes holding PII), through the policy and the residual scan, at two sizes. The
structured columns are also timed alone. Goals: structured >= 100,000 rows/s; time(large) /
time(small) <= 12 x (large / small) / 10, i.e. linear.

Recall: generated notes with planted e-mails, phones, SSNs, card numbers, IPs and the row's
declared name; recall per entity (planted value gone after redaction), and precision (planted
values among all redactions). Goals: >= 0.95 per pattern entity, 1.0 for declared identifiers.

Ends with one JSON line; ratio = structured rows/s / 100,000.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import time

import numpy as np
import pandas as pd
from faker import Faker

from mlpipe.anonymize import apply_policy, identifier_index, redact_text, residual_scan
from mlpipe.config import AnonymizeConfig

POLICY = {
    "subject_id": "pseudonymize", "name": "drop", "email": "drop", "phone": "drop",
    "date_of_birth": {"action": "generalize_date", "granularity": "year"},
    "age": {"action": "generalize_number", "bins": [0, 18, 40, 65, 120]},
    "zip": {"action": "truncate", "keep_chars": 3}, "grade": "keep",
    "note": "redact_text",
}  # fmt: skip
STRUCTURED = [c for c in POLICY if c != "note"]


def manifest(rows: int, seed: int = 0) -> pd.DataFrame:
    fake = Faker("en_US")
    fake.seed_instance(seed)
    rng = np.random.default_rng(seed)
    people = [(fake.name(), fake.email(), fake.numerify("+1-###-###-####")) for _ in range(min(rows, 5000))]
    pick = rng.integers(0, len(people), rows)
    notes = np.array(["No remarks.", "Follow-up next week.", "{name} called from {phone}.", "Mail {email} the results."])
    frame = pd.DataFrame({
        "subject_id": [f"MRN-{i:07d}" for i in rng.integers(0, 10**7, rows)],
        "name": [people[i][0] for i in pick],
        "email": [people[i][1] for i in pick],
        "phone": [people[i][2] for i in pick],
        "date_of_birth": pd.to_datetime(rng.integers(-10000, 15000, rows), unit="D").strftime("%Y-%m-%d"),
        "age": rng.integers(1, 100, rows).astype(str),
        "zip": [f"{z:05d}" for z in rng.integers(0, 99999, rows)],
        "grade": rng.choice(["a", "b", "c"], rows),
    })
    templates = notes[rng.integers(0, len(notes), rows)]
    frame["note"] = [t.format(name=n, phone=p, email=e) for t, n, p, e in
                     zip(templates, frame["name"], frame["phone"], frame["email"], strict=True)]  # fmt: skip
    frame["image"] = [f"img/{i}.png" for i in range(rows)]
    return frame


def throughput(rows: int, columns: list[str]) -> float:
    frame = manifest(rows)
    config = AnonymizeConfig(policy={c: POLICY[c] for c in columns})
    started = time.perf_counter()
    index = identifier_index(v for c in ("subject_id", "name", "email", "phone", "date_of_birth", "image")
                             for v in frame[c].tolist())  # fmt: skip
    out, _ = apply_policy(frame, columns, config, b"benchmark-key", index)
    kept_text = [c for c in columns if config.policy[c].action in ("keep", "generalize_date", "generalize_number",
                                                                    "truncate", "redact_text")]  # fmt: skip
    assert residual_scan(out[kept_text], index) == {}
    return time.perf_counter() - started


def recall(notes: int, seed: int = 1) -> dict:
    fake = Faker("en_US")
    fake.seed_instance(seed)
    planted = {"EMAIL": [], "PHONE": [], "SSN": [], "CARD": [], "IP": [], "NAME (declared)": []}
    redactions, hits = 0, 0
    for _ in range(notes):
        values = {"EMAIL": fake.email(), "PHONE": fake.numerify("+1-###-###-####"), "SSN": fake.ssn(),
                  "CARD": fake.credit_card_number(), "IP": fake.ipv4_public(), "NAME (declared)": fake.name()}  # fmt: skip
        kinds = fake.random_elements(list(values), length=3, unique=True)
        text = " ".join(f"{k.split()[0].lower()}: {values[k]};" for k in kinds) + " see you next week."
        out, found = redact_text(text, [values["NAME (declared)"]])
        redactions += sum(found.values())
        for kind in kinds:
            gone = values[kind] not in out
            planted[kind].append(gone)
            hits += gone
    per_entity = {k: round(float(np.mean(v)), 4) for k, v in planted.items() if v}
    return {"recall": per_entity, "precision": round(hits / max(redactions, 1), 4), "notes": notes}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--small", type=int, default=10_000)
    parser.add_argument("--large", type=int, default=100_000)
    parser.add_argument("--notes", type=int, default=2_000)
    args = parser.parse_args()
    redact_text("warm up: 1.2.3.4", [])  # Presidio's one-off start-up is not throughput
    figures = {}
    for name, columns in (("structured", STRUCTURED), ("all", [*STRUCTURED, "note"])):
        small, large = throughput(args.small, columns), throughput(args.large, columns)
        figures[name] = {"small_rows": args.small, "small_s": round(small, 3), "small_rows_per_s": round(args.small / small),
                         "large_rows": args.large, "large_s": round(large, 3), "large_rows_per_s": round(args.large / large),
                         "growth": round(large / small, 2)}  # fmt: skip
        print(f"{name}: {args.small} rows {small:.2f}s ({args.small / small:,.0f}/s), "
              f"{args.large} rows {large:.2f}s ({args.large / large:,.0f}/s), growth {large / small:.2f}")  # fmt: skip
    quality = recall(args.notes)
    print(f"recall {quality['recall']}  precision {quality['precision']}")
    rate = figures["structured"]["large_rows_per_s"]
    print(json.dumps({"name": "anonymize_structured_rows_per_s", "ratio": round(rate / 100_000, 3),
                      "goal": ">= 1.0 (100,000 rows/s); growth <= 12; recall >= 0.95 (patterns), 1.0 (declared)",
                      **figures, **quality, "cpus": os.cpu_count()}))  # fmt: skip


if __name__ == "__main__":
    re.purge()
    main()
