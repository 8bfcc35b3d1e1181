"""The DiT backbone (Peebles & Xie, "Scalable Diffusion Models with Transformers", 2023).

Exactly the original architecture and initialisation (adaLN-Zero blocks, fixed 2-D sin-cos position
table saved in the state dict, GLIDE timestep embedding, label table with a null class, learned
sigma), with the original state-dict key names, as a diffusers `ModelMixin` + `ConfigMixin` so
that `save_pretrained` / `from_pretrained` write and read safetensors checkpoint folders.

Beyond the original: any input size and channel count (the position table is recomputed for grids
other than the trained one), attention operators chosen per block by name from `dit.attention`,
an MLP choice from `dit.mlp` (per block, with per-block ratios), parallel blocks (`parallel_branches`, the
grafting paper's depth -> width restructuring) and model transforms named in the config (e.g. `dynamic`,
DyDiT routers, registered by `dit.dynamic`), applied to the built model.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from .attention import BlockContext, build_attention
from .attention.softmax import check_backend
from .embeddings import LabelEmbedder, TimestepEmbedder, sincos_pos_embed_2d
from .mlp import build_mlp

#: config key -> transform(model, value) applied at the end of `DiT.__init__` when the key is set
#: (registered by the modules that own them, e.g. `dit.dynamic` registers "dynamic").
MODEL_TRANSFORMS: dict[str, Callable[["DiT", Any], None]] = {}


def register_model_transform(key: str) -> Callable[[Callable[["DiT", Any], None]], Callable[["DiT", Any], None]]:
    """Register `fn(model, value)` to run on every DiT whose config sets `key` (a transform of the built model)."""
    def wrap(fn: Callable[["DiT", Any], None]) -> Callable[["DiT", Any], None]:
        MODEL_TRANSFORMS[key] = fn
        return fn
    return wrap


AUTOCAST_DEVICES = ("cpu", "cuda", "xpu", "mps", "hpu")


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN modulation x * (1 + scale) + shift, with (N, D) shift/scale broadcast over tokens."""
    return torch.addcmul(shift.unsqueeze(1), x, 1 + scale.unsqueeze(1))


class PatchEmbed(nn.Module):
    """Non-overlapping p x p patches -> tokens (key `proj`, as timm's PatchEmbed)."""

    def __init__(self, patch_size: int, in_channels: int, hidden_size: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (N, T, D)


class DiTBlock(nn.Module):
    """adaLN-Zero transformer block; attention and MLP are registry operators."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, attention: str = "softmax",
                 attention_options: dict[str, Any] | None = None, mlp_type: str = "mlp"):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = build_attention(attention, hidden_size, num_heads, **(attention_options or {}))
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = build_mlp(mlp_type, hidden_size, mlp_ratio)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size, bias=True))

    def forward(self, x: torch.Tensor, c: torch.Tensor, ctx: BlockContext) -> torch.Tensor:
        mod = self.adaLN_modulation(c).chunk(6, dim=1)
        x = self.attention_branch(x, c, ctx, mod)
        shift_mlp, scale_mlp, gate_mlp = mod[3:]  # x + `mlp_update`, fused into one addcmul
        mlp_out = self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp), ctx.grid)
        return torch.addcmul(x, gate_mlp.unsqueeze(1), mlp_out)

    def attention_branch(self, x: torch.Tensor, c: torch.Tensor, ctx: BlockContext,
                         mod: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
        """The residual stream after the attention half (operator hooks, gated attention): x -> x'."""
        shift_msa, scale_msa, gate_msa = (mod or self.adaLN_modulation(c).chunk(6, dim=1))[:3]
        x = self.attn.pre_attention(x, c, ctx)
        # x + gate * attn(...) as one addcmul: one memory pass instead of two (eager; compile fuses either way)
        attn_out = self.attn(modulate(self.norm1(x), shift_msa, scale_msa), ctx.grid)
        x = torch.addcmul(x, gate_msa.unsqueeze(1), attn_out)
        return self.attn.post_attention(x, c, ctx)

    def mlp_update(self, x: torch.Tensor, c: torch.Tensor, ctx: BlockContext,
                   mod: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
        """The MLP half's gated update, added to x by the block."""
        shift_mlp, scale_mlp, gate_mlp = (mod or self.adaLN_modulation(c).chunk(6, dim=1))[3:]
        return gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp), ctx.grid)

    def prepare(self, grid: tuple[int, int], device: torch.device, batch: int | None = None,
                dtype: torch.dtype | None = None) -> None:
        """Eager set-up of the operators' per-grid constants (see `AttentionOp.prepare`)."""
        self.attn.prepare(grid, device, batch, dtype)

    @property
    def attention_name(self) -> str:
        return self.attn.name

    def flops(self, grid: tuple[int, int]) -> dict[str, float]:
        """Multiply-adds of this block for one sample, as its operators report them (DiT paper convention)."""
        t = grid[0] * grid[1]
        attn = self.attn.flops_breakdown(t, grid) if hasattr(self.attn, "flops_breakdown") else \
            {"products": 0.0, "total": float(self.attn.flops(t))}
        mlp = float(self.mlp.flops(t, grid))
        adaln = float(self.adaLN_modulation[-1].in_features * self.adaLN_modulation[-1].out_features)
        total = float(attn["total"]) + mlp + adaln
        return {"attention_flops": float(attn["total"]), "attention_products": float(attn.get("products", 0.0)),
                "mlp_flops": mlp, "adaln_flops": adaln, "total": total}


