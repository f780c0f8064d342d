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
from typing import Any, Callable, Dict, List, Mapping, Optional, Union

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


class MaskedTransformerPipelineBase(DiffusionPipeline):
    """Base class: class-label handling, the denoising loop with classifier-free guidance, and decoding."""

    model_cpu_offload_seq = "transformer->vae"

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
