"""Drift of scored data against the training split: the population stability index (PSI).

PSI = sum over bins of (a - e) * ln(a / e), with e and a the training and scored shares of a
bin (each share floored at 1e-4 so that an empty bin is finite). The usual reading (Siddiqi,
"Credit Risk Scorecards", 2006): below 0.1 no shift, 0.1-0.25 a moderate one, above 0.25 a
significant one; `scoring.drift_threshold` defaults to 0.25.

Three distributions are compared: the predicted classes against the training split's classes,
and two per-image pixel statistics (mean level and standard deviation, 0-255), which move when
the camera, scanner, exposure or preprocessing changes even if the classes do not.
"""

from __future__ import annotations

import numpy as np

FLOOR = 1e-4
BINS = 16
MEAN_RANGE, STD_RANGE = (0.0, 255.0), (0.0, 128.0)  # a uint8 image's std is at most 127.5


def pixel_statistics(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean, standard deviation) of each uint8 N x H x W x C image, over all its pixels, 0-255."""
    flat = images.reshape(len(images), -1).astype(np.float64)
    return flat.mean(axis=1), flat.std(axis=1)


def shares(values: np.ndarray, low: float, high: float, bins: int = BINS) -> list[float]:
    """Fixed-width histogram of `values` over [low, high] as shares summing to 1 (values outside
    land in the end bins); all zeros for no values."""
    counts, _ = np.histogram(np.clip(values, low, high), bins=bins, range=(low, high))
    return (counts / max(counts.sum(), 1)).tolist()


def class_shares(labels: np.ndarray, num_classes: int) -> list[float]:
    counts = np.bincount(labels, minlength=num_classes)[:num_classes]
    return (counts / max(counts.sum(), 1)).tolist()


def reference_profile(images: np.ndarray, labels: np.ndarray, num_classes: int) -> dict:
    """What scored data is compared with: the training split's class shares (all its labels)
    and the histograms of its per-image pixel mean and std (`images`, a sample of it is enough)."""
    means, stds = pixel_statistics(images)
    return {"class_shares": class_shares(labels, num_classes), "pixel_mean_shares": shares(means, *MEAN_RANGE),
            "pixel_std_shares": shares(stds, *STD_RANGE), "images": len(images), "labels": len(labels)}  # fmt: skip


def psi(expected: list[float], actual: list[float]) -> float:
    """Population stability index of two share vectors of equal length (see the module docstring)."""
    e = np.maximum(np.asarray(expected, dtype=np.float64), FLOOR)
    a = np.maximum(np.asarray(actual, dtype=np.float64), FLOOR)
    return float(np.sum((a - e) * np.log(a / e)))


def drift_report(reference: dict, statistics: tuple[np.ndarray, np.ndarray], predicted: np.ndarray,
                 threshold: float) -> dict:  # fmt: skip
    """PSI of the predicted classes and of the scored images' `pixel_statistics` (means, stds)
    against `reference_profile`; `drifted` when any is above `threshold`."""
    num_classes = len(reference["class_shares"])
    means, stds = statistics
    observed = {"class_shares": class_shares(predicted, num_classes), "pixel_mean_shares": shares(means, *MEAN_RANGE),
                "pixel_std_shares": shares(stds, *STD_RANGE)}  # fmt: skip
    checks = {name.removesuffix("_shares"): psi(reference[name], observed[name]) for name in observed}
    drifted = sorted(name for name, value in checks.items() if value > threshold)
    return {"psi": checks, "threshold": threshold, "drifted": bool(drifted), "drifted_checks": drifted,
            "scored": observed, "reference": reference, "method": "population stability index, shares floored at 1e-4"}  # fmt: skip
