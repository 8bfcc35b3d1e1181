"""Convert DiT weights: official facebookresearch `.pt` <-> studio folder <-> diffusers `DiTTransformer2DModel`.

    python -m dit.convert DiT-XL-2-256x256.pt out/dit-xl-2-256            # official .pt -> studio folder
    python -m dit.convert out/dit-xl-2-256 out/dit-xl-2-256-diffusers --to diffusers
    python -m dit.convert some/diffusers/folder out/studio                 # diffusers (or pipeline) -> studio

Nothing is ever downloaded: SRC must be a local file or folder.

**Original release.** The studio's `DiT` is the original architecture with the original state-dict keys
(Peebles & Xie, 2023, `models.py`), so an official checkpoint is a strict `load_state_dict` and reproduces
the original forward to float32 round-off. The files hold no config: depth, width, patch, channels,
learned sigma, class count and input size are read off the tensor shapes (`pos_embed` gives the
resolution); the head count is not in the weights, so it comes from `--model PRESET` or, by width, from
the paper's table (384->6, 768->12, 1024->16, 1152->16; otherwise width/64).

**diffusers.** `DiTTransformer2DModel` holds the same weights in another layout (mapping of diffusers'
`scripts/convert_dit_to_diffusers.py`): fused `qkv` is chunked into `to_q/to_k/to_v`, the global t/y
embedders are copied into every block's `norm1.emb`, the final layer becomes `proj_out_1/proj_out_2`,
the MLP becomes `ff.net.0.proj/ff.net.2`, and `pos_embed` is dropped (diffusers recomputes it as a
buffer). The conversion is an exact weight mapping (studio -> diffusers -> studio is bitwise equal), but
diffusers' *forward* is not the original's:

1. timestep frequencies `exp(-ln(1e4) i / 127)` (`downscale_freq_shift=1`) where DiT uses `/ 128`;
   the 256-d sinusoid differs by up to 0.0027 at t=1, 0.70 at t=250 and 1.94 at t=999;
2. the pre-MLP LayerNorm (`norm3`) uses `norm_eps` (diffusers' default 1e-5) where DiT uses 1e-6;
3. the final layer is conditioned through block 0's embedder copy (identical after conversion,
   but the copies may drift apart if a diffusers model is fine-tuned; `from_diffusers` takes block 0's).

The studio always computes the ORIGINAL forward. `to_diffusers` writes `norm_eps=1e-6`, which removes
difference 2 through diffusers' own config; difference 1 is hard-coded in diffusers and remains, so a
converted model's outputs differ from the studio's by a timestep-dependent amount. Measured on random
tiny models (`tests/test_convert.py`, max |diff| / max |output|): 3e-7 at t=0 (round-off: every
frequency gives phase 0), 4-7e-4 at t=1, 5-9e-3 at t=10, 5-9e-2 at t=100, 0.4 at t=999; with diffusers'
frequencies patched to `/128` (`downscale_freq_shift=0` on every block's `norm1.emb.time_proj`) the two
agree to float32 round-off at every t. Keeping diffusers' norm_eps 1e-5 adds about 1e-6. Models trained
*in diffusers* learnt the `/127` frequencies, so loading them into the studio changes their outputs by
the same amount in the other direction; for exact diffusers behaviour, sample them with diffusers.
"""
from __future__ import annotations

import argparse
import json
import os
import pickle
import sys
from pathlib import Path
from typing import Any, Mapping

import torch

from .checkpoint import (
    DEFAULT_STUDIO,
    CheckpointError,
    atomic_folder,
    read_studio_meta,
    save_checkpoint,
)
from .config import DIT_PRESETS, model_kwargs, preset_names
from .embeddings import sincos_pos_embed_2d
from .model import DiT

# Heads of the paper's four widths (Table 1 of the DiT paper); other widths default to 64-d heads.
OFFICIAL_HEADS: dict[int, int] = {384: 6, 768: 12, 1024: 16, 1152: 16}

