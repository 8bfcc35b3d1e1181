"""Evaluation: digits metrics for class-conditional digit models, FID/KID between image folders.

Digits mode (`evaluate_digits`, `python -m dit.eval CKPT`) samples K images per class with fixed
seeds and scores them against the embedded scikit-learn digits (`dit.data.load_digits`):

- `classifier_agreement`: an RBF SVC trained on the REAL train split, on 8x8 area-pooled images
  (the digits' native resolution, so the bicubic upsampling and any high-frequency sampling
  artefacts are averaged away); its own accuracy on the held-out test split is reported beside it.
- `frechet_distance`: Fréchet distance to the held-out test split in a fixed feature space: the
  first 32 PCA components of 16x16 area-pooled images, PCA fitted on the real train split. The
  same distance between the real train and test splits is reported as the floor. These numbers
  are only comparable with each other, not with published FIDs.
- `near_copy_rate`: fraction of images whose nearest training image (L2 in 32x32 pixel space,
  values in [-1, 1]) is closer than the 1st percentile of real test->train nearest-neighbour
  distances (so real held-out digits score about 0.01); higher means memorisation.
- `diversity`: mean pairwise L2 distance (32x32 pixels) within each class, generated vs real test.

Folder mode (`evaluate_folders`, `python -m dit.eval --fake DIR --real DIR`) computes FID and KID
with a feature extractor chosen by name from `FEATURE_EXTRACTORS`: "pixels" and "random-conv"
work offline everywhere but are NOT comparable with published FID; "inception" needs a local
TorchScript Inception-v3 file given with `--inception-weights` (the studio never downloads).
"""
from __future__ import annotations

import argparse
import fnmatch
import functools
import json
import math
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

DIGITS_EVAL_SIZE = 32
CLASSIFIER_POOL = 8
FEATURE_POOL = 16
FEATURE_DIMS = 32
NEAR_COPY_PERCENTILE = 1.0
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
CLASSIFIER_DESCRIPTION = "SVC(rbf, C=10) on 8x8 area-pooled real digits (train split)"
FEATURE_DESCRIPTION = (f"PCA({FEATURE_DIMS}) of {FEATURE_POOL}x{FEATURE_POOL} area-pooled pixels, "
                       "fitted on the real digits train split")


class EvalError(ValueError):
    """Evaluation cannot run as asked; the message names the fix."""


# ---------------------------------------------------------------------------------------------
# Statistics: Fréchet distance, KID, pairwise distances
# ---------------------------------------------------------------------------------------------
def feature_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance (float64) of (N, D) features; N must be at least 2."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise EvalError(f"need at least 2 feature vectors for a covariance, got shape {f.shape}")
    return f.mean(axis=0), np.cov(f, rowvar=False).reshape(f.shape[1], f.shape[1])


def _trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """tr(sqrtm(sigma1 @ sigma2)) via scipy's sqrtm, regularised when near-singular."""
    from scipy import linalg

    dim = sigma1.shape[0]
    for eps in (0.0, 1e-6, 1e-4, 1e-2):
        offset = np.eye(dim) * eps * max(np.trace(sigma1) / dim, np.trace(sigma2) / dim, 1e-12)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
        if not np.all(np.isfinite(covmean)):
            continue
        if np.iscomplexobj(covmean):
            # Tiny imaginary parts are round-off of a product of PSD matrices; large ones mean trouble.
            if np.max(np.abs(covmean.imag)) > 1e-3 * max(1.0, np.max(np.abs(covmean.real))):
                continue
            covmean = covmean.real
        return float(np.trace(covmean))
    # Last resort: eigenvalues of the product are real and >= 0 in exact arithmetic.
    eig = np.linalg.eigvals(sigma1 @ sigma2)
    return float(np.sqrt(np.clip(eig.real, 0, None)).sum())


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 sqrt(S1 S2)), robust to near-singular covariances (>= 0)."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise EvalError(f"feature dimensions differ: {mu1.shape} vs {mu2.shape}; use the same feature extractor")
    diff = mu1 - mu2
    value = diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * _trace_sqrt_product(sigma1, sigma2)
    return float(max(value, 0.0))


