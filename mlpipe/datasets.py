"""Datasets beyond the embedded sample, written deterministically (per seed) in the sample's layout:
`manifest.csv` with personal data, subjects and annotator columns, and `images/` of PNG files.

- variants of the sample (`mlpipe.sample.write_digits`): upscaled to N px, long-tailed, and
  labelled by noisier annotators; they keep the sample's columns, so the default config runs
  them with at most `ingest.image_size` changed;
- real photos: Fashion-MNIST from Debian's `dataset-fashion-mnist` package (IDX files), a
  balanced or a long-tailed subset, labelled by two taggers; `FASHION_OVERRIDES` is what the
  default config needs changed to run it.

The model-quality benchmark (benchmarks/model_quality.py) and the tests write their data here.
"""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
from faker import Faker
from PIL import Image

from mlpipe.config import PERSONAL_DATA_POLICY
from mlpipe.sample import NOTE_TEMPLATES, PERSONAL_COLUMNS, Votes, assign_subjects, fake_person, write_digits

# --- the sample's variants ------------------------------------------------------------------------

LONG_TAIL_RAREST = 0.05
# Share of each digit's scans kept: geometric from all of digit 0 down to 5% for digit 9.
LONG_TAIL_KEEP = tuple(float(k) for k in np.geomspace(1.0, LONG_TAIL_RAREST, 10))
# About 40% of labelled items with a dissent (the sample: 10%), 5% three-way splits (to review) and
# 3% wrong majorities (label noise in every split, test included).
NOISY_VOTES = Votes(unlabelled=0.025, three_way=0.05, wrong_majority=0.03, one_dissent=0.30)


def write_digits_upscaled(root: str | Path, size: int, resampling: Literal["nearest", "bilinear"], seed: int = 0) -> Path:
    """The sample with its 8x8 scans upscaled to `size` x `size` (nearest or bilinear)."""
    return write_digits(root, seed=seed, size=size, resampling=resampling)


def write_digits_long_tailed(root: str | Path, seed: int = 0) -> Path:
    """The sample with a long tail: digit d keeps `LONG_TAIL_KEEP[d]` of its scans (the rarest,
    digit 9, about 9 scans: 5% of digit 0's 178)."""
    return write_digits(root, seed=seed, keep=LONG_TAIL_KEEP)


def write_digits_noisy(root: str | Path, seed: int = 0) -> Path:
    """The sample labelled by annotators who disagree about four times as often (`NOISY_VOTES`)."""
    return write_digits(root, seed=seed, votes=NOISY_VOTES)


# --- Fashion-MNIST ---------------------------------------------------------------------------------

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")  # Debian's dataset-fashion-mnist
FASHION_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
# Fashion-MNIST's ten classes in label order, spelled to be safe in file names and configs.
FASHION_CLASSES = ("t-shirt_top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle_boot")
TAGGERS = ("tagger_1", "tagger_2")
TAGGER_DISAGREEMENT = 0.03  # tagger_2 picks another class on 3% of items: a 1-1 tie, so review
FASHION_OVERRIDES: dict[str, Any] = {
    "ingest.image_size": 28,
    "label.columns": list(TAGGERS),
    "anonymize.policy": {**PERSONAL_DATA_POLICY, **{t: "keep" for t in TAGGERS}},
}

# IDX type codes (the third byte of the magic number) and their big-endian numpy types.
_IDX_TYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | Path) -> np.ndarray:
    """An IDX file (gzip-compressed or not) as an array: magic 0x0000 <type> <ndim>, then ndim
    big-endian uint32 sizes, then the values in C order."""
    path = Path(path)
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_TYPES:
        raise ValueError(f"{path.name} is not an IDX file (magic {raw[:4].hex()})")
    dtype, ndim = np.dtype(_IDX_TYPES[raw[2]]), raw[3]
    shape = tuple(int(d) for d in np.frombuffer(raw, ">u4", count=ndim, offset=4))
    offset, expected = 4 + 4 * ndim, int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) - offset != expected:
        raise ValueError(f"{path.name}: shape {shape} needs {expected} bytes of data, the file has {len(raw) - offset}")
    return np.frombuffer(raw, dtype, offset=offset).reshape(shape).astype(dtype.newbyteorder("="))


