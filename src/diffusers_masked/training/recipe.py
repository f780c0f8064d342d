"""What the shared trainer needs to know about one model family (a "recipe").

The trainer owns everything common: data, accelerate, optimizer, EMA, checkpoints, validation, saving and pushing.
A recipe adds the model-specific parts through a narrow interface: its flags and their config dataclass, the model,
the objective, the loss of one step, the pipeline and the model-card fields. Every method gets the typed config
(``ctx.config``, the recipe's own part in ``ctx.config.recipe``) and a `TrainContext`; none gets the trainer.
Subclass `TrainingRecipe` and pass an instance to `diffusers_masked.training.main`.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple, Type

import torch

from ..models.masking import random_ids_keep
from .config import RecipeConfig, TrainConfig
from .context import LossOutput, TrainContext, unwrap_model
from .objectives import Objective, build_objective

#: ``error(message)``: exits with a usage error (``parser.error``); the message names the flag, value and fix.
UsageError = Callable[[str], None]


def draw_ids_keep(
    model: torch.nn.Module, batch_size: int, mask_ratio: float, device: torch.device,
    generator: Optional[torch.Generator],
) -> Optional[torch.Tensor]:
    """Kept-token ids (B, K) of a fresh random mask for ``model``, or None when ``mask_ratio`` is 0.

    The losses draw the mask here and hand the model ``ids_keep``: a ``torch.Generator`` argument cannot be traced
    by dynamo, so a model drawing its own mask would break the compiled training graph. The draw consumes the
    generator exactly as the model's own draw does."""
    if mask_ratio == 0:
        return None
    return random_ids_keep(batch_size, unwrap_model(model).num_tokens, mask_ratio, device=device, generator=generator)


def draw_route_ids(
    batch_size: int, num_tokens: int, ids_keep: Optional[torch.Tensor], route_ratio: float, device: torch.device,
    generator: Optional[torch.Generator],
) -> Optional[torch.Tensor]:
    """Ids (B, K') of the tokens that go through the routed span, among the K tokens the routed stack sees (the
    kept ones of ``ids_keep``, else all ``num_tokens``); None when ``route_ratio`` is 0. Drawn here and passed as
    ``route_ids`` for the reason `draw_ids_keep` gives."""
    if route_ratio == 0:
        return None
    k = ids_keep.shape[1] if ids_keep is not None else num_tokens
    return random_ids_keep(batch_size, k, route_ratio, device=device, generator=generator)


# ---- TREAD routing as a knob of the masked recipes (MaskDiT, MDTv2, DeferredMaskDiT) -------------------------------
@dataclass(frozen=True)
class RouteConfig(RecipeConfig):
    """``--route_ratio`` / ``--route_start`` / ``--route_end`` of a masked recipe (routing off by default)."""

    route_ratio: float = 0.0
    route_start: Optional[int] = None
    route_end: Optional[int] = None


@dataclass(frozen=True)
class EDMConfig(RecipeConfig):
    """``--edm_sigma_data`` / ``--edm_p_mean`` / ``--edm_p_std`` of the EDM objective."""

    edm_sigma_data: float = 0.5
    edm_p_mean: float = -1.2
    edm_p_std: float = 1.2


def add_edm_arguments(parser: argparse.ArgumentParser, defaults: EDMConfig) -> None:
    parser.add_argument("--edm_sigma_data", type=float, default=defaults.edm_sigma_data)
    parser.add_argument("--edm_p_mean", type=float, default=defaults.edm_p_mean)
    parser.add_argument("--edm_p_std", type=float, default=defaults.edm_p_std)


def edm_objective(ctx: TrainContext) -> Objective:
    """The objective named by --objective, with the recipe's EDM constants (ignored by the DDPM objectives)."""
    c = ctx.config.recipe
    return build_objective(ctx.config.model.objective, sigma_data=c.edm_sigma_data, p_mean=c.edm_p_mean,
                           p_std=c.edm_p_std)


