#!/usr/bin/env python
"""Convert an official MDT / MDTv2 checkpoint (sail-sg/MDT) into a diffusers-masked `MDTv2Pipeline` folder.

    python scripts/convert_mdt_to_diffusers.py \
        --checkpoint_path mdt_xl2_v2_ckpt.pt --output_dir mdtv2-xl2-256 [--vae path/to/local/AutoencoderKL]

MDT v1 files (``blocks.*`` keys) convert too; their decoder depth is not stored: ``--decode_layer`` (default 2,
the v1 release). Flat state dicts and ``{'ema': ...}`` / ``{'model': ...}`` containers are accepted (EMA first).
Any key that cannot be mapped exactly stops the conversion with the full list. The saved scheduler is the
official diffusion: `DDPMScheduler` 1000 steps, linear betas 1e-4..0.02, ``variance_type="learned_range"``.
"""

from __future__ import annotations

import argparse

import torch

from diffusers_masked.conversion.common import read_id2label
from diffusers_masked.conversion.mdt import convert_mdt_checkpoint


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint_path", required=True, help="Official .pt / .pth / .safetensors file.")
    parser.add_argument("--output_dir", required=True, help="Where to write the pipeline folder.")
    parser.add_argument("--vae", default=None, help="Local diffusers AutoencoderKL folder to include (optional).")
    parser.add_argument("--id2label", default=None, help="JSON file: {id: name} or a list of class names.")
    parser.add_argument("--no_ema", action="store_true", help="Prefer ckpt['model'] over ckpt['ema'] in containers.")
    parser.add_argument("--decode_layer", type=int, default=None, help="Decoder blocks of an MDT v1 checkpoint.")
    parser.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32", help="Saved weight dtype.")
    args = parser.parse_args()

    pipe, info = convert_mdt_checkpoint(
        args.checkpoint_path,
        output_dir=args.output_dir,
        vae_path=args.vae,
        id2label=read_id2label(args.id2label),
        use_ema=not args.no_ema,
        decode_layer=args.decode_layer,
        torch_dtype={"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype],
    )
    cfg = pipe.transformer.config
    n = sum(p.numel() for p in pipe.transformer.parameters())
    print(
        f"Converted {args.checkpoint_path} (MDT {info['version']}, {info['source']} weights) -> {args.output_dir}: "
        f"{n:,} parameters, {cfg.num_layers - cfg.num_decoder_layers} encoder + {cfg.num_decoder_layers} decoder "
        f"blocks of width {cfg.hidden_size}, {cfg.sample_size}x{cfg.sample_size}x{cfg.in_channels} input, "
        f"num_classes={cfg.num_classes}, class names: {'yes' if pipe.id2label else 'no (ids only)'}, "
        f"vae: {'included' if pipe.vae is not None else 'not included'}."
    )


if __name__ == "__main__":
    main()
