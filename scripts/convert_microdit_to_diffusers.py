#!/usr/bin/env python
"""Convert an official MicroDiT checkpoint (SonyResearch/micro_diffusion) into a diffusers-masked
`DeferredMaskDiTPipeline` folder.

    python scripts/convert_microdit_to_diffusers.py \
        --checkpoint_path dit_4_channel_37M_real_and_synthetic_data.pt --output_dir microdit-xl2-512 \
        [--vae path/to/local/sdxl-vae] [--text_encoder path/to/local/clip-text-model [--tokenizer path]]

Flat ``DiT`` state dicts (the release), ``LatentDiffusion`` state dicts (``dit.*``; VAE / text-encoder keys are
skipped and counted), ``{'ema': ...}`` / ``{'model': ...}`` containers (EMA first unless ``--no_ema``) and Composer
checkpoints are accepted. Any key that cannot be mapped exactly stops the conversion with the full list. Sizes,
MoE placement and the position-table scale (2.0 for the 512-px release) are read from the tensors; the head width
(``--attention_head_dim``, default 64 for XL / 32 for Tiny) and the MoE capacity (``--expert_capacity``, default 2.0)
are not stored in checkpoints. The saved scheduler is `EDMEulerScheduler(sigma_min=0.002, sigma_max=80,
sigma_data=0.9, sigma_schedule="karras", rho=7)`: the official noise levels and preconditioning.

Text encoder: the official one is OpenCLIP DFN5B-CLIP-ViT-H-14-378 (1024 wide), which cannot be bundled offline. Pass
``--text_encoder`` = a local transformers folder (e.g. a `CLIPTextModel` converted from those weights) to include it,
or leave it out and call the pipeline with ``prompt_embeds`` (B, 77, 1024) = the text tower's tokens after its final
LayerNorm, all 77 positions, ``prompt_attention_mask`` all ones (the official model attends to padding too).
"""

from __future__ import annotations

import argparse

import torch

from diffusers_masked.conversion.microdit import MICRODIT_EXPERT_CAPACITY, convert_microdit_checkpoint


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint_path", required=True, help="Official .pt / .pth / .safetensors file.")
    parser.add_argument("--output_dir", required=True, help="Where to write the pipeline folder.")
    parser.add_argument("--vae", default=None, help="Local diffusers AutoencoderKL folder to include (optional).")
    parser.add_argument("--text_encoder", default=None, help="Local transformers text-encoder folder (optional).")
    parser.add_argument("--tokenizer", default=None, help="Local tokenizer folder (default: --text_encoder).")
    parser.add_argument("--no_ema", action="store_true", help="Prefer ckpt['model'] over ckpt['ema'] in containers.")
    parser.add_argument("--attention_head_dim", type=int, default=None, help="Head width (default: preset).")
    parser.add_argument("--expert_capacity", type=float, default=MICRODIT_EXPERT_CAPACITY, help="MoE capacity factor.")
    parser.add_argument(
        "--pos_interpolation_scale", type=float, default=None, help="Position-table scale (default: detected)."
    )
    parser.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32", help="Saved weight dtype.")
    args = parser.parse_args()

    pipe, info = convert_microdit_checkpoint(
        args.checkpoint_path,
        output_dir=args.output_dir,
        vae_path=args.vae,
        text_encoder_path=args.text_encoder,
        tokenizer_path=args.tokenizer,
        use_ema=not args.no_ema,
        attention_head_dim=args.attention_head_dim,
        expert_capacity=args.expert_capacity,
        pos_interpolation_scale=args.pos_interpolation_scale,
        torch_dtype={"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype],
    )
    cfg = pipe.transformer.config
    n = sum(p.numel() for p in pipe.transformer.parameters())
    skipped = f", skipped {len(info['ignored'])} VAE / text-encoder tensors" if info["ignored"] else ""
    print(
        f"Converted {args.checkpoint_path} ({info['source']} weights{skipped}) -> {args.output_dir}: {n:,} parameters, "
        f"{cfg.patch_mixer_layers}x{cfg.patch_mixer_hidden_size} patch-mixer + {cfg.num_layers}x{cfg.hidden_size} "
        f"backbone, {cfg.num_experts} experts every {cfg.experts_every_n} blocks, "
        f"{cfg.sample_size}x{cfg.sample_size}x{cfg.in_channels} input (position scale {cfg.pos_interpolation_scale}), "
        f"caption width {cfg.caption_channels}, text encoder: "
        f"{'included' if pipe.text_encoder is not None else 'not included (pass prompt_embeds)'}, "
        f"vae: {'included' if pipe.vae is not None else 'not included'}."
    )


if __name__ == "__main__":
    main()
