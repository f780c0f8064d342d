"""Fashion-MNIST, the embedded default data set: Debian's `dataset-fashion-mnist` idx files, read without a download."""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path
from typing import Optional, Tuple

import numpy as np

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
_FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an idx file (the MNIST format), gzipped or not, into a numpy array."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError(f"{path} is not an idx file (bad magic number).")
    dtype_code, ndim = data[2], data[3]
    dtypes = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    if dtype_code not in dtypes:
        raise ValueError(f"{path}: unknown idx data type 0x{dtype_code:02x}.")
    shape = struct.unpack(">" + "I" * ndim, data[4 : 4 + 4 * ndim])
    array = np.frombuffer(data, dtype=dtypes[dtype_code], offset=4 + 4 * ndim)
    if array.size != int(np.prod(shape)):
        raise ValueError(f"{path} is truncated: expected {int(np.prod(shape))} values, found {array.size}.")
    return array.reshape(shape)


def _find_idx(root: Path, stem: str) -> Path:
    for name in (stem + ".gz", stem):
        if (root / name).exists():
            return root / name
    raise FileNotFoundError(
        f"Fashion-MNIST file {stem}(.gz) not found in {root}. Install the embedded data set with "
        "`apt-get install dataset-fashion-mnist` (Debian/Ubuntu), pass --fashion_mnist_dir to a folder holding the idx "
        "files, or train on other data with --dataset_name / --train_data_dir."
    )


def load_fashion_mnist_arrays(split: str = "train", root: Optional[str] = None) -> Tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST as (uint8 images (N, 28, 28), int64 labels (N,)) from Debian's `dataset-fashion-mnist` files."""
    if split not in _FASHION_MNIST_FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}.")
    root_path = Path(root or os.environ.get("FASHION_MNIST_DIR", FASHION_MNIST_DIR))
    images_stem, labels_stem = _FASHION_MNIST_FILES[split]
    images = read_idx(_find_idx(root_path, images_stem))
    labels = read_idx(_find_idx(root_path, labels_stem)).astype(np.int64)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise ValueError(f"Fashion-MNIST files in {root_path} have mismatched shapes {images.shape} / {labels.shape}.")
    return images, labels


def load_fashion_mnist(split: str = "train", root: Optional[str] = None):
    """Fashion-MNIST as a `datasets.Dataset` with columns ``image`` (28x28 uint8) and ``label`` (ClassLabel)."""
    import datasets

    images, labels = load_fashion_mnist_arrays(split, root)
    features = datasets.Features(
        {
            "image": datasets.Array2D(shape=(28, 28), dtype="uint8"),
            "label": datasets.ClassLabel(names=FASHION_MNIST_CLASSES),
        }
    )
    return datasets.Dataset.from_dict({"image": images, "label": labels}, features=features)
