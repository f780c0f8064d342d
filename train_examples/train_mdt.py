#!/usr/bin/env python
"""Train MDTv2 with the shared diffusers-masked trainer.

    python train_examples/train_mdt.py                           # small model on Fashion-MNIST (CPU ok)
    python train_examples/train_mdt.py --conditioning text       # text-to-image on the Fashion-MNIST scenes
    accelerate launch train_examples/train_mdt.py --model_config XL/2 --vae_path ./sd-vae-ft-mse \
        --train_data_dir ./imagenet --resolution 256 --cache_latents --random_flip --use_adan \
        --learning_rate 3e-4 --max_grad_norm 1.0 --use_ema --ema_decay 0.9999 --train_batch_size 32

Each step trains the full and the masked branch (mask ratio ~ U[0.3, 0.5) per batch; `--mask_ratio 0.3` for MDT v1
style). `--help` lists every flag.
"""

from diffusers_masked.training import main
from diffusers_masked.training.recipe_mdt import MDTv2Recipe

if __name__ == "__main__":
    main(MDTv2Recipe())
