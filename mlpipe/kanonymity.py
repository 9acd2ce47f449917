"""k-anonymity over quasi-identifiers: local (cell) suppression, or record suppression.

`local_suppression` follows sdcMicro's `localSuppression` (Templ, Kowarik & Meindl, "Statistical
Disclosure Control for Micro-Data Using the R Package sdcMicro", J. Stat. Softw. 67(4), 2015,
doi:10.18637/jss.v067.i04; the sdcMicro manual, `localSuppression`): records in equivalence
classes smaller than k get single quasi-identifier cells suppressed, one per record per pass,
chosen by the variables' importance (by default the variable with the most distinct values goes
first), until every class holds at least k records. The row itself (its image, label, group and
every other column) stays. `record_suppression` is the blunt alternative: such rows are removed.

Semantics of a suppressed cell. sdcMicro counts a suppressed (NA) key value as a wildcard that
matches any value, in both directions (its `freqCalc`). Here a suppressed cell is the value
SUPPRESSED = "*", a category of its own, and records are in the same equivalence class only when
their released quasi-identifier values are identical (the definition of the combinatorial
k-anonymity problem with entry suppression: Meyerson & Williams, "On the complexity of optimal
k-anonymity", PODS 2004). Why, although it costs more suppressions than the wildcard:

- It is sound against the prosecutor attack k-anonymity guards against: every record in a
  record's released class agrees with that record's true values wherever it is not "*", so an
  attacker who knows the person's true quasi-identifiers always faces at least k candidates. The
  wildcard count can overstate this for the suppressed record itself: with (1950, 123) released as
  (1950, *) next to four (1950, 456), sdcMicro counts 5, but someone who knows "1950, zip 123"
  finds exactly one candidate, the suppressed row.
- It is an equivalence relation ("matches a wildcard" is not transitive), so "the smallest
  equivalence class" is well defined and `k_of` is one group-by over the released frame, with no
  access to the original values needed to check a result.

The price is that fully suppressed records form a class of their own, (*, ..., *), which must hold
k records too; when the greedy passes leave it with 1..k-1 records, the records with the fewest
remaining values are taken from classes with more than k records (or, failing that, one whole
class) and suppressed fully. A NaN/None is an ordinary value here (all missing values of a column
alike), and so is "": only "*" means suppressed; a "*" already in the input counts as suppressed.
"""

from __future__ import annotations

import operator
from dataclasses import asdict, dataclass, field

import numpy as np
import pandas as pd

SUPPRESSED = "*"
_STAR = -1  # the code of a suppressed cell in the code matrix


@dataclass
class SuppressionReport:
    """What a suppression did. JSON-able through `to_dict`.

    method: "cells" (local suppression) or "records" (rows removed). k_achieved: the smallest
    equivalence class of the result (`k_of`): None without quasi-identifiers, 0 with no rows.
    k_reached: every remaining row is in a class of at least k (true without rows or without
    quasi-identifiers; false only when the frame has fewer than k rows and every cell was
    suppressed). cells_suppressed: per quasi-identifier, the cells this call set to "*" (for
    "records": the quasi-identifier cells of the removed rows). cells_suppressed_share: of all
    quasi-identifier cells. rows_all_suppressed: rows whose every quasi-identifier is now "*".
    entropy_loss: per column, the share of the column's information lost (see `entropy_loss`);
    entropy_loss_total: the same over all quasi-identifier columns together.
    """

    method: str
    k: int
    quasi: list[str]
    importance: list[str]  # the order used, most important first ("cells" only)
    k_achieved: int | None
    k_reached: bool
    rows_in: int
    rows_kept: int
    rows_suppressed: int
    rows_all_suppressed: int
    cells_suppressed: dict[str, int] = field(default_factory=dict)
    cells_suppressed_total: int = 0
    cells_suppressed_share: float = 0.0
    entropy_loss: dict[str, float] = field(default_factory=dict)
    entropy_loss_total: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


def _check(frame: pd.DataFrame, quasi: list[str], k: int) -> int:
    try:
        if isinstance(k, bool):
            raise TypeError
        k = operator.index(k)
    except TypeError:
        raise ValueError(f"k must be an integer >= 1, not {k!r}") from None
    if k < 1:
        raise ValueError(f"k must be an integer >= 1, not {k!r}")
    if len(set(quasi)) != len(quasi):
        raise ValueError(f"quasi-identifiers named twice: {quasi}")
    missing = [c for c in quasi if c not in frame.columns]
    if missing:
        raise KeyError(f"quasi-identifier column(s) not in the frame: {', '.join(map(str, missing))}")
    return k


