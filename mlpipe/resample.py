"""resample: rebalance the training split, and only the training split.

`resample_training_set` takes training images and labels and nothing else: validation and
test data cannot reach it. Each distinct resample config among the trials is computed once.
Synthetic SMOTE images are flagged; class weights are computed from the training split only.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
from imblearn.over_sampling import SMOTE, RandomOverSampler
from imblearn.under_sampling import RandomUnderSampler
from sklearn.utils.class_weight import compute_class_weight

from mlpipe.config import ResampleConfig, Trial
from mlpipe.errors import MlpipeError
from mlpipe.split import class_names, load_split
from mlpipe.store import StageResult, code_version, stable_hash, stage_dir, write_json


def resample_training_set(
    images: np.ndarray, y: np.ndarray, config: ResampleConfig, num_classes: int
) -> dict[str, np.ndarray]:
    """images, y, synthetic (bool per item) and class_weight (per class; all ones unless asked)."""
    weights = np.ones(num_classes, dtype=np.float32)
    synthetic = np.zeros(len(y), dtype=bool)
    if config.strategy in ("random_over", "random_under"):
        sampler_cls = RandomOverSampler if config.strategy == "random_over" else RandomUnderSampler
        sampler = sampler_cls(random_state=config.seed)
        # Sample row positions, not pixels: duplicates are views of real images.
        positions, _ = sampler.fit_resample(np.arange(len(y)).reshape(-1, 1), y)
        positions = positions.ravel()
        images, y, synthetic = images[positions], y[positions], synthetic[positions]
    elif config.strategy == "smote":
        smallest = min(Counter(y.tolist()).values())
        if smallest < 2:
            raise MlpipeError("resample.strategy smote needs at least 2 training items in every class")
        sampler = SMOTE(k_neighbors=min(config.k_neighbors, smallest - 1), random_state=config.seed)
        flat, y_new = sampler.fit_resample(images.reshape(len(y), -1).astype(np.float32), y)
        # imblearn appends synthetic rows after the originals.
        synthetic = np.arange(len(y_new)) >= len(y)
        images = np.clip(np.rint(flat), 0, 255).astype(np.uint8).reshape(-1, *images.shape[1:])
        y = y_new
    elif config.strategy == "class_weight":
        present = np.unique(y)
        weights[present] = compute_class_weight("balanced", classes=present, y=y).astype(np.float32)
    return {"images": images, "y": y, "synthetic": synthetic, "class_weight": weights}


def resample(splits: StageResult, trials: list[Trial]) -> StageResult:
    """One training set per distinct `resample` config among the trials."""
    images, y = load_split(splits, "train")
    num_classes = len(class_names(splits))
    before = _counts(y, num_classes)
    sets, report = {}, {"before": before, "strategies": {}}
    configs = {stable_hash(t.resample)[:12]: t.resample for t in trials}
    key = stable_hash(splits.key, sorted(configs), code_version("mlpipe.resample"))[:16]
    with stage_dir("resample", key) as out:
        for cfg_key, cfg in configs.items():
            result = resample_training_set(images, y, cfg, num_classes)
            np.savez(out / f"{cfg_key}.npz", **result)
            sets[cfg_key] = f"{cfg_key}.npz"
            report["strategies"][cfg_key] = {
                "config": cfg.model_dump(),
                "after": _counts(result["y"], num_classes),
                "synthetic": int(result["synthetic"].sum()),
                "class_weight": [round(float(w), 4) for w in result["class_weight"]],
            }
        write_json(out / "report.json", report)
    return StageResult.at("resample", key, report)


def training_set_for(resampled: StageResult, trial: Trial) -> str:
    return str(resampled.file(f"{stable_hash(trial.resample)[:12]}.npz"))


def _counts(y: np.ndarray, num_classes: int) -> list[int]:
    return np.bincount(y, minlength=num_classes).tolist()
