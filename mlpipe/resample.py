"""resample: rebalance the training split, and only the training split.

`resample_training_set` takes training images and labels and nothing else: validation and
test data cannot reach it. Each distinct resample config among the trials is computed once.

SMOTE and ADASYN interpolate between neighbours in raw pixel space. That is sensible for small,
aligned images (digits, centred scans), where a blend of two nearby examples is still a
plausible example; for large or unaligned photos it makes ghosted images, so they are refused
above `resample.max_synthetic_values` and random_over, class_weight or weighted_sampler are
the better choice. Synthetic items are flagged and exist only in the training set.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from imblearn.over_sampling import ADASYN, SMOTE, RandomOverSampler  # noqa: E402
from imblearn.under_sampling import RandomUnderSampler  # noqa: E402
from sklearn.utils.class_weight import compute_class_weight  # noqa: E402

from mlpipe.config import ResampleConfig, Trial  # noqa: E402
from mlpipe.errors import MlpipeError  # noqa: E402
from mlpipe.split import class_names, cv_folds, load_labels, training_items  # noqa: E402
from mlpipe.store import StageResult, code_version, final_path, stable_hash, stage_dir, write_json  # noqa: E402


class Rows:
    """Rows of the decode-once pixel cache, read only when asked: strategies that pick or weight
    items never touch pixels, and the trainer reads its items straight from the cache."""

    def __init__(self, pixels: np.ndarray, index: np.ndarray):
        self.pixels, self.index = pixels, index
        self.shape = (len(index), *pixels.shape[1:])

    def __len__(self) -> int:
        return len(self.index)

    def __array__(self, dtype=None, copy=None):
        return np.asarray(self.pixels[self.index], dtype=dtype)


def resample_training_set(images, y: np.ndarray, config: ResampleConfig, names: list[str]) -> dict[str, np.ndarray]:
    """positions (of the given training items, originals or their duplicates), synthetic_images
    (SMOTE/ADASYN only), y, synthetic (bool per item: the synthetic ones come last),
    class_weight (per class) and sampler_weight (per item; empty unless the weighted sampler)."""
    num_classes = len(names)
    weights = np.ones(num_classes, dtype=np.float32)
    positions = np.arange(len(y))
    extra = np.zeros((0, *images.shape[1:]), dtype=np.uint8)
    sampler_weight = np.zeros(0, dtype=np.float64)
    if config.strategy in ("random_over", "random_under"):
        sampler_cls = RandomOverSampler if config.strategy == "random_over" else RandomUnderSampler
        sampler = sampler_cls(sampling_strategy=config.sampling_strategy, random_state=config.seed)
        # Sample row positions, not pixels: duplicates are references to real images.
        positions = sampler.fit_resample(positions.reshape(-1, 1), y)[0].ravel()
        y = y[positions]
    elif config.strategy in ("smote", "adasyn"):
        extra, y = _interpolate(np.asarray(images), y, config, names)
    elif config.strategy == "class_weight":
        present = np.unique(y)
        weights[present] = compute_class_weight("balanced", classes=present, y=y).astype(np.float32)
    elif config.strategy == "weighted_sampler":
        counts = np.bincount(y, minlength=num_classes).astype(np.float64)
        sampler_weight = 1.0 / counts[y]  # each class drawn equally often, in expectation
    synthetic = np.arange(len(y)) >= len(positions)
    return {"positions": positions, "synthetic_images": extra, "y": y, "synthetic": synthetic,
            "class_weight": weights, "sampler_weight": sampler_weight}  # fmt: skip


def training_set(pixels: np.ndarray, index: np.ndarray, y: np.ndarray, config: ResampleConfig, names: list[str]) -> dict:
    """What the trainer reads (one npz): cache rows (`pixel_index`) for real items, pixels only
    for synthetic ones."""
    result = resample_training_set(Rows(pixels, index), y, config, names)
    return {"pixel_index": index[result.pop("positions")], **result}


def _interpolate(images, y, config: ResampleConfig, names: list[str]):
    values = images.size
    if values > config.max_synthetic_values:
        raise MlpipeError(
            f"resample.strategy {config.strategy} refused: {len(y)} items x {images[0].size} pixel values exceed "
            f"resample.max_synthetic_values ({config.max_synthetic_values}); use random_over, class_weight or weighted_sampler"
        )
    counts = Counter(y.tolist())
    rarest, smallest = min(counts.items(), key=lambda kv: kv[1])
    if smallest <= config.k_neighbors:
        raise MlpipeError(
            f"resample.k_neighbors={config.k_neighbors} needs more training items than class '{names[rarest]}' has "
            f"({smallest}); lower k_neighbors or use resample.strategy: random_over"
        )
    flat = images.reshape(len(y), -1).astype(np.float32)
    if config.strategy == "smote":
        sampler = SMOTE(sampling_strategy=config.sampling_strategy, k_neighbors=config.k_neighbors, random_state=config.seed)
    else:
        sampler = ADASYN(sampling_strategy=config.sampling_strategy, n_neighbors=config.k_neighbors, random_state=config.seed)
    try:
        flat_new, y_new = sampler.fit_resample(flat, y)
    except (ValueError, RuntimeError) as exc:  # e.g. ADASYN finding no hard minority neighbours
        raise MlpipeError(f"resample.strategy {config.strategy} failed: {str(exc).splitlines()[0]}") from None
    # imblearn returns the originals unchanged, then the synthetic rows: keep only the new ones.
    new_images = np.clip(np.rint(flat_new[len(y) :]), 0, 255).astype(np.uint8).reshape(-1, *images.shape[1:])
    return new_images, y_new


def resample(splits: StageResult, trials: list[Trial]) -> StageResult:
    """One training set per distinct `resample` config among the trials, and per fold in kfold
    mode (each fold's training part is resampled on its own: its validation fold stays real).

    Each config's sets are cached on (split fingerprint, that config, code version): a rerun
    that adds a strategy to the grid computes only the new one."""
    names = class_names(splits)
    _, first_parts, _ = cv_folds(splits)[0]
    before = _counts(load_labels(splits, first_parts), len(names))
    report = {"classes": names, "before": before, "strategies": {}, "reused": []}
    files: dict[str, Path] = {}
    configs = {stable_hash(t.resample)[:12]: t.resample for t in trials}
    pixels = np.load(splits.file("pixels"), mmap_mode="r")
    for cfg_key, cfg in configs.items():
        folder, entries, reused = _training_sets(splits, cfg, names, pixels)
        for fold, entry in entries.items():
            report["strategies"][cfg_key + fold] = entry
            files[f"{cfg_key}{fold}.npz"] = folder / f"train{fold}.npz"
        if reused:
            report["reused"].append(cfg_key)
    key = stable_hash(splits.key, sorted(configs), code_version("mlpipe.resample"))[:16]
    with stage_dir("resample", key) as out:
        _chart(report, out / "class_counts.png")
        write_json(out / "report.json", report)
    return StageResult.at("resample", key, report, **files)


def _training_sets(splits: StageResult, cfg: ResampleConfig, names: list[str], pixels) -> tuple[Path, dict[str, dict], bool]:
    """(folder, report entry per fold, reused?) for one resample config."""
    set_key = stable_hash(splits.key, cfg, code_version("mlpipe.resample"))[:16]
    folder = final_path("resample-sets", set_key)
    if (folder / "entries.json").exists():
        return folder, json.loads((folder / "entries.json").read_text()), True
    entries = {}
    with stage_dir("resample-sets", set_key) as out:
        for fold, parts, _ in cv_folds(splits):
            index, y, left_out = training_items(splits, parts, cfg.drop_label_issues)
            result = training_set(pixels, index, y, cfg, names)
            np.savez(out / f"train{fold}.npz", **result)
            entries[fold] = {
                "config": cfg.model_dump(),
                "fold": fold or None,
                "after": _counts(result["y"], len(names)),
                "synthetic": int(result["synthetic"].sum()),
                "class_weight": [round(float(w), 4) for w in result["class_weight"]],
                "weighted_sampler": bool(len(result["sampler_weight"])),
                "label_issues_left_out": left_out,
            }
        write_json(out / "entries.json", entries)
    return folder, entries, False


def _chart(report: dict, path):
    """class_counts.png: training class counts (names on the x axis) before and after each
    strategy, the legend outside the bars. Returns the saved, closed figure."""
    names, series = report["classes"], {"before": report["before"]}
    for entry in report["strategies"].values():
        if not entry["fold"] or entry["fold"] == "fold0":
            series[entry["config"]["strategy"]] = entry["after"]
    fig, ax = plt.subplots(figsize=(max(5.5, 2.5 + 0.3 * len(names) * len(series)), 4), layout="constrained")
    width = 0.8 / len(series)
    for i, (label, counts) in enumerate(series.items()):
        ax.bar(np.arange(len(names)) + i * width, counts, width, label=label)
    ax.set_xticks(np.arange(len(names)) + 0.4 - width / 2, names)
    for label in ax.get_xticklabels():  # slanted: long class names stay apart
        label.set(rotation=35, ha="right", rotation_mode="anchor")
    ax.set_ylabel("training items")
    ax.set_title("Training class counts before and after resampling")
    fig.legend(loc="outside lower center", ncols=min(len(series), 4), fontsize="small")  # below the axes: never over a bar
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return fig


def training_set_for(resampled: StageResult, trial: Trial, fold: str = "") -> str:
    return str(resampled.file(f"{stable_hash(trial.resample)[:12]}{fold}.npz"))


def _counts(y: np.ndarray, num_classes: int) -> list[int]:
    return np.bincount(y, minlength=num_classes).tolist()
