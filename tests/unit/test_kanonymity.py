"""mlpipe.kanonymity: local (cell) suppression keeps every row and reaches k; record suppression
removes rows; k_of counts "*" as a value of its own; the report says exactly what changed."""

import importlib.util
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mlpipe.kanonymity import SUPPRESSED, k_of, local_suppression, record_suppression

ROOT = Path(__file__).resolve().parents[2]
QUASI = ["year_of_birth", "zip3"]


@pytest.fixture(scope="module")
def bench():
    """benchmarks/kanonymity.py: its generated 1,200-row case is the one tested here."""
    spec = importlib.util.spec_from_file_location("kanonymity_bench", ROOT / "benchmarks" / "kanonymity.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["kanonymity_bench"] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def people(bench):
    frame = bench.people(1200, seed=0)
    assert len(frame) == 1200 and frame["year_of_birth"].astype(int).between(1930, 2005).all()
    assert frame["zip3"].str.fullmatch(r"\d{3}").all() and frame["zip3"].nunique() > 10
    return frame


def _changed(before: pd.DataFrame, after: pd.DataFrame) -> pd.DataFrame:
    """Cell by cell: True where the value differs (NaN equal to NaN)."""
    return ~((before == after) | (before.isna() & after.isna()))


def test_cell_suppression_keeps_all_1200_rows_and_reaches_k_where_record_suppression_drops_rows(people):
    out, report = local_suppression(people, QUASI, 5)
    assert len(out) == 1200 and out.index.equals(people.index) and list(out.columns) == list(people.columns)
    assert k_of(people, QUASI) < 5 <= k_of(out, QUASI) == report.k_achieved
    assert (report.method, report.rows_in, report.rows_kept, report.rows_suppressed) == ("cells", 1200, 1200, 0)
    assert report.k_reached and 0 < report.cells_suppressed_total < 1200

    kept, records = record_suppression(people, QUASI, 5)
    assert 0 < records.rows_suppressed == 1200 - len(kept) and records.rows_kept == len(kept) < 1200
    assert k_of(kept, QUASI) == records.k_achieved >= 5 and records.method == "records"
    assert kept.index.isin(people.index).all() and kept.equals(people.loc[kept.index])
    # fewer quasi-identifier cells lost than record suppression loses with its rows
    assert report.cells_suppressed_total < records.cells_suppressed_total == 2 * records.rows_suppressed
    assert report.entropy_loss_total < records.entropy_loss_total


def test_only_quasi_identifier_cells_change_to_the_marker_and_exactly_the_reported_ones(people):
    out, report = local_suppression(people, QUASI, 5)
    changed = _changed(people, out)
    assert not changed.drop(columns=QUASI).to_numpy().any()  # image, label, group untouched
    assert (out[QUASI].to_numpy()[changed[QUASI].to_numpy()] == SUPPRESSED).all()
    assert report.cells_suppressed == {c: int(changed[c].sum()) for c in QUASI}
    assert report.cells_suppressed_total == int(changed[QUASI].to_numpy().sum())
    assert report.cells_suppressed_share == pytest.approx(report.cells_suppressed_total / (2 * 1200))
    assert report.rows_all_suppressed == int(changed[QUASI].all(axis=1).sum())
    # only rows that were in a class smaller than k lost anything (no donor rows were needed here)
    sizes = people.groupby(QUASI)[QUASI[0]].transform("size")
    assert not changed[QUASI].any(axis=1)[sizes >= 5].any()


def test_k_of_counts_a_suppressed_cell_as_a_value_of_its_own_not_as_a_wildcard():
    frame = pd.DataFrame({"y": ["1950"] * 5, "z": ["*", "456", "456", "456", "456"]})
    assert k_of(frame, ["y", "z"]) == 1  # sdcMicro's wildcard count would say 5
    frame = pd.DataFrame({"y": ["1950", "1950", np.nan, None, ""], "z": ["*", "*", "1", "1", "1"]})
    assert k_of(frame, ["y", "z"]) == 1  # "" is a value, not a suppression, and not a missing value
    assert k_of(frame.iloc[:4], ["y", "z"]) == 2  # NaN and None: one missing value
    assert k_of(frame, []) is None and k_of(frame.iloc[:0], ["y"]) == 0
    random = pd.DataFrame(np.random.default_rng(3).integers(0, 3, (40, 3))).astype(str).replace("0", SUPPRESSED)
    assert k_of(random, [0, 1, 2]) == random.groupby([0, 1, 2]).size().min()


def test_empty_strings_and_missing_values_are_values_not_suppressions():
    frame = pd.DataFrame({"y": [""] * 5 + [np.nan] * 5 + ["1950"] * 5, "z": ["1"] * 15})
    out, report = local_suppression(frame, ["y", "z"], 5)
    assert out.equals(frame) and report.cells_suppressed_total == 0 and report.k_achieved == 5


@pytest.mark.parametrize(("importance", "suppressed"), [(["year", "zip"], "zip"), (["zip", "year"], "year")])
def test_the_less_important_column_is_suppressed_when_either_would_do(importance, suppressed):
    frame = pd.DataFrame([(y, z) for y in "abc" for z in "xyz"], columns=["year", "zip"])  # every row unique
    out, report = local_suppression(frame, ["year", "zip"], 3, importance=importance)
    kept = next(c for c in importance if c != suppressed)
    assert (out[suppressed] == SUPPRESSED).all() and out[kept].equals(frame[kept])
    assert report.cells_suppressed == {suppressed: 9, kept: 0} and report.importance == importance
    assert k_of(out, ["year", "zip"]) == 3


def test_by_default_the_column_with_more_distinct_values_is_suppressed_first():
    frame = pd.DataFrame([(y, z) for y in "abc" for z in "wxyz"], columns=["year", "zip"])
    out, report = local_suppression(frame, ["zip", "year"], 3)
    assert report.importance == ["year", "zip"]  # fewer distinct values = more important
    assert (out["zip"] == SUPPRESSED).all() and out["year"].equals(frame["year"])


def test_a_suppression_that_reaches_k_beats_importance():
    # "a" occurs 4 times, each with its own zip: only suppressing the zip reaches k=3 for them;
    # zip "x" is shared by b, c, d: there suppressing the (less important) year does.
    frame = pd.DataFrame({"year": ["a", "a", "a", "a", "b", "c", "d"], "zip": ["p", "q", "r", "s", "x", "x", "x"]})
    out, report = local_suppression(frame, ["year", "zip"], 3, importance=["zip", "year"])
    assert out["zip"].tolist() == ["*"] * 4 + ["x"] * 3 and out["year"].tolist() == ["a"] * 4 + ["*"] * 3
    assert report.cells_suppressed_total == 7 and report.rows_all_suppressed == 0


def test_a_record_that_fits_nowhere_ends_fully_suppressed_with_records_taken_from_large_classes():
    frame = pd.DataFrame({"y": ["a"] * 4 + ["b"] * 4 + ["c"], "z": ["x"] * 4 + ["y"] * 4 + ["z"], "i": range(9)})
    out, report = local_suppression(frame, ["y", "z"], 3)
    assert k_of(out, ["y", "z"]) == 3 and report.rows_all_suppressed == 3 and len(out) == 9
    assert out.iloc[8][["y", "z"]].tolist() == ["*", "*"] and out["i"].tolist() == list(range(9))
    assert report.cells_suppressed_total == 6
    # classes of exactly k cannot give a record without breaking: one whole class is suppressed
    frame = pd.DataFrame({"y": ["a"] * 3 + ["b"] * 3 + ["c"], "z": ["x"] * 3 + ["y"] * 3 + ["z"]})
    out, report = local_suppression(frame, ["y", "z"], 3)
    assert k_of(out, ["y", "z"]) == 3 and report.rows_all_suppressed == 4 and report.k_reached
    assert out["y"].tolist() == ["*"] * 3 + ["b"] * 3 + ["*"]


def test_fewer_rows_than_k_suppresses_everything_terminates_and_says_so():
    frame = pd.DataFrame({"y": ["1950", "1960", "1970"], "z": ["1", "2", "2"], "label": ["a", "b", "c"]})
    out, report = local_suppression(frame, ["y", "z"], 5)
    assert (out[["y", "z"]] == SUPPRESSED).all().all() and out["label"].equals(frame["label"])
    assert (report.k_achieved, report.k_reached, report.rows_kept) == (3, False, 3)
    assert report.cells_suppressed_share == 1.0 and report.entropy_loss == {"y": 1.0, "z": 1.0}
    kept, records = record_suppression(frame, ["y", "z"], 5)
    assert kept.empty and (records.rows_kept, records.k_achieved) == (0, 0)


def test_no_quasi_identifiers_k_1_and_an_empty_frame_change_nothing(people):
    for out, report in (local_suppression(people, [], 5), record_suppression(people, [], 5)):
        assert out.equals(people) and report.k_achieved is None and report.cells_suppressed_total == 0
    out, report = local_suppression(people, QUASI, 1)
    assert out.equals(people) and report.cells_suppressed_total == 0 and report.entropy_loss_total == 0.0
    assert report.k_achieved == k_of(people, QUASI) >= 1
    empty = people.iloc[:0]
    for out, report in (local_suppression(empty, QUASI, 5), record_suppression(empty, QUASI, 5)):
        assert out.empty and list(out.columns) == list(people.columns) and report.k_achieved == 0
        assert report.cells_suppressed_share == 0.0 and report.k_reached


def test_numeric_and_categorical_columns_and_a_repeated_index():
    frame = pd.DataFrame({"y": [1950, 1950, 1960, 1960, 1970, 1980], "z": pd.Categorical(list("aabbcc"))},
                         index=[0, 0, 1, 1, 2, 2])  # fmt: skip
    out, report = local_suppression(frame, ["y", "z"], 2, importance=["z", "y"])
    assert out["y"].tolist() == [1950, 1950, 1960, 1960, SUPPRESSED, SUPPRESSED] and out["z"].equals(frame["z"])
    assert out.index.equals(frame.index) and report.cells_suppressed == {"y": 2, "z": 0}
    assert frame["y"].dtype == np.int64  # the input is not modified
    frame = frame.assign(y=[1950, 1950, 1960, 1960, 1970, 1970], z=pd.Categorical(list("aabbcd")))
    out, report = local_suppression(frame, ["y", "z"], 2, importance=["z", "y"])  # only "z" reaches k
    assert out["z"].tolist() == ["a", "a", "b", "b", SUPPRESSED, SUPPRESSED] and out["y"].equals(frame["y"])
    assert isinstance(out["z"].dtype, pd.CategoricalDtype) and SUPPRESSED not in frame["z"].cat.categories


def test_information_loss_is_zero_without_suppression_and_the_surprisal_share_with():
    frame = pd.DataFrame({"y": ["a", "a", "a", "b", "c"], "z": ["1"] * 5})
    out, report = local_suppression(frame, ["y", "z"], 1)
    assert report.entropy_loss == {"y": 0.0, "z": 0.0} and report.cells_suppressed_share == 0.0
    out, report = local_suppression(frame, ["y", "z"], 2)
    assert out["y"].tolist() == ["a", "a", "a", "*", "*"] and out["z"].equals(frame["z"])
    # the suppressed "b" and "c" carried -log2(1/5) bits each of the column's 3 log2(5/3) + 2 log2(5)
    assert report.entropy_loss["y"] == pytest.approx(2 * math.log2(5) / (3 * math.log2(5 / 3) + 2 * math.log2(5)))
    assert report.entropy_loss["z"] == 0.0 and report.entropy_loss_total == report.entropy_loss["y"] > 0
    assert report.cells_suppressed_share == pytest.approx(2 / 10)
    _, records = record_suppression(frame, ["y", "z"], 2)
    assert records.entropy_loss == report.entropy_loss and records.cells_suppressed == {"y": 2, "z": 2}
    assert records.cells_suppressed_share == pytest.approx(4 / 10)


def test_errors():
    frame = pd.DataFrame({"y": ["a"], "z": ["b"]})
    for k in (0, -1, 2.5, "5", True):
        with pytest.raises(ValueError, match="k must be"):
            local_suppression(frame, ["y"], k)
    with pytest.raises(KeyError, match="nope"):
        record_suppression(frame, ["y", "nope"], 2)
    with pytest.raises(ValueError, match="twice"):
        local_suppression(frame, ["y", "y"], 2)
    with pytest.raises(ValueError, match="importance"):
        local_suppression(frame, ["y", "z"], 2, importance=["y"])
    with pytest.raises(KeyError):
        k_of(frame, ["nope"])


def test_report_is_json_and_record_suppression_is_the_former_row_suppression(people):
    for function in (local_suppression, record_suppression):
        report = function(people, QUASI, 5)[1].to_dict()
        assert json.loads(json.dumps(report)) == report
    kept, report = record_suppression(people, QUASI, 5)
    sizes = people.groupby(QUASI, dropna=False)[QUASI[0]].transform("size")  # anonymize.k_anonymize did this
    assert kept.equals(people[sizes >= 5])
    assert (report.rows_suppressed, report.k_achieved) == (int((sizes < 5).sum()), int(sizes[sizes >= 5].min()))


def test_fast_enough(bench):
    frame = bench.people(1200, seed=0)
    started = time.perf_counter()
    local_suppression(frame, QUASI, 5)
    assert time.perf_counter() - started < 0.5
    large = bench.people(100_000, seed=1, zipf=1.0).assign(sex=np.where(np.arange(100_000) % 2, "F", "M"))
    started = time.perf_counter()
    out, report = local_suppression(large, [*QUASI, "sex"], 5)
    assert time.perf_counter() - started < 5 and report.k_achieved >= 5 and len(out) == 100_000


VALUES = st.sampled_from(["1950", "1951", "1960", "", "x", np.nan, SUPPRESSED])  # "*" in the input: already suppressed


@settings(max_examples=150, deadline=None)
@given(
    rows=st.lists(st.tuples(VALUES, VALUES, VALUES), max_size=40),
    width=st.integers(1, 3),
    k=st.integers(1, 6),
    reverse=st.booleans(),
)
def test_property_every_result_is_k_anonymous_with_every_row_kept(rows, width, k, reverse):
    quasi = ["a", "b", "c"][:width]
    frame = pd.DataFrame([r[:width] for r in rows], columns=quasi, index=np.arange(len(rows)) * 7 + 3, dtype=object)
    frame["label"] = np.arange(len(rows))
    importance = quasi[::-1] if reverse else None
    out, report = local_suppression(frame, quasi, k, importance=importance)
    assert len(out) == len(frame) and out.index.equals(frame.index) and out["label"].equals(frame["label"])
    changed = _changed(frame, out)
    assert (out.to_numpy()[changed.to_numpy()] == SUPPRESSED).all()
    assert report.cells_suppressed == {c: int(changed[c].sum()) for c in quasi}
    achieved = k_of(out, quasi)
    assert report.k_achieved == achieved
    if len(frame) >= k:
        assert achieved >= k and report.k_reached
    elif len(frame):
        assert (out[quasi] == SUPPRESSED).all().all() and not report.k_reached
    if report.cells_suppressed_total == 0:
        assert report.entropy_loss_total == 0.0 and out.equals(frame)
    else:
        assert report.entropy_loss_total > 0 or all(frame[c].nunique(dropna=False) <= 1 for c in quasi)
    kept, records = record_suppression(frame, quasi, k)
    assert k_of(kept, quasi) == records.k_achieved and (kept.empty or records.k_achieved >= k)
