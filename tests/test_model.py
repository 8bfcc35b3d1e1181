"""The backbone: original initialisation and layout, CFG, backends, any input size, checkpoints."""
from __future__ import annotations

import json

import pytest
import torch

from dit import DiT, model_kwargs
from dit.checkpoint import CheckpointError, save_checkpoint
from dit.config import DIT_PRESETS


def tiny(**kw) -> DiT:
    torch.manual_seed(0)
    m = DiT(input_size=16, patch_size=4, in_channels=1, hidden_size=32, depth=2, num_heads=2, num_classes=10, **kw)
    for p in m.parameters():  # adaLN-Zero makes a fresh model output 0: randomise so comparisons mean something
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.05)
    return m.eval()


def test_presets_match_the_paper_sizes():
    sizes = {"DiT-S/2": 32.96e6, "DiT-B/2": 130.51e6}
    for name, params in sizes.items():
        with torch.device("meta"):
            m = DiT(**model_kwargs(name))
        n = sum(p.numel() for p in m.parameters())
        assert abs(n - params) / params < 2e-3, (name, n)
        assert len(m.state_dict()) == 12 + 10 * DIT_PRESETS[name]["depth"]
    with pytest.raises(ValueError, match="Unknown model preset.*DiT-XL/2"):
        model_kwargs("DiT-XXL/2")


def test_fresh_model_outputs_zero_and_has_learned_sigma_channels():
    m = DiT(input_size=16, patch_size=4, in_channels=3, hidden_size=32, depth=2, num_heads=2, num_classes=5)
    out = m(torch.randn(2, 3, 16, 16), torch.tensor([0, 999]), torch.tensor([1, 5]))
    assert out.shape == (2, 6, 16, 16) and out.abs().max() == 0
    assert not m.pos_embed.requires_grad and "pos_embed" in m.state_dict()


def test_backends_agree_and_xformers_request_is_an_error_without_cuda():
    m = tiny()
    x, t, y = torch.randn(3, 1, 16, 16), torch.tensor([1, 500, 999]), torch.tensor([0, 3, 10])
    with torch.no_grad():
        ref = m(x, t, y)
        m.set_attention_backend("math")
        assert torch.allclose(m(x, t, y), ref, atol=1e-5)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="xformers"):
            m.set_attention_backend("xformers")
        with pytest.raises(ValueError, match="xformers"):
            DiT(input_size=16, patch_size=4, in_channels=1, hidden_size=32, depth=1, num_heads=2,
                attention_backend="xformers")
    with pytest.raises(ValueError, match="Valid backends"):
        m.set_attention_backend("flash9")


def test_any_input_size_and_clear_shape_errors():
    m = tiny()
    with torch.no_grad():
        out = m(torch.randn(1, 1, 24, 32), torch.tensor([10]), torch.tensor([2]))
    assert out.shape == (1, 2, 24, 32) and torch.isfinite(out).all()
    with pytest.raises(ValueError, match="not divisible by the patch size"):
        m(torch.randn(1, 1, 18, 16), torch.tensor([1]), torch.tensor([1]))
    with pytest.raises(ValueError, match=r"expected input of shape \(N, 1, H, W\)"):
        m(torch.randn(1, 3, 16, 16), torch.tensor([1]), torch.tensor([1]))


def test_forward_with_cfg_matches_manual_guidance_on_all_or_three_channels():
    m = DiT(input_size=16, patch_size=4, in_channels=4, hidden_size=32, depth=1, num_heads=2, num_classes=10)
    for p in m.parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.05)
    x = torch.randn(2, 4, 16, 16)
    x = torch.cat([x, x])
    t, y = torch.tensor([5, 5, 5, 5]), torch.tensor([1, 2, 10, 10])
    with torch.no_grad():
        out = m(x, t, y)
        cond, uncond = out[:2], out[2:]
        guided = m.forward_with_cfg(x, t, y, 4.0)
        assert torch.allclose(guided[:2, :4], uncond[:, :4] + 4.0 * (cond[:, :4] - uncond[:, :4]), atol=1e-5)
        assert torch.allclose(guided[:2, 4:], cond[:, 4:])
        legacy = m.forward_with_cfg(x, t, y, 4.0, cfg_channels=3)
        assert torch.allclose(legacy[:2, 3], cond[:, 3]) and not torch.allclose(legacy[:2, :3], cond[:, :3])


def test_hybrid_layout_and_bad_layout():
    m = DiT(input_size=16, patch_size=4, in_channels=1, hidden_size=32, depth=2, num_heads=2,
            attention="linear,softmax")
    assert m.block_attention == ["linear", "softmax"]
    with pytest.raises(ValueError, match="one name per block"):
        DiT(input_size=16, patch_size=4, in_channels=1, hidden_size=32, depth=3, num_heads=2,
            attention=["linear", "softmax"])
    with pytest.raises(ValueError, match="Unknown attention variant 'flashy'.*softmax"):
        DiT(input_size=16, patch_size=4, in_channels=1, hidden_size=32, depth=1, num_heads=2, attention="flashy")


def test_save_load_round_trip_and_mismatch_names_keys(tmp_path):
    m = tiny()
    folder = save_checkpoint(m, tmp_path / "ckpt", {"objective": "ddpm"})
    loaded = DiT.from_pretrained(folder).eval()
    x, t, y = torch.randn(2, 1, 16, 16), torch.tensor([3, 700]), torch.tensor([4, 10])
    with torch.no_grad():
        assert torch.equal(loaded(x, t, y), m(x, t, y))
    cfg = json.loads((folder / "config.json").read_text())
    cfg["hidden_size"] = 64
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"(?s)shape mismatch for .*checkpoint \(.*32.*\) vs config"):
        DiT.from_pretrained(folder)


def test_failed_save_never_replaces_a_good_checkpoint(tmp_path, monkeypatch):
    m = tiny()
    folder = save_checkpoint(m, tmp_path / "ckpt")
    before = (folder / "diffusion_pytorch_model.safetensors").read_bytes()

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(DiT, "save_pretrained", boom)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(m, folder)
    assert (folder / "diffusion_pytorch_model.safetensors").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no temp folder left behind


def test_forward_runs_on_the_meta_device():
    """Shape-only passes (FLOP counters, tracing tools) run the model on the meta device: nothing in the
    forward may need real data or ask autocast about a device it does not know."""
    with torch.device("meta"):
        m = DiT(input_size=16, patch_size=4, in_channels=1, hidden_size=32, depth=2, num_heads=2, num_classes=10,
                attention="proxy", attention_options={"window": [2, 2]})
        out = m(torch.randn(2, 1, 16, 16), torch.zeros(2, dtype=torch.long), torch.zeros(2, dtype=torch.long))
    assert out.shape == (2, 2, 16, 16) and out.device.type == "meta"
