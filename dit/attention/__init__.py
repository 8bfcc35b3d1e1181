"""Attention operators, registered by name so that CLI, UI and training pick them the same way.

    >>> from dit.attention import build_attention, attention_names
    >>> attn = build_attention("softmax", dim=384, num_heads=6, backend="sdpa")
"""
from __future__ import annotations

from typing import Any, Callable

from .base import AttentionOp, BlockContext

ATTENTION_REGISTRY: dict[str, type[AttentionOp]] = {}


def register_attention(name: str) -> Callable[[type[AttentionOp]], type[AttentionOp]]:
    def wrap(cls: type[AttentionOp]) -> type[AttentionOp]:
        if name in ATTENTION_REGISTRY:
            raise ValueError(f"attention {name!r} registered twice")
        cls.name = name
        ATTENTION_REGISTRY[name] = cls
        return cls
    return wrap


def attention_names() -> list[str]:
    return sorted(ATTENTION_REGISTRY)


def build_attention(name: str, dim: int, num_heads: int, **options: Any) -> AttentionOp:
    if name not in ATTENTION_REGISTRY:
        raise ValueError(f"Unknown attention variant {name!r}. Valid variants: {', '.join(attention_names())}")
    return ATTENTION_REGISTRY[name](dim, num_heads, **options)


# Importing the modules registers the operators.
from . import softmax  # noqa: E402,F401
from . import linear, proxy  # noqa: E402,F401
from . import gated_conv, window  # noqa: E402,F401

__all__ = ["AttentionOp", "BlockContext", "ATTENTION_REGISTRY", "register_attention",
           "attention_names", "build_attention"]
