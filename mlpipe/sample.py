"""`sample://digits`: a realistic private dataset built deterministically from scikit-learn's digits.

Real pixels (8x8 digit scans written as PNG files) behind a manifest that has what real
manifests have: personal data (names, e-mails, phones, dates of birth, a free-text note that
repeats some of them), file names that contain a person's name, subjects with several images,
three annotators who disagree on about 10% of items, unlabelled items, a skewed class mix, and a
few broken rows (a corrupt file, a missing file, a path escaping the root, exact duplicates).
"""

from __future__ import annotations

import datetime
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
from faker import Faker
from PIL import Image
from sklearn.datasets import load_digits

SAMPLE_VERSION = "digits-v1"
ANNOTATORS = ("annotator_1", "annotator_2", "annotator_3")
PERSONAL_COLUMNS = ("name", "email", "phone", "date_of_birth")

# Share of each class kept, by digit: the rarest keeps 22% of the largest.
_KEEP = np.linspace(1.0, 0.22, 10)
NOTE_TEMPLATES = (
    "{name} called from {phone} about the scan.",
    "Results sent to {email}; {name} asked for a copy.",
    "Follow-up requested by {name}.",
    "Patient prefers phone contact: {phone}.",
    "No remarks.",
    "",
)


@dataclass(frozen=True)
class Votes:
    """How the three annotators vote, as shares of all items; the remaining items are unanimous."""

    unlabelled: float = 0.025  # no votes at all
    three_way: float = 0.015  # three different labels: a tie, so review
    wrong_majority: float = 0.0  # two agree on the same wrong label: noise that no vote can undo
    one_dissent: float = 0.08  # one annotator picks a wrong label; the majority is right


def write_sample_digits(root: str | Path, seed: int = 0) -> Path:
    """Write `manifest.csv` and `images/` under `root` (created, or replaced if it exists)."""
    return write_digits(root, seed=seed)


def write_digits(
    root: str | Path,
    seed: int = 0,
    *,
    keep: np.ndarray | tuple[float, ...] = tuple(_KEEP),
    size: int = 8,
    resampling: Literal["nearest", "bilinear"] = "nearest",
    votes: Votes = Votes(),  # noqa: B008 (frozen)
) -> Path:
    """The sample's generator with its knobs: `keep[d]` is the share of digit d's scans kept, the
    scans are upscaled from 8x8 to `size` px with `resampling`, and `votes` sets how the annotators
    disagree. The defaults write the sample itself, byte for byte (the knobs draw no random numbers)."""
    root = Path(root)
    if len(keep) != 10 or not all(0 < k <= 1 for k in keep):
        raise ValueError(f"keep needs ten shares in (0, 1], one per digit (got {list(keep)})")
    if size < 8:
        raise ValueError(f"size is an upscale of the 8x8 scans: at least 8 (got {size})")
    if root.exists():
        shutil.rmtree(root)
    (root / "images").mkdir(parents=True)
    rng = np.random.default_rng(seed)
    fake = Faker("en_US")
    fake.seed_instance(seed)
    method = {"nearest": Image.Resampling.NEAREST, "bilinear": Image.Resampling.BILINEAR}[resampling]

    digits = load_digits()
    keep = np.concatenate([
        rng.permutation(np.flatnonzero(digits.target == k))[: round(keep[k] * np.sum(digits.target == k))]
        for k in range(10)
    ])
    keep = rng.permutation(keep)
    subject_of = assign_subjects(len(keep), rng)
    people = [fake_person(fake) for _ in range(subject_of.max() + 1)]

    rows = []
    for i, idx in enumerate(keep):
        person = people[subject_of[i]]
        file_name = f"images/{person['name'].replace(' ', '_')}_{i:04d}.png"
        pixels = np.round(digits.images[idx] * (255 / 16)).astype(np.uint8)
        image = Image.fromarray(pixels, mode="L")
        (image if size == 8 else image.resize((size, size), method)).save(root / file_name)
        note = NOTE_TEMPLATES[rng.integers(len(NOTE_TEMPLATES))].format(**person)
        rows.append({
            "image": file_name,
            "subject_id": person["subject_id"],
            **{k: person[k] for k in PERSONAL_COLUMNS},
            "note": note,
            **dict(zip(ANNOTATORS, _votes(str(digits.target[idx]), rng, votes), strict=True)),
        })
    rows += _broken_rows(root, rows, rng)
    pd.DataFrame(rows).to_csv(root / "manifest.csv", index=False)
    return root


