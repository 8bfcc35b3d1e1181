"""`torch.compile` for DiTs by regional compilation: the repeated transformer blocks are compiled, the rest
(embedders, final layer, the sampler loop) stays eager.

DiT-XL/2 is 28 identical blocks: compiling one block's code compiles them all (torch >= 2.5 inlines
`nn.Module`s and treats their parameters as graph inputs, so every block reuses one graph), which keeps
compile time to seconds instead of the whole-model minutes (PyTorch's "regional compilation" recipe).

Blocks are compiled in place with `nn.Module.compile()`, which leaves the module tree untouched: state
dicts, checkpoints and EMA copies never carry `_orig_mod.` prefixes (what a whole-model
`torch.compile(model)` wrapper adds).

Where compilation is unavailable (no Dynamo for this Python, a platform without a C/C++ compiler, a
backend error at the first call), `compile_model` prints ONE line saying why and the model runs eager:
compilation never stops a sampling or training job.

    >>> from dit.compile import compile_model
    >>> report = compile_model(model)            # mode="default"; "max-autotune-no-cudagraphs" on big GPUs
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@dataclass
class CompileReport:
    """What `compile_model` did: `compiled` blocks, or why it fell back to eager (`reason`)."""

    compiled: int = 0
    mode: str = "default"
    reason: str | None = None
    failures: list[str] = field(default_factory=list)  # one line per block that fell back at its first call

    @property
    def enabled(self) -> bool:
        return self.compiled > 0 and not self.failures


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def compile_unavailable_reason() -> str | None:
    """None when torch.compile can work here, else a one-line reason."""
    if not hasattr(torch, "compile"):
        return f"torch {torch.__version__} has no torch.compile (needs torch >= 2.0)"
    try:
        import torch._dynamo as dynamo

        if not dynamo.is_dynamo_supported():
            return f"torch.compile does not support Python {sys.version.split()[0]} with torch {torch.__version__}"
    except Exception as err:  # pragma: no cover - broken installs
        return f"torch._dynamo cannot be imported ({type(err).__name__}: {err})"
    return None


def repeated_blocks(model: nn.Module) -> nn.ModuleList:
    """The model's repeated transformer blocks (`model.blocks`, also through DDP/FSDP `.module`)."""
    inner = getattr(model, "module", model)
    blocks = getattr(inner, "blocks", None)
    if not isinstance(blocks, nn.ModuleList) or len(blocks) == 0:
        raise ValueError(f"{type(inner).__name__} has no `blocks` ModuleList to compile; regional compilation "
                         "needs a DiT-like model")
    return blocks


def _is_compile_error(err: BaseException) -> bool:
    """Errors of the compiler stack (Dynamo tracing, Inductor codegen, a missing C++ compiler), not of the model."""
    names = [type(err).__module__] + [c.__module__ for c in type(err).__mro__]
    return any(n.startswith(("torch._dynamo", "torch._inductor")) for n in names)


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:200]}" if text else type(err).__name__


def _guarded(block: nn.Module, compiled: Callable[..., Any], report: CompileReport, index: int) -> Callable[..., Any]:
    """The compiled call, falling back to the block's eager call (for good) if the compiler raises."""
    state = {"eager": False}

    def call(*args: Any, **kwargs: Any) -> Any:
        if state["eager"]:
            return block._call_impl(*args, **kwargs)
        try:
            return compiled(*args, **kwargs)
        except Exception as err:
            if not _is_compile_error(err):
                raise
            state["eager"] = True
            line = f"torch.compile failed for block {index} ({_first_line(err)}); running it eager"
            report.failures.append(line)
            if len(report.failures) == 1:  # one line for the whole model, not one per block
                _say(f"warning: {line} (and any other block that fails). Fix: install a C++ compiler / a CUDA "
                     "build of torch, or drop --compile")
            return block._call_impl(*args, **kwargs)

    return call


