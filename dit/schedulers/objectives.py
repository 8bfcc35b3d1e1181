"""Training objectives, registered by name.

- `ddpm`: the DiT/IDDPM objective (Nichol & Dhariwal, 2021): 1000 linear-beta steps, eps prediction,
  and with learned sigma the hybrid loss L_simple + L_vb, where L_vb (in bits) trains only the
  variance interpolation v (log sigma^2 = f log beta_t + (1 - f) log beta~_t, f = (v + 1) / 2) because
  it is computed on the detached eps.
- `flow`: rectified flow in diffusers' FlowMatchEuler convention: x_s = (1 - s) x0 + s noise,
  the model sees t = 1000 s and predicts v = noise - x0.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

ModelFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def linear_betas(num_timesteps: int = 1000) -> np.ndarray:
    """DiT's linear schedule, scaled so that any step count spans the same noise range (float64)."""
    scale = 1000 / num_timesteps
    return np.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=np.float64)


def normal_kl(mean1: torch.Tensor, logvar1: torch.Tensor, mean2: torch.Tensor, logvar2: torch.Tensor) -> torch.Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


def discretized_gaussian_log_likelihood(x: torch.Tensor, means: torch.Tensor, log_scales: torch.Tensor) -> torch.Tensor:
    """Log-likelihood of data in [-1, 1] quantised to 256 bins under a Gaussian decoder (nats)."""
    centered = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_cdf_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta))


def mean_flat(x: torch.Tensor) -> torch.Tensor:
    return x.mean(dim=list(range(1, x.ndim)))


@dataclass
class NoisedBatch:
    """What a training step feeds the model, and what its loss needs."""

    x0: torch.Tensor
    noise: torch.Tensor
    x_t: torch.Tensor
    t: torch.Tensor          # model timestep input (N,)


