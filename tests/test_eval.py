"""dit.eval: digits metrics on real/noise/copied digits, FID/KID on folders, the CLI and its errors."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dit import eval as ev
from dit.checkpoint import save_checkpoint
from dit.data import load_digits
from dit.model import DiT


@pytest.fixture(scope="module")
def ref() -> ev.DigitsReference:
    return ev.digits_reference()


@pytest.fixture(scope="module")
def test_digits() -> tuple[torch.Tensor, torch.Tensor]:
    return load_digits("test")


def balanced_labels(k: int) -> torch.Tensor:
    return torch.arange(10).repeat_interleave(k)


def test_classifier_heldout_accuracy(ref: ev.DigitsReference) -> None:
    assert ref.classifier_accuracy >= 0.95
    assert ev.digits_reference() is ref  # cached


def test_real_heldout_digits_score_well(test_digits) -> None:
    x, y = test_digits
    r = ev.evaluate_digit_images(x, y)
    assert r["classifier_agreement"] >= 0.95
    assert min(r["per_class_agreement"].values()) >= 0.85
    assert r["near_copy_rate"] <= 0.05
    assert r["frechet_distance"] <= 1.5 * r["frechet_floor_train_vs_test"]
    assert 0.8 < r["diversity"]["ratio"] < 1.2
    passed, reasons = ev.check_thresholds(r, min_agreement=0.95)
    assert passed and reasons == []


def test_noise_scores_badly(test_digits) -> None:
    g = torch.Generator().manual_seed(0)
    noise = torch.rand(300, 1, 32, 32, generator=g) * 2 - 1
    r = ev.evaluate_digit_images(noise, balanced_labels(30))
    assert r["classifier_agreement"] < 0.25
    assert r["frechet_distance"] > 20 * r["frechet_floor_train_vs_test"]
    assert r["near_copy_rate"] == 0.0
    passed, reasons = ev.check_thresholds(r, min_agreement=0.90)
    assert not passed and "classifier_agreement" in reasons[0]


def test_training_copies_are_near_copies(ref: ev.DigitsReference) -> None:
    x, y = load_digits("train")
    r = ev.evaluate_digit_images(x[:200], y[:200])
    assert r["near_copy_rate"] >= 0.99
    assert r["mean_nn_distance"] < 1e-3
    assert r["classifier_agreement"] >= 0.95
    passed, reasons = ev.check_thresholds(r, max_near_copy_rate=0.1)
    assert not passed and "near_copy_rate" in reasons[0]


def test_frechet_and_kid_basics() -> None:
    rng = np.random.default_rng(0)
    a = rng.normal(size=(400, 8))
    b = rng.normal(size=(400, 8)) + 3.0
    assert ev.frechet_distance_features(a, a) == pytest.approx(0.0, abs=1e-6)
    assert ev.frechet_distance_features(a, b) == pytest.approx(72.0, rel=0.1)  # ||mu||^2 = 8 * 9
    # near-singular covariances (fewer samples than dims) stay finite and non-negative
    c = rng.normal(size=(5, 20))
    assert np.isfinite(ev.frechet_distance_features(c, c + 0.1)) and ev.frechet_distance_features(c, c) < 1e-3
    same, _ = ev.kernel_inception_distance(a, rng.normal(size=(400, 8)), num_subsets=20, subset_size=200)
    far, _ = ev.kernel_inception_distance(a, b, num_subsets=20, subset_size=200)
    assert abs(same) < 0.05 and far > 1.0


def write_pngs(folder: Path, images: torch.Tensor) -> Path:
    """(N, 1, H, W) in [-1, 1] -> RGB PNGs in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    arr = ((images.clamp(-1, 1) + 1) * 127.5).round().byte().numpy()
    for i, im in enumerate(arr):
        Image.fromarray(im[0]).convert("RGB").save(folder / f"{i:04d}.png")
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory, test_digits) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("folders")
    x, _ = test_digits
    g = torch.Generator().manual_seed(1)
    real = write_pngs(root / "real", x[:80])
    Image.new("RGB", (64, 64), "white").save(real / "grid.png")  # skipped by the default exclude
    return {"real": real, "real2": write_pngs(root / "real2", x[80:160]),
            "noise": write_pngs(root / "noise", torch.rand(80, 1, 32, 32, generator=g) * 2 - 1),
            "empty": (root / "empty").mkdir() or root / "empty"}