def _codes(frame: pd.DataFrame, quasi: list[str]) -> np.ndarray:
    """(rows, len(quasi)) int64: each column's values as codes, every missing value one code,
    "*" as _STAR."""
    out = np.empty((len(frame), len(quasi)), dtype=np.int64)
    for j, column in enumerate(quasi):
        values = frame[column].to_numpy(dtype=object)
        out[:, j] = pd.factorize(values, use_na_sentinel=False)[0]
        out[values == SUPPRESSED, j] = _STAR
    return out


def _dense(codes: np.ndarray) -> np.ndarray:
    """One id per row, equal exactly when the rows are equal, in 0..rows-1 (a column at a time,
    re-densified after each, so that it never overflows)."""
    key = np.zeros(len(codes), dtype=np.int64)
    for j in range(codes.shape[1]):
        column = codes[:, j] - _STAR  # >= 0
        key = pd.factorize(key * (int(column.max(initial=0)) + 1) + column)[0]
    return key


def k_of(frame: pd.DataFrame, quasi: list[str]) -> int | None:
    """The k the frame achieves: the size of its smallest equivalence class over `quasi`.

    Classes are rows with identical values in every quasi-identifier, "*" being a value of its own
    and all missing values (NaN, None) of a column one value (the module docstring says why, not
    sdcMicro's wildcard). None without quasi-identifiers; 0 for a frame without rows. KeyError
    for a quasi-identifier that is not a column.
    """
    if not quasi:
        return None
    _check(frame, quasi, 1)
    if frame.empty:
        return 0
    return int(np.bincount(_dense(_codes(frame, quasi))).min())


def _default_importance(codes: np.ndarray, quasi: list[str]) -> list[str]:
    """Most important first: fewer distinct values = more important (ties: the order of quasi)."""
    distinct = [len(np.unique(codes[:, j])) for j in range(len(quasi))]
    return [quasi[j] for j in sorted(range(len(quasi)), key=lambda j: (distinct[j], j))]


def _first_rows(ids: np.ndarray, groups: int) -> np.ndarray:
    """For each class id 0..groups-1, the position of its first row."""
    first = np.empty(groups, dtype=np.int64)
    first[ids[::-1]] = np.arange(len(ids))[::-1]
    return first


def _choose(reps: np.ndarray, sizes: np.ndarray, kept: np.ndarray, kept_sizes: np.ndarray, k: int,
            priority: np.ndarray) -> np.ndarray:  # fmt: skip
    """For each violating class (its values `reps`, its `sizes`), the column to suppress.

    `kept`: the classes that are not violating (they stay where they are), with `kept_sizes`.
    `priority[j]`: higher = suppressed sooner (less important). A column is a candidate when it is
    not suppressed yet. The class moves to its values with that column "*"; the pool there is the
    kept class already there plus every violating class that can move there. First choice, per
    class: a column whose pool reaches k (least important first), else the column with the largest
    pool (then least important). Then, up to len(priority) times, a class whose chosen pool falls
    short of k switches to a column whose pool (as chosen by the others) already holds k.
    """
    m, q = reps.shape
    targets = np.repeat(reps[None, :, :], q, axis=0)  # (q, m, q): target j = reps with column j suppressed
    targets[np.arange(q), :, np.arange(q)] = _STAR
    valid = (reps != _STAR).T  # (q, m)
    keys = _dense(np.concatenate([kept, targets.reshape(q * m, q)]))
    kept_keys, keys = keys[: len(kept)], keys[len(kept) :].reshape(q, m)
    there = np.bincount(kept_keys, weights=kept_sizes, minlength=len(kept) + q * m)
    weights = np.where(valid, sizes[None, :], 0)
    pooled = there[keys] + np.bincount(keys.ravel(), weights=weights.ravel(), minlength=len(there))[keys]
    fixes = valid & (pooled >= k)
    rank = priority[:, None]  # (q, 1)
    top = float(kept_sizes.sum() + sizes.sum() + 1)  # above any pool: the two tiers never overlap
    score = np.where(fixes, q * top + rank, pooled * q + rank)  # exact in float64 below 2**53
    score = np.where(valid, score, -1.0)
    choice = score.argmax(axis=0)
    columns = np.arange(m)
    for _ in range(q):
        chosen = keys[choice, columns]
        pool = there + np.bincount(chosen, weights=sizes, minlength=len(there))
        short = pool[chosen] < k
        if not short.any():
            break
        joinable = valid & (pool[keys] >= k) & short[None, :]  # a pool that holds k without this class
        switch = joinable.any(axis=0)
        if not switch.any():
            break
        best = np.where(joinable, rank, -1).argmax(axis=0)
        choice = np.where(switch, best, choice)
    return choice


