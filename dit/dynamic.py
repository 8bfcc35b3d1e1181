"""DyDiT: timestep-wise dynamic width (TDW) and spatial dynamic tokens (SDT) for DiT blocks.

Zhao et al., "Dynamic Diffusion Transformer" (ICLR 2025, arXiv 2410.03456) and DyDiT++ (arXiv
2504.06803). Facts followed here (see `reference/dynamic_and_grafting.md`, part A):

- **TDW** (Sec. A.1): per block a head router `Linear(D, H-1)` and an MLP-group router `Linear(D, H-1)`
  read only the timestep embedding E_t (not c = E_t + label). Head 0 / group 0 are always on (the
  v2 layout: a column of ones is prepended). The head mask multiplies each head's attention output
  before `proj`; the MLP hidden width is split into H groups and the group mask multiplies the fc1
  output before GELU (equivalent to dropping fc1 rows / fc2 columns).
- **SDT** (Sec. A.1, A.3): a token router `Linear(D, D/16) -> ReLU -> Linear(D/16, 1)` on the residual
  stream after the attention residual picks the tokens that get the MLP; the others pass unchanged.
  Attention always runs on all tokens.
- **Binarisation** (Sec. A.2): Gumbel-sigmoid sigma((logit + g1 - g2) / tau), tau = 5, hard threshold
  0.5 and a straight-through estimator in training; `logit > 0` at inference.
- **Init** (Sec. A.1): Xavier router weights, router biases 15 (heads, groups) and 35 (token router
  output) so that everything starts on.
- **FLOPs loss** (Sec. A.4, MACs as the DiT paper): per layer F_attn = 4 N D^2 + 2 N^2 D and
  F_mlp = 2 N D D_hidden (= 8 N D^2); per sample
  r_b = sum_l [a_bl F_attn + g_bl k_bl F_mlp] / sum_l (F_attn + F_mlp) with a, g the active head /
  group fractions and k the kept-token fraction; loss = w (mean_b r_b - lambda_t)^2, w = 2, where
  lambda_t = 1 for `hold_steps` (100) steps and then falls linearly to lambda over `warmup_steps`.
- **Real speed** (Sec. A.6): masks depend on t only, so at inference the whole batch shares them;
  the active heads / groups are executed by *slicing* the weights (qkv rows + proj columns, fc1
  rows + fc2 columns), cached per distinct pattern per layer, and SDT gathers the kept tokens of
  the whole batch (flattened), runs the MLP on them and scatters the result back.

The `dynamic` entry of the model config (`DiT(..., dynamic={...})`, saved in config.json) takes:

=================== ======== ============================================================================
key                 default  meaning
=================== ======== ============================================================================
target              0.5      lambda, the target FLOPs ratio of the blocks, in (0, 1]
tau                 5.0      Gumbel-sigmoid temperature (training only)
head_router         True     timestep-wise attention heads (TDW)
channel_router      True     timestep-wise MLP channel groups (TDW); needs an MLP with fc1/fc2
token_routing       True     spatial dynamic tokens for the MLP (SDT); needs a token-wise MLP ('mlp')
hold_steps          100      steps with lambda_t = 1 before the warm-up starts
warmup_steps        1000     steps over which lambda_t falls linearly from 1 to `target`
loss_weight         2.0      weight of the FLOPs loss
router_bias         15.0     initial bias of the head / group routers (positive: all on)
token_router_bias   35.0     initial bias of the token router's output (positive: all tokens kept)
token_router_ratio  16       hidden width of the token router is D // token_router_ratio
slice_cache_size    8        sliced-weight patterns kept per layer (LRU) for inference
=================== ======== ============================================================================

Attention operators: `softmax` is sliced at inference (reduced head count, real saving). Any other
operator (e.g. `linear` LiT, `proxy` PT-DiT) gets the head mask *masked*, not sliced: the input of its
output projection (`proj`, or the Linear named by the operator's `dynamic_head_target` attribute) is
split into H equal channel groups and multiplied by the mask. When the operator's own head count equals
H these groups are exactly its heads; otherwise (LiT's few heads) they are channel groups of its
concatenated head outputs. Masked execution costs full FLOPs; the FLOPs ratio then describes what a
sliced kernel would save. (PT-DiT `proxy`: the mask lands on its window attention's `proj`.)

Execution: training (and any forward with grad enabled, or with per-sample timesteps) multiplies masks
(exact 0/1 values, so an all-on model equals the static one bit for bit). `model.eval()` + no-grad with
one timestep for the batch (every sampler step, CFG halves included) evaluates the routers on one E_t row
per layer, slices the weights (LRU per pattern, invalidated when weights change) and gathers tokens.
`set_dynamic_execution(model, "masked")` forces masks (the reference path in tests).

Dynamic width is a *transform of a built model*: `apply_dynamic(model, cfg)` wraps each `DiTBlock`'s own
modules (same keys) in a `DynamicDiTBlock` with fresh routers and registers the FLOPs loss. It is
registered as the model transform of the config key `dynamic` (`dit.model.register_model_transform`), so
`DiT(..., dynamic={...})` and `DiT.from_pretrained` of a dynamic checkpoint build the static model and
then apply it; `dit.model` never imports this module.

Usage::

    model = DiT(**model_kwargs("DiT-S/2"), dynamic={"target": 0.5})     # or:
    model = convert_to_dynamic(trained_static_dit, {"target": 0.5})      # weights copied, routers all on
    loss = diffusion_loss + model.auxiliary_losses(step)["flops"]        # train.py adds it
    dynamic_stats(model); timestep_masks(model, scheduler.timesteps)     # reporting
    python -m dit.bench dynamic                                          # speed vs static

Note: with gradient checkpointing the block forward is recomputed in backward, so the running
statistics count training forwards twice (the FLOPs loss is unaffected).
"""
from __future__ import annotations