def add_route_arguments(parser: argparse.ArgumentParser, where: str) -> None:
    """``--route_ratio`` (0 = off) / ``--route_start`` / ``--route_end`` for a model that routes inside ``where``."""
    parser.add_argument("--route_ratio", type=float, default=0.0,
                        help=f"TREAD token routing inside the {where} in training: share of the tokens it sees that "
                             "skip blocks --route_start..--route_end, in [0, 1); 0 = off (the TREAD paper trains with "
                             "0.5). Off during --unmasked_finetune_steps; sampling never routes.")
    parser.add_argument("--route_start", type=int, default=None,
                        help=f"First {where} block the routed tokens skip (unset: the model config's, else 2 as the "
                             "paper); negative counts from the end.")
    parser.add_argument("--route_end", type=int, default=None,
                        help=f"Last {where} block the routed tokens skip, inclusive (unset: the model config's, else "
                             f"the {where}'s blocks - 4 as the paper); negative counts from the end.")


def check_route_config(config: RouteConfig, error: UsageError) -> None:
    """Usage errors for the routing flags (the span itself is checked by the model, which knows its depth)."""
    r = config.route_ratio
    if not 0 <= r < 1:
        error(f"--route_ratio {r:g}: the share of routed tokens must be in [0, 1) (0 = off; the TREAD paper: 0.5).")
    if r == 0 and (config.route_start is not None or config.route_end is not None):
        error("--route_start / --route_end set a routing span, but --route_ratio is 0 (routing off): add e.g. "
              "--route_ratio 0.5, or drop the span flags.")


def route_overrides(config: RouteConfig) -> Dict[str, Any]:
    """Model config keys of the routing span flags (only those given, so a loaded config keeps its own)."""
    return {k: getattr(config, k) for k in ("route_start", "route_end") if getattr(config, k) is not None}


def route_ratio_at(ctx: TrainContext) -> float:
    """Route ratio of the current step: ``--route_ratio``, but 0 in the final --unmasked_finetune_steps."""
    return 0.0 if ctx.finetuning else float(ctx.config.recipe.route_ratio)


