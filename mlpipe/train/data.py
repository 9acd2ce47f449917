"""Training data: uint8 arrays from the decode-once cache, augmented by albumentations on CPU.

Images leave here as uint8 CHW tensors; normalization happens on the training device.
Evaluation never goes through here: it has no augmentation at all, so it is deterministic.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, get_worker_info

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # no network check at import
import albumentations as A  # noqa: E402


def build_augmentation(policy: dict[str, Any] | None, seed: int) -> A.Compose | None:
    """The policy is albumentations' own dict serialization (`A.to_dict`), so any transform works."""
    if not policy:
        return None
    transform = A.from_dict(policy)
    transform.set_random_seed(seed)
    return transform


class ImageArrayDataset(Dataset):
    def __init__(self, images: np.ndarray, targets: np.ndarray, transform: A.Compose | None = None):
        self.images, self.targets, self.transform = images, targets, transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = self.images[index]
        if self.transform is not None:
            image = self.transform(image=image)["image"]
            if image.ndim == 2:  # cv2 drops a single channel axis
                image = image[:, :, None]
        return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1), int(self.targets[index])


def seed_worker(worker_id: int) -> None:
    """Give each DataLoader worker its own augmentation stream, derived from torch's per-worker seed."""
    info = get_worker_info()
    transform = getattr(info.dataset, "transform", None) if info else None
    if transform is not None:
        transform.set_random_seed(torch.initial_seed() % 2**32)
