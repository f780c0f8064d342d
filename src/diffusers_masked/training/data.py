"""Training data: Fashion-MNIST (the embedded default), HF `datasets` by name or local folder, and a VAE latent cache."""

from __future__ import annotations

import gzip
import json
import os
import struct
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset

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


# --------------------------------------------------------------------------------------------------------------
# Generic image data sets
# --------------------------------------------------------------------------------------------------------------
def load_image_dataset(args: Any):
    """The training `datasets.Dataset` chosen by --dataset_name / --train_data_dir / the Fashion-MNIST default."""
    import datasets

    if args.dataset_name and args.train_data_dir:
        raise ValueError("Pass either --dataset_name or --train_data_dir, not both.")
    if args.train_data_dir:
        root = Path(args.train_data_dir)
        if not root.is_dir():
            raise FileNotFoundError(f"--train_data_dir {root} does not exist or is not a folder.")
        files = [p for p in root.rglob("*") if p.is_file()]
        if not files:
            raise ValueError(f"--train_data_dir {root} is empty: put images in it (optionally in class sub-folders).")
        ds = datasets.load_dataset("imagefolder", data_dir=str(root), split="train")
        parents = {p.parent for p in files}
        if args.label_column not in ds.column_names and len(parents) == 1 and next(iter(parents)) != root:
            # imagefolder infers no label from a single class folder; keep its name (useful to fine-tune one class).
            names = [next(iter(parents)).name]
            ds = ds.add_column(args.label_column, [0] * len(ds))
            ds = ds.cast_column(args.label_column, datasets.ClassLabel(names=names))
    elif args.dataset_name:
        ds = datasets.load_dataset(args.dataset_name, args.dataset_config_name, split="train")
    else:
        ds = load_fashion_mnist("train", getattr(args, "fashion_mnist_dir", None))
    if len(ds) == 0:
        raise ValueError("The training data set is empty.")
    if args.image_column not in ds.column_names:
        raise ValueError(
            f"--image_column {args.image_column!r} not in the data set columns {ds.column_names}; pass the right name."
        )
    if args.max_train_samples:
        ds = ds.select(range(min(args.max_train_samples, len(ds))))
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


# --------------------------------------------------------------------------------------------------------------
# VAE latent cache
# --------------------------------------------------------------------------------------------------------------
class LatentCacheDataset(Dataset):
    """Pre-computed VAE posterior moments (mean, logvar) on disk (numpy memmap), with flipped copies appended."""

    def __init__(self, cache_dir: str | os.PathLike):
        cache_dir = Path(cache_dir)
        meta_path = cache_dir / "meta.json"
        if not meta_path.exists():
            raise FileNotFoundError(f"No latent cache in {cache_dir} (meta.json missing); run with --cache_latents.")
        self.meta = json.loads(meta_path.read_text())
        shape = tuple(self.meta["shape"])
        self.moments = np.memmap(cache_dir / "moments.npy", dtype=np.float16, mode="r", shape=shape)
        self.labels = np.load(cache_dir / "labels.npy")

    def __len__(self) -> int:
        return self.moments.shape[0]

    def __getitem__(self, index: int) -> Dict[str, torch.Tensor]:
        return {
            "moments": torch.from_numpy(np.array(self.moments[index], dtype=np.float32)),
            "class_labels": torch.tensor(int(self.labels[index]), dtype=torch.long),
        }

    def __getitems__(self, indices: List[int]) -> Dict[str, torch.Tensor]:
        """A batch in one memmap gather (same values as stacking `__getitem__`); use ``collate_fn=collate_batch``."""
        idx = np.asarray(indices, dtype=np.int64)
        return {
            "moments": torch.from_numpy(np.array(self.moments[idx], dtype=np.float32)),
            "class_labels": torch.from_numpy(self.labels[idx].astype(np.int64)),
        }


@torch.no_grad()
def build_latent_cache(
    dataset: ImageClassDataset,
    vae,
    cache_dir: str | os.PathLike,
    batch_size: int = 64,
    flip: bool = True,
    device: torch.device | str = "cpu",
    fingerprint: Optional[str] = None,
) -> Path:
    """Encode every image once (and its horizontal flip, as the papers do) and store the posterior moments as fp16.

    Writes to a temporary folder and renames it, so an interrupted run never leaves a half cache behind."""
    from tqdm.auto import tqdm

    cache_dir = Path(cache_dir)
    meta_path = cache_dir / "meta.json"
    if meta_path.exists():
        meta = json.loads(meta_path.read_text())
        if fingerprint is None or meta.get("fingerprint") == fingerprint:
            return cache_dir
        raise ValueError(
            f"The latent cache in {cache_dir} was built from other data or another VAE ({meta.get('fingerprint')} != "
            f"{fingerprint}); delete it or choose another --latent_cache_dir."
        )
    tmp = cache_dir.with_name(cache_dir.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    n = len(dataset)
    copies = 2 if flip else 1
    first = dataset[0]["pixel_values"][None].to(device, vae.dtype)
    moments_shape = vae.encode(first).latent_dist.parameters.shape[1:]
    shape = (n * copies, *moments_shape)
    # Raw memmap (shape kept in meta.json) so training reads samples lazily without loading the whole cache.
    moments = np.memmap(tmp / "moments.npy", dtype=np.float16, mode="w+", shape=shape)
    labels = np.zeros(n * copies, dtype=np.int64)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate_batch)
    offset = 0
    for batch in tqdm(loader, desc="Encoding latents"):
        x = batch["pixel_values"].to(device, vae.dtype)
        k = x.shape[0]
        for c in range(copies):
            xc = torch.flip(x, dims=[3]) if c == 1 else x
            params = vae.encode(xc).latent_dist.parameters.float().cpu().numpy()
            moments[c * n + offset : c * n + offset + k] = params.astype(np.float16)
            labels[c * n + offset : c * n + offset + k] = batch["class_labels"].numpy()
        offset += k
    moments.flush()
    del moments
    np.save(tmp / "labels.npy", labels)
    (tmp / "meta.json").write_text(json.dumps({"shape": list(shape), "flip": flip, "fingerprint": fingerprint}))
    if cache_dir.exists():
        import shutil

        shutil.rmtree(cache_dir)
    os.replace(tmp, cache_dir)
    return cache_dir


def sample_latents(moments: torch.Tensor, scaling_factor: float, shift_factor: float = 0.0, generator=None) -> torch.Tensor:
    """Draw a fresh posterior sample from cached (mean, logvar) moments each step (as the official MaskDiT)."""
    mean, logvar = moments.chunk(2, dim=1)
    std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
    eps = torch.randn(mean.shape, generator=generator, device=generator.device if generator is not None else mean.device)
    return ((mean + std * eps.to(mean.device)) - shift_factor) * scaling_factor