def frechet_distance_features(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between two (N, D) feature sets."""
    return frechet_distance(*feature_stats(a), *feature_stats(b))


def kernel_inception_distance(fake: np.ndarray, real: np.ndarray, num_subsets: int = 100,
                              subset_size: int = 1000, seed: int = 0) -> tuple[float, float]:
    """KID: unbiased MMD^2 with the kernel (x.y / d + 1)^3, averaged over random subsets -> (mean, std).

    Unbiased, so it can be slightly negative when both sets come from the same distribution.
    """
    fake, real = np.asarray(fake, np.float64), np.asarray(real, np.float64)
    if fake.shape[1] != real.shape[1]:
        raise EvalError(f"feature dimensions differ: {fake.shape[1]} vs {real.shape[1]}")
    m = min(subset_size, len(fake), len(real))
    if m < 2:
        raise EvalError(f"KID needs at least 2 images per set, got {len(fake)} fake and {len(real)} real")
    d = fake.shape[1]
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(num_subsets):
        x = fake[rng.choice(len(fake), m, replace=False)]
        y = real[rng.choice(len(real), m, replace=False)]
        kxx = (x @ x.T / d + 1) ** 3
        kyy = (y @ y.T / d + 1) ** 3
        kxy = (x @ y.T / d + 1) ** 3
        mmd = ((kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (m * (m - 1))
               - 2 * kxy.mean())
        values.append(mmd)
    return float(np.mean(values)), float(np.std(values))


def mean_pairwise_distance(x: np.ndarray) -> float:
    """Mean L2 distance over distinct pairs of rows (NaN for fewer than 2 rows)."""
    if len(x) < 2:
        return float("nan")
    t = torch.from_numpy(np.asarray(x, np.float32))
    d = torch.cdist(t, t)
    n = len(x)
    return float(d.sum() / (n * (n - 1)))


def nearest_neighbour_distances(queries: np.ndarray, reference: np.ndarray, chunk: int = 512) -> np.ndarray:
    """L2 distance from each query row to its nearest reference row."""
    ref = torch.from_numpy(np.asarray(reference, np.float32))
    q = torch.from_numpy(np.asarray(queries, np.float32))
    out = [torch.cdist(q[i:i + chunk], ref, compute_mode="donot_use_mm_for_euclid_dist").min(dim=1).values
           for i in range(0, len(q), chunk)]
    return torch.cat(out).numpy() if out else np.zeros(0, np.float32)


# ---------------------------------------------------------------------------------------------
# Digits: reference data, classifier, features (cached)
# ---------------------------------------------------------------------------------------------
def _pool(images: torch.Tensor, size: int) -> np.ndarray:
    return F.adaptive_avg_pool2d(images.float(), size).flatten(1).numpy()


@dataclass(frozen=True)
class DigitsReference:
    """Everything fitted once on the real digits: classifier, feature PCA, calibrations."""

    classifier: Any
    pca: Any
    train_pixels: np.ndarray          # (N_train, 1024) in [-1, 1]
    train_features: np.ndarray
    train_labels: np.ndarray
    test_pixels: np.ndarray
    test_labels: np.ndarray
    test_features: np.ndarray
    classifier_accuracy: float        # held-out accuracy on the test split
    frechet_floor: float              # all real train vs real test
    near_copy_threshold: float        # 1st percentile of test->train NN distances
    real_mean_nn_distance: float      # mean test->train NN distance
    real_diversity: dict[int, float]  # mean pairwise distance per class, test split


def classifier_inputs(images: torch.Tensor) -> np.ndarray:
    """(N, 1, 32, 32) in [-1, 1] -> the classifier's 8x8 area-pooled features."""
    return _pool(images, CLASSIFIER_POOL)


@functools.lru_cache(maxsize=1)
def digits_reference() -> DigitsReference:
    """Fit the classifier and PCA on the real train split and calibrate on the test split (cached)."""
    from sklearn.decomposition import PCA
    from sklearn.svm import SVC

    from .data import load_digits

    x_train, y_train = load_digits("train", DIGITS_EVAL_SIZE)
    x_test, y_test = load_digits("test", DIGITS_EVAL_SIZE)
    y_train_np, y_test_np = y_train.numpy(), y_test.numpy()
    clf = SVC(C=10.0, gamma="scale").fit(classifier_inputs(x_train), y_train_np)
    accuracy = float((clf.predict(classifier_inputs(x_test)) == y_test_np).mean())
    pca = PCA(n_components=FEATURE_DIMS, random_state=0).fit(_pool(x_train, FEATURE_POOL))
    train_features = pca.transform(_pool(x_train, FEATURE_POOL))
    test_features = pca.transform(_pool(x_test, FEATURE_POOL))
    train_pixels = x_train.flatten(1).numpy()
    test_pixels = x_test.flatten(1).numpy()
    nn = nearest_neighbour_distances(test_pixels, train_pixels)
    diversity = {c: mean_pairwise_distance(test_pixels[y_test_np == c]) for c in range(10)}
    return DigitsReference(
        classifier=clf, pca=pca, train_pixels=train_pixels, train_features=train_features, train_labels=y_train_np,
        test_pixels=test_pixels, test_labels=y_test_np, test_features=test_features,
        classifier_accuracy=accuracy, frechet_floor=frechet_distance_features(train_features, test_features),
        near_copy_threshold=float(np.percentile(nn, NEAR_COPY_PERCENTILE)),
        real_mean_nn_distance=float(nn.mean()), real_diversity=diversity,
    )


@functools.lru_cache(maxsize=32)
def frechet_floor(n: int, repeats: int = 5) -> float:
    """Fréchet distance of `n` random real train digits to the test split (mean of `repeats` fixed-seed
    draws): the floor for a generated set of the same size, since the estimate is biased upwards at small n."""
    ref = digits_reference()
    n_train = len(ref.train_features)
    if n >= n_train:
        return ref.frechet_floor
    if n < 2:
        return float("nan")
    rng = np.random.default_rng(0)
    return float(np.mean([frechet_distance_features(ref.train_features[rng.choice(n_train, n, replace=False)],
                                                    ref.test_features) for _ in range(repeats)]))


def digits_features(images: torch.Tensor) -> np.ndarray:
    """The fixed Fréchet feature space for digits (see `FEATURE_DESCRIPTION`)."""
    return digits_reference().pca.transform(_pool(_prepare_digits(images), FEATURE_POOL))


def _prepare_digits(images: torch.Tensor) -> torch.Tensor:
    """Check/convert images to (N, 1, 32, 32) float in [-1, 1] (clamped; other sizes resized)."""
    images = torch.as_tensor(images).detach().float().cpu()
    if images.ndim == 3:
        images = images.unsqueeze(1)
    if images.ndim != 4 or images.shape[1] != 1:
        raise EvalError(f"digits evaluation needs (N, 1, H, W) grayscale images, got shape {tuple(images.shape)}")
    if images.shape[0] == 0:
        raise EvalError("no images to evaluate")
    if images.shape[-2:] != (DIGITS_EVAL_SIZE, DIGITS_EVAL_SIZE):
        images = F.interpolate(images, size=(DIGITS_EVAL_SIZE, DIGITS_EVAL_SIZE), mode="bicubic",
                               align_corners=False, antialias=True)
    return images.clamp(-1, 1)


def evaluate_digit_images(images: torch.Tensor, labels: torch.Tensor | Sequence[int]) -> dict[str, Any]:
    """Digits metrics for given images (N, 1, H, W) in [-1, 1] and their requested labels (N,)."""
    ref = digits_reference()
    images = _prepare_digits(images)
    labels_np = np.asarray(torch.as_tensor(labels).cpu().numpy(), dtype=np.int64).reshape(-1)
    if len(labels_np) != len(images):
        raise EvalError(f"got {len(labels_np)} labels for {len(images)} images")
    if labels_np.min() < 0 or labels_np.max() > 9:
        raise EvalError("digit labels must be in 0..9")
    predictions = ref.classifier.predict(classifier_inputs(images))
    agree = predictions == labels_np
    pixels = images.flatten(1).numpy()
    nn = nearest_neighbour_distances(pixels, ref.train_pixels)
    features = ref.pca.transform(_pool(images, FEATURE_POOL))
    frechet = frechet_distance_features(features, ref.test_features) if len(images) >= 2 else float("nan")
    per_class_agreement: dict[str, float] = {}
    per_class_diversity: dict[str, dict[str, float]] = {}
    for c in range(10):
        mask = labels_np == c
        if not mask.any():
            continue
        per_class_agreement[str(c)] = float(agree[mask].mean())
        per_class_diversity[str(c)] = {"generated": mean_pairwise_distance(pixels[mask]),
                                       "real": ref.real_diversity[c]}
    gen_div = [v["generated"] for v in per_class_diversity.values() if not math.isnan(v["generated"])]
    real_div = [ref.real_diversity[int(c)] for c, v in per_class_diversity.items() if not math.isnan(v["generated"])]
    diversity_generated = float(np.mean(gen_div)) if gen_div else float("nan")
    diversity_real = float(np.mean(real_div)) if real_div else float("nan")
    return {
        "num_images": int(len(images)),
        "classifier": {"description": CLASSIFIER_DESCRIPTION, "heldout_accuracy": ref.classifier_accuracy},
        "classifier_agreement": float(agree.mean()),
        "per_class_agreement": per_class_agreement,
        "frechet_distance": frechet,
        "frechet_floor_train_vs_test": frechet_floor(len(images)),
        "frechet_floor_full_train_vs_test": ref.frechet_floor,
        "feature_space": FEATURE_DESCRIPTION,
        "near_copy_rate": float((nn < ref.near_copy_threshold).mean()),
        "near_copy_threshold": ref.near_copy_threshold,
        "mean_nn_distance": float(nn.mean()),
        "real_mean_nn_distance_test_to_train": ref.real_mean_nn_distance,
        "diversity": {
            "generated": diversity_generated,
            "real": diversity_real,
            "ratio": diversity_generated / diversity_real if diversity_real else float("nan"),
            "per_class": per_class_diversity,
        },
    }


# ---------------------------------------------------------------------------------------------
# Digits: sampling a model
# ---------------------------------------------------------------------------------------------
def _model_config(model: torch.nn.Module) -> dict[str, Any]:
    return dict(getattr(model, "config", {}) or {})


def check_digits_model(model: torch.nn.Module, meta: dict[str, Any] | None = None) -> None:
    """Raise `EvalError` unless the model is a class-conditional digits model (10 classes, 1 channel)."""
    cfg = _model_config(model)
    meta = meta or {}
    num_classes, channels, size = cfg.get("num_classes"), cfg.get("in_channels"), cfg.get("input_size")
    problems = []
    if num_classes != 10:
        problems.append(f"num_classes={num_classes} (digits need 10)")
    if channels != 1:
        problems.append(f"in_channels={channels} (digits are 1-channel pixels)")
    if meta.get("data") != "digits" and size != DIGITS_EVAL_SIZE:
        problems.append(f"input_size={size} (digits evaluation expects 32x32, or studio.json data=\"digits\")")
    if meta.get("vae"):
        problems.append("it is a latent model (studio.json has a vae)")
    if problems:
        raise EvalError("not a digits model: " + "; ".join(problems) + ". For other models, sample images with "
                        "`python sample.py --checkpoint CKPT --output DIR` and compare folders with "
                        "`python -m dit.eval --fake DIR --real REAL_DIR`.")


def sample_digits(model: torch.nn.Module, meta: dict[str, Any] | None = None, num_per_class: int = 50,
                  scheduler: str | None = None, steps: int | None = None, cfg_scale: float | None = None,
                  seed: int = 0, batch_size: int = 100, device: str | torch.device | None = None,
                  progress: bool = True) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """Sample `num_per_class` images of each digit; image i (class-major order) uses seed `seed + i`.

    Returns (images (N, 1, H, W), labels (N,), the sampling settings used).
    """
    from .checkpoint import DEFAULT_STUDIO
    from .schedulers import sample

    meta = {**DEFAULT_STUDIO, **(meta or {})}
    check_digits_model(model, meta)
    if num_per_class < 1:
        raise EvalError("--num-per-class must be at least 1")
    if batch_size < 1:
        raise EvalError("--batch-size must be at least 1")
    cfg = _model_config(model)
    settings = {
        "scheduler": scheduler or meta["default_scheduler"],
        "steps": int(steps if steps is not None else meta["default_steps"]),
        "cfg_scale": float(cfg_scale if cfg_scale is not None else meta["default_cfg_scale"]),
        "objective": meta["objective"],
        "seed": int(seed),
        "num_per_class": int(num_per_class),
        "batch_size": int(batch_size),
    }
    if device is None:
        try:
            device = next(model.parameters()).device
        except StopIteration:
            device = "cpu"
    model = model.to(device).eval()
    dtype = next(model.parameters()).dtype
    size = int(cfg.get("input_size", DIGITS_EVAL_SIZE))
    labels = torch.arange(10).repeat_interleave(num_per_class)
    seeds = [seed + i for i in range(len(labels))]
    out = []
    starts = range(0, len(labels), batch_size)
    for start in tqdm(starts, desc="eval batches", disable=not progress):
        out.append(sample(model, labels[start:start + batch_size], seeds[start:start + batch_size], (1, size, size),
                          scheduler_name=settings["scheduler"], steps=settings["steps"],
                          cfg_scale=settings["cfg_scale"], objective=settings["objective"],
                          learn_sigma=bool(cfg.get("learn_sigma", True)), null_class=int(cfg["num_classes"]),
                          device=device, dtype=dtype, clip_denoised=True, progress=progress,
                          desc="sampling").float().cpu())
    return torch.cat(out), labels, settings


def evaluate_digits(model: torch.nn.Module, meta: dict[str, Any] | None = None, num_per_class: int = 50,
                    scheduler: str | None = None, steps: int | None = None, cfg_scale: float | None = None,
                    seed: int = 0, batch_size: int = 100, device: str | torch.device | None = None,
                    progress: bool = True, data: str = "digits") -> dict[str, Any]:
    """Sample a digits model (studio defaults unless overridden) and return `evaluate_digit_images`' metrics.

    `data="digits-inverted"` (a model adapted to dark strokes on white): the report's `background` says
    whether the samples' background is white, and the classifier judges the inverted-back images.
    """
    if data not in ("digits", "digits-inverted"):
        raise EvalError(f"unknown digits data {data!r}; use digits or digits-inverted")
    t0 = time.perf_counter()
    images, labels, settings = sample_digits(model, meta, num_per_class, scheduler, steps, cfg_scale, seed,
                                             batch_size, device, progress)
    t1 = time.perf_counter()
    results: dict[str, Any] = {"mode": data, "sampling": settings}
    if data == "digits-inverted":
        results["background"] = background_report(images)
        images = -images  # inverted back: the classifier and references know light strokes on black
    results.update(evaluate_digit_images(images, labels))
    results["seconds"] = {"sampling": round(t1 - t0, 3), "metrics": round(time.perf_counter() - t1, 3)}
    return results


def background_report(images: torch.Tensor, white: float = 0.75, corner: int = 4) -> dict[str, Any]:
    """Brightness of each image's background, read in its four `corner` x `corner` corners (of 32 x 32, in
    [0, 1]; 1 = white; digit strokes reach the borders but not the corners). digits-inverted samples should
    have a white background: an image counts as white-background when its corner mean > `white` (real
    digits-inverted test images: 100% at 0.75, mean 0.99)."""
    x = (_prepare_digits(images)[:, 0] + 1) / 2
    k = corner
    corners = torch.cat([x[:, :k, :k], x[:, :k, -k:], x[:, -k:, :k], x[:, -k:, -k:]], dim=1).flatten(1).mean(dim=1)
    fraction = float((corners > white).float().mean())
    return {"corner_mean": float(corners.mean()), "white_fraction": fraction, "white_threshold": white,
            "white": fraction >= 0.95,
            "description": f"mean of the four {k}x{k} corners per image, 0 black .. 1 white; white if > {white} "
                           "in at least 95% of images"}


def check_thresholds(results: dict[str, Any], min_agreement: float = 0.95, max_near_copy_rate: float | None = None,
                     max_frechet_ratio: float | None = None) -> tuple[bool, list[str]]:
    """Pass/fail of digits results -> (passed, reasons for failure; empty when passed).

    `max_frechet_ratio` bounds frechet_distance / frechet_floor_train_vs_test; None skips a check.
    """
    reasons = []
    agreement = results.get("classifier_agreement")
    if agreement is None:
        raise EvalError("results have no classifier_agreement; pass the dict returned by evaluate_digits")
    if agreement < min_agreement:
        worst = sorted(results.get("per_class_agreement", {}).items(), key=lambda kv: kv[1])[:3]
        reasons.append(f"classifier_agreement {agreement:.3f} < {min_agreement:.3f} (worst classes: "
                       + ", ".join(f"{c}={v:.2f}" for c, v in worst) + ")")
    if max_near_copy_rate is not None and results["near_copy_rate"] > max_near_copy_rate:
        reasons.append(f"near_copy_rate {results['near_copy_rate']:.3f} > {max_near_copy_rate:.3f} (memorisation)")
    if max_frechet_ratio is not None:
        floor = results["frechet_floor_train_vs_test"]
        ratio = results["frechet_distance"] / floor if floor > 0 else float("inf")
        if not ratio <= max_frechet_ratio:
            reasons.append(f"frechet_distance {results['frechet_distance']:.3f} is {ratio:.2f}x the real floor "
                           f"{floor:.3f} (> {max_frechet_ratio:.2f}x)")
    return not reasons, reasons


def format_digits_table(results: dict[str, Any]) -> str:
    """A readable plain-text table of digits results."""
    def f(v: Any) -> str:
        return "nan" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.4f}"

    s = results.get("sampling", {})
    rows = [
        ("images", str(results["num_images"])),
        ("classifier held-out accuracy", f(results["classifier"]["heldout_accuracy"])),
        ("classifier_agreement", f(results["classifier_agreement"])),
        ("frechet_distance (real floor, same n)",
         f"{f(results['frechet_distance'])} ({f(results['frechet_floor_train_vs_test'])})"),
        ("near_copy_rate (threshold)", f"{f(results['near_copy_rate'])} (NN < {f(results['near_copy_threshold'])})"),
        ("mean NN distance (real test)",
         f"{f(results['mean_nn_distance'])} ({f(results['real_mean_nn_distance_test_to_train'])})"),
        ("diversity generated / real", f"{f(results['diversity']['generated'])} / {f(results['diversity']['real'])}"),
    ]
    if results.get("background"):
        b = results["background"]
        rows.insert(0, ("background (digits-inverted)", f"corner mean {f(b['corner_mean'])}, white in "
                        f"{100 * b['white_fraction']:.1f}% of images -> {'white' if b['white'] else 'NOT white'}"))
    if s:
        rows.insert(0, ("sampling", f"{s['scheduler']}, {s['steps']} steps, cfg {s['cfg_scale']}, seed {s['seed']}"))
    width = max(len(k) for k, _ in rows)
    lines = [f"{k.ljust(width)}  {v}" for k, v in rows]
    classes = sorted(results["per_class_agreement"], key=int)
    lines.append("")
    lines.append("class      " + " ".join(c.rjust(6) for c in classes))
    lines.append("agreement  " + " ".join(f"{results['per_class_agreement'][c]:6.2f}" for c in classes))
    per = results["diversity"]["per_class"]
    lines.append("div gen    " + " ".join(f"{per[c]['generated']:6.2f}" for c in classes))
    lines.append("div real   " + " ".join(f"{per[c]['real']:6.2f}" for c in classes))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Image folders: feature extractors, FID / KID
