"""DeferredMaskDiT (MicroDiT) training: EDM loss on the kept tokens only, nothing else.

As "Stretching Each Dollar": EDM with ``sigma_data = 0.9``, ``P_mean = -0.6``, ``P_std = 1.2``; 75% of the tokens
masked after the patch-mixer; the loss is the EDM-weighted squared error averaged per patch and then over the kept
patches only (masked patches are never predicted); no auxiliary loss (no MAE term, no MoE balancing loss).

Text conditioning (default): on the data's captions (``--caption_column``; by default the embedded Fashion-MNIST
scenes), cached as embeddings by the trainer (`training.text`), exactly as MaskDiT and MDTv2 with ``--conditioning
text``. ``--caption_source class_names`` keeps the older mode: every labelled image gets a caption made from its class
name ("a photo of an ankle boot", a class label in disguise), encoded once by the text encoder. Either way captions
are replaced by all-zero embeddings with probability ``--caption_dropout_prob`` (default ``--class_dropout_prob``,
else the config's; MicroDiT's unconditional caption) for classifier-free guidance. ``--conditioning class`` trains
the same model class-conditionally instead.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from ..models.transformer_deferred_maskdit import DeferredMaskDiTTransformer2DModel
from ..pipelines.pipeline_deferred_maskdit import DeferredMaskDiTPipeline, encode_texts
from .config import TrainConfig
from .context import LogValue, LossOutput, TrainContext
from .objectives import Objective, masked_mean, per_token
from .recipe import (
    EDMConfig,
    RouteConfig,
    TrainingRecipe,
    UsageError,
    drop_mask,
    add_edm_arguments,
    add_route_arguments,
    check_route_config,
    draw_ids_keep,
    draw_route_ids,
    caption_dropout_prob,
    edm_objective,
    route_overrides,
    route_ratio_at,
)

#: MicroDiT's EDM constants (256 px phase).
MICRODIT_SIGMA_DATA = 0.9
MICRODIT_P_MEAN = -0.6
MICRODIT_P_STD = 1.2


def caption_for_class(name: str, template: str = "a photo of {article} {name}") -> str:
    """Caption of a class name: ``"Ankle boot"`` -> ``"a photo of an ankle boot"``."""
    name = name.strip().lower()
    article = "an" if name[:1] in "aeiou" else "a"
    return template.format(article=article, name=name)


def deferred_maskdit_loss(
    model,
    objective: Objective,
    x0: torch.Tensor,
    cond: Dict[str, torch.Tensor],
    mask_ratio: float,
    generator: Optional[torch.Generator] = None,
    route_ratio: float = 0.0,
    bare: Optional[torch.nn.Module] = None,
) -> Tuple[torch.Tensor, Dict[str, LogValue]]:
    """One step's loss: the objective's weighted error, per patch, averaged over the kept tokens of each sample.

    ``route_ratio > 0`` adds TREAD routing inside the backbone, among the kept tokens (the loss is unchanged).
    ``bare``: the unwrapped model for attribute reads when ``model`` is DDP-wrapped (default: ``model``)."""
    bare = model if bare is None else bare
    noisy = objective.add_noise(x0, generator)
    ids_keep = draw_ids_keep(bare, x0.shape[0], mask_ratio, x0.device, generator)
    route_ids = draw_route_ids(x0.shape[0], bare.num_tokens, ids_keep, route_ratio, x0.device, generator)
    out = model(noisy.model_input, noisy.timestep, ids_keep=ids_keep, route_ids=route_ids, **cond)
    per_element = objective.per_element_loss(out.sample[:, : x0.shape[1]], noisy, x0)
    if out.mask is None:
        loss = per_element.flatten(1).mean(dim=1)
        kept = 1.0
    else:
        loss = masked_mean(per_token(per_element, bare.config.patch_size), ~out.mask)
        kept = (~out.mask).float().mean()
    loss = loss.mean()
    return loss, {"dsm": loss.detach(), "kept_tokens": kept}


@dataclass(frozen=True)
class DeferredMaskDiTConfig(EDMConfig, RouteConfig):
    """DeferredMaskDiT's flags: text or class conditioning, captions, the mask strategy, MicroDiT's EDM constants
    and TREAD routing."""

    edm_sigma_data: float = MICRODIT_SIGMA_DATA
    edm_p_mean: float = MICRODIT_P_MEAN
    edm_p_std: float = MICRODIT_P_STD
    caption_template: str = "a photo of {article} {name}"
    mask_strategy: Optional[str] = None


class DeferredMaskDiTRecipe(TrainingRecipe):
    """MicroDiT's recipe: EDM (sigma_data 0.9), mask ratio 0.75 after the patch-mixer, loss on kept tokens only."""

    name = "deferred_maskdit"
    model_cls = DeferredMaskDiTTransformer2DModel
    pipeline_cls = DeferredMaskDiTPipeline
    config_cls = DeferredMaskDiTConfig
    model_card = "deferred_maskdit.md"
    supports_text = True
    default_conditioning = "text"
    class_name_captions = True
    default_objective = "edm"
    default_mask_ratio = 0.75
    # Small enough for a CPU run on 28x28 Fashion-MNIST: 49 tokens of 4x4 patches through the mixer, 12 kept
    # tokens through a 6-block layer-wise-scaled backbone with 4-expert MoE in blocks 1, 3.
    demo_model_config = dict(
        patch_size=4,
        hidden_size=192,
        num_layers=6,
        attention_head_dim=32,
        patch_mixer_layers=2,
        patch_mixer_hidden_size=128,
        patch_mixer_mlp_ratio=4.0,
        num_experts=4,
        ff_multiple_of=32,
    )
    demo_defaults = dict(max_train_steps=1500, train_batch_size=128, learning_rate=5e-4, lr_warmup_steps=100,
                         use_ema=True, ema_decay=0.999, checkpointing_steps=500, validation_steps=500)

    def __init__(self):
        self.text_encoder = None
        self.tokenizer = None
        self.captions: Optional[List[str]] = None
        self.caption_embeds: Optional[torch.Tensor] = None
        self.caption_mask: Optional[torch.Tensor] = None

    # ---- flags -------------------------------------------------------------------------------------------------
    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        d = DeferredMaskDiTConfig()
        parser.add_argument("--caption_template", type=str, default=d.caption_template,
                            help="Caption of a class with --caption_source class_names; {name} = lower-cased class "
                            "name, {article} = a / an.")
        parser.add_argument("--mask_strategy", type=str, default=None, choices=["deferred", "naive"],
                            help="Mask after (deferred, MicroDiT) or before (naive) the patch-mixer (default: config).")
        add_edm_arguments(parser, d)
        add_route_arguments(parser, "backbone")

    def check_config(self, config: TrainConfig, error: UsageError) -> None:
        check_route_config(config.recipe, error)
        if "caption_template" in config.explicit_flags and config.text.captioned:
            error("--caption_template makes captions from class names: add --caption_source class_names (or drop "
                  "it to train on the data's captions).")

    # ---- construction (the class-name captions of --caption_source class_names) ----------------------------------
    def load_text_encoder(self, config: TrainConfig, device: torch.device) -> None:
        from ..utils.text_encoders import load_text_encoder

        t = config.text
        self.text_encoder, self.tokenizer = load_text_encoder(t.text_encoder_path, device,
                                                              max_sequence_length=t.max_sequence_length)

    def cache_captions(self, class_names: Sequence[str], config: TrainConfig, device: torch.device) -> None:
        """Encode one caption per class once; training batches gather from this cache by class id."""
        self.captions = [caption_for_class(n, config.recipe.caption_template) for n in class_names]
        embeds, mask = encode_texts(self.text_encoder, self.tokenizer, self.captions,
                                    config.text.max_sequence_length, device)
        self.caption_embeds, self.caption_mask = embeds.float(), mask

    def uses_class_name_captions(self, ctx: TrainContext) -> bool:
        return ctx.config.text.uses_text and not ctx.config.text.captioned

    def setup(self, ctx: TrainContext) -> None:
        if not self.uses_class_name_captions(ctx):
            return  # class labels, or the data's captions (cached by the trainer: ctx.text)
        if not ctx.class_names:
            raise ValueError(
                "--caption_source class_names builds captions from class names, but the data set has no labels. Use "
                "a labelled data set (class sub-folders or --label_column), or the data's captions "
                "(--caption_source captions), or --conditioning class."
            )
        self.load_text_encoder(ctx.config, ctx.device)
        self.cache_captions(ctx.class_names, ctx.config, ctx.device)

    def build_objective(self, ctx: TrainContext) -> Objective:
        return edm_objective(ctx)

    def build_model(self, ctx: TrainContext) -> torch.nn.Module:
        # With class-name captions the class id only picks the caption: the model itself is not class-conditional.
        text = ctx.config.text.uses_text
        return self.model_from_config(ctx, None if text else ctx.data.num_classes)

    def model_overrides(self, ctx: TrainContext) -> Dict[str, Any]:
        config: DeferredMaskDiTConfig = ctx.config.recipe
        width = None
        if ctx.text is not None:
            width = ctx.text.width
        elif self.uses_class_name_captions(ctx):
            width = self.text_encoder.config.hidden_size
        overrides: Dict[str, Any] = {"caption_channels": width}
        if config.mask_strategy:
            overrides["mask_strategy"] = config.mask_strategy
        overrides.update(route_overrides(config))
        return overrides

    def build_pipeline(self, transformer, scheduler, vae, ctx: TrainContext):
        if ctx.text is not None:
            return super().build_pipeline(transformer, scheduler, vae, ctx)
        text = transformer.config.caption_channels is not None
        return DeferredMaskDiTPipeline(
            transformer=transformer,
            scheduler=scheduler,
            vae=vae,
            text_encoder=self.text_encoder if text else None,
            tokenizer=self.tokenizer if text else None,
            id2label=ctx.id2label,
        )

    # ---- training step -----------------------------------------------------------------------------------------
    def conditioning_kwargs(self, batch: Dict[str, torch.Tensor], ctx: TrainContext) -> Dict[str, torch.Tensor]:
        if ctx.model.config.caption_channels is None or "encoder_hidden_states" in batch:
            return super().conditioning_kwargs(batch, ctx)  # class labels, or the data's cached captions
        if self.caption_embeds is None:
            raise RuntimeError("Caption embeddings are not cached: call setup(ctx) or cache_captions() first.")
        labels = batch["class_labels"]
        embeds = self.caption_embeds.to(labels.device)[labels]
        mask = self.caption_mask.to(labels.device)[labels]
        p = caption_dropout_prob(ctx)
        if p > 0:
            drop = drop_mask(labels, p, ctx.generator)
            # MicroDiT's unconditional caption: all-zero features (the model output ignores the mask then).
            embeds = torch.where(drop.view(-1, 1, 1), torch.zeros_like(embeds), embeds)
        return {"encoder_hidden_states": embeds, "encoder_attention_mask": mask}

    def compute_loss(self, model: torch.nn.Module, batch: Dict[str, torch.Tensor], ctx: TrainContext) -> LossOutput:
        cond = self.conditioning_kwargs(batch, ctx)
        ratio = self.mask_ratio(ctx)
        loss, logs = deferred_maskdit_loss(model, ctx.objective, batch["x0"], cond, ratio, ctx.generator,
                                           route_ratio_at(ctx), bare=ctx.model)
        return LossOutput(loss, {"mask_ratio": ratio, **logs})

    # ---- validation ----------------------------------------------------------------------------------------------
    def validation_prompts(self, ctx: TrainContext) -> Optional[List[str]]:
        """The data's held-out captions (see the base class), or with class-name captions one row per class."""
        if self.uses_class_name_captions(ctx) and self.captions:
            return list(self.captions)
        return super().validation_prompts(ctx)

    def eval_kwargs(self, ctx: TrainContext) -> Dict[str, Any]:
        """Class-name captions are scored one caption per class, so conditional accuracy still applies."""
        if not self.uses_class_name_captions(ctx) or not self.captions:
            return super().eval_kwargs(ctx)
        return {"prompts": list(self.captions), "prompt_labels": list(range(len(self.captions))),
                "max_sequence_length": ctx.config.text.max_sequence_length}

    def card_fields(self, ctx: TrainContext) -> Dict[str, Any]:
        config: DeferredMaskDiTConfig = ctx.config.recipe
        fields: Dict[str, Any] = dict(
            edm_constants=f"sigma_data {config.edm_sigma_data}, P_mean {config.edm_p_mean}, P_std {config.edm_p_std}",
            mask_strategy=ctx.model.config.mask_strategy,
            captions="the data's captions" if ctx.text is not None else "class labels",
        )
        if self.uses_class_name_captions(ctx) and self.captions:
            from .text import encoder_description

            fields.update(captions="; ".join(self.captions), example_prompt=self.captions[0],
                          text_encoder=encoder_description(ctx.config.text.text_encoder_path))
        return fields
