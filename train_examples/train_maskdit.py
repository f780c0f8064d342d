#!/usr/bin/env python
"""Train MaskDiT with the shared diffusers-masked trainer.

    python train_examples/train_maskdit.py                       # small model on Fashion-MNIST (CPU ok)
    accelerate launch train_examples/train_maskdit.py --model_config XL/2 --vae_path ./sd-vae \
        --train_data_dir ./imagenet --resolution 256 --cache_latents --mixed_precision bf16 --train_batch_size 128

`--help` lists every flag.
"""

from diffusers_masked.training import main
from diffusers_masked.training.recipe_maskdit import MaskDiTRecipe

if __name__ == "__main__":
    main(MaskDiTRecipe())
