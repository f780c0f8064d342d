"""The one Accelerate training loop shared by every model of this package.

`main(recipe)` parses diffusers-style flags, builds data / model / optimizer / EMA, trains with checkpoints that
resume exactly, saves validation grids, and finally writes a complete pipeline folder (+ model card, optional Hub
upload). Model-specific parts (flags, model, loss, pipeline) come from a `TrainingRecipe`.

Works with plain ``python train_examples/train_maskdit.py`` and with ``accelerate launch [--num_processes N]``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler

from ..data import (
    FASHION_MNIST_CLASSES,
    ImageClassDataset,
    LatentCacheDataset,
    build_latent_cache,
    class_names,
    collate_batch,
    infer_image_geometry,
    load_image_dataset,
    sample_latents,
)
from .checkpointing import (
    OutputDirLock,
    UnsafeCheckpointError,
    accelerate_view_without,
    check_accelerate_pickles,
    delete_checkpoint,
    explain_refused_pickle,
    legacy_custom_states,
    load_state,
    remove_leftovers,
    safe_torch_load,
    save_state,
)
from .objectives import DDPMObjective
from .recipe import TrainingRecipe

logger = logging.getLogger(__name__)
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


# ----------------------------------------------------------------------------------------------------------------
# Flags
# ----------------------------------------------------------------------------------------------------------------
class _DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: X)" only where it informs: not when the help already says what the default is (a None
    default means "decided later", which the help states in words) and not for off-by-default switches."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text.lower() or action.default is None or action.default is False \
                or action.default == argparse.SUPPRESS:
            return text
        return super()._get_help_string(action)


def build_parser(recipe: TrainingRecipe) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=f"Train a {recipe.name} masked diffusion transformer. With no flags: a small model on the "
        "embedded Fashion-MNIST data set, on whatever device is there.",
        formatter_class=_DefaultsHelpFormatter,
    )
    g = p.add_argument_group("data")
    g.add_argument("--dataset_name", type=str, default=None, help="HF datasets name (Hub or local script).")
    g.add_argument("--dataset_config_name", type=str, default=None, help="Config of --dataset_name.")
    g.add_argument("--train_data_dir", type=str, default=None, help="Local image folder (class sub-folders = labels).")
    g.add_argument("--fashion_mnist_dir", type=str, default=None, help="Folder of the Fashion-MNIST idx files "
                   "(default /usr/share/datasets/fashion-mnist from `apt-get install dataset-fashion-mnist`).")
    g.add_argument("--image_column", type=str, default="image")
    g.add_argument("--label_column", type=str, default="label", help="Class column; absent = unconditional.")
    g.add_argument("--max_train_samples", type=int, default=None, help="Use only the first N samples.")
    g.add_argument("--resolution", type=int, default=None, help="Image side (default: the data's own size).")
    g.add_argument("--random_flip", action="store_true", help="Random horizontal flips.")
    g.add_argument("--in_channels", type=int, default=None, help="Expected image/latent channels (checked).")
    g.add_argument("--dataloader_num_workers", type=int, default=0)
    g.add_argument("--vae_path", type=str, default=None, help="Local AutoencoderKL folder: train in its latent space.")
    g.add_argument("--cache_latents", action="store_true", help="Encode the data set once (with flips) and train "
                   "from the cache.")
    g.add_argument("--latent_cache_dir", type=str, default=None, help="Where the latent cache lives "
                   "(default OUTPUT_DIR/latent_cache).")

    g = p.add_argument_group("model and objective")
    g.add_argument("--model_config", type=str, default=None, help="Preset name (e.g. 'S/2', 'XL/2') or a "
                   "config.json path; default: the recipe's small demo model.")
    g.add_argument("--pretrained_model_name_or_path", type=str, default=None,
                   help="Start from the transformer of a saved pipeline folder (or Hub id).")
    g.add_argument("--objective", type=str, default=recipe.default_objective, choices=["edm", "epsilon", "v_prediction"],
                   help="Diffusion objective.")
    # A recipe that draws the ratio per batch (MDTv2) keeps None as the default and says so in mask_ratio_help.
    g.add_argument("--mask_ratio", type=float, default=None if recipe.mask_ratio_help else recipe.default_mask_ratio,
                   help=recipe.mask_ratio_help or "Share of tokens masked in training.")
    # Help strings are %-format templates: a literal percent sign must be written %%.
    g.add_argument("--unmasked_finetune_steps", type=int, default=None,
                   help="The last N steps train without masking (and without the MAE term); default: "
                   f"{recipe.default_unmasked_finetune_fraction * 100:.0f}%% of --max_train_steps.")
    g.add_argument("--class_dropout_prob", type=float, default=None,
                   help="Label dropout for classifier-free guidance (default: the model config's).")
    g.add_argument("--gradient_checkpointing", action="store_true")
    g.add_argument("--lora_rank", type=int, default=0, help="Train a LoRA of this rank on top of "
                   "--pretrained_model_name_or_path instead of all weights (0 = full training).")
    g.add_argument("--lora_alpha", type=float, default=None, help="LoRA alpha (default: the rank).")
    g.add_argument("--lora_dropout", type=float, default=0.0)
    g.add_argument("--lora_target_modules", type=str, default="to_q,to_k,to_v,to_out.0",
                   help="Comma-separated module names (peft target_modules).")
    g.add_argument("--torch_compile", action="store_true", help="torch.compile the transformer.")
    g.add_argument("--torch_compile_mode", type=str, default="default",
                   choices=["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"],
                   help="torch.compile mode; any value but default implies --torch_compile. reduce-overhead replays "
                        "the steps as CUDA graphs: at small per-GPU batches (32) the masked models are otherwise "
                        "host-bound and gain most from it (benchmarks/README.md).")

    g = p.add_argument_group("optimisation")
    g.add_argument("--output_dir", type=str, default=f"output/{recipe.name}-fashion-mnist")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--train_batch_size", type=int, default=64, help="Per device.")
    g.add_argument("--max_train_steps", type=int, default=1000, help="Optimizer steps in total.")
    g.add_argument("--stop_after_steps", type=int, default=None,
                   help="Checkpoint and exit after this many steps in this run (for time-sliced jobs); "
                   "resume later with --resume_from_checkpoint latest.")
    g.add_argument("--max_train_time_minutes", type=float, default=None,
                   help="Wall-clock budget: stop after this many minutes of training and write the pipeline as if "
                   "--max_train_steps had been reached (for equal-time comparisons).")
    g.add_argument("--gradient_accumulation_steps", type=int, default=1)
    g.add_argument("--learning_rate", type=float, default=1e-4)
    g.add_argument("--lr_scheduler", type=str, default="constant", help="diffusers get_scheduler name.")
    g.add_argument("--lr_warmup_steps", type=int, default=0)
    g.add_argument("--optimizer", type=str, default="adamw", choices=["adamw"])
    g.add_argument("--adam_beta1", type=float, default=0.9)
    g.add_argument("--adam_beta2", type=float, default=0.999)
    g.add_argument("--adam_weight_decay", type=float, default=0.0)
    g.add_argument("--adam_epsilon", type=float, default=1e-8)
    g.add_argument("--max_grad_norm", type=float, default=None, help="Clip gradients to this norm (off if unset).")
    g.add_argument("--mixed_precision", type=str, default=None, choices=["no", "fp16", "bf16"],
                   help="Default: accelerate's config.")
    g.add_argument("--allow_tf32", action="store_true")
    g.add_argument("--ddp_comm_hook", type=str, default="no", choices=["no", "fp16", "bf16"],
                   help="Multi-GPU DDP only: all-reduce gradients in this precision (halves the traffic; the sum is "
                   "rounded) instead of float32.")
    g.add_argument("--use_ema", action=argparse.BooleanOptionalAction, default=False,
                   help="Keep an EMA of the weights (used for sampling and the saved pipeline); --no-use_ema "
                   "turns it off.")
    g.add_argument("--ema_decay", type=float, default=0.9999)

    g = p.add_argument_group("checkpoints, logging, validation")
    g.add_argument("--checkpointing_steps", type=int, default=500)
    g.add_argument("--checkpoints_total_limit", type=int, default=None)
    g.add_argument("--resume_from_checkpoint", type=str, default=None, help="'latest' or a checkpoint folder.")
    g.add_argument("--logging_steps", type=int, default=10)
    g.add_argument("--report_to", type=str, default="tensorboard", help="tensorboard, wandb, all or none.")
    g.add_argument("--logging_dir", type=str, default="logs")
    g.add_argument("--validation_steps", type=int, default=500, help="Save a sample grid every N steps (0 = off).")
    g.add_argument("--validation_images_per_class", type=int, default=4)
    g.add_argument("--validation_inference_steps", type=int, default=40)
    g.add_argument("--validation_guidance_scale", type=float, default=1.5)
    g.add_argument("--validation_scheduler", type=str, default=None,
                   help="diffusers scheduler class for validation grids and --eval_* sampling (the saved pipeline "
                   "keeps its own), e.g. DDIMScheduler; 'saved' = the pipeline's. Default: DPMSolverMultistepScheduler "
                   "for DDPM objectives (DDPM at 40 steps leaves visible noise), the saved EDM Euler otherwise.")
    g.add_argument("--eval_every_steps", type=int, default=0, help="Score samples every N steps (and at the end): "
                   "Fréchet distance and conditional accuracy (diffusers_masked.evaluation); 0 = off.")
    g.add_argument("--eval_every_minutes", type=float, default=0.0,
                   help="Also score samples every N minutes of training time (for equal-wall-clock studies).")
    g.add_argument("--eval_num_samples", type=int, default=1000)
    g.add_argument("--eval_reference", type=str, default="fashion-mnist",
                   help="'fashion-mnist', an image folder or a reference .npz (mu/sigma).")
    g.add_argument("--eval_feature", type=str, default="fashion-mnist",
                   help="'fashion-mnist' (FD-FMNIST, embedded classifier) or 'inception' (needs --eval_inception_weights).")
    g.add_argument("--eval_inception_weights", type=str, default=None, help="Local FID Inception weights file.")
    g.add_argument("--eval_batch_size", type=int, default=250)

    g = p.add_argument_group("hub")
    g.add_argument("--push_to_hub", action="store_true")
    g.add_argument("--hub_model_id", type=str, default=None)
    g.add_argument("--hub_token", type=str, default=None)
    g.add_argument("--hub_private_repo", action="store_true")

    recipe.add_arguments(p.add_argument_group(f"{recipe.name}"))
    if recipe.demo_defaults:
        p.set_defaults(**recipe.demo_defaults)
    return p


def _explicit_flags(parser: argparse.ArgumentParser, argv: Optional[List[str]]) -> set:
    """Destinations of the flags the user actually passed (a demo default such as --use_ema is not one)."""
    saved = {a.dest: a.default for a in parser._actions}
    saved_defaults = dict(parser._defaults)
    try:
        for action in parser._actions:
            action.default = argparse.SUPPRESS
        parser._defaults.clear()
        return set(vars(parser.parse_known_args(argv)[0]))
    finally:
        for action in parser._actions:
            action.default = saved[action.dest]
        parser._defaults.update(saved_defaults)


def _model_config_for_checks(recipe: TrainingRecipe, args: argparse.Namespace, error) -> Dict[str, Any]:
    """The model config that --model_config / --pretrained_model_name_or_path / the demo default names, read without
    building anything (JSON only); a bad --model_config is a usage error that lists the presets."""
    spec = args.model_config
    if args.pretrained_model_name_or_path:
        path = Path(args.pretrained_model_name_or_path) / "transformer" / "config.json"
        return json.loads(path.read_text()) if path.is_file() else {}
    if spec is None:
        return dict(recipe.demo_model_config)
    presets = ", ".join(recipe.model_cls.available_presets())
    if os.path.isdir(spec):
        error(f"--model_config {spec} is a folder; pass its config.json file, or a preset ({presets}).")
    if os.path.isfile(spec):
        try:
            config = json.loads(Path(spec).read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            error(f"--model_config {spec} is not a readable JSON config ({err}); fix the file or pass a preset "
                  f"({presets}).")
        if not isinstance(config, dict):
            error(f"--model_config {spec} holds a JSON {type(config).__name__}, not a config object.")
        return config
    try:
        return recipe.model_cls.preset_config(spec)
    except ValueError:
        pass
    # Presets hold one slash ("XL/2", "DiT-XL/2"); anything else path-like is a missing file.
    if spec.lower().endswith(".json") or spec.startswith((".", "/", "~")) or spec.count("/") > 1 or "\\" in spec:
        error(f"--model_config {spec}: the file does not exist. Pass an existing config.json or a preset "
              f"({presets}).")
    error(f"--model_config {spec}: unknown preset; choose one of {presets}, or pass a config.json path.")


def _first_image_file(root: Path) -> Optional[Path]:
    """Any image file under ``root`` (stops at the first one, so a large folder costs nothing)."""
    from PIL import Image

    extensions = {ext.lower() for ext in Image.registered_extensions()}
    for folder, _, files in os.walk(root):
        for name in files:
            if os.path.splitext(name)[1].lower() in extensions and not name.startswith("."):
                return Path(folder) / name
    return None


def _check_args(recipe: TrainingRecipe, args: argparse.Namespace, error) -> None:
    """Usage errors, found before anything loads: each names the flag, the value and the fix."""
    positive = ["train_batch_size", "max_train_steps", "gradient_accumulation_steps", "checkpointing_steps",
                "logging_steps", "validation_inference_steps", "eval_num_samples", "eval_batch_size"]
    for name in positive:
        value = getattr(args, name)
        if value < 1:
            error(f"--{name} {value}: must be >= 1.")
    for name in ("lora_rank", "lr_warmup_steps", "validation_steps", "eval_every_steps", "dataloader_num_workers",
                 "validation_images_per_class"):
        value = getattr(args, name)
        if value < 0:
            error(f"--{name} {value}: must be >= 0.")
    if args.stop_after_steps is not None and args.stop_after_steps < 1:
        error(f"--stop_after_steps {args.stop_after_steps}: must be >= 1 (leave it out to train to --max_train_steps).")
    if args.checkpoints_total_limit is not None and args.checkpoints_total_limit < 1:
        error(f"--checkpoints_total_limit {args.checkpoints_total_limit}: must be >= 1 (leave it out to keep all).")
    if not 0 <= args.unmasked_finetune_steps <= args.max_train_steps:
        error(f"--unmasked_finetune_steps {args.unmasked_finetune_steps}: must be between 0 and --max_train_steps "
              f"({args.max_train_steps}).")
    if args.mask_ratio is not None and not 0 <= args.mask_ratio < 1:
        error(f"--mask_ratio {args.mask_ratio:g}: the share of masked tokens must be in [0, 1) (e.g. 0.5).")
    if args.class_dropout_prob is not None and not 0 <= args.class_dropout_prob < 1:
        error(f"--class_dropout_prob {args.class_dropout_prob:g}: must be in [0, 1) (e.g. 0.1).")
    if not args.learning_rate > 0:
        error(f"--learning_rate {args.learning_rate:g}: must be > 0.")
    if not 0 < args.ema_decay < 1:
        error(f"--ema_decay {args.ema_decay:g}: must be in (0, 1) (e.g. 0.9999).")
    if args.cache_latents and not args.vae_path:
        error("--cache_latents needs --vae_path: latents are cached from a VAE (pixel-space runs need no cache).")
    if args.lora_rank and not args.pretrained_model_name_or_path:
        error("--lora_rank needs --pretrained_model_name_or_path: the trained pipeline (folder or Hub id) to adapt.")
    if args.dataset_name and args.train_data_dir:
        error("--dataset_name and --train_data_dir both given: pass one of them.")
    if args.train_data_dir:
        root = Path(args.train_data_dir)
        if not root.is_dir():
            error(f"--train_data_dir {root}: no such folder.")
        if _first_image_file(root) is None:
            error(f"--train_data_dir {root} holds no image files: put images in it (class sub-folders = labels).")
    if args.resume_from_checkpoint not in (None, "latest") and not Path(args.resume_from_checkpoint).is_dir():
        error(f"--resume_from_checkpoint {args.resume_from_checkpoint}: no such checkpoint folder; pass "
              "'latest' or an OUTPUT_DIR/checkpoint-N folder.")
    if args.validation_scheduler not in (None, "saved"):
        from ..utils import scheduler_class

        try:
            scheduler_class(args.validation_scheduler)
        except ValueError as err:
            error(f"--validation_scheduler {args.validation_scheduler}: {err} (or 'saved' for the pipeline's own).")
    config = _model_config_for_checks(recipe, args, error)
    patch = config.get("patch_size")
    if args.resolution is not None and args.resolution < 1:
        error(f"--resolution {args.resolution}: must be >= 1.")
    side = args.resolution
    if side is None and not (args.dataset_name or args.train_data_dir):
        side = 28  # the embedded Fashion-MNIST
    factor, vae_config = 1, Path(args.vae_path or "") / "config.json"
    if args.vae_path and vae_config.is_file():
        factor = 2 ** (len(json.loads(vae_config.read_text()).get("block_out_channels", [0])) - 1)
    if side is not None and isinstance(patch, int) and patch > 0 and side % (patch * factor):
        step = patch * factor
        source = "--model_config " + args.model_config if args.model_config else (
            "--pretrained_model_name_or_path" if args.pretrained_model_name_or_path else "the demo model")
        vae = f" x the VAE's downsampling {factor}" if factor > 1 else ""
        given = f"--resolution {side}" if args.resolution is not None else f"the data's size {side} (no --resolution)"
        lower, upper = side // step * step, (side // step + 1) * step
        fix = f"--resolution {upper}" + (f" or {lower}" if lower else "")
        error(f"{given} is not a multiple of {step} (patch size {patch} of {source}{vae}): pass {fix}.")
    recipe.check_args(args, error)


def parse_args(recipe: TrainingRecipe, argv: Optional[List[str]] = None) -> argparse.Namespace:
    """Parse and check the flags; a bad flag exits with a usage error (exit code 2) before anything loads."""
    parser = build_parser(recipe)
    args = parser.parse_args(argv)
    args.explicit_flags = sorted(_explicit_flags(parser, argv))
    args.command_line = list(sys.argv[1:] if argv is None else argv)
    if args.unmasked_finetune_steps is None:
        args.unmasked_finetune_steps = int(recipe.default_unmasked_finetune_fraction * args.max_train_steps)
    _check_args(recipe, args, parser.error)
    return args


# ----------------------------------------------------------------------------------------------------------------
# Data order
# ----------------------------------------------------------------------------------------------------------------
class EpochBatchSampler(Sampler):
    """Deterministic shuffled batches: epoch e uses permutation seed+e, the global batch of each step is split over
    the processes, and iteration can start at any step. This makes resume exact and makes N processes see the same
    global batches as one process with an N-times larger batch."""

    def __init__(self, num_samples: int, batch_size: int, num_replicas: int, rank: int, seed: int):
        self.num_samples, self.batch_size = num_samples, batch_size
        self.num_replicas, self.rank, self.seed = num_replicas, rank, seed
        self.global_batch = batch_size * num_replicas
        if num_samples < self.global_batch:
            raise ValueError(
                f"The data set has {num_samples} samples, fewer than one global batch ({self.global_batch}); "
                "lower --train_batch_size or add data."
            )
        self.epoch, self.start = 0, 0

    def set_position(self, epoch: int, start_batch: int) -> None:
        self.epoch, self.start = epoch, start_batch

    def __len__(self) -> int:
        return self.num_samples // self.global_batch

    def __iter__(self):
        perm = torch.randperm(self.num_samples, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        for step in range(self.start, len(self)):
            offset = step * self.global_batch + self.rank * self.batch_size
            yield perm[offset : offset + self.batch_size].tolist()


class _TrainState:
    """Counters, whole-run totals and every process's noise generator, saved in each checkpoint
    (`checkpointing.save_state`).

    The main process writes it, but `state_dict` runs on every process: the generator states of all processes are
    gathered there, so each one resumes its own noise / mask stream. The totals (images seen, training seconds, last
    logged loss) let a resumed run report the whole run, not its last segment."""

    def __init__(self, generator: torch.Generator):
        self.global_step = 0
        self.generator = generator
        self.images_seen = 0
        self.train_seconds = 0.0  # training time of the segments before this one (sampling / evaluation left out)
        self.last_loss: Optional[float] = None

    def state_dict(self) -> Dict[str, Any]:
        from accelerate import PartialState
        from accelerate.utils import gather_object

        state = self.generator.get_state()
        states = gather_object([state]) if PartialState().num_processes > 1 else [state]
        last_loss = self.last_loss if self.last_loss is not None and math.isfinite(self.last_loss) else None
        return {"global_step": self.global_step, "generators": states, "images_seen": self.images_seen,
                "train_seconds": self.train_seconds, "last_loss": last_loss}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        from accelerate import PartialState

        self.global_step = int(state["global_step"])
        self.images_seen = int(state.get("images_seen", 0))
        self.train_seconds = float(state.get("train_seconds", 0.0))
        last = state.get("last_loss")
        self.last_loss = float(last) if last is not None else None
        partial = PartialState()
        states = state.get("generators", [state.get("generator")])
        if len(states) != partial.num_processes:
            # Another process count changes the per-process batches anyway; keep going with fresh noise streams.
            logger.warning(
                "This checkpoint was written by %d process(es) and %d resume it: training continues, but not "
                "exactly as the interrupted run would have (same --num_processes for an exact resume).",
                len(states), partial.num_processes,
            )
            self.generator.manual_seed(self.generator.initial_seed() + 7919 * self.global_step)
            return
        self.generator.set_state(states[partial.process_index])


def check_fsdp_args(args: argparse.Namespace) -> None:
    """Refuse, before any work, what an FSDP run cannot do in this trainer.

    The sampling that validation grids, evaluation and the final pipeline need runs on the main process only, but
    FSDP's sharded parameters can only be gathered by every process together: it would hang. The EMA is built from
    the unsharded parameters, before accelerate shards them. So FSDP runs train and checkpoint (sharded); the final
    checkpoint is the result (the trainer logs how to merge it)."""
    problems = []
    if args.use_ema:
        problems.append("--use_ema (pass --no-use_ema)")
    if args.validation_steps:
        problems.append("validation grids (pass --validation_steps 0)")
    if args.eval_every_steps or args.eval_every_minutes:
        problems.append("in-training evaluation (drop --eval_every_steps / --eval_every_minutes)")
    if args.lora_rank:
        problems.append("LoRA (--lora_rank)")
    if args.push_to_hub:
        problems.append("--push_to_hub")
    if problems:
        raise ValueError("Under FSDP this trainer supports no " + ", no ".join(problems) + ". FSDP pays off only for "
                         "models whose weights and optimizer states do not fit one GPU; otherwise use DDP "
                         "(`accelerate launch --multi_gpu`), which supports all of them.")


# ----------------------------------------------------------------------------------------------------------------
# Trainer
# ----------------------------------------------------------------------------------------------------------------
class Trainer:
    """Holds the run's objects; `run()` trains. Attributes recipes may use: ``args``, ``accelerator``,
    ``class_names``, ``id2label``, ``vae``, ``objective``, ``model``, ``output_dir``."""

    def __init__(self, recipe: TrainingRecipe, args: argparse.Namespace):
        from accelerate import Accelerator
        from accelerate.utils import (DDPCommunicationHookType, DistributedDataParallelKwargs, DistributedType,
                                      ProjectConfiguration, set_seed)

        self.recipe, self.args = recipe, args
        self.output_dir = Path(args.output_dir)
        report_to = self._resolve_report_to(args.report_to)
        self.accelerator = Accelerator(
            gradient_accumulation_steps=args.gradient_accumulation_steps,
            mixed_precision=args.mixed_precision,
            log_with=report_to,
            project_config=ProjectConfiguration(project_dir=str(self.output_dir), logging_dir=str(self.output_dir / args.logging_dir)),
            # Gradients as views of DDP's all-reduce buckets: no copy back after each all-reduce and one gradient
            # buffer less (same values; nothing here calls detach_() on a gradient).
            kwargs_handlers=[DistributedDataParallelKwargs(
                gradient_as_bucket_view=True, comm_hook=DDPCommunicationHookType(args.ddp_comm_hook))],
        )
        logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
        if args.ddp_comm_hook == "bf16" and self.accelerator.device.type != "cuda":
            raise ValueError("--ddp_comm_hook bf16 needs CUDA GPUs (NCCL); on this device use fp16 or no.")
        self.is_fsdp = self.accelerator.distributed_type == DistributedType.FSDP
        if self.is_fsdp:
            check_fsdp_args(args)
        if args.allow_tf32 and torch.cuda.is_available():
            torch.backends.cuda.matmul.allow_tf32 = True
        set_seed(args.seed)
        self.lock = OutputDirLock(self.output_dir)
        if self.accelerator.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            self.lock.acquire()  # before any work: a second run on this folder stops here
            remove_leftovers(self.output_dir)
        try:
            self._build(args)
        except BaseException:
            self.lock.release()
            raise

    def _build(self, args: argparse.Namespace) -> None:
        recipe = self.recipe
        device = self.accelerator.device
        # One generator for every random draw of the step (noise, sigma, masks, label dropout, flips), distinct per
        # process and saved in checkpoints: resuming continues the same random stream.
        gen = torch.Generator(device=device).manual_seed(args.seed * 1000 + self.accelerator.process_index)
        self.state = _TrainState(gen)
        self.time_budget_reached = False
        self.last_eval: Optional[Dict[str, Any]] = None
        self.num_evals = 0  # time-triggered evaluations so far
        self.excluded_time = 0.0  # seconds spent sampling / evaluating, left out of the wall-clock budget
        self.vae = None
        self._prepare_data()
        recipe.setup(self)
        self.objective = recipe.build_objective(args)
        self._build_model()

    @staticmethod
    def _resolve_report_to(report_to: str):
        if report_to in (None, "none", ""):
            return None
        if report_to == "tensorboard":
            try:
                import tensorboard  # noqa: F401
            except ImportError:
                logger.warning("tensorboard is not installed (pip install tensorboard); logging disabled.")
                return None
        return report_to

    # ---- data ------------------------------------------------------------------------------------------------
    def _prepare_data(self) -> None:
        args = self.args
        ds = load_image_dataset(args)
        channels, size = infer_image_geometry(ds, args.image_column)
        resolution = args.resolution or size
        self.class_names = class_names(ds, args.label_column)
        if self.class_names is None and not (args.dataset_name or args.train_data_dir):
            self.class_names = list(FASHION_MNIST_CLASSES)
        self.id2label = {i: n for i, n in enumerate(self.class_names)} if self.class_names else None
        self.image_dataset = ImageClassDataset(ds, args.image_column, args.label_column, resolution, channels)
        self.pixel_channels, self.resolution = channels, resolution
        if args.vae_path:
            self._load_vae()
            factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
            if resolution % factor:
                raise ValueError(f"--resolution {resolution} must be divisible by the VAE's downsampling factor {factor}.")
            self.sample_size, self.model_channels = resolution // factor, self.vae.config.latent_channels
            if self.vae.config.in_channels != channels:
                raise ValueError(
                    f"The VAE takes {self.vae.config.in_channels}-channel images but the data has {channels} channels."
                )
        else:
            self.sample_size, self.model_channels = resolution, channels
        if args.in_channels is not None and args.in_channels != self.model_channels:
            what = "latent" if self.vae is not None else "image"
            raise ValueError(
                f"--in_channels {args.in_channels} does not match the data: the {what}s have {self.model_channels} "
                "channels (grayscale = 1, RGB = 3, SD-VAE latents = 4). Drop --in_channels or convert the data."
            )
        if args.cache_latents:
            cache_dir = Path(args.latent_cache_dir or self.output_dir / "latent_cache")
            fingerprint = f"{len(ds)}-{resolution}-{getattr(ds, '_fingerprint', 'na')}-{args.vae_path}"
            if self.accelerator.is_main_process:
                build_latent_cache(self.image_dataset, self.vae, cache_dir, device=self.accelerator.device,
                                   fingerprint=fingerprint)
            self.accelerator.wait_for_everyone()
            self.train_dataset = LatentCacheDataset(cache_dir)
        else:
            self.train_dataset = self.image_dataset
        acc = self.accelerator
        self.sampler = EpochBatchSampler(len(self.train_dataset), args.train_batch_size, acc.num_processes,
                                         acc.process_index, args.seed)
        self.dataloader = DataLoader(self.train_dataset, batch_sampler=self.sampler, collate_fn=collate_batch,
                                     num_workers=args.dataloader_num_workers, pin_memory=torch.cuda.is_available())

    def _load_vae(self) -> None:
        from diffusers import AutoencoderKL

        if not os.path.isdir(self.args.vae_path):
            logger.warning("--vae_path %s is not a local folder; trying it as a Hub id.", self.args.vae_path)
        self.vae = AutoencoderKL.from_pretrained(self.args.vae_path)
        self.vae.requires_grad_(False).eval().to(self.accelerator.device)

    def clean_batch(self, batch: Dict[str, torch.Tensor]) -> torch.Tensor:
        """Clean training sample x0 (pixels in [-1, 1] or scaled VAE latents) for a loader batch."""
        gen = self.state.generator
        device = self.accelerator.device
        if "moments" in batch:
            cfg = self.vae.config
            x0 = sample_latents(batch["moments"].to(device), cfg.scaling_factor, getattr(cfg, "shift_factor", None) or 0.0, gen)
        else:
            x = batch["pixel_values"].to(device)
            if self.args.random_flip:
                flip = torch.rand(x.shape[0], generator=gen, device=gen.device).to(device) < 0.5
                x = torch.where(flip.view(-1, 1, 1, 1), x.flip(3), x)
            if self.vae is None:
                return x
            with torch.no_grad():
                dist = self.vae.encode(x.to(self.vae.dtype)).latent_dist
                cfg = self.vae.config
                x0 = (dist.sample(generator=gen) - (getattr(cfg, "shift_factor", None) or 0.0)) * cfg.scaling_factor
        return x0.float()

    # ---- model, optimizer ----------------------------------------------------------------------------------------
    def _build_model(self) -> None:
        args, recipe = self.args, self.recipe
        num_classes = len(self.class_names) if self.class_names else None
        self.label_lookup = None
        if args.pretrained_model_name_or_path:
            model = recipe.model_cls.from_pretrained(args.pretrained_model_name_or_path, subfolder="transformer")
            cfg = model.config
            if cfg.in_channels != self.model_channels or cfg.sample_size != self.sample_size:
                raise ValueError(
                    f"The pretrained transformer takes {cfg.in_channels}x{cfg.sample_size}x{cfg.sample_size} inputs "
                    f"but the data gives {self.model_channels}x{self.sample_size}x{self.sample_size}."
                )
            self._map_labels_to_pretrained(cfg.num_classes)
        else:
            model = recipe.build_model(args, self.sample_size, self.model_channels, num_classes)
        if args.gradient_checkpointing:
            model.enable_gradient_checkpointing()
        if args.lora_rank:
            from peft import LoraConfig

            model.requires_grad_(False)
            targets = [t.strip() for t in args.lora_target_modules.split(",") if t.strip()]
            model.add_adapter(LoraConfig(r=args.lora_rank, lora_alpha=args.lora_alpha or args.lora_rank,
                                         lora_dropout=args.lora_dropout, init_lora_weights="gaussian",
                                         target_modules=targets))
            if args.use_ema:
                if "use_ema" in getattr(args, "explicit_flags", ()):  # not when only the demo default turned it on
                    logger.warning("--use_ema is ignored in a LoRA run (only the adapter trains).")
                args.use_ema = False
        model.train()
        self.model = model
        self.ema = None
        if args.use_ema:
            from .ema import LerpEMAModel

            # diffusers' EMAModel (same state dict) whose foreach step is one lerp over all tensors (ema.py).
            self.ema = LerpEMAModel(model.parameters(), decay=args.ema_decay, foreach=True, model_cls=type(model),
                                    model_config=model.config)
            self.ema.to(self.accelerator.device)
        params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = self.build_optimizer(params)
        from diffusers.optimization import get_scheduler

        n = self.accelerator.num_processes
        self.lr_scheduler = get_scheduler(args.lr_scheduler, optimizer=self.optimizer,
                                          num_warmup_steps=args.lr_warmup_steps * n,
                                          num_training_steps=args.max_train_steps * n)
        self.model, self.optimizer, self.lr_scheduler = self.accelerator.prepare(model, self.optimizer, self.lr_scheduler)
        if args.torch_compile or args.torch_compile_mode != "default":
            mode = None if args.torch_compile_mode == "default" else args.torch_compile_mode
            self.model = torch.compile(self.model, mode=mode)
        # Saved by save_checkpoint as safetensors + JSON, not registered with accelerate (which would pickle them).
        self.checkpoint_objects: Dict[str, Any] = {"train_state": self.state}
        if self.ema is not None:
            self.checkpoint_objects["ema"] = self.ema

    def _map_labels_to_pretrained(self, num_classes: Optional[int]) -> None:
        """Fine-tuning data may name only some of the base model's classes (e.g. one class folder): map its class
        names onto the base model's ids by name so that labels keep their meaning."""
        path = Path(self.args.pretrained_model_name_or_path) / "model_index.json"
        base = json.loads(path.read_text()).get("id2label") if path.is_file() else None
        if num_classes is None or not self.class_names:
            return
        if not base:
            if len(self.class_names) != num_classes:
                raise ValueError(f"The data has {len(self.class_names)} classes, the pretrained model {num_classes}.")
            return
        base = {int(k): v for k, v in base.items()}
        by_name = {}
        for idx, names in base.items():
            for name in str(names).split(","):
                by_name[name.strip()] = idx
        unknown = [n for n in self.class_names if n not in by_name]
        if unknown:
            raise ValueError(f"Class names {unknown} of the data are not classes of the pretrained model "
                             f"({sorted(by_name)}); name the class folders after the model's classes.")
        self.label_lookup = torch.tensor([by_name[n] for n in self.class_names], device=self.accelerator.device)
        self.id2label, self.class_names = base, [base[i] for i in sorted(base)]

    def build_optimizer(self, params: List[torch.nn.Parameter]) -> torch.optim.Optimizer:
        args = self.args
        build = getattr(self.recipe, "build_optimizer", None)
        if build is not None:
            opt = build(params, args)
            if opt is not None:
                return opt
        fused = torch.cuda.is_available() and self.accelerator.device.type == "cuda"
        # Off CUDA, foreach (torch's default there is a per-tensor Python loop): 16 -> 13 ms per CPU quickstart step.
        return torch.optim.AdamW(params, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                                 weight_decay=args.adam_weight_decay, eps=args.adam_epsilon, fused=fused or None,
                                 foreach=None if fused else True)

    @property
    def unwrapped_model(self) -> torch.nn.Module:
        """The bare transformer (no DDP / torch.compile wrapper): what EMA, sampling and saving use.

        Sampling goes through the eager module on purpose: the compiled one would compile again for no-grad inference
        (with ``reduce-overhead``, also record new CUDA graphs), which costs more than a sample grid takes."""
        # Strip torch.compile first: accelerate's unwrap_model keeps a compile wrapper and re-points its _orig_mod
        # past DDP, changing the wrapper the training step still uses.
        return self.accelerator.unwrap_model(getattr(self.model, "_orig_mod", self.model))

    # ---- checkpoints ---------------------------------------------------------------------------------------------
    def list_checkpoints(self) -> List[Path]:
        """Complete checkpoints, oldest first: temporary names (being written or deleted) never match."""
        if not self.output_dir.is_dir():
            return []
        found = [(int(m.group(1)), d) for d in self.output_dir.iterdir() if d.is_dir() and (m := CHECKPOINT_RE.match(d.name))]
        return [d for _, d in sorted(found)]

    def _record_totals(self) -> None:
        """Whole-run totals up to now into the train state (saved with the next checkpoint)."""
        seg = getattr(self, "_segment", None)
        if seg is None:
            return
        step = self.state.global_step
        self.state.images_seen = seg["images"] + (step - seg["step"]) * seg["images_per_step"]
        self.state.train_seconds = seg["seconds"] + time.time() - seg["t0"] - self.excluded_time

    def save_checkpoint(self) -> Path:
        """accelerate `save_state` plus the trainer's own state (safetensors + JSON) into a temporary folder, then
        an atomic rename: a kill mid-save never leaves a half-written checkpoint that `--resume_from_checkpoint
        latest` would pick."""
        acc = self.accelerator
        step = self.state.global_step
        final = self.output_dir / f"checkpoint-{step}"
        tmp = self.output_dir / f".checkpoint-{step}.tmp"
        if acc.is_main_process and tmp.exists():
            shutil.rmtree(tmp)
        acc.wait_for_everyone()
        acc.save_state(str(tmp))
        self._record_totals()
        states = {name: obj.state_dict() for name, obj in self.checkpoint_objects.items()}  # gathers on every process
        if acc.is_main_process:
            for name, state in states.items():
                save_state(state, tmp, name)
        acc.wait_for_everyone()
        if acc.is_main_process:
            if final.exists():
                delete_checkpoint(final)
            os.replace(tmp, final)
            limit = self.args.checkpoints_total_limit
            if limit is not None:
                for old in self.list_checkpoints()[:-limit]:
                    delete_checkpoint(old)
        acc.wait_for_everyone()
        return final

    def _resume_hint(self, path: Path) -> str:
        """Where to resume from instead of the checkpoint ``path`` that failed: the newest older one."""
        m = CHECKPOINT_RE.match(path.name)
        older = [c for c in self.list_checkpoints() if c.resolve() != path.resolve()
                 and (m is None or int(CHECKPOINT_RE.match(c.name).group(1)) < int(m.group(1)))]
        if older:
            return (f" The previous checkpoint is {older[-1]}: resume from it with --resume_from_checkpoint "
                    f"{older[-1]} (delete or move {path} so that 'latest' skips it).")
        return " There is no older checkpoint: start without --resume_from_checkpoint."

    def _accelerate_load(self, path: Path, report_as: Optional[Path] = None) -> None:
        import pickle

        try:
            # weights_only=True explicitly: accelerate's optimizer / scheduler files are pickles.
            self.accelerator.load_state(str(path), load_kwargs={"weights_only": True})
        except pickle.UnpicklingError as err:
            refused = explain_refused_pickle(path, err)
            raise UnsafeCheckpointError(str(refused).replace(str(path), str(report_as or path))) from None

    def _load_checkpoint(self, path: Path) -> None:
        """Load ``path`` without unpickling anything that could run code (see checkpointing.py)."""
        acc = self.accelerator
        check_accelerate_pickles(path, acc.process_index)
        legacy = legacy_custom_states(path)
        if legacy and not (path / "train_state.json").is_file():
            # Written before the safetensors + JSON format: accelerate would unpickle these with weights_only=False.
            # Read them with weights_only=True instead (they held only tensors and plain values) and let accelerate
            # load the rest through a view of the folder without them.
            if len(legacy) != len(self.checkpoint_objects):
                raise ValueError(f"{path} has {len(legacy)} trainer state file(s) (custom_checkpoint_*.pkl); this run "
                                 f"has {len(self.checkpoint_objects)} ({', '.join(self.checkpoint_objects)}): "
                                 "resume with the same --use_ema setting.")
            states = [safe_torch_load(f) for f in legacy]  # registration order: train state, then EMA
            with accelerate_view_without(path, [f.name for f in legacy], self.output_dir) as view:
                self._accelerate_load(view, report_as=path)
            for obj, state in zip(self.checkpoint_objects.values(), states):
                obj.load_state_dict(state)
            logger.warning("%s is in the old checkpoint format (pickled trainer state, read safely); the next "
                           "checkpoints are written as safetensors + JSON.", path)
            return
        if legacy:
            raise UnsafeCheckpointError(f"{path} holds {[f.name for f in legacy]} next to the trainer state: a "
                                        "checkpoint of this trainer never does; it was not loaded.")
        missing = [name for name in self.checkpoint_objects if not (path / f"{name}.json").is_file()]
        if missing:
            hint = " (was it written with --use_ema? resume with the same setting)" if missing == ["ema"] else ""
            raise FileNotFoundError(f"{path} has no {', '.join(m + '.json' for m in missing)}{hint}")
        self._accelerate_load(path)
        for name, obj in self.checkpoint_objects.items():
            obj.load_state_dict(load_state(path, name))

    def maybe_resume(self) -> None:
        spec = self.args.resume_from_checkpoint
        if not spec:
            return
        if spec == "latest":
            found = self.list_checkpoints()
            if not found:
                logger.info("No checkpoint in %s; starting from scratch.", self.output_dir)
                return
            path = found[-1]
        else:
            path = Path(spec)
            if not path.is_dir():
                raise FileNotFoundError(f"--resume_from_checkpoint {spec} is not a checkpoint folder.")
        if self.is_fsdp:
            logger.warning("FSDP checkpoints are read by torch.distributed.checkpoint, whose metadata file is a "
                           "pickle: resume only FSDP checkpoints you wrote yourself.")
        try:
            self._load_checkpoint(path)
        except UnsafeCheckpointError as err:
            raise UnsafeCheckpointError(f"Could not resume from {path}: {err}{self._resume_hint(path)}") from None
        except Exception as err:  # surface a clear message instead of a deep stack trace
            raise RuntimeError(
                f"Could not resume from {path}: {err}. The checkpoint is corrupt or was written by a different model "
                "configuration / number of processes." + self._resume_hint(path)
            ) from err
        if self.ema is not None:
            self.ema.to(self.accelerator.device)  # the EMA shadow weights are loaded on the CPU
        logger.info("Resumed from %s at step %d.", path, self.state.global_step)

    def make_pipeline(self):
        pipe = self.recipe.build_pipeline(self.unwrapped_model, self.objective.inference_scheduler(), self.vae,
                                          self.id2label, self)
        # Saved in model_index.json, so sampling the model with a scheduler of another objective warns.
        if hasattr(pipe, "record_training_objective"):
            pipe.record_training_objective(self.objective.scheduler)
        return pipe

    @property
    def validation_scheduler_name(self) -> Optional[str]:
        """Scheduler class used for validation grids and in-training evaluation (`None`: the saved one)."""
        name = self.args.validation_scheduler
        if name is None:
            return "DPMSolverMultistepScheduler" if isinstance(self.objective, DDPMObjective) else None
        return None if name == "saved" else name

    def make_sampling_pipeline(self):
        """`make_pipeline` with --validation_scheduler swapped in (validation grids and evaluation only)."""
        pipe = self.make_pipeline()
        if self.validation_scheduler_name:
            from ..utils import build_scheduler

            pipe.scheduler = build_scheduler(self.validation_scheduler_name, pipe.scheduler.config)
        return pipe

    @contextlib.contextmanager
    def sampling_weights(self):
        """Eval mode and, with --use_ema, the EMA weights for the duration of the block."""
        model = self.unwrapped_model
        if self.ema is not None:
            self.ema.store(model.parameters())
            self.ema.copy_to(model.parameters())
        model.eval()
        try:
            yield model
        finally:
            model.train()
            if self.ema is not None:
                self.ema.restore(model.parameters())

    @torch.no_grad()
    def evaluate(self, step: int, train_seconds: float) -> Dict[str, Any]:
        """Fréchet distance (+ conditional accuracy) of --eval_num_samples samples; appended to eval_log.jsonl."""
        from ..evaluation import evaluate_pipeline

        args = self.args
        with self.sampling_weights():
            pipe = self.make_sampling_pipeline()
            pipe.set_progress_bar_config(disable=True)
            report = evaluate_pipeline(
                pipe, reference=args.eval_reference, num_samples=args.eval_num_samples, batch_size=args.eval_batch_size,
                seed=args.seed, num_inference_steps=args.validation_inference_steps,
                guidance_scale=args.validation_guidance_scale, feature=args.eval_feature,
                inception_weights=args.eval_inception_weights, progress=False, **self.recipe.eval_kwargs(self),
            )
        images_per_step = args.train_batch_size * self.accelerator.num_processes * args.gradient_accumulation_steps
        record = {"step": step, "images_seen": step * images_per_step, "wall_clock_s": train_seconds,
                  "scheduler": report.get("settings", {}).get("scheduler"),
                  **{f"eval/{k}": v for k, v in report["metrics"].items() if isinstance(v, (int, float))}}
        with open(self.output_dir / "eval_log.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        self.accelerator.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=step)
        return record

    @torch.no_grad()
    def sample_grid(self, path: Path):
        """Validation grid (rows = classes) with EMA weights when used; saved as PNG and returned as a PIL image."""
        from diffusers.utils import make_image_grid

        with self.sampling_weights():
            pipe = self.make_sampling_pipeline()
            pipe.set_progress_bar_config(disable=True)
            gen = torch.Generator(device="cpu").manual_seed(self.args.seed)
            images, cols = self.recipe.validation_images(pipe, self, gen)
        rows = math.ceil(len(images) / cols)
        images = images + [images[0].copy() for _ in range(rows * cols - len(images))]
        grid = make_image_grid(images, rows=rows, cols=cols)
        if grid.width < 256:  # tiny images (Fashion-MNIST) are easier to judge enlarged
            factor = max(1, 256 // grid.width)
            grid = grid.resize((grid.width * factor, grid.height * factor), resample=0)
        path.parent.mkdir(parents=True, exist_ok=True)
        grid.save(path)
        return grid

    def log_grid(self, grid, step: int) -> None:
        for tracker in self.accelerator.trackers:
            if tracker.name == "tensorboard":
                tracker.writer.add_image("validation", np.asarray(grid.convert("RGB")), step, dataformats="HWC")
            elif tracker.name == "wandb":
                import wandb

                tracker.log({"validation": [wandb.Image(grid)]}, step=step)

    def save_pipeline(self) -> Path:
        model = self.unwrapped_model
        if self.ema is not None:
            self.ema.copy_to(model.parameters())
        pipe = self.make_pipeline()
        pipe.save_pretrained(self.output_dir, safe_serialization=True)
        return self.output_dir

    def _sample_base_grid(self) -> None:
        """In a LoRA run: the base model's grid before training, for a before/after comparison."""
        model = self.unwrapped_model
        model.disable_adapters()
        try:
            self.sample_grid(self.output_dir / "sample_grid_before.png")
        finally:
            model.enable_adapters()

    def save_lora(self) -> Path:
        """Write only the adapter: OUTPUT_DIR/pytorch_lora_weights.safetensors (load with `pipe.load_lora_weights`)."""
        from peft.utils import get_peft_model_state_dict

        model = self.unwrapped_model
        self.recipe.pipeline_cls.save_lora_weights(
            self.output_dir,
            transformer_lora_layers=get_peft_model_state_dict(model),
            transformer_lora_adapter_metadata=model.peft_config["default"].to_dict(),
        )
        return self.output_dir / "pytorch_lora_weights.safetensors"

    def write_model_card(self, metrics: Dict[str, Any]) -> Path:
        from .hub import write_model_card

        return write_model_card(self, metrics)

    def backward_part(self, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        """Run ``compute()`` (a forward pass and its loss) and back-propagate it now, without a gradient all-reduce.

        For recipes whose step has several independent forward passes (MDTv2's full and masked branches): the
        activations of one part are freed before the next runs, so the peak memory is one part's. The gradients
        accumulate; the recipe returns the last part's loss, whose backward (in the loop) syncs them as usual.
        Returns the detached loss for logging."""
        with self.accelerator.no_sync(self.model):
            loss = compute()
            self.accelerator.backward(loss)
        return loss.detach()

    # ---- loop ----------------------------------------------------------------------------------------------------
    def run(self) -> Dict[str, Any]:
        """Train; the output-folder lock is released however the run ends."""
        try:
            return self._run()
        finally:
            self.lock.release()

    def _run(self) -> Dict[str, Any]:
        from tqdm.auto import tqdm

        args, acc, recipe = self.args, self.accelerator, self.recipe
        if acc.is_main_process:
            acc.init_trackers(f"{recipe.name}", config={k: v for k, v in vars(args).items()
                                                        if isinstance(v, (int, float, str, bool)) and k != "hub_token"})
        self.maybe_resume()
        if args.lora_rank and self.state.global_step == 0 and acc.is_main_process:
            self._sample_base_grid()
        model_cfg = self.unwrapped_model.config
        n_params = sum(p.numel() for p in self.unwrapped_model.parameters())
        if acc.is_main_process:
            logger.info("%s: %.2fM parameters, input %dx%dx%d, %d samples, global batch %d", type(self.unwrapped_model).__name__,
                        n_params / 1e6, model_cfg.in_channels, self.sample_size, self.sample_size, len(self.train_dataset),
                        args.train_batch_size * acc.num_processes * args.gradient_accumulation_steps)
        steps_per_epoch = len(self.sampler) // args.gradient_accumulation_steps
        if steps_per_epoch == 0:
            raise ValueError("One epoch holds fewer batches than --gradient_accumulation_steps; lower it or add data.")
        start_step = self.state.global_step
        stop_at = args.max_train_steps if args.stop_after_steps is None else min(args.max_train_steps, start_step + args.stop_after_steps)
        progress = tqdm(total=args.max_train_steps, initial=start_step, disable=not acc.is_local_main_process, desc="train")
        images_per_step = args.train_batch_size * acc.num_processes * args.gradient_accumulation_steps
        t0, window_t, window_steps = time.time(), time.time(), 0
        # Totals of the segments before this one come from the checkpoint (an old one has none: count its steps).
        prior_images = self.state.images_seen or start_step * images_per_step
        self._segment = {"t0": t0, "step": start_step, "images": prior_images, "seconds": self.state.train_seconds,
                         "images_per_step": images_per_step}
        last_loss = self.state.last_loss if self.state.last_loss is not None else float("nan")
        gen = self.state.generator
        while self.state.global_step < stop_at:
            batches_done = self.state.global_step * args.gradient_accumulation_steps
            epoch, start_batch = divmod(batches_done, steps_per_epoch * args.gradient_accumulation_steps)
            self.sampler.set_position(epoch, start_batch)
            for batch in self.dataloader:
                with acc.accumulate(self.model):
                    x0 = self.clean_batch(batch)
                    batch = {k: v.to(acc.device) for k, v in batch.items()}
                    if self.label_lookup is not None:
                        batch["class_labels"] = self.label_lookup[batch["class_labels"]]
                    cond = recipe.conditioning_kwargs(batch, self.unwrapped_model, args, gen)
                    ratio = recipe.mask_ratio(args, self.state.global_step, gen)
                    loss, logs = recipe.compute_loss(self.model, self.objective, x0, cond, ratio, args, gen)
                    acc.backward(loss)
                    if acc.sync_gradients and args.max_grad_norm:
                        acc.clip_grad_norm_(self.model.parameters(), args.max_grad_norm)
                    self.optimizer.step()
                    self.lr_scheduler.step()
                    self.optimizer.zero_grad(set_to_none=True)
                if not acc.sync_gradients:
                    continue
                self.state.global_step += 1
                step = self.state.global_step
                window_steps += 1
                if self.ema is not None:
                    self.ema.step(self.unwrapped_model.parameters())
                progress.update(1)
                if step % args.logging_steps == 0 or step == stop_at:
                    last_loss = acc.gather(loss.detach().reshape(1)).mean().item()
                    self.state.last_loss = last_loss
                    now = time.time()
                    ips = window_steps * images_per_step / max(now - window_t, 1e-9)
                    window_t, window_steps = now, 0
                    record = {"loss": last_loss, "lr": self.lr_scheduler.get_last_lr()[0], "img_per_s": ips,
                              "mask_ratio": ratio, "images_seen": step * images_per_step,
                              "wall_clock_s": now - t0 - self.excluded_time, **{k: float(v) for k, v in logs.items()}}
                    progress.set_postfix(loss=f"{last_loss:.4f}", img_s=f"{ips:.1f}")
                    acc.log(record, step=step)
                if step % args.checkpointing_steps == 0 or step == stop_at:
                    self.save_checkpoint()
                if args.validation_steps and step % args.validation_steps == 0 and acc.is_main_process:
                    t_val = time.time()
                    grid = self.sample_grid(self.output_dir / "samples" / f"step_{step:07d}.png")
                    self.log_grid(grid, step)
                    self.excluded_time += time.time() - t_val
                train_s = time.time() - t0 - self.excluded_time
                due_minutes = bool(args.eval_every_minutes) and train_s >= 60 * args.eval_every_minutes * (self.num_evals + 1)
                self.num_evals += int(due_minutes)
                due = due_minutes or (args.eval_every_steps and step % args.eval_every_steps == 0)
                if due and acc.is_main_process:
                    t_eval = time.time()
                    self.last_eval = self.evaluate(step, t_eval - t0 - self.excluded_time)
                    self.excluded_time += time.time() - t_eval
                if args.max_train_time_minutes is not None and step < stop_at:
                    # Every process must stop on the same step; the main process's clock decides, as only it
                    # leaves its sampling time out (the others spend it waiting in the next all-reduce).
                    train_s = time.time() - t0 - self.excluded_time
                    over_budget = acc.is_main_process and train_s > 60 * args.max_train_time_minutes
                    over = torch.tensor(float(over_budget), device=acc.device)
                    if acc.reduce(over, reduction="sum").item() > 0:
                        stop_at, self.time_budget_reached = step, True
                        self.save_checkpoint()
                if step >= stop_at:
                    break
        progress.close()
        self._record_totals()
        # Whole-run totals: a resumed run reports every segment, not only this one.
        total_s = self.state.train_seconds
        result = {"global_step": self.state.global_step, "final_loss": last_loss, "train_time_s": total_s,
                  "images_per_s": self.state.images_seen / max(total_s, 1e-9),
                  "finished": self.state.global_step >= args.max_train_steps or self.time_budget_reached,
                  "images_seen": self.state.images_seen, "num_parameters": n_params}
        if not result["finished"] and acc.is_main_process:
            self._report_stopped_early()
        if result["finished"] and self.is_fsdp:
            if acc.is_main_process:  # the sharded final checkpoint is the result (see check_fsdp_args)
                (self.output_dir / "train_results.json").write_text(json.dumps(result, indent=2))
                last = self.list_checkpoints()[-1]  # written at the last step
                logger.info("FSDP run finished; the sharded weights are in %s. Merge them with `accelerate merge-weights "
                            "%s/pytorch_model_fsdp_0 MERGED_DIR` (one file of full weights) and load them into the "
                            "transformer with `load_state_dict`.",
                            last, last)
        elif result["finished"] and acc.is_main_process:
            self.finish(result)
        acc.wait_for_everyone()
        acc.end_training()
        if acc.num_processes > 1:
            self._release_process_group()
        return result

    def _report_stopped_early(self) -> None:
        """Say that --stop_after_steps ended the run before --max_train_steps, and how to go on."""
        import shlex

        args = self.args
        last = self.list_checkpoints()[-1]
        flags, items = [], iter(getattr(args, "command_line", []))
        for item in items:
            if item in ("--resume_from_checkpoint", "--hub_token"):
                next(items, None)
                flags += ["--hub_token", "YOUR_TOKEN"] if item == "--hub_token" else []  # never print a secret
            elif item.startswith("--hub_token="):
                flags.append("--hub_token=YOUR_TOKEN")
            elif not item.startswith("--resume_from_checkpoint="):
                flags.append(item)
        own = sys.argv[0] if sys.argv else ""
        script = own if own.endswith(".py") and not own.endswith("__main__.py") else f"train_examples/train_{self.recipe.name}.py"
        command = shlex.join(["python", script, *flags, "--resume_from_checkpoint", "latest"])
        message = (f"Stopped early at step {self.state.global_step} of {args.max_train_steps} (--stop_after_steps "
                   f"{args.stop_after_steps}); no pipeline written yet. Checkpoint: {last}. Resume with:\n  {command}")
        print(message, flush=True)

    def _release_process_group(self) -> None:
        """Free the DDP wrapper, the last owner of the process group, while its worker threads are idle.

        PyTorch's gloo process group joins its worker threads in its destructor with the GIL held, and a worker may
        still need the GIL to free the last collective's tensors (pytorch/pytorch#56297): freeing the wrapper right
        after the final barrier could deadlock (seen on 2 CPU processes). Sleeping releases the GIL so the workers
        finish first; then the wrapper is dropped here instead of at an arbitrary later point."""
        time.sleep(0.5)
        self.model = self.unwrapped_model
        self.accelerator.free_memory()

    def finish(self, result: Dict[str, Any]) -> None:
        """Write the pipeline, the final sample grid, the model card and (optionally) push to the Hub."""
        out = self.output_dir
        if self.args.eval_every_steps or self.args.eval_every_minutes:
            step = self.state.global_step
            if self.last_eval is None or self.last_eval["step"] != step:
                self.last_eval = self.evaluate(step, result["train_time_s"])
            result.update({k: v for k, v in self.last_eval.items() if k.startswith("eval/")})
        grid_path = out / "sample_grid.png"
        self.sample_grid(grid_path)
        if self.args.lora_rank:
            self.save_lora()
        else:
            self.save_pipeline()
        result["sample_grid"] = str(grid_path)
        (out / "train_results.json").write_text(json.dumps(result, indent=2))
        self.write_model_card(result)
        if self.args.push_to_hub:
            from .hub import push_to_hub

            push_to_hub(self.args, out)
        logger.info("Saved the pipeline to %s (sample grid %s).", out, grid_path)


def main(recipe: TrainingRecipe, argv: Optional[List[str]] = None) -> Dict[str, Any]:
    """Entry point of the train_examples scripts."""
    args = parse_args(recipe, argv)
    return Trainer(recipe, args).run()
