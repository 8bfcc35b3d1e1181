"""Per-geometry constant tensors of attention operators (token orders, window masks), shared by every block.

Operators such as PT-DiT's window attention need index or mask tensors that depend only on the token grid
(and device / dtype), never on the weights. They are built once per geometry in a process-wide cache, so

- all blocks of a model use the SAME tensors: under regional `torch.compile` (`dit.compile`) the 28 blocks of
  DiT-XL/2 then share one compiled graph instead of recompiling per block (and falling back to eager once
  Dynamo's recompile limit is hit);
- they are built in eager code: `DiT.forward` calls every operator's `prepare(grid, device, batch, dtype)`
  before the blocks, outside the compiled region; a block compiled and called on its own builds them inside
  its graph instead (correct, and never stored from within a trace).
"""
from __future__ import annotations

import threading
from typing import Any, Callable, Hashable, TypeVar

import torch

T = TypeVar("T")
_CACHE: dict[Hashable, Any] = {}
_LOCK = threading.Lock()
MAX_ENTRIES = 256  # geometries x devices x dtypes; a generous bound so that a long session cannot grow forever


def geometry_constant(key: Hashable, build: Callable[[], T]) -> T:
    """The cached value for `key`, built by `build()` on first use (stored only outside a torch.compile trace).

    Built with inference mode off: the cache is shared by every model of the process, and a tensor made under
    `torch.inference_mode()` could never be saved for a backward pass of another (training) model."""
    hit = _CACHE.get(key)
    if hit is None:
        if torch.compiler.is_compiling():
            return build()
        with torch.inference_mode(False):
            hit = build()
        with _LOCK:  # UI jobs and training runs may share the process
            while len(_CACHE) >= MAX_ENTRIES:
                _CACHE.pop(next(iter(_CACHE)), None)
            _CACHE[key] = hit
    return hit


def cached_keys() -> list[Hashable]:
    """The keys cached so far (for tests and debugging)."""
    return list(_CACHE)


def clear() -> None:
    _CACHE.clear()
