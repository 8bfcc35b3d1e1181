"""Operator replacement and restructuring of a trained DiT (grafting, Chandrasegaran et al. 2025).

`graft_config` writes the new architecture (per-block attention names, MLP types and ratios, or parallel
blocks) into a plain DiT config, so the result is an ordinary studio checkpoint that sample.py, train.py
(`--model FOLDER`) and the UI load. `build_grafted` builds it and copies every weight of the source that
still applies, failing loudly (naming the key) for any kept weight that does not fit.

A *unit* is what stage 1 trains alone: the attention half of block i (`attn`, input the block input,
output its residual update), the MLP half (`mlp`, input the stream after the attention half) or, for the
restructure, a parallel block made of a sequential pair (`pair`, input the pair's input, output the
pair's total update).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..attention import ATTENTION_REGISTRY, BlockContext, attention_names, build_attention
from ..mlp import MLP_REGISTRY, build_mlp
from ..model import DiT, block_attention_list, per_block


class GraftError(ValueError):
    """A graft that cannot be done as asked; the message names the fix. The source is never modified."""


KINDS = ("attention", "mlp")
INIT_MODES = ("inherit", "random")


@dataclass
class Replacement:
    """`--replace attention=linear` / `mlp=mixffn` / `mlp=mlp:6` (ratio 6)."""

    kind: str
    operator: str
    ratio: float | None = None

    @classmethod
    def parse(cls, text: str) -> "Replacement":
        kind, sep, op = str(text).partition("=")
        kind, op = kind.strip().lower(), op.strip()
        if not sep or kind not in KINDS or not op:
            raise GraftError(f"--replace {text!r}: write KIND=OPERATOR with KIND attention or mlp, e.g. "
                             "attention=linear, attention=window, mlp=mixffn, mlp=mlp:6 (ratio 6)")
        ratio = None
        if kind == "mlp" and ":" in op:
            op, _, r = op.partition(":")
            try:
                ratio = float(r)
            except ValueError:
                raise GraftError(f"--replace {text!r}: MLP ratio {r!r} is not a number (e.g. mlp=mlp:6)") from None
            if ratio <= 0:
                raise GraftError(f"--replace {text!r}: the MLP ratio must be positive")
        registry = ATTENTION_REGISTRY if kind == "attention" else MLP_REGISTRY
        if op not in registry:
            valid = attention_names() if kind == "attention" else sorted(MLP_REGISTRY)
            raise GraftError(f"--replace {text!r}: unknown {kind} operator {op!r}; valid: {', '.join(valid)}")
        return cls(kind, op, ratio)

    def __str__(self) -> str:
        return f"{self.kind}={self.operator}" + (f":{self.ratio:g}" if self.ratio is not None else "")


@dataclass
class Unit:
    """One stage-1 unit: `kind` attn | mlp | pair at block `block` of the grafted model."""

    kind: str
    block: int
    source_blocks: tuple[int, ...] = field(default_factory=tuple)

    @property
    def name(self) -> str:
        return f"{self.kind}{self.block}"

    @property
    def prefix(self) -> str:
        """State-dict prefix of the unit's trainable weights in the grafted model."""
        return {"attn": f"blocks.{self.block}.attn.", "mlp": f"blocks.{self.block}.mlp.",
                "pair": f"blocks.{self.block}."}[self.kind]


def _compact(values: list[Any]) -> Any:
    return values[0] if all(v == values[0] for v in values) else values


def source_config(model: DiT) -> dict[str, Any]:
    return {k: v for k, v in dict(model.config).items() if not str(k).startswith("_")}


