#!/usr/bin/env python
"""Why a text-conditioned MaskDiT samples noise after a short run (issue 22): how well tiny models learn to denoise
the Fashion-MNIST scenes at small noise levels, with and without the parts of the text path.

Each variant trains a tiny model (the MaskDiT demo size: 6 x 192 encoder, 2 x 128 decoder, patch 4; MDTv2 6 + 2
blocks x 128) from the same seed for ``--steps`` AdamW steps (lr 5e-4, batch 64) of the EDM loss (log-normal sigma,
P_mean -1.2, P_std 1.2, sigma_data 0.5) on the first ``--num_images`` training scenes at 32x32, each with its first
caption (MiniLM, 48 tokens). No masking: the question is the architecture's denoiser, not the mask. It then prints
the denoiser's mean squared error divided by sigma^2 on 256 scenes at a few sigmas: 1.0 = no better than returning
the noisy input, lower is better. Samples keep visible noise when this stays near 1 at small sigma, since the last
sampling steps then remove nothing.

Variants: ``maskdit_text`` (the package's text MaskDiT), ``maskdit_text_nopool`` (pooled caption kept out of the
adaLN conditioning), ``maskdit_text_encx`` (no cross-attention in the decoder), ``maskdit_text_nox`` (no
cross-attention at all, pooled caption only), ``maskdit_uncond`` (no conditioning), ``maskdit_wide`` (unconditional,
decoder as wide as the encoder), ``mdt_uncond`` (MDTv2, unconditional), ``mdt_noshort`` (MDTv2 without its dense
input shortcut). CPU is enough (about 2-5 minutes per variant on 2 cores):

    python train_examples/make_fashion_mnist_scenes.py --output_dir /tmp/scenes
    python benchmarks/denoise_ablation.py --scenes /tmp/scenes --variants maskdit_text maskdit_uncond mdt_uncond
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import List

import numpy as np
import torch
from diffusers import EDMEulerScheduler
from PIL import Image

from diffusers_masked import MaskDiTTransformer2DModel, MDTv2Transformer2DModel
from diffusers_masked.pipelines.pipeline_base import encode_texts
from diffusers_masked.utils.text_encoders import load_text_encoder

VARIANTS = ["maskdit_text", "maskdit_text_nopool", "maskdit_text_encx", "maskdit_text_nox", "maskdit_uncond",
            "maskdit_wide", "mdt_uncond", "mdt_noshort"]
MASKDIT_DEMO = dict(sample_size=32, patch_size=4, in_channels=1, hidden_size=192, num_layers=6, num_attention_heads=3,
                    decoder_hidden_size=128, num_decoder_layers=2, decoder_num_attention_heads=2)
MDT_DEMO = dict(sample_size=32, patch_size=4, in_channels=1, hidden_size=128, num_layers=6, num_decoder_layers=2,
                num_attention_heads=4, num_classes=None)
SIGMA_DATA = 0.5


class ZeroPooled(torch.nn.Module):
    """Stands in for the pooled-caption MLP: adds nothing to the conditioning."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 0


def build(variant: str) -> torch.nn.Module:
    if variant.startswith("maskdit_text"):
        model = MaskDiTTransformer2DModel(**MASKDIT_DEMO, num_classes=None, caption_channels=384)
        if "nopool" in variant:
            model.caption_pooled_projection = ZeroPooled()
        if "encx" in variant or "nox" in variant:
            blocks = list(model.decoder_blocks) + (list(model.encoder_blocks) if "nox" in variant else [])
            for block in blocks:
                block.attn2 = None
        return model
    if variant == "maskdit_uncond":
        return MaskDiTTransformer2DModel(**MASKDIT_DEMO, num_classes=None)
    if variant == "maskdit_wide":
        return MaskDiTTransformer2DModel(**{**MASKDIT_DEMO, "decoder_hidden_size": 192,
                                            "decoder_num_attention_heads": 3}, num_classes=None)
    if variant == "mdt_uncond":
        return MDTv2Transformer2DModel(**MDT_DEMO)
    if variant == "mdt_noshort":
        return MDTv2Transformer2DModel(**MDT_DEMO, dense_input_shortcut=False)
    raise ValueError(f"unknown variant {variant!r}; choose from {VARIANTS}")