# Sampling defaults of the original release for ImageNet models (sample.py: 250 DDPM steps, cfg 4.0;
# the paper's FID 2.27 uses cfg 1.5 on 3 of the 4 latent channels).
ORIGINAL_STUDIO_META: dict[str, Any] = {
    "objective": "ddpm",
    "default_scheduler": "ddpm",
    "default_steps": 250,
    "default_cfg_scale": 4.0,
    "cfg_channels_note": "the original release guides latent channels [:3] only (cfg_channels=3); "
                         "cfg 1.5 on 3 channels ~ cfg 1.375 on all 4 (DiT PR #12)",
    "latent_scale": 0.18215,
}

REQUIRED_KEYS = ("pos_embed", "x_embedder.proj.weight", "t_embedder.mlp.0.weight", "t_embedder.mlp.2.weight",
                 "y_embedder.embedding_table.weight", "final_layer.linear.weight",
                 "final_layer.adaLN_modulation.1.weight")
DOWNLOAD_HINT = ("the studio never downloads; fetch an official checkpoint yourself, e.g. "
                 "https://dl.fbaipublicfiles.com/DiT/models/DiT-XL-2-256x256.pt")


class ConversionError(CheckpointError):
    """A source that cannot be converted as asked; the message names the fix."""


# ====================================================================== original .pt
def _torch_load(path: Path) -> Any:
    """`torch.load(weights_only=True)`; allows `argparse.Namespace` (the "args" of DiT train.py checkpoints)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as first:
        try:
            with torch.serialization.safe_globals([argparse.Namespace]):
                return torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            raise ConversionError(
                f"{path} holds Python objects that are not safe to unpickle (weights_only=True refused: "
                f"{str(first).splitlines()[0]}). Fix: re-save only the tensors, e.g. "
                "torch.save(model.state_dict(), 'weights.pt'), and convert that file.") from None
    except Exception as err:  # truncated file, not a torch file, ...
        raise ConversionError(f"cannot read {path} as a torch checkpoint ({type(err).__name__}: {err}). "
                              "Fix: pass an official DiT .pt (raw state dict or DiT train.py checkpoint).") from None


def _strip_prefix(sd: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    if sd and all(k.startswith(prefix) for k in sd):
        return {k[len(prefix):]: v for k, v in sd.items()}
    return dict(sd)


def _as_dit_state_dict(obj: Any, source: str) -> dict[str, torch.Tensor]:
    """Unwrap train.py checkpoints ({"model","ema","opt","args"} -> "ema") and DDP/compile prefixes; validate."""
    if isinstance(obj, Mapping) and "ema" in obj and isinstance(obj["ema"], Mapping):
        obj = obj["ema"]  # DiT's find_model() uses the EMA weights of train.py checkpoints
    elif isinstance(obj, Mapping) and "model" in obj and isinstance(obj["model"], Mapping):
        obj = obj["model"]
    elif isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise ConversionError(f"{source} holds a {type(obj).__name__}, not a DiT state dict. Fix: pass an official "
                              "DiT .pt (a raw state dict, or a train.py checkpoint with an 'ema' entry).")
    sd = _strip_prefix(_strip_prefix(obj, "module."), "_orig_mod.")
    non_tensors = [k for k, v in sd.items() if not isinstance(v, torch.Tensor)]
    missing = [k for k in REQUIRED_KEYS if k not in sd]
    if missing or non_tensors or not any(k.startswith("blocks.0.") for k in sd):
        found = ", ".join(list(sd)[:8]) + (" ..." if len(sd) > 8 else "")
        hint = ""
        if any(k.startswith("transformer_blocks.") for k in sd):
            hint = " It looks like diffusers weights: pass the diffusers folder (with its config.json) instead."
        raise ConversionError(
            f"{source} is not an original DiT state dict: missing keys {missing or '-'}"
            f"{'; non-tensor entries ' + str(non_tensors[:5]) if non_tensors else ''}; found keys: {found or 'none'}."
            f"{hint} Fix: pass a facebookresearch/DiT checkpoint (keys pos_embed, x_embedder.proj.*, blocks.N.*, "
            "final_layer.*).")
    return {k: v for k, v in sd.items()}


def load_original_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read an official DiT release `.pt` (raw state dict) or a DiT train.py checkpoint (its "ema" weights).

    Read with `weights_only=True`; `.safetensors` files with the original keys are accepted too.
    """
    path = Path(path)
    if not path.exists():
        raise ConversionError(f"{path} does not exist; {DOWNLOAD_HINT}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return _as_dit_state_dict(load_file(str(path)), str(path))
    return _as_dit_state_dict(_torch_load(path), str(path))


def _block_count(sd: Mapping[str, torch.Tensor]) -> int:
    ids = {int(k.split(".")[1]) for k in sd if k.startswith("blocks.") and k.split(".")[1].isdigit()}
    if ids != set(range(len(ids))):
        raise ConversionError(f"block indices are not contiguous: {sorted(ids)}")
    return len(ids)


def default_num_heads(hidden_size: int) -> int:
    """Heads by width as in the paper's table, else 64-d heads (the head count is not stored in the weights)."""
    if hidden_size in OFFICIAL_HEADS:
        return OFFICIAL_HEADS[hidden_size]
    if hidden_size % 64 == 0:
        return hidden_size // 64
    raise ConversionError(f"cannot guess the head count for width {hidden_size} (not in the paper's table and "
                          "not a multiple of 64). Fix: pass --model PRESET (or num_heads=...).")


def infer_config_from_state_dict(sd: Mapping[str, torch.Tensor], model_name: str | None = None,
                                 num_heads: int | None = None) -> dict[str, Any]:
    """`DiT(**kwargs)` for an original-layout state dict, read off the tensor shapes (DiT `models.py` layout).

    With `model_name`, the architecture (depth, width, patch, input channels, MLP ratio) is checked against
    the preset (a mismatch names the keys and shapes) and the preset supplies what the weights cannot: the
    head count. What depends on the data rather than the preset comes from the weights: `input_size` from
    `pos_embed`, learned sigma from `final_layer.linear`, classes from the label table (its last row is the
    null class; a table with exactly the preset's class count has none).
    """
    sd = _as_dit_state_dict(sd, "state dict")
    hidden, in_ch, p, p2 = sd["x_embedder.proj.weight"].shape
    if p != p2:
        raise ConversionError(f"x_embedder.proj.weight has a non-square patch {tuple(sd['x_embedder.proj.weight'].shape)}")
    depth = _block_count(sd)
    tokens = sd["pos_embed"].shape[1]
    grid = int(round(tokens ** 0.5))
    if grid * grid != tokens or sd["pos_embed"].shape[2] != hidden:
        raise ConversionError(f"pos_embed has shape {tuple(sd['pos_embed'].shape)}; expected (1, g*g, {hidden})")
    out_total = sd["final_layer.linear.weight"].shape[0]
    if out_total % (p * p):
        raise ConversionError(f"final_layer.linear.weight {tuple(sd['final_layer.linear.weight'].shape)} is not "
                              f"a multiple of patch {p}x{p}")
    out_ch = out_total // (p * p)
    if out_ch == 2 * in_ch:
        learn_sigma = True
    elif out_ch == in_ch:
        learn_sigma = False
    else:
        raise ConversionError(f"final_layer.linear.weight {tuple(sd['final_layer.linear.weight'].shape)} gives "
                              f"{out_ch} output channels for {in_ch} input channels (expected {in_ch} or {2 * in_ch})")
    mlp_hidden = sd["blocks.0.mlp.fc1.weight"].shape[0] if "blocks.0.mlp.fc1.weight" in sd else 4 * hidden
    rows = sd["y_embedder.embedding_table.weight"].shape[0]
    kwargs: dict[str, Any] = dict(input_size=grid * p, patch_size=p, in_channels=in_ch, hidden_size=hidden,
                                  depth=depth, mlp_ratio=mlp_hidden / hidden, learn_sigma=learn_sigma,
                                  num_classes=rows - 1, class_dropout_prob=0.1)
    if model_name is not None:
        if model_name not in DIT_PRESETS:
            raise ConversionError(f"Unknown model preset {model_name!r}. Valid presets: {', '.join(preset_names())}")
        preset = model_kwargs(model_name)
        checks = [  # (name, from weights, from preset, the keys that say so)
            ("depth", depth, preset["depth"], f"blocks.0..{depth - 1}.*"),
            ("hidden_size", hidden, preset["hidden_size"], f"x_embedder.proj.weight {tuple(sd['x_embedder.proj.weight'].shape)}"),
            ("patch_size", p, preset["patch_size"], f"x_embedder.proj.weight {tuple(sd['x_embedder.proj.weight'].shape)}"),
            ("in_channels", in_ch, preset["in_channels"], f"x_embedder.proj.weight {tuple(sd['x_embedder.proj.weight'].shape)}"),
            ("mlp_ratio", mlp_hidden / hidden, preset.get("mlp_ratio", 4.0),
             f"blocks.0.mlp.fc1.weight ({mlp_hidden}, {hidden})"),
        ]
        bad = [f"{name}: weights say {got} ({keys}), {model_name} says {want}" for name, got, want, keys in checks
               if got != want]
        if bad:
            raise ConversionError(f"the checkpoint does not match --model {model_name}:\n  " + "\n  ".join(bad)
                                  + "\nFix: pass the preset the checkpoint was trained with, or omit --model to "
                                    "infer the architecture from the weights.")
        if rows == preset.get("num_classes", 1000):  # a label table without the null row (trained without CFG)
            kwargs["num_classes"], kwargs["class_dropout_prob"] = rows, 0.0
        kwargs["num_heads"] = num_heads or preset["num_heads"]
    else:
        kwargs["num_heads"] = num_heads or default_num_heads(hidden)
    if hidden % kwargs["num_heads"]:
        raise ConversionError(f"width {hidden} is not divisible by {kwargs['num_heads']} heads; pass --model PRESET")
    if kwargs["mlp_ratio"] == 4.0:
        kwargs.pop("mlp_ratio")
    return kwargs


def from_original(path: str | os.PathLike | Mapping[str, torch.Tensor], model_name: str | None = None,
                  num_heads: int | None = None) -> DiT:
    """An official DiT checkpoint (path or state dict) as a studio `DiT`, loaded strictly, in eval mode."""
    sd = load_original_state_dict(path) if not isinstance(path, Mapping) else _as_dit_state_dict(path, "state dict")
    kwargs = infer_config_from_state_dict(sd, model_name, num_heads)
    sd = {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}
    return _build_dit(kwargs, sd, "the checkpoint does not fit the inferred DiT config")


def _build_dit(kwargs: dict[str, Any], sd: Mapping[str, torch.Tensor], what: str) -> DiT:
    """`DiT(**kwargs)` built on the meta device (no random init) with `sd` assigned strictly; eval mode."""
    from .checkpoint import describe_mismatch

    with torch.device("meta"):
        model = DiT(**kwargs)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in sd.items()}
    if expected != found:
        raise ConversionError(f"{what}:\n  " + "\n  ".join(describe_mismatch(expected, found)))
    model.load_state_dict({k: v.contiguous() for k, v in sd.items()}, strict=True, assign=True)
    model.pos_embed.requires_grad_(False)  # fixed sin-cos table, as the original
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise ConversionError(f"{what}: tensors left uninitialised: {left}")
    return model.eval()