def graft_config(cfg: dict[str, Any], replacements: list[Replacement], layers: list[int],
                 options: dict[str, Any] | None = None) -> dict[str, Any]:
    """The grafted architecture: `replacements` applied at `layers` of a (sequential) DiT config."""
    cfg = dict(cfg)
    if int(cfg.get("parallel_branches", 1)) != 1:
        raise GraftError("operator replacement needs a sequential model; this one has parallel blocks")
    if cfg.get("dynamic"):
        raise GraftError("the source is a DyDiT (dynamic) model; graft the static model it came from")
    depth = int(cfg["depth"])
    names = block_attention_list(cfg.get("attention", "softmax"), depth)
    mlps = per_block(cfg.get("mlp_type", "mlp"), depth, "mlp_type")
    ratios = per_block(cfg.get("mlp_ratio", 4.0), depth, "mlp_ratio", float)
    kinds = [r.kind for r in replacements]
    if len(set(kinds)) != len(kinds):
        raise GraftError("give at most one --replace per kind (attention, mlp)")
    for rep in replacements:
        for i in layers:
            if rep.kind == "attention":
                names[i] = rep.operator
            else:
                mlps[i] = rep.operator
                if rep.ratio is not None:
                    ratios[i] = rep.ratio
    cfg["attention"] = _compact(names)
    cfg["mlp_type"] = _compact(mlps)
    cfg["mlp_ratio"] = _compact(ratios)
    if options:
        cfg["attention_options"] = {**(cfg.get("attention_options") or {}), **options}
    return cfg


def restructure_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """Pairs of sequential blocks -> parallel blocks: depth halved, two branches per block."""
    cfg = dict(cfg)
    depth = int(cfg["depth"])
    if int(cfg.get("parallel_branches", 1)) != 1:
        raise GraftError("the source already has parallel blocks")
    if cfg.get("dynamic"):
        raise GraftError("the source is a DyDiT (dynamic) model; restructure the static model it came from")
    if depth < 2 or depth % 2:
        raise GraftError(f"--restructure parallel pairs blocks (0, 1), (2, 3), ...: the source has {depth} blocks, "
                         "an odd number; only even depths can be halved")
    names = block_attention_list(cfg.get("attention", "softmax"), depth)
    mlps = per_block(cfg.get("mlp_type", "mlp"), depth, "mlp_type")
    ratios = per_block(cfg.get("mlp_ratio", 4.0), depth, "mlp_ratio", float)
    for i in range(0, depth, 2):
        for what, values in (("attention", names), ("mlp_type", mlps), ("mlp_ratio", ratios)):
            if values[i] != values[i + 1]:
                raise GraftError(f"blocks {i} and {i + 1} differ in {what} ({values[i]!r} vs {values[i + 1]!r}); "
                                 "parallel branches share one operator choice")
    cfg.update(depth=depth // 2, parallel_branches=2, attention=_compact(names[::2]), mlp_type=_compact(mlps[::2]),
               mlp_ratio=_compact(ratios[::2]))
    return cfg


def check_operators(cfg: dict[str, Any], layers: list[int], replacements: list[Replacement]) -> None:
    """Build each new operator at the model's width and run it on the model's token grid; a clear error if not."""
    d, heads = int(cfg["hidden_size"]), int(cfg["num_heads"])
    side = int(cfg["input_size"]) // int(cfg["patch_size"])
    grid = (side, side)
    options = dict(cfg.get("attention_options") or {})
    options.setdefault("backend", cfg.get("attention_backend", "sdpa"))
    for rep in replacements:
        try:
            if rep.kind == "attention":
                op = build_attention(rep.operator, d, heads, **options)
                x, c = torch.zeros(1, side * side, d), torch.zeros(1, d)
                ctx = BlockContext(grid=grid, t_emb=torch.zeros(1, d))
                with torch.no_grad():
                    op.post_attention(op(op.pre_attention(x, c, ctx), grid), c, ctx)
            else:
                ratio = rep.ratio if rep.ratio is not None else float(per_block(cfg.get("mlp_ratio", 4.0),
                                                                               int(cfg["depth"]), "mlp_ratio",
                                                                               float)[layers[0]])
                with torch.no_grad():
                    build_mlp(rep.operator, d, ratio)(torch.zeros(1, side * side, d), grid)
        except (ValueError, RuntimeError) as err:
            raise GraftError(f"operator {rep.operator!r} cannot take this model's blocks (width {d}, {heads} heads, "
                             f"token grid {side}x{side}): {err}") from err


