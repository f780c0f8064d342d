"""Fashion-MNIST for evaluation: the idx reader lives in `data/fashion_mnist.py`; this module re-exports it and adds the
resizing that makes real images comparable with a pipeline's samples."""

from __future__ import annotations

from typing import Optional, Tuple

import numpy as np

from ..data import (
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_DIR,
    resize_center_crop,
    load_fashion_mnist_arrays,
)

__all__ = [
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_DIR",
    "load_fashion_mnist_arrays",
    "load_fashion_mnist_reference",
    "resize_images_like_training",
]


def resize_images_like_training(images: np.ndarray, resolution: int) -> np.ndarray:
    """uint8 images (N, H, W) or (N, H, W, C) -> uint8 (N, resolution, resolution, C), resized and center-cropped
    exactly as the trainer prepares its data, so real and generated images go through the same resampling."""
    if images.ndim == 3:
        images = images[..., None]
    if images.shape[1:3] == (resolution, resolution):
        return images
    return np.stack([resize_center_crop(image, resolution) for image in images])


def load_fashion_mnist_reference(
    split: str = "test",
    resolution: int = 28,
    num_samples: Optional[int] = None,
    root: Optional[str] = None,
) -> Tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST images as uint8 (N, resolution, resolution, 1) plus their int64 labels; the first
    ``num_samples`` of the split when given (the split's order is fixed, so this is reproducible)."""
    images, labels = load_fashion_mnist_arrays(split, root)
    if num_samples is not None:
        if num_samples < 2:
            raise ValueError(f"num_samples must be >= 2 for a Fréchet distance, got {num_samples}.")
        images, labels = images[:num_samples], labels[:num_samples]
    return resize_images_like_training(images, resolution), labels