# ====================================================================== diffusers
def _check_convertible(model: DiT) -> None:
    cfg = model.config
    problems = []
    if any(name != "softmax" for name in model.block_attention):
        problems.append(f"attention {sorted(set(model.block_attention))} (diffusers' DiT has softmax attention only)")
    if cfg.get("mlp_type", "mlp") != "mlp":
        problems.append(f"mlp_type {cfg.mlp_type!r}")
    if cfg.get("dynamic"):
        problems.append("a DyDiT dynamic configuration")
    if float(cfg.get("mlp_ratio", 4.0)) != 4.0:
        problems.append(f"mlp_ratio {cfg.mlp_ratio} (diffusers' DiT has 4)")
    if problems:
        raise ConversionError("this model cannot be expressed as a diffusers DiTTransformer2DModel: "
                              + "; ".join(problems) + ". Fix: keep it as a studio checkpoint.")


def diffusers_config(model: DiT, norm_eps: float = 1e-6) -> dict[str, Any]:
    """`DiTTransformer2DModel` kwargs for a studio `DiT` (norm_eps 1e-6 is the original's; diffusers defaults to 1e-5)."""
    cfg = model.config
    return dict(num_attention_heads=cfg.num_heads, attention_head_dim=cfg.hidden_size // cfg.num_heads,
                in_channels=cfg.in_channels, out_channels=model.out_channels, num_layers=cfg.depth,
                sample_size=cfg.input_size, patch_size=cfg.patch_size, num_embeds_ada_norm=cfg.num_classes,
                activation_fn="gelu-approximate", attention_bias=True, norm_type="ada_norm_zero",
                norm_elementwise_affine=False, norm_eps=norm_eps)


