"""Class-conditional sampling from a `RoutedDiTTransformer2DModel` (DiT, optionally trained with TREAD routing)."""

from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Union

import torch
from diffusers.models import AutoencoderKL
from diffusers.schedulers import SchedulerMixin

from ..loaders import MaskedTransformerLoraLoaderMixin
from ..models.transformer_dit import RoutedDiTTransformer2DModel
from .pipeline_base import MaskedTransformerPipelineBase


class RoutedDiTPipeline(MaskedTransformerPipelineBase, MaskedTransformerLoraLoaderMixin):
    r"""Class-conditional image generation with a DiT (trained with or without TREAD routing) and any diffusers
    scheduler.

    Sampling never routes: routing is a training-time device (the TREAD paper and its official code sample with
    every token through every block), so a TREAD-trained DiT samples exactly like a DiT, with classifier-free
    guidance on the null class. EDM-objective models (the default of `train_dit.py`, as TREAD) are sampled with
    `EDMEulerScheduler` / `EDMDPMSolverMultistepScheduler`; DDPM-objective ones with DDPM / DDIM / DPM-Solver++. The
    scheduler saved with a trained pipeline matches its training objective.

    Args:
        transformer ([`RoutedDiTTransformer2DModel`]): The denoiser.
        scheduler ([`SchedulerMixin`]): Any diffusers scheduler that matches the training objective.
        vae ([`AutoencoderKL`], *optional*): Decodes latents to images; `None` for a pixel-space model.
        id2label (`dict`, *optional*): Class id -> name (comma-separated synonyms allowed), enables class names.
        training_objective (`str` or `dict`, *optional*): What the transformer was trained to predict (see
            `MaskDiTPipeline`); saved with the pipeline, a mismatching scheduler gets a warning.
    """

    _optional_components = ["vae", "scheduler"]

    def __init__(
        self,
        transformer: RoutedDiTTransformer2DModel,
        scheduler: SchedulerMixin,
        vae: Optional[AutoencoderKL] = None,
        id2label: Optional[Dict[Union[int, str], str]] = None,
        training_objective: Union[None, str, Mapping[str, Any]] = None,
    ):
        super().__init__()
        self.register_modules(transformer=transformer, scheduler=scheduler, vae=vae)
        self._setup_labels(id2label)
        self._setup_training_objective(training_objective)

    @torch.no_grad()
    def __call__(
        self,
        class_labels: Union[int, str, List[Union[int, str]], torch.Tensor, None] = None,
        guidance_scale: float = 1.5,
        num_inference_steps: int = 40,
        num_images_per_prompt: int = 1,
        generator: Optional[Union[torch.Generator, List[torch.Generator]]] = None,
        latents: Optional[torch.Tensor] = None,
        output_type: str = "pil",
        return_dict: bool = True,
        batch_size: int = 1,
    ):
        r"""
        Args:
            class_labels (`int`, `str`, list of them, or `torch.Tensor`): Class ids or names (names need
                ``id2label``). Required for class-conditional models.
            guidance_scale (`float`, defaults to 1.5): Classifier-free guidance scale (``uncond + s * (cond -
                uncond)``), 1.5 as DiT's and TREAD's sampling; <= 1 disables guidance.
            num_inference_steps (`int`, defaults to 40): Denoising steps (TREAD samples with 40 EDM steps).
            num_images_per_prompt (`int`, defaults to 1): Images per class label.
            generator (`torch.Generator`, *optional*): For reproducible sampling.
            latents (`torch.Tensor`, *optional*): Initial unit-variance noise of shape (B, C, H, W).
            output_type (`str`, defaults to `"pil"`): ``"pil"``, ``"np"``, ``"pt"`` or ``"latent"``.
            return_dict (`bool`, defaults to `True`): Return an `ImagePipelineOutput` or a tuple.
            batch_size (`int`, defaults to 1): Number of images for an unconditional model.

        Returns:
            [`~pipelines.ImagePipelineOutput`] with ``images``.
        """
        self.check_inputs(output_type, num_inference_steps, guidance_scale, num_images_per_prompt, latents)
        n, cond, uncond = self._class_conditioning(class_labels, num_images_per_prompt, guidance_scale, batch_size)
        latents = self._denoise(n, cond, uncond, guidance_scale, num_inference_steps, generator, latents)
        return self._decode(latents, output_type, return_dict)