# ---------------------------------------------------------------------------------------------
class FeatureExtractor:
    """Maps a batch of RGB images (N, 3, S, S) in [0, 1] to (N, D) features; S = `input_size`."""

    name: str = "base"
    input_size: int = 64
    comparable_to_published: bool = False

    def __call__(self, images: torch.Tensor) -> np.ndarray:  # pragma: no cover - interface
        raise NotImplementedError


ExtractorFactory = Callable[..., FeatureExtractor]
FEATURE_EXTRACTORS: dict[str, ExtractorFactory] = {}


def register_feature_extractor(name: str) -> Callable[[ExtractorFactory], ExtractorFactory]:
    """Decorator adding a feature-extractor factory to `FEATURE_EXTRACTORS` under `name`."""
    def wrap(factory: ExtractorFactory) -> ExtractorFactory:
        FEATURE_EXTRACTORS[name] = factory
        return factory
    return wrap


@register_feature_extractor("pixels")
class PixelFeatures(FeatureExtractor):
    """Raw RGB pixels, area-downsampled to `size` x `size` (default 8: 192 dims). Not a published FID."""

    name = "pixels"

    def __init__(self, size: int = 8, **_: Any):
        self.size = int(size)
        self.input_size = max(32, self.size)

    def __call__(self, images: torch.Tensor) -> np.ndarray:
        return F.adaptive_avg_pool2d(images.float(), self.size).flatten(1).numpy().astype(np.float64)


