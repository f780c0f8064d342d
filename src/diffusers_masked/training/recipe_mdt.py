"""MDTv2 training recipe: guided-diffusion's DDPM loss (epsilon MSE + learned-variance VLB) on both branches.

Each step runs the model twice on the same clean batch and the same timesteps with independent noise: once on all
tokens and once masked (one mask ratio per batch drawn from ``U[0.3, 0.5)``, the encoder sees only the kept
tokens, the side-interpolater fills the rest). The loss is the unweighted sum of the two branch losses; each branch
loss is ``w(t) * MSE(eps) + VLB`` over all tokens, with MDTv2's Min-SNR weight ``w(t) = min(SNR, 5) / SNR`` on the
MSE term only (as the official code). The VLB term trains the learned-range variance with a stop-gradient on the
mean, so `DDPMScheduler(variance_type="learned_range")` samples with the predicted variance.

``--objective edm`` (not the paper's; for like-for-like comparisons with the EDM recipes) keeps the two branches and
their shared noise levels but trains each with the EDM denoising loss, without a learned variance or Min-SNR weight.
"""

from __future__ import annotations

import argparse
import logging
import math
import random
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import torch

from ..models.transformer_mdt import MDTv2Transformer2DModel
from ..pipelines.pipeline_mdt import MDTv2Pipeline
from .config import TrainConfig
from .context import BackwardPart, LossOutput, TrainContext
from .objectives import DDPMObjective, EDMObjective, NoisyBatch, Objective
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
        self._on_device: Dict[torch.device, Dict[str, torch.Tensor]] = {}

    _TABLES = ("coef_x0", "coef_xt", "post_log_var", "log_betas")

    def _tables(self, device: torch.device) -> Dict[str, torch.Tensor]:
        """The tables on ``device``, copied there once: a host-to-device copy per table and call (six per branch,
        every step) is a blocking transfer that waits for the GPU each time."""
        tables = self._on_device.get(device)
        if tables is None:
            tables = self._on_device[device] = {name: getattr(self, name).to(device) for name in self._TABLES}
        return tables

    @staticmethod
    def _at(table: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return table[t].view(-1, 1, 1, 1)

    def __call__(self, eps: torch.Tensor, var_values: torch.Tensor, batch: NoisyBatch, x0: torch.Tensor) -> torch.Tensor:
        """Per-sample VLB (B,) in bits/dim; gradients reach only ``var_values`` (the mean is detached)."""
        t = batch.level
        tab = self._tables(t.device)
        coef_x0, coef_xt = self._at(tab["coef_x0"], t), self._at(tab["coef_xt"], t)
        x_t, x0 = batch.noisy.float(), x0.float()
        true_mean = coef_x0 * x0 + coef_xt * x_t
        true_log_var = self._at(tab["post_log_var"], t)
        x0_hat = self.objective.predict_x0(eps.detach(), batch)
        model_mean = coef_x0 * x0_hat + coef_xt * x_t
        frac = (var_values.float() + 1) / 2
        model_log_var = frac * self._at(tab["log_betas"], t) + (1 - frac) * true_log_var
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
# The loss of one step
# ----------------------------------------------------------------------------------------------------------------
#: MDTv2's training mask ratios: one per batch from U[0.3, 0.5); 0.3 when fixed (MDT v1).
MASK_RATIO_RANGE: Tuple[float, float] = (0.3, 0.5)
DEFAULT_MASK_RATIO = 0.3


def branch_loss(
    model,
    objective: Objective,
    vlb: Optional[LearnedVarianceVLB],
    x0: torch.Tensor,
    batch: NoisyBatch,
    cond: Dict[str, torch.Tensor],
    mask_ratio: float,
    gamma: float,
    generator: Optional[torch.Generator],
    route_ratio: float = 0.0,
    bare: Optional[torch.nn.Module] = None,
    varying_keep: bool = False,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample (loss, mse, vb) of one branch; the loss covers all tokens. ``vlb`` None (EDM): the loss is the
    objective's weighted error alone (vb 0). ``route_ratio > 0`` adds TREAD routing inside the encoder (among the
    kept tokens in the masked branch). ``varying_keep``: the mask ratio changes from step to step (see
    `mdtv2_loss`)."""
    bare = model if bare is None else bare
    ids_keep = draw_ids_keep(bare, x0.shape[0], mask_ratio, x0.device, generator)
    if varying_keep and ids_keep is not None:
        # torch.compile would specialise on the first step's kept-token count and recompile at the next ratio (a
        # whole forward + backward compilation, minutes for a B-size model); a dynamic size from the start
        # compiles the masked branch once for every ratio.
        torch._dynamo.maybe_mark_dynamic(ids_keep, 1)
    route_ids = draw_route_ids(x0.shape[0], bare.num_tokens, ids_keep, route_ratio, x0.device, generator)
    out = model(batch.model_input, batch.timestep, ids_keep=ids_keep, route_ids=route_ids, **cond).sample
    c = x0.shape[1]
    eps, var_values = out[:, :c], out[:, c:]
    mse = objective.per_element_loss(eps, batch, x0).flatten(1).mean(1)
    if vlb is None:  # EDM: the weighted denoising loss is the whole loss
        return mse, mse, torch.zeros_like(mse)
    vb = vlb(eps, var_values, batch, x0)
    return min_snr_weight(objective, batch.level, gamma) * mse + vb, mse, vb


def mdtv2_loss(
    model,
    objective: Objective,
    x0: torch.Tensor,
    cond: Dict[str, torch.Tensor],
    mask_ratio: float,
    min_snr_gamma: float = 5.0,
    generator: Optional[torch.Generator] = None,
    route_ratio: float = 0.0,
    backward_part: Optional[BackwardPart] = None,
    bare: Optional[torch.nn.Module] = None,
    vlb: Optional[LearnedVarianceVLB] = None,
    varying_keep: bool = False,
) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """Loss of one MDTv2 step (see the module docstring) and its parts for logging.

    ``mask_ratio`` 0 runs the full branch only (the side-interpolater is then unused). With ``backward_part`` (see
    `TrainContext.backward_part`) the full branch is back-propagated before the masked one runs and only its value
    joins the returned loss: same gradients, one branch's activations alive at a time. Both branches route when
    ``route_ratio > 0`` (the encoder is the routed stack in each). ``bare``: the unwrapped model for attribute reads
    (default: ``model``); ``vlb``: a cached `LearnedVarianceVLB` of a DDPM ``objective`` (unused under EDM);
    ``varying_keep``: ``mask_ratio`` changes between steps (MDTv2's per-batch ratio), so the number of kept tokens is
    a dynamic size for torch.compile."""
    if isinstance(objective, EDMObjective):
        vlb = None
    elif isinstance(objective, DDPMObjective) and objective.learned_variance:
        vlb = LearnedVarianceVLB(objective) if vlb is None else vlb
    else:
        raise ValueError("MDTv2 needs a DDPMObjective with learned_variance=True or an EDMObjective (see "
                         "MDTv2Recipe.build_objective).")
    full = objective.add_noise(x0, generator)
    parts = {}

    def full_branch() -> torch.Tensor:
        parts["full"] = branch_loss(model, objective, vlb, x0, full, cond, 0.0, min_snr_gamma, generator,
                                    route_ratio, bare)
        return parts["full"][0].mean()

    split = backward_part is not None and mask_ratio > 0
    loss = backward_part(full_branch) if split else full_branch()
    loss_full, mse, vb = parts["full"]
    logs = {"mse": mse.mean().detach(), "vb": vb.mean().detach(), "loss_full": loss_full.mean().detach()}
    if mask_ratio > 0:
        # Same clean batch and timesteps, fresh noise (as the official two training_losses calls).
        noise = torch.randn(x0.shape, generator=generator,
                            device=generator.device if generator is not None else x0.device)
        masked = objective.renoise(x0, full, noise.to(x0.device, x0.dtype))
        loss_m, m_mse, m_vb = branch_loss(model, objective, vlb, x0, masked, cond, mask_ratio, min_snr_gamma,
                                          generator, route_ratio, bare, varying_keep)
        loss = loss + loss_m.mean()
        logs.update(m_mse=m_mse.mean().detach(), m_vb=m_vb.mean().detach(), m_loss=loss_m.mean().detach())
    return loss, logs


# ----------------------------------------------------------------------------------------------------------------
# Recipe
# ----------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MDTv2Config(EDMConfig, RouteConfig):
    """MDTv2's flags: how the per-batch mask ratio is drawn, the loss weight, the optimizer, the split backward,
    the EDM constants (``--objective edm``) and TREAD routing."""

    mask_ratio_range: Tuple[float, float] = MASK_RATIO_RANGE
    min_snr_gamma: float = 5.0
    num_decoder_layers: Optional[int] = None
    no_masked_branch: bool = False
    mask_ratio_levels: int = 4
    split_branch_backward: bool = True
    use_adan: bool = False


class MDTv2Recipe(TrainingRecipe):
    """`TrainingRecipe` of MDTv2 (see the module docstring for the loss)."""

    name = "mdt"
    model_cls = MDTv2Transformer2DModel
    pipeline_cls = MDTv2Pipeline
    config_cls = MDTv2Config
    model_card = "mdtv2.md"
    supports_text = True  # --conditioning text: cross-attention to the caption + pooled caption in adaLN
    default_objective = "epsilon"
    default_mask_ratio = DEFAULT_MASK_RATIO
    mask_ratio_help = ("Fix the share of masked tokens (MDT v1 style); default: one ratio per batch drawn from "
                       "--mask_ratio_range (MDTv2).")
    # Small model for the no-argument CPU run on Fashion-MNIST (28 x 28 pixels, 1 channel; 7 x 7 tokens).
    demo_model_config: Dict[str, Any] = dict(
        patch_size=4, hidden_size=128, num_layers=6, num_decoder_layers=2, num_attention_heads=4
    )
    demo_defaults: Dict[str, Any] = dict(max_train_steps=1500, train_batch_size=128, learning_rate=3e-4,
                                         lr_warmup_steps=100, use_ema=True, ema_decay=0.999,
                                         checkpointing_steps=500, validation_steps=500)

    def __init__(self):
        self._vlb: Optional[LearnedVarianceVLB] = None

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        d = MDTv2Config()
        parser.add_argument("--mask_ratio_range", type=float, nargs=2, default=list(d.mask_ratio_range),
                            metavar=("LOW", "HIGH"),
                            help="MDTv2 draws one mask ratio per batch from U[LOW, HIGH); --mask_ratio fixes it (v1).")
        parser.add_argument("--min_snr_gamma", type=float, default=d.min_snr_gamma,
                            help="Timestep weight min(SNR, gamma)/SNR of the MSE term (MDTv2); 0 = unweighted (v1).")
        parser.add_argument("--num_decoder_layers", type=int, default=None, help="Override the decoder depth.")
        parser.add_argument("--no_masked_branch", action="store_true",
                            help="Train only the full (unmasked) branch: a plain DiT-style baseline.")
        parser.add_argument("--mask_ratio_levels", type=int, default=d.mask_ratio_levels,
                            help="Quantise the per-batch ratio to this many bin centres of the range (0 = continuous "
                            "as the official code; quantised ratios avoid torch.compile recompiles).")
        parser.add_argument("--split_branch_backward", action=argparse.BooleanOptionalAction,
                            default=d.split_branch_backward,
                            help="Back-propagate the full branch before running the masked one: same gradients, the "
                            "activation memory of one branch instead of two. Single-process and DDP runs; "
                            "--no-split_branch_backward for one backward of the summed loss.")
        parser.add_argument("--use_adan", action="store_true",
                            help="Adan optimizer (betas 0.98/0.92/0.99) as the official MDTv2 training; lr, weight "
                            "decay and epsilon come from --learning_rate / --adam_weight_decay / --adam_epsilon.")
        add_edm_arguments(parser, d)
        add_route_arguments(parser, "encoder")

    def check_config(self, config: TrainConfig, error: UsageError) -> None:
        c: MDTv2Config = config.recipe
        low, high = c.mask_ratio_range
        if not 0.0 <= low <= high < 1.0:
            paper = " ".join(f"{v:g}" for v in MASK_RATIO_RANGE)
            error(f"--mask_ratio_range {low:g} {high:g}: LOW and HIGH must satisfy 0 <= LOW <= HIGH < 1 "
                  f"(MDTv2's default: {paper}).")
        if c.mask_ratio_levels < 0:
            error(f"--mask_ratio_levels {c.mask_ratio_levels}: must be >= 0 (0 = continuous ratios).")
        if c.num_decoder_layers is not None and c.num_decoder_layers < 1:
            error(f"--num_decoder_layers {c.num_decoder_layers}: must be >= 1.")
        check_route_config(c, error)

    def setup(self, ctx: TrainContext) -> None:
        if ctx.config.recipe.split_branch_backward and ctx.backward_part is None and ctx.accelerator is not None:
            logger.warning("--split_branch_backward is for single-process and DDP runs; %s uses one joint backward.",
                           ctx.accelerator.distributed_type)

    def build_objective(self, ctx: TrainContext) -> Objective:
        name = ctx.config.model.objective
        if name == "edm":
            return edm_objective(ctx)
        if name not in ("epsilon", "v_prediction"):
            raise ValueError(
                f"MDTv2 trains with the DDPM objective and a learned variance (or EDM); --objective {name} is not "
                "supported. Use --objective epsilon (the paper), v_prediction or edm."
            )
        return DDPMObjective(prediction_type=name, learned_variance=True)

    def model_overrides(self, ctx: TrainContext) -> Dict[str, Any]:
        c: MDTv2Config = ctx.config.recipe
        # The learned variance belongs to the DDPM loss (its VLB term); EDM predicts the denoised sample only.
        overrides: Dict[str, Any] = dict(learn_sigma=ctx.config.model.objective != "edm", out_channels=None)
        if c.num_decoder_layers is not None:
            overrides["num_decoder_layers"] = c.num_decoder_layers
        overrides.update(route_overrides(c))
        return overrides

    def build_pipeline(self, transformer, scheduler, vae, ctx: TrainContext):
        # The official sampler respaces with linspace (steps {0, 4, ..., 999} for 250), not DDPM's "leading" default.
        scheduler = type(scheduler).from_config(scheduler.config, timestep_spacing="linspace")
        return super().build_pipeline(transformer, scheduler, vae, ctx)

    def build_optimizer(self, params: List[torch.nn.Parameter], ctx: TrainContext) -> Optional[torch.optim.Optimizer]:
        if not ctx.config.recipe.use_adan:
            return None  # the trainer's AdamW
        from .optimizers import Adan

        o = ctx.config.optim
        return Adan(params, lr=o.learning_rate, weight_decay=o.adam_weight_decay, eps=o.adam_epsilon)

    def mask_ratio(self, ctx: TrainContext) -> float:
        """One ratio per batch from ``U[--mask_ratio_range)`` (MDTv2), or ``--mask_ratio`` when given (v1);
        0 in the final unmasked fine-tuning steps or with ``--no_masked_branch``."""
        c: MDTv2Config = ctx.config.recipe
        if c.no_masked_branch or ctx.finetuning:
            return 0.0
        if ctx.config.model.mask_ratio is not None:
            return float(ctx.config.model.mask_ratio)
        low, high = c.mask_ratio_range
        if not 0.0 <= low <= high < 1.0:
            raise ValueError(f"--mask_ratio_range must satisfy 0 <= LOW <= HIGH < 1, got {low} {high}.")
        # The ratio fixes the number of kept tokens (a shape), so it must be a Python number. Reading it from the
        # run's (device) generator would wait for the GPU every step; a host RNG keyed by (seed, process, step) costs
        # nothing and resumes exactly, since it carries no state of its own.
        rank = ctx.accelerator.process_index if ctx.accelerator is not None else 0
        u = random.Random(f"mdtv2-mask-ratio:{ctx.config.seed}:{rank}:{ctx.step}").random()
        if c.mask_ratio_levels:
            # A few fixed ratios (bin centres, same mean as the uniform draw) keep the number of kept-token shapes
            # small, so torch.compile builds a handful of graphs instead of one per ratio.
            u = (math.floor(u * c.mask_ratio_levels) + 0.5) / c.mask_ratio_levels
        return low + (high - low) * u

    @staticmethod
    def mask_ratio_varies(config: TrainConfig) -> bool:
        """Whether `mask_ratio` draws more than one ratio over the masked steps (not with --mask_ratio, a single
        level or an empty range)."""
        c: MDTv2Config = config.recipe
        low, high = c.mask_ratio_range
        return config.model.mask_ratio is None and low < high and c.mask_ratio_levels != 1

    def compute_loss(self, model: torch.nn.Module, batch: Dict[str, torch.Tensor], ctx: TrainContext) -> LossOutput:
        cond = self.conditioning_kwargs(batch, ctx)
        ratio = self.mask_ratio(ctx)
        if isinstance(ctx.objective, DDPMObjective) and (self._vlb is None or self._vlb.objective is not ctx.objective):
            self._vlb = LearnedVarianceVLB(ctx.objective)
        c: MDTv2Config = ctx.config.recipe
        backward_part = ctx.backward_part if c.split_branch_backward else None
        loss, logs = mdtv2_loss(model, ctx.objective, batch["x0"], cond, ratio, c.min_snr_gamma, ctx.generator,
                                route_ratio_at(ctx), backward_part, bare=ctx.model, vlb=self._vlb,
                                varying_keep=self.mask_ratio_varies(ctx.config))
        # Without masking the side-interpolater gets no gradient.
        unused = list(ctx.model.side_interpolater.parameters()) if ratio == 0 else []
        return LossOutput(loss, {"mask_ratio": ratio, **logs}, unused=unused)

    def card_fields(self, ctx: TrainContext) -> Dict[str, Any]:
        c: MDTv2Config = ctx.config.recipe
        if c.no_masked_branch:
            masking = "none (full branch only)"
        elif ctx.config.model.mask_ratio is not None:
            masking = f"fixed {ctx.config.model.mask_ratio}"
        else:
            masking = f"U[{c.mask_ratio_range[0]}, {c.mask_ratio_range[1]}) per batch"
        # (`mask_ratio` itself is filled by the trainer; this adds how it was drawn.)
        objective = ctx.config.model.objective
        if objective == "edm":
            described, weight = "edm (EDM denoising loss, no learned variance)", "EDM's (unused: --min_snr_gamma)"
        else:
            described, weight = f"{objective} + learned-variance VLB", f"min(SNR, {c.min_snr_gamma}) / SNR"
        return {"mask_ratio_schedule": masking, "min_snr_gamma": c.min_snr_gamma, "objective_description": described,
                "timestep_weight": weight,
                "optimizer": "Adan" if c.use_adan else "AdamW"}
