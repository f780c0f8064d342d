#!/usr/bin/env python
"""Write a small randomly initialised `diffusers.AutoencoderKL` folder for benchmarking the latent-space path.

Why: the GPU hosts have no network, so no pretrained VAE (SD-VAE) can be downloaded there. Throughput, DDP scaling,
checkpoint/resume and FSDP only need latents of the right shape (4 channels, 8x downsampling: 256 px -> 32x32x4 =
256 tokens at patch 2), not good ones. The latents of this VAE are meaningless as images; never use it for samples
or quality metrics.

Two changes to the random init make the latents usable as training data: the log-variance half of the posterior
is pinned to a tiny value (so a cached latent is a fixed function of its image instead of mostly fresh noise), and
``scaling_factor`` is set to 1 / std of the latents of a few images (so the scaled latents have unit variance).

    python benchmarks/make_random_vae.py --out /tmp/vae                      # 1-channel (Fashion-MNIST)
    python benchmarks/make_random_vae.py --out /tmp/vae --calibrate_dir .data/fashion-mnist
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F


def build_random_vae(in_channels: int = 1, latent_channels: int = 4, width: int = 32, num_blocks: int = 4,
                     seed: int = 0):
    """AutoencoderKL with ``num_blocks`` levels (downsampling 2**(num_blocks-1)), ``width`` channels per level."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=in_channels,
        out_channels=in_channels,
        down_block_types=("DownEncoderBlock2D",) * num_blocks,
        up_block_types=("UpDecoderBlock2D",) * num_blocks,
        block_out_channels=(width,) * num_blocks,
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=min(32, width),
        sample_size=256,
    )
    # Near-deterministic posterior: logvar = -20 everywhere (std ~ 5e-5; fits the fp16 latent cache).
    with torch.no_grad():
        vae.quant_conv.weight[latent_channels:].zero_()
        vae.quant_conv.bias[latent_channels:].fill_(-20.0)
    return vae


@torch.no_grad()
def calibrate_scaling_factor(vae, images: torch.Tensor) -> float:
    """1 / std of the posterior means of ``images`` (B, C, H, W) in [-1, 1]."""
    mean = vae.encode(images).latent_dist.mean
    return float(1.0 / mean.float().std().clamp_min(1e-6))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="Folder to write (config.json + weights).")
    p.add_argument("--in_channels", type=int, default=1, help="Image channels (1 = Fashion-MNIST, 3 = RGB).")
    p.add_argument("--latent_channels", type=int, default=4)
    p.add_argument("--width", type=int, default=32, help="Channels of every encoder/decoder level.")
    p.add_argument("--num_blocks", type=int, default=4, help="Levels; downsampling factor 2**(num_blocks-1).")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--calibrate_dir", type=str, default=None,
                   help="Fashion-MNIST idx folder: set scaling_factor from 64 of its images (default: random images).")
    p.add_argument("--calibrate_resolution", type=int, default=64, help="Side the calibration images are resized to.")
    args = p.parse_args()

    vae = build_random_vae(args.in_channels, args.latent_channels, args.width, args.num_blocks, args.seed).eval()
    r = args.calibrate_resolution
    if args.calibrate_dir and args.in_channels == 1:
        from diffusers_masked.data import load_fashion_mnist_arrays

        images, _ = load_fashion_mnist_arrays("train", args.calibrate_dir)
        x = torch.from_numpy(images[:64].copy()).float().div(127.5).sub(1.0)[:, None]
        x = F.interpolate(x, size=(r, r), mode="bicubic", align_corners=False).clamp(-1, 1)
    else:
        x = torch.rand(64, args.in_channels, r, r, generator=torch.Generator().manual_seed(args.seed)) * 2 - 1
    vae.register_to_config(scaling_factor=calibrate_scaling_factor(vae, x))
    out = Path(args.out)
    vae.save_pretrained(out, safe_serialization=True)
    n = sum(p.numel() for p in vae.parameters())
    print(json.dumps({"out": str(out), "parameters": n, "scaling_factor": vae.config.scaling_factor,
                      "downsampling": 2 ** (args.num_blocks - 1), "latent_channels": args.latent_channels}))


if __name__ == "__main__":
    main()
