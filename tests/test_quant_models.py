"""dit.quant on whole models: AdaRound vs round-to-nearest, quantize -> save -> load -> sample for every
layout the studio makes, loading without a float32 copy, bad inputs (clear errors, source untouched)."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from torch import nn

from dit import DiT
from dit.attention import BlockContext
from dit.checkpoint import save_checkpoint
from dit.config import model_kwargs
from dit.convert import load_any
from dit.model import count_params
from dit.quant import QuantConfig, QuantConfigError, QuantLinear, WeightSpec
from dit.quant.__main__ import main as quant_main
from dit.quant.adaround import AdaRoundLinear, reconstruct
from dit.quant.api import quantize_checkpoint
from dit.quant.layers import set_module
from dit.quant.formats import FormatError
from dit.quant.observers import scales_from_amax, weight_amax
from dit.quant.storage import QUANT_WEIGHTS
from dit.schedulers import sample

TINY = dict(model_kwargs("DiT-Micro/4"), learn_sigma=False)  # depth 2, width 64, 4 heads, 16x16 pixels
LAYOUTS = {
    "softmax": {},
    "proxy": {"attention": "proxy"},
    "linear": {"attention": "linear"},
    "dynamic": {"dynamic": {"target": 0.5, "router_bias": 0.5, "token_router_bias": 0.5}},
    "hybrid": {"attention": "softmax,linear"},
}


def _randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-zero adaLN / final / zero-init branches, so that every layer matters."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 1 and float(p.abs().max()) == 0.0 and "pos_embed" not in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    return model


def _checkpoint(tmp_path: Path, layout: str = "softmax", seed: int = 0) -> Path:
    torch.manual_seed(seed)
    model = _randomize(DiT(**TINY, **LAYOUTS[layout]), seed).eval()
    folder = tmp_path / f"src-{layout}"
    save_checkpoint(model, folder, studio={"objective": "flow", "default_scheduler": "flow-euler",
                                           "default_steps": 3, "default_cfg_scale": 2.0})
    return folder


def _fast(**kw) -> QuantConfig:
    base = dict(calib_samples=2, calib_steps=2, iters=4, batch_size=4, group_size=32)
    base.update(kw)
    return QuantConfig(**base)


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_adaround_lowers_block_output_error_against_round_to_nearest():
    torch.manual_seed(0)
    block = _randomize(DiT(**TINY)).blocks[0].eval()
    x, c = torch.randn(64, 16, 64), torch.randn(64, 64)
    ctx = BlockContext(grid=(4, 4), t_emb=torch.randn(64, 64))
    with torch.no_grad():
        target = block(x, c, ctx)
    layers = []
    for name in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"):
        lin = block.get_submodule(name)
        spec = WeightSpec("e3m0" if name == "mlp.fc1" else "e2m1", "group", 32)
        ada = AdaRoundLinear(lin, spec, scales_from_amax(weight_amax(lin.weight, spec), spec))
        set_module(block, name, ada)
        layers.append(ada)

    def run(idx: torch.Tensor) -> torch.Tensor:
        return block(x[idx], c[idx], BlockContext(grid=(4, 4), t_emb=ctx.t_emb[idx]))

    def mse() -> float:
        with torch.no_grad():
            return float((run(torch.arange(64)) - target).pow(2).sum(-1).mean())
    for layer in layers:
        layer.soft = False  # hard rounding of the initial V == round to nearest
    rtn = mse()
    for layer in layers:
        layer.soft = True
    reconstruct(run, layers, 64, lambda idx: target[idx], iters=150, batch_size=16, lr=3e-3, progress=False)
    assert mse() < 0.9 * rtn
    for layer in layers:  # hard rounding gives grid values
        assert torch.isin(layer.hard_values(), layer.spec.fmt.grid).all()


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_quantize_save_load_sample(tmp_path, layout):
    src = _checkpoint(tmp_path, layout)
    before = _digest(src)
    out = tmp_path / f"q-{layout}"
    report = quantize_checkpoint(src, out, _fast(preset="w4a8"), evaluate=False, progress=False, log=lambda s: None)
    assert _digest(src) == before  # the source is only read
    assert report["bytes"]["quantized_file"] < 0.45 * report["bytes"]["source_file"]
    assert (out / "quant_report.md").exists() and json.loads((out / "quant_report.json").read_text())["layers"]
    model, meta = load_any(out)  # the user does not say it is quantized
    quant = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert len(quant) == len(report["layers"]) > 0
    float_model, _ = load_any(src)
    x, t, y = torch.randn(3, 1, 16, 16), torch.tensor([100, 500, 900]), torch.tensor([1, 2, 10])
    with torch.no_grad():
        out_q, out_f = model(x, t, y), float_model(x, t, y)
    rel = float((out_q - out_f).norm() / out_f.norm())
    assert 0 < rel < 0.5
    images = sample(model, torch.tensor([0, 3]), [0, 1], (1, 16, 16), scheduler_name="flow-euler", steps=3,
                    cfg_scale=2.0, objective="flow", learn_sigma=False, null_class=10, progress=False)
    assert images.shape == (2, 1, 16, 16) and torch.isfinite(images).all()
    again, _ = load_any(out)
    with torch.no_grad():
        assert torch.equal(again(x, t, y), out_q)


def test_loading_a_packed_file_never_materialises_float32_weights(tmp_path, monkeypatch):
    src = _checkpoint(tmp_path)
    out = tmp_path / "q"
    quantize_checkpoint(src, out, _fast(preset="w4"), evaluate=False, progress=False, log=lambda s: None)
    calls = []
    monkeypatch.setattr(QuantLinear, "dequantize", lambda self, *a, **k: calls.append(1))
    model, _ = load_any(out)
    assert not calls  # nothing was dequantized while loading
    monkeypatch.undo()
    float_model, _ = load_any(src)
    for m in model.modules():
        if isinstance(m, QuantLinear):
            assert m.qweight.dtype in (torch.uint8, torch.float8_e4m3fn)
            assert not any(p.ndim == 2 for p in m.parameters())  # no float weight matrix anywhere
    assert count_params(model) == count_params(float_model)  # packed weights still count as parameters
    nbytes = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    fbytes = sum(t.numel() * t.element_size() for t in float_model.parameters())
    assert nbytes < 0.4 * fbytes
    with safe_open(str(out / QUANT_WEIGHTS), framework="pt") as f:
        dtypes = {k: f.get_tensor(k).dtype for k in f.keys()}
    assert dtypes["blocks.0.attn.qkv.qweight"] == torch.uint8
    assert dtypes["blocks.0.adaLN_modulation.1.qweight"] == torch.float8_e4m3fn  # FP8 as a torch float8 tensor


def test_int_preset_and_mx_scales_roundtrip(tmp_path):
    src = _checkpoint(tmp_path)
    out = tmp_path / "q-int"
    report = quantize_checkpoint(src, out, _fast(preset="w4a6", int_grid=True, granularity="mx"), evaluate=False,
                                 progress=False, log=lambda s: None)
    assert report["formats"]["attn"] == "int4" and report["formats"]["act"] == "int6"
    model, _ = load_any(out)
    qkv = model.blocks[0].attn.qkv
    assert qkv.spec.granularity == "mx" and qkv.wscale.dtype == torch.uint8 and qkv.out_group == 16


def test_bad_inputs_are_clear_errors_and_leave_the_source_untouched(tmp_path, capsys):
    src = _checkpoint(tmp_path)
    before = _digest(src)
    with pytest.raises(FormatError, match="do not add up"):
        quantize_checkpoint(src, tmp_path / "a", _fast(weight_format="fp4_e3m2"), evaluate=False, progress=False)
    with pytest.raises(QuantConfigError, match="at least one sample"):
        quantize_checkpoint(src, tmp_path / "b", _fast(calib_samples=0), evaluate=False, progress=False)
    with pytest.raises(QuantConfigError, match="does not divide"):
        quantize_checkpoint(src, tmp_path / "c", _fast(group_size=48), evaluate=False, progress=False)
    exists = tmp_path / "exists"
    exists.mkdir()
    with pytest.raises(QuantConfigError, match="already exists"):
        quantize_checkpoint(src, exists, _fast(), evaluate=False, progress=False)
    assert not any(exists.iterdir())
    done = tmp_path / "done"
    quantize_checkpoint(src, done, _fast(preset="w8"), evaluate=False, progress=False, log=lambda s: None)
    done_digest = _digest(done)
    with pytest.raises(QuantConfigError, match="already quantized"):
        quantize_checkpoint(done, tmp_path / "d", _fast(), evaluate=False, progress=False)
    assert _digest(done) == done_digest
    assert quant_main([str(src), str(tmp_path / "e"), "--weight-format", "fp4_e3m2", "--no-progress"]) == 2
    assert "do not add up" in capsys.readouterr().err
    assert _digest(src) == before
    for name in "abcde":
        assert not (tmp_path / name).exists()
