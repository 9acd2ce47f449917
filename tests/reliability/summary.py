"""The reliability figures (issue 9) from a test run's JUnit report: scenarios run and passed by
category. `.ci/run` writes the report; afterwards:

    .venv/bin/python -m tests.reliability.summary test-artifacts/junit.xml

A scenario is one test case (each parametrized case counts; a hypothesis test counts once however
many examples it drew). The last line is JSON.
"""

from __future__ import annotations

import json
import sys
import xml.etree.ElementTree as ET
from collections import defaultdict

# category -> (module, test name prefix or "" for the whole module)
CATEGORIES: dict[str, list[tuple[str, str]]] = {
    "load": [("tests.reliability.test_load", "")],
    "faults": [("tests.reliability.test_faults", ""), ("tests.unit.test_provenance", "test_reconcile"),
               ("tests.unit.test_provenance", "test_an_unreachable_tracking_server")],
    "hostile input": [("tests.reliability.test_hostile_input", "")],
    "access": [("tests.reliability.test_access_control", "")],
    "reproducibility": [("tests.reliability.test_reproducibility", "")],
    "privacy canary scan": [("tests.reliability.test_load", "test_four_runs"), ("tests.reliability.test_faults", ""),
                            ("tests.flows.test_training_pipeline", "test_canaries")],
}  # fmt: skip


def outcome(case: ET.Element) -> str:
    for tag in ("failure", "error", "skipped"):
        if case.find(tag) is not None:
            return tag
    return "passed"


def figures(report: str) -> dict[str, dict[str, int]]:
    cases = ET.parse(report).getroot().iter("testcase")
    counts: dict[str, dict[str, int]] = {c: defaultdict(int) for c in CATEGORIES}
    for case in cases:
        module, name = case.get("classname", ""), case.get("name", "")
        for category, members in CATEGORIES.items():
            if any(module == m and name.startswith(prefix) for m, prefix in members):
                counts[category]["run"] += 1
                counts[category][outcome(case)] += 1
    return {c: {"run": v["run"], "passed": v["passed"], "failed": v["failure"] + v["error"], "skipped": v["skipped"]}
            for c, v in counts.items()}  # fmt: skip


def main() -> None:
    table = figures(sys.argv[1] if len(sys.argv) > 1 else "test-artifacts/junit.xml")
    print(f"{'category':<22}{'run':>6}{'passed':>8}{'failed':>8}{'skipped':>9}")
    for category, row in table.items():
        print(f"{category:<22}{row['run']:>6}{row['passed']:>8}{row['failed']:>8}{row['skipped']:>9}")
    print(json.dumps({"reliability": table}))


if __name__ == "__main__":
    main()