class ParallelBlock(nn.Module):
    """Branches that read the same input, their residual updates summed: x + sum_i (B_i(x) - x).

    The grafting paper's depth -> width restructuring (Chandrasegaran et al. 2025, "convert every pair of
    sequential transformer blocks into parallel blocks"); each branch is a full adaLN-Zero `DiTBlock`.
    """

    def __init__(self, branches: Sequence[DiTBlock]):
        super().__init__()
        self.branches = nn.ModuleList(branches)

    def forward(self, x: torch.Tensor, c: torch.Tensor, ctx: BlockContext) -> torch.Tensor:
        out = x
        for branch in self.branches:
            out = out + (branch(x, c, ctx) - x)
        return out

    def prepare(self, grid: tuple[int, int], device: torch.device, batch: int | None = None,
                dtype: torch.dtype | None = None) -> None:
        for branch in self.branches:
            branch.prepare(grid, device, batch, dtype)

    @property
    def attention_name(self) -> str:
        return self.branches[0].attention_name

    def flops(self, grid: tuple[int, int]) -> dict[str, float]:
        parts = [b.flops(grid) for b in self.branches]
        return {k: float(sum(p[k] for p in parts)) for k in parts[0]}


class FinalLayer(nn.Module):
    """adaLN (shift, scale) -> Linear to p*p*out_channels."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


def per_block(value: Any, depth: int, what: str, cast: Callable[[Any], Any] = str) -> list[Any]:
    """One value per block from a single value, a list, or a comma-separated string."""
    if isinstance(value, str):
        values = [v.strip() for v in value.split(",")] if "," in value else [value] * depth
    elif isinstance(value, (list, tuple)):
        values = list(value)
    else:
        values = [value] * depth
    if len(values) != depth:
        raise ValueError(f"{what} layout has {len(values)} entries but the model has {depth} blocks; "
                         "give one value, or exactly one per block")
    return [cast(v) for v in values]


def block_attention_list(attention: str | Sequence[str], depth: int) -> list[str]:
    """One attention name per block from a name, a list, or a comma-separated string."""
    if isinstance(attention, str):
        names = [a.strip() for a in attention.split(",")] if "," in attention else [attention] * depth
    else:
        names = list(attention)
    if len(names) != depth:
        raise ValueError(f"attention layout has {len(names)} entries but the model has {depth} blocks; "
                         "give one name, or exactly one name per block")
    return names


class DiT(ModelMixin, ConfigMixin):
    """Class-conditional diffusion transformer; `model(x, t, y)` as the original DiT."""

    _supports_gradient_checkpointing = True
    _keys_to_ignore_on_load_unexpected: list[str] = []

    @register_to_config
    def __init__(
        self,
        input_size: int = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        class_dropout_prob: float = 0.1,
        num_classes: int = 1000,
        learn_sigma: bool = True,
        attention: str | list[str] = "softmax",
        attention_backend: str = "sdpa",
        attention_options: dict[str, Any] | None = None,
        mlp_type: str = "mlp",
        dynamic: dict[str, Any] | None = None,
        parallel_branches: int = 1,
    ):
        super().__init__()
        check_backend(attention_backend)
        self.in_channels = in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.patch_size = patch_size
        self.num_heads = num_heads
        self.num_classes = num_classes
        self.gradient_checkpointing = False

        self.x_embedder = PatchEmbed(patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        grid = input_size // patch_size
        # Fixed sin-cos table; a Parameter (not a buffer) so that it is in the state dict, as the original.
        self.pos_embed = nn.Parameter(torch.zeros(1, grid * grid, hidden_size), requires_grad=False)
        self._pos_cache: dict[tuple[int, int], torch.Tensor] = {}

        options = dict(attention_options or {})
        options.setdefault("backend", attention_backend)
        names = block_attention_list(attention, depth)
        mlps = per_block(mlp_type, depth, "mlp_type")
        ratios = per_block(mlp_ratio, depth, "mlp_ratio", float)
        if int(parallel_branches) < 1:
            raise ValueError(f"parallel_branches must be >= 1, got {parallel_branches!r}")

        def block(i: int) -> DiTBlock:
            return DiTBlock(hidden_size, num_heads, ratios[i], names[i], options, mlps[i])

        if int(parallel_branches) == 1:
            self.blocks = nn.ModuleList([block(i) for i in range(depth)])
        else:
            self.blocks = nn.ModuleList([ParallelBlock([block(i) for _ in range(int(parallel_branches))])
                                         for i in range(depth)])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.initialize_weights()
        self.auxiliary_loss_fns: list[Callable[["DiT", int], dict[str, torch.Tensor]]] = []
        for key, transform in MODEL_TRANSFORMS.items():
            if self.config.get(key):
                transform(self, self.config[key])

    # ------------------------------------------------------------------ initialisation
    def initialize_weights(self) -> None:
        """The original DiT initialisation (xavier linears, N(0, 0.02) embeddings, adaLN-Zero)."""

        def _basic_init(module: nn.Module) -> None:
            if isinstance(module, nn.Linear):
                torch.nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.constant_(module.bias, 0)

        self.apply(_basic_init)
        grid = self.config.input_size // self.patch_size
        table = sincos_pos_embed_2d(self.config.hidden_size, grid, grid)
        self.pos_embed.data.copy_(torch.from_numpy(table).float().unsqueeze(0))
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view([w.shape[0], -1]))
        nn.init.constant_(self.x_embedder.proj.bias, 0)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for block in (m for m in self.blocks.modules() if isinstance(m, DiTBlock)):
            nn.init.constant_(block.adaLN_modulation[-1].weight, 0)
            nn.init.constant_(block.adaLN_modulation[-1].bias, 0)
            if hasattr(block.attn, "reset_extra_parameters"):
                block.attn.reset_extra_parameters()
            if hasattr(block, "reset_router_parameters"):
                block.reset_router_parameters()
        nn.init.constant_(self.final_layer.adaLN_modulation[-1].weight, 0)
        nn.init.constant_(self.final_layer.adaLN_modulation[-1].bias, 0)
        nn.init.constant_(self.final_layer.linear.weight, 0)
        nn.init.constant_(self.final_layer.linear.bias, 0)

    # ------------------------------------------------------------------ helpers
    @property
    def block_attention(self) -> list[str]:
        """The attention operator name of each block."""
        return [block.attention_name for block in self.blocks]

    def set_attention_backend(self, backend: str) -> None:
        """Switch every operator's attention kernel backend (sdpa | xformers | math | auto)."""
        check_backend(backend)
        for module in self.modules():
            if hasattr(module, "backend") and module is not self:
                module.backend = backend
        self.register_to_config(attention_backend=backend)

    def position_table(self, grid_h: int, grid_w: int, like: torch.Tensor) -> torch.Tensor:
        trained = self.config.input_size // self.patch_size
        if (grid_h, grid_w) == (trained, trained):
            return self.pos_embed
        key = (grid_h, grid_w)
        if key not in self._pos_cache:
            table = sincos_pos_embed_2d(self.config.hidden_size, grid_h, grid_w)
            self._pos_cache[key] = torch.from_numpy(table).float().unsqueeze(0)
        return self._pos_cache[key].to(device=like.device, dtype=like.dtype)

    def unpatchify(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """(N, T, p*p*C) -> (N, C, H, W)."""
        c, p = self.out_channels, self.patch_size
        h, w = grid
        x = x.reshape(x.shape[0], h, w, p, p, c)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(x.shape[0], c, h * p, w * p)

    def check_input(self, x: torch.Tensor) -> None:
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"expected input of shape (N, {self.in_channels}, H, W), got {tuple(x.shape)}")
        p = self.patch_size
        if x.shape[2] % p or x.shape[3] % p:
            raise ValueError(f"input size {x.shape[2]}x{x.shape[3]} is not divisible by the patch size {p}")

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
                force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        """x: (N, C, H, W) images or latents, t: (N,) timesteps, y: (N,) labels (num_classes = null).

        In training, labels are dropped to the null class with `class_dropout_prob` (or exactly where
        `force_drop_ids == 1` when given, as the original's LabelEmbedder).
        Returns (N, 2C, H, W) when `learn_sigma` (noise prediction then variance interpolation), else (N, C, H, W).
        """
        self.check_input(x)
        grid = (x.shape[2] // self.patch_size, x.shape[3] // self.patch_size)
        h = self.x_embedder(x)
        h = h + self.position_table(*grid, like=h)
        t_emb = self.t_embedder(t.reshape(-1).expand(x.shape[0]) if t.numel() == 1 else t)
        c = t_emb + self.y_embedder(y, self.training, force_drop_ids)
        ctx = BlockContext(grid=grid, t_emb=t_emb)
        # eager, outside compiled blocks: shared per-grid constants (token orders, masks) in the attention dtype
        dev, act_dtype = h.device.type, h.dtype
        if dev in AUTOCAST_DEVICES and torch.is_autocast_enabled(dev):  # (asking about "meta" raises)
            act_dtype = torch.get_autocast_dtype(dev)
        for block in self.blocks:
            prepare = getattr(block, "prepare", None)
            if prepare is not None:
                prepare(grid, h.device, h.shape[0], act_dtype)
        for block in self.blocks:
            if torch.is_grad_enabled() and self.gradient_checkpointing:
                h = self._gradient_checkpointing_func(block, h, c, ctx)
            else:
                h = block(h, c, ctx)
        h = self.final_layer(h, c)
        return self.unpatchify(h, grid)

    def forward_with_cfg(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, cfg_scale: float,
                         cfg_channels: int | None = None) -> torch.Tensor:
        """Classifier-free guidance on a batch whose second half carries the null label (GLIDE trick).

        `cfg_channels=None` guides every predicted (non-variance) channel; `cfg_channels=3` is the original
        DiT release's choice (kept for exact reproduction of its samples).
        """
        half = x[: len(x) // 2]
        combined = torch.cat([half, half], dim=0)
        out = self.forward(combined, t, y)
        k = self.in_channels if cfg_channels is None else cfg_channels
        eps, rest = out[:, :k], out[:, k:]
        cond_eps, uncond_eps = torch.split(eps, len(eps) // 2, dim=0)
        half_eps = uncond_eps + cfg_scale * (cond_eps - uncond_eps)
        eps = torch.cat([half_eps, half_eps], dim=0)
        return torch.cat([eps, rest], dim=1)

    def auxiliary_losses(self, step: int) -> dict[str, torch.Tensor]:
        """Extra training losses of the last forward (e.g. DyDiT's FLOPs loss, registered by its transform);
        added to the diffusion loss by train.py."""
        losses: dict[str, torch.Tensor] = {}
        for fn in self.auxiliary_loss_fns:
            losses.update(fn(self, step))
        return losses

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Any, **kwargs: Any) -> "DiT":
        """diffusers' loader, preceded by a key/shape check that names every mismatch.

        A folder written by `python -m dit.quant` (it holds `quant_config.json`) loads as a quantized model."""
        from .checkpoint import check_checkpoint_folder
        from .quant.storage import is_quantized_folder, load_quantized

        if is_quantized_folder(pretrained_model_name_or_path):
            return load_quantized(pretrained_model_name_or_path, cls, **kwargs)
        check_checkpoint_folder(pretrained_model_name_or_path, cls)
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)


def count_params(model: nn.Module) -> int:
    """Parameters; a quantized layer's packed weight (`dit.quant.QuantLinear`) counts its in x out entries."""
    packed = sum(m.in_features * m.out_features for m in model.modules() if hasattr(m, "qweight"))
    return int(sum(np.prod(p.shape) for p in model.parameters()) + packed)
