"""Can this training section work on these images? Answered at config validation, before any stage runs.

Two probes, both general (no list of known-bad transforms or models):

- the augmentation policy is built the way the trainer builds it (`build_augmentation`, i.e.
  `A.from_dict`), every transform forced to p=1, and each one applied in turn to a synthetic
  uint8 image shaped as the trainer feeds it (image_size x image_size x channels). A transform
  that raises, or that returns anything but a uint8 array of that shape, is refused by name:
  the trainer normalizes on the device, so a float output would be scaled twice;
- the architecture is built with `build_model` on PyTorch's meta device (shapes only, no memory,
  no arithmetic) and run on one image of ingest.image_size; a failure names the smallest size
  that works.

Results are cached per (policy, channels, size) and (model, channels, size): `PipelineConfig`
re-validates every grid combination, so the probes run once per distinct combination.
"""

from __future__ import annotations

import copy
import functools
import json
import os
import warnings
from typing import Any

MAX_IMAGE_SIZE = 1024  # IngestConfig.image_size's upper bound: where the search for a working size stops


def augmentation_problem(policy: dict[str, Any] | None, channels: int, size: int) -> str | None:
    """None if the policy keeps uint8 images of (size, size, channels), else one line naming the transform."""
    if not policy:
        return None
    return _augmentation_problem(json.dumps(policy, sort_keys=True), channels, size)


def model_problem(name: str, channels: int, size: int) -> str | None:
    """None if `name` runs on one (channels, size, size) image, else one line naming the size it needs."""
    return _model_problem(name, channels, size)


# --- augmentation -----------------------------------------------------------------------------


@functools.lru_cache(maxsize=256)
def _augmentation_problem(policy_json: str, channels: int, size: int) -> str | None:
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    import numpy as np

    from mlpipe.train.data import build_augmentation

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            built = build_augmentation(json.loads(policy_json))
    except Exception as err:  # unknown transform, bad argument: the worker would fail the same way
        return f"train.augment is not a valid albumentations policy: {type(err).__name__}: {_first_line(err)}"
    if built is None:
        return None
    built = copy.deepcopy(built)
    image = np.random.default_rng(0).integers(0, 256, (size, size, channels), dtype=np.uint8)
    for transform in _leaves(built):
        problem, out = _apply(transform, image, channels, size)
        if problem is not None:
            return f"train.augment: {problem}"
        image = out
    return None


def _leaves(transform) -> list:
    """Every transform the policy may apply, depth first. Compositions that only choose or order
    their children are opened; any other (e.g. SelectiveChannelTransform) is probed as one unit."""
    import albumentations as A

    selecting = (A.Compose, A.Sequential, A.OneOf, A.SomeOf, A.OneOrOther)
    if isinstance(transform, selecting):
        return [leaf for child in transform.transforms for leaf in _leaves(child)]
    _force_always(transform)
    return [transform]


def _force_always(transform) -> None:
    transform.p = 1.0
    for child in getattr(transform, "transforms", None) or []:
        _force_always(child)


def _apply(transform, image, channels: int, size: int):
    """(problem, output): run one transform as the trainer would, seeded, and judge its output."""
    import albumentations as A
    import numpy as np

    name = type(transform).__name__
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = A.Compose([transform], p=1.0, seed=0)(image=image)["image"]
    except Exception as err:
        other = 3 if channels == 1 else 1
        if _runs_on(transform, other, size):  # the cause is the channel count: say so
            needs = f"{other} channel{'s' if other > 1 else ''}"
            return f"{name} needs {needs}; ingest.channels is {channels} ({_first_line(err)})", None
        return f"{name} fails on a {size}x{size}x{channels} uint8 image: {_first_line(err)}", None
    if not isinstance(out, np.ndarray):
        kind = f"{type(out).__module__}.{type(out).__name__}"
        return (f"{name} outputs a {kind}, not an image array; the trainer makes tensors and normalizes on the "
                "device itself, so a policy must keep uint8 HxWxC images"), None  # fmt: skip
    if out.dtype != np.uint8:
        return (f"{name} outputs {out.dtype}; the trainer normalizes on the device, so a policy must keep uint8 "
                "(a float output would be scaled twice)"), None  # fmt: skip
    if out.ndim == 2 and channels == 1:  # cv2 drops a single channel axis; the dataset puts it back
        out = out[:, :, None]
    if out.shape != image.shape:
        return (f"{name} changes the image shape {image.shape} to {out.shape}; training, evaluation and "
                f"serving use ingest.image_size {size} and ingest.channels {channels}, so a policy must keep "
                "both"), None  # fmt: skip
    return None, out


def _runs_on(transform, channels: int, size: int) -> bool:
    import albumentations as A
    import numpy as np

    image = np.random.default_rng(0).integers(0, 256, (size, size, channels), dtype=np.uint8)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            A.Compose([transform], p=1.0, seed=0)(image=image)
    except Exception:
        return False
    return True


# --- architecture -----------------------------------------------------------------------------


@functools.lru_cache(maxsize=256)
def _model_problem(name: str, channels: int, size: int) -> str | None:
    failure = _forward_fails(name, channels, size)
    if failure is None:
        return None
    needed = _smallest_working_size(name, channels, size)
    if needed is None:
        return f"train.model {name} fails at ingest.image_size {size}: {failure}"
    return f"train.model {name} needs ingest.image_size >= {needed} (got {size}): {failure}"


@functools.lru_cache(maxsize=1024)
def _forward_fails(name: str, channels: int, size: int) -> str | None:
    """None if one image goes through the model, else the error's first line. On the meta device
    first; where a model cannot run there at all (data-dependent code), on the CPU."""
    import torch

    from mlpipe.train.model import build_model

    try:
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            build_model(name, channels, 2, size).eval()(torch.empty(1, channels, size, size))
        return None
    except Exception as err:
        if not _meta_limitation(err):
            return _first_line(err)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            build_model(name, channels, 2, size).eval()(torch.zeros(1, channels, size, size))
        return None
    except Exception as err:
        return _first_line(err)


def _meta_limitation(err: Exception) -> bool:
    return isinstance(err, NotImplementedError) or "meta" in str(err).lower()


def _smallest_working_size(name: str, channels: int, size: int) -> int | None:
    """Doubling, then bisection, above the failing size; None if nothing up to MAX_IMAGE_SIZE works."""
    low, high = size, None  # low fails; high works
    probe = size
    while probe < MAX_IMAGE_SIZE:
        probe = min(probe * 2, MAX_IMAGE_SIZE)
        if _forward_fails(name, channels, probe) is None:
            high = probe
            break
        low = probe
    if high is None:
        return None
    while high - low > 1:
        mid = (low + high) // 2
        if _forward_fails(name, channels, mid) is None:
            high = mid
        else:
            low = mid
    return high


def _first_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__