@register_feature_extractor("random-conv")
class RandomConvFeatures(FeatureExtractor):
    """A fixed-seed random conv net (3 stride-2 convs + ReLU, mean/max pooled, 256 dims). Not a published FID."""

    name = "random-conv"
    input_size = 64

    def __init__(self, seed: int = 0, **_: Any):
        g = torch.Generator("cpu").manual_seed(int(seed))
        chans = [3, 32, 64, 128]
        self.weights = []
        for cin, cout in zip(chans[:-1], chans[1:]):
            w = torch.randn(cout, cin, 3, 3, generator=g) * math.sqrt(2.0 / (cin * 9))
            b = torch.randn(cout, generator=g) * 0.01
            self.weights.append((w, b))

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> np.ndarray:
        x = images.float() * 2 - 1
        for w, b in self.weights:
            x = F.relu(F.conv2d(x, w, b, stride=2, padding=1))
        return torch.cat([x.mean(dim=(2, 3)), x.amax(dim=(2, 3))], dim=1).numpy().astype(np.float64)


@register_feature_extractor("inception")
class InceptionFeatures(FeatureExtractor):
    """Inception-v3 pool features from a LOCAL TorchScript file (e.g. `inception-2015-12-05.pt` of the
    StyleGAN/ADM FID code, called as `net(uint8-range images, return_features=True)` -> (N, 2048)).

    The studio never downloads weights; without `weights` this raises with the fix.
    """

    name = "inception"
    input_size = 299
    comparable_to_published = True

    def __init__(self, weights: str | Path | None = None, device: str = "cpu", **_: Any):
        if not weights:
            raise EvalError("the inception feature extractor needs local weights: pass --inception-weights PATH "
                            "(a TorchScript Inception-v3 such as inception-2015-12-05.pt). The studio never "
                            "downloads; or use --features pixels|random-conv (not comparable to published FID).")
        path = Path(weights)
        if not path.is_file():
            raise EvalError(f"--inception-weights {path} does not exist; give the path of a local TorchScript "
                            "Inception-v3 file (the studio never downloads weights)")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit.load is deprecated in torch 2.x
                self.net = torch.jit.load(str(path), map_location=device).eval()
        except Exception as exc:  # noqa: BLE001 - re-raised with the fix
            raise EvalError(f"{path} is not a TorchScript Inception-v3 ({type(exc).__name__}: {exc}). Only "
                            "TorchScript files are supported (e.g. inception-2015-12-05.pt), not state dicts "
                            "or safetensors.") from exc
        self.device = device

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> np.ndarray:
        x = (images.float() * 255).round().to(self.device)
        try:
            feats = self.net(x, return_features=True)
        except (RuntimeError, TypeError):
            feats = self.net(x)
        return feats.reshape(len(images), -1).double().cpu().numpy()


