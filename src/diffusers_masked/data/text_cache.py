"""Caption embedding cache: the text encoder runs once over every caption, training reads memory-mapped arrays.

Layout of a cache folder (numpy ``.npy`` files, opened with ``mmap_mode="r"`` and ``allow_pickle=False``; JSON)::

    manifest.json          what the cache was built with (below); written last, so its presence means complete
    embeddings.npy         (num_captions, max_sequence_length, width) last hidden states, padding rows zeroed
                           (float16 / float32, or bfloat16 stored as its int16 bit pattern)
    attention_mask.npy     (num_captions, max_sequence_length) uint8, 1 = real token
    offsets.npy            (num_images + 1,) int64: image i owns caption rows offsets[i]:offsets[i + 1]
    captions.json          the captions in row order (for logs / validation prompts)

One row per (image, caption): several captions per image cost one row each, and a training step picks one per
sample with one `torch.rand` (`TextEmbeddingCache.lookup`). The manifest holds the encoder identity (class, hashes of
its config, weights and tokenizer, and its path for information), the encoder's dtype, ``max_sequence_length``, the
storage dtype, the data fingerprint (sha256 of the captions in order, grouped per image) and the caption counts. A
cache built with other settings is refused with an error naming each field that differs; nothing is overwritten.

Building: the main process encodes into ``<cache_dir>.partial/`` and renames it to ``<cache_dir>`` when done; every
``checkpoint_every`` captions it flushes the arrays and records its progress, so an interrupted build resumes where it
stopped. Other processes wait at ``wait_for_everyone`` (pass accelerate's ``accelerator.wait_for_everyone``) and then
open the finished cache.

The unconditional caption (classifier-free guidance) is the all-zero embedding with an all-ones attention mask: what
`DeferredMaskDiTPipeline.encode_prompt` feeds as the negative when no ``negative_prompt`` is given, and what the
DeferredMaskDiT recipe trains with (MicroDiT's convention). All caption tokens are then identical, so the model's
output does not depend on the mask; all-ones keeps every row non-empty and matches the pipeline exactly.

Usage (the trainer)::

    from diffusers_masked.data.captions import load_captioned_dataset, read_captions
    from diffusers_masked.data.images import ImageClassDataset, collate_batch
    from diffusers_masked.data.text_cache import CaptionedImageDataset, build_text_cache
    from diffusers_masked.utils.text_encoders import load_text_encoder

    ds = load_captioned_dataset(dataset_name=args.dataset_name, train_data_dir=args.train_data_dir,
                                image_column=args.image_column, caption_column=args.caption_column)
    text_encoder, tokenizer = load_text_encoder(args.text_encoder_path, accelerator.device,
                                                max_sequence_length=args.max_sequence_length)
    cache = build_text_cache(read_captions(ds, args.caption_column), text_encoder, tokenizer, args.text_cache_dir,
                             args.max_sequence_length, encoder_path=args.text_encoder_path,
                             is_main_process=accelerator.is_main_process,
                             wait_for_everyone=accelerator.wait_for_everyone)
    images = ImageClassDataset(ds, args.image_column, None, args.resolution, channels)  # or a LatentCacheDataset
    train = CaptionedImageDataset(images, cache, caption_dropout_prob=args.caption_dropout_prob,
                                  seed=args.seed + accelerator.process_index)
    loader = DataLoader(train, batch_size=..., shuffle=True, collate_fn=collate_batch)
    # batch: pixel_values (B, C, R, R) in [-1, 1], encoder_hidden_states (B, L, width) float32,
    #        encoder_attention_mask (B, L) int64, image_index, caption_index, caption_dropped (B,) bool
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch.utils.data import Dataset

from .captions import (
    caption_dropout_mask,
    caption_offsets,
    captions_fingerprint,
    flatten_captions,
    pick_caption_indices,
)

logger = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]

CACHE_FORMAT = "diffusers_masked.text_cache"
CACHE_VERSION = 1
MANIFEST = "manifest.json"
_PROGRESS = "progress.json"
_EMBEDDINGS = "embeddings.npy"
_MASK = "attention_mask.npy"
_OFFSETS = "offsets.npy"
_CAPTIONS = "captions.json"

#: Storage dtypes: numpy dtype on disk and the torch dtype it means. numpy has no bfloat16, so its bits are kept
#: as int16 and viewed back as torch.bfloat16.
STORAGE_DTYPES: Dict[str, Tuple[np.dtype, torch.dtype]] = {
    "float16": (np.dtype(np.float16), torch.float16),
    "bfloat16": (np.dtype(np.int16), torch.bfloat16),
    "float32": (np.dtype(np.float32), torch.float32),
}

# Manifest fields that must match for a cache to be reused (the encoder's path is informative only: a moved folder
# is the same encoder, and its content hashes are compared instead).
_COMPARED = ("format", "version", "encoder", "encoder_dtype", "max_sequence_length", "dtype", "num_images",
             "num_captions", "captions_per_image", "data_fingerprint")
_ENCODER_COMPARED = ("class", "hidden_size", "config_sha256", "weights_sha256", "tokenizer_sha256")


class TextCacheMismatchError(ValueError):
    """The cache folder holds a cache built with other settings (or something that is not a text cache)."""


# ---- encoding -------------------------------------------------------------------------------------------------
@torch.no_grad()
def encode_captions(
    text_encoder, tokenizer, texts: Sequence[str], max_sequence_length: int
) -> Tuple[torch.Tensor, torch.Tensor, int]:
    """``(hidden (B, L, width), mask (B, L) int64, n_truncated)`` with ``L = max_sequence_length`` exactly.

    The batch is tokenized to its longest caption (at most L tokens, longer ones truncated) and the result
    zero-padded to L: the real tokens' states do not depend on padding (padding keys are masked), so this equals
    padding every caption to L while the encoder runs on far fewer tokens. Padding rows are zeroed so the stored
    values do not depend on the batch either. ``n_truncated`` counts captions that had more than L tokens."""
    texts = list(texts)
    tokens = tokenizer(texts, padding="longest", truncation=True, max_length=max_sequence_length,
                       return_tensors="pt")
    lengths = tokenizer(texts, padding=False, truncation=False, verbose=False)["input_ids"]
    n_truncated = sum(len(ids) > max_sequence_length for ids in lengths)
    device = getattr(text_encoder, "device", None)
    ids = tokens["input_ids"].to(device)
    mask = tokens["attention_mask"].to(device)
    out = text_encoder(input_ids=ids, attention_mask=mask)
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    hidden = hidden * mask.unsqueeze(-1).to(hidden.dtype)
    extra = max_sequence_length - hidden.shape[1]
    if extra > 0:
        hidden = torch.nn.functional.pad(hidden, (0, 0, 0, extra))
        mask = torch.nn.functional.pad(mask, (0, extra))
    return hidden, mask.long(), n_truncated


def unconditional_embedding(batch_size: int, max_sequence_length: int, width: int,
                            dtype: torch.dtype = torch.float32, device=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """The unconditional caption: all-zero states (B, L, width) with an all-ones mask (B, L) int64 (see module doc)."""
    return (torch.zeros(batch_size, max_sequence_length, width, dtype=dtype, device=device),
            torch.ones(batch_size, max_sequence_length, dtype=torch.long, device=device))


def apply_caption_dropout(embeds: torch.Tensor, mask: torch.Tensor,
                          drop: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Replace the rows where ``drop`` (B,) is True by the unconditional caption (zeros, all-ones mask)."""
    drop = drop.to(embeds.device).bool()
    embeds = torch.where(drop.view(-1, 1, 1), torch.zeros((), dtype=embeds.dtype, device=embeds.device), embeds)
    mask = torch.where(drop.view(-1, 1), torch.ones((), dtype=mask.dtype, device=mask.device), mask)
    return embeds, mask


