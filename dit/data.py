"""Datasets: the embedded digits (scikit-learn), image folders, cached VAE latents.

Images are float tensors in [-1, 1], shape (C, H, W), with integer class labels.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

DIGITS_SIZE = 32
DIGITS_CLASSES = [str(i) for i in range(10)]
DIGITS_HELD_OUT_FRACTION = 0.2
DIGITS_SPLIT_SEED = 0


def digits_split_indices(n: int) -> tuple[np.ndarray, np.ndarray]:
    """A fixed (train, held-out) split of the 1797 digits: training never sees the held-out 20%."""
    order = np.random.default_rng(DIGITS_SPLIT_SEED).permutation(n)
    n_test = int(round(n * DIGITS_HELD_OUT_FRACTION))
    return np.sort(order[n_test:]), np.sort(order[:n_test])


def upsample_digits(images_8x8: np.ndarray, size: int = DIGITS_SIZE) -> torch.Tensor:
    """(N, 8, 8) values 0..16 -> (N, 1, size, size) in [-1, 1], bicubic with antialiasing, clamped."""
    x = torch.from_numpy(np.asarray(images_8x8, dtype=np.float32)).reshape(-1, 1, 8, 8) / 16.0
    x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False).clamp(0, 1)
    return x * 2 - 1


def load_digits(split: str = "train", size: int = DIGITS_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """The embedded digits as ((N, 1, size, size) in [-1, 1], (N,) labels); split: train | test | all."""
    from sklearn.datasets import load_digits as _sk_load_digits

    data = _sk_load_digits()
    images = upsample_digits(data.images, size)
    labels = torch.from_numpy(data.target.astype(np.int64))
    if split == "all":
        return images, labels
    train_idx, test_idx = digits_split_indices(len(labels))
    if split == "train":
        idx = train_idx
    elif split == "test":
        idx = test_idx
    else:
        raise ValueError(f"unknown digits split {split!r}; use train, test or all")
    return images[idx], labels[idx]