class TrainingRecipe:
    """Base recipe for class-conditional masked transformers.

    Class attributes a subclass sets:
        name: Short name ("maskdit"), used in logs and the default output folder.
        model_cls / pipeline_cls: The `ModelMixin` transformer and its pipeline.
        config_cls: The recipe's config dataclass (`RecipeConfig` subclass), one field per flag of `add_arguments`.
        model_card: File name of the card template in ``model_cards/``.
        default_objective: ``"edm"``, ``"epsilon"`` or ``"v_prediction"``.
        default_mask_ratio: Mask ratio used when ``--mask_ratio`` is not given.
        default_unmasked_finetune_fraction: Share of the steps trained without masking at the end by default.
        demo_model_config: Config of the small model trained by the no-argument CPU run on Fashion-MNIST.
        demo_defaults: Flag defaults of that run (steps, batch size, learning rate, ...).
        mask_ratio_help: Help of --mask_ratio for a recipe whose unset --mask_ratio means something other than
            ``default_mask_ratio`` (the flag then defaults to None); None = "the ratio, default default_mask_ratio".
        supports_text: Whether the model takes captions (``caption_channels``): the recipe gets the text flags
            (--conditioning, --caption_column, --text_encoder_path, ...) and, with --conditioning text, a text model
            trained on captioned data (`ctx.text`); the base class does the rest (model, step, pipeline, grids).
        default_conditioning: --conditioning's default ("class" or "text").
        class_name_captions: Whether --caption_source class_names (captions made from class names) is offered.
    """

    name = "base"
    model_cls: Any = None
    pipeline_cls: Any = None
    config_cls: Type[RecipeConfig] = RecipeConfig
    model_card = "maskdit.md"
    default_objective = "edm"
    default_mask_ratio = 0.5
    default_unmasked_finetune_fraction = 0.0
    demo_model_config: Dict[str, Any] = {}
    demo_defaults: Dict[str, Any] = {}
    mask_ratio_help: Optional[str] = None
    supports_text = False
    default_conditioning = "class"
    class_name_captions = False

    # ---- flags -------------------------------------------------------------------------------------------------
    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        """Model-specific flags; their destinations are the fields of ``config_cls``."""

    def check_config(self, config: TrainConfig, error: UsageError) -> None:
        """Usage errors of the recipe's flags, raised through ``error`` before anything loads."""

    # ---- construction ------------------------------------------------------------------------------------------
    def setup(self, ctx: TrainContext) -> None:
        """Called once after the data is known (``ctx.data``) and before the model is built (e.g. to load a text
        encoder)."""

    def build_objective(self, ctx: TrainContext) -> Objective:
        return build_objective(ctx.config.model.objective)

    def build_model(self, ctx: TrainContext) -> torch.nn.Module:
        """The randomly initialised model named by ``--model_config`` (a preset such as "S/2" or a config.json
        path), or the recipe's small demo model; size and channels always follow the data. On captioned data the
        model is text-conditioned (no classes, ``caption_channels`` = the encoder's width)."""
        return self.model_from_config(ctx, None if ctx.text is not None else ctx.data.num_classes)

    def model_from_config(self, ctx: TrainContext, num_classes: Optional[int]) -> torch.nn.Module:
        data_keys = dict(sample_size=ctx.data.sample_size, in_channels=ctx.data.channels, num_classes=num_classes)
        spec = ctx.config.model.model_config
        from_file = spec is not None and os.path.isfile(spec)
        if spec is None:
            config = dict(self.demo_model_config)
        elif from_file:
            with open(spec) as f:
                config = {k: v for k, v in json.load(f).items() if not k.startswith("_")}
        else:
            config = self.model_cls.preset_config(spec)
        for key, value in data_keys.items():
            if from_file and key in config and config[key] != value:
                raise ValueError(
                    f"--model_config {spec} has {key}={config[key]} but the training data needs {key}={value}."
                )
        config.update(data_keys)
        if ctx.text is not None:
            config["caption_channels"] = ctx.text.width
        config.update(self.model_overrides(ctx))
        return self.model_cls(**config)

    def model_overrides(self, ctx: TrainContext) -> Dict[str, Any]:
        """Config keys set from flags (e.g. learn_sigma)."""
        return {}

    def build_optimizer(self, params: List[torch.nn.Parameter], ctx: TrainContext) -> Optional[torch.optim.Optimizer]:
        """The recipe's own optimizer (e.g. MDTv2's Adan), or None for the trainer's AdamW of the --adam_* flags."""
        return None

    def build_pipeline(self, transformer, scheduler, vae, ctx: TrainContext):
        return self.pipeline_cls(transformer=transformer, scheduler=scheduler, vae=vae, id2label=ctx.id2label,
                                 **text_components(ctx))

    # ---- training step -----------------------------------------------------------------------------------------
    def mask_ratio(self, ctx: TrainContext) -> float:
        """Mask ratio of the current step (0 during the final unmasked fine-tuning stage)."""
        if ctx.finetuning:
            return 0.0
        ratio = ctx.config.model.mask_ratio
        return self.default_mask_ratio if ratio is None else ratio

    def conditioning_kwargs(self, batch: Dict[str, torch.Tensor], ctx: TrainContext) -> Dict[str, torch.Tensor]:
        """Model keyword arguments for the batch: class labels with classifier-free-guidance dropout, or the
        caption embeddings of captioned data (`caption_conditioning`)."""
        if "encoder_hidden_states" in batch:
            return caption_conditioning(batch, ctx)
        config = ctx.model.config
        if config.num_classes is None:
            return {}
        labels = batch["class_labels"]
        p = dropout_prob(ctx)
        if p > 0:
            drop = drop_mask(labels, p, ctx.generator)
            labels = torch.where(drop, torch.full_like(labels, config.num_classes), labels)
        return {"class_labels": labels}

    def compute_loss(self, model: torch.nn.Module, batch: Dict[str, torch.Tensor], ctx: TrainContext) -> LossOutput:
        """The loss of one step.

        Args:
            model: The module to call for the forward pass (may be DDP- or compile-wrapped; read attributes from
                ``ctx.model``).
            batch: ``x0`` (B, C, H, W): clean samples (pixels in [-1, 1] or scaled VAE latents), plus the loader's
                other fields on the device (``class_labels``; captions or embeddings for text data).
            ctx: The run; ``ctx.generator`` for every random draw, ``ctx.step`` for schedules.
        """
        raise NotImplementedError

    # ---- validation, card --------------------------------------------------------------------------------------
    def validation_images(self, pipeline, ctx: TrainContext, generator: torch.Generator) -> Tuple[List[Any], int]:
        """Images for the validation grid and the number of columns: ``--validation_images_per_class`` per class (or
        per prompt of `validation_prompts`, one row each)."""
        v = ctx.config.validation
        per_class = v.validation_images_per_class
        prompts = self.validation_prompts(ctx)
        if prompts:
            out = pipeline(prompt=prompts, num_images_per_prompt=per_class, guidance_scale=v.validation_guidance_scale,
                           num_inference_steps=v.validation_inference_steps,
                           max_sequence_length=ctx.config.text.max_sequence_length, generator=generator)
            return out.images, per_class
        num_classes = pipeline.transformer.config.num_classes
        if num_classes is None:
            out = pipeline(batch_size=8 * per_class, num_inference_steps=v.validation_inference_steps,
                           generator=generator)
            return out.images, 8
        out = pipeline(class_labels=list(range(num_classes)), num_images_per_prompt=per_class,
                       guidance_scale=v.validation_guidance_scale, num_inference_steps=v.validation_inference_steps,
                       generator=generator)
        return out.images, per_class

    def validation_prompts(self, ctx: TrainContext) -> Optional[List[str]]:
        """Prompts of the validation grid (one row each; saved as ``prompts.txt`` next to it), None for a class or
        unconditional grid."""
        return list(ctx.text.validation_prompts) if ctx.text is not None else None

    def eval_kwargs(self, ctx: TrainContext) -> Dict[str, Any]:
        """Extra arguments of `evaluate_pipeline` / `evaluate_scenes`: the prompts of a text-to-image model."""
        if ctx.text is None:
            return {}
        return {"prompts": list(ctx.text.eval_prompts), "max_sequence_length": ctx.config.text.max_sequence_length}

    def card_fields(self, ctx: TrainContext) -> Dict[str, Any]:
        """Extra fields for the model card template."""
        return {}