def get_feature_extractor(name: str, **kwargs: Any) -> FeatureExtractor:
    """Build the extractor registered as `name` (kwargs such as weights=... go to its factory)."""
    if name not in FEATURE_EXTRACTORS:
        raise EvalError(f"unknown feature extractor {name!r}; valid: {', '.join(FEATURE_EXTRACTORS)}")
    return FEATURE_EXTRACTORS[name](**kwargs)


def list_images(folder: str | Path, exclude: Sequence[str] = ("grid*",)) -> list[Path]:
    """Image files directly in `folder` (sorted), skipping names matching any `exclude` glob."""
    folder = Path(folder)
    if not folder.exists():
        raise EvalError(f"image folder {folder} does not exist")
    if not folder.is_dir():
        raise EvalError(f"{folder} is not a folder; pass a folder of images")
    files = sorted(p for p in folder.iterdir()
                   if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
                   and not any(fnmatch.fnmatch(p.name, pat) for pat in exclude))
    if len(files) < 2:
        raise EvalError(f"image folder {folder} has {len(files)} image(s) ({', '.join(IMAGE_EXTENSIONS)}; "
                        f"excluding {', '.join(exclude) or 'nothing'}); FID/KID need at least 2 — and hundreds "
                        "or thousands for stable numbers")
    return files


