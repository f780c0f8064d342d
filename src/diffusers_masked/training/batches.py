"""The training data stream: the data set, the optional VAE and latent cache, a resumable batch order, and the clean
samples ``x0`` each step trains on."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler

from ..data import (
    FASHION_MNIST_CLASSES,
    ImageClassDataset,
    LatentCacheDataset,
    build_latent_cache,
    class_names,
    collate_batch,
    infer_image_geometry,
    load_image_dataset,
    sample_latents,
)
from ..data.text_cache import CaptionedImageDataset
from .config import TrainConfig
from .context import DataInfo, to_device
from .text import TextData, load_text_dataset

logger = logging.getLogger(__name__)


class EpochBatchSampler(Sampler):
    """Deterministic shuffled batches: epoch e uses permutation seed+e, the global batch of each step is split over
    the processes, and iteration can start at any step. This makes resume exact and makes N processes see the same
    global batches as one process with an N-times larger batch."""

    def __init__(self, num_samples: int, batch_size: int, num_replicas: int, rank: int, seed: int):
        self.num_samples, self.batch_size = num_samples, batch_size
        self.num_replicas, self.rank, self.seed = num_replicas, rank, seed
        self.global_batch = batch_size * num_replicas
        if num_samples < self.global_batch:
            raise ValueError(
                f"The data set has {num_samples} samples, fewer than one global batch ({self.global_batch}); "
                "lower --train_batch_size or add data."
            )
        self.epoch, self.start = 0, 0

    def set_position(self, epoch: int, start_batch: int) -> None:
        self.epoch, self.start = epoch, start_batch

    def __len__(self) -> int:
        return self.num_samples // self.global_batch

    def permutation(self) -> torch.Tensor:
        """The current epoch's sample order (host, int64)."""
        return torch.randperm(self.num_samples, generator=torch.Generator().manual_seed(self.seed + self.epoch))

    def offsets(self) -> range:
        """Where this process's batches start in `permutation`, from the current position to the epoch's end."""
        first = self.start * self.global_batch + self.rank * self.batch_size
        return range(first, len(self) * self.global_batch, self.global_batch)

    def __iter__(self):
        perm = self.permutation()
        for offset in self.offsets():
            yield perm[offset : offset + self.batch_size].tolist()


#: --data_on_device auto keeps the training tensors on a CUDA device up to min(this, 10% of its memory).
DEVICE_DATA_MAX_BYTES = 4 * 2**30


def gatherable_tensors(dataset: Any) -> Optional[Dict[str, Any]]:
    """The host arrays (tensors, or the latent cache's memory maps, not read here) behind a data set whose batches
    are plain row gathers, by batch key before any conversion; None when a batch needs more (decoding, a caption
    pick inside the data set)."""
    if isinstance(dataset, CaptionedImageDataset):
        return None if dataset.return_text else gatherable_tensors(dataset.images)
    if isinstance(dataset, ImageClassDataset) and dataset.images is not None:
        return {"pixel_values": dataset.images, "class_labels": dataset.labels}
    if isinstance(dataset, LatentCacheDataset):
        return {"moments": dataset.moments, "class_labels": dataset.labels}
    return None


class DeviceBatches:
    """Loader batches gathered on the accelerator from training tensors kept there, in `EpochBatchSampler`'s order.

    Why not a DataLoader: at small images the loader's host work per step (index, convert to float, pin, copy) costs
    as much as the model's step on a fast GPU, and the GPU waits for it (issue 23's trainer profile). Here each step
    is one ``index_select`` per tensor on the device; the only host-to-device copy is the epoch's order.

    Batches carry the loader's keys and values: ``pixel_values`` in [-1, 1] float32 (converted from uint8 on the
    device, bit-identical to `ImageClassDataset`), ``moments`` float32, ``class_labels`` int64, and for captioned data
    ``image_index`` (pinned host tensor: the caption pick gathers on the host).

    Args:
        tensors: `gatherable_tensors` of the data set (host arrays, first dimension = rows).
        sampler: The run's batch order and position.
        device: Where the tensors are kept and gathered.
        num_images: For captioned data, rows per image cycle (``image_index = row % num_images``); else None.
    """

    def __init__(self, tensors: Dict[str, Any], sampler: EpochBatchSampler, device: torch.device,
                 num_images: Optional[int] = None):
        # np.array: a private, writable copy of a (read-only) memory map.
        self.tensors = {k: (t if isinstance(t, torch.Tensor) else torch.from_numpy(np.array(t))).to(device)
                        for k, t in tensors.items()}
        self.tensors = {k: t.long() if k == "class_labels" else t for k, t in self.tensors.items()}
        self.sampler, self.device, self.num_images = sampler, device, num_images

    @staticmethod
    def nbytes(tensors: Dict[str, Any]) -> int:
        return sum(t.numel() * t.element_size() if isinstance(t, torch.Tensor) else t.nbytes
                   for t in tensors.values())

    def __iter__(self) -> Iterator[Dict[str, torch.Tensor]]:
        host = self.sampler.permutation()
        pinned = self.device.type == "cuda"
        order = to_device(host, self.device, pin=pinned)
        image_index = None
        if self.num_images is not None:
            image_index = host % self.num_images
            image_index = image_index.pin_memory() if pinned else image_index
        n = self.sampler.batch_size
        for offset in self.sampler.offsets():
            rows = order[offset : offset + n]
            batch = {k: t.index_select(0, rows) for k, t in self.tensors.items()}
            if "pixel_values" in batch:
                batch["pixel_values"] = batch["pixel_values"].float().div_(127.5).sub_(1.0)
            if "moments" in batch:
                batch["moments"] = batch["moments"].float()
            if image_index is not None:
                batch["image_index"] = image_index[offset : offset + n]
            yield batch


