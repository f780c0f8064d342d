#!/usr/bin/env python
"""Train MaskDiT with the shared diffusers-masked trainer.

    python train_examples/train_maskdit.py                       # small model on Fashion-MNIST (CPU ok)
    python train_examples/train_maskdit.py --conditioning text   # text-to-image on the Fashion-MNIST scenes
    python train_examples/train_maskdit.py --train_data_dir ./captioned --caption_column text   # your captions
    accelerate launch train_examples/train_maskdit.py --model_config XL/2 --vae_path ./sd-vae \
        --train_data_dir ./imagenet --resolution 256 --cache_latents --mixed_precision bf16 --train_batch_size 128

`--help` lists every flag.
"""

from diffusers_masked.training import main
from diffusers_masked.training.recipe_maskdit import MaskDiTRecipe

if __name__ == "__main__":
    main(MaskDiTRecipe())
