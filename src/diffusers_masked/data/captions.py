"""Captioned image data for text-to-image training, as diffusers' text-to-image examples take it: an HF `datasets`
data set (a `datasets.Dataset`, a name in the local cache, a local data folder or a ``save_to_disk`` folder) or an
image folder with a ``metadata.jsonl`` (``{"file_name": "0001.png", "text": "a bag at top left"}`` per line),
loaded by `datasets.load_dataset("imagefolder", data_dir=...)`.

A caption field is a string or a list of strings (several captions per image: one is picked at random per step,
`pick_caption_indices`). Captions are checked once on load: a missing column lists the columns that exist, empty
captions name their rows. Caption dropout for classifier-free guidance (`caption_dropout_mask`) replaces a caption by
the unconditional one; with cached embeddings (`data.text_cache`) that is the all-zero caption embedding, as the
DeferredMaskDiT recipe and pipeline do (see `data.text_cache.unconditional_embedding`).

Usage::

    ds = load_captioned_dataset(train_data_dir="scenes/", caption_column="text")   # or dataset_name=..., dataset=...
    captions = read_captions(ds, "text")          # List[List[str]]: the captions of each image, checked
    images = ImageClassDataset(ds, "image", None, resolution=64, channels=1)   # pixel part (data/images.py)
    # text part: data.text_cache.build_text_cache(captions, ...) and CaptionedImageDataset(images, cache, ...)
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

if TYPE_CHECKING:
    import datasets

DEFAULT_CAPTION_COLUMN = "text"
DEFAULT_IMAGE_COLUMN = "image"

#: Rows named in an error message at most (the count of all bad rows is given too).
_MAX_ROWS_SHOWN = 10

PathLike = Union[str, os.PathLike]


def _is_saved_dataset(folder: Path) -> bool:
    # `Dataset.save_to_disk` writes state.json (+ dataset_info.json); `DatasetDict.save_to_disk` writes
    # dataset_dict.json. Such folders load with `load_from_disk`, not `load_dataset`.
    return (folder / "state.json").is_file() or (folder / "dataset_dict.json").is_file()


def load_captioned_dataset(
    dataset: Union["datasets.Dataset", PathLike, None] = None,
    *,
    dataset_name: Optional[str] = None,
    train_data_dir: Optional[PathLike] = None,
    dataset_config_name: Optional[str] = None,
    split: str = "train",
    cache_dir: Optional[PathLike] = None,
    image_column: str = DEFAULT_IMAGE_COLUMN,
    caption_column: str = DEFAULT_CAPTION_COLUMN,
    max_train_samples: Optional[int] = None,
) -> "datasets.Dataset":
    """The captioned training `datasets.Dataset`, checked for its image and caption columns and empty captions.

    Exactly one source: ``dataset`` (a `datasets.Dataset` object, or a name / folder as ``dataset_name``),
    ``dataset_name`` (a `save_to_disk` folder, a local data folder, or a Hub name already in the local `datasets`
    cache: `load_dataset(name, dataset_config_name, split=split, cache_dir=cache_dir)`; with ``HF_DATASETS_OFFLINE``
    nothing is downloaded) or ``train_data_dir`` (an image folder with ``metadata.jsonl``).

    Args:
        image_column, caption_column: Column names (``--image_column``, ``--caption_column``).
        max_train_samples: Keep only the first rows (a quick run).

    Raises:
        ValueError: no or several sources, an empty data set, a missing column (the error lists the columns that
            exist), empty captions (the error names the rows).
    """
    import datasets

    if dataset is not None and not isinstance(dataset, (datasets.Dataset, datasets.DatasetDict)):
        if dataset_name is not None:
            raise ValueError("Pass the data set either as `dataset` or as `dataset_name`, not both.")
        dataset_name, dataset = str(dataset), None
    sources = [name for name, value in (("dataset", dataset), ("dataset_name", dataset_name),
                                        ("train_data_dir", train_data_dir)) if value is not None]
    if len(sources) != 1:
        raise ValueError(
            "Pass exactly one of --dataset_name and --train_data_dir (or a datasets.Dataset)"
            + (f"; got {', '.join(sources)}." if sources else ".")
        )
    hint = ""
    if dataset is not None:
        ds = dataset
    elif train_data_dir is not None:
        root = Path(train_data_dir)
        if not root.is_dir():
            raise FileNotFoundError(f"--train_data_dir {root} does not exist or is not a folder.")
        if not any(p.is_file() for p in root.rglob("*")):
            raise ValueError(f"--train_data_dir {root} is empty: put images and a metadata.jsonl in it.")
        if not any(root.rglob("metadata.jsonl")) and not any(root.rglob("metadata.csv")):
            hint = (f" {root} has no metadata.jsonl: add one with a line per image, e.g. "
                    f'{{"file_name": "0001.png", "{caption_column}": "a caption"}}.')
        ds = datasets.load_dataset("imagefolder", data_dir=str(root), split=split,
                                   cache_dir=str(cache_dir) if cache_dir else None)
    else:
        folder = Path(dataset_name).expanduser()
        if folder.is_dir() and _is_saved_dataset(folder):
            ds = datasets.load_from_disk(str(folder))
        else:
            ds = datasets.load_dataset(dataset_name, dataset_config_name, split=split,
                                       cache_dir=str(cache_dir) if cache_dir else None)
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise ValueError(f"The data set has no split {split!r}; its splits are {list(ds)}.")
        ds = ds[split]
    if len(ds) == 0:
        raise ValueError("The captioned training data set is empty.")
    check_caption_columns(ds, image_column, caption_column, hint=hint)
    if max_train_samples:
        ds = ds.select(range(min(int(max_train_samples), len(ds))))
    read_captions(ds, caption_column)  # fail early on empty captions, before any encoder is loaded
    return ds


def _text_columns(ds) -> List[str]:
    """Columns holding strings or lists of strings: the likely caption columns."""
    import datasets

    names = []
    for name, feature in ds.features.items():
        inner = getattr(feature, "feature", feature)  # List / Sequence of strings
        if isinstance(inner, datasets.Value) and inner.dtype in ("string", "large_string"):
            names.append(name)
    return names


def check_caption_columns(ds, image_column: Optional[str] = DEFAULT_IMAGE_COLUMN,
                          caption_column: str = DEFAULT_CAPTION_COLUMN, hint: str = "") -> None:
    """Raise a ValueError listing the data set's columns when ``image_column`` (if given) or ``caption_column`` is
    missing, with the text columns as the likely ``--caption_column``."""
    columns = list(ds.column_names)
    if caption_column not in columns:
        text = [c for c in _text_columns(ds) if c != image_column]
        suggestion = f" The text columns are {text}: pass --caption_column {text[0]}." if text else ""
        raise ValueError(
            f"--caption_column {caption_column!r} is not a column of the data set; its columns are {columns}."
            + suggestion + hint
        )
    if image_column is not None and image_column not in columns:
        raise ValueError(
            f"--image_column {image_column!r} is not a column of the data set; its columns are {columns}; pass "
            "the right name."
        )


def _bad_caption(value: Any) -> bool:
    return not isinstance(value, str) or not value.strip()


def read_captions(ds, caption_column: str = DEFAULT_CAPTION_COLUMN) -> List[List[str]]:
    """The captions of every row, in order, as lists (one caption -> a list of one), checked.

    Raises a ValueError naming the rows with a missing / empty caption (``None``, ``""``, blanks, an empty list or
    one holding an empty or non-string entry): captions must say something for the text encoder to read."""
    check_caption_columns(ds, None, caption_column)
    column = ds.with_format(None)[caption_column]
    captions: List[List[str]] = []
    bad: List[int] = []
    for row, value in enumerate(column):
        items = list(value) if isinstance(value, (list, tuple)) else [value]
        if not items or any(_bad_caption(v) for v in items):
            bad.append(row)
            continue
        captions.append([str(v) for v in items])
    if bad:
        shown = ", ".join(str(r) for r in bad[:_MAX_ROWS_SHOWN]) + (", ..." if len(bad) > _MAX_ROWS_SHOWN else "")
        first = column[bad[0]]
        raise ValueError(
            f"{len(bad)} row(s) of caption column {caption_column!r} have no usable caption (rows {shown}; row "
            f"{bad[0]} is {first!r}). Give every image a non-empty caption (or a non-empty list of them), or "
            "remove those rows (e.g. `ds.filter(...)`)."
        )
    return captions


def caption_offsets(captions: Sequence[Sequence[str]]) -> np.ndarray:
    """(N + 1,) int64 start of each image's captions in the flat list of all captions (image i owns
    ``offsets[i]:offsets[i + 1]``), so a per-(image, caption) cache is indexed without per-image lists."""
    counts = np.fromiter((len(c) for c in captions), dtype=np.int64, count=len(captions))
    return np.concatenate([np.zeros(1, dtype=np.int64), np.cumsum(counts)])


def flatten_captions(captions: Sequence[Sequence[str]]) -> List[str]:
    """All captions in order: image 0's, then image 1's, ... (the row order of the text cache)."""
    return [c for per_image in captions for c in per_image]


def captions_fingerprint(captions: Sequence[Sequence[str]]) -> str:
    """sha256 of the captions in order, grouped by image: changes with any caption, the order, or the grouping."""
    digest = hashlib.sha256()
    for per_image in captions:
        digest.update(json.dumps(list(per_image), ensure_ascii=False).encode("utf-8"))
        digest.update(b"\n")
    return digest.hexdigest()


def pick_caption_indices(
    offsets: Union[np.ndarray, torch.Tensor],
    image_indices: Union[Sequence[int], torch.Tensor],
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """One caption per image, uniformly among its captions: flat caption indices (B,) int64 into the cache.

    One ``torch.rand`` call per batch (cheap enough to run every step); the same ``generator`` state gives the same
    picks. ``offsets`` as `caption_offsets`."""
    offsets = torch.as_tensor(np.asarray(offsets), dtype=torch.long)
    idx = torch.as_tensor(image_indices, dtype=torch.long).reshape(-1)
    start = offsets[idx]
    counts = offsets[idx + 1] - start
    u = torch.rand(idx.shape[0], generator=generator, dtype=torch.float64)
    # float64 so floor(u * count) < count for any count; the clamp is only a guard.
    return start + torch.minimum((u * counts).long(), counts - 1)


def caption_dropout_mask(batch_size: int, caption_dropout_prob: float,
                         generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """(B,) bool, True = replace this sample's caption by the unconditional one (classifier-free guidance)."""
    if not 0.0 <= caption_dropout_prob <= 1.0:
        raise ValueError(f"caption_dropout_prob must be in [0, 1], got {caption_dropout_prob!r}.")
    u = torch.rand(batch_size, generator=generator)
    return u < caption_dropout_prob


def pick_captions(
    captions: Sequence[Sequence[str]],
    image_indices: Union[Sequence[int], torch.Tensor],
    generator: Optional[torch.Generator] = None,
    caption_dropout_prob: float = 0.0,
) -> Tuple[List[str], torch.Tensor]:
    """Caption texts for a batch without a cache (to encode on the fly): one random caption per image and the
    (B,) bool dropout mask. Draws as `pick_caption_indices` then `caption_dropout_mask`, the order
    `data.text_cache.TextEmbeddingCache.lookup` uses, so both paths pick alike from the same generator state.

    The unconditional caption of our models is the all-zero *embedding*, not the embedding of ``""``: encode the
    texts and zero the rows where the mask is True (`data.text_cache.apply_caption_dropout`)."""
    flat = flatten_captions(captions)
    picked = pick_caption_indices(caption_offsets(captions), image_indices, generator)
    drop = caption_dropout_mask(picked.shape[0], caption_dropout_prob, generator)
    return [flat[i] for i in picked.tolist()], drop