def _fill_all_suppressed(codes: np.ndarray, k: int) -> None:
    """Give the fully suppressed class k records, in place, when it has 1..k-1.

    Takes records with the fewest remaining values from classes with more than k records (never
    below k), or, when those surpluses are too small, one whole class (the fewest values lost).
    With fewer than k rows in all, everything is already suppressed and nothing can help.
    """
    full = (codes == _STAR).all(axis=1)
    need = k - int(full.sum())
    if need <= 0 or need == k:
        return
    ids = _dense(codes)
    sizes = np.bincount(ids)
    first = _first_rows(ids, len(sizes))
    others = np.flatnonzero(~full[first])
    if len(others) == 0:
        return
    cost = (codes[first[others]] != _STAR).sum(axis=1)  # cells lost per record taken
    surplus = sizes[others] - k
    if surplus.sum() >= need:
        givers = surplus > 0
        for c in others[givers][np.lexsort((-surplus[givers], cost[givers]))]:  # at most k - 1 of them give
            take = min(need, int(sizes[c] - k))
            codes[np.flatnonzero(ids == c)[-take:]] = _STAR
            need -= take
            if need == 0:
                break
    else:
        c = others[np.lexsort((sizes[others], cost * sizes[others]))[0]]
        codes[ids == c] = _STAR


def entropy_loss(original: np.ndarray, lost: np.ndarray) -> tuple[float, float]:
    """(bits lost, bits in the column) for one column's codes and the mask of its lost cells.

    The entropy-based information loss (EBIL) for categorical data used to compare SDC methods by
    Domingo-Ferrer & Torra ("Disclosure control methods and information loss for microdata", in
    Confidentiality, Disclosure and Data Access, 2001), after Kooiman, Willenborg & Gouweleeuw's
    PRAM paper (Statistics Netherlands, 1997): EBIL = -sum_i log2 P(V = v_i | V' = v'_i), V the
    original column, V' the released one. A kept cell costs nothing; for a suppressed cell we take
    P(V = v | V' = "*") as the column's distribution before suppression (what a user of the
    released data can best assume), so it costs -log2 p(v_i), the surprisal of the value lost.
    Suppressing every cell costs n * H(V), the column's Shannon entropy before, so
    bits lost / bits in the column is the fraction of the column's information lost: 0 with
    nothing suppressed, 1 with everything; rare values (the ones suppressed) weigh more than a
    plain count of cells. A constant column (H = 0) carries no information and loses none.
    """
    n = len(original)
    if n == 0:
        return 0.0, 0.0
    counts = np.bincount(original - _STAR)
    surprisal = -np.log2(counts[original - _STAR] / n)
    return float(surprisal[lost].sum()), float(surprisal.sum())


def _report(method: str, k: int, quasi: list[str], importance: list[str], codes: np.ndarray, lost: np.ndarray,
            rows_kept: int, k_achieved: int | None) -> SuppressionReport:  # fmt: skip
    n, q = codes.shape
    per_column = {c: int(lost[:, j].sum()) for j, c in enumerate(quasi)}
    bits = [entropy_loss(codes[:, j], lost[:, j]) for j in range(q)]
    total = sum(per_column.values())
    return SuppressionReport(
        method=method, k=k, quasi=list(quasi), importance=importance, k_achieved=k_achieved,
        k_reached=k_achieved is None or rows_kept == 0 or k_achieved >= k,
        rows_in=n, rows_kept=rows_kept, rows_suppressed=n - rows_kept,
        rows_all_suppressed=0, cells_suppressed=per_column, cells_suppressed_total=total,
        cells_suppressed_share=total / (n * q) if n * q else 0.0,
        entropy_loss={c: (b / h if h else 0.0) for c, (b, h) in zip(quasi, bits, strict=True)},
        entropy_loss_total=(sum(b for b, _ in bits) / sum(h for _, h in bits)) if sum(h for _, h in bits) else 0.0,
    )  # fmt: skip


