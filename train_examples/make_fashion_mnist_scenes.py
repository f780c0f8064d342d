#!/usr/bin/env python
"""Write "Fashion-MNIST scenes", the embedded captioned data set for text-to-image training: 64x64 grey images with
1 to 4 Fashion-MNIST items on a 2x2 grid, each image with several captions that say what is where ("a bag at top left
and a sneaker at bottom right"), generated from the local Fashion-MNIST files (nothing is downloaded).

    python train_examples/make_fashion_mnist_scenes.py --output_dir data/fashion-mnist-scenes

writes data/fashion-mnist-scenes/{train,test}/ (PNGs + metadata.jsonl with the columns file_name, text (a list of
captions), layout (class id or -1 per cell: top left, top right, bottom left, bottom right) and fashion_mnist_index),
plus scenes_info.json. The test split takes its items from the Fashion-MNIST test split and its layouts from a held-out
share of all arrangements, which the train split never shows. The same arguments write byte-identical files.
Score a text-to-image model on the test split with
`python -m diffusers_masked.evaluate --pipeline PIPE --scenes data/fashion-mnist-scenes`.
"""

import argparse
import sys
import time
from pathlib import Path

from diffusers_masked.data.scenes import DEFAULT_HOLDOUT_FRACTION, write_scenes


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--output_dir", type=Path, required=True, help="Folder to write train/ and test/ into.")
    parser.add_argument("--num_train", type=int, default=20000, help="Training scenes (default: 20000).")
    parser.add_argument(
        "--num_test",
        type=int,
        default=1000,
        help="Held-out test scenes: items from the Fashion-MNIST test split, layouts never shown in training "
        "(default: 1000).",
    )
    parser.add_argument("--seed", type=int, default=0, help="Seed of all random choices (default: 0).")
    parser.add_argument(
        "--holdout_fraction",
        type=float,
        default=DEFAULT_HOLDOUT_FRACTION,
        help="Share of all layouts reserved for the test split, chosen by a hash of the layout, the same for "
        f"every seed; 0 lets both splits draw any layout (default: {DEFAULT_HOLDOUT_FRACTION}).",
    )
    parser.add_argument(
        "--fashion_mnist_dir",
        type=str,
        default=None,
        help="Folder with the Fashion-MNIST idx files "
        "(unset: $FASHION_MNIST_DIR or /usr/share/datasets/fashion-mnist).",
    )
    parser.add_argument("--overwrite", action="store_true", help="Replace a scene data set already in --output_dir.")
    args = parser.parse_args(argv)
    if args.num_train < 0 or args.num_test < 0:
        parser.error(f"--num_train and --num_test must be >= 0, got {args.num_train} and {args.num_test}.")
    if args.num_train == 0 and args.num_test == 0:
        parser.error("--num_train and --num_test are both 0: nothing to write.")
    if not 0 <= args.holdout_fraction < 1:
        parser.error(f"--holdout_fraction must be in [0, 1), got {args.holdout_fraction}.")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    try:
        write_scenes(
            args.output_dir,
            num_train=args.num_train,
            num_test=args.num_test,
            seed=args.seed,
            holdout_fraction=args.holdout_fraction,
            fashion_mnist_root=args.fashion_mnist_dir,
            overwrite=args.overwrite,
        )
    except (FileExistsError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(
        f"wrote {args.num_train} train and {args.num_test} test scenes to {args.output_dir} "
        f"in {time.perf_counter() - start:.1f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
