"""What the three masked transformers share outside their blocks: the output type, input checks and presets."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional, Union

import torch
from diffusers.utils import BaseOutput

from .masking import check_mask_ratio


@dataclass
class MaskedTransformer2DModelOutput(BaseOutput):
    """Output of the masked transformers.

    Args:
        sample (`torch.Tensor` of shape (B, out_channels, H, W)): The prediction for every pixel / latent cell
            (masked positions included: the decoders predict them too).
        mask (`torch.BoolTensor` of shape (B, num_tokens), *optional*): True where a token was masked; `None` when
            nothing was masked (``mask_ratio == 0``).
    """

    sample: torch.Tensor
    mask: Optional[torch.Tensor] = None


def _is_compiling() -> bool:
    return torch.compiler.is_compiling()


def check_image_input(model: Any, hidden_states: torch.Tensor) -> None:
    """Shape checks shared by the models (free: no device sync)."""
    cfg = model.config
    name = type(model).__name__
    if not isinstance(hidden_states, torch.Tensor) or hidden_states.dim() != 4:
        shape = tuple(hidden_states.shape) if isinstance(hidden_states, torch.Tensor) else type(hidden_states)
        raise ValueError(f"{name} expects hidden_states of shape (batch, channels, height, width), got {shape}.")
    _, c, h, w = hidden_states.shape
    if c != cfg.in_channels:
        raise ValueError(
            f"{name} was built for in_channels={cfg.in_channels} but hidden_states has {c} channels. "
            "Use a model whose in_channels matches your data (e.g. 1 for grayscale pixels, 4 for SD-VAE latents)."
        )
    p = cfg.patch_size
    if h % p or w % p:
        raise ValueError(f"Height and width ({h}x{w}) must be divisible by patch_size={p}; resize or pad the input.")
    if h != cfg.sample_size or w != cfg.sample_size:
        raise ValueError(
            f"{name} has fixed position embeddings for a {cfg.sample_size}x{cfg.sample_size} input, got {h}x{w}. "
            f"Resize the input or build the model with sample_size={h} (square inputs)."
        )


def prepare_timestep(timestep: Union[torch.Tensor, float, int], batch_size: int, device: torch.device) -> torch.Tensor:
    """Scalar or (B,) timestep -> (B,) tensor on ``device``."""
    if not isinstance(timestep, torch.Tensor):
        timestep = torch.tensor([timestep], device=device)
    timestep = timestep.to(device)
    if timestep.dim() == 0:
        timestep = timestep[None]
    if timestep.dim() != 1 or timestep.shape[0] not in (1, batch_size):
        raise ValueError(
            f"timestep must be a scalar or have shape ({batch_size},), got shape {tuple(timestep.shape)}."
        )
    return timestep.expand(batch_size)


def check_class_labels(model: Any, class_labels: Optional[torch.Tensor], batch_size: int) -> Optional[torch.Tensor]:
    """Validate class ids; id ``num_classes`` is the unconditional (null) class."""
    num_classes = model.config.num_classes
    name = type(model).__name__
    if num_classes is None:
        if class_labels is not None:
            raise ValueError(f"{name} is unconditional (num_classes=None); do not pass class_labels.")
        return None
    if class_labels is None:
        raise ValueError(
            f"{name} is class-conditional (num_classes={num_classes}): pass class_labels of shape ({batch_size},); "
            f"use id {num_classes} for the unconditional (null) class."
        )
    if not isinstance(class_labels, torch.Tensor):
        class_labels = torch.as_tensor(class_labels)
    if class_labels.dim() == 0:
        class_labels = class_labels.expand(batch_size)
    if class_labels.shape != (batch_size,) or class_labels.is_floating_point():
        raise ValueError(
            f"class_labels must be an integer tensor of shape ({batch_size},), got {tuple(class_labels.shape)} "
            f"{class_labels.dtype}."
        )
    if not _is_compiling() and not (class_labels.is_cuda and torch.is_grad_enabled()):
        # One small host sync per call. Skipped inside torch.compile and in GPU training steps (labels there come
        # from the trainer's checked data), so those stay free of device syncs.
        lo, hi = int(class_labels.min()), int(class_labels.max())
        if lo < 0 or hi > num_classes:
            raise ValueError(
                f"class id out of range: got ids in [{lo}, {hi}], valid ids are 0..{num_classes - 1} "
                f"and {num_classes} for the unconditional class."
            )
    return class_labels


def check_masking_args(mask_ratio: float, ids_keep: Optional[torch.Tensor], num_tokens: int) -> None:
    check_mask_ratio(mask_ratio)
    if ids_keep is not None and (ids_keep.dim() != 2 or ids_keep.shape[1] > num_tokens):
        raise ValueError(f"ids_keep must have shape (batch, kept_tokens <= {num_tokens}), got {tuple(ids_keep.shape)}.")


class PresetMixin:
    """``from_preset("XL/2")``: build a model from a named size and patch size (see each model's table)."""

    #: size name -> config overrides; filled by each model class.
    _size_presets: Dict[str, Dict[str, Any]] = {}
    _patch_sizes = (2, 4, 8)

    @classmethod
    def available_presets(cls) -> list[str]:
        return [f"{size}/{p}" for size in cls._size_presets for p in cls._patch_sizes]

    @classmethod
    def preset_config(cls, name: str, **overrides: Any) -> Dict[str, Any]:
        """Config dict of preset ``name`` (e.g. "B/4"), with ``overrides`` applied."""
        key = name.split("-")[-1].upper()  # accept "DiT-XL/2" and "MDTv2-S/2" spellings too
        size, _, patch = key.partition("/")
        if size not in cls._size_presets or not patch.isdigit() or int(patch) not in cls._patch_sizes:
            raise ValueError(f"Unknown preset {name!r} for {cls.__name__}; choose one of {cls.available_presets()}.")
        config = dict(cls._size_presets[size])
        config["patch_size"] = int(patch)
        config.update(overrides)
        return config

    @classmethod
    def from_preset(cls, name: str, **overrides: Any):
        """Randomly initialised model of preset ``name`` (e.g. ``"XL/2"``); ``overrides`` change config keys."""
        return cls(**cls.preset_config(name, **overrides))
