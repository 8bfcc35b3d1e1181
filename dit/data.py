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


#: the embedded digits datasets by `--data` name -> whether intensities are inverted
DIGITS_DATASETS = {"digits": False, "digits-inverted": True}


def load_digits_dataset(name: str, split: str = "train", size: int = DIGITS_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """`digits` or `digits-inverted` (dark strokes on a white background: x -> -x, same labels and split)."""
    if name not in DIGITS_DATASETS:
        raise ValueError(f"unknown embedded dataset {name!r}; valid: {', '.join(DIGITS_DATASETS)}")
    images, labels = load_digits(split, size)
    return (-images if DIGITS_DATASETS[name] else images), labels


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


# ---------------------------------------------------------------------------- image folders
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")


def scan_image_folder(root: str) -> tuple[list[tuple[str, int]], list[str]]:
    """(path, label) pairs and class names; class sub-folders become labels, none means one class."""
    import os

    if not os.path.isdir(root):
        raise FileNotFoundError(f"dataset folder {root!r} does not exist; pass --data digits or a folder of images")
    subdirs = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)) and not d.startswith("."))
    items: list[tuple[str, int]] = []
    if subdirs:
        classes = subdirs
        for label, name in enumerate(classes):
            for dirpath, _, files in sorted(os.walk(os.path.join(root, name))):
                items += [(os.path.join(dirpath, f), label) for f in sorted(files) if f.lower().endswith(IMAGE_EXTENSIONS)]
    else:
        classes = [os.path.basename(os.path.normpath(root)) or "images"]
        items = [(os.path.join(root, f), 0) for f in sorted(os.listdir(root)) if f.lower().endswith(IMAGE_EXTENSIONS)]
    if not items:
        raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found in {root!r}; the dataset is empty")
    return items, classes


def find_bad_images(paths: list[str]) -> list[str]:
    """Paths PIL cannot open and decode."""
    from PIL import Image

    bad = []
    for path in paths:
        try:
            with Image.open(path) as im:
                im.load()
        except Exception:  # any decoding failure makes the file unusable
            bad.append(path)
    return bad


def center_crop_resize(image: "Image.Image", size: int) -> "Image.Image":
    """ADM/DiT preprocessing: box-downsample while large, bicubic resize of the short side, centre crop."""
    from PIL import Image

    while min(image.size) >= 2 * size:
        image = image.resize(tuple(x // 2 for x in image.size), resample=Image.BOX)
    scale = size / min(image.size)
    image = image.resize(tuple(round(x * scale) for x in image.size), resample=Image.BICUBIC)
    left, top = (image.size[0] - size) // 2, (image.size[1] - size) // 2
    return image.crop((left, top, left + size, top + size))


class ImageFolderDataset(torch.utils.data.Dataset):
    """Images from a folder (class sub-folders are labels) as (C, size, size) tensors in [-1, 1]."""

    def __init__(self, root: str, size: int, channels: int = 3, skip_bad: bool = False, random_flip: bool = False):
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 (grayscale) or 3 (RGB), got {channels}")
        items, self.classes = scan_image_folder(root)
        bad = find_bad_images([p for p, _ in items])
        if bad and not skip_bad:
            listing = "\n  ".join(bad[:20]) + ("\n  ..." if len(bad) > 20 else "")
            raise ValueError(f"{len(bad)} unreadable or corrupt image(s) in {root!r}:\n  {listing}\n"
                             "Fix: remove or replace them, or pass --skip-bad-images to skip them.")
        self.num_skipped = len(bad)
        bad_set = set(bad)
        self.items = [(p, y) for p, y in items if p not in bad_set]
        if not self.items:
            raise ValueError(f"every image in {root!r} is unreadable; the dataset is empty")
        self.size, self.channels, self.random_flip = size, channels, random_flip

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        from PIL import Image

        path, label = self.items[index]
        with Image.open(path) as im:
            image = center_crop_resize(im.convert("L" if self.channels == 1 else "RGB"), self.size)
        x = torch.from_numpy(np.asarray(image, dtype=np.float32).copy()) / 127.5 - 1.0
        x = x[None] if self.channels == 1 else x.permute(2, 0, 1)
        if self.random_flip and torch.rand(()) < 0.5:
            x = x.flip(-1)
        return x.contiguous(), label


class TensorImageDataset(torch.utils.data.Dataset):
    """In-memory (images, labels); used for the digits and for cached latents."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, classes: list[str]):
        if len(images) == 0:
            raise ValueError("the dataset is empty")
        self.images, self.labels, self.classes = images, labels, classes

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index], int(self.labels[index])


class LatentDataset(torch.utils.data.Dataset):
    """Cached VAE posterior (mean, std) per image; a fresh latent is drawn every time (scaled)."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor, labels: torch.Tensor, classes: list[str], scale: float):
        self.mean, self.std, self.labels, self.classes, self.scale = mean, std, labels, classes, scale

    def __len__(self) -> int:
        return len(self.mean)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        z = self.mean[index] + self.std[index] * torch.randn_like(self.std[index])
        return z * self.scale, int(self.labels[index])


def cache_latents(dataset: torch.utils.data.Dataset, vae_path: str, cache_file: str, batch_size: int = 16,
                  device: str = "cpu") -> LatentDataset:
    """Encode every image once with a local diffusers AutoencoderKL and cache mean/std as safetensors."""
    import json
    import os

    from diffusers import AutoencoderKL
    from safetensors.torch import load_file, save_file
    from tqdm.auto import tqdm

    if not os.path.isdir(vae_path):
        raise FileNotFoundError(f"--vae {vae_path!r} is not a local folder; the studio never downloads: "
                                "pass a folder written by AutoencoderKL.save_pretrained")
    vae = AutoencoderKL.from_pretrained(vae_path).to(device).eval()
    scale = float(getattr(vae.config, "scaling_factor", 0.18215))
    key = json.dumps({"vae": os.path.abspath(vae_path), "n": len(dataset)})
    if os.path.exists(cache_file):
        tensors = load_file(cache_file)
        from safetensors import safe_open

        with safe_open(cache_file, "pt") as f:
            meta = f.metadata() or {}
        if meta.get("key") == key:
            return LatentDataset(tensors["mean"], tensors["std"], tensors["labels"], dataset.classes, scale)
    means, stds, labels = [], [], []
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False)
    with torch.no_grad():
        for x, y in tqdm(loader, desc="caching VAE latents"):
            dist = vae.encode(x.to(device)).latent_dist
            means.append(dist.mean.cpu())
            stds.append(dist.std.cpu())
            labels.append(torch.as_tensor(y))
    tensors = {"mean": torch.cat(means).contiguous(), "std": torch.cat(stds).contiguous(),
               "labels": torch.cat(labels).long().contiguous()}
    tmp = cache_file + ".tmp"
    save_file(tensors, tmp, metadata={"key": key})
    os.replace(tmp, cache_file)
    return LatentDataset(tensors["mean"], tensors["std"], tensors["labels"], dataset.classes, scale)
