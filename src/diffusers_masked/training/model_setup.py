"""Building what trains: the transformer (new, pretrained or with a LoRA adapter), its EMA, the optimizer and the
learning-rate schedule."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, List, Optional, Tuple

import torch

from .config import TrainConfig
from .context import DataInfo, TrainContext
from .recipe import TrainingRecipe

logger = logging.getLogger(__name__)


def without_ema_for_lora(config: TrainConfig) -> TrainConfig:
    """A LoRA run trains only the adapter, so it keeps no EMA; warn when --use_ema was passed (not when only a
    demo default turned it on)."""
    if not (config.model.lora_rank and config.optim.use_ema):
        return config
    if "use_ema" in config.explicit_flags:
        logger.warning("--use_ema is ignored in a LoRA run (only the adapter trains).")
    return config.replace("optim", use_ema=False)


def build_transformer(recipe: TrainingRecipe, ctx: TrainContext) -> Tuple[torch.nn.Module, Optional[torch.Tensor]]:
    """The transformer to train, in train mode, and the label lookup onto a pretrained model's class ids (or None).

    ``--pretrained_model_name_or_path`` loads the transformer of a saved pipeline (its input must match the data);
    otherwise the recipe builds a new one. Then gradient checkpointing and a LoRA adapter as the flags ask."""
    m, data = ctx.config.model, ctx.data
    lookup = None
    if m.pretrained_model_name_or_path:
        model = recipe.model_cls.from_pretrained(m.pretrained_model_name_or_path, subfolder="transformer")
        cfg = model.config
        if cfg.in_channels != data.channels or cfg.sample_size != data.sample_size:
            raise ValueError(
                f"The pretrained transformer takes {cfg.in_channels}x{cfg.sample_size}x{cfg.sample_size} inputs "
                f"but the data gives {data.channels}x{data.sample_size}x{data.sample_size}."
            )
        check_pretrained_conditioning(cfg, ctx)
        lookup = map_labels_to_pretrained(data, Path(m.pretrained_model_name_or_path), cfg.num_classes, ctx.device)
    else:
        model = recipe.build_model(ctx)
    if m.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    if m.lora_rank:
        from peft import LoraConfig

        model.requires_grad_(False)
        targets = [t.strip() for t in m.lora_target_modules.split(",") if t.strip()]
        model.add_adapter(LoraConfig(r=m.lora_rank, lora_alpha=m.lora_alpha or m.lora_rank,
                                     lora_dropout=m.lora_dropout, init_lora_weights="gaussian",
                                     target_modules=targets))
    model.train()
    return model, lookup


def check_pretrained_conditioning(model_config: Any, ctx: TrainContext) -> None:
    """A pretrained transformer must take the run's conditioning: captions of the encoder's width for a text run on
    captioned data, no captions for a class run."""
    width = model_config.get("caption_channels")
    source = ctx.config.model.pretrained_model_name_or_path
    if ctx.text is not None and width != ctx.text.width:
        kind = "class-conditional (no caption_channels)" if width is None else f"text-conditioned on {width}-d captions"
        raise ValueError(
            f"The pretrained transformer of {source} is {kind}, but this run's text encoder gives {ctx.text.width}-d "
            "caption embeddings: pass the --text_encoder_path it was trained with, or --conditioning class for a "
            "class-conditional model.")
    if not ctx.config.text.uses_text and width is not None:
        raise ValueError(
            f"The pretrained transformer of {source} is text-conditioned (caption_channels={width}), but this run "
            "trains on class labels: pass --conditioning text (and its captioned data).")


def map_labels_to_pretrained(data: DataInfo, pretrained: Path, num_classes: Optional[int],
                             device: torch.device) -> Optional[torch.Tensor]:
    """Fine-tuning data may name only some of the base model's classes (e.g. one class folder): map its class
    names onto the base model's ids by name so that labels keep their meaning. Updates ``data`` to the base
    model's classes and returns the lookup (data label -> model label), or None when no mapping is needed."""
    path = pretrained / "model_index.json"
    base = json.loads(path.read_text()).get("id2label") if path.is_file() else None
    if num_classes is None or not data.class_names:
        return None
    if not base:
        if len(data.class_names) != num_classes:
            raise ValueError(f"The data has {len(data.class_names)} classes, the pretrained model {num_classes}.")
        return None
    base = {int(k): v for k, v in base.items()}
    by_name = {}
    for idx, names in base.items():
        for name in str(names).split(","):
            by_name[name.strip()] = idx
    unknown = [n for n in data.class_names if n not in by_name]
    if unknown:
        raise ValueError(f"Class names {unknown} of the data are not classes of the pretrained model "
                         f"({sorted(by_name)}); name the class folders after the model's classes.")
    lookup = torch.tensor([by_name[n] for n in data.class_names], device=device)
    data.id2label, data.class_names = base, [base[i] for i in sorted(base)]
    return lookup


def build_ema(model: torch.nn.Module, config: TrainConfig, device: torch.device) -> Optional[Any]:
    """The EMA of the weights with --use_ema (diffusers' `EMAModel` state dict, one-lerp step), else None."""
    if not config.optim.use_ema:
        return None
    from .ema import LerpEMAModel

    ema = LerpEMAModel(model.parameters(), decay=config.optim.ema_decay, foreach=True, model_cls=type(model),
                       model_config=model.config)
    ema.to(device)
    return ema


def build_optimizer(recipe: TrainingRecipe, params: List[torch.nn.Parameter],
                    ctx: TrainContext) -> torch.optim.Optimizer:
    """The recipe's optimizer if it declares one, else AdamW from the --adam_* flags."""
    optimizer = recipe.build_optimizer(params, ctx)
    if optimizer is not None:
        return optimizer
    o = ctx.config.optim
    fused = torch.cuda.is_available() and ctx.device.type == "cuda"
    # Off CUDA, foreach: torch's default there is a per-tensor Python loop.
    return torch.optim.AdamW(params, lr=o.learning_rate, betas=(o.adam_beta1, o.adam_beta2),
                             weight_decay=o.adam_weight_decay, eps=o.adam_epsilon, fused=fused or None,
                             foreach=None if fused else True)


def build_lr_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig, num_processes: int):
    """diffusers' `get_scheduler`; accelerate steps a prepared scheduler once per process, hence the factor."""
    from diffusers.optimization import get_scheduler

    o = config.optim
    return get_scheduler(o.lr_scheduler, optimizer=optimizer, num_warmup_steps=o.lr_warmup_steps * num_processes,
                         num_training_steps=o.max_train_steps * num_processes)
