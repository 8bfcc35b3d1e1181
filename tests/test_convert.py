"""Conversion tests: official DiT .pt -> studio (exact), studio <-> diffusers (exact weights, stated forward
tolerance), the CLI, and clear errors. Tiny models only (DiT-Micro/4: depth 2, width 64, 16 tokens).

The reference forward below is written from the facts of the original `models.py` (Peebles & Xie, 2023)
as plain functional torch on an original-layout state dict, independent of `dit/model.py`.
"""
from __future__ import annotations

import argparse
import fractions
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dit import DiT, model_kwargs
from dit.convert import (
    ConversionError,
    from_diffusers,
    from_original,
    infer_config_from_state_dict,
    load_any,
    load_original_state_dict,
    main,
    to_diffusers,
)

MICRO = dict(depth=2, hidden=64, heads=4, patch=4, input_size=16, in_ch=1, num_classes=10)


# ---------------------------------------------------------------------- reference (original DiT, functional)
def ref_timestep_embedding(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """GLIDE sinusoid: freqs exp(-ln(P) i / half), [cos, sin]."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float64) / half)
    args = t.double()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def ref_pos_embed(dim: int, grid: int) -> np.ndarray:
    """MAE get_2d_sincos_pos_embed: meshgrid(w, h), [sin, cos] per axis, float64."""
    def one_d(d: int, pos: np.ndarray) -> np.ndarray:
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.outer(pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    g = np.arange(grid, dtype=np.float32)
    mesh = np.stack(np.meshgrid(g, g), axis=0)  # w goes first
    return np.concatenate([one_d(dim // 2, mesh[0]), one_d(dim // 2, mesh[1])], axis=1)


def random_original_state_dict(depth: int, hidden: int, patch: int, input_size: int, in_ch: int,
                               num_classes: int, learn_sigma: bool = True, seed: int = 0) -> dict[str, torch.Tensor]:
    """Every parameter random (adaLN and final layer included, unlike the zero init) in the original layout."""
    g = torch.Generator().manual_seed(seed)
    out_ch = 2 * in_ch if learn_sigma else in_ch

    def lin(o: int, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.randn(o, i, generator=g) / math.sqrt(i), 0.1 * torch.randn(o, generator=g)

    sd: dict[str, torch.Tensor] = {}
    grid = input_size // patch
    sd["pos_embed"] = torch.from_numpy(ref_pos_embed(hidden, grid)).float().unsqueeze(0)
    sd["x_embedder.proj.weight"] = torch.randn(hidden, in_ch, patch, patch, generator=g) / math.sqrt(in_ch * patch * patch)
    sd["x_embedder.proj.bias"] = 0.1 * torch.randn(hidden, generator=g)
    sd["t_embedder.mlp.0.weight"], sd["t_embedder.mlp.0.bias"] = lin(hidden, 256)
    sd["t_embedder.mlp.2.weight"], sd["t_embedder.mlp.2.bias"] = lin(hidden, hidden)
    sd["y_embedder.embedding_table.weight"] = torch.randn(num_classes + 1, hidden, generator=g)
    for i in range(depth):
        b = f"blocks.{i}."
        sd[b + "attn.qkv.weight"], sd[b + "attn.qkv.bias"] = lin(3 * hidden, hidden)
        sd[b + "attn.proj.weight"], sd[b + "attn.proj.bias"] = lin(hidden, hidden)
        sd[b + "mlp.fc1.weight"], sd[b + "mlp.fc1.bias"] = lin(4 * hidden, hidden)
        sd[b + "mlp.fc2.weight"], sd[b + "mlp.fc2.bias"] = lin(hidden, 4 * hidden)
        sd[b + "adaLN_modulation.1.weight"], sd[b + "adaLN_modulation.1.bias"] = lin(6 * hidden, hidden)
    sd["final_layer.linear.weight"], sd["final_layer.linear.bias"] = lin(patch * patch * out_ch, hidden)
    sd["final_layer.adaLN_modulation.1.weight"], sd["final_layer.adaLN_modulation.1.bias"] = lin(2 * hidden, hidden)
    return sd


def ref_forward(sd: dict[str, torch.Tensor], x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, heads: int,
                dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The original DiT forward (timm PatchEmbed/Attention/Mlp, adaLN-Zero, unpatchify) in `dtype`."""
    w = {k: v.to(dtype) for k, v in sd.items()}
    x = x.to(dtype)
    hidden, in_ch, p, _ = w["x_embedder.proj.weight"].shape
    depth = len({k.split(".")[1] for k in w if k.startswith("blocks.")})
    ln = lambda z: F.layer_norm(z, (hidden,), eps=1e-6)  # noqa: E731
    mod = lambda z, shift, scale: z * (1 + scale[:, None]) + shift[:, None]  # noqa: E731
    lin = lambda z, name: F.linear(z, w[name + ".weight"], w[name + ".bias"])  # noqa: E731

    h = F.conv2d(x, w["x_embedder.proj.weight"], w["x_embedder.proj.bias"], stride=p).flatten(2).transpose(1, 2)
    h = h + w["pos_embed"]
    temb = lin(F.silu(lin(ref_timestep_embedding(t).to(dtype), "t_embedder.mlp.0")), "t_embedder.mlp.2")
    c = temb + w["y_embedder.embedding_table.weight"][y]
    n, tokens, _ = h.shape
    hd = hidden // heads
    for i in range(depth):
        b = f"blocks.{i}."
        sm, cm, gm, sp, cp, gp = lin(F.silu(c), b + "adaLN_modulation.1").chunk(6, dim=1)
        z = mod(ln(h), sm, cm)
        qkv = lin(z, b + "attn.qkv").reshape(n, tokens, 3, heads, hd).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = ((q * hd ** -0.5) @ k.transpose(-2, -1)).softmax(dim=-1)
        a = lin((attn @ v).transpose(1, 2).reshape(n, tokens, hidden), b + "attn.proj")
        h = h + gm[:, None] * a
        z = mod(ln(h), sp, cp)
        m = lin(F.gelu(lin(z, b + "mlp.fc1"), approximate="tanh"), b + "mlp.fc2")
        h = h + gp[:, None] * m
    shift, scale = lin(F.silu(c), "final_layer.adaLN_modulation.1").chunk(2, dim=1)
    h = lin(mod(ln(h), shift, scale), "final_layer.linear")
    out_ch = h.shape[-1] // (p * p)
    g = int(tokens ** 0.5)
    h = h.reshape(n, g, g, p, p, out_ch)
    h = torch.einsum("nhwpqc->nchpwq", h)
    return h.reshape(n, out_ch, g * p, g * p)


def micro_sd(learn_sigma: bool = True, seed: int = 0) -> dict[str, torch.Tensor]:
    m = MICRO
    return random_original_state_dict(m["depth"], m["hidden"], m["patch"], m["input_size"], m["in_ch"],
                                      m["num_classes"], learn_sigma, seed)


def inputs(batch: int = 3, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, MICRO["in_ch"], MICRO["input_size"], MICRO["input_size"], generator=g)
    t = torch.tensor([0, 1, 999, 250, 500][:batch])
    y = torch.tensor([3, MICRO["num_classes"], 7, 0, 1][:batch])  # includes the null class
    return x, t, y


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


# ---------------------------------------------------------------------- (a) original .pt -> studio, exact
@pytest.mark.parametrize("learn_sigma", [True, False])
def test_original_pt_reproduces_reference_forward(tmp_path: Path, learn_sigma: bool) -> None:
    sd = micro_sd(learn_sigma)
    assert len(sd) == 12 + 10 * MICRO["depth"]
    path = tmp_path / "DiT-Micro-4.pt"
    torch.save(sd, path)
    model = from_original(path, "DiT-Micro/4")
    assert len(model.state_dict()) == 12 + 10 * MICRO["depth"]
    assert model.config.learn_sigma is learn_sigma and model.config.num_heads == MICRO["heads"]
    x, t, y = inputs()
    with torch.inference_mode():
        got = model(x, t, y)
    ref64 = ref_forward(sd, x, t, y, MICRO["heads"], torch.float64)
    ref32 = ref_forward(sd, x, t, y, MICRO["heads"], torch.float32)
    assert got.shape == ref64.shape == (3, 2 * MICRO["in_ch"] if learn_sigma else MICRO["in_ch"], 16, 16)
    assert ref64.abs().max() > 0.5  # random adaLN/final weights: a meaningful, non-zero output
    assert rel_err(got, ref64) <= 1e-5, rel_err(got, ref64)  # float32 round-off against a float64 truth
    assert rel_err(ref32, ref64) <= 1e-5  # the float32 reference is as close: the bound is round-off
    for k, v in sd.items():
        assert torch.equal(model.state_dict()[k], v), k
    assert not model.pos_embed.requires_grad


def test_infer_config_and_default_heads() -> None:
    sd = micro_sd()
    kw = infer_config_from_state_dict(sd)
    assert kw == dict(input_size=16, patch_size=4, in_channels=1, hidden_size=64, depth=2, learn_sigma=True,
                      num_classes=10, class_dropout_prob=0.1, num_heads=1)  # 64-d heads when width is not in the table
    assert infer_config_from_state_dict(sd, "DiT-Micro/4")["num_heads"] == 4
    assert infer_config_from_state_dict(sd, num_heads=2)["num_heads"] == 2
    # the paper's widths get the paper's heads; resolution comes from pos_embed (a 512 px XL/2 has 1024 tokens)
    fake = {k: torch.empty(0) for k in sd}
    fake.update({"x_embedder.proj.weight": torch.empty(1152, 4, 2, 2), "pos_embed": torch.empty(1, 1024, 1152),
                 "final_layer.linear.weight": torch.empty(32, 1152), "blocks.0.mlp.fc1.weight": torch.empty(4608, 1152),
                 "y_embedder.embedding_table.weight": torch.empty(1001, 1152)})
    fake.update({f"blocks.{i}.attn.qkv.weight": torch.empty(0) for i in range(28)})
    kw = infer_config_from_state_dict(fake, "DiT-XL/2")
    assert (kw["depth"], kw["num_heads"], kw["input_size"], kw["num_classes"]) == (28, 16, 64, 1000)


def test_train_checkpoint_uses_ema(tmp_path: Path) -> None:
    ema, raw = micro_sd(seed=0), micro_sd(seed=5)
    path = tmp_path / "0050000.pt"
    torch.save({"model": raw, "ema": ema, "opt": {"state": {}, "param_groups": []},
                "args": argparse.Namespace(model="DiT-Micro/4", epochs=1)}, path)
    sd = load_original_state_dict(path)  # weights_only=True, argparse.Namespace allowed
    assert all(torch.equal(sd[k], ema[k]) for k in ema)
    ddp = tmp_path / "ddp.pt"
    torch.save({f"module.{k}": v for k, v in raw.items()}, ddp)
    assert all(torch.equal(load_original_state_dict(ddp)[k], raw[k]) for k in raw)


# ---------------------------------------------------------------------- (b) studio <-> diffusers
def random_studio_model(seed: int = 0) -> DiT:
    model = from_original(micro_sd(seed=seed), "DiT-Micro/4")
    return model


def test_diffusers_round_trip_is_bitwise() -> None:
    model = random_studio_model()
    dmodel = to_diffusers(model)
    assert type(dmodel).__name__ == "DiTTransformer2DModel"
    assert "pos_embed" not in dmodel.state_dict() and dmodel.config.norm_eps == 1e-6
    assert dmodel.config.num_embeds_ada_norm == 10 and dmodel.config.out_channels == 2
    back = from_diffusers(dmodel)
    a, b = model.state_dict(), back.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    assert dict(back.config) == dict(model.config)


def test_diffusers_forward_tolerance() -> None:
    """What we assert (see dit/convert.py):
    - t = 0 (all frequencies give the same phase): diffusers == studio to float32 round-off (rel <= 1e-5);
    - t = 1: the /127 vs /128 frequencies differ slightly: rel <= 5e-3 (measured ~7e-4);
    - t = 999: they differ a lot (rel > 1e-2), the documented, real difference;
    - diffusers with its frequencies patched to /128 (downscale_freq_shift=0): round-off at every t.
    """
    model = random_studio_model()
    dmodel = to_diffusers(model)
    x, _, _ = inputs(2)
    y = torch.tensor([3, 10])
    errs = {}
    with torch.inference_mode():
        for tv in (0, 1, 999):
            t = torch.full((2,), tv)
            errs[tv] = rel_err(dmodel(x, t, y).sample, model(x, t, y))
        for block in dmodel.transformer_blocks:
            block.norm1.emb.time_proj.downscale_freq_shift = 0
        patched = max(rel_err(dmodel(x, torch.full((2,), tv), y).sample, model(x, torch.full((2,), tv), y))
                      for tv in (0, 1, 250, 999))
    assert errs[0] <= 1e-5, errs
    assert errs[1] <= 5e-3, errs
    assert errs[999] > 1e-2, errs
    assert patched <= 1e-5, patched


# ---------------------------------------------------------------------- (c) CLI end to end
def test_cli_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sd = micro_sd()
    pt = tmp_path / "micro.pt"
    torch.save(sd, pt)
    studio, diff, studio2 = tmp_path / "studio", tmp_path / "diffusers", tmp_path / "studio2"
    assert main([str(pt), str(studio), "--model", "DiT-Micro/4"]) == 0
    assert json.loads((studio / "config.json").read_text())["_class_name"] == "DiT"
    meta = json.loads((studio / "studio.json").read_text())
    assert (meta["objective"], meta["default_scheduler"], meta["default_steps"], meta["default_cfg_scale"]) == (
        "ddpm", "ddpm", 250, 4.0)
    assert main([str(studio), str(diff), "--to", "diffusers"]) == 0
    cfg = json.loads((diff / "config.json").read_text())
    assert cfg["_class_name"] == "DiTTransformer2DModel" and cfg["norm_eps"] == 1e-6
    assert main([str(diff), str(studio2)]) == 0
    out = capsys.readouterr().out
    assert "depth 2, width 64, 4 heads" in out
    m1, meta1 = load_any(studio)
    m2, _ = load_any(studio2)
    for k, v in sd.items():
        assert torch.equal(m1.state_dict()[k], v) and torch.equal(m2.state_dict()[k], v), k
    assert meta1["default_steps"] == 250

    # a diffusers pipeline folder: model_index.json + transformer/ (+ vae/ picked up as the studio VAE)
    pipe = tmp_path / "pipe"
    (pipe / "transformer").mkdir(parents=True)
    (pipe / "model_index.json").write_text(json.dumps({"_class_name": "DiTPipeline"}))
    for f in diff.iterdir():
        (pipe / "transformer" / f.name).write_bytes(f.read_bytes())
    m3, meta3 = load_any(pipe, "DiT-Micro/4", dtype=torch.float64)
    assert m3.pos_embed.dtype == torch.float64
    assert torch.equal(m3.state_dict()["blocks.1.attn.qkv.weight"].float(), sd["blocks.1.attn.qkv.weight"])
    assert meta3["objective"] == "ddpm"


# ---------------------------------------------------------------------- (d) bad input
def test_non_dit_pt(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "resnet.pt"
    torch.save({"conv1.weight": torch.zeros(3, 3), "fc.bias": torch.zeros(3)}, bad)
    with pytest.raises(ConversionError, match="not an original DiT state dict.*pos_embed"):
        from_original(bad)
    assert main([str(bad), str(tmp_path / "out")]) == 2
    assert "not an original DiT state dict" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()

    evil = tmp_path / "obj.pt"  # arbitrary pickled objects are refused by weights_only=True
    torch.save({"x": fractions.Fraction(1, 3)}, evil)
    with pytest.raises(ConversionError, match="not safe to unpickle.*state_dict"):
        load_original_state_dict(evil)
    with pytest.raises(ConversionError, match="does not exist.*never downloads"):
        load_any(tmp_path / "missing.pt")
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(ConversionError, match="not a checkpoint"):
        load_any(tmp_path / "notes.txt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConversionError, match="without config.json"):
        load_any(tmp_path / "empty")


def test_config_mismatch_names_keys(tmp_path: Path) -> None:
    sd = micro_sd()
    sd["blocks.1.attn.qkv.weight"] = torch.zeros(3 * 64, 32)
    with pytest.raises(ConversionError, match=r"blocks\.1\.attn\.qkv\.weight.*\(192, 32\).*\(192, 64\)"):
        from_original(sd, "DiT-Micro/4")
    sd = micro_sd()
    del sd["blocks.1.mlp.fc2.bias"]
    with pytest.raises(ConversionError, match=r"missing keys.*blocks\.1\.mlp\.fc2\.bias"):
        from_original(sd)


def test_wrong_model_preset(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pt = tmp_path / "micro.pt"
    torch.save(micro_sd(), pt)
    with pytest.raises(ConversionError, match=r"(?s)--model DiT-S/2.*hidden_size: weights say 64 \(x_embedder\.proj\.weight"):
        from_original(pt, "DiT-S/2")
    assert main([str(pt), str(tmp_path / "o"), "--model", "DiT-Tiny/4"]) == 2
    err = capsys.readouterr().err
    assert "depth: weights say 2" in err and "in_channels" not in err
    with pytest.raises(ConversionError, match="Unknown model preset"):
        from_original(pt, "DiT-Huge/3")
    studio = tmp_path / "studio"
    assert main([str(pt), str(studio), "--model", "DiT-Micro/4"]) == 0
    with pytest.raises(ConversionError, match="DiT-S/4"):
        load_any(studio, "DiT-S/4")


def test_unconvertible_to_diffusers() -> None:
    model = DiT(**model_kwargs("DiT-Micro/4", mlp_ratio=2.0))
    with pytest.raises(ConversionError, match="mlp_ratio"):
        to_diffusers(model)