def assign_subjects(n: int, rng: np.random.Generator) -> np.ndarray:
    """Subjects with 1-7 images each, in shuffled order."""
    sizes = []
    while sum(sizes) < n:
        sizes.append(int(rng.integers(1, 8)))
    subjects = np.repeat(np.arange(len(sizes)), sizes)[:n]
    return rng.permutation(subjects)


def fake_person(fake: Faker) -> dict[str, str]:
    name = f"{fake.first_name()} {fake.last_name()}"
    return {
        "subject_id": f"MRN-{fake.unique.random_number(digits=7, fix_len=True)}",
        "name": name,
        "email": fake.unique.email(),
        "phone": fake.unique.numerify("+1-###-###-####"),
        # between fixed dates, not ages: ages count from today, and the sample must not change at midnight
        "date_of_birth": fake.date_between(datetime.date(1936, 1, 1), datetime.date(2007, 12, 31)).isoformat(),
    }


def _votes(truth: str, rng: np.random.Generator, votes: Votes = Votes()) -> list[str]:  # noqa: B008 (frozen)
    """Three votes; the sample's: 88% unanimous, 8% one dissent, 1.5% a three-way split, 2.5% unlabelled."""
    r = rng.random()
    wrong = [str(d) for d in range(10) if str(d) != truth]
    if r < votes.unlabelled:
        return ["", "", ""]
    if r < votes.unlabelled + votes.three_way:
        a, b = rng.choice(wrong, size=2, replace=False)
        return list(rng.permutation([truth, str(a), str(b)]))
    if r < votes.unlabelled + votes.three_way + votes.wrong_majority:
        bad = str(rng.choice(wrong))
        return list(rng.permutation([bad, bad, truth]))
    out = [truth] * 3
    if r < votes.unlabelled + votes.three_way + votes.wrong_majority + votes.one_dissent:
        out[rng.integers(3)] = str(rng.choice(wrong))
    return out


def _broken_rows(root: Path, rows: list[dict], rng: np.random.Generator) -> list[dict]:
    """What real exports contain: unreadable files, dangling paths, escapes and duplicates."""
    (root / "images" / "corrupt_scan.png").write_bytes(b"\x89PNG\r\n\x1a\n-- truncated --")
    (root / "images" / "empty_scan.png").write_bytes(b"")
    broken = []
    for i, path in enumerate(
        ["images/corrupt_scan.png", "images/empty_scan.png", "images/never_uploaded.png", "../outside_root.png"]
    ):
        broken.append({**rows[i], "image": path})
    for i in rng.choice(len(rows), size=3, replace=False):
        copy = Path(rows[i]["image"]).with_name(f"copy_of_{Path(rows[i]['image']).name}")
        shutil.copyfile(root / rows[i]["image"], root / copy)
        broken.append({**rows[i], "image": copy.as_posix()})
    return broken


def materialize_sample(cache_dir: Path) -> Path:
    """The sample under the state directory, generated once and reused (it is deterministic)."""
    target = cache_dir / SAMPLE_VERSION
    if (target / "manifest.csv").is_file():
        return target
    tmp = cache_dir / f".{SAMPLE_VERSION}.{os.getpid()}"
    write_sample_digits(tmp)
    try:
        tmp.rename(target)
    except OSError:  # another process won the race; its copy is identical
        shutil.rmtree(tmp, ignore_errors=True)
    return target
