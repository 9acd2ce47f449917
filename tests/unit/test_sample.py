import hashlib

import numpy as np
import pandas as pd

from mlpipe.sample import ANNOTATORS, write_sample_digits


def _tree_digest(root):
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        if path.is_file():
            digest.update(path.relative_to(root).as_posix().encode() + path.read_bytes())
    return digest.hexdigest()


def test_sample_is_deterministic(tmp_path, sample_root):
    again = write_sample_digits(tmp_path / "again")
    assert _tree_digest(again) == _tree_digest(sample_root)


def test_sample_has_what_real_manifests_have(sample_root):
    frame = pd.read_csv(sample_root / "manifest.csv", dtype=str, keep_default_na=False)
    assert {"image", "subject_id", "name", "email", "phone", "date_of_birth", "note", *ANNOTATORS} <= set(frame.columns)
    # subjects with several images
    assert frame["subject_id"].value_counts().max() >= 3
    # notes that repeat personal values
    mentions = [n for n, name, phone in zip(frame["note"], frame["name"], frame["phone"], strict=True) if name in n or phone in n]
    assert len(mentions) > 50
    # three annotators who disagree on about 10% of labelled items
    votes = frame[list(ANNOTATORS)]
    labelled = votes.ne("").any(axis=1)
    disagree = votes[labelled].nunique(axis=1).gt(1).mean()
    assert 0.05 <= disagree <= 0.15
    # a skewed class mix: rarest at most a quarter of the largest (majority vote of unanimous items)
    counts = frame.loc[votes.nunique(axis=1).eq(1) & labelled, "annotator_1"].value_counts()
    assert counts.min() <= counts.max() / 4
    # file names carry personal names, as raw exports often do
    assert any(name.replace(" ", "_") in path for name, path in zip(frame["name"], frame["image"], strict=True))


def test_sample_images_are_real_digit_pixels(sample_root):
    from PIL import Image

    frame = pd.read_csv(sample_root / "manifest.csv", dtype=str)
    first = np.asarray(Image.open(sample_root / frame["image"].iloc[10]))
    assert first.shape == (8, 8) and first.dtype == np.uint8 and first.max() > 100