# ---- manifest -------------------------------------------------------------------------------------------------
def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _counts_summary(offsets: np.ndarray) -> Union[int, List[int]]:
    counts = np.diff(offsets)
    if counts.size and (counts == counts[0]).all():
        return int(counts[0])
    return [int(counts.min()), int(counts.max())] if counts.size else 0


def text_cache_manifest(
    captions: Sequence[Sequence[str]],
    text_encoder,
    tokenizer,
    max_sequence_length: int,
    dtype: str = "float16",
    encoder_path: Optional[PathLike] = None,
) -> Dict[str, Any]:
    """The manifest a cache of these captions / encoder / settings has (what `build_text_cache` compares)."""
    from ..utils.text_encoders import text_encoder_fingerprint

    if dtype not in STORAGE_DTYPES:
        raise ValueError(f"Text cache dtype must be one of {sorted(STORAGE_DTYPES)}, got {dtype!r}.")
    offsets = caption_offsets(captions)
    return {
        "format": CACHE_FORMAT,
        "version": CACHE_VERSION,
        "encoder": text_encoder_fingerprint(text_encoder, tokenizer, encoder_path),
        "encoder_dtype": _dtype_name(getattr(text_encoder, "dtype", torch.float32)),
        "max_sequence_length": int(max_sequence_length),
        "dtype": dtype,
        "num_images": len(captions),
        "num_captions": int(offsets[-1]),
        "captions_per_image": _counts_summary(offsets),
        "data_fingerprint": captions_fingerprint(captions),
    }