def studio_to_diffusers_state_dict(sd: Mapping[str, torch.Tensor], depth: int) -> dict[str, torch.Tensor]:
    """Original keys -> diffusers keys (diffusers' scripts/convert_dit_to_diffusers.py mapping); drops pos_embed."""
    out: dict[str, torch.Tensor] = {
        "pos_embed.proj.weight": sd["x_embedder.proj.weight"],
        "pos_embed.proj.bias": sd["x_embedder.proj.bias"],
        "proj_out_1.weight": sd["final_layer.adaLN_modulation.1.weight"],
        "proj_out_1.bias": sd["final_layer.adaLN_modulation.1.bias"],
        "proj_out_2.weight": sd["final_layer.linear.weight"],
        "proj_out_2.bias": sd["final_layer.linear.bias"],
    }
    for i in range(depth):
        b, d = f"blocks.{i}.", f"transformer_blocks.{i}."
        emb = d + "norm1.emb."
        for s in ("weight", "bias"):
            out[emb + f"timestep_embedder.linear_1.{s}"] = sd[f"t_embedder.mlp.0.{s}"].clone()
            out[emb + f"timestep_embedder.linear_2.{s}"] = sd[f"t_embedder.mlp.2.{s}"].clone()
            q, k, v = sd[b + f"attn.qkv.{s}"].chunk(3, dim=0)
            out[d + f"attn1.to_q.{s}"], out[d + f"attn1.to_k.{s}"], out[d + f"attn1.to_v.{s}"] = (
                q.clone(), k.clone(), v.clone())
            out[d + f"attn1.to_out.0.{s}"] = sd[b + f"attn.proj.{s}"]
            out[d + f"ff.net.0.proj.{s}"] = sd[b + f"mlp.fc1.{s}"]
            out[d + f"ff.net.2.{s}"] = sd[b + f"mlp.fc2.{s}"]
            out[d + f"norm1.linear.{s}"] = sd[b + f"adaLN_modulation.1.{s}"]
        out[emb + "class_embedder.embedding_table.weight"] = sd["y_embedder.embedding_table.weight"].clone()
    return out