@pytest.mark.parametrize("features", ["pixels", "random-conv"])
def test_folder_fid_kid(folders, features: str) -> None:
    kw = dict(features=features, kid_subsets=10, kid_subset_size=50, progress=False)
    self_r = ev.evaluate_folders(folders["real"], folders["real"], **kw)
    assert self_r["num_fake"] == 80 and not self_r["comparable_to_published_fid"]
    assert self_r["fid"] < 1e-3 * max(1.0, self_r["feature_dim"])
    real_r = ev.evaluate_folders(folders["real2"], folders["real"], **kw)
    noise_r = ev.evaluate_folders(folders["noise"], folders["real"], **kw)
    assert noise_r["fid"] > 5 * real_r["fid"] > 0
    assert noise_r["kid"] > 0 and noise_r["kid"] > 5 * abs(real_r["kid"])


def test_folder_errors(folders, tmp_path: Path, capsys) -> None:
    with pytest.raises(ev.EvalError, match="does not exist"):
        ev.evaluate_folders(tmp_path / "nope", folders["real"], progress=False)
    with pytest.raises(ev.EvalError, match="0 image"):
        ev.evaluate_folders(folders["empty"], folders["real"], progress=False)
    with pytest.raises(ev.EvalError, match="never downloads"):
        ev.get_feature_extractor("inception")
    bogus = tmp_path / "inception.pt"
    bogus.write_bytes(b"not a model")
    with pytest.raises(ev.EvalError, match="TorchScript"):
        ev.get_feature_extractor("inception", weights=bogus)
    with pytest.raises(ev.EvalError, match="valid: pixels"):
        ev.get_feature_extractor("vgg")
    assert ev.main(["--fake", str(folders["empty"]), "--real", str(folders["real"]), "--no-progress"]) == 2
    assert "0 image" in capsys.readouterr().err


def test_cli_folders_json(folders, tmp_path: Path) -> None:
    out = tmp_path / "fid.json"
    rc = ev.main(["--fake", str(folders["noise"]), "--real", str(folders["real"]), "--features", "pixels",
                  "--kid-subsets", "5", "--kid-subset-size", "40", "--out", str(out), "--no-progress"])
    assert rc == 0
    data = json.loads(out.read_text())
    assert {"fid", "kid", "kid_std", "features", "num_fake", "num_real"} <= set(data)


def tiny_dit(**overrides) -> DiT:
    kw = dict(input_size=32, patch_size=8, in_channels=1, hidden_size=32, depth=1, num_heads=2, num_classes=10)
    kw.update(overrides)
    torch.manual_seed(0)
    return DiT(**kw)


def test_cli_digits_checkpoint(tmp_path: Path, capsys) -> None:
    ckpt = save_checkpoint(tiny_dit(), tmp_path / "tiny", {"default_scheduler": "ddim", "default_steps": 50})
    out = tmp_path / "res.json"
    rc = ev.main([str(ckpt), "--num-per-class", "2", "--steps", "2", "--cfg-scale", "1.5", "--out", str(out),
                  "--no-progress"])
    assert rc == 0
    data = json.loads(out.read_text())
    for key in ("classifier_agreement", "per_class_agreement", "frechet_distance", "frechet_floor_train_vs_test",
                "near_copy_rate", "near_copy_threshold", "mean_nn_distance", "diversity", "classifier", "sampling"):
        assert key in data
    assert data["num_images"] == 20 and len(data["per_class_agreement"]) == 10
    assert data["sampling"] == {**data["sampling"], "scheduler": "ddim", "steps": 2, "cfg_scale": 1.5}
    assert "classifier_agreement" in capsys.readouterr().out
    # an untrained model fails a threshold: exit status 1
    assert ev.main([str(ckpt), "--num-per-class", "1", "--steps", "1", "--min-agreement", "0.95",
                    "--no-progress"]) == 1


def test_cli_digits_errors(tmp_path: Path, capsys) -> None:
    ckpt = save_checkpoint(tiny_dit(in_channels=3, num_classes=5), tmp_path / "rgb")
    assert ev.main([str(ckpt), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "not a digits model" in err and "--fake" in err
    assert ev.main([str(tmp_path / "missing"), "--no-progress"]) == 2
    assert "does not exist" in capsys.readouterr().err
    good = save_checkpoint(tiny_dit(), tmp_path / "tiny")
    assert ev.main([str(good), "--scheduler", "nope", "--num-per-class", "1", "--no-progress"]) == 2
    assert "Valid schedulers" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        ev.main([])
    with pytest.raises(ev.EvalError, match="not a digits model"):
        ev.evaluate_digits(tiny_dit(input_size=16), {}, num_per_class=1, steps=1, progress=False)
