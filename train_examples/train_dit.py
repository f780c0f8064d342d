#!/usr/bin/env python
"""Train a DiT with TREAD token routing (or, with --route_ratio 0, a plain DiT) with the shared trainer.

    python train_examples/train_dit.py                       # small TREAD-DiT on Fashion-MNIST (CPU ok)
    python train_examples/train_dit.py --route_ratio 0       # the same DiT without routing (baseline)
    accelerate launch train_examples/train_dit.py --model_config XL/2 --vae_path ./sd-vae \
        --train_data_dir ./imagenet --resolution 256 --cache_latents --mixed_precision bf16 --train_batch_size 256

Routing defaults follow the TREAD paper: --route_ratio 0.5 over blocks 2 .. num_layers - 4 (--route_start,
--route_end, inclusive); sampling never routes. `--help` lists every flag.
"""

from diffusers_masked.training import main
from diffusers_masked.training.recipe_dit import RoutedDiTRecipe

if __name__ == "__main__":
    main(RoutedDiTRecipe())