def _read_json(path: Path) -> Optional[Dict[str, Any]]:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, ensure_ascii=False))
    os.replace(tmp, path)


def _describe_encoder(enc: Dict[str, Any]) -> str:
    return (f"{enc.get('class')} from {enc.get('path')} (width {enc.get('hidden_size')}, weights "
            f"{str(enc.get('weights_sha256'))[:12]}, config {str(enc.get('config_sha256'))[:12]}, tokenizer "
            f"{str(enc.get('tokenizer_sha256'))[:12]})")


def manifest_differences(found: Dict[str, Any], expected: Dict[str, Any]) -> List[str]:
    """Human-readable ``field: cache X, now Y`` lines for every compared field that differs."""
    lines = []
    for key in _COMPARED:
        a, b = found.get(key), expected.get(key)
        if key == "encoder":
            a, b = a or {}, b or {}
            which = [k for k in _ENCODER_COMPARED if a.get(k) != b.get(k)]
            if which:
                lines.append(f"text encoder ({', '.join(which)} differ): cache {_describe_encoder(a)}, now "
                             f"{_describe_encoder(b)}")
        elif key == "data_fingerprint" and a != b:
            lines.append(f"captions (data fingerprint, sha256 of the captions in order): cache {str(a)[:12]}, now "
                         f"{str(b)[:12]}")
        elif a != b:
            lines.append(f"{key}: cache {a!r}, now {b!r}")
    return lines


def check_manifest(found: Dict[str, Any], expected: Dict[str, Any], cache_dir: PathLike) -> None:
    """Raise `TextCacheMismatchError` naming each differing field and the fix when ``found`` != ``expected``."""
    diffs = manifest_differences(found, expected)
    if diffs:
        raise TextCacheMismatchError(
            f"The text embedding cache in {cache_dir} was built with other settings, so it is not reused:\n  - "
            + "\n  - ".join(diffs)
            + f"\nPass another --text_cache_dir for these settings, or delete {cache_dir} to rebuild it there "
            "(nothing was overwritten)."
        )