def to_diffusers(model: DiT, norm_eps: float = 1e-6) -> Any:
    """A diffusers `DiTTransformer2DModel` with the studio model's weights (same dtype/device, eval mode).

    A label table without a null row (class_dropout_prob 0) gets a zero row appended, since diffusers'
    table always has num_classes + 1 rows. Forward differences: see the module docstring.
    """
    from diffusers import DiTTransformer2DModel

    _check_convertible(model)
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    table = sd["y_embedder.embedding_table.weight"]
    if table.shape[0] == model.config.num_classes:
        sd["y_embedder.embedding_table.weight"] = torch.cat([table, torch.zeros_like(table[:1])])
    mapped = studio_to_diffusers_state_dict(sd, model.config.depth)
    ref = sd["x_embedder.proj.weight"]
    with torch.device("meta"):
        target = DiTTransformer2DModel(**diffusers_config(model, norm_eps))
    target.load_state_dict(mapped, strict=True, assign=True)
    target.pos_embed.pos_embed = _diffusers_pos_embed(target, ref)
    target = target.to(device=ref.device)
    if ref.dtype != torch.float32:
        target = target.to(dtype=ref.dtype)
    return target.eval()


def _diffusers_pos_embed(target: Any, like: torch.Tensor) -> torch.Tensor:
    """Recompute diffusers' non-persistent sin-cos buffer (lost on the meta device)."""
    from diffusers.models.embeddings import get_2d_sincos_pos_embed

    pe = target.pos_embed
    grid = target.config.sample_size // target.config.patch_size
    table = get_2d_sincos_pos_embed(target.inner_dim, grid, base_size=pe.base_size,
                                    interpolation_scale=pe.interpolation_scale, output_type="pt")
    return table.float().unsqueeze(0).to(like.device)