import contextlib
import math
import time
from collections import OrderedDict
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .attention import BlockContext
from .attention.softmax import scaled_dot_product
from .mlp import Mlp
from .model import DiTBlock, modulate, register_model_transform

DYNAMIC_DEFAULTS: dict[str, Any] = {
    "target": 0.5,
    "tau": 5.0,
    "head_router": True,
    "channel_router": True,
    "token_routing": True,
    "hold_steps": 100,
    "warmup_steps": 1000,
    "loss_weight": 2.0,
    "router_bias": 15.0,
    "token_router_bias": 35.0,
    "token_router_ratio": 16,
    "slice_cache_size": 8,
}

EXECUTION_MODES = ("auto", "masked")


# ---------------------------------------------------------------------------------------------- config
def dynamic_options(dynamic: dict[str, Any] | bool | None) -> dict[str, Any]:
    """The validated `dynamic` config with defaults filled in (raises `ValueError` naming the fix)."""
    if dynamic is True:
        dynamic = {}
    if not isinstance(dynamic, dict):
        raise ValueError(f"dynamic must be a dict of DyDiT options (or True for the defaults), got {dynamic!r}")
    unknown = sorted(set(dynamic) - set(DYNAMIC_DEFAULTS))
    if unknown:
        raise ValueError(f"unknown dynamic option(s) {', '.join(unknown)}; valid options: "
                         f"{', '.join(DYNAMIC_DEFAULTS)}")
    opts = dict(DYNAMIC_DEFAULTS)
    opts.update(dynamic)
    target = opts["target"]
    if isinstance(target, bool) or not isinstance(target, (int, float)) or not 0.0 < float(target) <= 1.0:
        raise ValueError(f"dynamic target (lambda, the FLOPs ratio to reach) must be in (0, 1], got {target!r}; "
                         "e.g. dynamic={'target': 0.5} for half the block FLOPs")
    if not float(opts["tau"]) > 0:
        raise ValueError(f"dynamic tau (Gumbel-sigmoid temperature) must be > 0, got {opts['tau']!r}")
    for key in ("hold_steps", "warmup_steps", "slice_cache_size"):
        if int(opts[key]) < 0:
            raise ValueError(f"dynamic {key} must be >= 0, got {opts[key]!r}")
    if int(opts["token_router_ratio"]) < 1:
        raise ValueError(f"dynamic token_router_ratio must be >= 1, got {opts['token_router_ratio']!r}")
    if float(opts["loss_weight"]) < 0:
        raise ValueError(f"dynamic loss_weight must be >= 0, got {opts['loss_weight']!r}")
    if not (opts["head_router"] or opts["channel_router"] or opts["token_routing"]):
        raise ValueError("dynamic config turns every router off (head_router, channel_router, token_routing); "
                         "enable at least one, or build a static model with dynamic=None")
    return opts


def target_at_step(step: int, dynamic: dict[str, Any] | bool) -> float:
    """lambda_t of the FLOPs loss (DyDiT Sec. A.4): 1 for `hold_steps`, then linear to `target` over `warmup_steps`."""
    opts = dynamic_options(dynamic)
    target, hold, warm = float(opts["target"]), int(opts["hold_steps"]), int(opts["warmup_steps"])
    if step < hold:
        return 1.0
    progress = 1.0 if warm == 0 else min(1.0, (step - hold) / warm)
    return 1.0 - (1.0 - target) * progress


# ---------------------------------------------------------------------------------------------- gates
def binary_gate(logits: torch.Tensor, tau: float, training: bool) -> torch.Tensor:
    """Hard 0/1 gate from router logits (DyDiT Sec. A.2).

    Training: y_soft = sigmoid((logits + g1 - g2) / tau) with g1, g2 ~ Gumbel(0, 1) (their difference is
    Logistic noise), y = 1[y_soft > 0.5] with a straight-through gradient. The value is exactly 0 or 1
    (`y_hard + (y_soft - y_soft.detach())`), so an all-on gate reproduces the static block bit for bit.
    Inference: 1[logits > 0].
    """
    if not training:
        return (logits > 0).to(logits.dtype)
    u = torch.rand_like(logits).clamp_(1e-6, 1 - 1e-6)
    y_soft = torch.sigmoid((logits + torch.log(u) - torch.log1p(-u)) / tau)
    y_hard = (y_soft > 0.5).to(logits.dtype)
    return y_hard + (y_soft - y_soft.detach())


def _with_first_on(gate: torch.Tensor) -> torch.Tensor:
    """(B, H-1) gates -> (B, H) with head / group 0 always on (DyDiT v2)."""
    return torch.cat([torch.ones_like(gate[:, :1]), gate], dim=1)


def _active_subset(mask: torch.Tensor | None, total: int) -> tuple[int, ...] | None:
    """Active head/group indices of a batch-uniform mask (row 0); None when there is no mask or all are on."""
    if mask is None:
        return None
    active = tuple(i for i, on in enumerate(mask[0].tolist()) if on > 0.5)
    return None if len(active) == total else active


