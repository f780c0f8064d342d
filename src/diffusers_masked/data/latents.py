"""VAE latent cache: posterior moments computed once and memory-mapped from disk."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch
from torch.utils.data import Dataset

from .images import ImageClassDataset, collate_batch

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