def diffusers_to_studio_state_dict(sd: Mapping[str, torch.Tensor], depth: int, pos_embed: torch.Tensor
                                   ) -> dict[str, torch.Tensor]:
    """diffusers keys -> original keys; the global embedders are taken from block 0 (copies elsewhere ignored)."""
    emb = "transformer_blocks.0.norm1.emb."
    out: dict[str, torch.Tensor] = {
        "pos_embed": pos_embed,
        "x_embedder.proj.weight": sd["pos_embed.proj.weight"],
        "x_embedder.proj.bias": sd["pos_embed.proj.bias"],
        "y_embedder.embedding_table.weight": sd[emb + "class_embedder.embedding_table.weight"],
        "final_layer.adaLN_modulation.1.weight": sd["proj_out_1.weight"],
        "final_layer.adaLN_modulation.1.bias": sd["proj_out_1.bias"],
        "final_layer.linear.weight": sd["proj_out_2.weight"],
        "final_layer.linear.bias": sd["proj_out_2.bias"],
    }
    for s in ("weight", "bias"):
        out[f"t_embedder.mlp.0.{s}"] = sd[emb + f"timestep_embedder.linear_1.{s}"]
        out[f"t_embedder.mlp.2.{s}"] = sd[emb + f"timestep_embedder.linear_2.{s}"]
    for i in range(depth):
        b, d = f"blocks.{i}.", f"transformer_blocks.{i}."
        for s in ("weight", "bias"):
            out[b + f"attn.qkv.{s}"] = torch.cat([sd[d + f"attn1.to_{n}.{s}"] for n in "qkv"], dim=0)
            out[b + f"attn.proj.{s}"] = sd[d + f"attn1.to_out.0.{s}"]
            out[b + f"mlp.fc1.{s}"] = sd[d + f"ff.net.0.proj.{s}"]
            out[b + f"mlp.fc2.{s}"] = sd[d + f"ff.net.2.{s}"]
            out[b + f"adaLN_modulation.1.{s}"] = sd[d + f"norm1.linear.{s}"]
    return out


def _read_diffusers_weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    single = folder / "diffusion_pytorch_model.safetensors"
    index = folder / "diffusion_pytorch_model.safetensors.index.json"
    legacy = folder / "diffusion_pytorch_model.bin"
    if single.exists():
        return load_file(str(single))
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        sd: dict[str, torch.Tensor] = {}
        for shard in shards:
            sd.update(load_file(str(folder / shard)))
        return sd
    if legacy.exists():
        obj = _torch_load(legacy)
        if isinstance(obj, Mapping):
            return dict(obj)
    raise ConversionError(f"{folder} has no diffusers weights (diffusion_pytorch_model.safetensors / "
                          ".safetensors.index.json / .bin). Fix: point at the folder written by save_pretrained.")


def _is_diffusers_dit_config(config: Mapping[str, Any]) -> bool:
    name = config.get("_class_name")
    return name == "DiTTransformer2DModel" or (name == "Transformer2DModel" and config.get("norm_type") == "ada_norm_zero")