# ---- building -------------------------------------------------------------------------------------------------
def _open_partial(partial: Path, expected: Dict[str, Any], shape: Tuple[int, int, int], np_dtype: np.dtype):
    """(embeddings, mask, done) of a fresh or resumed partial build."""
    progress = _read_json(partial / _PROGRESS)
    if progress is not None and isinstance(progress.get("manifest"), dict) and not manifest_differences(
            progress["manifest"], expected):
        try:
            emb = np.lib.format.open_memmap(partial / _EMBEDDINGS, mode="r+")
            msk = np.lib.format.open_memmap(partial / _MASK, mode="r+")
            if emb.shape == shape and emb.dtype == np_dtype and msk.shape == shape[:2]:
                done = int(progress.get("done", 0))
                if 0 <= done <= shape[0]:
                    logger.info("Resuming the text cache build in %s at %d / %d captions.", partial, done, shape[0])
                    return emb, msk, done
        except (OSError, ValueError):
            pass
    if partial.exists():
        # Only our own unfinished build lives here (never a finished cache): one with other settings or broken
        # files cannot be resumed, so it is started again.
        logger.warning("Discarding the unfinished text cache build in %s (other settings or unreadable).", partial)
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    emb = np.lib.format.open_memmap(partial / _EMBEDDINGS, mode="w+", dtype=np_dtype, shape=shape)
    msk = np.lib.format.open_memmap(partial / _MASK, mode="w+", dtype=np.uint8, shape=shape[:2])
    _write_json_atomic(partial / _PROGRESS, {"manifest": expected, "done": 0})
    return emb, msk, 0


def _to_storage(hidden: torch.Tensor, dtype: str) -> np.ndarray:
    _, torch_dtype = STORAGE_DTYPES[dtype]
    x = hidden.detach().to("cpu", torch_dtype)
    if torch_dtype == torch.bfloat16:
        x = x.view(torch.int16)
    return x.numpy()


def _build(captions: Sequence[Sequence[str]], text_encoder, tokenizer, final: Path, expected: Dict[str, Any],
           batch_size: int, checkpoint_every: int, show_progress: bool) -> None:
    from tqdm.auto import tqdm

    flat = flatten_captions(captions)
    width = getattr(text_encoder.config, "hidden_size", None)
    if not isinstance(width, int):
        raise ValueError(f"The text encoder {type(text_encoder).__name__} has no integer config.hidden_size.")
    length = expected["max_sequence_length"]
    np_dtype, _ = STORAGE_DTYPES[expected["dtype"]]
    partial = final.with_name(final.name + ".partial")
    emb, msk, done = _open_partial(partial, expected, (len(flat), length, width), np_dtype)
    truncated = 0
    since_flush = 0
    bar = tqdm(total=len(flat), initial=done, desc="Encoding captions", unit="caption", disable=not show_progress)
    try:
        for start in range(done, len(flat), batch_size):
            stop = min(len(flat), start + batch_size)
            hidden, mask, n_trunc = encode_captions(text_encoder, tokenizer, flat[start:stop], length)
            if hidden.shape[-1] != width:
                raise ValueError(f"The text encoder returned width {hidden.shape[-1]}, its config says {width}.")
            emb[start:stop] = _to_storage(hidden, expected["dtype"])
            msk[start:stop] = mask.to("cpu", torch.uint8).numpy()
            truncated += n_trunc
            since_flush += stop - start
            bar.update(stop - start)
            if since_flush >= checkpoint_every or stop == len(flat):
                # Data first, then the marker: a marker never points past what is on disk.
                emb.flush()
                msk.flush()
                _write_json_atomic(partial / _PROGRESS, {"manifest": expected, "done": stop})
                since_flush = 0
    finally:
        bar.close()
    del emb, msk
    if truncated:
        logger.warning("%d of the captions (this run) had more than max_sequence_length=%d tokens and were "
                       "truncated.", truncated, length)
    np.save(partial / _OFFSETS, caption_offsets(captions), allow_pickle=False)
    (partial / _CAPTIONS).write_text(json.dumps(flat, ensure_ascii=False))
    manifest = dict(expected, created_with={"truncated_captions_last_run": truncated})
    _write_json_atomic(partial / MANIFEST, manifest)
    (partial / _PROGRESS).unlink()
    if final.exists():
        final.rmdir()  # empty (checked by the caller); os.replace needs it gone or empty
    os.replace(partial, final)


