"""Training data: uint8 arrays from the decode-once cache, augmented by albumentations on CPU.

Images leave here as uint8 CHW tensors; normalization happens on the training device.
Evaluation never goes through here: it has no augmentation at all, so it is deterministic.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # no network check at import
import albumentations as A  # noqa: E402


def build_augmentation(policy: dict[str, Any] | None) -> A.Compose | None:
    """The policy is albumentations' own dict serialization (`A.to_dict`), so any transform works."""
    return A.from_dict(policy) if policy else None


class CachedImages:
    """A training set as the trainer sees it: real items are rows of the decode-once pixel cache
    (a memory map, read per item), synthetic items (SMOTE/ADASYN) follow from their own array."""

    def __init__(self, pixels: np.ndarray, pixel_index: np.ndarray, synthetic_images: np.ndarray):
        self.pixels, self.pixel_index, self.synthetic_images = pixels, pixel_index, synthetic_images
        self.shape = (len(pixel_index) + len(synthetic_images), *pixels.shape[1:])

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, i: int) -> np.ndarray:
        real = len(self.pixel_index)
        return self.pixels[self.pixel_index[i]] if i < real else self.synthetic_images[i - real]

    def channel_stats(self, limit: int = 20_000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """Per-channel mean and std in [0, 1], from up to `limit` items (all of them when fewer)."""
        take = np.arange(len(self)) if len(self) <= limit else \
            np.sort(np.random.default_rng(seed).choice(len(self), limit, replace=False))
        sample = np.stack([self[int(i)] for i in take]).astype(np.float64) / 255.0
        return sample.mean(axis=(0, 1, 2)), sample.std(axis=(0, 1, 2))


class ImageArrayDataset(Dataset):
    """uint8 HWC images. Keys are `epoch * len + index` (see `EpochKeyedSampler`): each item's
    augmentation is seeded from (seed, epoch, index), so an epoch's augmentations are the same
    whatever the number of DataLoader workers or ranks, and a resumed epoch repeats exactly."""

    def __init__(self, images: np.ndarray, targets: np.ndarray, transform: A.Compose | None = None, seed: int = 0):
        self.images, self.targets, self.transform, self.seed = images, targets, transform, seed

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, key: int) -> tuple[torch.Tensor, int]:
        index = key % len(self.targets)
        image = self.images[index]
        if self.transform is not None:
            self.transform.set_random_seed((self.seed * 1_000_003 + key * 2_654_435_761) % 2**32)
            image = self.transform(image=image)["image"]
            if image.ndim == 2:  # cv2 drops a single channel axis
                image = image[:, :, None]
        return torch.from_numpy(np.array(image)).permute(2, 0, 1), int(self.targets[index])  # a copy: cache rows are read-only


class EpochKeyedSampler(torch.utils.data.Sampler[int]):
    """Wraps a (distributed) sampler and tags each index with the epoch: yields epoch * n + index."""

    def __init__(self, sampler, n: int):
        self.sampler, self.n, self.epoch = sampler, n, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.sampler.set_epoch(epoch)

    def __iter__(self):
        return (self.epoch * self.n + int(i) for i in self.sampler)

    def __len__(self) -> int:
        return len(self.sampler)


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