def _expand_groups(mask: torch.Tensor, channels: int) -> torch.Tensor:
    """(B, G) group mask -> (B, channels) channel mask (G equal contiguous groups)."""
    return mask.repeat_interleave(channels // mask.shape[1], dim=1)


def _broadcast_rows(mask: torch.Tensor, x: torch.Tensor, uniform: bool) -> torch.Tensor:
    """A (B, C) channel mask shaped to multiply `x` (..., C) whose leading dim is B or a multiple of B."""
    if x.shape[-1] != mask.shape[1]:
        raise RuntimeError(f"dynamic mask has {mask.shape[1]} channels but the masked layer sees {x.shape[-1]}")
    if uniform:
        return mask[0]
    b = mask.shape[0]
    if x.ndim >= 2 and x.shape[0] % b == 0:
        m = mask if x.shape[0] == b else mask.repeat_interleave(x.shape[0] // b, dim=0)
        return m.view(x.shape[0], *([1] * (x.ndim - 2)), mask.shape[1])
    raise RuntimeError(f"cannot apply a per-sample dynamic mask of batch {b} to a tensor of shape {tuple(x.shape)}; "
                       "the operator reshapes the batch in a way the masked path does not know")


@contextlib.contextmanager
def _input_masked(linear: nn.Module, mask: torch.Tensor, uniform: bool) -> Iterator[None]:
    """Multiply the input of `linear` by a channel mask while the block runs its operator."""
    def hook(_module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        return (args[0] * _broadcast_rows(mask, args[0], uniform),) + tuple(args[1:])

    handle = linear.register_forward_pre_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@contextlib.contextmanager
def _output_masked(linear: nn.Module, mask: torch.Tensor, uniform: bool) -> Iterator[None]:
    """Multiply the output of `linear` (fc1, before the activation) by a channel mask."""
    def hook(_module: nn.Module, _args: tuple[Any, ...], out: torch.Tensor) -> torch.Tensor:
        return out * _broadcast_rows(mask, out, uniform)

    handle = linear.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


# ---------------------------------------------------------------------------------------------- block
def attention_macs(num_tokens: int, dim: int) -> float:
    """Softmax attention MACs of one layer for one sample: 4 N D^2 + 2 N^2 D (DyDiT loss.py, DiT's GFLOPs)."""
    return float(4 * num_tokens * dim * dim + 2 * num_tokens * num_tokens * dim)


def mlp_macs(num_tokens: int, dim: int, hidden: int) -> float:
    """MLP MACs of one layer for one sample: 2 N D D_hidden (8 N D^2 at ratio 4)."""
    return float(2 * num_tokens * dim * hidden)


class DynamicDiTBlock(DiTBlock):
    """A `DiTBlock` (same keys: norm1, attn, norm2, mlp, adaLN_modulation) plus DyDiT routers.

    Built around an existing block (`DynamicDiTBlock(block, num_heads, options)`), whose modules it takes
    over unchanged. Extra keys: `head_router` Linear(D, H-1), `channel_router` Linear(D, H-1),
    `token_router` (Linear(D, D/16), ReLU, Linear(D/16, 1)), each present only when enabled in the config.
    """

    def __init__(self, block: DiTBlock, num_heads: int, options: dict[str, Any]):
        nn.Module.__init__(self)
        for key in ("norm1", "attn", "norm2", "mlp", "adaLN_modulation"):
            setattr(self, key, getattr(block, key))
        hidden_size = self.norm1.normalized_shape[0]
        attention, mlp_type = self.attn.name, type(self.mlp).__name__
        self.dynamic_options = options
        self.num_groups = num_heads
        self.tau = float(options["tau"])
        self.execution = "auto"
        self._complete = False
        self._slice_cache: OrderedDict[tuple[Any, ...], tuple[torch.Tensor, ...]] = OrderedDict()
        self._record: dict[str, Any] | None = None
        self._stats: torch.Tensor | None = None   # running sums: forwards, heads, groups, tokens (fractions)

        use_heads = bool(options["head_router"]) and num_heads > 1
        use_groups = bool(options["channel_router"]) and num_heads > 1
        if use_heads:
            target = self.head_mask_target()
            if target.in_features % num_heads:
                raise ValueError(f"attention {attention!r}: its output projection has {target.in_features} inputs, "
                                 f"not divisible into {num_heads} head groups; set dynamic head_router=False")
        if use_groups:
            fc1 = getattr(self.mlp, "fc1", None)
            if fc1 is None or not hasattr(self.mlp, "fc2"):
                raise ValueError(f"dynamic channel_router needs an MLP with fc1/fc2 (mlp_type 'mlp'), "
                                 f"not {mlp_type!r}; set dynamic channel_router=False")
            if fc1.out_features % num_heads:
                raise ValueError(f"MLP hidden width {fc1.out_features} is not divisible into {num_heads} groups; "
                                 "set dynamic channel_router=False or change mlp_ratio")
        if options["token_routing"] and not isinstance(self.mlp, Mlp):
            raise ValueError(f"dynamic token_routing needs a token-wise MLP (mlp_type 'mlp'), not {mlp_type!r} "
                             "(a spatial conv MLP cannot run on a subset of tokens); set token_routing=False")
        self.head_router = nn.Linear(hidden_size, num_heads - 1) if use_heads else None
        self.channel_router = nn.Linear(hidden_size, num_heads - 1) if use_groups else None
        if options["token_routing"]:
            inner = max(1, hidden_size // int(options["token_router_ratio"]))
            self.token_router = nn.Sequential(nn.Linear(hidden_size, inner), nn.ReLU(), nn.Linear(inner, 1))
        else:
            self.token_router = None

    # ------------------------------------------------------------------ set-up
    def head_mask_target(self) -> nn.Module:
        """The Linear whose input carries the concatenated head outputs (softmax: `attn.proj`)."""
        name = getattr(self.attn, "dynamic_head_target", "proj")
        target = getattr(self.attn, name, None)
        if target is None or not hasattr(target, "in_features"):
            raise ValueError(f"attention {self.attn.name!r} has no output projection {name!r} to apply the DyDiT "
                             "head mask to; set dynamic head_router=False, or give the operator a "
                             "`dynamic_head_target` attribute naming its output Linear")
        return target

    def reset_router_parameters(self) -> None:
        """Xavier weights and the DyDiT biases (15 for head/group routers, 35 for the token router output)."""
        for router in (self.head_router, self.channel_router):
            if router is not None:
                nn.init.xavier_uniform_(router.weight)
                nn.init.constant_(router.bias, float(self.dynamic_options["router_bias"]))
        if self.token_router is not None:
            for layer in (self.token_router[0], self.token_router[2]):
                nn.init.xavier_uniform_(layer.weight)
                nn.init.constant_(layer.bias, 0.0)
            nn.init.constant_(self.token_router[2].bias, float(self.dynamic_options["token_router_bias"]))
        self._slice_cache.clear()

    def __getstate__(self) -> dict[str, Any]:
        """Copies (deepcopy for EMA, pickling) drop the last forward's masks (they hold the autograd graph)."""
        state = super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__
        state = dict(state)
        state["_record"] = None
        state["_slice_cache"] = OrderedDict()
        return state

    def train(self, mode: bool = True) -> "DynamicDiTBlock":
        self._slice_cache.clear()  # weights will change; sliced copies would go stale
        return super().train(mode)

    # ------------------------------------------------------------------ masks
    def width_logits(self, t_emb: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Head and group router logits (B, H-1) from the timestep embedding only."""
        head = self.head_router(t_emb) if self.head_router is not None else None
        group = self.channel_router(t_emb) if self.channel_router is not None else None
        return head, group

    def _use_sliced(self, t_emb: torch.Tensor) -> bool:
        if self.training or torch.is_grad_enabled() or self.execution != "auto" or self._complete:
            return False
        return t_emb.shape[0] == 1 or bool(torch.equal(t_emb, t_emb[:1].expand_as(t_emb)))

    def _attention_sliceable(self) -> bool:
        attn = self.attn
        return (attn.name == "softmax" and type(attn.qkv) is nn.Linear and type(attn.proj) is nn.Linear
                and hasattr(attn, "split_heads"))

    def _mlp_sliceable(self) -> bool:
        return isinstance(self.mlp, Mlp) and type(self.mlp.fc1) is nn.Linear and type(self.mlp.fc2) is nn.Linear

    def _cached(self, key: tuple[Any, ...], params: Sequence[torch.Tensor | None],
                build: Callable[[], tuple[torch.Tensor, ...]]) -> tuple[torch.Tensor, ...]:
        """LRU cache of sliced weights per (kind, pattern); invalidated when the weights change."""
        stamp = tuple((p.data_ptr(), p._version, p.dtype, p.device) for p in params if p is not None)
        full_key = key + stamp
        hit = self._slice_cache.get(full_key)
        if hit is not None:
            self._slice_cache.move_to_end(full_key)
            return hit
        value = build()
        size = int(self.dynamic_options["slice_cache_size"])
        if size > 0:
            self._slice_cache[full_key] = value
            while len(self._slice_cache) > size:
                self._slice_cache.popitem(last=False)
        return value

    # ------------------------------------------------------------------ sliced execution (inference)
    def _sliced_attention(self, h: torch.Tensor, heads: tuple[int, ...]) -> torch.Tensor:
        """MHSA(X) = sum over active heads of Attn(X W^Q_h, X W^K_h, X W^V_h) W^O_h (DyDiT inference)."""
        attn = self.attn
        d, dh, k = attn.proj.in_features, attn.head_dim, len(heads)

        def build() -> tuple[torch.Tensor, ...]:
            dev = attn.qkv.weight.device
            per_head = (torch.tensor(heads, device=dev)[:, None] * dh + torch.arange(dh, device=dev)).reshape(-1)
            rows = torch.cat([per_head + s * d for s in range(3)])
            b = attn.qkv.bias.index_select(0, rows) if attn.qkv.bias is not None else None
            return attn.qkv.weight.index_select(0, rows), b, attn.proj.weight.index_select(1, per_head)

        w_qkv, b_qkv, w_proj = self._cached(("attn", heads), [attn.qkv.weight, attn.qkv.bias, attn.proj.weight], build)
        n, t, _ = h.shape
        qkv = F.linear(h, w_qkv, b_qkv).reshape(n, t, 3, k, dh).permute(2, 0, 3, 1, 4)
        out = scaled_dot_product(qkv[0], qkv[1], qkv[2], attn.backend)
        return F.linear(out.transpose(1, 2).reshape(n, t, k * dh), w_proj, attn.proj.bias)

    def _sliced_mlp_fn(self, groups: tuple[int, ...]) -> Callable[[torch.Tensor], torch.Tensor]:
        """MLP(X) = sum over active groups of GELU(X W1_{:,g}) W2_{g,:} (DyDiT inference, fc1 rows / fc2 columns)."""
        fc1, fc2 = self.mlp.fc1, self.mlp.fc2
        size = fc1.out_features // self.num_groups

        def build() -> tuple[torch.Tensor, ...]:
            dev = fc1.weight.device
            idx = (torch.tensor(groups, device=dev)[:, None] * size + torch.arange(size, device=dev)).reshape(-1)
            b = fc1.bias.index_select(0, idx) if fc1.bias is not None else None
            return fc1.weight.index_select(0, idx), b, fc2.weight.index_select(1, idx)

        w1, b1, w2 = self._cached(("mlp", groups), [fc1.weight, fc1.bias, fc2.weight], build)
        return lambda z: F.linear(F.gelu(F.linear(z, w1, b1), approximate="tanh"), w2, fc2.bias)

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor, c: torch.Tensor, ctx: BlockContext) -> torch.Tensor:
        if ctx.t_emb is None:
            raise RuntimeError("DynamicDiTBlock needs the timestep embedding in BlockContext.t_emb (DiT.forward "
                               "sets it); call the block through the DiT model")
        if self._complete:
            return super().forward(x, c, ctx)
        t_emb = ctx.t_emb
        b = x.shape[0]
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        sliced = self._use_sliced(t_emb)
        router_in = t_emb[:1] if sliced else t_emb
        head_logits, group_logits = self.width_logits(router_in)
        gate_fn = (lambda z: binary_gate(z, self.tau, self.training))
        head_mask = _with_first_on(gate_fn(head_logits)) if head_logits is not None else None
        group_mask = _with_first_on(gate_fn(group_logits)) if group_logits is not None else None

        # ---- attention branch (TDW heads)
        x = self.attn.pre_attention(x, c, ctx)
        h = modulate(self.norm1(x), shift_msa, scale_msa)
        heads = _active_subset(head_mask, self.num_groups) if sliced else None
        if heads is not None and self._attention_sliceable():
            attn_out = self._sliced_attention(h, heads)
        elif head_mask is not None and (heads is not None or not sliced):
            target = self.head_mask_target()
            with _input_masked(target, _expand_groups(head_mask, target.in_features), uniform=sliced):
                attn_out = self.attn(h, ctx.grid)
        else:
            attn_out = self.attn(h, ctx.grid)
        x = torch.addcmul(x, gate_msa.unsqueeze(1), attn_out)  # as DiTBlock: all-on equals static bit for bit
        x = self.attn.post_attention(x, c, ctx)

        # ---- MLP branch (TDW groups, SDT tokens)
        token_mask = None
        if self.token_router is not None:
            token_mask = binary_gate(self.token_router(x).squeeze(-1), self.tau, self.training)  # (B, N)
        hm = modulate(self.norm2(x), shift_mlp, scale_mlp)
        groups = _active_subset(group_mask, self.num_groups) if sliced else None
        if sliced:
            if groups is not None and not self._mlp_sliceable():
                mlp_fn = self._masked_mlp_fn(group_mask, ctx.grid, uniform=True)
            elif groups is not None:
                mlp_fn = self._sliced_mlp_fn(groups)
            else:
                mlp_fn = lambda z: self.mlp(z, ctx.grid)  # noqa: E731
            x = self._tokens_gathered(x, hm, gate_mlp, token_mask, mlp_fn)
        else:
            if group_mask is not None:
                mlp_out = self._masked_mlp_fn(group_mask, ctx.grid, uniform=False)(hm)
            else:
                mlp_out = self.mlp(hm, ctx.grid)
            gate = gate_mlp.unsqueeze(1) if token_mask is None else gate_mlp.unsqueeze(1) * token_mask.unsqueeze(-1)
            x = torch.addcmul(x, gate, mlp_out)

        self._remember(b, ctx.grid, head_mask, group_mask, token_mask)
        return x

    def _masked_mlp_fn(self, group_mask: torch.Tensor, grid: tuple[int, int],
                       uniform: bool) -> Callable[[torch.Tensor], torch.Tensor]:
        fc1 = self.mlp.fc1
        mask = _expand_groups(group_mask, fc1.out_features)

        def run(z: torch.Tensor) -> torch.Tensor:
            with _output_masked(fc1, mask, uniform):
                return self.mlp(z, grid)
        return run

    def _tokens_gathered(self, x: torch.Tensor, hm: torch.Tensor, gate_mlp: torch.Tensor,
                         token_mask: torch.Tensor | None,
                         mlp_fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """SDT at inference (DyFLUX's recipe): flatten to (B*N, D), run the MLP on the kept rows, scatter-add."""
        if token_mask is None:
            return torch.addcmul(x, gate_mlp.unsqueeze(1), mlp_fn(hm))
        b, n, d = x.shape
        idx = token_mask.reshape(-1).nonzero().squeeze(1)
        if idx.numel() == 0:
            return x
        if idx.numel() == b * n:
            return torch.addcmul(x, gate_mlp.unsqueeze(1), mlp_fn(hm))
        y = mlp_fn(hm.reshape(b * n, d).index_select(0, idx).unsqueeze(0)).squeeze(0)
        g = gate_mlp.index_select(0, torch.div(idx, n, rounding_mode="floor"))
        return x.reshape(b * n, d).index_add(0, idx, g * y).view(b, n, d)

    # ------------------------------------------------------------------ bookkeeping
    def _remember(self, b: int, grid: tuple[int, int], head_mask: torch.Tensor | None,
                  group_mask: torch.Tensor | None, token_mask: torch.Tensor | None) -> None:
        """Keep this forward's masks (with their graph, for the FLOPs loss) and update running statistics."""
        key = tuple(grid)
        if getattr(self, "_cost_grid", None) != key:  # the operators' own counts (F_attn, F_mlp of Sec. A.4)
            costs = DiTBlock.flops(self, key)
            self._cost_grid, self._costs = key, (costs["attention_flops"], costs["mlp_flops"])
        f_attn, f_mlp = self._costs
        ones = torch.ones(b, device=self._device(), dtype=torch.float32)
        heads = head_mask.float().mean(1).expand(b) if head_mask is not None else ones
        groups = group_mask.float().mean(1).expand(b) if group_mask is not None else ones
        tokens = token_mask.float().mean(1) if token_mask is not None else ones
        self._record = {"heads": heads, "groups": groups, "tokens": tokens, "f_attn": f_attn, "f_mlp": f_mlp}
        row = torch.stack([torch.ones((), device=ones.device), heads.detach().mean(), groups.detach().mean(),
                           tokens.detach().mean()])
        self._stats = row if self._stats is None else self._stats + row

    def _device(self) -> torch.device:
        return self.adaLN_modulation[-1].weight.device

    def flops_ratio_terms(self) -> tuple[torch.Tensor, float]:
        """(per-sample MACs of this layer in the last forward, full MACs) for the FLOPs-ratio loss."""
        if self._record is None:
            raise RuntimeError("no forward recorded yet: run the model on a batch before asking for the FLOPs loss")
        r = self._record
        used = r["heads"] * r["f_attn"] + r["groups"] * r["tokens"] * r["f_mlp"]
        return used, r["f_attn"] + r["f_mlp"]


# ---------------------------------------------------------------------------------------------- model-level API
@register_model_transform("dynamic")
def apply_dynamic(model: nn.Module, dynamic: dict[str, Any] | bool) -> nn.Module:
    """Wrap every block of a built DiT in a `DynamicDiTBlock` (its own weights kept, routers fresh and all on)
    and register the FLOPs loss with `model.auxiliary_losses`. In place; returns the model.

    Runs automatically for a config with `dynamic` set (the registered transform of that key). Parallel
    (restructured) blocks are not supported.
    """
    opts = dynamic_options(dynamic)
    if any(isinstance(b, DynamicDiTBlock) for b in model.blocks):
        raise ValueError("the model's blocks are already dynamic")
    if not all(type(b) is DiTBlock for b in model.blocks):
        kinds = sorted({type(b).__name__ for b in model.blocks})
        raise ValueError(f"DyDiT dynamic width needs plain sequential DiT blocks, not {', '.join(kinds)}; "
                         "apply it to a model without parallel_branches")
    param = next(model.parameters())
    new = nn.ModuleList([DynamicDiTBlock(b, model.num_heads, opts) for b in model.blocks])
    for block in new:
        block.reset_router_parameters()
    model.blocks = new.to(device=param.device, dtype=param.dtype) if param.device.type != "meta" else new
    if dynamic_auxiliary_losses not in model.auxiliary_loss_fns:
        model.auxiliary_loss_fns.append(dynamic_auxiliary_losses)
    return model


def dynamic_blocks(model: nn.Module) -> list[DynamicDiTBlock]:
    """The DyDiT blocks of a model (raises if it has none)."""
    blocks = [m for m in model.modules() if isinstance(m, DynamicDiTBlock)]
    if not blocks:
        raise ValueError("this model has no dynamic blocks; build it with DiT(..., dynamic={...}) or "
                         "dit.dynamic.convert_to_dynamic(model, {...})")
    return blocks


def flops_ratio(model: nn.Module) -> torch.Tensor:
    """Per-sample FLOPs ratio r_b (B,) of the blocks in the last forward (DyDiT Sec. A.4; differentiable)."""
    used, full = None, 0.0
    for block in dynamic_blocks(model):
        u, f = block.flops_ratio_terms()
        used = u if used is None else used + u
        full += f
    return used / full


def dynamic_auxiliary_losses(model: nn.Module, step: int) -> dict[str, torch.Tensor]:
    """{"flops": w * (mean_b r_b - lambda_t)^2} from the masks of the last forward (DyDiT Sec. A.4)."""
    opts = dynamic_options(model.config.dynamic)
    ratio = flops_ratio(model).mean()
    return {"flops": float(opts["loss_weight"]) * (ratio - target_at_step(step, opts)) ** 2}


def set_dynamic_execution(model: nn.Module, mode: str) -> None:
    """'auto' (eval + no-grad + shared timestep -> sliced weights and gathered tokens) or 'masked' (always masks)."""
    if mode not in EXECUTION_MODES:
        raise ValueError(f"unknown dynamic execution {mode!r}; use one of {', '.join(EXECUTION_MODES)}")
    for block in dynamic_blocks(model):
        block.execution = mode


@contextlib.contextmanager
def complete_model(model: nn.Module) -> Iterator[None]:
    """Run the model with every router bypassed (DyDiT's `complete_model=True`, for the optional full-model loss).

    The FLOPs-loss record of the previous (dynamic) forward is kept.
    """
    blocks = dynamic_blocks(model)
    for block in blocks:
        block._complete = True
    try:
        yield
    finally:
        for block in blocks:
            block._complete = False


def reset_dynamic_stats(model: nn.Module) -> None:
    for block in dynamic_blocks(model):
        block._stats = None


def dynamic_stats(model: nn.Module) -> list[dict[str, float]]:
    """Mean active fraction of heads, MLP groups and tokens per layer over the forwards since the last reset.

    One dict per block: layer, forwards, heads, groups, tokens (fractions in [0, 1]) and the matching
    mean active counts (active_heads, active_groups).
    """
    rows = []
    for i, block in enumerate(dynamic_blocks(model)):
        if block._stats is None:
            rows.append({"layer": i, "forwards": 0, "heads": float("nan"), "groups": float("nan"),
                         "tokens": float("nan"), "active_heads": float("nan"), "active_groups": float("nan")})
            continue
        s = block._stats.tolist()
        count = s[0]
        rows.append({"layer": i, "forwards": int(count), "heads": s[1] / count, "groups": s[2] / count,
                     "tokens": s[3] / count, "active_heads": s[1] / count * block.num_groups,
                     "active_groups": s[2] / count * block.num_groups})
    return rows


@torch.no_grad()
def timestep_masks(model: nn.Module, timesteps: Sequence[float] | torch.Tensor) -> list[dict[str, Any]]:
    """Inference head / group patterns (active indices per layer) at each timestep, e.g. a sampler's schedule.

    The routers read only E_t, so this is what every batch gets at that step (token routing aside).
    """
    blocks = dynamic_blocks(model)
    t = torch.as_tensor(timesteps, dtype=torch.float32, device=blocks[0]._device()).reshape(-1)
    t_emb = model.t_embedder(t)
    out = []
    for j in range(len(t)):
        layers = []
        for block in blocks:
            hl, gl = block.width_logits(t_emb[j:j + 1])
            heads = tuple(range(block.num_groups)) if hl is None else \
                (0,) + tuple(i + 1 for i, v in enumerate((hl[0] > 0).tolist()) if v)
            groups = tuple(range(block.num_groups)) if gl is None else \
                (0,) + tuple(i + 1 for i, v in enumerate((gl[0] > 0).tolist()) if v)
            layers.append({"heads": heads, "groups": groups})
        out.append({"t": float(t[j]), "layers": layers})
    return out


def router_keys(model: nn.Module) -> list[str]:
    return [k for k in model.state_dict() if any(f".{r}." in k for r in ("head_router", "channel_router",
                                                                         "token_router"))]


def convert_to_dynamic(static_model: nn.Module, dynamic_cfg: dict[str, Any] | bool | None = None) -> nn.Module:
    """A new dynamic `DiT` with every weight of a trained static DiT copied in (routers fresh, everything on).

    The result computes the same function as `static_model` until the routers are trained (DyDiT
    fine-tunes a pretrained DiT this way, Sec. A.5). Device and dtype follow the static model.
    """
    from .model import DiT

    if not isinstance(static_model, DiT):
        raise TypeError(f"convert_to_dynamic expects a dit.model.DiT, got {type(static_model).__name__}")
    if static_model.config.dynamic:
        raise ValueError("the model is already dynamic; to change its options build a new one with "
                         "convert_to_dynamic on the original static model")
    opts = dynamic_options(dynamic_cfg if dynamic_cfg is not None else {})
    cfg = {k: v for k, v in static_model.config.items() if not k.startswith("_")}
    given = dict(dynamic_cfg) if isinstance(dynamic_cfg, dict) else {}
    cfg["dynamic"] = given or {"target": opts["target"]}  # a non-empty dict marks the model as dynamic
    param = next(static_model.parameters())
    model = DiT(**cfg)
    missing, unexpected = model.load_state_dict(static_model.state_dict(), strict=False)
    routers = set(router_keys(model))
    bad_missing = sorted(set(missing) - routers)
    if bad_missing or unexpected:
        raise RuntimeError("convert_to_dynamic could not copy the static weights: "
                           f"missing {bad_missing[:8]}, unexpected {list(unexpected)[:8]}")
    model.train(static_model.training)
    model.to(param.device)
    if param.dtype != next(model.parameters()).dtype:
        model.to(param.dtype)
    return model


def stratify_timesteps(objective: Any, strata: int, batch_size: int, rank: int = 0, world: int = 1) -> Any:
    """Timestep-stratified batches (DyDiT's `--t_sample`, Sec. A.4), stratified over the GLOBAL batch.

    The timestep range is cut into `strata` equal parts; the sample at global-batch position g (rank r holds
    positions r * batch_size ... r * batch_size + batch_size - 1) draws uniformly inside part g mod `strata`.
    The official code stratifies per GPU batch, so a per-GPU batch that is not a multiple of 4 never sees the
    noisiest quarter (reference notes A.4); here any global batch of >= `strata` samples covers every part.
    Patches `objective.sample_timesteps` (DDPM) / `sample_sigmas` (flow) on the instance; returns it.
    """
    strata, world = int(strata), int(world)
    if strata < 1:
        raise ValueError(f"timestep strata must be >= 1, got {strata}")
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is outside a world of {world} processes")
    offset = int(rank) * int(batch_size)

    def fractions(n: int, device: torch.device, generator: torch.Generator | None) -> torch.Tensor:
        part = (torch.arange(offset, offset + n, device=device) % strata).float()
        return (part + torch.rand(n, device=device, generator=generator)) / strata

    if hasattr(objective, "sample_sigmas"):
        objective.sample_sigmas = lambda n, device, generator=None: fractions(n, device, generator)
    if hasattr(objective, "sample_timesteps"):
        steps = int(objective.num_timesteps)
        objective.sample_timesteps = lambda n, device, generator=None: \
            (fractions(n, device, generator) * steps).long().clamp_(max=steps - 1)
    return objective


# ---------------------------------------------------------------------------------------------- benchmark helpers
def set_fixed_width(model: nn.Module, active: int, token_keep: bool | None = None) -> None:
    """Make the routers deterministic: heads / groups 0..active-1 on at every timestep, the rest off.

    Router weights are zeroed and biases set to +-15; `token_keep` True/False sets the token router to
    keep all / no tokens. Used by the benchmark to hit a chosen FLOPs ratio over a whole trajectory.
    """
    for block in dynamic_blocks(model):
        if not 1 <= active <= block.num_groups:
            raise ValueError(f"active must be in [1, {block.num_groups}], got {active}")
        with torch.no_grad():
            for router in (block.head_router, block.channel_router):
                if router is not None:
                    router.weight.zero_()
                    router.bias.copy_(torch.tensor([15.0 if i + 1 < active else -15.0
                                                    for i in range(block.num_groups - 1)]))
            if block.token_router is not None and token_keep is not None:
                block.token_router[2].weight.zero_()
                block.token_router[2].bias.fill_(35.0 if token_keep else -35.0)
        block._slice_cache.clear()


def benchmark_sampling(depth: int = 12, hidden_size: int = 384, num_heads: int = 6, patch_size: int = 2,
                       input_size: int = 32, in_channels: int = 4, batch_size: int = 2, steps: int = 8,
                       cfg_scale: float = 1.0, scheduler: str = "ddim", active: int | None = None,
                       repeats: int = 3, seed: int = 0) -> list[dict[str, Any]]:
    """Wall-clock of a full sampling trajectory: static DiT vs DyDiT (same weights, fixed ~50% width).

    Returns one row per variant: name, analytic block MACs per forward per sample (G), ratio of those,
    best time of `repeats` runs (s) and time relative to static. Token routing is off (its kept fraction
    depends on the input); the width is fixed by `set_fixed_width`, heads 0..active-1 on.
    """
    from .model import DiT
    from .schedulers import sample

    torch.manual_seed(seed)
    static = DiT(input_size=input_size, patch_size=patch_size, in_channels=in_channels, hidden_size=hidden_size,
                 depth=depth, num_heads=num_heads, num_classes=10, learn_sigma=True).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # non-zero adaLN / final layer so the trajectory is not trivially zero
        for name, p in static.named_parameters():
            if "adaLN_modulation" in name or "final_layer" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    active = active if active is not None else max(1, num_heads // 2)
    dynamic = convert_to_dynamic(static, {"target": active / num_heads, "token_routing": False}).eval()
    set_fixed_width(dynamic, active)
    masked = convert_to_dynamic(static, {"target": active / num_heads, "token_routing": False}).eval()
    set_fixed_width(masked, active)
    set_dynamic_execution(masked, "masked")
    labels = torch.arange(batch_size) % 10
    seeds = list(range(batch_size))
    shape = (in_channels, input_size, input_size)
    n = (input_size // patch_size) ** 2
    full = depth * (attention_macs(n, hidden_size) + mlp_macs(n, hidden_size, 4 * hidden_size))
    frac = active / num_heads
    variants = (("static", static, full), ("dynamic (sliced)", dynamic, full * frac),
                ("dynamic (masked)", masked, full * frac))
    best = {name: math.inf for name, _, _ in variants}
    for _ in range(repeats):  # interleaved, best of `repeats`: fair on a shared, noisy machine
        for name, model, _ in variants:
            start = time.perf_counter()
            sample(model, labels, seeds, shape, scheduler_name=scheduler, steps=steps, cfg_scale=cfg_scale,
                   null_class=10, progress=False)
            best[name] = min(best[name], time.perf_counter() - start)
    rows = [{"model": name, "gmacs": macs / 1e9, "flops_ratio": macs / full, "seconds": best[name]}
            for name, _, macs in variants]
    for row in rows:
        row["time_ratio"] = row["seconds"] / rows[0]["seconds"]
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m dit.dynamic`: the DyDiT sampling benchmark (see `benchmark_sampling`)."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m dit.dynamic", description=(
        "Sampling-trajectory wall-clock of a DyDiT model at ~50% block FLOPs vs the static DiT (DiT-S width)."))
    parser.add_argument("--depth", type=int, default=12)
    parser.add_argument("--hidden-size", type=int, default=384)
    parser.add_argument("--num-heads", type=int, default=6)
    parser.add_argument("--patch-size", type=int, default=2)
    parser.add_argument("--input-size", type=int, default=32)
    parser.add_argument("--in-channels", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--cfg-scale", type=float, default=1.0)
    parser.add_argument("--scheduler", default="ddim")
    parser.add_argument("--active", type=int, default=None, help="heads/groups kept (default: half)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = benchmark_sampling(args.depth, args.hidden_size, args.num_heads, args.patch_size, args.input_size,
                              args.in_channels, args.batch_size, args.steps, args.cfg_scale, args.scheduler,
                              args.active, args.repeats)
    print(f"DyDiT sampling benchmark: depth {args.depth}, width {args.hidden_size}, {args.num_heads} heads, "
          f"{(args.input_size // args.patch_size) ** 2} tokens, batch {args.batch_size}, {args.steps} "
          f"{args.scheduler} steps, cfg {args.cfg_scale}, device cpu, {torch.get_num_threads()} threads")
    print(f"{'model':<18} {'block GMACs':>11} {'FLOPs ratio':>11} {'time (s)':>9} {'time ratio':>10}")
    for r in rows:
        print(f"{r['model']:<18} {r['gmacs']:>11.3f} {r['flops_ratio']:>11.2f} {r['seconds']:>9.3f} "
              f"{r['time_ratio']:>10.2f}")
    ratio = rows[1]["time_ratio"]
    print(f"sliced dynamic / static time: {ratio:.2f}x (goal <= 0.65x)")
    return 0


if __name__ == "__main__":
    # run the copy imported as `dit.dynamic` (the one DiT builds its blocks from), not this `__main__` copy
    from dit.dynamic import main as _main

    raise SystemExit(_main())
