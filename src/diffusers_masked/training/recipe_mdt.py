"""MDTv2 training recipe: guided-diffusion's DDPM loss (epsilon MSE + learned-variance VLB) on both branches.

Each step runs the model twice on the same clean batch and the same timesteps with independent noise: once on all
tokens and once masked (one mask ratio per batch drawn from ``U[0.3, 0.5)``, the encoder sees only the kept
tokens, the side-interpolater fills the rest). The loss is the unweighted sum of the two branch losses; each branch
loss is ``w(t) * MSE(eps) + VLB`` over all tokens, with MDTv2's Min-SNR weight ``w(t) = min(SNR, 5) / SNR`` on the
MSE term only (as the official code). The VLB term trains the learned-range variance with a stop-gradient on the
mean, so `DDPMScheduler(variance_type="learned_range")` samples with the predicted variance.
"""

from __future__ import annotations

import argparse
import logging
import math
from typing import Any, Callable, Dict, Optional, Tuple

import torch

from ..models.transformer_mdt import MDTv2Transformer2DModel
from ..pipelines.pipeline_mdt import MDTv2Pipeline
from .objectives import DDPMObjective, NoisyBatch, Objective
from .recipe import (
    TrainingRecipe,
    add_route_arguments,
    check_route_args,
    draw_ids_keep,
    draw_route_ids,
    route_overrides,
    route_ratio_at,
)

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------------------------
# Learned-variance VLB term (guided-diffusion's L_vlb, in bits per dimension)
# ----------------------------------------------------------------------------------------------------------------
def _gaussian_kl(mean1: torch.Tensor, logvar1: torch.Tensor, mean2: torch.Tensor, logvar2: torch.Tensor) -> torch.Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) per element."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def _discretized_gaussian_log_likelihood(x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """Log-probability of ``x`` in [-1, 1] under a Gaussian discretised into 256 bins (the t = 0 decoder term).

    Uses the exact normal CDF (`torch.special.log_ndtr`) where guided-diffusion uses a tanh approximation."""
    centered = x - mean
    inv_std = torch.exp(-log_scale)
    upper = inv_std * (centered + 1.0 / 255.0)
    lower = inv_std * (centered - 1.0 / 255.0)
    log_cdf_upper = torch.special.log_ndtr(upper)
    log_sf_lower = torch.special.log_ndtr(-lower)
    delta = (torch.special.ndtr(upper) - torch.special.ndtr(lower)).clamp_min(1e-12)
    return torch.where(x < -0.999, log_cdf_upper, torch.where(x > 0.999, log_sf_lower, torch.log(delta)))


class LearnedVarianceVLB:
    """The VLB term of improved DDPM for a ``learned_range`` variance, built from a `DDPMScheduler`'s betas.

    ``log_var = frac * log(beta_t) + (1 - frac) * log(posterior_var_t)`` with ``frac = (v + 1) / 2``; the loss is
    ``KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t))`` for t > 0 and the discretised decoder NLL at t = 0, both in
    bits per dimension and averaged over all elements of a sample.
    """

    def __init__(self, objective: DDPMObjective):
        sched = objective.scheduler
        betas = sched.betas.double()
        alphas_cumprod = sched.alphas_cumprod.double()
        prev = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
        post_var = betas * (1 - prev) / (1 - alphas_cumprod)
        # Index 0 has zero posterior variance; use index 1's value there, as improved DDPM does.
        self.post_log_var = torch.log(torch.cat([post_var[1:2], post_var[1:]])).float()
        self.log_betas = torch.log(betas).float()
        self.coef_x0 = (betas * prev.sqrt() / (1 - alphas_cumprod)).float()
        self.coef_xt = ((1 - prev) * (1 - betas).sqrt() / (1 - alphas_cumprod)).float()
        self.objective = objective

    def _at(self, table: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return table.to(t.device)[t].view(-1, 1, 1, 1)

    def __call__(self, eps: torch.Tensor, var_values: torch.Tensor, batch: NoisyBatch, x0: torch.Tensor) -> torch.Tensor:
        """Per-sample VLB (B,) in bits/dim; gradients reach only ``var_values`` (the mean is detached)."""
        t = batch.level
        x_t, x0 = batch.noisy.float(), x0.float()
        true_mean = self._at(self.coef_x0, t) * x0 + self._at(self.coef_xt, t) * x_t
        true_log_var = self._at(self.post_log_var, t)
        x0_hat = self.objective.predict_x0(eps.detach(), batch)
        model_mean = self._at(self.coef_x0, t) * x0_hat + self._at(self.coef_xt, t) * x_t
        frac = (var_values.float() + 1) / 2
        model_log_var = frac * self._at(self.log_betas, t) + (1 - frac) * true_log_var
        kl = _gaussian_kl(true_mean, true_log_var, model_mean, model_log_var).flatten(1).mean(1)
        nll = -_discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * model_log_var).flatten(1).mean(1)
        return torch.where(t == 0, nll, kl) / math.log(2.0)


def min_snr_weight(objective: DDPMObjective, t: torch.Tensor, gamma: float) -> torch.Tensor:
    """MDTv2's timestep weight of the MSE term, Min-SNR-gamma for the model's target: ``min(SNR, gamma) / SNR``
    for epsilon, ``min(SNR, gamma) / (SNR + 1)`` for v. ``gamma <= 0`` gives weight 1 (MDT v1)."""
    if gamma <= 0:
        return torch.ones(t.shape, device=t.device)
    a = objective.scheduler.alphas_cumprod.to(t.device)[t].float()
    snr = a / (1 - a)
    clipped = snr.clamp(max=gamma)
    if objective.scheduler.config.prediction_type == "v_prediction":
        return clipped / (snr + 1)
    return clipped / snr


# ----------------------------------------------------------------------------------------------------------------
# Recipe
# ----------------------------------------------------------------------------------------------------------------
class MDTv2Recipe(TrainingRecipe):
    """`TrainingRecipe` of MDTv2 (see the module docstring for the loss)."""

    name = "mdt"
    model_cls = MDTv2Transformer2DModel
    pipeline_cls = MDTv2Pipeline
    model_card = "mdtv2.md"
    default_objective = "epsilon"
    default_mask_ratio = MDTv2Transformer2DModel.default_mask_ratio
    mask_ratio_help = ("Fix the share of masked tokens (MDT v1 style); default: one ratio per batch drawn from "
                       "--mask_ratio_range (MDTv2).")
    # Small model for the no-argument CPU run on Fashion-MNIST (28 x 28 pixels, 1 channel; 7 x 7 tokens).
    demo_model_config: Dict[str, Any] = dict(
        patch_size=4, hidden_size=128, num_layers=6, num_decoder_layers=2, num_attention_heads=4
    )
    # Each step runs two forward passes (full + masked branch).
    demo_defaults: Dict[str, Any] = dict(max_train_steps=1500, train_batch_size=128, learning_rate=3e-4,
                                         lr_warmup_steps=100, use_ema=True, ema_decay=0.999,
                                         checkpointing_steps=500, validation_steps=500)

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        low, high = MDTv2Transformer2DModel.mask_ratio_range
        parser.add_argument("--mask_ratio_range", type=float, nargs=2, default=[low, high], metavar=("LOW", "HIGH"),
                            help="MDTv2 draws one mask ratio per batch from U[LOW, HIGH); --mask_ratio fixes it (v1).")
        parser.add_argument("--min_snr_gamma", type=float, default=5.0,
                            help="Timestep weight min(SNR, gamma)/SNR of the MSE term (MDTv2); 0 = unweighted (v1).")
        parser.add_argument("--num_decoder_layers", type=int, default=None, help="Override the decoder depth.")
        parser.add_argument("--no_masked_branch", action="store_true",
                            help="Train only the full (unmasked) branch: a plain DiT-style baseline.")
        parser.add_argument("--mask_ratio_levels", type=int, default=4,
                            help="Quantise the per-batch ratio to this many bin centres of the range (0 = continuous "
                            "as the official code; quantised ratios avoid torch.compile recompiles).")
        parser.add_argument("--split_branch_backward", action=argparse.BooleanOptionalAction, default=True,
                            help="Back-propagate the full branch before running the masked one: same gradients, the "
                            "activation memory of one branch instead of two (MDTv2-XL/2 at batch 128 fits in 80 GB "
                            "only this way; measured as fast or faster at batch 32). Single-process and DDP runs; "
                            "--no-split_branch_backward for one backward of the summed loss.")
        parser.add_argument("--use_adan", action="store_true",
                            help="Adan optimizer (betas 0.98/0.92/0.99) as the official MDTv2 training; lr, weight "
                            "decay and epsilon come from --learning_rate / --adam_weight_decay / --adam_epsilon.")
        add_route_arguments(parser, "encoder")

    def check_args(self, args: argparse.Namespace, error) -> None:
        low, high = args.mask_ratio_range
        if not 0.0 <= low <= high < 1.0:
            paper = " ".join(f"{v:g}" for v in MDTv2Transformer2DModel.mask_ratio_range)
            error(f"--mask_ratio_range {low:g} {high:g}: LOW and HIGH must satisfy 0 <= LOW <= HIGH < 1 "
                  f"(MDTv2's default: {paper}).")
        if args.mask_ratio_levels < 0:
            error(f"--mask_ratio_levels {args.mask_ratio_levels}: must be >= 0 (0 = continuous ratios).")
        if args.num_decoder_layers is not None and args.num_decoder_layers < 1:
            error(f"--num_decoder_layers {args.num_decoder_layers}: must be >= 1.")
        check_route_args(args, error)

    #: Set by `setup` with --split_branch_backward: ``backward_part(closure)`` runs a branch's forward and
    #: backward at once (see `DiffusionTrainer.backward_part`).
    backward_part: Optional[Callable[[Callable[[], torch.Tensor]], torch.Tensor]] = None

    def setup(self, trainer: Any) -> None:
        if not getattr(trainer.args, "split_branch_backward", False):
            return
        from accelerate.utils import DistributedType

        kind = trainer.accelerator.distributed_type
        if kind in (DistributedType.NO, DistributedType.MULTI_GPU, DistributedType.MULTI_CPU):
            self.backward_part = trainer.backward_part
        else:
            # DeepSpeed steps its optimizer inside backward and FSDP's no_sync keeps unsharded gradients.
            logger.warning("--split_branch_backward is for single-process and DDP runs; %s uses one joint backward.",
                           kind)

    def build_objective(self, args: argparse.Namespace) -> Objective:
        name = args.objective or self.default_objective
        if name not in ("epsilon", "v_prediction"):
            raise ValueError(
                f"MDTv2 trains with the DDPM objective and a learned variance; --objective {name} is not supported. "
                "Use --objective epsilon (the paper) or v_prediction."
            )
        return DDPMObjective(prediction_type=name, learned_variance=True)

    def learned_variance(self, args: argparse.Namespace) -> bool:
        return True

    def model_overrides(self, args: argparse.Namespace) -> Dict[str, Any]:
        overrides: Dict[str, Any] = dict(learn_sigma=True, out_channels=None)
        if args.num_decoder_layers is not None:
            overrides["num_decoder_layers"] = args.num_decoder_layers
        overrides.update(route_overrides(args))
        return overrides

    def build_pipeline(self, transformer, scheduler, vae, id2label: Optional[Dict[int, str]], trainer: Any):
        # The official sampler respaces with linspace (steps {0, 4, ..., 999} for 250), not DDPM's "leading" default.
        scheduler = type(scheduler).from_config(scheduler.config, timestep_spacing="linspace")
        return self.pipeline_cls(transformer=transformer, scheduler=scheduler, vae=vae, id2label=id2label)

    def build_optimizer(self, params, args: argparse.Namespace) -> Optional[torch.optim.Optimizer]:
        if not args.use_adan:
            return None  # the trainer's AdamW
        from .optimizers import Adan

        return Adan(params, lr=args.learning_rate, weight_decay=args.adam_weight_decay, eps=args.adam_epsilon)

    def mask_ratio(self, args: argparse.Namespace, step: int, generator: Optional[torch.Generator]) -> float:
        """One ratio per batch from ``U[--mask_ratio_range)`` (MDTv2), or ``--mask_ratio`` when given (v1);
        0 in the final unmasked fine-tuning steps or with ``--no_masked_branch``."""
        # Called once per step before compute_loss, which has no step: remember the step's route ratio.
        self._route_ratio = route_ratio_at(args, step)
        if args.no_masked_branch or step >= args.max_train_steps - args.unmasked_finetune_steps:
            return 0.0
        if args.mask_ratio is not None:
            return float(args.mask_ratio)
        low, high = args.mask_ratio_range
        if not 0.0 <= low <= high < 1.0:
            raise ValueError(f"--mask_ratio_range must satisfy 0 <= LOW <= HIGH < 1, got {low} {high}.")
        device = generator.device if generator is not None else "cpu"
        u = torch.rand((), generator=generator, device=device).item()
        levels = args.mask_ratio_levels
        if levels:
            # A few fixed ratios (bin centres, same mean as the uniform draw) keep the number of kept-token shapes
            # small, so torch.compile builds a handful of graphs instead of one per ratio.
            u = (math.floor(u * levels) + 0.5) / levels
        return low + (high - low) * u

    def branch_loss(
        self,
        model,
        objective: DDPMObjective,
        vlb: LearnedVarianceVLB,
        x0: torch.Tensor,
        batch: NoisyBatch,
        cond: Dict[str, torch.Tensor],
        mask_ratio: float,
        gamma: float,
        generator: Optional[torch.Generator],
        route_ratio: float = 0.0,
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-sample (loss, mse, vb) of one branch; the loss covers all tokens. ``route_ratio > 0`` adds TREAD
        routing inside the encoder (among the kept tokens in the masked branch)."""
        ids_keep = draw_ids_keep(model, x0.shape[0], mask_ratio, x0.device, generator)
        inner = getattr(model, "module", model)
        route_ids = draw_route_ids(x0.shape[0], inner.num_tokens, ids_keep, route_ratio, x0.device, generator)
        out = model(batch.model_input, batch.timestep, ids_keep=ids_keep, route_ids=route_ids, **cond).sample
        c = x0.shape[1]
        eps, var_values = out[:, :c], out[:, c:]
        mse = objective.per_element_loss(eps, batch, x0).flatten(1).mean(1)
        vb = vlb(eps, var_values, batch, x0)
        return min_snr_weight(objective, batch.level, gamma) * mse + vb, mse, vb

    def compute_loss(
        self,
        model,
        objective: Objective,
        x0: torch.Tensor,
        cond: Dict[str, torch.Tensor],
        mask_ratio: float,
        args: argparse.Namespace,
        generator: Optional[torch.Generator],
    ) -> Tuple[torch.Tensor, Dict[str, float]]:
        if not isinstance(objective, DDPMObjective) or not objective.learned_variance:
            raise ValueError("MDTv2Recipe needs a DDPMObjective with learned_variance=True (see build_objective).")
        if getattr(self, "_vlb_for", None) is not objective:
            self._vlb, self._vlb_for = LearnedVarianceVLB(objective), objective
        gamma = getattr(args, "min_snr_gamma", 5.0)
        # Both branches route (the encoder is the routed stack in each); 0 unless --route_ratio is given.
        route_ratio = getattr(self, "_route_ratio", getattr(args, "route_ratio", 0.0))
        full = objective.add_noise(x0, generator)
        split = self.backward_part is not None and mask_ratio > 0
        parts = {}

        def full_branch() -> torch.Tensor:
            parts["full"] = self.branch_loss(model, objective, self._vlb, x0, full, cond, 0.0, gamma, generator,
                                             route_ratio)
            return parts["full"][0].mean()

        # Split: the full branch is back-propagated here and only its value joins the returned loss.
        loss = self.backward_part(full_branch) if split else full_branch()
        loss_full, mse, vb = parts["full"]
        logs = {"mse": mse.mean().detach(), "vb": vb.mean().detach(), "loss_full": loss_full.mean().detach()}
        if mask_ratio > 0:
            # Same clean batch and timesteps, fresh noise (as the official two training_losses calls).
            noise = torch.randn(x0.shape, generator=generator, device=generator.device if generator is not None else x0.device)
            noise = noise.to(x0.device, x0.dtype)
            noisy = objective.scheduler.add_noise(x0, noise, full.level)
            masked = NoisyBatch(model_input=noisy, timestep=full.timestep, noisy=noisy, noise=noise, level=full.level)
            loss_m, m_mse, m_vb = self.branch_loss(model, objective, self._vlb, x0, masked, cond, mask_ratio, gamma,
                                                   generator, route_ratio)
            loss = loss + loss_m.mean()
            logs.update(m_mse=m_mse.mean().detach(), m_vb=m_vb.mean().detach(), m_loss=loss_m.mean().detach())
        else:
            # The side-interpolater is unused without masking; keep it in the graph so DDP does not wait for it.
            side = getattr(model, "module", model).side_interpolater
            loss = loss + 0.0 * sum(p.sum() for p in side.parameters())
        return loss, logs

    def card_fields(self, trainer: Any) -> Dict[str, Any]:
        args = trainer.args
        if args.no_masked_branch:
            masking = "none (full branch only)"
        elif args.mask_ratio is not None:
            masking = f"fixed {args.mask_ratio}"
        else:
            masking = f"U[{args.mask_ratio_range[0]}, {args.mask_ratio_range[1]}) per batch"
        # (`mask_ratio` itself is filled by the trainer; this adds how it was drawn.)
        return {
            "mask_ratio_schedule": masking,
            "min_snr_gamma": args.min_snr_gamma,
            "optimizer": "Adan" if args.use_adan else "AdamW",
        }
