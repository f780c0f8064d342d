"""Image data sets for training and evaluation: HF `datasets` by name or local folder (the Fashion-MNIST default),
image decoding and resizing, and the in-memory batch path."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset

from .fashion_mnist import load_fashion_mnist


def load_image_dataset(
    *,
    dataset_name: Optional[str] = None,
    dataset_config_name: Optional[str] = None,
    train_data_dir: Optional[str] = None,
    fashion_mnist_dir: Optional[str] = None,
    image_column: str = "image",
    label_column: str = "label",
    max_train_samples: Optional[int] = None,
):
    """The training `datasets.Dataset` chosen by ``dataset_name`` / ``train_data_dir`` / the Fashion-MNIST default
    (the trainer's --dataset_name, --train_data_dir, ... flags of the same names)."""
    import datasets

    if dataset_name and train_data_dir:
        raise ValueError("Pass either --dataset_name or --train_data_dir, not both.")
    if train_data_dir:
        root = Path(train_data_dir)
        if not root.is_dir():
            raise FileNotFoundError(f"--train_data_dir {root} does not exist or is not a folder.")
        files = [p for p in root.rglob("*") if p.is_file()]
        if not files:
            raise ValueError(f"--train_data_dir {root} is empty: put images in it (optionally in class sub-folders).")
        ds = datasets.load_dataset("imagefolder", data_dir=str(root), split="train")
        parents = {p.parent for p in files}
        if label_column not in ds.column_names and len(parents) == 1 and next(iter(parents)) != root:
            # imagefolder infers no label from a single class folder; keep its name (useful to fine-tune one class).
            names = [next(iter(parents)).name]
            ds = ds.add_column(label_column, [0] * len(ds))
            ds = ds.cast_column(label_column, datasets.ClassLabel(names=names))
    elif dataset_name:
        ds = datasets.load_dataset(dataset_name, dataset_config_name, split="train")
    else:
        ds = load_fashion_mnist("train", fashion_mnist_dir)
    if len(ds) == 0:
        raise ValueError("The training data set is empty.")
    if image_column not in ds.column_names:
        raise ValueError(
            f"--image_column {image_column!r} not in the data set columns {ds.column_names}; pass the right name."
        )
    if max_train_samples:
        ds = ds.select(range(min(max_train_samples, len(ds))))
    return ds


def class_names(ds, label_column: str) -> Optional[List[str]]:
    """Class names of a ClassLabel column, or None when the data set has no labels."""
    if label_column not in ds.column_names:
        return None
    feature = ds.features[label_column]
    names = getattr(feature, "names", None)
    if names:
        return list(names)
    values = sorted(set(ds[label_column]))
    return [str(v) for v in values]


def image_to_array(image: Any) -> np.ndarray:
    """PIL image / array -> uint8 array (H, W, C)."""
    if hasattr(image, "mode"):
        if image.mode not in ("L", "RGB"):
            image = image.convert("RGBA" if "A" in image.mode else "RGB").convert("RGB")
        array = np.asarray(image)
    else:
        array = np.asarray(image)
    if array.ndim == 2:
        array = array[:, :, None]
    if array.dtype != np.uint8:
        array = np.clip(array, 0, 255).astype(np.uint8)
    return array


def resize_center_crop(array: np.ndarray, resolution: int) -> np.ndarray:
    h, w = array.shape[:2]
    if (h, w) == (resolution, resolution):
        return array
    from PIL import Image

    mode = "L" if array.shape[2] == 1 else "RGB"
    img = Image.fromarray(array[:, :, 0] if mode == "L" else array, mode)
    scale = resolution / min(h, w)
    img = img.resize((max(resolution, round(w * scale)), max(resolution, round(h * scale))), Image.BICUBIC)
    left = (img.width - resolution) // 2
    top = (img.height - resolution) // 2
    img = img.crop((left, top, left + resolution, top + resolution))
    return image_to_array(img)


# Data sets whose decoded uint8 pixels fit in this many bytes are decoded, resized and converted once and kept in
# memory as one tensor (Fashion-MNIST: 47 MB), so a training step indexes a batch instead of decoding every sample
# (per-sample decoding was 6% of a CPU quickstart step). Larger ones are decoded per sample, as before.
PRELOAD_MAX_BYTES = 1 << 30


def collate_batch(batch):
    """DataLoader ``collate_fn`` for the data sets here: a batch their ``__getitems__`` already built (a dict) passes
    through, a list of samples is collated by torch's ``default_collate``."""
    if isinstance(batch, dict):
        return batch
    from torch.utils.data import default_collate

    return default_collate(batch)


class ImageClassDataset(Dataset):
    """Wraps a `datasets.Dataset`: returns (float image in [-1, 1] of shape (C, R, R), class id or -1).

    ``preload`` (default: when the decoded data set fits `PRELOAD_MAX_BYTES`) decodes, resizes and checks every image
    once into a uint8 tensor; the values are the same as decoding per sample. With it, `__getitems__` (which
    DataLoaders call with a batch of indices) returns a ready batch dict: use ``collate_fn=collate_batch``."""

    def __init__(self, ds, image_column: str, label_column: Optional[str], resolution: int, channels: int,
                 preload: Optional[bool] = None):
        self.ds = ds.with_format(None)
        self.image_column = image_column
        self.label_column = label_column if label_column and label_column in ds.column_names else None
        self.resolution = resolution
        self.channels = channels
        self.images: Optional[torch.Tensor] = None  # (N, C, R, R) uint8 when preloaded
        self.labels: Optional[torch.Tensor] = None  # (N,) int64 when preloaded
        if preload is None:
            preload = len(self.ds) * channels * resolution * resolution <= PRELOAD_MAX_BYTES
        if preload:
            self._preload()

    def __len__(self) -> int:
        return len(self.ds)

    def _array(self, image: Any, index: int) -> np.ndarray:
        array = resize_center_crop(image_to_array(image), self.resolution)
        if array.shape[2] != self.channels:
            raise ValueError(
                f"Image {index} has {array.shape[2]} channels but the model expects {self.channels}; "
                "all images must be grayscale or all RGB (set --in_channels to match the data)."
            )
        return array

    def _preload(self, chunk: int = 4096) -> None:
        import datasets

        n, col = len(self.ds), self.image_column
        images = torch.empty((n, self.channels, self.resolution, self.resolution), dtype=torch.uint8)
        # Array features (Fashion-MNIST) convert in bulk; images (PIL) are decoded one by one.
        bulk = isinstance(self.ds.features.get(col), (datasets.Array2D, datasets.Array3D))
        as_numpy = self.ds.with_format("numpy", columns=[col]) if bulk else None
        for start in range(0, n, chunk):
            stop = min(n, start + chunk)
            if bulk:
                arrays = np.asarray(as_numpy[start:stop][col])
                if arrays.ndim == 3:
                    arrays = arrays[..., None]
                if arrays.dtype != np.uint8:
                    arrays = np.clip(arrays, 0, 255).astype(np.uint8)  # as image_to_array
                rows = [self._array(a, start + k) for k, a in enumerate(arrays)]
            else:
                rows = [self._array(self.ds[i][col], i) for i in range(start, stop)]
            images[start:stop] = torch.from_numpy(np.stack(rows)).permute(0, 3, 1, 2)
        self.images = images
        if self.label_column:
            labels = self.ds.with_format("numpy", columns=[self.label_column])[:][self.label_column]
            self.labels = torch.from_numpy(np.asarray(labels).astype(np.int64))
        else:
            self.labels = torch.full((n,), -1, dtype=torch.long)

    def __getitem__(self, index: int) -> Dict[str, torch.Tensor]:
        index = int(index)
        if self.images is not None:
            return {"pixel_values": self.images[index].float().div(127.5).sub(1.0), "class_labels": self.labels[index].clone()}
        row = self.ds[index]
        array = self._array(row[self.image_column], index)
        x = torch.from_numpy(array.copy()).permute(2, 0, 1).float().div(127.5).sub(1.0)
        label = int(row[self.label_column]) if self.label_column else -1
        return {"pixel_values": x, "class_labels": torch.tensor(label, dtype=torch.long)}

    def __getitems__(self, indices: List[int]):
        """A batch: with the preloaded tensor one indexing op (a dict of stacked tensors), else a list of samples."""
        if self.images is None:
            return [self[i] for i in indices]
        idx = torch.as_tensor(indices, dtype=torch.long)
        return {"pixel_values": self.images[idx].float().div_(127.5).sub_(1.0), "class_labels": self.labels[idx]}


def infer_image_geometry(ds, image_column: str) -> Tuple[int, int]:
    """(channels, size) of the first image of the data set."""
    array = image_to_array(ds[0][image_column])
    return array.shape[2], min(array.shape[:2])
