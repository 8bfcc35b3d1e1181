"""Exponential moving average of model weights with a constant decay, as the original DiT.

DiT updates `ema = decay * ema + (1 - decay) * param` every step from a decay-0 copy; diffusers'
EMAModel instead warms its decay up over ~1e5 steps, which is not what the paper numbers used.
"""
from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    """A frozen copy of the model whose parameters track the training weights."""

    def __init__(self, model: nn.Module, decay: float = 0.9999):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        ema_params = dict(self.model.named_parameters())
        for name, param in model.named_parameters():
            name = name.removeprefix("module.")
            ema_params[name].lerp_(param.detach().to(ema_params[name].dtype), 1.0 - self.decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.model.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.model.load_state_dict(state)
