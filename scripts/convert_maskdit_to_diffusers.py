#!/usr/bin/env python
"""Convert an official MaskDiT checkpoint (Anima-Lab/MaskDiT) into a diffusers-masked `MaskDiTPipeline` folder.

    python scripts/convert_maskdit_to_diffusers.py \
        --checkpoint_path imagenet256-ckpt-best_with_guidance.pt --output_dir maskdit-xl2-256 \
        [--vae path/to/local/AutoencoderKL] [--id2label imagenet_classes.json]

The EMA weights are used (``ckpt['ema']``) unless ``--no_ema``. Any key that cannot be mapped exactly stops the
conversion with the full list. The saved scheduler is `EDMEulerScheduler(sigma_min=0.002, sigma_max=80, rho=7,
sigma_data=0.5)`, the official EDM sampler's noise levels and preconditioning.
"""

from __future__ import annotations

import argparse

import torch

from diffusers_masked.conversion.common import read_id2label
from diffusers_masked.conversion.maskdit import MASKDIT_DECODER_HEADS, convert_maskdit_checkpoint


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint_path", required=True, help="Official .pt / .pth / .safetensors file.")
    parser.add_argument("--output_dir", required=True, help="Where to write the pipeline folder.")
    parser.add_argument("--vae", default=None, help="Local diffusers AutoencoderKL folder to include (optional).")
    parser.add_argument("--id2label", default=None, help="JSON file: {id: name} or a list of class names.")
    parser.add_argument("--no_ema", action="store_true", help="Convert ckpt['model'] instead of ckpt['ema'].")
    parser.add_argument("--num_attention_heads", type=int, default=None, help="Encoder heads (default: preset).")
    parser.add_argument("--decoder_num_attention_heads", type=int, default=MASKDIT_DECODER_HEADS)
    parser.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32", help="Saved weight dtype.")
    args = parser.parse_args()

    pipe, info = convert_maskdit_checkpoint(
        args.checkpoint_path,
        output_dir=args.output_dir,
        vae_path=args.vae,
        id2label=read_id2label(args.id2label),
        use_ema=not args.no_ema,
        num_attention_heads=args.num_attention_heads,
        decoder_num_attention_heads=args.decoder_num_attention_heads,
        torch_dtype={"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype],
    )
    cfg = pipe.transformer.config
    n = sum(p.numel() for p in pipe.transformer.parameters())
    print(
        f"Converted {args.checkpoint_path} ({info['source']} weights) -> {args.output_dir}: "
        f"{n:,} parameters, {cfg.num_layers}x{cfg.hidden_size} encoder, {cfg.num_decoder_layers}x"
        f"{cfg.decoder_hidden_size} decoder, {cfg.sample_size}x{cfg.sample_size}x{cfg.in_channels} input, "
        f"num_classes={cfg.num_classes}, class names: {'yes' if pipe.id2label else 'no (ids only)'}, "
        f"vae: {'included' if pipe.vae is not None else 'not included'}."
    )


if __name__ == "__main__":
    main()