def local_suppression(
    frame: pd.DataFrame, quasi: list[str], k: int, importance: list[str] | None = None
) -> tuple[pd.DataFrame, SuppressionReport]:
    """k-anonymity by suppressing quasi-identifier cells, never rows (sdcMicro's localSuppression).

    frame: any rows and columns; quasi: the quasi-identifier columns; k >= 1; importance: the
    quasi-identifiers, most important (suppressed last) first; by default the fewer distinct
    values a column has, the more important it is, as in sdcMicro: the column with the most
    distinct values splits the records into the most small classes, so suppressing it merges the
    most records per suppressed cell (pass `importance` where a many-valued column matters more).

    Returns (frame, report): a copy with the same rows, index and columns, where some
    quasi-identifier cells are SUPPRESSED ("*"; such a column becomes object dtype unless it holds
    strings or categories already) and every other column is untouched; `k_of(result, quasi) >= k`
    unless the frame has fewer than k rows (then every quasi-identifier cell is "*" and
    report.k_reached is false).

    The greedy pass (module docstring for the semantics): every record in a class smaller than k
    gets one more cell suppressed, the same column for the whole class; see `_choose` for the rule
    (a column that lets the class reach k first, least important first; the cost, one cell per
    record, is the same for every column). Each pass suppresses one more cell of every violating
    record and a record in a class of k or more never leaves it, so after at most len(quasi)
    passes the only class that can be short is the fully suppressed one, which then gets k records
    (`_fill_all_suppressed`). Vectorized: a pass is a few group-bys over the rows.

    Errors: ValueError for k < 1 or not an integer, a quasi-identifier named twice, or an
    importance that is not an ordering of quasi; KeyError for a quasi-identifier not in the frame.
    """
    k = _check(frame, quasi, k)
    if importance is not None and (set(importance) != set(quasi) or len(importance) != len(quasi)):
        raise ValueError(f"importance {importance} must order exactly the quasi-identifiers {quasi}")
    if not quasi:
        return frame.copy(), SuppressionReport("cells", k, [], [], None, True, len(frame), len(frame), 0, 0)
    original = _codes(frame, quasi)
    order = list(importance) if importance is not None else _default_importance(original, quasi)
    priority = np.array([order.index(c) for c in quasi], dtype=float)  # less important = higher
    codes = original.copy()
    n, q = codes.shape
    for _ in range(q + 1):
        ids = _dense(codes)
        sizes = np.bincount(ids, minlength=1)
        violating = (sizes[ids] < k) & (codes != _STAR).any(axis=1)
        if not violating.any():
            break
        first = _first_rows(ids, len(sizes))
        bad = np.unique(ids[violating])
        good = np.setdiff1d(np.arange(len(sizes)), bad)
        choice = _choose(codes[first[bad]], sizes[bad].astype(float), codes[first[good]], sizes[good].astype(float), k,
                         priority)  # fmt: skip
        position = np.full(len(sizes), -1)
        position[bad] = np.arange(len(bad))
        rows = np.flatnonzero(violating)
        codes[rows, choice[position[ids[rows]]]] = _STAR
    else:  # pragma: no cover - a violating record gains a "*" every pass, so q passes suffice
        raise AssertionError("local suppression did not converge")
    _fill_all_suppressed(codes, k)
    lost = (codes == _STAR) & (original != _STAR)
    out = frame.copy()
    for j, column in enumerate(quasi):
        if lost[:, j].any():
            values = out[column]
            if isinstance(values.dtype, pd.CategoricalDtype) and SUPPRESSED not in values.cat.categories:
                values = values.cat.add_categories([SUPPRESSED])
            out[column] = values.mask(lost[:, j], SUPPRESSED)
    achieved = int(np.bincount(_dense(codes)).min()) if n else 0
    report = _report("cells", k, quasi, order, original, lost, n, achieved)
    report.rows_all_suppressed = int((codes == _STAR).all(axis=1).sum())
    return out, report


def record_suppression(frame: pd.DataFrame, quasi: list[str], k: int) -> tuple[pd.DataFrame, SuppressionReport]:
    """k-anonymity by removing every row whose class (`k_of`'s semantics) has fewer than k rows.

    Returns (kept rows, report), the kept rows in their order with their index. What
    mlpipe.anonymize.k_anonymize did: k_achieved is the smallest class kept, 0 when no row is kept,
    None without quasi-identifiers. Every quasi-identifier cell of a removed row counts as
    suppressed in the report. Errors as `local_suppression`.
    """
    k = _check(frame, quasi, k)
    if not quasi:
        return frame.copy(), SuppressionReport("records", k, [], [], None, True, len(frame), len(frame), 0, 0)
    codes = _codes(frame, quasi)
    ids = _dense(codes)
    sizes = np.bincount(ids, minlength=1)[ids]
    keep = sizes >= k
    achieved = int(sizes[keep].min()) if keep.any() else 0
    lost = np.repeat(~keep[:, None], len(quasi), axis=1)
    return frame[keep].copy(), _report("records", k, quasi, [], codes, lost, int(keep.sum()), achieved)
