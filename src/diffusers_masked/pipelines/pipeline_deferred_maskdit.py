"""Text-to-image (or class-conditional) sampling from a `DeferredMaskDiTTransformer2DModel` (MicroDiT)."""

from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Union

import torch
from diffusers import EDMEulerScheduler
from diffusers.models import AutoencoderKL
from diffusers.schedulers import SchedulerMixin

from ..loaders import MaskedTransformerLoraLoaderMixin
from ..models.transformer_deferred_maskdit import DeferredMaskDiTTransformer2DModel
# encode_texts lives in pipeline_base; the training recipe imports it from here too.
from .pipeline_base import MaskedTransformerPipelineBase, encode_texts  # noqa: F401


def default_deferred_maskdit_scheduler() -> EDMEulerScheduler:
    """EDM with MicroDiT's constants: ``sigma_data=0.9``, sigma in [0.002, 80], Karras schedule with rho 7, the
    network predicting EDM's F (``prediction_type="epsilon"`` gives EDM's c_skip / c_out)."""
    return EDMEulerScheduler(
        sigma_min=0.002, sigma_max=80.0, sigma_data=0.9, sigma_schedule="karras", rho=7.0, prediction_type="epsilon"
    )


class DeferredMaskDiTPipeline(MaskedTransformerPipelineBase, MaskedTransformerLoraLoaderMixin):
    r"""Text-to-image generation with a MicroDiT-style deferred-masking transformer and any diffusers scheduler.

    Text-conditioned transformers (``caption_channels`` set) take ``prompt`` (encoded by ``text_encoder`` +
    ``tokenizer``, any transformers encoder whose last hidden state is ``caption_channels`` wide) or precomputed
    ``prompt_embeds``; class-conditional ones (``num_classes`` set) take ``class_labels`` as `MaskDiTPipeline`.
    Classifier-free guidance uses an all-zero caption embedding as the unconditional input (as MicroDiT's training
    drops captions), or ``negative_prompt`` when given.

    MicroDiT's scheduler is `EDMEulerScheduler` with ``sigma_data=0.9`` (`default_deferred_maskdit_scheduler`); any
    EDM scheduler with the same ``sigma_data`` (e.g. `EDMDPMSolverMultistepScheduler`) works too.

    Args:
        transformer ([`DeferredMaskDiTTransformer2DModel`]): The denoiser (`None` for a pipeline that only encodes
            prompts).
        scheduler ([`SchedulerMixin`]): Matches the training objective (e.g. `default_scheduler()`, EDM with
            sigma_data 0.9). `None` stays None: set ``pipe.scheduler`` before sampling. It has no default because
            `DiffusionPipeline.from_pretrained` ignores a passed component whose argument has one.
        vae ([`AutoencoderKL`], *optional*): Decodes latents to images; `None` for a pixel-space model.
        text_encoder (`transformers.PreTrainedModel`, *optional*): Caption encoder (e.g. the MiniLM of
            `diffusers_masked.utils.load_default_text_encoder`).
        tokenizer (`transformers.PreTrainedTokenizerBase`, *optional*): Its tokenizer.
        id2label (`dict`, *optional*): Class id -> name for class-conditional models.
        training_objective (`str` or `dict`, *optional*): What the transformer was trained to predict (see
            `MaskDiTPipeline`); saved with the pipeline, a mismatching scheduler gets a warning.
    """

    _optional_components = ["vae", "text_encoder", "tokenizer", "scheduler"]
    model_cpu_offload_seq = "text_encoder->transformer->vae"

    def __init__(
        self,
        transformer: DeferredMaskDiTTransformer2DModel,
        scheduler: Optional[SchedulerMixin],
        vae: Optional[AutoencoderKL] = None,
        text_encoder=None,
        tokenizer=None,
        id2label: Optional[Dict[Union[int, str], str]] = None,
        training_objective: Union[None, str, Mapping[str, Any]] = None,
    ):
        super().__init__()
        self.register_modules(
            transformer=transformer, scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer
        )
        self._setup_components(id2label, training_objective)

    @staticmethod
    def default_scheduler() -> EDMEulerScheduler:
        """MicroDiT's sampler as a diffusers scheduler (see `default_deferred_maskdit_scheduler`)."""
        return default_deferred_maskdit_scheduler()

    # ------------------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(
        self,
        prompt: Union[str, List[str], None] = None,
        negative_prompt: Union[str, List[str], None] = None,
        class_labels: Union[int, str, List[Union[int, str]], torch.Tensor, None] = None,
        guidance_scale: float = 5.0,
        num_inference_steps: int = 30,
        num_images_per_prompt: int = 1,
        generator: Optional[Union[torch.Generator, List[torch.Generator]]] = None,
        latents: Optional[torch.Tensor] = None,
        prompt_embeds: Optional[torch.Tensor] = None,
        prompt_attention_mask: Optional[torch.Tensor] = None,
        negative_prompt_embeds: Optional[torch.Tensor] = None,
        negative_prompt_attention_mask: Optional[torch.Tensor] = None,
        max_sequence_length: int = 77,
        output_type: str = "pil",
        return_dict: bool = True,
        batch_size: int = 1,
    ):
        r"""
        Args:
            prompt (`str` or `List[str]`): Text prompts, for a text-conditioned transformer.
            negative_prompt (`str` or `List[str]`, *optional*): Guidance away from these; default: the all-zero
                (unconditional) caption.
            class_labels (`int`, `str`, list of them, or `torch.Tensor`): Class ids or names, for a class-conditional
                transformer.
            guidance_scale (`float`, defaults to 5.0): Classifier-free guidance scale (MicroDiT's default);
                ``uncond + s * (cond - uncond)`` on the network output; <= 1 disables guidance.
            num_inference_steps (`int`, defaults to 30): Denoising steps.
            num_images_per_prompt (`int`, defaults to 1): Images per prompt / class label.
            generator (`torch.Generator` or a list of them, one per image, *optional*): For reproducible sampling.
            latents (`torch.Tensor`, *optional*): Initial unit-variance noise of shape (B, C, H, W).
            prompt_embeds, prompt_attention_mask, negative_prompt_embeds, negative_prompt_attention_mask: Precomputed
                caption tokens and masks instead of prompts (see `encode_prompt`).
            max_sequence_length (`int`, defaults to 77): Prompt token limit.
            output_type (`str`, defaults to `"pil"`): ``"pil"``, ``"np"``, ``"pt"`` or ``"latent"``.
            return_dict (`bool`, defaults to `True`): Return an `ImagePipelineOutput` or a tuple.
            batch_size (`int`, defaults to 1): Number of images for an unconditional transformer.

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
