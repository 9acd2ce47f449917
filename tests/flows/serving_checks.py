"""Checks that a registered model answers as evaluate recorded, shared by the flow tests."""

from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image


def write_test_split(home: Path, recorded: pd.DataFrame, folder: Path) -> list[Path]:
    """The run's test split, in test.npz order, as PNG files re-encoded from the pixel cache
    (what the anonymize stage writes): the images evaluate scored, as a user would hold them."""
    splits = [p for p in home.glob("work/split/*/test.npz") if np.array_equal(np.load(p)["y"], recorded["y"])]
    assert len(splits) >= 1, "no split of this run has the recorded test labels"
    (pixels_file,) = home.glob("work/ingest/*/pixels.npy")
    pixels = np.load(pixels_file, mmap_mode="r")[np.load(splits[0])["pixel_index"]]
    folder.mkdir()
    files = [folder / f"test-{i:04d}.png" for i in range(len(pixels))]
    for file, image in zip(files, pixels, strict=True):
        Image.fromarray(np.ascontiguousarray(image[:, :, 0])).save(file)
    return files


def same_answers(answers: pd.DataFrame, recorded: pd.DataFrame, names: list[str], what: str) -> None:
    assert answers["error"].isna().all(), f"{what}: {answers['error'].dropna().unique()}"
    assert list(answers["class"]) == [names[k] for k in recorded["pred"]], f"{what}: classes differ"
    columns = [f"p_{n}" for n in names]
    worst = np.abs(answers[columns].to_numpy(float) - recorded[columns].to_numpy(float)).max()
    assert worst <= 1e-5, f"{what}: probabilities differ by {worst}"
