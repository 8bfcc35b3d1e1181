"""The training loop's non-finite-loss guard, without a host synchronisation per step.

Promise (kept from the first version of train.py): a step whose loss (or gradient norm) is NaN/inf never
reaches the weights, the optimizer state or the EMA, and training stops naming that step, with the last
good checkpoint intact.

How, with no `.item()` per step (a GPU would otherwise idle while the host waits for every loss):
- the flag `bad` is computed on the device (any micro-step's loss non-finite, or the clipped gradient norm
  non-finite; summed over ranks so every rank skips together);
- the fused AdamW kernel takes it as `found_inf` (the mechanism GradScaler uses): where it is set, the
  kernel leaves parameters, moments and step count untouched, on the device;
- the EMA update is weighted by `1 - bad` (`EMA.update(keep=...)`), i.e. unchanged on a bad step;
- the first bad step number is recorded on the device; the host reads it only at logging, checkpoint and
  preview intervals (`check`) and then stops, before anything is written.
Optimizers without `found_inf` support (non-fused) fall back to a host check per step. With fp16 loss
scaling, Accelerate's GradScaler owns `found_inf` (overflowing steps are skipped and the scale lowered, as
usual); a non-finite *loss* still stops training at the next check.
"""
from __future__ import annotations

from typing import Any, Callable

import torch


class NonFiniteGuard:
    def __init__(self, optimizer: Any, device: torch.device, world: int = 1, reduce: Callable[..., Any] | None = None,
                 scaler: Any = None):
        self.inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps it
        self.fused = bool(self.inner.defaults.get("fused"))
        self.scaler = scaler
        self.device = device
        self.world, self.reduce = world, reduce
        self._bad = torch.zeros((), device=device)           # this optimizer step (over micro-steps)
        self.first_bad = torch.zeros((), dtype=torch.long, device=device)  # 0 = none yet

    def observe_loss(self, loss: torch.Tensor) -> None:
        """Call on every micro-step's loss (before backward)."""
        self._bad = torch.maximum(self._bad, (~torch.isfinite(loss.detach().float())).float().reshape(()))

    def step(self, optimizer: Any, grad_norm: torch.Tensor | None) -> torch.Tensor:
        """Run `optimizer.step()` unless the step is bad; returns the device flag `keep` (1 = applied)."""
        bad = self._bad
        if grad_norm is not None and self.scaler is None:
            bad = torch.maximum(bad, (~torch.isfinite(grad_norm.detach().float())).float().reshape(()))
        if self.world > 1 and self.reduce is not None:
            bad = (self.reduce(bad.reshape(1), "sum") > 0).float().reshape(())
        if self.scaler is not None:  # GradScaler sets and uses found_inf itself
            optimizer.step()
        elif self.fused:
            self.inner.found_inf = bad
            optimizer.step()
        elif not bool(bad):  # fallback: one host read per step
            optimizer.step()
        self._bad = torch.zeros((), device=self.device)
        return 1.0 - bad

    def record(self, step: int, keep: torch.Tensor) -> None:
        """Remember `step` as the first bad one if `keep` is 0 (on the device)."""
        hit = (keep < 0.5) & (self.first_bad == 0)
        self.first_bad = torch.where(hit, torch.full_like(self.first_bad, step), self.first_bad)

    def check(self, where: str) -> None:
        """Host read (at intervals): raise FloatingPointError naming the first bad step, if any."""
        first = int(self.first_bad)
        if first:
            raise FloatingPointError(
                f"non-finite loss at step {first}; that update was skipped (the weights, optimizer state and EMA "
                f"never saw it) and training stopped before writing anything more; {where}. Fix: lower --lr, use "
                "--mixed-precision no/bf16, or check the data; then --resume-from latest.")

    def train_step(self, loss: torch.Tensor, model: Any, optimizer: Any, ema: Any = None, step: int = 0,
                   max_grad_norm: float = 1.0) -> torch.Tensor:
        """One plain (single-process, no accumulation) guarded step: backward, clip, skip-or-step, zero grads,
        record, EMA update; the benchmark and the tests use it, train.py does the same through Accelerate."""
        self.observe_loss(loss)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm) if max_grad_norm > 0 else None
        keep = self.step(optimizer, norm)
        optimizer.zero_grad(set_to_none=True)
        self.record(step, keep)
        if ema is not None:
            ema.update(model, keep=keep)
        return keep
