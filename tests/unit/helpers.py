"""Small synthetic stage inputs for unit tests."""

import numpy as np
import pandas as pd
from PIL import Image


def write_dataset(root, labels, groups=None, size=8, seed=0):
    """A manifest + PNGs: class k is a bright block at a class-specific position, plus noise."""
    rng = np.random.default_rng(seed)
    (root / "img").mkdir(parents=True)
    rows = []
    for i, lab in enumerate(labels):
        pixels = rng.integers(0, 40, (size, size)).astype(np.uint8)
        k = int(lab)
        pixels[(k * 2) % size : (k * 2) % size + 2, :] = 250
        Image.fromarray(pixels).save(root / "img" / f"{i}.png")
        rows.append({"image": f"img/{i}.png", "subject": f"s{groups[i] if groups is not None else i}", "label": str(lab)})
    pd.DataFrame(rows).to_csv(root / "manifest.csv", index=False)
    return root