def from_diffusers(folder_or_model: Any, device: torch.device | str | None = None) -> DiT:
    """A studio `DiT` from a diffusers `DiTTransformer2DModel` (instance, model folder or pipeline folder).

    Embedders come from block 0; the null class is `num_embeds_ada_norm`; `pos_embed` is the original
    MAE table (diffusers' buffer is the same table). See the module docstring for forward differences.
    """
    if isinstance(folder_or_model, (str, os.PathLike)):
        folder = Path(folder_or_model)
        if (folder / "transformer" / "config.json").exists() and not (folder / "config.json").exists():
            folder = folder / "transformer"
        config_path = folder / "config.json"
        if not config_path.exists():
            raise ConversionError(f"{folder} has no config.json; not a diffusers model folder")
        config = json.loads(config_path.read_text())
        if not _is_diffusers_dit_config(config):
            raise ConversionError(f"{folder} holds a {config.get('_class_name')} "
                                  f"(norm_type {config.get('norm_type')!r}), not a diffusers DiT "
                                  "(DiTTransformer2DModel / Transformer2DModel with norm_type 'ada_norm_zero').")
        sd = _read_diffusers_weights(folder)
    else:
        config = dict(folder_or_model.config)
        sd = {k: v.detach() for k, v in folder_or_model.state_dict().items()}
    g = lambda k, default: config.get(k, default) if config.get(k) is not None else default  # noqa: E731
    heads, head_dim = g("num_attention_heads", 16), g("attention_head_dim", 72)
    in_ch = g("in_channels", 4)
    out_ch = g("out_channels", in_ch)
    if out_ch not in (in_ch, 2 * in_ch):
        raise ConversionError(f"out_channels {out_ch} is neither in_channels {in_ch} nor twice it")
    if g("activation_fn", "gelu-approximate") != "gelu-approximate" or not g("attention_bias", True):
        raise ConversionError("only activation_fn 'gelu-approximate' with attention_bias=True maps onto DiT")
    kwargs = dict(input_size=g("sample_size", 32), patch_size=g("patch_size", 2), in_channels=in_ch,
                  hidden_size=heads * head_dim, depth=g("num_layers", 28), num_heads=heads,
                  num_classes=g("num_embeds_ada_norm", 1000), learn_sigma=out_ch == 2 * in_ch,
                  class_dropout_prob=0.1)
    grid = kwargs["input_size"] // kwargs["patch_size"]
    dtype = sd["pos_embed.proj.weight"].dtype
    table = torch.from_numpy(sincos_pos_embed_2d(kwargs["hidden_size"], grid, grid)).float().unsqueeze(0)
    mapped = diffusers_to_studio_state_dict(sd, kwargs["depth"], table.to(dtype))
    model = _build_dit(kwargs, mapped, "the diffusers weights do not fit their config.json")
    return model.to(device=device).eval()


# ====================================================================== any source
def load_any(path: str | os.PathLike, model_name: str | None = None, device: torch.device | str | None = None,
             dtype: torch.dtype | None = None) -> tuple[DiT, dict[str, Any]]:
    """Load a studio folder, a diffusers model/pipeline folder or an official `.pt` as `(DiT, studio_meta)`."""
    path = Path(path)
    if not path.exists():
        raise ConversionError(f"{path} does not exist; {DOWNLOAD_HINT}")
    meta: dict[str, Any]
    if path.is_dir():
        config_path = path / "config.json"
        sub = path / "transformer"
        if not config_path.exists() and (sub / "config.json").exists():
            model = from_diffusers(sub)
            meta = dict(DEFAULT_STUDIO, source=f"diffusers pipeline {path}")
            if (path / "vae" / "config.json").exists():
                meta["vae"] = str(path / "vae")
        elif not config_path.exists():
            raise ConversionError(f"{path} is a folder without config.json: not a studio checkpoint, diffusers model "
                                  "or pipeline folder. Fix: point at the folder holding config.json (or model_index.json "
                                  "with a transformer/ subfolder), or at an official .pt file.")
        else:
            config = json.loads(config_path.read_text())
            if config.get("_class_name") == "DiT":
                model = DiT.from_pretrained(path)
                meta = read_studio_meta(path)
            elif _is_diffusers_dit_config(config):
                model = from_diffusers(path)
                meta = dict(DEFAULT_STUDIO, source=f"diffusers {path}")
            else:
                raise ConversionError(f"{path}/config.json describes a {config.get('_class_name')!r}, which is neither a "
                                      "studio DiT nor a diffusers DiT (DiTTransformer2DModel). Fix: pass a DiT checkpoint.")
        if model_name is not None:
            _check_against_preset(model, model_name)
    elif path.is_file():
        if path.suffix not in (".pt", ".pth", ".bin", ".ckpt", ".safetensors"):
            raise ConversionError(f"{path} is not a checkpoint this loader knows ({path.suffix or 'no suffix'}); "
                                  "pass an official DiT .pt, a studio folder or a diffusers folder.")
        model = from_original(path, model_name)
        meta = dict(DEFAULT_STUDIO, **ORIGINAL_STUDIO_META, source=f"original {path.name}")
    else:
        raise ConversionError(f"{path} is neither a file nor a folder")
    if device is not None or dtype is not None:
        from .pipeline import cast_model

        model = cast_model(model, device or "cpu", dtype or torch.float32)
    return model.eval(), meta


