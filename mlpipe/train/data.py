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


class DistributedWeightedSampler(torch.utils.data.Sampler[int]):
    """Weighted sampling with replacement for DDP: every rank draws the same epoch-seeded sample
    of `len(weights)` indices and takes its own 1/world share, so ranks never overlap and the
    epoch as a whole follows the weights (torch's WeightedRandomSampler knows no ranks)."""

    def __init__(self, weights, num_replicas: int, rank: int, seed: int = 0):
        self.weights = torch.as_tensor(np.asarray(weights), dtype=torch.double)
        self.num_replicas, self.rank, self.seed, self.epoch = num_replicas, rank, seed, 0
        self.num_samples = -(-len(self.weights) // num_replicas)  # ceil: every rank the same count

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        total = self.num_samples * self.num_replicas
        drawn = torch.multinomial(self.weights, total, replacement=True, generator=generator)
        return iter(drawn[self.rank :: self.num_replicas].tolist())

    def __len__(self) -> int:
        return self.num_samples