def dropout_prob(ctx: TrainContext) -> float:
    """Classifier-free-guidance dropout: --class_dropout_prob, else the model config's."""
    p = ctx.config.model.class_dropout_prob
    return ctx.model.config.class_dropout_prob if p is None else p


def caption_dropout_prob(ctx: TrainContext) -> float:
    """Caption dropout for classifier-free guidance: --caption_dropout_prob, else as `dropout_prob` (so
    --class_dropout_prob keeps working for DeferredMaskDiT's captions, as before the text flags were shared)."""
    p = ctx.config.text.caption_dropout_prob
    return dropout_prob(ctx) if p is None else p


def caption_conditioning(batch: Dict[str, torch.Tensor], ctx: TrainContext) -> Dict[str, torch.Tensor]:
    """``encoder_hidden_states`` / ``encoder_attention_mask`` of the batch, each caption replaced by the
    unconditional one (all-zero states, all-ones mask: what the pipelines feed as the negative) with probability
    `caption_dropout_prob`, drawn from the run's generator like label dropout."""
    from ..data.text_cache import apply_caption_dropout

    embeds, mask = batch["encoder_hidden_states"], batch["encoder_attention_mask"]
    p = caption_dropout_prob(ctx)
    if p > 0:
        embeds, mask = apply_caption_dropout(embeds, mask, drop_mask(embeds[:, 0, 0], p, ctx.generator))
    return {"encoder_hidden_states": embeds, "encoder_attention_mask": mask}


def text_components(ctx: TrainContext) -> Dict[str, Any]:
    """The pipeline's ``text_encoder`` / ``tokenizer`` for a text model trained on captions, else nothing."""
    if ctx.text is None:
        return {}
    return {"text_encoder": ctx.text.text_encoder, "tokenizer": ctx.text.tokenizer}


def drop_mask(like: torch.Tensor, p: float, generator: Optional[torch.Generator]) -> torch.Tensor:
    # Drawn on the generator's device so a seeded generator gives the same draws wherever the batch lives.
    device = generator.device if generator is not None else like.device
    return torch.rand(like.shape, generator=generator, device=device).to(like.device) < p
