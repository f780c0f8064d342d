"""MaskDiT training: denoising score matching on the kept tokens + lambda x MAE reconstruction of the masked ones."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

import torch

from ..models.layers import patchify
from ..models.transformer_maskdit import MaskDiTTransformer2DModel
from ..pipelines.pipeline_maskdit import MaskDiTPipeline
from .config import TrainConfig
from .context import LossOutput, TrainContext
from .objectives import Objective, masked_mean, per_token
from .recipe import (
    EDMConfig,
    RouteConfig,
    TrainingRecipe,
    UsageError,
    add_edm_arguments,
    add_route_arguments,
    check_route_config,
    draw_ids_keep,
    draw_route_ids,
    edm_objective,
    route_overrides,
    route_ratio_at,
)


def mae_loss(denoised: torch.Tensor, noisy: torch.Tensor, mask: torch.Tensor, patch_size: int) -> torch.Tensor:
    """MaskDiT's MAE term per sample: MSE between the denoiser output and the per-patch normalised noisy input,
    averaged over the masked tokens only (target normalised with the unbiased variance and eps 1e-6, as the paper's
    code)."""
    target = patchify(noisy.float(), patch_size)
    mean = target.mean(dim=-1, keepdim=True)
    var = target.var(dim=-1, keepdim=True)
    target = (target - mean) / (var + 1e-6).sqrt()
    per_tok = ((patchify(denoised.float(), patch_size) - target) ** 2).mean(dim=-1)
    return masked_mean(per_tok, mask)


def maskdit_loss(
    model,
    objective: Objective,
    x0: torch.Tensor,
    cond: Dict[str, torch.Tensor],
    mask_ratio: float,
    mae_loss_coef: float,
    generator: Optional[torch.Generator] = None,
    route_ratio: float = 0.0,
    bare: Optional[torch.nn.Module] = None,
) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """Loss of one MaskDiT step; returns the batch mean and the parts (per-batch means) for logging.

    ``route_ratio > 0`` adds TREAD routing inside the encoder, among the kept tokens (the loss is unchanged).
    ``bare``: the unwrapped model for attribute reads when ``model`` is DDP-wrapped (default: ``model``). An
    unmasked step leaves the mask token unused; `MaskDiTRecipe.compute_loss` declares it (`LossOutput.unused`)."""
    bare = model if bare is None else bare
    patch_size = bare.config.patch_size
    channels = x0.shape[1]
    noisy = objective.add_noise(x0, generator)
    ids_keep = draw_ids_keep(bare, x0.shape[0], mask_ratio, x0.device, generator)
    route_ids = draw_route_ids(x0.shape[0], bare.num_tokens, ids_keep, route_ratio, x0.device, generator)
    out = model(noisy.model_input, noisy.timestep, ids_keep=ids_keep, route_ids=route_ids, **cond)
    prediction = out.sample[:, :channels]
    per_element = objective.per_element_loss(prediction, noisy, x0)
    if out.mask is None:
        dsm = per_element.flatten(1).mean(dim=1).mean()
        return dsm, {"dsm": dsm.detach()}
    dsm = masked_mean(per_token(per_element, patch_size), ~out.mask)
    loss = dsm
    logs = {"dsm": dsm.mean().detach()}
    if mae_loss_coef > 0:
        mae = mae_loss(objective.predict_x0(prediction, noisy), noisy.noisy, out.mask, patch_size)
        loss = loss + mae_loss_coef * mae
        logs["mae"] = mae.mean().detach()
    return loss.mean(), logs


@dataclass(frozen=True)
class MaskDiTConfig(EDMConfig, RouteConfig):
    """MaskDiT's flags: the MAE weight, a learned variance, the EDM constants and TREAD routing."""

    mae_loss_coef: float = 0.1
    learn_sigma: bool = False


class MaskDiTRecipe(TrainingRecipe):
    """MaskDiT as the paper: EDM objective, mask ratio 0.5, MAE coefficient 0.1, optional unmasked fine-tuning."""

    name = "maskdit"
    model_cls = MaskDiTTransformer2DModel
    pipeline_cls = MaskDiTPipeline
    config_cls = MaskDiTConfig
    model_card = "maskdit.md"
    supports_text = True  # --conditioning text: cross-attention to the caption + pooled caption in adaLN
    default_objective = "edm"
    default_mask_ratio = 0.5
    # The paper closes with a short unmasked stage: it removes the train (masked) / sample (unmasked) gap.
    default_unmasked_finetune_fraction = 0.1
    # Small enough for a CPU run on 28x28 Fashion-MNIST (7x7 = 49 tokens of 4x4 patches).
    demo_model_config = dict(
        patch_size=4,
        hidden_size=192,
        num_layers=6,
        num_attention_heads=3,
        decoder_hidden_size=128,
        num_decoder_layers=2,
        decoder_num_attention_heads=2,
    )
    demo_defaults = dict(max_train_steps=1500, train_batch_size=128, learning_rate=5e-4, lr_warmup_steps=100,
                         use_ema=True, ema_decay=0.999, checkpointing_steps=500, validation_steps=500)

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        d = MaskDiTConfig()
        parser.add_argument("--mae_loss_coef", type=float, default=d.mae_loss_coef,
                            help="Weight of the MAE term (paper: 0.1).")
        parser.add_argument("--learn_sigma", action="store_true", help="Predict a variance too (2C outputs).")
        add_edm_arguments(parser, d)
        add_route_arguments(parser, "encoder")

    def check_config(self, config: TrainConfig, error: UsageError) -> None:
        check_route_config(config.recipe, error)

    def build_objective(self, ctx: TrainContext) -> Objective:
        return edm_objective(ctx)

    def model_overrides(self, ctx: TrainContext) -> Dict[str, Any]:
        config: MaskDiTConfig = ctx.config.recipe
        overrides: Dict[str, Any] = {"learn_sigma": True} if config.learn_sigma else {}
        overrides.update(route_overrides(config))
        return overrides

    def compute_loss(self, model: torch.nn.Module, batch: Dict[str, torch.Tensor], ctx: TrainContext) -> LossOutput:
        cond = self.conditioning_kwargs(batch, ctx)
        ratio = self.mask_ratio(ctx)
        loss, logs = maskdit_loss(model, ctx.objective, batch["x0"], cond, ratio, ctx.config.recipe.mae_loss_coef,
                                  ctx.generator, route_ratio_at(ctx), bare=ctx.model)
        unused = [ctx.model.mask_token] if ratio == 0 else []
        return LossOutput(loss, {"mask_ratio": ratio, **logs}, unused=unused)
