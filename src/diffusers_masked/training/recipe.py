"""What the shared trainer needs to know about one model family (a "recipe").

The trainer (`trainer.py`) owns everything common: data, accelerate, optimizer, EMA, checkpoints, validation,
saving and pushing. A recipe adds the model-specific parts: flags, model construction, the loss, and the pipeline.
Subclass `TrainingRecipe` and pass an instance to `diffusers_masked.training.main`.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any, Dict, List, Optional, Tuple

import torch

from ..models.masking import random_ids_keep
from .objectives import Objective, build_objective


def draw_ids_keep(
    model: torch.nn.Module, batch_size: int, mask_ratio: float, device: torch.device,
    generator: Optional[torch.Generator],
) -> Optional[torch.Tensor]:
    """Kept-token ids (B, K) of a fresh random mask for ``model``, or None when ``mask_ratio`` is 0.

    The losses draw the mask here and hand the model ``ids_keep`` instead of the generator: a ``torch.Generator``
    argument cannot be traced by dynamo, so the model drawing its own mask put a graph break in every compiled
    training forward. The draw consumes the generator exactly as the model's own draw did, so runs are unchanged.
    """
    if mask_ratio == 0:
        return None
    inner = getattr(model, "module", model)  # DDP; a compiled module forwards attribute reads
    return random_ids_keep(batch_size, inner.num_tokens, mask_ratio, device=device, generator=generator)


# ---- TREAD routing as a knob of the masked recipes (MaskDiT, MDTv2, DeferredMaskDiT) -------------------------------
# The DiT recipe (recipe_dit.py) routes by default and declares its own flags; these recipes route only on request.
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


def check_route_args(args: argparse.Namespace, error) -> None:
    """Usage errors for the routing flags (the span itself is checked by the model, which knows its depth)."""
    r = args.route_ratio
    if not 0 <= r < 1:
        error(f"--route_ratio {r:g}: the share of routed tokens must be in [0, 1) (0 = off; the TREAD paper: 0.5).")
    if r == 0 and (args.route_start is not None or args.route_end is not None):
        error("--route_start / --route_end set a routing span, but --route_ratio is 0 (routing off): add e.g. "
              "--route_ratio 0.5, or drop the span flags.")


def route_overrides(args: argparse.Namespace) -> Dict[str, Any]:
    """Model config keys of the routing span flags (only those given, so a loaded config keeps its own)."""
    # (getattr: callers may pass a namespace built without the routing flags)
    return {k: getattr(args, k) for k in ("route_start", "route_end") if getattr(args, k, None) is not None}


def route_ratio_at(args: argparse.Namespace, step: int) -> float:
    """Route ratio of optimizer step ``step``: ``--route_ratio``, but 0 in the final --unmasked_finetune_steps."""
    if step >= args.max_train_steps - args.unmasked_finetune_steps:
        return 0.0
    return float(getattr(args, "route_ratio", 0.0))


def draw_route_ids(
    batch_size: int, num_tokens: int, ids_keep: Optional[torch.Tensor], route_ratio: float, device: torch.device,
    generator: Optional[torch.Generator],
) -> Optional[torch.Tensor]:
    """Ids (B, K') of the tokens that go through the routed span, among the K tokens the routed stack sees (the
    kept ones of ``ids_keep``, else all ``num_tokens``); None when ``route_ratio`` is 0. Drawn here and passed as
    ``route_ids`` for the reason `draw_ids_keep` gives (a generator argument would break the compiled graph)."""
    if route_ratio == 0:
        return None
    k = ids_keep.shape[1] if ids_keep is not None else num_tokens
    return random_ids_keep(batch_size, k, route_ratio, device=device, generator=generator)


class TrainingRecipe:
    """Base recipe for class-conditional masked transformers.

    Class attributes a subclass sets:
        name: Short name ("maskdit"), used in logs and the default output folder.
        model_cls / pipeline_cls: The `ModelMixin` transformer and its pipeline.
        model_card: File name of the card template in ``model_cards/``.
        default_objective: ``"edm"``, ``"epsilon"`` or ``"v_prediction"``.
        default_mask_ratio: Mask ratio used when ``--mask_ratio`` is not given.
        default_unmasked_finetune_fraction: Share of the steps trained without masking at the end by default.
        demo_model_config: Config of the small model trained by the no-argument CPU run on Fashion-MNIST.
        demo_defaults: Flag defaults of that run (steps, batch size, learning rate, ...).
    """

    name = "base"
    model_cls: Any = None
    pipeline_cls: Any = None
    model_card = "maskdit.md"
    default_objective = "edm"
    default_mask_ratio = 0.5
    #: Share of --max_train_steps trained unmasked at the end when --unmasked_finetune_steps is not given.
    default_unmasked_finetune_fraction = 0.0
    demo_model_config: Dict[str, Any] = {}
    demo_defaults: Dict[str, Any] = {}
    conditioning = "class"
    #: Help of --mask_ratio for a recipe whose unset --mask_ratio means something other than
    #: ``default_mask_ratio`` (the flag then defaults to None); None = "the ratio, default default_mask_ratio".
    mask_ratio_help: Optional[str] = None

    # ---- flags -------------------------------------------------------------------------------------------------
    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        """Model-specific flags."""

    def check_args(self, args: argparse.Namespace, error) -> None:
        """Check the model-specific flags before anything loads; ``error(message)`` exits with a usage error
        (``parser.error``). The message names the flag, the value and the fix."""

    # ---- construction ------------------------------------------------------------------------------------------
    def setup(self, trainer: Any) -> None:
        """Called once after the data is known and before the model is built (e.g. to load a text encoder)."""

    def build_objective(self, args: argparse.Namespace) -> Objective:
        return build_objective(args.objective or self.default_objective, learned_variance=self.learned_variance(args))

    def learned_variance(self, args: argparse.Namespace) -> bool:
        return False

    def build_model(self, args: argparse.Namespace, sample_size: int, in_channels: int, num_classes: Optional[int]):
        """The randomly initialised model named by ``--model_config`` (a preset such as "S/2" or a config.json path),
        or the recipe's small demo model; size and channels always follow the data."""
        data_keys = dict(sample_size=sample_size, in_channels=in_channels, num_classes=num_classes)
        spec = args.model_config
        if spec is None:
            config = dict(self.demo_model_config)
        elif os.path.isfile(spec):
            with open(spec) as f:
                config = {k: v for k, v in json.load(f).items() if not k.startswith("_")}
        else:
            config = self.model_cls.preset_config(spec)
        for key, value in data_keys.items():
            if key in config and config[key] != value and spec is not None and os.path.isfile(spec):
                raise ValueError(
                    f"--model_config {spec} has {key}={config[key]} but the training data needs {key}={value}."
                )
        config.update(data_keys)
        config.update(self.model_overrides(args))
        return self.model_cls(**config)

    def model_overrides(self, args: argparse.Namespace) -> Dict[str, Any]:
        """Config keys set from flags (e.g. learn_sigma)."""
        return {}

    def build_pipeline(self, transformer, scheduler, vae, id2label: Optional[Dict[int, str]], trainer: Any):
        return self.pipeline_cls(transformer=transformer, scheduler=scheduler, vae=vae, id2label=id2label)

    # ---- training step -----------------------------------------------------------------------------------------
    def mask_ratio(self, args: argparse.Namespace, step: int, generator: Optional[torch.Generator]) -> float:
        """Mask ratio of the optimizer step ``step`` (0 during the final unmasked fine-tuning stage)."""
        if step >= args.max_train_steps - args.unmasked_finetune_steps:
            return 0.0
        return self.default_mask_ratio if args.mask_ratio is None else args.mask_ratio

    def conditioning_kwargs(
        self, batch: Dict[str, torch.Tensor], model, args: argparse.Namespace, generator: Optional[torch.Generator]
    ) -> Dict[str, torch.Tensor]:
        """Model keyword arguments for the batch: class labels with classifier-free-guidance dropout."""
        num_classes = model.config.num_classes
        if num_classes is None:
            return {}
        labels = batch["class_labels"]
        p = model.config.class_dropout_prob if args.class_dropout_prob is None else args.class_dropout_prob
        if p > 0:
            device = generator.device if generator is not None else labels.device
            drop = torch.rand(labels.shape, generator=generator, device=device).to(labels.device) < p
            labels = torch.where(drop, torch.full_like(labels, num_classes), labels)
        return {"class_labels": labels}

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
        """Scalar loss and a dict of detached values to log."""
        raise NotImplementedError

    # ---- validation ----------------------------------------------------------------------------------------------
    def validation_images(self, pipeline, trainer: Any, generator: torch.Generator) -> Tuple[List[Any], int]:
        """Images for the validation grid and the number of columns: ``--validation_images_per_class`` per class."""
        per_class = trainer.args.validation_images_per_class
        if pipeline.transformer.config.num_classes is None:
            out = pipeline(batch_size=8 * per_class, num_inference_steps=trainer.args.validation_inference_steps, generator=generator)
            return out.images, 8
        num_classes = pipeline.transformer.config.num_classes
        labels = list(range(num_classes))
        out = pipeline(
            class_labels=labels,
            num_images_per_prompt=per_class,
            guidance_scale=trainer.args.validation_guidance_scale,
            num_inference_steps=trainer.args.validation_inference_steps,
            generator=generator,
        )
        return out.images, per_class

    def eval_kwargs(self, trainer: Any) -> Dict[str, Any]:
        """Extra arguments of `evaluate_pipeline` (e.g. prompts for a text-to-image model)."""
        return {}

    def card_fields(self, trainer: Any) -> Dict[str, Any]:
        """Extra fields for the model card template."""
        return {}
