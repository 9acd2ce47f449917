"""Synthetic datasets of the field cases (`shared/field_cases/caseN/make_input.py`): small images whose
class decides the shape drawn, with a manifest, written inside the tests. No real or personal data.

The generator is the field cases' own, so a test here sees the inputs a user's report described.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

# The configuration every field case shares (case.yaml), as --set style overrides.
CASE_OVERRIDES: dict[str, Any] = {
    "experiment": "fieldcase",
    "anonymize.policy": {"subject": "pseudonymize", "label": "keep"},
    "label.columns": ["label"],
    "split.group_column": "subject",
    "train.epochs": 2,
    "train.batch_size": 32,
    "search.grid": {},
    "evaluate.bootstrap_resamples": 100,
}


def pattern(cls: int, i: int, size: int = 32) -> np.ndarray:
    """size x size grayscale uint8: class `cls` picks the shape; item `i` its place, size, brightness, background."""
    rng = np.random.default_rng(i * 7919 + cls * 104729 + 1)
    yy, xx = np.mgrid[0:size, 0:size] / size
    g = rng.uniform(-60, 60, 3)
    bg = 60 + g[0] * xx + g[1] * yy + g[2] * xx * yy + rng.normal(0, 12, (size, size))
    img = Image.fromarray(np.clip(bg, 0, 255).astype(np.uint8), "L")
    d = ImageDraw.Draw(img)
    cx, cy = rng.uniform(0.3, 0.7, 2) * size
    r, fill, w = rng.uniform(0.15, 0.3) * size, int(rng.integers(170, 255)), max(1, size // 10)
    k = cls % 8
    if k == 0:
        d.rectangle([cx - w, cy - r, cx + w, cy + r], fill=fill)
    elif k == 1:
        d.rectangle([cx - r, cy - w, cx + r, cy + w], fill=fill)
    elif k == 2:
        d.ellipse([cx - r, cy - r, cx + r, cy + r], outline=fill, width=w)
    elif k == 3:
        d.line([cx - r, cy - r, cx + r, cy + r], fill=fill, width=w)
    elif k == 4:
        d.line([cx - r, cy + r, cx + r, cy - r], fill=fill, width=w)
    elif k == 5:
        d.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif k == 6:
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    else:
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    arr = np.asarray(img).astype(np.int16)
    if cls >= 8:  # more than 8 classes: a class-specific corner mark
        m = cls // 8
        arr[: m + 1, : 2 * m + 2] = 255
    return np.clip(arr, 0, 255).astype(np.uint8)


def gray(cls: int, i: int) -> Image.Image:
    return Image.fromarray(pattern(cls, i), "L")


def ink_on_transparent(cls: int, i: int) -> Image.Image:
    """case3: black strokes (opaque) on a fully transparent canvas, mode LA."""
    alpha = np.where(pattern(cls, i) > 150, 255, 0).astype(np.uint8)
    return Image.fromarray(np.dstack([np.zeros_like(alpha), alpha]), "LA")


def write_shapes(
    out: Path,
    names: list[str],
    per_class: int,
    image: Callable[[int, int], Image.Image] = gray,
    manifest: str = "csv",
    label: Callable[[int, int, str], Any] = lambda c, i, name: name,
) -> Path:
    """Write `per_class` images of each class in `names` under out/images and a manifest
    (columns image, subject, label; two items per subject) as manifest.csv or manifest.jsonl."""
    (out / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for c, name in enumerate(names):
        for i in range(per_class):
            path = f"images/{name}_{i:03d}.png"
            image(c, i).save(out / path)
            rows.append({"image": path, "subject": f"s{c}_{i // 2}", "label": label(c, i, name)})
    if manifest == "jsonl":
        (out / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        with open(out / "manifest.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, ["image", "subject", "label"])
            writer.writeheader()
            writer.writerows(rows)
    return out
