"""Class-conditional (or text-to-image) sampling from an `MDTv2Transformer2DModel` with MDT's power-cosine guidance
schedule."""

from __future__ import annotations

import math
from typing import Any, Dict, List, Mapping, Optional, Union

import torch
from diffusers import DDPMScheduler
from diffusers.models import AutoencoderKL
from diffusers.schedulers import SchedulerMixin

from ..loaders import MaskedTransformerLoraLoaderMixin
from ..models.transformer_mdt import MDTv2Transformer2DModel
from ..utils.schedulers import scheduler_family
from .pipeline_base import MaskedTransformerPipelineBase

GUIDANCE_SCHEDULES = ("power-cosine", "constant")


def power_cosine_guidance_at_progress(
    guidance_scale: float, power: float, progress: Union[float, torch.Tensor]
) -> Union[float, torch.Tensor]:
    """MDT's classifier-free guidance scale at sampling progress ``progress`` in [0, 1] (0: pure noise, 1: done).

    ``w = (guidance_scale - 1) * (1 - cos(pi * progress ** power)) / 2 + 1``: 1 (no guidance) at the start,
    ``guidance_scale`` at the end. A large ``power`` keeps guidance off for most of the noisy steps (more diversity;
    the paper's FID setting is 3.8 with power 4), a small one makes it nearly constant (quality; the demo uses 4.0
    with power 0.01). Returns a float for a number and a tensor for a tensor.
    """
    if isinstance(progress, torch.Tensor):
        frac = progress.double().clamp(0.0, 1.0) ** power
        return (guidance_scale - 1.0) * (1.0 - torch.cos(math.pi * frac)) / 2.0 + 1.0
    frac = min(1.0, max(0.0, float(progress))) ** power
    return (guidance_scale - 1.0) * (1.0 - math.cos(math.pi * frac)) / 2.0 + 1.0


def power_cosine_guidance_scale(
    guidance_scale: float,
    power: float,
    t: Union[float, int, torch.Tensor],
    num_train_timesteps: int = 1000,
) -> Union[float, torch.Tensor]:
    """MDT's guidance scale at DDPM training timestep ``t``, as the official code defines it: the progress is
    ``1 - t / T`` (see `power_cosine_guidance_at_progress`), so ``w = guidance_scale`` at ``t = 0`` and 1 at
    ``t = T``."""
    if isinstance(t, torch.Tensor):
        return power_cosine_guidance_at_progress(guidance_scale, power, 1.0 - t.double() / num_train_timesteps)
    return power_cosine_guidance_at_progress(guidance_scale, power, 1.0 - float(t) / num_train_timesteps)


