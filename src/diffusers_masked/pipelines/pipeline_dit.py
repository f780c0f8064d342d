"""Class-conditional sampling from a `RoutedDiTTransformer2DModel` (DiT, optionally trained with TREAD routing)."""

from __future__ import annotations

from typing import Any, Dict, Mapping, Optional, Union

from diffusers.models import AutoencoderKL
from diffusers.schedulers import SchedulerMixin

from ..models.transformer_dit import RoutedDiTTransformer2DModel
from .pipeline_base import MaskedTransformerPipelineBase
from .pipeline_maskdit import MaskDiTPipeline


class RoutedDiTPipeline(MaskDiTPipeline):
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

    # DiT is class-conditional only: no text encoder / tokenizer components (MaskDiTPipeline's sampling is reused).
    _optional_components = ["vae", "scheduler"]
    model_cpu_offload_seq = "transformer->vae"

    def __init__(
        self,
        transformer: RoutedDiTTransformer2DModel,
        scheduler: SchedulerMixin,
        vae: Optional[AutoencoderKL] = None,
        id2label: Optional[Dict[Union[int, str], str]] = None,
        training_objective: Union[None, str, Mapping[str, Any]] = None,
    ):
        MaskedTransformerPipelineBase.__init__(self)
        self.register_modules(transformer=transformer, scheduler=scheduler, vae=vae)
        self._setup_components(id2label, training_objective)
