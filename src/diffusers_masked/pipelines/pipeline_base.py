"""The sampling loop shared by every pipeline of this package.

One loop serves DDPM-family and EDM schedulers: ``x = scheduler.scale_model_input(latents, t)``, ``out =
transformer(x, t, ...)``, ``latents = scheduler.step(out, t, latents)``. For EDM schedulers ``t`` is already
``c_noise = ln(sigma) / 4`` and the scheduler applies the EDM input / output preconditioning itself.
"""

from __future__ import annotations

import inspect
import logging
import math
import numbers
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple, Union

import numpy as np
import torch
from diffusers import DDPMScheduler, DiffusionPipeline
from diffusers.image_processor import VaeImageProcessor
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor

from ..utils.schedulers import describe_training_objective, normalize_training_objective, training_objective_mismatch

logger = logging.getLogger(__name__)

LEARNED_VARIANCE_TYPES = ("learned", "learned_range")
OUTPUT_TYPES = ("pil", "np", "pt", "latent")


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


@torch.no_grad()
def encode_texts(
    text_encoder, tokenizer, texts: List[str], max_sequence_length: int = 77, device: Optional[torch.device] = None
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Caption tokens of ``texts``: the text encoder's last hidden state (B, L, width) and the attention mask (B, L),
    padded to the longest text (at most ``max_sequence_length`` tokens; longer texts are truncated with a warning).
    Used by the pipelines and by the training recipes, which cache the embeddings of their captions."""
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


class MaskedTransformerPipelineBase(DiffusionPipeline):
    """Base class: class-label and prompt handling, the denoising loop with classifier-free guidance, and decoding.

    Text-conditioned transformers (``caption_channels`` set) take prompts, encoded by the pipeline's optional
    ``text_encoder`` + ``tokenizer`` (`encode_prompt`), or precomputed ``prompt_embeds``; class-conditional ones take
    class labels. The unconditional input of classifier-free guidance is the null class, or for text the all-zero
    caption embedding (MicroDiT's, what the trainers' caption dropout feeds) unless a negative prompt is given.
    """

    model_cpu_offload_seq = "transformer->vae"

    def _setup_components(self, id2label: Optional[Dict[Union[int, str], str]],
                          training_objective: Union[None, str, Mapping[str, Any]]) -> None:
        """What every pipeline's ``__init__`` does after ``register_modules``: class names and training objective."""
        self._setup_labels(id2label)
        self._setup_training_objective(training_objective)

    def _setup_labels(self, id2label: Optional[Dict[Union[int, str], str]]) -> None:
        # JSON turns int keys into strings; normalise to {int: str}.
        id2label = {int(k): str(v) for k, v in id2label.items()} if id2label else None
        self.register_to_config(id2label=id2label)
        self.labels: Dict[str, int] = {}
        for key, value in (id2label or {}).items():
            for name in str(value).split(","):
                self.labels[name.strip()] = int(key)
        self.image_processor = VaeImageProcessor(do_normalize=True)

    @property
    def id2label(self) -> Optional[Dict[int, str]]:
        return self.config.id2label if getattr(self.config, "id2label", None) else None

    def get_label_ids(self, label: Union[str, List[str]]) -> List[int]:
        """Class names -> class ids, through the pipeline's ``id2label``."""
        names = [label] if isinstance(label, str) else list(label)
        if not self.labels:
            raise ValueError("This pipeline has no id2label mapping: pass class ids instead of names.")
        missing = [n for n in names if n not in self.labels]
        if missing:
            raise ValueError(f"Unknown class name(s) {missing}; known names: {sorted(self.labels)}.")
        return [self.labels[n] for n in names]

    @staticmethod
    def _flat_labels(class_labels: Any) -> List[Any]:
        # Nested lists ([[1], [1]], what batching DiT-style inputs gives) flatten like DiTPipeline's reshape(-1).
        if isinstance(class_labels, torch.Tensor):
            return class_labels.detach().cpu().flatten().tolist()
        if isinstance(class_labels, np.ndarray):
            return class_labels.ravel().tolist()
        if isinstance(class_labels, (list, tuple)):
            flat: List[Any] = []
            for item in class_labels:
                flat.extend(MaskedTransformerPipelineBase._flat_labels(item) if isinstance(
                    item, (list, tuple, torch.Tensor, np.ndarray)) else [item])
            return flat
        return [class_labels]

    def _class_ids(self, class_labels: Any, num_images_per_prompt: int, device: torch.device) -> torch.Tensor:
        num_classes = self.transformer.config.num_classes
        if class_labels is None:
            raise ValueError(
                f"This model is class-conditional ({num_classes} classes): pass class_labels as ids or names, "
                "e.g. class_labels=[0, 1, 2] or class_labels=['Sneaker']."
            )
        items = self._flat_labels(class_labels)
        if not items:
            raise ValueError("class_labels is empty: pass at least one class id or name, e.g. class_labels=[0].")
        ids = []
        for v in items:
            if isinstance(v, str):
                ids.append(self.get_label_ids(v)[0])
            elif _is_int(v):
                ids.append(int(v))
            elif isinstance(v, numbers.Real) and not isinstance(v, bool) and float(v).is_integer():
                ids.append(int(v))
            else:
                raise ValueError(
                    f"class_labels must be integer class ids or class names, got {v!r} in {class_labels!r} "
                    "(a fractional id would be truncated silently)."
                )
        bad = [i for i in ids if not 0 <= i < num_classes]
        if bad:
            raise ValueError(f"class id(s) {bad} out of range: this model has classes 0..{num_classes - 1}.")
        ids_t = torch.tensor(ids, device=device, dtype=torch.long)
        return ids_t.repeat_interleave(num_images_per_prompt)

    def _class_conditioning(
        self, class_labels: Any, num_images_per_prompt: int, guidance_scale: float, batch_size: int
    ) -> tuple:
        """(number of images, conditional kwargs, unconditional kwargs or None) for class-conditional or
        unconditional transformers; the unconditional branch uses the null class id ``num_classes``."""
        null_id = self.transformer.config.num_classes
        if null_id is None:
            return batch_size * num_images_per_prompt, {}, None
        ids = self._class_ids(class_labels, num_images_per_prompt, self._execution_device)
        uncond = {"class_labels": torch.full_like(ids, null_id)} if guidance_scale > 1 else None
        return ids.shape[0], {"class_labels": ids}, uncond

    # ---- prompts ------------------------------------------------------------------------------------------------
    def _encode_texts(self, texts: List[str], max_sequence_length: int, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
        text_encoder, tokenizer = getattr(self, "text_encoder", None), getattr(self, "tokenizer", None)
        if text_encoder is None or tokenizer is None:
            raise ValueError(
                "This pipeline has no text_encoder / tokenizer: pass prompt_embeds instead of prompt, or build it "
                "with text_encoder and tokenizer (e.g. diffusers_masked.utils.load_default_text_encoder())."
            )
        return encode_texts(text_encoder, tokenizer, texts, max_sequence_length, device)

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
        if getattr(self, "transformer", None) is not None:
            return self.transformer.config.get("caption_channels"), "caption_channels of the transformer"
        if getattr(self, "text_encoder", None) is not None:
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
        r"""Encode prompts into caption tokens for a text-conditioned transformer.

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
            The embeddings have the text encoder's dtype (the transformer's without a text encoder). Without a
            negative prompt the unconditional caption is all-zero text-encoder features (MicroDiT's, as the
            trainers' caption dropout feeds them).
        """
        device = device or self._execution_device
        if getattr(self, "text_encoder", None) is not None:
            dtype = self.text_encoder.dtype
        elif getattr(self, "transformer", None) is not None:
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

    def _conditioning(self, class_labels: Any, num_images_per_prompt: int, guidance_scale: float, batch_size: int,
                      prompt=None, negative_prompt=None, prompt_embeds=None, prompt_attention_mask=None,
                      negative_prompt_embeds=None, negative_prompt_attention_mask=None,
                      max_sequence_length: int = 77) -> tuple:
        """(number of images, conditional kwargs, unconditional kwargs or None) for the transformer at hand: caption
        tokens for a text-conditioned one (`encode_prompt`, whose arguments the text inputs are), class ids or nothing
        otherwise (`_class_conditioning`); the other kind of input is refused with the fix."""
        texts = dict(prompt=prompt, negative_prompt=negative_prompt, prompt_embeds=prompt_embeds,
                     negative_prompt_embeds=negative_prompt_embeds)
        if self.transformer.config.get("caption_channels") is None:
            given = [name for name, value in texts.items() if value is not None]
            if given:
                kind = "class-conditional" if self.transformer.config.num_classes is not None else "unconditional"
                raise ValueError(
                    f"This transformer is {kind} with no text conditioning (caption_channels=None), so it takes no "
                    f"{', '.join(given)}: pass class_labels (class-conditional) or nothing (unconditional) instead of "
                    "prompts."
                )
            return self._class_conditioning(class_labels, num_images_per_prompt, guidance_scale, batch_size)
        if class_labels is not None:
            raise ValueError("This transformer is text-conditioned: pass prompt (or prompt_embeds), not class_labels.")
        use_cfg = guidance_scale > 1
        embeds, mask, neg_embeds, neg_mask = self.encode_prompt(
            prompt, self._execution_device, num_images_per_prompt, use_cfg, negative_prompt, prompt_embeds,
            negative_prompt_embeds, prompt_attention_mask, negative_prompt_attention_mask, max_sequence_length,
        )
        cond = {"encoder_hidden_states": embeds, "encoder_attention_mask": mask}
        uncond = {"encoder_hidden_states": neg_embeds, "encoder_attention_mask": neg_mask} if use_cfg else None
        return embeds.shape[0], cond, uncond

    @property
    def _sample_shape(self) -> tuple:
        cfg = self.transformer.config
        return (cfg.in_channels, cfg.sample_size, cfg.sample_size)

    # ---- components and inputs -------------------------------------------------------------------------------
    def _setup_training_objective(self, training_objective: Union[None, str, Mapping[str, Any]]) -> None:
        """Record what the model was trained to predict (in model_index.json, so it survives save / load); when not
        given, the objective that the pipeline's scheduler implies is assumed."""
        record = normalize_training_objective(training_objective)
        if record is None:
            record = describe_training_objective(getattr(self, "scheduler", None))
        self.register_to_config(training_objective=record)

    @property
    def training_objective(self) -> Optional[Dict[str, Any]]:
        """What the transformer was trained to predict (see `diffusers_masked.utils.describe_training_objective`),
        `None` when unknown."""
        return getattr(self.config, "training_objective", None) or None

    def record_training_objective(self, training_objective: Union[None, str, Mapping[str, Any], Any]) -> None:
        """Set the recorded training objective from a name, a dict or the scheduler the model was trained with."""
        if "training_objective" not in inspect.signature(type(self).__init__).parameters:
            return  # from_pretrained could not pass it back, and would warn about an unexpected config key
        if training_objective is not None and not isinstance(training_objective, (str, Mapping)):
            training_objective = describe_training_objective(training_objective)
        self._setup_training_objective(training_objective)

    def _require_components(self) -> None:
        if getattr(self, "transformer", None) is None:
            raise ValueError(
                f"This {type(self).__name__} has no transformer (it was built or loaded with transformer=None), so "
                "it can only encode prompts; load it with its transformer to sample."
            )
        if getattr(self, "scheduler", None) is None:
            objective = self.training_objective or {}
            if objective.get("objective") == "edm":
                hint = f"EDMEulerScheduler(sigma_data={objective.get('sigma_data')})"
            elif objective:
                hint = f"DDPMScheduler(prediction_type={objective.get('objective')!r})"
            else:
                hint = "the scheduler the model was trained with, e.g. EDMEulerScheduler()"
            raise ValueError(
                f"This {type(self).__name__} has no scheduler (scheduler=None): set one before sampling, e.g. "
                f"pipe.scheduler = {hint}, or pass scheduler=... to from_pretrained."
            )

    def check_inputs(
        self,
        output_type: str = "pil",
        num_inference_steps: int = 1,
        guidance_scale: float = 1.0,
        num_images_per_prompt: int = 1,
        latents: Optional[torch.Tensor] = None,
    ) -> None:
        """Validate the arguments shared by every pipeline before anything runs (a `ValueError` naming the fix)."""
        self._require_components()
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}.")
        if not _is_int(num_inference_steps) or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be an integer >= 1, got {num_inference_steps!r}.")
        if not _is_int(num_images_per_prompt) or num_images_per_prompt < 1:
            raise ValueError(f"num_images_per_prompt must be an integer >= 1, got {num_images_per_prompt!r}.")
        if (isinstance(guidance_scale, bool) or not isinstance(guidance_scale, numbers.Real)
                or not math.isfinite(guidance_scale)):
            raise ValueError(
                f"guidance_scale must be a finite number (<= 1 disables guidance), got {guidance_scale!r}."
            )
        if latents is not None:
            if not isinstance(latents, torch.Tensor) or not latents.is_floating_point():
                kind = latents.dtype if isinstance(latents, torch.Tensor) else type(latents).__name__
                raise ValueError(f"latents must be a floating-point torch.Tensor, got {kind}.")
            if not bool(torch.isfinite(latents).all()):
                raise ValueError("latents contain NaN or infinite values; pass finite unit-variance noise.")
            if latents.dtype == torch.float64 and self.transformer.dtype != torch.float64:
                logger.warning(
                    "latents are float64 but the transformer is %s: they are cast to it, so sampling does not run in "
                    "double precision. Pass latents in the transformer's dtype, or pipe.to(dtype=torch.float64).",
                    self.transformer.dtype,
                )

    def guidance_scale_at(self, guidance_scale: float, step_index: int, timestep: torch.Tensor) -> float:
        """Classifier-free guidance scale used at one step; constant here, schedules override it."""
        return guidance_scale

    def _passes_variance(self) -> bool:
        # Only DDPM's step splits a learned variance off the output by the sample's channel count; other
        # schedulers get the noise prediction alone.
        variance_type = getattr(self.scheduler.config, "variance_type", None)
        return isinstance(self.scheduler, DDPMScheduler) and variance_type in LEARNED_VARIANCE_TYPES

    def _denoise(
        self,
        batch_size: int,
        cond_kwargs: Dict[str, Any],
        uncond_kwargs: Optional[Dict[str, Any]],
        guidance_scale: float,
        num_inference_steps: int,
        generator: Optional[Union[torch.Generator, List[torch.Generator]]],
        latents: Optional[torch.Tensor],
        callback: Optional[Callable[[int, torch.Tensor, torch.Tensor], None]] = None,
        guidance_channels: Optional[int] = None,
    ) -> torch.Tensor:
        self._require_components()
        if not _is_int(num_inference_steps) or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be an integer >= 1, got {num_inference_steps!r}.")
        if isinstance(generator, list) and len(generator) != batch_size:
            raise ValueError(
                f"Got a list of {len(generator)} generators for {batch_size} images; pass one generator per image "
                "(number of labels / prompts x num_images_per_prompt) or a single generator."
            )
        mismatch = training_objective_mismatch(self.training_objective, self.scheduler)
        if mismatch:
            logger.warning("%s: %s", type(self).__name__, mismatch)
        device = self._execution_device
        dtype = self.transformer.dtype
        shape = (batch_size, *self._sample_shape)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents must have shape {shape}, got {tuple(latents.shape)}.")
        latents = latents.to(device=device, dtype=dtype)

        if not self._passes_variance() and getattr(self.scheduler.config, "variance_type", None) in LEARNED_VARIANCE_TYPES:
            # A scheduler swapped in from a learned-variance DDPM config (`DPMSolverMultistepScheduler.from_config`)
            # inherits variance_type, and DPM-Solver then keeps only channels [:3] of the output (sized for RGB
            # pixels): wrong for 4-channel latents. This loop hands it the noise prediction alone, so drop it.
            self.scheduler.register_to_config(variance_type=None)
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        timesteps = self.scheduler.timesteps
        if timesteps.is_floating_point() and not bool(torch.isfinite(timesteps).all()):
            raise ValueError(
                f"{type(self.scheduler).__name__} produced non-finite timesteps {timesteps.tolist()}; check its config "
                "(e.g. an EDM scheduler needs sigma_min > 0, since its timesteps are ln(sigma) / 4)."
            )
        self._num_timesteps = len(timesteps)
        latents = latents * self.scheduler.init_noise_sigma
        use_cfg = uncond_kwargs is not None
        if use_cfg:
            model_kwargs = {k: torch.cat([cond_kwargs[k], uncond_kwargs[k]]) if isinstance(cond_kwargs[k], torch.Tensor) else cond_kwargs[k] for k in cond_kwargs}
        else:
            model_kwargs = cond_kwargs
        # Conditioning embeddings (e.g. a float32 text encoder's) follow the transformer's dtype.
        model_kwargs = {
            k: v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in model_kwargs.items()
        }
        channels = latents.shape[1]

        for i, t in enumerate(self.progress_bar(timesteps)):
            model_input = torch.cat([latents, latents]) if use_cfg else latents
            model_input = self.scheduler.scale_model_input(model_input, t)
            t_batch = t.reshape(1).expand(model_input.shape[0]).to(device)
            out = self.transformer(model_input, t_batch, **model_kwargs).sample
            eps, rest = out[:, :channels], out[:, channels:]
            if use_cfg:
                eps_cond, eps_uncond = eps.chunk(2)
                w = self.guidance_scale_at(guidance_scale, i, t)
                guided = eps_uncond + w * (eps_cond - eps_uncond)
                if guidance_channels is not None:
                    # Guide only the first channels and keep the rest conditional (the official DiT / MDT CFG code).
                    guided = torch.cat([guided[:, :guidance_channels], eps_cond[:, guidance_channels:]], dim=1)
                eps = guided
                rest = rest.chunk(2)[0]
            if self._passes_variance():
                if rest.shape[1] != channels:
                    raise ValueError(
                        f"The scheduler expects a learned variance (variance_type="
                        f"{self.scheduler.config.variance_type!r}) but the transformer predicts none; use "
                        "variance_type='fixed_small' or a model trained with learned sigma."
                    )
                model_output = torch.cat([eps, rest], dim=1)
            else:
                model_output = eps
            latents = self.scheduler.step(model_output, t, latents, generator=generator).prev_sample
            if callback is not None:
                callback(i, t, latents)
        return latents

    def _decode(self, latents: torch.Tensor, output_type: str, return_dict: bool):
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}.")
        if output_type == "latent":
            images = latents
        else:
            if self.vae is not None:
                scaling = getattr(self.vae.config, "scaling_factor", 1.0)
                shift = getattr(self.vae.config, "shift_factor", None) or 0.0
                latents = latents.to(self.vae.dtype) / scaling + shift
                images = self.vae.decode(latents).sample
            else:
                images = latents
            images = self.image_processor.postprocess(images.float().clamp(-1, 1), output_type=output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)
