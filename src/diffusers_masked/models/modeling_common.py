"""Helpers the transformers share outside their blocks: the output type, input and constructor checks, presets and
loading (config checks, retired config keys, weight-file errors). The shared model code is `transformer_base`."""

from __future__ import annotations

import logging
import numbers
import re
from dataclasses import dataclass
from typing import Any, Dict, Iterable, Optional, Union

import torch
from diffusers.utils import BaseOutput

from . import masking

logger = logging.getLogger(__name__)



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
            raise ValueError(
                f"This {name} is {conditioning_description(model)}, so it takes no class_labels"
                + ("; pass encoder_hidden_states (caption embeddings) instead." if is_text_model(model) else ".")
            )
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
    if not _is_compiling() and not masking.in_device_training_step(class_labels):
        # One small host sync per call. Skipped inside torch.compile and in training steps on an accelerator (labels
        # there come from the trainer's checked data), so those stay free of device syncs.
        lo, hi = int(class_labels.min()), int(class_labels.max())
        if lo < 0 or hi > num_classes:
            raise ValueError(
                f"class id out of range: got ids in [{lo}, {hi}], valid ids are 0..{num_classes - 1} "
                f"and {num_classes} for the unconditional class."
            )
    return class_labels


def is_text_model(model: Any) -> bool:
    return getattr(model.config, "caption_channels", None) is not None


def conditioning_description(model: Any) -> str:
    """``"class-conditional (num_classes=10)"``, ``"text-conditioned (caption_channels=1024)"`` or
    ``"unconditional (num_classes=None)"``, for messages."""
    cfg = model.config
    if is_text_model(model):
        return f"text-conditioned (caption_channels={cfg.caption_channels})"
    if getattr(cfg, "num_classes", None) is not None:
        return f"class-conditional (num_classes={cfg.num_classes})"
    return "unconditional (num_classes=None)"


def check_no_text_input(model: Any, encoder_hidden_states: Optional[torch.Tensor]) -> None:
    """For models without text conditioning: refuse caption embeddings, naming what the model does take."""
    if encoder_hidden_states is not None:
        takes = "class_labels" if getattr(model.config, "num_classes", None) is not None else "no conditioning input"
        raise ValueError(
            f"This {type(model).__name__} is {conditioning_description(model)} with no text conditioning; it takes "
            f"{takes}, not encoder_hidden_states."
        )


def training_mask_ratio_hint(model: Any) -> str:
    """The model's usual training mask ratio (its paper default), in words, for the mask-ratio error."""
    ratio_range = getattr(model, "mask_ratio_range", None)
    if ratio_range is not None:
        return f"a ratio in [{ratio_range[0]}, {ratio_range[1]}) (MDTv2 draws one per batch)"
    ratio = getattr(model, "default_mask_ratio", None)
    return f"e.g. {ratio}" if ratio is not None else "a ratio in (0, 1)"


#: Sanity limits of the constructor checks: far above every published configuration, low enough that a typo (an
#: extra zero, ``num_layers=10**6``) fails at once instead of allocating for minutes. To build something larger,
#: raise the entry, e.g. ``diffusers_masked.models.modeling_common.SIZE_LIMITS["layers"] = 4096``.
SIZE_LIMITS: Dict[str, int] = {
    "layers": 1024,
    "width": 65536,
    "heads": 1024,
    "channels": 4096,
    "sample_size": 8192,
    "num_tokens": 16384,
    "num_classes": 1_000_000,
    "experts": 1024,
}


def _limit_hint(limit: str) -> str:
    return (
        f"the sanity limit SIZE_LIMITS[{limit!r}]={SIZE_LIMITS[limit]} (a typo?); to build a model this large, raise "
        f"diffusers_masked.models.modeling_common.SIZE_LIMITS[{limit!r}] first"
    )


def check_int_arg(
    owner: str, name: str, value: Any, minimum: int = 1, limit: Optional[str] = None, allow_none: bool = False
) -> None:
    """Raise a ValueError unless ``value`` is an integer >= ``minimum`` (and <= ``SIZE_LIMITS[limit]``)."""
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        none = " or None" if allow_none else ""
        raise ValueError(f"{owner}: {name} must be an integer{none}, got {value!r} ({type(value).__name__}).")
    if value < minimum:
        raise ValueError(f"{owner}: {name} must be >= {minimum}, got {value}.")
    if limit is not None and value > SIZE_LIMITS[limit]:
        raise ValueError(f"{owner}: {name}={value} is above {_limit_hint(limit)}.")