def build_text_cache(
    captions: Sequence[Sequence[str]],
    text_encoder,
    tokenizer,
    cache_dir: PathLike,
    max_sequence_length: int = 77,
    *,
    dtype: str = "float16",
    encoder_path: Optional[PathLike] = None,
    batch_size: int = 256,
    is_main_process: bool = True,
    wait_for_everyone: Optional[Callable[[], None]] = None,
    checkpoint_every: int = 8192,
    show_progress: bool = True,
) -> "TextEmbeddingCache":
    """Encode every caption once into ``cache_dir`` (or reuse the cache already there) and open it.

    Args:
        captions: Per image, its captions (`data.captions.read_captions`); rows follow this order.
        text_encoder, tokenizer: As `utils.text_encoders.load_text_encoder` returns (frozen; runs on its device).
        cache_dir: The cache folder (``--text_cache_dir``); it must not exist, be empty, or hold a matching cache.
        max_sequence_length: Tokens per caption (longer captions are truncated, with a warning).
        dtype: Storage dtype: ``"float16"`` (default, half the disk of float32), ``"bfloat16"`` or ``"float32"``.
        encoder_path: The encoder's folder, recorded in the manifest (default: the encoder's ``name_or_path``).
        batch_size: Captions per encoder call.
        is_main_process, wait_for_everyone: Only the main process encodes; every process calls
            ``wait_for_everyone`` exactly once (accelerate's barrier), then opens the finished cache.
        checkpoint_every: Captions between progress markers of a resumable build.
        show_progress: tqdm bar while encoding.

    Raises:
        TextCacheMismatchError: the folder holds a cache built with another encoder, length, dtype or captions
            (every process raises, before the barrier), or files that are not a text cache.
    """
    from ..utils.text_encoders import check_max_sequence_length

    check_max_sequence_length(text_encoder, tokenizer, max_sequence_length)
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}.")
    final = Path(cache_dir)
    expected = text_cache_manifest(captions, text_encoder, tokenizer, max_sequence_length, dtype, encoder_path)
    found = _read_json(final / MANIFEST)
    if found is not None:
        check_manifest(found, expected, final)
    elif final.exists() and (not final.is_dir() or any(final.iterdir())):
        held = sorted(p.name for p in final.iterdir())[:8] if final.is_dir() else "a file"
        raise TextCacheMismatchError(
            f"--text_cache_dir {final} exists but is not a text embedding cache (no {MANIFEST}; it holds {held}); "
            "it is not overwritten. Pass a new or empty folder, or delete this one."
        )
    if is_main_process and found is None:
        _build(captions, text_encoder, tokenizer, final, expected, batch_size, checkpoint_every, show_progress)
    if wait_for_everyone is not None:
        wait_for_everyone()
    found = _read_json(final / MANIFEST)
    if found is None:
        raise RuntimeError(
            f"No finished text cache in {final} after the barrier: the main process must build it "
            "(is_main_process=True on exactly one process, the same cache_dir everywhere)."
        )
    check_manifest(found, expected, final)
    return TextEmbeddingCache(final)


