"""Text-to-image (or class-conditional) sampling from a `DeferredMaskDiTTransformer2DModel` (MicroDiT)."""

from __future__ import annotations

import logging
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import torch
from diffusers import EDMEulerScheduler
from diffusers.models import AutoencoderKL
from diffusers.schedulers import SchedulerMixin

from ..loaders import MaskedTransformerLoraLoaderMixin
from ..models.transformer_deferred_maskdit import DeferredMaskDiTTransformer2DModel
from .pipeline_base import MaskedTransformerPipelineBase, _is_int

logger = logging.getLogger(__name__)


def default_deferred_maskdit_scheduler() -> EDMEulerScheduler:
    """EDM with MicroDiT's constants: ``sigma_data=0.9``, sigma in [0.002, 80], Karras schedule with rho 7, the
    network predicting EDM's F (``prediction_type="epsilon"`` gives EDM's c_skip / c_out)."""
    return EDMEulerScheduler(
        sigma_min=0.002, sigma_max=80.0, sigma_data=0.9, sigma_schedule="karras", rho=7.0, prediction_type="epsilon"
    )


@torch.no_grad()
def encode_texts(
    text_encoder, tokenizer, texts: List[str], max_sequence_length: int = 77, device: Optional[torch.device] = None
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Caption tokens of ``texts``: the text encoder's last hidden state (B, L, width) and the attention mask (B, L),
    padded to the longest text (at most ``max_sequence_length`` tokens; longer texts are truncated with a warning).
    Used by the pipeline and by the training recipe, which caches the embeddings of its fixed captions once."""
    if not _is_int(max_sequence_length) or max_sequence_length < 1:
        raise ValueError(f"max_sequence_length must be an integer >= 1, got {max_sequence_length!r}.")
    max_length = min(max_sequence_length, getattr(tokenizer, "model_max_length", max_sequence_length))
    texts = list(texts)
    tokens = tokenizer(texts, padding="longest", max_length=max_length, truncation=True, return_tensors="pt")
    # The untruncated lengths tell whether anything was cut (one extra tokenizer call; the encoder dominates).
    full_ids = tokenizer(texts, padding=False, truncation=False, verbose=False)["input_ids"]
    for i, ids in enumerate(full_ids):
        if len(ids) > max_length:
            dropped = tokenizer.decode(ids[max_length - 1:], skip_special_tokens=True)
            logger.warning(
                "Prompt %d has %d tokens but only %d are used (max_sequence_length=%d, tokenizer limit %s); this part "
                "was truncated: %r",
                i, len(ids), max_length, max_sequence_length, getattr(tokenizer, "model_max_length", None), dropped,
            )
    encoder_device = getattr(text_encoder, "device", None) or device
    ids = tokens["input_ids"].to(encoder_device)
    mask = tokens["attention_mask"].to(encoder_device)
    out = text_encoder(input_ids=ids, attention_mask=mask)
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    if device is not None:
        hidden, mask = hidden.to(device), mask.to(device)
    return hidden, mask


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
        self._setup_labels(id2label)
        self._setup_training_objective(training_objective)

    @staticmethod
    def default_scheduler() -> EDMEulerScheduler:
        """MicroDiT's sampler as a diffusers scheduler (see `default_deferred_maskdit_scheduler`)."""
        return default_deferred_maskdit_scheduler()

    # ------------------------------------------------------------------------------------------------------------
    # Prompt encoding (also used by the training recipe to cache caption embeddings)
    # ------------------------------------------------------------------------------------------------------------
    def _encode_texts(self, texts: List[str], max_sequence_length: int, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
        if self.text_encoder is None or self.tokenizer is None:
            raise ValueError(
                "This pipeline has no text_encoder / tokenizer: pass prompt_embeds instead of prompt, or build it "
                "with text_encoder and tokenizer (e.g. diffusers_masked.utils.load_default_text_encoder())."
            )
        return encode_texts(self.text_encoder, self.tokenizer, texts, max_sequence_length, device)

    @staticmethod
    def _as_text_list(text: Union[str, List[str]], what: str) -> List[str]:
        texts = [text] if isinstance(text, str) else list(text)
        if not texts or not all(isinstance(t, str) for t in texts):
            raise ValueError(f"{what} must be a string or a non-empty list of strings, got {text!r}.")
        return texts

    @staticmethod
    def _pad_tokens(embeds: torch.Tensor, mask: torch.Tensor, length: int) -> Tuple[torch.Tensor, torch.Tensor]:
        # Zero tokens with mask 0 are ignored by the model, so padding never changes the output.
        extra = length - embeds.shape[1]
        if extra <= 0:
            return embeds, mask
        embeds = torch.cat([embeds, embeds.new_zeros(embeds.shape[0], extra, embeds.shape[2])], dim=1)
        mask = torch.cat([mask, mask.new_zeros(mask.shape[0], extra)], dim=1)
        return embeds, mask

    def _caption_width(self) -> Tuple[Optional[int], str]:
        # The transformer decides what it can read; an encode-only pipeline has just the text encoder's width.
        if self.transformer is not None:
            return self.transformer.config.caption_channels, "caption_channels of the transformer"
        if self.text_encoder is not None:
            return getattr(self.text_encoder.config, "hidden_size", None), "hidden size of the text encoder"
        return None, "any width"

    def _check_embeds(self, embeds: torch.Tensor, mask: Optional[torch.Tensor], what: str) -> torch.Tensor:
        c, source = self._caption_width()
        if not isinstance(embeds, torch.Tensor) or embeds.dim() != 3 or (c is not None and embeds.shape[-1] != c):
            shape = tuple(embeds.shape) if isinstance(embeds, torch.Tensor) else type(embeds).__name__
            raise ValueError(
                f"{what} must have shape (batch, tokens, {c}) ({source}), got {shape}. "
                "The text encoder's hidden size must equal the transformer's caption_channels."
            )
        if mask is None:
            return torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
        if tuple(mask.shape) != tuple(embeds.shape[:2]):
            raise ValueError(f"The attention mask of {what} must have shape {tuple(embeds.shape[:2])}, got {tuple(mask.shape)}.")
        return mask.to(embeds.device)

    @torch.no_grad()
    def encode_prompt(
        self,
        prompt: Union[str, List[str], None] = None,
        device: Optional[torch.device] = None,
        num_images_per_prompt: int = 1,
        do_classifier_free_guidance: bool = True,
        negative_prompt: Union[str, List[str], None] = None,
        prompt_embeds: Optional[torch.Tensor] = None,
        negative_prompt_embeds: Optional[torch.Tensor] = None,
        prompt_attention_mask: Optional[torch.Tensor] = None,
        negative_prompt_attention_mask: Optional[torch.Tensor] = None,
        max_sequence_length: int = 77,
    ) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
        r"""Encode prompts into caption tokens for the transformer.

        Args:
            prompt (`str` or `List[str]`): Prompts (or pass ``prompt_embeds``).
            device (`torch.device`, *optional*): Where the embeddings go; the execution device by default.
            num_images_per_prompt (`int`, defaults to 1): Each prompt's embedding is repeated this many times.
            do_classifier_free_guidance (`bool`, defaults to `True`): Also return the unconditional embeddings.
            negative_prompt (`str` or `List[str]`, *optional*): Replaces the all-zero unconditional caption.
            prompt_embeds, negative_prompt_embeds (`torch.Tensor` of shape (B, L, caption_channels), *optional*):
                Precomputed text-encoder last hidden states.
            prompt_attention_mask, negative_prompt_attention_mask (`torch.Tensor` of shape (B, L), *optional*):
                1 for real tokens, 0 for padding; all ones when omitted.
            max_sequence_length (`int`, defaults to 77): Longer prompts are truncated (with a warning).

        Returns:
            ``(prompt_embeds, prompt_attention_mask, negative_prompt_embeds, negative_prompt_attention_mask)``, the
            negatives `None` without guidance; prompt and negative have the same token length so they can be batched.
            The embeddings have the text encoder's dtype (the transformer's without a text encoder).
        """
        device = device or self._execution_device
        if self.text_encoder is not None:
            dtype = self.text_encoder.dtype
        elif self.transformer is not None:
            dtype = self.transformer.dtype
        else:
            dtype = prompt_embeds.dtype if isinstance(prompt_embeds, torch.Tensor) else torch.float32
        if (prompt is None) == (prompt_embeds is None):
            raise ValueError("Pass exactly one of `prompt` and `prompt_embeds`.")
        if negative_prompt is not None and negative_prompt_embeds is not None:
            raise ValueError("Pass at most one of `negative_prompt` and `negative_prompt_embeds`.")
        if not _is_int(num_images_per_prompt) or num_images_per_prompt < 1:
            raise ValueError(f"num_images_per_prompt must be an integer >= 1, got {num_images_per_prompt!r}.")
        if prompt is not None:
            prompt_embeds, prompt_attention_mask = self._encode_texts(
                self._as_text_list(prompt, "prompt"), max_sequence_length, device
            )
        prompt_attention_mask = self._check_embeds(prompt_embeds, prompt_attention_mask, "prompt_embeds")
        prompt_embeds = prompt_embeds.to(device=device, dtype=dtype)
        prompt_attention_mask = prompt_attention_mask.to(device)
        batch = prompt_embeds.shape[0]

        neg_embeds = neg_mask = None
        if do_classifier_free_guidance:
            if negative_prompt is not None:
                negatives = self._as_text_list(negative_prompt, "negative_prompt")
                if len(negatives) == 1:
                    negatives = negatives * batch
                if len(negatives) != batch:
                    raise ValueError(f"Got {len(negatives)} negative prompts for {batch} prompts; pass 1 or {batch}.")
                neg_embeds, neg_mask = self._encode_texts(negatives, max_sequence_length, device)
            elif negative_prompt_embeds is not None:
                neg_embeds = negative_prompt_embeds
                neg_mask = negative_prompt_attention_mask
                if neg_embeds.shape[0] != batch:
                    raise ValueError(
                        f"negative_prompt_embeds has batch {neg_embeds.shape[0]} but prompt_embeds has {batch}."
                    )
            else:
                # The unconditional caption of MicroDiT: all-zero text-encoder features.
                neg_embeds = torch.zeros_like(prompt_embeds)
                neg_mask = torch.ones_like(prompt_attention_mask)
            neg_mask = self._check_embeds(neg_embeds, neg_mask, "negative_prompt_embeds")
            neg_embeds = neg_embeds.to(device=device, dtype=dtype)
            neg_mask = neg_mask.to(device)
            length = max(prompt_embeds.shape[1], neg_embeds.shape[1])
            prompt_embeds, prompt_attention_mask = self._pad_tokens(prompt_embeds, prompt_attention_mask, length)
            neg_embeds, neg_mask = self._pad_tokens(neg_embeds, neg_mask, length)
            neg_embeds = neg_embeds.repeat_interleave(num_images_per_prompt, dim=0)
            neg_mask = neg_mask.repeat_interleave(num_images_per_prompt, dim=0)
        prompt_embeds = prompt_embeds.repeat_interleave(num_images_per_prompt, dim=0)
        prompt_attention_mask = prompt_attention_mask.repeat_interleave(num_images_per_prompt, dim=0)
        return prompt_embeds, prompt_attention_mask, neg_embeds, neg_mask

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
        device = self._execution_device
        use_cfg = guidance_scale > 1
        cfg = self.transformer.config
        if cfg.caption_channels is not None:
            if class_labels is not None:
                raise ValueError("This transformer is text-conditioned: pass prompt (or prompt_embeds), not class_labels.")
            embeds, mask, neg_embeds, neg_mask = self.encode_prompt(
                prompt, device, num_images_per_prompt, use_cfg, negative_prompt, prompt_embeds,
                negative_prompt_embeds, prompt_attention_mask, negative_prompt_attention_mask, max_sequence_length,
            )
            n = embeds.shape[0]
            cond = {"encoder_hidden_states": embeds, "encoder_attention_mask": mask}
            uncond = {"encoder_hidden_states": neg_embeds, "encoder_attention_mask": neg_mask} if use_cfg else None
        else:
            if prompt is not None or prompt_embeds is not None or negative_prompt is not None:
                raise ValueError(
                    "This transformer has no text conditioning (caption_channels=None): pass class_labels "
                    "(class-conditional) or nothing (unconditional) instead of prompts."
                )
            n, cond, uncond = self._class_conditioning(class_labels, num_images_per_prompt, guidance_scale, batch_size)
        latents = self._denoise(n, cond, uncond, guidance_scale, num_inference_steps, generator, latents)
        return self._decode(latents, output_type, return_dict)
