"""Samplers by name over diffusers' schedulers, with classifier-free guidance and per-image seeds.

Each image has its own `torch.Generator` (initial noise and any ancestral noise), so image i with
seed s is the same whatever the batch it is sampled in.
"""
from __future__ import annotations

import inspect
import threading
from dataclasses import dataclass
from typing import Any, Callable

import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    HeunDiscreteScheduler,
    UniPCMultistepScheduler,
)
from tqdm.auto import tqdm

# DiT's training schedule (1000 linear betas from 1e-4 to 0.02), shared by every DDPM-family sampler.
_DDPM_BASE = dict(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear")


@dataclass(frozen=True)
class SamplerSpec:
    build: Callable[[bool, bool], Any]   # (learn_sigma, clip x0 to [-1, 1]) -> scheduler
    objectives: tuple[str, ...]          # training objectives it can sample
    uses_learned_sigma: bool = False     # consumes the variance channels itself
    description: str = ""


def _ddpm(learn_sigma: bool, clip: bool) -> DDPMScheduler:
    return DDPMScheduler(**_DDPM_BASE, variance_type="learned_range" if learn_sigma else "fixed_small",
                         clip_sample=clip, timestep_spacing="linspace")


def _ddim(learn_sigma: bool, clip: bool) -> DDIMScheduler:
    return DDIMScheduler(**_DDPM_BASE, clip_sample=clip, set_alpha_to_one=True, timestep_spacing="trailing")


# Dynamic thresholding with sample_max_value 1.0 is a plain clip of the predicted x0 to [-1, 1].
def _clip_kwargs(clip: bool) -> dict[str, Any]:
    return dict(thresholding=True, sample_max_value=1.0) if clip else {}


def _unipc(learn_sigma: bool, clip: bool) -> UniPCMultistepScheduler:
    return UniPCMultistepScheduler(**_DDPM_BASE, timestep_spacing="linspace", **_clip_kwargs(clip))


def _dpmpp(learn_sigma: bool, clip: bool) -> DPMSolverMultistepScheduler:
    # The variance channels are stripped here, not by diffusers' `variance_type="learned_range"`, which
    # keeps only `model_output[:, :3]` (wrong for latents with 4 channels and for 1-channel pixels).
    return DPMSolverMultistepScheduler(**_DDPM_BASE, algorithm_type="dpmsolver++", solver_order=2,
                                       timestep_spacing="linspace", lower_order_final=True, **_clip_kwargs(clip))


def _flow_dpmpp(learn_sigma: bool, clip: bool) -> DPMSolverMultistepScheduler:
    return DPMSolverMultistepScheduler(num_train_timesteps=1000, algorithm_type="dpmsolver++", solver_order=2,
                                       prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=1.0,
                                       lower_order_final=True)


SAMPLERS: dict[str, SamplerSpec] = {
    "ddpm": SamplerSpec(_ddpm, ("ddpm",), True, "ancestral DDPM with the learned variance (the original DiT's sampler)"),
    "ddim": SamplerSpec(_ddim, ("ddpm",), False, "deterministic DDIM"),
    "dpm++": SamplerSpec(_dpmpp, ("ddpm",), False, "DPM-Solver++ (2M); few steps"),
    "euler": SamplerSpec(lambda ls, clip: EulerDiscreteScheduler(**_DDPM_BASE, timestep_spacing="linspace"),
                         ("ddpm",), False, "Euler (Karras et al.) on the eps model"),
    "euler-a": SamplerSpec(lambda ls, clip: EulerAncestralDiscreteScheduler(**_DDPM_BASE, timestep_spacing="linspace"),
                           ("ddpm",), False, "ancestral Euler"),
    "heun": SamplerSpec(lambda ls, clip: HeunDiscreteScheduler(**_DDPM_BASE, timestep_spacing="linspace"),
                        ("ddpm",), False, "Heun, 2 evaluations per step"),
    "unipc": SamplerSpec(_unipc, ("ddpm",), False, "UniPC multistep"),
    "flow-euler": SamplerSpec(lambda ls, clip: FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0),
                              ("flow",), False, "Euler ODE for rectified-flow models"),
    "flow-dpm++": SamplerSpec(_flow_dpmpp, ("flow",), False, "DPM-Solver++ (2M) for rectified-flow models"),
}


def sampler_names(objective: str | None = None) -> list[str]:
    return [n for n, s in SAMPLERS.items() if objective is None or objective in s.objectives]


def get_sampler(name: str, objective: str = "ddpm", learn_sigma: bool = True,
                clip_denoised: bool = False) -> tuple[Any, SamplerSpec]:
    """A fresh diffusers scheduler for `name`, checked against the model's training objective.

    `clip_denoised` clips the predicted x0 to [-1, 1] where the scheduler supports it (pixel-space models,
    as ADM/IDDPM's `clip_denoised=True`; latent models such as the original DiT do not clip)."""
    if name not in SAMPLERS:
        raise ValueError(f"Unknown scheduler {name!r}. Valid schedulers: {', '.join(SAMPLERS)}")
    spec = SAMPLERS[name]
    if objective not in spec.objectives:
        raise ValueError(f"scheduler {name!r} cannot sample a model trained with the {objective!r} objective; "
                         f"use one of: {', '.join(sampler_names(objective))}")
    return spec.build(learn_sigma, clip_denoised), spec