class DDPMObjective:
    """eps prediction with optional learned-range variance (hybrid loss), as the original DiT."""

    name = "ddpm"

    def __init__(self, num_timesteps: int = 1000):
        self.num_timesteps = num_timesteps
        betas = linear_betas(num_timesteps)
        alphas_cumprod = np.cumprod(1.0 - betas)
        alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])
        posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
        tables = {
            "betas": betas,
            "sqrt_alphas_cumprod": np.sqrt(alphas_cumprod),
            "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - alphas_cumprod),
            "sqrt_recip_alphas_cumprod": np.sqrt(1.0 / alphas_cumprod),
            "sqrt_recipm1_alphas_cumprod": np.sqrt(1.0 / alphas_cumprod - 1),
            "posterior_variance": posterior_variance,
            "posterior_log_variance_clipped": np.log(np.append(posterior_variance[1], posterior_variance[1:])),
            "posterior_mean_coef1": betas * np.sqrt(alphas_cumprod_prev) / (1.0 - alphas_cumprod),
            "posterior_mean_coef2": (1.0 - alphas_cumprod_prev) * np.sqrt(1.0 - betas) / (1.0 - alphas_cumprod),
            "log_betas": np.log(betas),
        }
        self.tables = {k: torch.from_numpy(v) for k, v in tables.items()}

    def _at(self, name: str, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Table entries at integer t, shaped to broadcast against `like` (computed in float64, cast)."""
        key = (name, str(t.device))
        table = self._device_tables.get(key) if hasattr(self, "_device_tables") else None
        if table is None:  # copied to the device once: a per-step host->GPU copy would synchronise every step
            self._device_tables = getattr(self, "_device_tables", {})
            table = self._device_tables[key] = self.tables[name].to(t.device)
        values = table[t.long()].to(torch.float32)
        return values.reshape(-1, *([1] * (like.ndim - 1)))

    def sample_timesteps(self, n: int, device: torch.device, generator: torch.Generator | None = None) -> torch.Tensor:
        return torch.randint(0, self.num_timesteps, (n,), device=device, generator=generator)

    def noise(self, x0: torch.Tensor, t: torch.Tensor | None = None, noise: torch.Tensor | None = None,
              generator: torch.Generator | None = None) -> NoisedBatch:
        if t is None:
            t = self.sample_timesteps(x0.shape[0], x0.device, generator)
        if noise is None:
            noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        x_t = self._at("sqrt_alphas_cumprod", t, x0) * x0 + self._at("sqrt_one_minus_alphas_cumprod", t, x0) * noise
        return NoisedBatch(x0=x0, noise=noise, x_t=x_t, t=t)

    def vb_terms(self, eps: torch.Tensor, v: torch.Tensor, batch: NoisedBatch) -> torch.Tensor:
        """Variational bound term (bits per dim) of the learned variance, per sample."""
        x0, x_t, t = batch.x0, batch.x_t, batch.t
        min_log = self._at("posterior_log_variance_clipped", t, x_t)
        max_log = self._at("log_betas", t, x_t)
        frac = (v + 1) / 2
        model_log_var = frac * max_log + (1 - frac) * min_log
        pred_x0 = self._at("sqrt_recip_alphas_cumprod", t, x_t) * x_t - self._at("sqrt_recipm1_alphas_cumprod", t, x_t) * eps
        coef1, coef2 = self._at("posterior_mean_coef1", t, x_t), self._at("posterior_mean_coef2", t, x_t)
        model_mean = coef1 * pred_x0 + coef2 * x_t
        true_mean = coef1 * x0 + coef2 * x_t
        true_log_var = self._at("posterior_log_variance_clipped", t, x_t)
        kl = mean_flat(normal_kl(true_mean, true_log_var, model_mean, model_log_var)) / math.log(2.0)
        nll = -mean_flat(discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * model_log_var)) / math.log(2.0)
        return torch.where(t == 0, nll, kl)

    def loss_terms(self, model_out: torch.Tensor, batch: NoisedBatch) -> dict[str, torch.Tensor]:
        """Per-sample `loss` (mse + vb), `mse` and `vb` from a model output on `batch`."""
        c = batch.x_t.shape[1]
        eps = model_out[:, :c].float()
        mse = mean_flat((batch.noise.float() - eps) ** 2)
        terms = {"mse": mse}
        if model_out.shape[1] == 2 * c:
            vb = self.vb_terms(eps.detach(), model_out[:, c:].float(), batch)
            terms["vb"] = vb
            terms["loss"] = mse + vb
        else:
            terms["loss"] = mse
        return terms

    def training_losses(self, model_fn: ModelFn, x0: torch.Tensor, y: torch.Tensor,
                        generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        batch = self.noise(x0, generator=generator)
        return self.loss_terms(model_fn(batch.x_t, batch.t, y), batch)


class FlowObjective:
    """Rectified flow (Liu et al., 2022; SD3's logit-normal timestep density optional)."""

    name = "flow"

    def __init__(self, num_timesteps: int = 1000, timestep_density: str = "uniform",
                 logit_mean: float = 0.0, logit_std: float = 1.0):
        if timestep_density not in ("uniform", "logit_normal"):
            raise ValueError("timestep_density must be 'uniform' or 'logit_normal'")
        self.num_timesteps = num_timesteps
        self.timestep_density = timestep_density
        self.logit_mean, self.logit_std = logit_mean, logit_std

    def sample_sigmas(self, n: int, device: torch.device, generator: torch.Generator | None = None) -> torch.Tensor:
        if self.timestep_density == "logit_normal":
            z = torch.randn(n, device=device, generator=generator) * self.logit_std + self.logit_mean
            return torch.sigmoid(z)
        return torch.rand(n, device=device, generator=generator)

    def noise(self, x0: torch.Tensor, sigma: torch.Tensor | None = None, noise: torch.Tensor | None = None,
              generator: torch.Generator | None = None) -> NoisedBatch:
        if sigma is None:
            sigma = self.sample_sigmas(x0.shape[0], x0.device, generator)
        if noise is None:
            noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        s = sigma.reshape(-1, *([1] * (x0.ndim - 1))).to(x0.dtype)
        return NoisedBatch(x0=x0, noise=noise, x_t=(1 - s) * x0 + s * noise, t=sigma * self.num_timesteps)

    def loss_terms(self, model_out: torch.Tensor, batch: NoisedBatch) -> dict[str, torch.Tensor]:
        c = batch.x_t.shape[1]
        v = model_out[:, :c].float()
        mse = mean_flat(((batch.noise - batch.x0).float() - v) ** 2)
        return {"loss": mse, "mse": mse}

    def training_losses(self, model_fn: ModelFn, x0: torch.Tensor, y: torch.Tensor,
                        generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        batch = self.noise(x0, generator=generator)
        return self.loss_terms(model_fn(batch.x_t, batch.t, y), batch)


OBJECTIVES: dict[str, type] = {"ddpm": DDPMObjective, "flow": FlowObjective}


def get_objective(name: str, **kwargs: object) -> DDPMObjective | FlowObjective:
    if name not in OBJECTIVES:
        raise ValueError(f"Unknown objective {name!r}. Valid objectives: {', '.join(sorted(OBJECTIVES))}")
    return OBJECTIVES[name](**kwargs)