def compile_model(model: nn.Module, mode: str | None = "default", dynamic: bool | None = None,
                  fullgraph: bool = False, verbose: bool = True, backend: Any = None) -> CompileReport:
    """Compile `model.blocks` in place (regional compilation); returns a `CompileReport`.

    The model object, its module tree and its state-dict keys stay the same. Compilation is lazy: the
    first forward of each new input shape compiles (seconds per shape for one block's graph). `mode`:
    one of `MODES` (None = "default"); `backend`: torch.compile's (default inductor, or $DIT_COMPILE_BACKEND; tests use "aot_eager"). Where torch.compile is unavailable, or fails at the first call, the
    model runs eager and one line on stderr says why.
    """
    mode = mode or "default"
    backend = backend or os.environ.get("DIT_COMPILE_BACKEND", "inductor")  # e.g. aot_eager to debug / test
    if mode not in MODES:
        raise ValueError(f"Unknown compile mode {mode!r}. Valid modes: {', '.join(MODES)}")
    report = CompileReport(mode=mode)
    reason = compile_unavailable_reason()
    blocks = repeated_blocks(model)
    if reason is not None:
        report.reason = reason
        if verbose:
            _say(f"warning: --compile ignored: {reason}; running eager")
        return report
    raise_recompile_limit()
    for i, block in enumerate(blocks):
        if getattr(block, "_dit_compiled", False):
            continue
        options: dict[str, Any] = {"fullgraph": fullgraph, "dynamic": dynamic, "backend": backend}
        if mode != "default":
            options["mode"] = mode
        compiled = torch.compile(block._call_impl, **options)
        block._compiled_call_impl = _guarded(block, compiled, report, i)
        block._dit_compiled = True
        report.compiled += 1
    if verbose:
        _say(f"torch.compile: {report.compiled} block(s) of {type(getattr(model, 'module', model)).__name__} "
             f"(regional, mode={mode}); the first forward of each input shape compiles")
    return report


RECOMPILE_LIMIT = 64


def raise_recompile_limit(limit: int = RECOMPILE_LIMIT) -> None:
    """Let Dynamo keep `limit` graphs per code object (default 8). Every regionally compiled block runs through
    `nn.Module._call_impl`, ONE code object for all blocks of all models in the process: a few models or
    operators times a few input shapes pass 8, after which Dynamo silently runs the rest eager."""
    import torch._dynamo.config as dynamo_config

    for name in ("recompile_limit", "cache_size_limit"):  # the newer name and the older alias
        if hasattr(dynamo_config, name) and getattr(dynamo_config, name) < limit:
            setattr(dynamo_config, name, limit)


def uncompile_model(model: nn.Module) -> None:
    """Undo `compile_model`: every block runs eager again."""
    for block in repeated_blocks(model):
        block._compiled_call_impl = None
        block._dit_compiled = False


def is_compiled(model: nn.Module) -> bool:
    try:
        return any(getattr(b, "_dit_compiled", False) for b in repeated_blocks(model))
    except ValueError:
        return False


def strip_compile_prefix(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop `_orig_mod.` (whole-model torch.compile) from state-dict keys, e.g. of a user's own wrapper."""
    return {k.replace("_orig_mod.", ""): v for k, v in state.items()}


def add_compile_argument(parser: Any) -> None:
    """The shared `--compile [MODE]` CLI option (sample.py, train.py, the benchmarks)."""
    parser.add_argument("--compile", nargs="?", const="default", default=None, choices=MODES, metavar="MODE",
                        help="torch.compile the transformer blocks (regional; falls back to eager with a message "
                             f"where unavailable). MODE: {', '.join(MODES)}; --compile alone means 'default'")


__all__ = ["MODES", "CompileReport", "compile_model", "uncompile_model", "is_compiled", "repeated_blocks",
           "strip_compile_prefix", "add_compile_argument", "compile_unavailable_reason"]


@torch.no_grad()
def warm_up(model: nn.Module, batch: int, image_size: int | None = None, cfg: bool = True,
            device: torch.device | str | None = None, dtype: torch.dtype | None = None, vae: Any = None,
            latent_scale: float | None = None) -> float:
    """One untimed forward at the sampling batch shape (CFG doubles it), and one VAE decode of one latent when
    `vae` is given, so that compilation, cuBLAS/cuDNN set-up and allocator growth are not counted as sampling
    time; returns its seconds (synchronised)."""
    import time

    param = next(model.parameters())
    device = torch.device(device) if device is not None else param.device
    dtype = dtype or param.dtype
    cfg_ = model.config
    size = image_size or cfg_.input_size
    n = batch * (2 if cfg else 1)
    x = torch.randn(n, cfg_.in_channels, size, size, device=device, dtype=dtype)
    t = torch.full((n,), 500, device=device, dtype=torch.long)
    y = torch.zeros(n, device=device, dtype=torch.long)
    start = time.perf_counter()
    model(x, t, y)
    if vae is not None:
        from .pipeline import decode_latents

        decode_latents(vae, x[:1], latent_scale)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start
