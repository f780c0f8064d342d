"""The sampling loop shared by every pipeline of this package.

One loop serves DDPM-family and EDM schedulers: ``x = scheduler.scale_model_input(latents, t)``, ``out =
transformer(x, t, ...)``, ``latents = scheduler.step(out, t, latents)``. For EDM schedulers ``t`` is already
``c_noise = ln(sigma) / 4`` and the scheduler applies the EDM input / output preconditioning itself.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Union

import torch
from diffusers import DDPMScheduler, DiffusionPipeline
from diffusers.image_processor import VaeImageProcessor
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor

LEARNED_VARIANCE_TYPES = ("learned", "learned_range")


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

    def _class_ids(self, class_labels: Any, num_images_per_prompt: int, device: torch.device) -> torch.Tensor:
        num_classes = self.transformer.config.num_classes
        if class_labels is None:
            raise ValueError(
                f"This model is class-conditional ({num_classes} classes): pass class_labels as ids or names, "
                "e.g. class_labels=[0, 1, 2] or class_labels=['Sneaker']."
            )
        if isinstance(class_labels, torch.Tensor):
            ids = [int(v) for v in class_labels.flatten().tolist()]
        else:
            items = [class_labels] if isinstance(class_labels, (int, str)) else list(class_labels)
            ids = [self.get_label_ids(v)[0] if isinstance(v, str) else int(v) for v in items]
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
        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}.")
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
        latents = latents * self.scheduler.init_noise_sigma
        use_cfg = uncond_kwargs is not None
        if use_cfg:
            model_kwargs = {k: torch.cat([cond_kwargs[k], uncond_kwargs[k]]) if isinstance(cond_kwargs[k], torch.Tensor) else cond_kwargs[k] for k in cond_kwargs}
        else:
            model_kwargs = cond_kwargs
        channels = latents.shape[1]

        for i, t in enumerate(self.progress_bar(self.scheduler.timesteps)):
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
        if output_type not in ("pil", "np", "pt", "latent"):
            raise ValueError(f"output_type must be 'pil', 'np', 'pt' or 'latent', got {output_type!r}.")
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