def load_images(files: Sequence[Path], size: int) -> torch.Tensor:
    """Load files as RGB, resize to size x size (bicubic), -> (N, 3, size, size) in [0, 1]."""
    from PIL import Image

    out = []
    for p in files:
        try:
            with Image.open(p) as im:
                im = im.convert("RGB").resize((size, size), Image.BICUBIC)
                out.append(torch.from_numpy(np.asarray(im, dtype=np.uint8).copy()))
        except OSError as exc:
            raise EvalError(f"cannot read image {p}: {exc}") from exc
    return torch.stack(out).permute(0, 3, 1, 2).float() / 255.0


def folder_features(folder: str | Path, extractor: FeatureExtractor, batch_size: int = 64,
                    exclude: Sequence[str] = ("grid*",), progress: bool = True) -> np.ndarray:
    """Features (N, D) of every image in `folder` (or in an ADM-layout `.npz`, arr_0 uint8 NHWC), in batches."""
    if str(folder).endswith(".npz"):
        from .fid_sampling import npz_count, npz_image_batches

        if not Path(folder).is_file():
            raise EvalError(f"{folder} does not exist")
        total = math.ceil(npz_count(folder) / batch_size)
        return np.concatenate([extractor(b) for b in tqdm(npz_image_batches(folder, extractor.input_size, batch_size),
                                                          total=total, desc=f"features {Path(folder).name}",
                                                          disable=not progress)])
    files = list_images(folder, exclude)
    feats = []
    for i in tqdm(range(0, len(files), batch_size), desc=f"features {Path(folder).name}", disable=not progress):
        feats.append(extractor(load_images(files[i:i + batch_size], extractor.input_size)))
    return np.concatenate(feats)