def initial_noise(seeds: list[int], shape: tuple[int, ...], device: torch.device | str = "cpu",
                  dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, list[torch.Generator]]:
    """One CPU generator per image, seeded; noise drawn per image so it is batch-size independent."""
    generators = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
    noise = torch.cat([torch.randn((1, *shape), generator=g) for g in generators])
    return noise.to(device=device, dtype=dtype), generators


def guided_output(model: Callable[..., torch.Tensor], x: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
                  cfg_scale: float, null_class: int, cfg_channels: int | None = None) -> torch.Tensor:
    """Model output with classifier-free guidance on the predicted channels (variance from the conditional half)."""
    c = x.shape[1]
    if cfg_scale == 1.0:
        return model(x, t, y)
    x_in = torch.cat([x, x])
    y_in = torch.cat([y, torch.full_like(y, null_class)])
    out = model(x_in, torch.cat([t, t]), y_in)
    cond, uncond = out.chunk(2)
    k = c if cfg_channels is None else cfg_channels
    guided = uncond[:, :k] + cfg_scale * (cond[:, :k] - uncond[:, :k])
    return torch.cat([guided, cond[:, k:]], dim=1)


@torch.no_grad()
def sample(model: Callable[..., torch.Tensor], labels: torch.Tensor, seeds: list[int], shape: tuple[int, ...],
           scheduler_name: str = "ddpm", steps: int = 250, cfg_scale: float = 4.0, objective: str = "ddpm",
           learn_sigma: bool = True, null_class: int = 1000, cfg_channels: int | None = None,
           device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, clip_denoised: bool = False,
           callback: Callable[[int, int, torch.Tensor], None] | None = None, progress: bool = True,
           desc: str = "sampling", x0_callback: Callable[[int, int, torch.Tensor], None] | None = None,
           x0_every: int = 5, cancel: threading.Event | None = None) -> torch.Tensor:
    """Run one batch of the reverse process and return x0 of shape (N, *shape).

    `model(x, t, y)` is the denoiser (a `DiT`); `callback(step, total, x)` runs after every step.
    `x0_callback(step, total, x0)` receives the predicted clean sample every `x0_every` steps and at the
    last step (for previews). When `cancel` (a `threading.Event`) is set, the next step raises
    `GenerationCancelled` instead of running.
    """
    if len(seeds) != len(labels):
        raise ValueError(f"got {len(seeds)} seeds for {len(labels)} labels")
    if steps < 1:
        raise ValueError("steps must be at least 1")
    scheduler, spec = get_sampler(scheduler_name, objective, learn_sigma, clip_denoised)
    # The schedule stays on the CPU: the schedulers index their CPU tables with t, and a GPU t would make each
    # step wait for the GPU (a device-to-host read); the model gets t through a fill, no copy.
    scheduler.set_timesteps(steps)
    x, generators = initial_noise(seeds, shape, device, torch.float32)  # the state stays in float32
    x = x * getattr(scheduler, "init_noise_sigma", 1.0)
    y = labels.to(device)
    c = shape[0]
    timesteps = scheduler.timesteps
    step_kwargs = {"generator": generators} if "generator" in inspect.signature(scheduler.step).parameters else {}
    for i, t in enumerate(tqdm(timesteps, desc=desc, disable=not progress, leave=False)):
        if cancel is not None and cancel.is_set():
            raise GenerationCancelled(f"sampling cancelled before step {i + 1}/{len(timesteps)}")
        model_in = scheduler.scale_model_input(x, t) if hasattr(scheduler, "scale_model_input") else x
        t_batch = torch.full((x.shape[0],), t.item(), dtype=t.dtype, device=device)
        out = guided_output(model, model_in.to(dtype), t_batch, y, cfg_scale, null_class, cfg_channels).float()
        if not spec.uses_learned_sigma or out.shape[1] != 2 * c:
            out = out[:, :c]
        x_t = x
        step_out = scheduler.step(out, t, x, **step_kwargs)
        x = step_out.prev_sample
        if callback is not None:
            callback(i + 1, len(timesteps), x)
        if x0_callback is not None and ((i + 1) % max(1, x0_every) == 0 or i + 1 == len(timesteps)):
            x0_callback(i + 1, len(timesteps), predicted_x0(scheduler, step_out, x_t, out[:, :c], t, objective))
    return x


class GenerationCancelled(RuntimeError):
    """Raised by `sample` / `dit.pipeline.generate` when their `cancel` event is set."""


def predicted_x0(scheduler: Any, step_out: Any, x_t: torch.Tensor, out: torch.Tensor, t: torch.Tensor,
                 objective: str) -> torch.Tensor:
    """The model's current estimate of the clean sample, for previews.

    The scheduler's own `pred_original_sample` when it reports one (DDPM, DDIM, Euler, Heun); otherwise
    from the model output: rectified flow x0 = x_t - sigma_t v (sigma_t = t / 1000, diffusers' FlowMatch
    convention); eps models x0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t) (DDPM, Ho et al. 2020, eq. 15).
    """
    pred = getattr(step_out, "pred_original_sample", None)
    if pred is not None:
        return pred
    if objective == "flow":
        return x_t - (t.float() / 1000.0) * out
    abar = scheduler.alphas_cumprod[int(t)].to(x_t.device, torch.float32)
    return (x_t - (1 - abar).sqrt() * out) / abar.sqrt()
