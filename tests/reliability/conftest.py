"""Reliability tests (issue 9): load, faults, hostile input, access control, reproducibility.
Fixtures shared across these files live here; each file keeps its own otherwise."""