def evaluate_folders(fake: str | Path, real: str | Path, features: str = "pixels",
                     inception_weights: str | Path | None = None, kid_subsets: int = 100,
                     kid_subset_size: int = 1000, batch_size: int = 64, exclude: Sequence[str] = ("grid*",),
                     progress: bool = True) -> dict[str, Any]:
    """FID and KID between two image folders with the named feature extractor."""
    kwargs: dict[str, Any] = {"weights": inception_weights} if features == "inception" else {}
    extractor = get_feature_extractor(features, **kwargs)
    f_fake = folder_features(fake, extractor, batch_size, exclude, progress)
    f_real = folder_features(real, extractor, batch_size, exclude, progress)
    kid_mean, kid_std = kernel_inception_distance(f_fake, f_real, kid_subsets, kid_subset_size)
    return {
        "mode": "folders",
        "fake": str(fake), "real": str(real),
        "num_fake": int(len(f_fake)), "num_real": int(len(f_real)),
        "features": features, "feature_dim": int(f_fake.shape[1]),
        "comparable_to_published_fid": bool(extractor.comparable_to_published),
        "fid": frechet_distance_features(f_fake, f_real),
        "kid": kid_mean, "kid_std": kid_std,
        "kid_subsets": int(kid_subsets), "kid_subset_size": int(min(kid_subset_size, len(f_fake), len(f_real))),
    }


def format_folders_table(results: dict[str, Any]) -> str:
    """A readable plain-text table of folder results."""
    note = "" if results["comparable_to_published_fid"] else "  (not comparable to published FID)"
    rows = [("fake", f"{results['fake']} ({results['num_fake']} images)"),
            ("real", f"{results['real']} ({results['num_real']} images)"),
            ("features", f"{results['features']} ({results['feature_dim']} dims){note}"),
            ("FID", f"{results['fid']:.4f}"),
            ("KID", f"{results['kid']:.6f} ± {results['kid_std']:.6f}")]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)


# ---------------------------------------------------------------------------------------------
# Loading and CLI
# ---------------------------------------------------------------------------------------------
def load_checkpoint(path: str | Path, device: str | None = None) -> tuple[torch.nn.Module, dict[str, Any]]:
    """(model, studio meta) of any checkpoint `dit.convert.load_any` reads."""
    from .convert import load_any

    return load_any(str(path), device=device)