# ---- reading --------------------------------------------------------------------------------------------------
class TextEmbeddingCache:
    """A finished text cache, memory-mapped read-only (nothing is loaded until a batch asks for it).

    Picklable for DataLoader workers: the memmaps are dropped on pickling and reopened in the worker (pickling a
    memmap would copy the whole array)."""

    def __init__(self, cache_dir: PathLike, expected: Optional[Dict[str, Any]] = None):
        self.cache_dir = Path(cache_dir)
        manifest = _read_json(self.cache_dir / MANIFEST)
        if manifest is None or manifest.get("format") != CACHE_FORMAT:
            raise FileNotFoundError(
                f"No text embedding cache in {self.cache_dir} ({MANIFEST} missing or not ours); build one with "
                "build_text_cache (the trainer does it for --text_cache_dir)."
            )
        if expected is not None:
            check_manifest(manifest, expected, self.cache_dir)
        self.manifest = manifest
        self.offsets = np.load(self.cache_dir / _OFFSETS, allow_pickle=False)
        self._torch_dtype = STORAGE_DTYPES[manifest["dtype"]][1]
        self._embeddings: Optional[np.ndarray] = None
        self._mask: Optional[np.ndarray] = None
        self._captions: Optional[List[str]] = None

    # -- shape
    @property
    def num_images(self) -> int:
        return int(self.manifest["num_images"])

    @property
    def num_captions(self) -> int:
        return int(self.manifest["num_captions"])

    @property
    def max_sequence_length(self) -> int:
        return int(self.manifest["max_sequence_length"])

    @property
    def width(self) -> int:
        """The embedding width (= the transformer's ``caption_channels``)."""
        return int(self.manifest["encoder"]["hidden_size"])

    @property
    def captions_per_image(self) -> np.ndarray:
        return np.diff(self.offsets)

    # -- arrays
    @property
    def embeddings(self) -> np.ndarray:
        if self._embeddings is None:
            self._embeddings = np.load(self.cache_dir / _EMBEDDINGS, mmap_mode="r", allow_pickle=False)
        return self._embeddings

    @property
    def attention_mask(self) -> np.ndarray:
        if self._mask is None:
            self._mask = np.load(self.cache_dir / _MASK, mmap_mode="r", allow_pickle=False)
        return self._mask

    def __getstate__(self) -> Dict[str, Any]:
        state = dict(self.__dict__)
        state["_embeddings"] = state["_mask"] = None
        return state

    def captions(self, caption_indices: Union[Sequence[int], torch.Tensor]) -> List[str]:
        """Caption texts of flat caption rows (loads captions.json on first use)."""
        if self._captions is None:
            self._captions = json.loads((self.cache_dir / _CAPTIONS).read_text())
        return [self._captions[int(i)] for i in torch.as_tensor(caption_indices).reshape(-1).tolist()]

    @property
    def storage_dtype(self) -> torch.dtype:
        """The dtype the embeddings are stored in: gather in it and cast on the device to move the fewest bytes."""
        return self._torch_dtype

    def gather(self, caption_indices: Union[Sequence[int], torch.Tensor],
               dtype: torch.dtype = torch.float32) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(embeddings (B, L, width) in dtype, mask (B, L) int64)`` of flat caption rows (one memmap gather)."""
        idx = torch.as_tensor(caption_indices, dtype=torch.long).reshape(-1).numpy()
        raw = torch.from_numpy(np.array(self.embeddings[idx]))
        if self._torch_dtype == torch.bfloat16:
            raw = raw.view(torch.bfloat16)
        mask = torch.from_numpy(np.array(self.attention_mask[idx])).long()
        return raw.to(dtype), mask

    def pick(self, image_indices: Union[Sequence[int], torch.Tensor],
             generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """One random caption row per image (`data.captions.pick_caption_indices`)."""
        return pick_caption_indices(self.offsets, image_indices, generator)

    def unconditional(self, batch_size: int, dtype: torch.dtype = torch.float32, device=None):
        """The unconditional caption for a batch (`unconditional_embedding`)."""
        return unconditional_embedding(batch_size, self.max_sequence_length, self.width, dtype, device)

    def lookup(
        self,
        image_indices: Union[Sequence[int], torch.Tensor],
        generator: Optional[torch.Generator] = None,
        caption_dropout_prob: float = 0.0,
        dtype: torch.dtype = torch.float32,
    ) -> Dict[str, torch.Tensor]:
        """The text part of a batch: a random caption per image, dropped to the unconditional caption with
        probability ``caption_dropout_prob`` (pick first, then dropout, both from ``generator``).

        Returns ``encoder_hidden_states`` (B, L, width), ``encoder_attention_mask`` (B, L) int64, ``caption_index``
        (B,) flat rows, ``caption_dropped`` (B,) bool. Cheap enough to call in the training step itself."""
        picked = self.pick(image_indices, generator)
        drop = caption_dropout_mask(picked.shape[0], caption_dropout_prob, generator)
        embeds, mask = self.gather(picked, dtype)
        embeds, mask = apply_caption_dropout(embeds, mask, drop)
        return {"encoder_hidden_states": embeds, "encoder_attention_mask": mask, "caption_index": picked,
                "caption_dropped": drop}


class CaptionedImageDataset(Dataset):
    """Image part + text part: any image data set yielding dict samples / batches (`ImageClassDataset` with
    ``pixel_values``, or `LatentCacheDataset` with ``moments``) joined with a `TextEmbeddingCache` by row.

    Row ``i`` of ``images`` is image ``i % text_cache.num_images`` (so the latent cache's appended flipped copies map
    to their source image). `__getitems__` returns a ready batch dict (use ``collate_fn=collate_batch``): the image
    part's keys plus ``image_index`` and, with ``return_text``, the keys of `TextEmbeddingCache.lookup` (and
    ``caption`` texts with ``return_captions``). ``return_text=False`` leaves the pick to the training step
    (``cache.lookup(batch["image_index"], generator, p)``).

    Random picks come from a generator seeded with ``seed`` in the main process; in a DataLoader worker with
    ``seed`` mixed with the worker's seed, which torch draws afresh every epoch from the loader's RNG (so picks
    differ per worker and per epoch and repeat with a seeded run). Pass ``seed + process_index`` under DDP so ranks
    do not share a dropout pattern."""

    def __init__(self, images: Dataset, text_cache: TextEmbeddingCache, caption_dropout_prob: float = 0.0,
                 seed: int = 0, return_text: bool = True, return_captions: bool = False,
                 dtype: torch.dtype = torch.float32):
        if not 0.0 <= caption_dropout_prob <= 1.0:
            raise ValueError(f"caption_dropout_prob must be in [0, 1], got {caption_dropout_prob!r}.")
        n = text_cache.num_images
        if len(images) == 0 or len(images) % n:
            raise ValueError(
                f"The image data set has {len(images)} rows but the text cache has captions for {n} images; build "
                "both from the same data set (the same rows in the same order, e.g. the same --max_train_samples)."
            )
        self.images = images
        self.text_cache = text_cache
        self.caption_dropout_prob = float(caption_dropout_prob)
        self.seed = int(seed)
        self.return_text = return_text
        self.return_captions = return_captions
        self.dtype = dtype
        self._generator: Optional[torch.Generator] = None
        self._generator_key: Optional[Tuple[Any, ...]] = None

    def __len__(self) -> int:
        return len(self.images)

    def generator(self) -> torch.Generator:
        """This process's (or worker's) generator, made on first use (see the class doc for its seed)."""
        from torch.utils.data import get_worker_info

        info = get_worker_info()
        key = (os.getpid(), None) if info is None else (os.getpid(), info.id, info.seed)
        if self._generator is None or self._generator_key != key:
            seed = self.seed if info is None else (self.seed * 1_000_003 + info.seed) % (2**63)
            self._generator = torch.Generator().manual_seed(seed)
            self._generator_key = key
        return self._generator

    def _image_batch(self, indices: List[int]) -> Dict[str, Any]:
        getitems = getattr(self.images, "__getitems__", None)
        batch = getitems(indices) if getitems is not None else [self.images[i] for i in indices]
        if not isinstance(batch, dict):
            from torch.utils.data import default_collate

            batch = default_collate(batch)
        return dict(batch)

    def __getitems__(self, indices: List[int]) -> Dict[str, Any]:
        indices = [int(i) for i in indices]
        batch = self._image_batch(indices)
        image_index = torch.as_tensor(indices, dtype=torch.long) % self.text_cache.num_images
        batch["image_index"] = image_index
        if self.return_text:
            batch.update(self.text_cache.lookup(image_index, self.generator(), self.caption_dropout_prob, self.dtype))
            if self.return_captions:
                batch["caption"] = self.text_cache.captions(batch["caption_index"])
        return batch

    def __getitem__(self, index: int) -> Dict[str, Any]:
        batch = self.__getitems__([int(index)])
        return {k: v[0] for k, v in batch.items()}
