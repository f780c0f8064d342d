"""Class-conditional (or text-to-image) sampling from a `MaskDiTTransformer2DModel`."""

from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Union

import torch
from diffusers.models import AutoencoderKL
from diffusers.schedulers import SchedulerMixin

from ..loaders import MaskedTransformerLoraLoaderMixin
from ..models.transformer_maskdit import MaskDiTTransformer2DModel
from .pipeline_base import MaskedTransformerPipelineBase


class MaskDiTPipeline(MaskedTransformerPipelineBase, MaskedTransformerLoraLoaderMixin):
    r"""Class-conditional (or text-to-image) generation with a MaskDiT transformer and any diffusers scheduler.

    A class-conditional transformer (the paper's; the default) takes ``class_labels``; a text-conditioned one
    (``caption_channels`` set) takes ``prompt`` (encoded by the optional ``text_encoder`` + ``tokenizer``) or
    precomputed ``prompt_embeds``, with the all-zero caption embedding (or ``negative_prompt``) as the unconditional
    input of classifier-free guidance.

    Models trained with the EDM objective (the default) are sampled with `EDMEulerScheduler` or
    `EDMDPMSolverMultistepScheduler`; DDPM-objective models with DDPM / DDIM / DPM-Solver++ etc. The scheduler saved
    with a trained pipeline is the one that matches its training objective.

    Args:
        transformer ([`MaskDiTTransformer2DModel`]): The denoiser.
        scheduler ([`SchedulerMixin`]): Any diffusers scheduler that matches the training objective (`None` is kept
            as None: set ``pipe.scheduler`` before sampling).
        vae ([`AutoencoderKL`], *optional*): Decodes latents to images; `None` for a pixel-space model.
        id2label (`dict`, *optional*): Class id -> name (comma-separated synonyms allowed), enables class names.
        training_objective (`str` or `dict`, *optional*): What the transformer was trained to predict (``"edm"``,
            ``"epsilon"``, ``"v_prediction"`` or a `diffusers_masked.utils.describe_training_objective` dict); saved
            in model_index.json, and a scheduler that does not match it gets a warning. Default: the objective the
            given scheduler implies.
        text_encoder (`transformers.PreTrainedModel`, *optional*): Caption encoder of a text-conditioned transformer
            (its last hidden state must be ``caption_channels`` wide; e.g. the MiniLM of
            `diffusers_masked.utils.load_default_text_encoder`); not needed with ``prompt_embeds``.
        tokenizer (`transformers.PreTrainedTokenizerBase`, *optional*): Its tokenizer.
    """

    _optional_components = ["vae", "scheduler", "text_encoder", "tokenizer"]
    model_cpu_offload_seq = "text_encoder->transformer->vae"

    def __init__(
        self,
        transformer: MaskDiTTransformer2DModel,
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
            guidance_scale (`float`, defaults to 1.5): Classifier-free guidance scale as in DiT / MaskDiT
                (``uncond + s * (cond - uncond)`` on the noise prediction); <= 1 disables guidance (the unconditional
                input: the null class, or the all-zero caption / ``negative_prompt`` of a text model).
            num_inference_steps (`int`, defaults to 40): Denoising steps.
            num_images_per_prompt (`int`, defaults to 1): Images per class label.
            generator (`torch.Generator` or a list of them, one per image, *optional*): For reproducible sampling.
            latents (`torch.Tensor`, *optional*): Initial unit-variance noise of shape (B, C, H, W).
            output_type (`str`, defaults to `"pil"`): ``"pil"``, ``"np"``, ``"pt"`` or ``"latent"``.
            return_dict (`bool`, defaults to `True`): Return an `ImagePipelineOutput` or a tuple.
            batch_size (`int`, defaults to 1): Number of images for an unconditional model.
            prompt, negative_prompt (`str` or `List[str]`), prompt_embeds, prompt_attention_mask, negative_prompt_embeds,
                negative_prompt_attention_mask, max_sequence_length: The text input of a text-conditioned transformer,
                instead of ``class_labels`` (see `encode_prompt`).

        Returns:
            [`~pipelines.ImagePipelineOutput`] with ``images``.
        """
        self.check_inputs(output_type, num_inference_steps, guidance_scale, num_images_per_prompt, latents)
        n, cond, uncond = self._conditioning(
            class_labels, num_images_per_prompt, guidance_scale, batch_size, prompt, negative_prompt, prompt_embeds,
            prompt_attention_mask, negative_prompt_embeds, negative_prompt_attention_mask, max_sequence_length,
        )
        latents = self._denoise(n, cond, uncond, guidance_scale, num_inference_steps, generator, latents)
        return self._decode(latents, output_type, return_dict)
