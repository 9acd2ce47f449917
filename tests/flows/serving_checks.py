"""Checks that a registered model answers as evaluate recorded, shared by the flow tests."""

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
from mlflow.tracking import MlflowClient
from PIL import Image


def write_test_split(home: Path, client: MlflowClient, run_id: str, folder: Path) -> list[Path]:
    """The run's test split, in test.npz order, as PNG files re-encoded from the pixel cache
    (what the anonymize stage writes): the images evaluate scored, as a user would hold them.
    The run's own stage folders are found by its split key (the model card) and its data
    fingerprint (a run tag): other runs in the same state directory have folders there too."""
    card = Path(client.download_artifacts(run_id, "evaluate/model_card.md", str(folder.parent))).read_text()
    split_key = re.search(r"data fingerprint \(split stage key\): (\w+)", card).group(1)
    fingerprint = client.get_run(run_id).data.tags["mlpipe.data_fingerprint"]
    (snapshot,) = [d for d in home.glob("work/ingest/*") if (d / "report.json").is_file()
                   and json.loads((d / "report.json").read_text())["fingerprint"] == fingerprint]  # fmt: skip
    index = np.load(home / "work" / "split" / split_key / "test.npz")["pixel_index"]
    pixels = np.load(snapshot / "pixels.npy", mmap_mode="r")[index]
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
