"""Samplers and sample.py: reproducibility, batch-size invariance, CFG, metadata, bad input."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from dit import DiT
from dit.checkpoint import save_checkpoint
from dit.cli.sample import main as sample_main
from dit.pipeline import generate, read_png_parameters
from dit.schedulers import SAMPLERS, sample


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    m = DiT(input_size=16, patch_size=4, in_channels=1, hidden_size=32, depth=2, num_heads=2, num_classes=10)
    for p in m.parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.05)
    folder = tmp_path_factory.mktemp("ckpt") / "tiny-digits"
    save_checkpoint(m, folder, {"objective": "ddpm", "default_scheduler": "ddim", "default_steps": 6,
                                "default_cfg_scale": 2.0, "class_names": [str(i) for i in range(10)]})
    return folder


@pytest.fixture(scope="module")
def model(checkpoint):
    return DiT.from_pretrained(checkpoint).eval()


def pixels(im: Image.Image) -> np.ndarray:
    return np.asarray(im, dtype=np.int16)


@pytest.mark.parametrize("name", [n for n in SAMPLERS if not n.startswith("flow")])
def test_every_ddpm_sampler_is_reproducible_and_batch_size_invariant(model, name):
    labels, seeds = [1, 2, 3], [11, 12, 13]
    a = generate(model, labels, seeds, scheduler=name, steps=4, cfg_scale=2.0, batch_size=3, progress=False)
    b = generate(model, labels, seeds, scheduler=name, steps=4, cfg_scale=2.0, batch_size=1, progress=False)
    c = generate(model, labels[1:2], seeds[1:2], scheduler=name, steps=4, cfg_scale=2.0, progress=False)
    for i in range(3):
        assert np.array_equal(pixels(a.images[i]), pixels(b.images[i])), (name, i)
    assert np.array_equal(pixels(a.images[1]), pixels(c.images[0]))
    assert not np.array_equal(pixels(a.images[0]), pixels(a.images[1]))


def test_flow_samplers_run_for_flow_models_only(model):
    x = sample(model, torch.tensor([1]), [0], (1, 16, 16), "flow-euler", 3, 1.0, "flow", True, 10, progress=False)
    assert torch.isfinite(x).all()
    with pytest.raises(ValueError, match="cannot sample a model trained with the 'ddpm' objective.*ddim"):
        sample(model, torch.tensor([1]), [0], (1, 16, 16), "flow-euler", 3, 1.0, "ddpm", True, 10)


def test_cfg_scale_one_is_the_conditional_model_and_guidance_changes_images(model):
    calls = []

    def spy(x, t, y):
        calls.append(y.clone())
        return model(x, t, y)

    sample(spy, torch.tensor([4, 5]), [0, 1], (1, 16, 16), "ddim", 2, 1.0, "ddpm", True, 10, progress=False)
    assert all(len(y) == 2 and (y != 10).all() for y in calls)  # no unconditional pass at scale 1
    calls.clear()
    sample(spy, torch.tensor([4, 5]), [0, 1], (1, 16, 16), "ddim", 2, 3.0, "ddpm", True, 10, progress=False)
    assert all(torch.equal(y, torch.tensor([4, 5, 10, 10])) for y in calls)  # null class = num_classes
    g1 = sample(model, torch.tensor([4]), [0], (1, 16, 16), "ddim", 3, 1.0, "ddpm", True, 10, progress=False)
    g4 = sample(model, torch.tensor([4]), [0], (1, 16, 16), "ddim", 3, 4.0, "ddpm", True, 10, progress=False)
    assert not torch.allclose(g1, g4)


def test_sample_cli_end_to_end_with_metadata_and_reproduction(checkpoint, tmp_path):
    out = tmp_path / "out"
    sample_main(["--checkpoint", str(checkpoint), "--labels", "3", "7", "--per-label", "2", "--seed", "5",
                 "--output", str(out), "--device", "cpu"])
    files = sorted(p.name for p in out.glob("*.png"))
    assert files == ["0000-class3-seed5.png", "0001-class3-seed6.png", "0002-class7-seed7.png",
                     "0003-class7-seed8.png", "grid.png"]
    with Image.open(out / "0002-class7-seed7.png") as im:
        text = dict(im.text)
        first = pixels(im)
    assert {k: text[k] for k in ("class_label", "seed", "steps", "cfg_scale", "scheduler", "model")} == {
        "class_label": "7", "seed": "7", "steps": "6", "cfg_scale": "2.0", "scheduler": "ddim",
        "model": "tiny-digits"}
    params = read_png_parameters(out / "0002-class7-seed7.png")
    assert params["class_name"] == "7" and json.loads(text["parameters"]) == params
    again = tmp_path / "again"
    sample_main(["--checkpoint", str(checkpoint), "--params-from", str(out / "0002-class7-seed7.png"),
                 "--output", str(again), "--no-grid"])
    with Image.open(again / "0000-class7-seed7.png") as im:
        assert np.array_equal(pixels(im), first)


def test_sample_cli_bad_input(checkpoint, tmp_path, capsys):
    with pytest.raises(SystemExit):
        sample_main(["--checkpoint", str(checkpoint), "--scheduler", "plms", "--output", str(tmp_path)])
    assert "Valid schedulers" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        sample_main(["--checkpoint", str(checkpoint), "--labels", "12", "--output", str(tmp_path)])
    assert "out of range" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        sample_main(["--checkpoint", str(tmp_path / "nope"), "--output", str(tmp_path)])
    assert "error" in capsys.readouterr().err
