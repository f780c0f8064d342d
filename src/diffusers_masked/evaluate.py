"""Evaluate a saved pipeline: ``python -m diffusers_masked.evaluate --pipeline PATH [options]``.

Generates images with fixed per-sample seeds, then reports the Fréchet distance to a reference set (FD-FMNIST by
default, standard Inception FID with local weights) and conditional accuracy, and writes everything, with every
setting that produced it, to a JSON file.

Scene mode (``--scenes DIR``, a data set written by ``train_examples/make_fashion_mnist_scenes.py``): a text-to-image
pipeline draws one image per held-out test caption; the report gives the scene score (share of named items the
Fashion-MNIST classifier finds in their cell, of empty cells left empty; `diffusers_masked.evaluation.scenes`) next to
FD against the real test scenes, on whole images and on the cells.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import List, Optional


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows real defaults only; a None / False default is explained in the help text itself."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    from .evaluation.scenes import EMPTY_INK_LEVEL, EMPTY_INK_THRESHOLD

    p = argparse.ArgumentParser(
        prog="python -m diffusers_masked.evaluate",
        description=(
            "Generate samples from a diffusers-masked pipeline and score them: Fréchet distance to a reference set "
            "(FD-FMNIST with a small Fashion-MNIST classifier trained once and cached, or standard Inception FID from "
            "local torch-fidelity weights) and conditional accuracy (share of samples the classifier assigns to the "
            "class they were asked for). With --scenes (Fashion-MNIST scenes): a text-to-image pipeline draws the "
            "held-out scene captions and the report adds the scene score (named items found in their cell, empty "
            "cells left empty). Nothing is downloaded."
        ),
        formatter_class=_HelpFormatter,
    )
    g = p.add_argument_group("pipeline and sampling")
    g.add_argument(
        "--pipeline",
        type=str,
        default=None,
        help="Folder of a saved pipeline (loaded with diffusers.DiffusionPipeline.from_pretrained after "
        "`import diffusers_masked`). Required unless --train_classifier / --reference_stats_only.",
    )
    g.add_argument(
        "--num_samples",
        type=int,
        default=None,
        help="Number of images to generate (10000 if unset; with --scenes one per held-out scene).",
    )
    g.add_argument("--batch_size", type=int, default=64, help="Images per pipeline call.")
    g.add_argument("--seed", type=int, default=0, help="Sample i uses torch.Generator('cpu').manual_seed(seed + i).")
    g.add_argument("--num_inference_steps", type=int, default=None, help="Denoising steps (default: the pipeline's).")
    g.add_argument(
        "--guidance_scale",
        type=float,
        default=None,
        help="Classifier-free guidance scale (default: the pipeline's; <= 1 disables guidance).",
    )
    g.add_argument(
        "--prompts",
        type=str,
        default=None,
        help='Text pipelines: a .txt (one prompt per line) or .jsonl ({"prompt": ..., "label": k} per '
        "line; labels enable conditional accuracy). Prompts are cycled over the samples.",
    )
    g.add_argument(
        "--scheduler",
        type=str,
        default=None,
        help="Sample with this diffusers scheduler class instead of the saved one, built from the saved scheduler's "
        "config (e.g. DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler; EDM pipelines: "
        "EDMEulerScheduler, EDMDPMSolverMultistepScheduler); 'saved' = the pipeline's own. Default: the saved one, "
        "except a saved DDPMScheduler below 250 steps, which samples with DPMSolverMultistepScheduler (ancestral "
        "DDPM at tens of steps leaves visible noise), as the trainer's validation does.",
    )
    g.add_argument("--device", type=str, default=None, help="torch device (default: cuda if available, else cpu).")
    g.add_argument(
        "--dtype",
        type=str,
        default="float32",
        choices=["float32", "float16", "bfloat16"],
        help="Weights dtype of the pipeline.",
    )
    g.add_argument("--save_images", type=str, default=None, help="Also write the samples as PNGs to this folder.")

    g = p.add_argument_group("reference")
    g.add_argument(
        "--reference",
        type=str,
        default=None,
        help="'fashion-mnist' (test split) or 'fashion-mnist:train' (resized to the generated size like "
        "the trainer does), a folder of images of the generated size, or an .npz with mu/sigma "
        "statistics (ours or ADM/guided-diffusion reference batches) or arr_0 images. Unset: 'fashion-mnist', "
        "or with --scenes the real test scenes.",
    )
    g.add_argument(
        "--reference_num_samples", type=int, default=None, help="Use only the first N reference images (default: all)."
    )
    g.add_argument(
        "--save_reference_stats",
        type=str,
        default=None,
        help="Write the reference feature statistics (mu, sigma) to this .npz for reuse as --reference.",
    )
    g.add_argument(
        "--reference_stats_only",
        action="store_true",
        help="Only compute (and --save_reference_stats) the reference statistics; needs --image_shape "
        "or --pipeline for the image size.",
    )
    g.add_argument(
        "--image_shape",
        type=int,
        nargs=3,
        default=None,
        metavar=("C", "H", "W"),
        help="Image size for --reference_stats_only without --pipeline.",
    )

    g = p.add_argument_group("features and classifier")
    g.add_argument(
        "--feature",
        type=str,
        default="fashion-mnist",
        choices=["fashion-mnist", "inception"],
        help="'fashion-mnist': penultimate features of the embedded Fashion-MNIST classifier (FD-FMNIST). "
        "'inception': standard FID with torch-fidelity's Inception-v3 (needs --inception_weights and "
        "`pip install torch-fidelity`).",
    )
    g.add_argument(
        "--inception_weights",
        type=str,
        default=None,
        help="Path to torch-fidelity's weights-inception-2015-12-05-6726825d.pth (never downloaded here).",
    )
    g.add_argument(
        "--classifier_path",
        type=str,
        default=None,
        help="Fashion-MNIST classifier .safetensors (default: the cached one, trained on first use).",
    )
    g.add_argument(
        "--cache_dir",
        type=str,
        default=None,
        help="Cache folder for the classifier and built-in reference statistics "
        "(default: $DIFFUSERS_MASKED_CACHE or ~/.cache/diffusers_masked).",
    )
    g.add_argument(
        "--accuracy",
        dest="accuracy",
        action="store_true",
        default=None,
        help="Require conditional accuracy (error if labels or a matching classifier are missing).",
    )
    g.add_argument(
        "--no_accuracy",
        dest="accuracy",
        action="store_false",
        default=None,
        help="Skip conditional accuracy (default: computed whenever possible).",
    )
    g.add_argument(
        "--train_classifier",
        action="store_true",
        help="Train (or load) the cached Fashion-MNIST classifier, print its test accuracy and exit.",
    )

    g = p.add_argument_group("scene score (Fashion-MNIST scenes, text-to-image)")
    g.add_argument(
        "--scenes",
        type=str,
        default=None,
        help="Scene mode: a data set folder written by train_examples/make_fashion_mnist_scenes.py (its test/ "
        "split is used) or a folder with a metadata.jsonl of scenes. The pipeline draws the held-out captions; "
        "the report adds the scene score (items found in their cell, empty cells left empty) to FD, against the "
        "split's scenes resized to the model's size (as the trainer resizes them for --resolution).",
    )
    g.add_argument(
        "--scene_captions",
        type=str,
        default="first",
        choices=["first", "cycle"],
        help="Which caption of each test scene to prompt with: its canonical one ('first'), or the phrasings in "
        "turn ('cycle': scene i gets caption i modulo its number of captions).",
    )
    g.add_argument(
        "--empty_threshold",
        type=float,
        default=None,
        help=f"A cell counts as empty when less than this share of its pixels is brighter than {EMPTY_INK_LEVEL} "
        f"(unset: {EMPTY_INK_THRESHOLD}, calibrated on real scenes; see diffusers_masked.evaluation.scenes).",
    )

    g = p.add_argument_group("output")
    g.add_argument("--output", type=str, default="evaluation.json", help="JSON file for metrics and settings.")
    g.add_argument("--no_progress", action="store_true", help="Hide progress bars.")
    args = p.parse_args(argv)
    if not (args.pipeline or args.train_classifier or args.reference_stats_only):
        p.error("--pipeline is required (or use --train_classifier / --reference_stats_only).")
    if args.reference_stats_only and not args.save_reference_stats:
        p.error("--reference_stats_only needs --save_reference_stats PATH.npz.")
    if args.reference_stats_only and not (args.pipeline or args.image_shape):
        p.error("--reference_stats_only needs --image_shape C H W or --pipeline to know the image size.")
    if args.num_samples is not None and args.num_samples < 1:
        p.error(f"--num_samples must be >= 1, got {args.num_samples}.")
    if args.scenes:
        if args.prompts:
            p.error("--scenes prompts with the held-out scene captions; drop --prompts (or drop --scenes).")
        if args.accuracy:
            p.error("--accuracy is for class labels; --scenes reports the scene score instead.")
        if args.reference_stats_only:
            p.error("--reference_stats_only does not take --scenes; pass the scene test folder as --reference.")
        if args.empty_threshold is not None and not 0 <= args.empty_threshold <= 1:
            p.error(f"--empty_threshold is a share of pixels in [0, 1], got {args.empty_threshold}.")
    elif args.empty_threshold is not None or args.scene_captions != "first":
        p.error("--empty_threshold and --scene_captions belong to scene mode: add --scenes DIR.")
    if args.reference is None and not args.scenes:
        args.reference = "fashion-mnist"
    return args


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    import torch

    from .evaluation import evaluate_pipeline, get_feature_spec, load_fashion_mnist_classifier, reference_stats

    progress = not args.no_progress
    if args.train_classifier:
        _, info = load_fashion_mnist_classifier(args.classifier_path, cache_dir=args.cache_dir, progress=progress)
        print(json.dumps(info, indent=2))
        if not (args.pipeline or args.reference_stats_only):
            return 0

    if args.scenes:
        from .data.scenes import scene_split_dir

        scene_split_dir(args.scenes, "test")  # a missing scene data set fails before anything loads

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    spec = get_feature_spec(
        args.feature,
        inception_weights=args.inception_weights,
        classifier_path=args.classifier_path,
        cache_dir=args.cache_dir,
        progress=progress,
    )
    pipeline = None
    if args.pipeline:
        import diffusers

        import diffusers_masked  # noqa: F401  (registers our pipeline classes with diffusers)

        if not Path(args.pipeline).exists():
            raise FileNotFoundError(
                f"--pipeline {args.pipeline} does not exist: pass a folder saved by a trainer or save_pretrained."
            )
        pipeline = diffusers.DiffusionPipeline.from_pretrained(args.pipeline)
        scheduler_name = args.scheduler
        if scheduler_name is None:
            from .evaluation.sampling import pipeline_call_parameters
            from .utils import few_step_sampler_name

            steps = args.num_inference_steps
            if steps is None:
                param = pipeline_call_parameters(pipeline).get("num_inference_steps")
                steps = param.default if param is not None and isinstance(param.default, int) else None
            scheduler_name = few_step_sampler_name(getattr(pipeline, "scheduler", None), steps)
            if scheduler_name:
                print(
                    f"Sampling with {scheduler_name} instead of the saved DDPMScheduler at {steps} steps (pass "
                    "--scheduler saved to keep it)."
                )
        if scheduler_name and scheduler_name != "saved":
            from .utils import build_scheduler

            try:
                pipeline.scheduler = build_scheduler(scheduler_name, pipeline.scheduler.config)
            except ValueError as err:
                raise ValueError(f"--scheduler: {err}") from None
        pipeline.to(device)
        if args.dtype != "float32":
            pipeline.to(getattr(torch, args.dtype))

    if args.scenes:
        return _main_scenes(args, pipeline, argv, progress)

    if args.reference_stats_only:
        from .evaluation.sampling import expected_image_shape

        shape = tuple(args.image_shape) if args.image_shape else expected_image_shape(pipeline)
        stats, desc = reference_stats(
            args.reference, spec, shape, args.reference_num_samples, device=device, cache_dir=args.cache_dir
        )
        stats.save(args.save_reference_stats)
        print(json.dumps({**desc, "saved_to": args.save_reference_stats}, indent=2))
        return 0

    prompts = prompt_labels = None
    if args.prompts:
        from .evaluation import read_prompts

        prompts, prompt_labels = read_prompts(args.prompts)
    num_samples = args.num_samples or 10000
    result = evaluate_pipeline(
        pipeline,
        reference=args.reference,
        num_samples=num_samples,
        batch_size=args.batch_size,
        seed=args.seed,
        num_inference_steps=args.num_inference_steps,
        guidance_scale=args.guidance_scale,
        feature=spec,
        prompts=prompts,
        prompt_labels=prompt_labels,
        cache_dir=args.cache_dir,
        reference_num_samples=args.reference_num_samples,
        save_reference_stats=args.save_reference_stats,
        accuracy=args.accuracy,
        save_images_dir=args.save_images,
        progress=progress,
    )
    out = _write_result(result, args, argv)
    m = result["metrics"]
    acc = m["conditional_accuracy"]
    print(
        f"{m['fd_name']}: {m['fd']:.4f}"
        + (f"  conditional accuracy: {acc:.4f}" if acc is not None else "")
        + f"  ({num_samples} samples, {result['timings']['total_seconds']:.1f} s) -> {out}"
    )
    return 0


def _write_result(result: dict, args: argparse.Namespace, argv: Optional[List[str]]) -> Path:
    """Record where the pipeline came from and the command line, then write the JSON report."""
    result["settings"]["pipeline_path"] = str(Path(args.pipeline).resolve())
    result["settings"]["command"] = " ".join(
        [Path(sys.executable).name, "-m", "diffusers_masked.evaluate", *(argv if argv is not None else sys.argv[1:])]
    )
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str))
    return out


def _main_scenes(args: argparse.Namespace, pipeline, argv: Optional[List[str]], progress: bool) -> int:
    """Scene mode: prompt with the held-out captions of --scenes, report the scene score next to FD."""
    from .data.scenes import load_scenes, scene_split_dir
    from .evaluation.sampling import expected_image_shape
    from .evaluation.scenes import EMPTY_INK_THRESHOLD, evaluate_scenes, resized_scene_reference

    split_dir = scene_split_dir(args.scenes, "test")
    scenes = load_scenes(split_dir, load_images=False)
    reference, resized_to = args.reference, None
    shape = expected_image_shape(pipeline)
    if reference is None and shape is not None and shape[1] == shape[2]:
        # A model trained at another --resolution is compared with the scenes resized as its training data was.
        reference = resized_scene_reference(split_dir, shape[1])
        if not isinstance(reference, str):
            resized_to = [shape[1], shape[2]]
            print(f"FD reference: the scenes of {split_dir} resized to {shape[1]}x{shape[2]}, the model's size.")
    elif reference is None:
        reference = str(split_dir)
    result = evaluate_scenes(
        pipeline,
        scenes.prompts(args.scene_captions),
        scenes.layouts,
        reference=reference,
        num_samples=args.num_samples,
        batch_size=args.batch_size,
        seed=args.seed,
        num_inference_steps=args.num_inference_steps,
        guidance_scale=args.guidance_scale,
        classifier_path=args.classifier_path,
        cache_dir=args.cache_dir,
        feature=args.feature,
        inception_weights=args.inception_weights,
        empty_threshold=EMPTY_INK_THRESHOLD if args.empty_threshold is None else args.empty_threshold,
        reference_num_samples=args.reference_num_samples,
        save_images_dir=args.save_images,
        progress=progress,
    )
    result["settings"]["scenes"] = str(split_dir.resolve())
    result["settings"]["scene_captions"] = args.scene_captions
    if resized_to is not None:
        result["reference"]["resized_to"] = resized_to
    out = _write_result(result, args, argv)
    m = result["metrics"]
    fds = "".join(
        f"  {name}: {value:.4f}"
        for name, value in ((m["fd_name"], m["fd"]), (m["fd_cells_name"], m["fd_cells"]))
        if value is not None
    )
    print(
        f"scene score: {m['scene_score']:.4f} (items {m['item_accuracy']:.4f}, empty cells "
        + (f"{m['empty_accuracy']:.4f}" if m["empty_accuracy"] is not None else "n/a")
        + f", all cells right {m['exact_match']:.4f}){fds}  ({m['num_images']} samples, "
        f"{result['timings']['total_seconds']:.1f} s) -> {out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