def _json_safe(o: Any) -> Any:
    """NaN/inf -> None (strict JSON), numpy scalars -> Python, recursively."""
    if isinstance(o, dict):
        return {str(k): _json_safe(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_json_safe(v) for v in o]
    if isinstance(o, (np.floating, np.integer)):
        o = o.item()
    if isinstance(o, float) and not math.isfinite(o):
        return None
    return o


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o)}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m dit.eval",
        description="Evaluate a digits checkpoint (classifier agreement, Fréchet distance, near copies, diversity) "
                    "or compute FID/KID between two image folders.")
    p.add_argument("checkpoint", nargs="?", help="digits checkpoint folder (digits mode)")
    p.add_argument("--num-per-class", type=int, default=50, help="images sampled per class (default 50)")
    p.add_argument("--scheduler", default=None, help="sampler (default: the checkpoint's studio.json)")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: studio.json)")
    p.add_argument("--cfg-scale", type=float, default=None, help="CFG scale (default: studio.json)")
    p.add_argument("--seed", type=int, default=0, help="image i uses seed SEED+i (default 0)")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cpu)")
    p.add_argument("--min-agreement", type=float, default=None,
                   help="if given, exit with status 1 when classifier_agreement is below it")
    p.add_argument("--data", default="digits", choices=("digits", "digits-inverted"),
                   help="digits-inverted: judge inverted-back samples and report whether the background is white")
    p.add_argument("--adapter", action="append", default=None, metavar="FILE",
                   help="apply this adapter file to the checkpoint while sampling (repeatable)")
    p.add_argument("--adapter-scale", action="append", type=float, default=None, metavar="S",
                   help="strength of each --adapter, in order (default 1.0)")
    p.add_argument("--fake", default=None,
                   help="folder of generated images, or a .npz from `sample.py --fid-npz` (folder mode)")
    p.add_argument("--real", default=None, help="folder of real images, or a reference .npz (ADM layout: arr_0 "
                                                "uint8 NHWC) (folder mode)")
    p.add_argument("--features", default="pixels", help=f"feature extractor: {', '.join(FEATURE_EXTRACTORS)}")
    p.add_argument("--inception-weights", default=None, help="local TorchScript Inception-v3 (never downloaded)")
    p.add_argument("--kid-subsets", type=int, default=100)
    p.add_argument("--kid-subset-size", type=int, default=1000)
    p.add_argument("--exclude", nargs="*", default=["grid*"], help="file-name globs to skip (default: grid*)")
    p.add_argument("--out", default=None, help="write results JSON here")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit status (0 ok, 1 thresholds failed, 2 bad input)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    folder_mode = args.fake is not None or args.real is not None
    if folder_mode and args.checkpoint:
        parser.error("give either a checkpoint (digits mode) or --fake/--real (folder mode), not both")
    if not folder_mode and not args.checkpoint:
        parser.error("give a digits CHECKPOINT, or --fake DIR --real DIR to compare image folders")
    if folder_mode and (args.fake is None or args.real is None):
        parser.error("folder mode needs both --fake DIR and --real DIR")
    progress = not args.no_progress
    try:
        if folder_mode:
            results = evaluate_folders(args.fake, args.real, args.features, args.inception_weights,
                                       args.kid_subsets, args.kid_subset_size, exclude=args.exclude,
                                       progress=progress)
            table = format_folders_table(results)
        else:
            if not Path(args.checkpoint).exists():
                raise EvalError(f"checkpoint {args.checkpoint} does not exist")
            model, meta = load_checkpoint(args.checkpoint, args.device)
            check_digits_model(model, meta)
            from .adapters import adapters_applied
            from .cli.sample import adapter_list

            with adapters_applied(model, adapter_list(args)) as applied:
                results = evaluate_digits(model, meta, args.num_per_class, args.scheduler, args.steps,
                                          args.cfg_scale, args.seed, args.batch_size, args.device, progress, args.data)
            results["checkpoint"] = str(args.checkpoint)
            if applied:
                results["adapters"] = applied
            table = format_digits_table(results)
    except (ValueError, FileNotFoundError) as exc:  # EvalError, CheckpointError, an unknown scheduler, ...
        print(f"error: {exc}", file=sys.stderr)
        return 2
    status = 0
    if not folder_mode and args.min_agreement is not None:
        passed, reasons = check_thresholds(results, args.min_agreement)
        results["thresholds"] = {"min_agreement": args.min_agreement, "passed": passed, "reasons": reasons}
        if not passed:
            table += "\nFAILED: " + "; ".join(reasons)
            status = 1
    print(table)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(_json_safe(results), indent=2, default=_json_default))
        print(f"wrote {out}")
    return status


if __name__ == "__main__":
    sys.exit(main())
