"""Reference sets: the built-in Fashion-MNIST split, a folder of images, an ``.npz`` (statistics or images), or
arrays. Images become uint8 tensors (N, C, H, W); statistics are cached on disk and in memory."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Union

import numpy as np
import torch

from .classifier import default_cache_dir
from .frechet import FeatureSpec, ReferenceStats, compute_reference_stats, stats_cache_key

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
FASHION_MNIST_REFERENCES = ("fashion-mnist", "fashion-mnist:test", "fashion-mnist:train")

ReferenceLike = Union[str, os.PathLike, np.ndarray, torch.Tensor, ReferenceStats]

# (key) -> ReferenceStats, so repeated evaluations during training do not recompute reference features.
_STATS_MEMORY: Dict[str, ReferenceStats] = {}


def _as_nchw_uint8(images: Union[np.ndarray, torch.Tensor], source: str) -> torch.Tensor:
    """(N, H, W), (N, H, W, C) or (N, C, H, W) uint8 / [0, 1] float -> uint8 (N, C, H, W)."""
    x = torch.from_numpy(np.array(images)) if isinstance(images, np.ndarray) else images.detach().cpu()
    if x.ndim == 3:
        x = x[:, None]
    if x.ndim != 4:
        raise ValueError(
            f"Reference images from {source} must be (N, H, W[, C]) or (N, C, H, W), got {tuple(x.shape)}."
        )
    if x.shape[1] not in (1, 3) and x.shape[-1] in (1, 3):
        x = x.permute(0, 3, 1, 2)
    if x.dtype != torch.uint8:
        x = (x.float().clamp(0, 1) * 255).round().to(torch.uint8)
    if len(x) < 2:
        raise ValueError(f"At least 2 reference images are needed, {source} has {len(x)}.")
    return x.contiguous()


def load_image_folder(
    path: Union[str, os.PathLike], channels: Optional[int] = None, limit: Optional[int] = None
) -> torch.Tensor:
    """Every image file under ``path`` (recursive, sorted by path) as uint8 (N, C, H, W); converted to ``channels``
    (1 = grey, 3 = RGB) when given. All images must have one size."""
    from PIL import Image

    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"Reference folder {root} does not exist.")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise ValueError(f"No reference images ({', '.join(IMAGE_EXTENSIONS)}) found in {root}.")
    files = files[:limit] if limit else files
    arrays, first_size = [], None
    for file in files:
        with Image.open(file) as img:
            mode = {1: "L", 3: "RGB"}.get(channels or 0, "L" if img.mode in ("L", "1", "I;16", "I") else "RGB")
            array = np.asarray(img.convert(mode))
        if first_size is None:
            first_size = array.shape[:2]
        elif array.shape[:2] != first_size:
            raise ValueError(
                f"Reference images have different sizes: {files[0].name} is {first_size}, {file.name} is "
                f"{array.shape[:2]}. Resize them to the generated size first."
            )
        arrays.append(array if array.ndim == 3 else array[:, :, None])
    return _as_nchw_uint8(np.stack(arrays), str(root))


def is_fashion_mnist_reference(reference: Any) -> bool:
    return isinstance(reference, str) and reference.lower() in FASHION_MNIST_REFERENCES


def resolve_reference(
    reference: ReferenceLike,
    image_shape: Tuple[int, int, int],
    num_samples: Optional[int] = None,
) -> Tuple[Optional[torch.Tensor], Optional[ReferenceStats], Dict[str, Any]]:
    """-> (images uint8 (N, C, H, W) or None, stats or None, description).

    ``image_shape`` (C, H, W) is the size of the generated images: the built-in Fashion-MNIST is resized to it the
    way the trainer resizes its data; any other reference must already have it."""
    c, h, w = image_shape
    if isinstance(reference, ReferenceStats):
        return None, reference, {"type": "stats", **reference.describe()}
    if isinstance(reference, (np.ndarray, torch.Tensor)):
        images = _as_nchw_uint8(reference, "the given array")
        images = images[:num_samples] if num_samples else images
        return (
            _check_shape(images, image_shape, "the given array"),
            None,
            {"type": "array", "num_samples": len(images)},
        )
    if is_fashion_mnist_reference(reference):
        from .fashion_mnist import load_fashion_mnist_reference

        split = reference.lower().split(":")[1] if ":" in reference else "test"
        if h != w:
            raise ValueError(f"The Fashion-MNIST reference needs square images, the generated ones are {h}x{w}.")
        if c not in (1, 3):
            raise ValueError(f"Generated images have {c} channels; the Fashion-MNIST reference needs 1 or 3.")
        array, _ = load_fashion_mnist_reference(split, h, num_samples)
        images = _as_nchw_uint8(array, reference)
        if c == 3:
            images = images.expand(-1, 3, -1, -1).contiguous()
        desc = {"type": "fashion-mnist", "split": split, "num_samples": len(images), "resized_to": [h, w]}
        return images, None, desc
    path = Path(reference)
    if path.suffix == ".npz":
        if not path.is_file():
            raise FileNotFoundError(f"Reference file {path} does not exist.")
        with np.load(path, allow_pickle=False) as data:
            keys = set(data.files)
            if {"mu", "sigma"} <= keys:
                stats = ReferenceStats.load(path)
                return None, stats, {"type": "stats", "path": str(path), **stats.describe()}
            if "arr_0" in keys:  # ADM reference batch / sample file: NHWC uint8 images
                images = _as_nchw_uint8(data["arr_0"][:num_samples] if num_samples else data["arr_0"], str(path))
                return (
                    _check_shape(images, image_shape, str(path)),
                    None,
                    {"type": "npz-images", "path": str(path), "num_samples": len(images)},
                )
        raise ValueError(f"{path} has neither 'mu'/'sigma' statistics nor 'arr_0' images (keys: {sorted(keys)}).")
    if path.is_dir():
        images = load_image_folder(path, channels=c, limit=num_samples)
        return (
            _check_shape(images, image_shape, str(path)),
            None,
            {"type": "folder", "path": str(path), "num_samples": len(images)},
        )
    if not path.exists():
        raise FileNotFoundError(
            f"Reference {reference!s} not found: pass 'fashion-mnist' (or 'fashion-mnist:train'), a folder of "
            "images, or an .npz with mu/sigma statistics or arr_0 images."
        )
    raise ValueError(f"Reference {path} is neither a folder of images nor an .npz file.")


def _check_shape(images: torch.Tensor, image_shape: Tuple[int, int, int], source: str) -> torch.Tensor:
    if tuple(images.shape[1:]) != tuple(image_shape):
        raise ValueError(
            f"Image sizes differ: reference images from {source} are (C, H, W) = {tuple(images.shape[1:])}, the "
            f"generated images are {tuple(image_shape)}. Resize the reference images to the generated size "
            "(or use the built-in 'fashion-mnist' reference, which is resized automatically)."
        )
    return images


def reference_stats(
    reference: ReferenceLike,
    spec: FeatureSpec,
    image_shape: Tuple[int, int, int],
    num_samples: Optional[int] = None,
    device: Union[str, torch.device] = "cpu",
    batch_size: int = 500,
    cache_dir: Optional[Union[str, os.PathLike]] = None,
    use_cache: bool = True,
) -> Tuple[ReferenceStats, Dict[str, Any]]:
    """Statistics of ``reference`` under ``spec``: loaded, or computed from images. The built-in Fashion-MNIST
    stats are cached as .npz under the cache dir; everything is also cached in memory for the process."""
    # Key on what determines the stats; a folder's key includes its modification time.
    key_parts: Dict[str, Any] = {
        "ref": str(reference) if not isinstance(reference, (np.ndarray, torch.Tensor)) else None,
        "spec": spec.identity,
        "shape": list(image_shape),
        "n": num_samples,
    }
    if isinstance(reference, (str, os.PathLike)) and Path(reference).exists():
        key_parts["mtime"] = Path(reference).stat().st_mtime
    cacheable = use_cache and key_parts["ref"] is not None and not isinstance(reference, ReferenceStats)
    key = stats_cache_key(key_parts)
    if cacheable and key in _STATS_MEMORY:
        stats = _STATS_MEMORY[key]
        return stats, {"type": "cached", **stats.describe()}
    disk_path = None
    if cacheable and is_fashion_mnist_reference(reference):
        root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
        disk_path = root / "reference_stats" / f"{str(reference).lower().replace(':', '-')}-{key}.npz"
        if disk_path.is_file():
            stats = ReferenceStats.load(disk_path)
            _STATS_MEMORY[key] = stats
            return stats, {"type": "fashion-mnist", "cached_stats": str(disk_path), **stats.describe()}
    images, stats, desc = resolve_reference(reference, image_shape, num_samples)
    if stats is None:
        source = desc.get("path") or (
            f"fashion-mnist:{desc['split']}" if desc["type"] == "fashion-mnist" else desc["type"]
        )
        stats = compute_reference_stats(spec, images.split(batch_size), device=device, source=source)
        if disk_path is not None:
            stats.save(disk_path)
            desc["cached_stats"] = str(disk_path)
    if cacheable:
        _STATS_MEMORY[key] = stats
    return stats, desc