def units_for(layers: list[int], replacements: list[Replacement], restructure: bool, depth: int) -> list[Unit]:
    if restructure:
        return [Unit("pair", i // 2, (i, i + 1)) for i in range(0, depth, 2)]
    kinds = [r.kind for r in replacements]
    out = []
    for i in layers:
        if "attention" in kinds:
            out.append(Unit("attn", i, (i,)))
        if "mlp" in kinds:
            out.append(Unit("mlp", i, (i,)))
    return out


def _source_key(key: str, restructure: bool) -> str:
    """The source key a grafted key is initialised from (restructure: blocks.i.branches.j.X <- blocks.2i+j.X)."""
    if restructure and key.startswith("blocks."):
        parts = key.split(".")
        if len(parts) > 4 and parts[2] == "branches":
            return ".".join(["blocks", str(2 * int(parts[1]) + int(parts[3]))] + parts[4:])
    return key


def build_grafted(source: DiT, cfg: dict[str, Any], units: list[Unit], init: str = "inherit",
                  seed: int = 0) -> tuple[DiT, dict[str, list[str]]]:
    """The grafted model with the source's weights copied in.

    Outside the units every weight must come from the source (a missing or mis-shaped one raises, naming it).
    Inside a unit: `init="inherit"` copies the source weights whose name and shape fit (e.g. qkv/proj into
    linear, window or gated-conv attention), `"random"` keeps the fresh initialisation (the self-graft test).
    Returns (model, {"inherited", "fresh"}).
    """
    if init not in INIT_MODES:
        raise GraftError(f"--init must be one of {', '.join(INIT_MODES)}, got {init!r}")
    restructure = any(u.kind == "pair" for u in units)
    torch.manual_seed(seed)
    model = DiT(**cfg)
    src = source.state_dict()
    own = model.state_dict()
    prefixes = tuple(u.prefix for u in units if u.kind != "pair")
    inherited, fresh, problems = [], [], []
    for key, value in own.items():
        skey = _source_key(key, restructure)
        in_unit = key.startswith(prefixes) if prefixes else False
        if cfg.get("dynamic") and "_router." in key and skey not in src:  # DyDiT routers added to a static model
            fresh.append(key)
            continue
        got = src.get(skey)
        fits = got is not None and tuple(got.shape) == tuple(value.shape)
        if in_unit:
            if init == "inherit" and fits:
                own[key] = got.to(value.dtype)
                inherited.append(key)
            else:
                fresh.append(key)
        elif fits:
            own[key] = got.to(value.dtype)
            inherited.append(key)
        else:
            problems.append(f"{key} (from source {skey}): " + ("missing in the source" if got is None else
                            f"source {tuple(got.shape)} vs grafted {tuple(value.shape)}"))
    if problems:
        raise GraftError("weights outside the replaced operators do not fit the grafted model:\n  "
                         + "\n  ".join(problems[:12]) + "\nFix: graft a checkpoint of the same architecture.")
    model.load_state_dict(own)
    return model, {"inherited": inherited, "fresh": fresh}


def unit_module(model: DiT, unit: Unit) -> nn.Module:
    """The module stage 1 trains for `unit` in the grafted model."""
    block = model.blocks[unit.block]
    return {"attn": lambda: block.attn, "mlp": lambda: block.mlp, "pair": lambda: block}[unit.kind]()


def unit_forward(model: DiT, unit: Unit, x: torch.Tensor, c: torch.Tensor, ctx: BlockContext) -> torch.Tensor:
    """The unit's residual update on input x (see the module doc)."""
    block = model.blocks[unit.block]
    if unit.kind == "attn":
        return block.attention_branch(x, c, ctx) - x
    if unit.kind == "mlp":
        return block.mlp_update(x, c, ctx)
    return block(x, c, ctx) - x