def load_fashion_mnist(part: Literal["train", "test"] = "train", directory: str | Path = FASHION_MNIST_DIR) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [n, 28, 28], labels uint8 [n]) of one part of Fashion-MNIST."""
    directory = Path(directory)
    images_file, labels_file = (directory / f for f in FASHION_FILES[part])
    if not images_file.is_file() or not labels_file.is_file():
        raise FileNotFoundError(
            f"Fashion-MNIST is not in {directory}: apt-get install dataset-fashion-mnist (Debian), or `make system-packages`"
        )
    images, labels = read_idx(images_file), read_idx(labels_file)
    if images.ndim != 3 or labels.shape != images.shape[:1]:
        raise ValueError(f"Fashion-MNIST in {directory}: images {images.shape} and labels {labels.shape} do not match")
    return images, labels


def class_counts(n: int, profile: Literal["balanced", "long_tailed"], classes: int = 10, rarest: float = LONG_TAIL_RAREST) -> list[int]:
    """Items per class summing to `n`: equal (balanced) or geometric from the largest class down
    to `rarest` of it (long_tailed); largest remainders get the rounding."""
    weights = np.ones(classes) if profile == "balanced" else np.geomspace(1.0, rarest, classes)
    exact = n * weights / weights.sum()
    counts = np.floor(exact).astype(int)
    counts[np.argsort(-(exact - counts), kind="stable")[: n - counts.sum()]] += 1
    return counts.tolist()


def write_fashion_mnist(
    root: str | Path,
    n: int,
    profile: Literal["balanced", "long_tailed"] = "balanced",
    seed: int = 0,
    directory: str | Path = FASHION_MNIST_DIR,
) -> Path:
    """`n` Fashion-MNIST photos (from the training part) as PNGs under `root/images/` and a
    manifest: the sample's personal columns (a customer with 1-7 photos is the subject), and two
    taggers, the second disagreeing on `TAGGER_DISAGREEMENT` of items. Long-tailed: class counts
    from `class_counts`, the classes ranked by a seeded permutation (which class is rare depends
    on the seed). `root` is created, or replaced if it exists."""
    images, labels = load_fashion_mnist("train", directory)
    rng = np.random.default_rng(seed)
    counts = class_counts(n, profile)
    order = rng.permutation(len(FASHION_CLASSES))  # order[0] gets counts[0], the largest
    short = [f"{FASHION_CLASSES[k]} needs {c}, has {np.sum(labels == k)}" for k, c in zip(order, counts, strict=True)
             if np.sum(labels == k) < c]  # fmt: skip
    if short:
        raise ValueError(f"too few Fashion-MNIST images for {n} {profile}: {'; '.join(short)}")
    chosen = np.concatenate([
        rng.choice(np.flatnonzero(labels == k), size=count, replace=False)
        for k, count in zip(order, counts, strict=True)
    ])  # fmt: skip
    chosen = rng.permutation(chosen)

    root = Path(root)
    if root.exists():
        shutil.rmtree(root)
    (root / "images").mkdir(parents=True)
    fake = Faker("en_US")
    fake.seed_instance(seed)
    subject_of = assign_subjects(len(chosen), rng)
    people = [fake_person(fake) for _ in range(subject_of.max() + 1)]
    rows = []
    for i, idx in enumerate(chosen):
        person = people[subject_of[i]]
        file_name = f"images/{person['name'].replace(' ', '_')}_{i:05d}.png"
        Image.fromarray(images[idx], mode="L").save(root / file_name)
        truth = FASHION_CLASSES[labels[idx]]
        second = truth
        if rng.random() < TAGGER_DISAGREEMENT:
            second = FASHION_CLASSES[rng.choice([c for c in range(len(FASHION_CLASSES)) if c != labels[idx]])]
        rows.append({
            "image": file_name,
            "subject_id": person["subject_id"],
            **{k: person[k] for k in PERSONAL_COLUMNS},
            "note": NOTE_TEMPLATES[rng.integers(len(NOTE_TEMPLATES))].format(**person),
            TAGGERS[0]: truth,
            TAGGERS[1]: second,
        })  # fmt: skip
    pd.DataFrame(rows).to_csv(root / "manifest.csv", index=False)
    return root
