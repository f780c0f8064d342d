#!/usr/bin/env python
"""Write a tiny "new concept" data set for the LoRA example: Fashion-MNIST sneakers, upside down, in a class folder
named after the base model's class ("Sneaker"), so a LoRA teaches the base model to draw sneakers upside down.

    python train_examples/make_upside_down_sneakers.py data/upside-down-sneakers [--count 512]
"""

import argparse
from pathlib import Path

from PIL import Image

from diffusers_masked.data import FASHION_MNIST_CLASSES, load_fashion_mnist_arrays


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output_dir", type=Path)
    parser.add_argument("--count", type=int, default=512, help="Number of images.")
    parser.add_argument("--class_name", default="Sneaker", choices=FASHION_MNIST_CLASSES)
    args = parser.parse_args()
    images, labels = load_fashion_mnist_arrays("train")
    picked = images[labels == FASHION_MNIST_CLASSES.index(args.class_name)][: args.count]
    folder = args.output_dir / args.class_name
    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(picked):
        Image.fromarray(image[::-1]).save(folder / f"{i:05d}.png")
    print(f"wrote {len(picked)} images to {folder}")


if __name__ == "__main__":
    main()