class MDTv2Pipeline(MaskedTransformerPipelineBase, MaskedTransformerLoraLoaderMixin):
    r"""Class-conditional (or text-to-image) generation with an MDTv2 transformer.

    A class-conditional transformer (the paper's; the default) takes ``class_labels``; a text-conditioned one
    (``caption_channels`` set) takes ``prompt`` (with the optional ``text_encoder`` + ``tokenizer``) or
    ``prompt_embeds``; its unconditional guidance input is the all-zero caption embedding, or ``negative_prompt``.

    MDT is trained with guided-diffusion's DDPM objective (epsilon + learned-range variance, linear betas 1e-4..0.02,
    1000 steps). The paper samples with 250 DDPM steps: `DDPMScheduler(variance_type="learned_range",
    timestep_spacing="linspace", clip_sample=False)` (see `default_scheduler`), which uses the predicted variance;
    DDIM, DPM-Solver++ and other DDPM-family schedulers work too and get the noise prediction only; so do EDM
    schedulers for an MDTv2 trained with the EDM objective.

    The power-cosine guidance schedule is a function of the sampling progress: ``1 - t / T`` for schedulers whose
    timesteps are DDPM training steps (exactly the official schedule), the fraction of steps done for the others
    (EDM schedulers, whose timesteps are ``ln(sigma) / 4``).

    Args:
        transformer ([`MDTv2Transformer2DModel`]): The denoiser.
        scheduler ([`SchedulerMixin`]): A scheduler matching the training objective (`None` is kept as None: set
            ``pipe.scheduler`` before sampling).
        vae ([`AutoencoderKL`], *optional*): Decodes latents to images; `None` for a pixel-space model.
        id2label (`dict`, *optional*): Class id -> name (comma-separated synonyms allowed), enables class names.
        training_objective (`str` or `dict`, *optional*): What the transformer was trained to predict (see
            `MaskDiTPipeline`); saved with the pipeline, a mismatching scheduler gets a warning.
        text_encoder, tokenizer (*optional*): The caption encoder of a text-conditioned transformer and its tokenizer
            (see `MaskDiTPipeline`).
    """

    _optional_components = ["vae", "scheduler", "text_encoder", "tokenizer"]
    model_cpu_offload_seq = "text_encoder->transformer->vae"

    def __init__(
        self,
        transformer: MDTv2Transformer2DModel,
        scheduler: SchedulerMixin,
        vae: Optional[AutoencoderKL] = None,
        id2label: Optional[Dict[Union[int, str], str]] = None,
        training_objective: Union[None, str, Mapping[str, Any]] = None,
        text_encoder=None,
        tokenizer=None,
    ):
        super().__init__()
        self.register_modules(
            transformer=transformer, scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer
        )
        self._setup_components(id2label, training_objective)
        self._guidance_power = 4.0
        self._guidance_schedule = "power-cosine"

    @staticmethod
    def default_scheduler(num_train_timesteps: int = 1000) -> DDPMScheduler:
        """The official sampler as a diffusers scheduler (matches guided-diffusion's ``p_sample``)."""
        return DDPMScheduler(
            num_train_timesteps=num_train_timesteps,
            beta_schedule="linear",
            beta_start=1e-4,
            beta_end=0.02,
            variance_type="learned_range",
            clip_sample=False,
            timestep_spacing="linspace",
        )

    def sampling_progress(self, step_index: int, timestep: torch.Tensor) -> float:
        """How far sampling has come at one step, in [0, 1]: ``1 - t / num_train_timesteps`` where the timesteps are
        DDPM training steps (the official MDT definition), else ``step_index / (number of steps - 1)``."""
        if scheduler_family(self.scheduler) == "ddpm":
            return 1.0 - float(timestep) / self.scheduler.config.num_train_timesteps
        num_steps = getattr(self, "_num_timesteps", None) or len(self.scheduler.timesteps)
        return 1.0 if num_steps <= 1 else step_index / (num_steps - 1)

    def guidance_scale_at(self, guidance_scale: float, step_index: int, timestep: torch.Tensor) -> float:
        """Guidance scale at one step: MDT's power-cosine of the sampling progress, or constant."""
        if self._guidance_schedule == "constant":
            return guidance_scale
        progress = self.sampling_progress(step_index, timestep)
        return power_cosine_guidance_at_progress(guidance_scale, self._guidance_power, progress)

    @torch.no_grad()
    def __call__(
        self,
        class_labels: Union[int, str, List[Union[int, str]], torch.Tensor, None] = None,
        guidance_scale: float = 3.8,
        guidance_power: float = 4.0,
        guidance_schedule: str = "power-cosine",
        num_inference_steps: int = 250,
        num_images_per_prompt: int = 1,
        generator: Optional[Union[torch.Generator, List[torch.Generator]]] = None,
        latents: Optional[torch.Tensor] = None,
        output_type: str = "pil",
        return_dict: bool = True,
        batch_size: int = 1,
        guidance_channels: Optional[int] = None,
        prompt: Union[str, List[str], None] = None,
        negative_prompt: Union[str, List[str], None] = None,
        prompt_embeds: Optional[torch.Tensor] = None,
        prompt_attention_mask: Optional[torch.Tensor] = None,
        negative_prompt_embeds: Optional[torch.Tensor] = None,
        negative_prompt_attention_mask: Optional[torch.Tensor] = None,
        max_sequence_length: int = 77,
    ):
        r"""
        Args:
            class_labels (`int`, `str`, list (nested lists are flattened) of them, or `torch.Tensor`): Class ids or
                names (names need ``id2label``). Required for class-conditional models.
            guidance_scale (`float`, defaults to 3.8): Final classifier-free guidance scale (``uncond + w * (cond -
                uncond)`` on the noise prediction); <= 1 disables guidance. 3.8 is the paper's FID setting.
            guidance_power (`float`, defaults to 4.0): Power of the power-cosine schedule (see
                `power_cosine_guidance_at_progress`); the official demo uses 4.0 / 0.01 for scale / power.
            guidance_schedule (`str`, defaults to `"power-cosine"`): ``"power-cosine"`` (MDT) or ``"constant"`` (DiT).
            num_inference_steps (`int`, defaults to 250): Denoising steps (the paper uses 250 DDPM steps).
            num_images_per_prompt (`int`, defaults to 1): Images per class label.
            generator (`torch.Generator` or a list of them, one per image, *optional*): For reproducible sampling.
            latents (`torch.Tensor`, *optional*): Initial noise of shape (B, C, H, W).
            output_type (`str`, defaults to `"pil"`): ``"pil"``, ``"np"``, ``"pt"`` or ``"latent"``.
            return_dict (`bool`, defaults to `True`): Return an `ImagePipelineOutput` or a tuple.
            batch_size (`int`, defaults to 1): Number of images for an unconditional model.
            guidance_channels (`int`, *optional*): Guide only the first N noise channels and keep the others
                conditional; the official MDT / DiT code uses 3 for 4-channel latents (set 3 to reproduce converted
                checkpoints exactly). Default: all channels.
            prompt, negative_prompt, prompt_embeds, prompt_attention_mask, negative_prompt_embeds,
                negative_prompt_attention_mask, max_sequence_length: For a text-conditioned transformer, the prompts
                (or caption embeddings) that replace ``class_labels``; see `encode_prompt`.

        Returns:
            [`~pipelines.ImagePipelineOutput`] with ``images``.
        """
        self.check_inputs(output_type, num_inference_steps, guidance_scale, num_images_per_prompt, latents)
        if guidance_schedule not in GUIDANCE_SCHEDULES:
            raise ValueError(f"guidance_schedule must be one of {GUIDANCE_SCHEDULES}, got {guidance_schedule!r}.")
        if (isinstance(guidance_power, bool) or not isinstance(guidance_power, (int, float))
                or not math.isfinite(guidance_power) or guidance_power <= 0):
            raise ValueError(f"guidance_power must be a positive finite number, got {guidance_power!r}.")
        if guidance_channels is not None and (
            isinstance(guidance_channels, bool) or not isinstance(guidance_channels, int)
            or not 1 <= guidance_channels <= self.transformer.config.in_channels
        ):
            raise ValueError(
                f"guidance_channels must be an integer in 1..{self.transformer.config.in_channels} (the latent "
                f"channels) or None, got {guidance_channels!r}."
            )
        self._guidance_power = float(guidance_power)
        self._guidance_schedule = guidance_schedule

        n, cond, uncond = self._conditioning(
            class_labels, num_images_per_prompt, guidance_scale, batch_size, prompt, negative_prompt, prompt_embeds,
            prompt_attention_mask, negative_prompt_embeds, negative_prompt_attention_mask, max_sequence_length,
        )
        latents = self._denoise(n, cond, uncond, guidance_scale, num_inference_steps, generator, latents,
                                guidance_channels=guidance_channels)
        return self._decode(latents, output_type, return_dict)
