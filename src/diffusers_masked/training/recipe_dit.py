"""DiT training, with TREAD token routing by default: the loss covers every token, routing only thins the span."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

import torch

from ..models.masking import DEFAULT_ROUTE_RATIO, random_route_ids
from ..models.transformer_dit import RoutedDiTTransformer2DModel
from ..pipelines.pipeline_dit import RoutedDiTPipeline
from .config import TrainConfig
from .context import LogValue, LossOutput, TrainContext
from .objectives import Objective
from .recipe import EDMConfig, TrainingRecipe, UsageError, add_edm_arguments, edm_objective, route_overrides


def routed_dit_loss(
    model,
    objective: Objective,
    x0: torch.Tensor,
    cond: Dict[str, torch.Tensor],
    route_ratio: float,
    generator: Optional[torch.Generator] = None,
    bare: Optional[torch.nn.Module] = None,
) -> Tuple[torch.Tensor, Dict[str, LogValue]]:
    """Loss of one (routed) DiT step: the objective's denoising loss over every pixel / latent cell.

    The route (ids of the tokens that go through the span) is drawn here and passed as ``route_ids``, not drawn by
    the model from a generator, so that a compiled training forward is one graph (a generator cannot be traced).
    ``bare``: the unwrapped model for attribute reads when ``model`` is DDP-wrapped (default: ``model``)."""
    bare = model if bare is None else bare
    noisy = objective.add_noise(x0, generator)
    route_ids = random_route_ids(x0.shape[0], bare.num_tokens, route_ratio, device=x0.device, generator=generator)
    out = model(noisy.model_input, noisy.timestep, route_ids=route_ids, **cond)
    prediction = out.sample[:, : x0.shape[1]]
    loss = objective.per_element_loss(prediction, noisy, x0).flatten(1).mean(dim=1).mean()
    return loss, {"route_ratio": float(route_ratio)}


@dataclass(frozen=True)
class RoutedDiTConfig(EDMConfig):
    """DiT's flags: TREAD routing (on by default, as the paper) and the EDM constants."""

    route_ratio: float = DEFAULT_ROUTE_RATIO
    route_start: Optional[int] = None
    route_end: Optional[int] = None


class RoutedDiTRecipe(TrainingRecipe):
    """DiT trained as TREAD (Krause et al. 2025): EDM objective, route ratio 0.5 over blocks 2 .. num_layers - 4.

    ``--route_ratio 0`` trains a plain DiT (the unmasked baseline). ``--unmasked_finetune_steps N`` trains the last
    N steps without routing (the paper's short unrouted fine-tune before its guided FID)."""

    name = "dit"
    model_cls = RoutedDiTTransformer2DModel
    pipeline_cls = RoutedDiTPipeline
    config_cls = RoutedDiTConfig
    model_card = "dit.md"
    default_objective = "edm"
    # DiT does not mask: --mask_ratio must stay 0; routing has its own flags.
    default_mask_ratio = 0.0
    default_unmasked_finetune_fraction = 0.0
    # Small enough for a CPU run on 28x28 Fashion-MNIST (7x7 = 49 tokens of 4x4 patches); 6 blocks give the
    # paper's span 2 .. max(2, 6 - 4) = block 2 alone.
    demo_model_config = dict(patch_size=4, hidden_size=96, num_layers=6, num_attention_heads=2)
    demo_defaults = dict(max_train_steps=600, train_batch_size=48, learning_rate=1e-3, lr_warmup_steps=50,
                         use_ema=True, ema_decay=0.99, checkpointing_steps=300, validation_steps=0)

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--route_ratio", type=float, default=DEFAULT_ROUTE_RATIO,
                            help="TREAD: share of tokens that skip the routed blocks in training, in [0, 1) "
                                 f"(paper: {DEFAULT_ROUTE_RATIO}); 0 trains a plain DiT. Sampling never routes.")
        parser.add_argument("--route_start", type=int, default=None,
                            help="First block the routed tokens skip (default: the model config's, else 2 as the "
                                 "paper); negative counts from the end.")
        parser.add_argument("--route_end", type=int, default=None,
                            help="Last block the routed tokens skip, inclusive (default: the model config's, else "
                                 "num_layers - 4 as the paper); negative counts from the end.")
        add_edm_arguments(parser, RoutedDiTConfig())

    def check_config(self, config: TrainConfig, error: UsageError) -> None:
        ratio = config.model.mask_ratio
        if ratio not in (None, 0, 0.0):
            error(f"--mask_ratio {ratio:g}: DiT does not mask (it has no decoder for removed tokens); use "
                  f"--route_ratio {ratio:g} for TREAD routing, or train_maskdit.py for masked training.")
        r = config.recipe.route_ratio
        if not 0 <= r < 1:
            error(f"--route_ratio {r:g}: the share of routed tokens must be in [0, 1) (paper: {DEFAULT_ROUTE_RATIO}; "
                  "0 = plain DiT).")

    def build_objective(self, ctx: TrainContext) -> Objective:
        return edm_objective(ctx)

    def model_overrides(self, ctx: TrainContext) -> Dict[str, Any]:
        return route_overrides(ctx.config.recipe)

    def mask_ratio(self, ctx: TrainContext) -> float:
        return 0.0  # routing, not masking

    def route_ratio(self, ctx: TrainContext) -> float:
        """Route ratio of the current step: 0 during the final ``--unmasked_finetune_steps``."""
        return 0.0 if ctx.finetuning else ctx.config.recipe.route_ratio

    def compute_loss(self, model: torch.nn.Module, batch: Dict[str, torch.Tensor], ctx: TrainContext) -> LossOutput:
        cond = self.conditioning_kwargs(batch, ctx)
        loss, logs = routed_dit_loss(model, ctx.objective, batch["x0"], cond, self.route_ratio(ctx), ctx.generator,
                                     bare=ctx.model)
        return LossOutput(loss, {"mask_ratio": 0.0, **logs})

    def card_fields(self, ctx: TrainContext) -> Dict[str, Any]:
        start, end = ctx.model.route_span
        return {"route_ratio": ctx.config.recipe.route_ratio, "route_start": start, "route_end": end,
                "num_layers": ctx.model.config.num_layers}