def load_scenes(root: Path, num_images: int):
    rows = [json.loads(line) for line in open(root / "train" / "metadata.jsonl")][:num_images]
    images = [np.asarray(Image.open(root / "train" / r["file_name"]).convert("L").resize((32, 32), Image.BICUBIC),
                         dtype=np.float32) / 127.5 - 1 for r in rows]
    return torch.from_numpy(np.stack(images))[:, None], [r["text"][0] for r in rows]


#: The preconditioning (c_in, c_noise, c_skip, c_out) of the pipelines' EDM scheduler, as the trainer uses it.
EDM = EDMEulerScheduler(sigma_data=SIGMA_DATA, prediction_type="epsilon")


def denoise(model, noisy, sigma, embeds, mask):
    """EDM's D(x; sigma) through the scheduler's preconditioning."""
    per_sample = sigma[:, None, None, None]
    kwargs = dict(encoder_hidden_states=embeds, encoder_attention_mask=mask) if embeds is not None else {}
    out = model(EDM.precondition_inputs(noisy, per_sample), EDM.precondition_noise(sigma), **kwargs).sample
    return EDM.precondition_outputs(noisy, out, per_sample)


def run(variant: str, x0, embeds, mask, steps: int, batch: int) -> str:
    torch.manual_seed(0)
    model = build(variant)
    text = variant.startswith("maskdit_text")
    opt = torch.optim.AdamW(model.parameters(), lr=5e-4, weight_decay=0)
    g = torch.Generator().manual_seed(1)
    t0 = time.time()
    for _ in range(steps):
        idx = torch.randint(0, len(x0), (batch,), generator=g)
        sigma = (torch.randn(batch, generator=g) * 1.2 - 1.2).exp()
        noise = torch.randn(batch, *x0.shape[1:], generator=g)
        weight = (sigma ** 2 + SIGMA_DATA ** 2) / (sigma * SIGMA_DATA) ** 2
        d = denoise(model, x0[idx] + sigma[:, None, None, None] * noise, sigma,
                    embeds[idx] if text else None, mask[idx] if text else None)
        loss = (weight[:, None, None, None] * (d - x0[idx]) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    idx = torch.arange(min(256, len(x0)))
    parts: List[str] = []
    with torch.no_grad():
        for s in (0.05, 0.2, 1.0):
            sigma = torch.full((len(idx),), s)
            noise = torch.randn(len(idx), *x0.shape[1:], generator=g)
            d = denoise(model, x0[idx] + s * noise, sigma, embeds[idx] if text else None, mask[idx] if text else None)
            parts.append(f"{((d - x0[idx]) ** 2).mean().item() / s ** 2:.3f}")
    return f"| {variant} | {steps} | " + " | ".join(parts) + f" | {time.time() - t0:.0f} |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenes", type=Path, required=True, help="Folder written by make_fashion_mnist_scenes.py.")
    parser.add_argument("--variants", nargs="+", default=VARIANTS, choices=VARIANTS)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--num_images", type=int, default=1024)
    args = parser.parse_args()
    x0, captions = load_scenes(args.scenes, args.num_images)
    encoder, tokenizer = load_text_encoder()
    with torch.no_grad():
        embeds, mask = encode_texts(encoder, tokenizer, captions, max_sequence_length=48)
    print("| variant | steps | MSE / sigma^2 at sigma 0.05 | 0.2 | 1.0 | seconds |")
    print("|---|---|---|---|---|---|")
    for variant in args.variants:
        print(run(variant, x0, embeds, mask, args.steps, args.batch_size), flush=True)


if __name__ == "__main__":
    main()
