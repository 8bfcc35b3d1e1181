"""Exponential moving average of model weights with a constant decay, as the original DiT.

DiT updates `ema = decay * ema + (1 - decay) * param` every step from a decay-0 copy; diffusers'
EMAModel instead warms its decay up over ~1e5 steps, which is not what the paper numbers used.

The plain update is one multi-tensor call (`torch._foreach_lerp_` with a scalar weight, the horizontally
fused kernels that fused optimizers use). `update(model, keep=flag)` takes an optional device-side 0/1 flag:
where it is 0 the EMA is left exactly unchanged, without the host ever reading the flag (the training loop's
non-finite-loss guard uses it, so no step waits for the GPU). That weight is a 0-dim device tensor, which
foreach's List overload applies tensor by tensor (675 small launches for DiT-XL/2, queued from C++ while the
GPU is busy with the step) reading each tensor once: 12 bytes a parameter, against 32 for the fused
sub / mul / add alternative. Which is faster on a given GPU is for `python -m dit.bench gpu` to say.
"""
from __future__ import annotations

import copy

import torch
from torch import nn


WRAPPER_PARTS = ("module.", "_orig_mod.", "_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")


def clean_name(name: str) -> str:
    """A parameter name without the wrappers' parts (DDP, torch.compile, FSDP, activation checkpointing)."""
    name = name.removeprefix("module.")
    for part in WRAPPER_PARTS[1:]:
        name = name.replace(part, "")
    return name


def _fsdp_root(model: nn.Module) -> nn.Module | None:
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    except ImportError:  # pragma: no cover
        return None
    return model if isinstance(model, FSDP) else None


class EMA:
    """A frozen copy of the model whose parameters track the training weights."""

    def __init__(self, model: nn.Module, decay: float = 0.9999):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        for module in self.model.modules():  # the EMA runs eager (a copied compiled call would use the original)
            if getattr(module, "_compiled_call_impl", None) is not None or getattr(module, "_dit_compiled", False):
                module._compiled_call_impl = None
                module._dit_compiled = False

    def _tensors(self, model: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(ema tensors, training parameters) in matching order (wrapper prefixes of DDP, FSDP, compile dropped).
        Frozen parameters (`requires_grad=False`, e.g. the base under an adapter) never change, so their EMA copy
        already equals them: they are left out of the update instead of being re-averaged every step."""
        ema_params = dict(self.model.named_parameters())
        ema_list, src_list = [], []
        for name, param in model.named_parameters():
            if not param.requires_grad:
                continue
            ema_list.append(ema_params[clean_name(name)])
            src_list.append(param.detach())
        return ema_list, src_list

    @torch.no_grad()
    def update(self, model: nn.Module, keep: torch.Tensor | None = None) -> None:
        """ema <- lerp(ema, param, 1 - decay) for every parameter, in one multi-tensor call per dtype/device group.

        `keep`: optional 0-dim tensor (1 = update, 0 = leave the EMA unchanged), used on the device only;
        the parameters must be finite (the guarded training step keeps them so).
        """
        fsdp_root = _fsdp_root(model)
        if fsdp_root is not None:  # sharded parameters: gather the full ones for the update (read-only)
            from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

            with FSDP.summon_full_params(fsdp_root, writeback=False):
                return self._update(model, keep)
        return self._update(model, keep)

    def _update(self, model: nn.Module, keep: torch.Tensor | None) -> None:
        ema_list, src_list = self._tensors(model)
        if not ema_list:  # everything frozen: nothing to average
            return
        src_list = [s if s.dtype == e.dtype and s.device == e.device else s.to(e) for e, s in zip(ema_list, src_list)]
        weight = 1.0 - self.decay
        if keep is None:
            torch._foreach_lerp_(ema_list, src_list, weight)
            return
        # weight * keep stays on the device (a 0-dim tensor; the Scalar overload would read it on the host).
        # One lerp per tensor with that weight (foreach's List overload): ema + w * (param - ema) reading each
        # tensor once (12 bytes a parameter, against 32 for sub / mul / add), equal to the scalar lerp when
        # kept and exactly the old EMA on a skipped step (w = 0; the parameters are finite, the loop keeps them).
        w = keep.to(device=ema_list[0].device, dtype=torch.float32) * weight
        per_dtype = {e.dtype: w.to(e.dtype) for e in ema_list}  # lerp takes its weight in the tensors' dtype
        torch._foreach_lerp_(ema_list, src_list, [per_dtype[e.dtype] for e in ema_list])

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.model.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.model.load_state_dict({clean_name(k): v for k, v in state.items()})
