"""Data shared by training and evaluation: the embedded Fashion-MNIST, image data sets and the VAE latent cache."""

from .fashion_mnist import (
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_DIR,
    load_fashion_mnist,
    load_fashion_mnist_arrays,
    read_idx,
)
from .images import (
    PRELOAD_MAX_BYTES,
    ImageClassDataset,
    class_names,
    collate_batch,
    image_to_array,
    infer_image_geometry,
    load_image_dataset,
    resize_center_crop,
)
from .latents import LatentCacheDataset, build_latent_cache, sample_latents

__all__ = [
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_DIR",
    "PRELOAD_MAX_BYTES",
    "ImageClassDataset",
    "LatentCacheDataset",
    "build_latent_cache",
    "class_names",
    "collate_batch",
    "image_to_array",
    "infer_image_geometry",
    "load_fashion_mnist",
    "load_fashion_mnist_arrays",
    "load_image_dataset",
    "read_idx",
    "resize_center_crop",
    "sample_latents",
]