def use_device_data(mode: str, tensors: Optional[Dict[str, Any]], device: torch.device) -> bool:
    """Whether --data_on_device ``mode`` keeps these tensors on ``device`` (see the flag's help)."""
    if mode == "never":
        return False
    if tensors is None:
        if mode == "always":
            raise ValueError(
                "--data_on_device always needs a data set whose batches are row gathers: images preloaded into "
                "memory (small data sets are, see data.images.PRELOAD_MAX_BYTES) or a latent cache "
                "(--cache_latents). Use --data_on_device auto or never for this data set.")
        return False
    if mode == "always":
        return True
    if device.type != "cuda":
        return False
    limit = min(DEVICE_DATA_MAX_BYTES, torch.cuda.get_device_properties(device).total_memory // 10)
    return DeviceBatches.nbytes(tensors) <= limit


def load_vae(path: str, device: torch.device):
    """The frozen `AutoencoderKL` of a latent-space run."""
    from diffusers import AutoencoderKL

    if not os.path.isdir(path):
        logger.warning("--vae_path %s is not a local folder; trying it as a Hub id.", path)
    vae = AutoencoderKL.from_pretrained(path)
    vae.requires_grad_(False).eval().to(device)
    return vae


class TrainingData:
    """The data set, its geometry and labels (`info`), the VAE (or None), and the loader of loader batches.

    Args:
        config: The run's config (the ``data`` section, the batch size, seed and output folder).
        accelerator: Gives the device and this process's share of each global batch.
    """

    def __init__(self, config: TrainConfig, accelerator: Any, dataset: Any = None):
        d = config.data
        self.config, self.accelerator = d, accelerator
        ds, scenes, label_column = self._load(config, dataset)
        channels, size = infer_image_geometry(ds, d.image_column)
        resolution = d.resolution or size
        names = class_names(ds, label_column) if label_column else None
        if names is None and d.uses_default_data and label_column:
            names = list(FASHION_MNIST_CLASSES)
        self.image_dataset = ImageClassDataset(ds, d.image_column, label_column, resolution, channels)
        self.vae = load_vae(d.vae_path, accelerator.device) if d.vae_path else None
        sample_size, model_channels = self._model_geometry(resolution, channels)
        self.dataset = self._training_dataset(ds, resolution, Path(config.output_dir))
        self.text: Optional[TextData] = None
        if config.text.captioned:
            self.text = TextData(config, accelerator, ds, scenes)
            # Rows of a latent cache with flipped copies map back to their image (row % number of images).
            self.dataset = CaptionedImageDataset(self.dataset, self.text.cache, return_text=False)
        self.info = DataInfo(resolution=resolution, sample_size=sample_size, channels=model_channels,
                             pixel_channels=channels, class_names=names,
                             id2label=dict(enumerate(names)) if names else None, num_samples=len(self.dataset))
        self.sampler = EpochBatchSampler(len(self.dataset), config.optim.train_batch_size,
                                         accelerator.num_processes, accelerator.process_index, config.seed)
        tensors = gatherable_tensors(self.dataset)
        if use_device_data(d.data_on_device, tensors, accelerator.device):
            num_images = self.text.cache.num_images if self.text is not None else None
            self.loader = DeviceBatches(tensors, self.sampler, accelerator.device, num_images)
            logger.info("Training tensors kept on %s (%.1f MiB); batches are gathered there.", accelerator.device,
                        DeviceBatches.nbytes(tensors) / 2**20)
        else:
            self.loader = DataLoader(self.dataset, batch_sampler=self.sampler, collate_fn=collate_batch,
                                     num_workers=d.dataloader_num_workers, pin_memory=torch.cuda.is_available())

    def _load(self, config: TrainConfig, dataset: Any):
        """``(datasets.Dataset, scene root or None, label column or None)``: captioned data for a text run (the
        scenes by default), else the labelled data (Fashion-MNIST by default)."""
        d = config.data
        if config.text.captioned:
            ds, scenes = load_text_dataset(config, self.accelerator, dataset)
            return ds, scenes, None
        if dataset is not None:
            ds = dataset.select(range(min(d.max_train_samples, len(dataset)))) if d.max_train_samples else dataset
            return ds, None, d.label_column
        ds = load_image_dataset(
            dataset_name=d.dataset_name, dataset_config_name=d.dataset_config_name, train_data_dir=d.train_data_dir,
            fashion_mnist_dir=d.fashion_mnist_dir, image_column=d.image_column, label_column=d.label_column,
            max_train_samples=d.max_train_samples)
        return ds, None, d.label_column

    @property
    def text_info(self):
        """What recipes see of the text side (`text.TextInfo`), or None for a class-conditional run."""
        return self.text.info if self.text is not None else None

    def _model_geometry(self, resolution: int, channels: int):
        """(sample_size, channels) of the model input: the images', or the VAE latents'."""
        d, vae = self.config, self.vae
        if vae is None:
            sample_size, model_channels = resolution, channels
        else:
            factor = 2 ** (len(vae.config.block_out_channels) - 1)
            if resolution % factor:
                raise ValueError(
                    f"--resolution {resolution} must be divisible by the VAE's downsampling factor {factor}.")
            sample_size, model_channels = resolution // factor, vae.config.latent_channels
            if vae.config.in_channels != channels:
                raise ValueError(
                    f"The VAE takes {vae.config.in_channels}-channel images but the data has {channels} channels.")
        if d.in_channels is not None and d.in_channels != model_channels:
            what = "latent" if vae is not None else "image"
            raise ValueError(
                f"--in_channels {d.in_channels} does not match the data: the {what}s have {model_channels} "
                "channels (grayscale = 1, RGB = 3, SD-VAE latents = 4). Drop --in_channels or convert the data."
            )
        return sample_size, model_channels

    def _training_dataset(self, ds, resolution: int, output_dir: Path):
        """The images, or with --cache_latents their VAE moments encoded once (by the main process)."""
        d, acc = self.config, self.accelerator
        if not d.cache_latents:
            return self.image_dataset
        cache_dir = Path(d.latent_cache_dir or output_dir / "latent_cache")
        fingerprint = f"{len(ds)}-{resolution}-{getattr(ds, '_fingerprint', 'na')}-{d.vae_path}"
        if acc.is_main_process:
            build_latent_cache(self.image_dataset, self.vae, cache_dir, device=acc.device, fingerprint=fingerprint)
        acc.wait_for_everyone()
        return LatentCacheDataset(cache_dir)

    def batches(self, steps_done: Callable[[], int], accumulation: int) -> Iterator[Dict[str, torch.Tensor]]:
        """Loader batches, epoch after epoch, each epoch entered where ``steps_done()`` optimizer steps left off
        (so a resumed run continues the interrupted one's order); the caller stops."""
        steps_per_epoch = len(self.sampler) // accumulation
        if steps_per_epoch == 0:
            raise ValueError("One epoch holds fewer batches than --gradient_accumulation_steps; lower it or add data.")

        def endless() -> Iterator[Dict[str, torch.Tensor]]:
            while True:
                epoch, start_batch = divmod(steps_done() * accumulation, steps_per_epoch * accumulation)
                self.sampler.set_position(epoch, start_batch)
                yield from self.loader

        return endless()

    def clean_batch(self, batch: Dict[str, torch.Tensor], generator: torch.Generator) -> torch.Tensor:
        """Clean training sample x0 (pixels in [-1, 1] or scaled VAE latents) for a loader batch."""
        device = self.accelerator.device
        if "moments" in batch:
            cfg = self.vae.config
            shift = getattr(cfg, "shift_factor", None) or 0.0
            x0 = sample_latents(to_device(batch["moments"], device), cfg.scaling_factor, shift, generator)
            return x0.float()
        x = to_device(batch["pixel_values"], device)
        if self.config.random_flip:
            flip = torch.rand(x.shape[0], generator=generator, device=generator.device).to(device) < 0.5
            x = torch.where(flip.view(-1, 1, 1, 1), x.flip(3), x)
        if self.vae is None:
            return x
        with torch.no_grad():
            dist = self.vae.encode(x.to(self.vae.dtype)).latent_dist
            cfg = self.vae.config
            x0 = (dist.sample(generator=generator) - (getattr(cfg, "shift_factor", None) or 0.0)) * cfg.scaling_factor
        return x0.float()

    def prepare(self, batch: Dict[str, torch.Tensor], generator: torch.Generator,
                label_lookup: Optional[torch.Tensor] = None, step: int = 0) -> Dict[str, torch.Tensor]:
        """The batch a recipe's `compute_loss` gets: ``x0`` plus the loader's other fields (tensors on the device,
        anything else such as caption strings as it is), class labels mapped onto a pretrained model's ids where the
        data names only some of its classes; for captioned data one cached caption embedding per image
        (``encoder_hidden_states``, ``encoder_attention_mask``) instead of labels."""
        x0 = self.clean_batch(batch, generator)
        device = self.accelerator.device
        if self.text is not None:
            batch = {k: v for k, v in batch.items() if k != "class_labels"}
            batch.update(self.text.lookup(batch["image_index"], step, device))
        out = {k: to_device(v, device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()
               if k not in ("pixel_values", "moments")}
        if label_lookup is not None and "class_labels" in out:
            out["class_labels"] = label_lookup[out["class_labels"]]
        out["x0"] = x0
        return out


def images_per_step(config: TrainConfig, num_processes: int) -> int:
    """Images of one optimizer step over all processes."""
    o = config.optim
    return o.train_batch_size * num_processes * o.gradient_accumulation_steps