def _check_against_preset(model: DiT, model_name: str) -> None:
    infer_config_from_state_dict(model.state_dict(), model_name, model.config.num_heads)
    if model.config.num_heads != model_kwargs(model_name)["num_heads"]:
        raise ConversionError(f"the checkpoint has {model.config.num_heads} heads, {model_name} has "
                              f"{model_kwargs(model_name)['num_heads']}. Fix: pass the matching preset or omit --model.")


def convert(src: str | os.PathLike, out: str | os.PathLike, model_name: str | None = None, to: str = "studio",
            diffusers_norm_eps: float = 1e-6) -> DiT:
    """Convert SRC (official .pt, studio or diffusers folder) into a new `to` folder OUT, written atomically.

    Returns the loaded studio model. OUT must not be SRC (sources are never overwritten)."""
    src, out = Path(src), Path(out)
    if to not in ("studio", "diffusers"):
        raise ConversionError(f"unknown target format {to!r}; use 'studio' or 'diffusers'")
    if out.exists() and src.exists() and out.resolve() == src.resolve():
        raise ConversionError("OUT is the same as SRC; write the conversion to a new folder")
    if out.exists() and not out.is_dir():
        raise ConversionError(f"{out} exists and is a file; OUT must be a folder")
    model, meta = load_any(src, model_name)
    if to == "studio":
        save_checkpoint(model, out, studio=meta)
        return model
    target = to_diffusers(model, norm_eps=diffusers_norm_eps)
    with atomic_folder(out) as tmp:
        target.save_pretrained(tmp, safe_serialization=True)
    return model


# ====================================================================== CLI
def main(argv: list[str] | None = None) -> int:
    """`python -m dit.convert SRC OUT [--model PRESET] [--to studio|diffusers]`."""
    parser = argparse.ArgumentParser(prog="python -m dit.convert", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", help="official DiT .pt, studio checkpoint folder, or diffusers model/pipeline folder")
    parser.add_argument("out", help="output folder")
    parser.add_argument("--model", default=None, help="preset to check the weights against (gives the head count), "
                                                      "e.g. DiT-XL/2")
    parser.add_argument("--to", choices=("studio", "diffusers"), default="studio", help="output format")
    parser.add_argument("--diffusers-norm-eps", type=float, default=1e-6,
                        help="norm_eps written to the diffusers config (1e-6 = the original DiT; diffusers' default 1e-5)")
    args = parser.parse_args(argv)
    src, out = Path(args.src), Path(args.out)
    try:
        model = convert(src, out, args.model, args.to, args.diffusers_norm_eps)
    except (CheckpointError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    cfg = model.config
    print(f"wrote {args.to} checkpoint {out}: DiT depth {cfg.depth}, width {cfg.hidden_size}, {cfg.num_heads} heads, "
          f"patch {cfg.patch_size}, input {cfg.input_size}, {cfg.in_channels}->{model.out_channels} channels, "
          f"{cfg.num_classes} classes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