def check_number_arg(
    owner: str,
    name: str,
    value: Any,
    low: Optional[float] = None,
    high: Optional[float] = None,
    low_open: bool = False,
    high_open: bool = False,
) -> None:
    """Raise a ValueError unless ``value`` is a real number in the given interval (open or closed ends)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or value != value:
        raise ValueError(f"{owner}: {name} must be a number, got {value!r} ({type(value).__name__}).")
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and (value >= high if high_open else value > high)
    if too_low or too_high:
        lo = "(-inf" if low is None else ("(" if low_open else "[") + f"{low}"
        hi = "inf)" if high is None else f"{high}" + (")" if high_open else "]")
        raise ValueError(f"{owner}: {name} must be in {lo}, {hi}, got {value}.")


def check_divisible(owner: str, name: str, value: int, divisor_name: str, divisor: int) -> None:
    if value % divisor:
        raise ValueError(f"{owner}: {name}={value} must be divisible by {divisor_name}={divisor}.")


def check_common_model_args(
    owner: str,
    sample_size: Any,
    patch_size: Any,
    in_channels: Any,
    out_channels: Any,
    num_classes: Any,
    class_dropout_prob: Any,
    norm_eps: Any,
    widths: Iterable[tuple] = (),
    depths: Iterable[tuple] = (),
) -> None:
    """Constructor checks every model shares, run before any weight is allocated.

    ``widths``: ``(name, width, heads_name, heads)`` per attention stack (``heads`` may be None when the stack
    fixes the head width instead); ``depths``: ``(name, layers, minimum)`` per block stack."""
    check_int_arg(owner, "sample_size", sample_size, limit="sample_size")
    check_int_arg(owner, "patch_size", patch_size, limit="sample_size")
    if sample_size % patch_size:
        raise ValueError(
            f"{owner}: sample_size={sample_size} must be divisible by patch_size={patch_size} (the model cuts the "
            "input into patch_size x patch_size patches)."
        )
    num_tokens = (sample_size // patch_size) ** 2
    if num_tokens > SIZE_LIMITS["num_tokens"]:
        raise ValueError(
            f"{owner}: sample_size={sample_size} with patch_size={patch_size} gives {num_tokens} tokens, above "
            f"{_limit_hint('num_tokens')}."
        )
    check_int_arg(owner, "in_channels", in_channels, limit="channels")
    check_int_arg(owner, "out_channels", out_channels, limit="channels", allow_none=True)
    check_int_arg(owner, "num_classes", num_classes, limit="num_classes", allow_none=True)
    check_number_arg(owner, "class_dropout_prob", class_dropout_prob, 0.0, 1.0, high_open=True)
    check_number_arg(owner, "norm_eps", norm_eps, 0.0, low_open=True)
    for name, layers, minimum in depths:
        check_int_arg(owner, name, layers, minimum=minimum, limit="layers")
    for name, width, heads_name, heads in widths:
        check_int_arg(owner, name, width, limit="width")
        if heads is not None:
            check_int_arg(owner, heads_name, heads, limit="heads")
            check_divisible(owner, name, width, heads_name, heads)


#: Config keys a saved config must state: they fix the input the model accepts, so a default would build a model
#: for other data without a word.
REQUIRED_CONFIG_KEYS = ("sample_size", "patch_size", "in_channels")

_DIFFUSERS_WEIGHTS_ERROR = re.compile(r"Unable to load weights from checkpoint file for '(?P<path>.+?)'")


def _root_cause(error: BaseException) -> BaseException:
    """The first exception of ``error``'s chain (diffusers re-raises a safetensors error two handlers deep)."""
    seen = set()
    while id(error) not in seen:
        seen.add(id(error))
        nxt = error.__cause__ or error.__context__
        if nxt is None:
            break
        error = nxt
    return error


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


def explain_weights_error(error: OSError, what: str) -> Optional[OSError]:
    """For diffusers' reasonless "Unable to load weights from checkpoint file" error: an OSError that adds the file,
    the reader's own error (e.g. safetensors' "incomplete metadata, file not fully covered" for a truncated file) and
    the fix; `None` for any other error. ``what`` names the weights (e.g. "MaskDiTTransformer2DModel weights")."""
    match = _DIFFUSERS_WEIGHTS_ERROR.search(str(error))
    if match is None:
        return None
    cause = _root_cause(error)
    reason = f"{type(cause).__name__}: {cause}" if cause is not error else "unreadable file"
    explained = OSError(
        f"Could not load the {what} from {match.group('path')}: {reason}. The file is damaged or incomplete (an "
        "interrupted download, copy or save): download it again (from_pretrained(..., force_download=True) for a "
        "Hub model) or write it again with save_pretrained."
    )
    explained.__cause__ = cause
    return explained


class MaskedModelMixin(PresetMixin):
    """What the models add to diffusers' loading: presets, a config check, retired config keys and weight-file errors
    that say why."""

    #: Config keys that older versions saved but that are no longer constructor arguments: key -> why it left (e.g.
    #: a training setting that moved to the training recipe). `from_config` / `from_pretrained` drop them from a
    #: saved config with a note, so old model folders keep loading.
    _retired_config_keys: Dict[str, str] = {}

    @classmethod
    def _drop_retired_config_keys(cls, config: Dict[str, Any]) -> Dict[str, Any]:
        retired = [k for k in cls._retired_config_keys if k in config]
        if not retired:
            return config
        for key in retired:
            logger.warning(
                "%s: ignoring the config key %s=%r of an older version: %s Save the model again to drop it.",
                cls.__name__, key, config[key], cls._retired_config_keys[key],
            )
        return {k: v for k, v in config.items() if k not in retired}

    @classmethod
    def from_config(cls, config: Any = None, return_unused_kwargs: bool = False, **kwargs: Any):
        if isinstance(config, dict):
            config = cls._drop_retired_config_keys(config)
            missing = [k for k in REQUIRED_CONFIG_KEYS if k not in config and k not in kwargs]
            if missing:
                raise ValueError(
                    f"The {cls.__name__} config lacks {missing}; without them a default-sized model (e.g. "
                    f"sample_size=32, patch_size=2) would be built for other data. A config.json written by "
                    "save_pretrained always has them: add them to the file, or pass them as keyword arguments."
                )
        return super().from_config(config, return_unused_kwargs=return_unused_kwargs, **kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Any, **kwargs: Any):
        try:
            return super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        except OSError as err:
            explained = explain_weights_error(err, f"{cls.__name__} weights")
            if explained is None:
                raise
            raise explained from explained.__cause__
