"""Diffusion training objectives that match the diffusers scheduler saved with the trained pipeline.

An objective noises a clean batch, says what the model receives (scaled input and timestep), turns the raw model
output into a per-element weighted loss, and builds the inference scheduler. The noising and preconditioning come
from the schedulers themselves (`EDMEulerScheduler.precondition_*`, `DDPMScheduler.add_noise` / `get_velocity`), so
training and sampling cannot drift apart.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from diffusers import DDPMScheduler, EDMEulerScheduler
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from ..models.layers import patchify


@dataclass
class NoisyBatch:
    """A noised batch.

    Attributes:
        model_input: What the transformer receives as ``hidden_states`` (EDM: ``c_in * x_noisy``).
        timestep: (B,) what the transformer receives as ``timestep`` (EDM: ``c_noise``; DDPM: integer step).
        noisy: (B, C, H, W) the unscaled noisy sample (EDM: ``x0 + sigma * noise``; DDPM: ``x_t``).
        noise: (B, C, H, W) the Gaussian noise used.
        level: (B,) sigma (EDM) or integer t (DDPM).
    """

    model_input: torch.Tensor
    timestep: torch.Tensor
    noisy: torch.Tensor
    noise: torch.Tensor
    level: torch.Tensor


def _randn(shape: tuple, like: torch.Tensor, generator: Optional[torch.Generator]) -> torch.Tensor:
    # Drawn on the generator's device so a seeded generator gives the same numbers wherever the batch lives.
    device = generator.device if generator is not None else like.device
    return torch.randn(shape, generator=generator, device=device, dtype=torch.float32).to(like.device)


def _randn_like(x: torch.Tensor, generator: Optional[torch.Generator]) -> torch.Tensor:
    return _randn(tuple(x.shape), x, generator).to(x.dtype)


class Objective:
    """Interface of a training objective."""

    name = "base"

    def add_noise(self, x0: torch.Tensor, generator: Optional[torch.Generator] = None) -> NoisyBatch:
        raise NotImplementedError

    def renoise(self, x0: torch.Tensor, batch: NoisyBatch, noise: torch.Tensor) -> NoisyBatch:
        """The same noise levels as ``batch`` with other ``noise``."""
        raise NotImplementedError

    def predict_x0(self, model_output: torch.Tensor, batch: NoisyBatch) -> torch.Tensor:
        """The clean-sample estimate implied by the raw model output."""
        raise NotImplementedError

    def per_element_loss(self, model_output: torch.Tensor, batch: NoisyBatch, x0: torch.Tensor) -> torch.Tensor:
        """Weighted squared error per element, (B, C, H, W)."""
        raise NotImplementedError

    def inference_scheduler(self) -> SchedulerMixin:
        """The scheduler saved with the pipeline; it interprets the model output exactly as this objective trains it."""
        raise NotImplementedError


class EDMObjective(Objective):
    """EDM (Karras et al. 2022): log-normal sigma, preconditioning c_in / c_noise / c_skip / c_out, weight
    (sigma^2 + sigma_data^2) / (sigma * sigma_data)^2, all through `EDMEulerScheduler`.

    Args:
        sigma_data (`float`, defaults to 0.5): Data standard deviation (MaskDiT 0.5, MicroDiT 0.9).
        p_mean (`float`, defaults to -1.2): Mean of log(sigma) (MicroDiT -0.6).
        p_std (`float`, defaults to 1.2): Std of log(sigma).
        sigma_min (`float`, defaults to 0.002), sigma_max (`float`, defaults to 80.0): Sampling range.
        prediction_type (`str`, defaults to `"epsilon"`): EDM's c_out sign convention of the scheduler.
    """

    name = "edm"

    def __init__(
        self,
        sigma_data: float = 0.5,
        p_mean: float = -1.2,
        p_std: float = 1.2,
        sigma_min: float = 0.002,
        sigma_max: float = 80.0,
        prediction_type: str = "epsilon",
    ):
        self.p_mean = p_mean
        self.p_std = p_std
        self.scheduler = EDMEulerScheduler(
            sigma_min=sigma_min, sigma_max=sigma_max, sigma_data=sigma_data, prediction_type=prediction_type
        )

    @property
    def sigma_data(self) -> float:
        return self.scheduler.config.sigma_data

    def loss_weight(self, sigma: torch.Tensor) -> torch.Tensor:
        sd = self.sigma_data
        return (sigma**2 + sd**2) / (sigma * sd) ** 2

    def add_noise(self, x0: torch.Tensor, generator: Optional[torch.Generator] = None) -> NoisyBatch:
        b = x0.shape[0]
        n = _randn((b,), x0, generator)
        sigma = torch.exp(self.p_mean + self.p_std * n)
        noise = _randn_like(x0, generator)
        sigma_b = sigma.view(b, 1, 1, 1)
        noisy = x0 + sigma_b.to(x0.dtype) * noise
        model_input = self.scheduler.precondition_inputs(noisy, sigma_b.to(x0.dtype))
        timestep = self.scheduler.precondition_noise(sigma)
        return NoisyBatch(model_input=model_input, timestep=timestep, noisy=noisy, noise=noise, level=sigma)

    def renoise(self, x0: torch.Tensor, batch: NoisyBatch, noise: torch.Tensor) -> NoisyBatch:
        """``batch``'s noise levels with other ``noise`` (MDTv2's masked branch: same sigma, fresh noise)."""
        sigma_b = batch.level.view(-1, 1, 1, 1).to(x0.dtype)
        noisy = x0 + sigma_b * noise
        model_input = self.scheduler.precondition_inputs(noisy, sigma_b)
        return NoisyBatch(model_input=model_input, timestep=batch.timestep, noisy=noisy, noise=noise, level=batch.level)

    def predict_x0(self, model_output: torch.Tensor, batch: NoisyBatch) -> torch.Tensor:
        sigma = batch.level.view(-1, 1, 1, 1)
        return self.scheduler.precondition_outputs(batch.noisy.float(), model_output.float(), sigma)

    def per_element_loss(self, model_output: torch.Tensor, batch: NoisyBatch, x0: torch.Tensor) -> torch.Tensor:
        denoised = self.predict_x0(model_output, batch)
        weight = self.loss_weight(batch.level).view(-1, 1, 1, 1)
        return weight * (denoised - x0.float()) ** 2

    def inference_scheduler(self) -> SchedulerMixin:
        return EDMEulerScheduler.from_config(self.scheduler.config)


class DDPMObjective(Objective):
    """Discrete DDPM (guided-diffusion / DiT): uniform t, ``x_t`` from `DDPMScheduler.add_noise`, epsilon or v target.

    Args:
        prediction_type (`str`, defaults to `"epsilon"`): ``"epsilon"`` or ``"v_prediction"``.
        num_train_timesteps (`int`, defaults to 1000), beta_start, beta_end, beta_schedule: The noise schedule
            (linear 1e-4 .. 2e-2 as DiT / MDT).
        learned_variance (`bool`, defaults to `False`): The model also predicts the variance (out channels 2C); the
            saved scheduler then uses ``variance_type="learned_range"``.
    """

    name = "ddpm"

    def __init__(
        self,
        prediction_type: str = "epsilon",
        num_train_timesteps: int = 1000,
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        learned_variance: bool = False,
    ):
        if prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"prediction_type must be 'epsilon' or 'v_prediction', got {prediction_type!r}.")
        self.learned_variance = learned_variance
        self.scheduler = DDPMScheduler(
            num_train_timesteps=num_train_timesteps,
            beta_start=beta_start,
            beta_end=beta_end,
            beta_schedule=beta_schedule,
            prediction_type=prediction_type,
            variance_type="learned_range" if learned_variance else "fixed_small",
            clip_sample=False,
        )

    def _alphas(self, t: torch.Tensor) -> torch.Tensor:
        return self.scheduler.alphas_cumprod.to(t.device)[t].float().view(-1, 1, 1, 1)

    def add_noise(self, x0: torch.Tensor, generator: Optional[torch.Generator] = None) -> NoisyBatch:
        b = x0.shape[0]
        device = generator.device if generator is not None else x0.device
        t = torch.randint(0, self.scheduler.config.num_train_timesteps, (b,), generator=generator, device=device)
        t = t.to(x0.device)
        noise = _randn_like(x0, generator)
        noisy = self.scheduler.add_noise(x0, noise, t)
        return NoisyBatch(model_input=noisy, timestep=t, noisy=noisy, noise=noise, level=t)

    def renoise(self, x0: torch.Tensor, batch: NoisyBatch, noise: torch.Tensor) -> NoisyBatch:
        """``batch``'s timesteps with other ``noise`` (MDTv2's masked branch: same t, fresh noise)."""
        noisy = self.scheduler.add_noise(x0, noise, batch.level)
        return NoisyBatch(model_input=noisy, timestep=batch.timestep, noisy=noisy, noise=noise, level=batch.level)

    def target(self, x0: torch.Tensor, batch: NoisyBatch) -> torch.Tensor:
        if self.scheduler.config.prediction_type == "epsilon":
            return batch.noise
        return self.scheduler.get_velocity(x0, batch.noise, batch.level)

    def predict_x0(self, model_output: torch.Tensor, batch: NoisyBatch) -> torch.Tensor:
        a = self._alphas(batch.level)
        x_t, out = batch.noisy.float(), model_output.float()
        if self.scheduler.config.prediction_type == "epsilon":
            return (x_t - (1 - a).sqrt() * out) / a.sqrt()
        return a.sqrt() * x_t - (1 - a).sqrt() * out

    def per_element_loss(self, model_output: torch.Tensor, batch: NoisyBatch, x0: torch.Tensor) -> torch.Tensor:
        return (model_output.float() - self.target(x0, batch).float()) ** 2

    def inference_scheduler(self) -> SchedulerMixin:
        return DDPMScheduler.from_config(self.scheduler.config)


def per_token(per_element: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, N): mean over each patch's pixels and channels, tokens in row-major order."""
    return patchify(per_element, patch_size).mean(dim=-1)


def masked_mean(values: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Per-sample weighted mean over tokens: (B, N), (B, N) -> (B,)."""
    weights = weights.to(values.dtype)
    return (values * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)


def build_objective(name: str, **kwargs) -> Objective:
    """``"edm"`` -> `EDMObjective`; ``"epsilon"`` / ``"v_prediction"`` -> `DDPMObjective` with that target."""
    if name == "edm":
        return EDMObjective(**{k: v for k, v in kwargs.items() if k in ("sigma_data", "p_mean", "p_std")})
    if name in ("epsilon", "v_prediction"):
        return DDPMObjective(prediction_type=name, learned_variance=kwargs.get("learned_variance", False))
    raise ValueError(f"Unknown objective {name!r}; use 'edm', 'epsilon' or 'v_prediction'.")
