#!/usr/bin/env python
"""Equal wall-clock study of issue 23: does reduced-token training reach the unmasked DiT's quality sooner?

Contenders (`CONTENDERS`), all trained by the shared trainer (``train_examples/train_*.py``, CLI flags only) on
Fashion-MNIST resized to 32x32 (256 tokens of patch 2), B-size models, the same per-GPU batch, AdamW, learning-rate
schedule, EMA, class dropout, bf16 autocast and ``--torch_compile``, and the same EDM objective; each is sampled
with the same solver family, number of steps and guidance in the trainer's in-training evaluation (FD-FMNIST and
conditional accuracy on ``--eval_num_samples`` samples every ``--minutes``/``--eval_points`` minutes of training).

- ``dit``: our DiT (`RoutedDiTTransformer2DModel`, ``--route_ratio 0``), the unmasked baseline;
- ``tread_dit``: the same with TREAD routing (ratio 0.5 over blocks 2 .. L-4);
- ``maskdit``: MaskDiT (mask 0.5, MAE 0.1, its unmasked fine-tuning share);
- ``deferred_maskdit``: DeferredMaskDiT / MicroDiT (TINY/2 preset, class-conditional, mask 0.75 after the
  patch-mixer);
- ``mdtv2``: MDTv2 with the EDM objective (``train_mdt.py --objective edm``: both branches with the EDM loss, no
  learned variance; recorded as not run by a trainer without it);
- ``mdtv2_ddpm``: MDTv2 with its paper's DDPM objective (epsilon + learned-variance VLB, min-SNR 5), sampled with
  DPM-Solver++ in its DDPM form: labelled as such, not like-for-like in objective.

One contender per invocation fits one 10-minute device call; each run is MERGED into ``OUT/convergence.json`` (rows
of other contenders, from ``--merge_from`` or OUT's own file, are kept; a contender's row is replaced). The
evaluation records are written as they arrive, so a call cut by its time limit still leaves them. The report
(``convergence.md``, ``fd_vs_time.png``, ``fd_vs_images.png``) covers every merged row; ``--report_only`` rebuilds
it without training. Normalised time = images seen / the contender's trainer img/s from ONE side-by-side call
(``--throughput_json``, written by ``trainer_vs_harness.py`` at the study's batch size), because device calls land
on different machines.

``--plan`` prints each contender's expected wall time of one call (training + evaluations + set-up); ``--tune
MODEL`` runs a few short variants of one recipe (decoder depth, mask ratio, routing span, patch-mixer depth, ...)
in one call and records them in ``OUT/tune.json`` / ``tune.md``.

    python benchmarks/convergence.py --models dit --out OUT --work_dir /tmp/study          # one device call
    python benchmarks/convergence.py --plan                                                # expected wall times
    python benchmarks/convergence.py --report_only --out benchmarks/results_h200/study --throughput_json T.json
    python benchmarks/convergence.py --tune maskdit --out OUT                             # 4 short variants
    python benchmarks/convergence.py --quick --models dit --out /tmp/conv                 # CPU smoke test
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import inspect
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

# ----------------------------------------------------------------------------------------------------------------
# Time-plan assumptions (used only by the printed estimates; the JSON records what each call measured)
# ----------------------------------------------------------------------------------------------------------------
#: Device call limit the estimates are checked against: 10 minutes minus a minute for the wheel install, the
#: device's start-up of the command and the stage's own summary.
CALL_BUDGET_S = 540.0
#: Process start, imports, data preload at 32x32, model build, loading (or first training) of the FD classifier.
ASSUMED_SETUP_S = 45.0
#: Checkpoint at the time budget (weights + AdamW + EMA of a B model, ~2 GB), sample grid, pipeline, model card.
ASSUMED_FINISH_S = 15.0
#: Evaluation sampling runs the eager fp32 module (TF32 matmuls with --allow_tf32): effective TFLOP/s assumed until
#: a call has measured one (then the measured rate of the merged JSON is used).
ASSUMED_EVAL_TFLOPS = 150.0
#: Fixed seconds per evaluation besides sampling (classifier features, Fréchet distance).
EVAL_FIXED_S = 3.0
#: Training seconds assumed lost to compilation when a MaskDiT step estimate is made (first compile, plus the
#: recompile of the unmasked stage's new token count).
COMPILE_ALLOWANCE_S = 45.0
UNMASKED_RECOMPILE_S = 30.0


@dataclass(frozen=True)
class Contender:
    """One row of the study: which trainer script, which model, and the flags that are the recipe's own."""

    name: str
    label: str
    script: str
    model_cls: str  # "module:Class", for presets and the harness
    preset: str
    objective: str
    flags: Tuple[str, ...]
    what_differs: str
    sampler: str  # the --validation_scheduler (same solver, DPM-Solver++ 2M, in its EDM or DDPM form)
    harness_loss: str  # train_throughput.make_loss_fn name with the same loss
    unmasked_share: float = 0.0  # the recipe's own unmasked fine-tuning share of the steps
    preflight_flags: Tuple[str, ...] = ()  # flags the script must list in --help to be run at all
    harness_mdt_mask_ratio: float = 0.4
    harness_split_backward: bool = False
    tiny: Any = None  # quick-mode config: dict, or a preset name
    variants: Tuple[str, ...] = ("base",)


EDM_CONSTANTS = ("--edm_sigma_data", "0.5", "--edm_p_mean", "-1.2", "--edm_p_std", "1.2")
EDM_SAMPLER = "EDMDPMSolverMultistepScheduler"
DDPM_SAMPLER = "DPMSolverMultistepScheduler"
_TINY_DIT = dict(patch_size=4, hidden_size=32, num_layers=4, num_attention_heads=2)

CONTENDERS: Dict[str, Contender] = {c.name: c for c in (
    Contender(
        "dit", "DiT (ours, no routing)", "train_examples/train_dit.py",
        "diffusers_masked.models.transformer_dit:RoutedDiTTransformer2DModel", "B/2", "edm",
        ("--route_ratio", "0", *EDM_CONSTANTS), "the unmasked baseline: every token through all 12 blocks",
        EDM_SAMPLER, "ours_dit", tiny=_TINY_DIT),
    Contender(
        "tread_dit", "TREAD-DiT (route 0.5)", "train_examples/train_dit.py",
        "diffusers_masked.models.transformer_dit:RoutedDiTTransformer2DModel", "B/2", "edm",
        ("--route_ratio", "0.5", *EDM_CONSTANTS),
        "TREAD routing: 50% of the tokens skip blocks 2..8 (the paper's span 2..L-4) in training; no unrouted "
        "fine-tune (recipe default)", EDM_SAMPLER, "tread_dit", tiny=_TINY_DIT,
        variants=("base", "span1_10:--route_start=1,--route_end=10", "span4_8:--route_start=4,--route_end=8",
                  "ratio75:--route_ratio=0.75")),
    Contender(
        "maskdit", "MaskDiT (mask 0.5)", "train_examples/train_maskdit.py",
        "diffusers_masked.models.transformer_maskdit:MaskDiTTransformer2DModel", "B/2", "edm",
        ("--mask_ratio", "0.5", "--mae_loss_coef", "0.1", *EDM_CONSTANTS),
        "MaskDiT: 50% of the tokens masked, 8 x 512 decoder on all tokens, + 0.1 x MAE loss on the masked ones; "
        "the last 10% of the (estimated) steps unmasked (recipe default share)", EDM_SAMPLER, "maskdit",
        unmasked_share=0.1,
        tiny=dict(patch_size=4, hidden_size=32, num_layers=2, num_attention_heads=2, decoder_hidden_size=16,
                  num_decoder_layers=1, decoder_num_attention_heads=2),
        # ft25: the study's MaskDiT row closed most of its gap to DiT in a 10% unmasked fine-tune (FD 11.5 -> 6.7).
        variants=("base", "dec4:num_decoder_layers=4", "ft25:unmasked_share=0.25", "mask25:--mask_ratio=0.25")),
    Contender(
        "deferred_maskdit", "DeferredMaskDiT (TINY/2, mask 0.75)", "train_examples/train_deferred_maskdit.py",
        "diffusers_masked.models.transformer_deferred_maskdit:DeferredMaskDiTTransformer2DModel", "TINY/2", "edm",
        ("--conditioning", "class", "--mask_ratio", "0.75", *EDM_CONSTANTS),
        "MicroDiT: 4-block patch-mixer on all tokens, 75% masked after it, 16-block layer-wise-scaled backbone "
        "(512 wide, 8-expert MoE every 2nd block; no B preset exists), loss on kept tokens only; class labels, "
        "not captions; EDM constants of the others (MicroDiT's own: sigma_data 0.9, P_mean -0.6)",
        EDM_SAMPLER, "deferred_moe", tiny="DEBUG/4",
        variants=("base", "mixer2:patch_mixer_layers=2", "mixer6:patch_mixer_layers=6", "dense:num_experts=0")),
    Contender(
        "mdtv2", "MDTv2 (EDM)", "train_examples/train_mdt.py",
        "diffusers_masked.models.transformer_mdt:MDTv2Transformer2DModel", "B/2", "edm",
        ("--objective", "edm", *EDM_CONSTANTS),
        "MDTv2 with the EDM objective: full + masked branch per step (mask ratio per batch from U[0.3, 0.5), 4 "
        "levels), side-interpolater, 12 + 4 blocks", EDM_SAMPLER, "mdt", preflight_flags=("--edm_sigma_data",),
        harness_split_backward=True,
        tiny=dict(patch_size=4, hidden_size=32, num_layers=3, num_decoder_layers=1, num_attention_heads=2)),
    Contender(
        "mdtv2_ddpm", "MDTv2 (paper's DDPM objective)", "train_examples/train_mdt.py",
        "diffusers_masked.models.transformer_mdt:MDTv2Transformer2DModel", "B/2", "epsilon",
        ("--objective", "epsilon", "--min_snr_gamma", "5"),
        "MDTv2 as its paper: DDPM epsilon + learned-variance VLB with min-SNR 5 weight (NOT the EDM objective), "
        "sampled with DPM-Solver++ in DDPM form; full + masked branch per step (U[0.3, 0.5), 4 levels), 12 + 4 "
        "blocks, branches back-propagated one after the other", DDPM_SAMPLER, "mdt", harness_split_backward=True,
        tiny=dict(patch_size=4, hidden_size=32, num_layers=3, num_decoder_layers=1, num_attention_heads=2),
        variants=("base", "dec2:num_decoder_layers=2", "dec6:num_decoder_layers=6",
                  "range2040:--mask_ratio_range=0.2/0.4")),
)}
#: The study's default order; trainer_vs_harness.py times these side by side.
DEFAULT_STUDY_MODELS = ("dit", "tread_dit", "maskdit", "deferred_maskdit", "mdtv2", "mdtv2_ddpm")
DEFAULT_OVERHEAD_MODELS = ("dit", "tread_dit", "maskdit", "deferred_maskdit", "mdtv2_ddpm")


def flag_value(flags: Sequence[str], name: str, default: Any = None) -> Any:
    """The value of the last ``name VALUE`` in a flag list (argparse's rule), else ``default``."""
    value = default
    for i, flag in enumerate(flags[:-1]):
        if flag == name:
            value = flags[i + 1]
    return value


def unsupported_reason(contender: Contender) -> Optional[str]:
    """Why the trainer cannot run ``contender`` as specified (``None``: it can): its script's --help must list the
    contender's ``preflight_flags`` (e.g. MDTv2's EDM constants, which exist only once its recipe has EDM)."""
    if not contender.preflight_flags:
        return None
    proc = subprocess.run([sys.executable, contender.script, "--help"], cwd=str(ROOT), capture_output=True,
                          text=True, timeout=300)
    missing = [f for f in contender.preflight_flags if f not in proc.stdout]
    if proc.returncode != 0 or missing:
        return (f"{contender.script} has no {', '.join(missing) or 'usable --help'}: the trainer's recipe for this "
                f"model offers no {contender.objective.upper()} objective yet")
    return None


# ----------------------------------------------------------------------------------------------------------------
# Flags
# ----------------------------------------------------------------------------------------------------------------
def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=None, help="Comma-separated contenders, run one after the other: "
                   + ", ".join(CONTENDERS) + " or 'all'; one per device call (default: dit; --plan: all).")
    p.add_argument("--out", default="benchmarks/results_h200/study")
    p.add_argument("--merge_from", default=None,
                   help="convergence.json of earlier calls whose other rows are kept (default: OUT's own).")
    p.add_argument("--work_dir", default=None, help="Trainer outputs and checkpoints (default OUT/runs).")
    p.add_argument("--throughput_json", default=None,
                   help="trainer_vs_harness.json of one side-by-side call: trainer img/s per contender at the "
                        "study's batch, for normalised time and MaskDiT's step estimate.")
    p.add_argument("--expected_img_s", nargs="*", default=[], metavar="MODEL=IMG_S",
                   help="Trainer img/s to assume for a contender's step estimate (overrides --throughput_json).")
    p.add_argument("--fashion_mnist_dir", default=None, help="Folder of the Fashion-MNIST idx files.")
    g = p.add_argument_group("what every contender shares")
    g.add_argument("--minutes", type=float, default=5.0, help="Training time per contender (the trainer's clock: "
                   "compilation counts, sampling and scoring do not).")
    g.add_argument("--eval_points", type=int, default=5,
                   help="Evaluations at minutes/eval_points, 2 x that, ..., the last at the end.")
    g.add_argument("--eval_num_samples", type=int, default=5000)
    g.add_argument("--eval_batch_size", type=int, default=500)
    g.add_argument("--eval_inference_steps", type=int, default=16)
    g.add_argument("--guidance_scale", type=float, default=1.0,
                   help="Classifier-free guidance of the evaluation; 1 = none (MDTv2's pipeline would apply its "
                        "power-cosine schedule to any scale above 1, the others a constant one).")
    g.add_argument("--resolution", type=int, default=32)
    g.add_argument("--train_batch_size", type=int, default=256)
    g.add_argument("--learning_rate", type=float, default=2e-4)
    g.add_argument("--lr_scheduler", default="constant")
    g.add_argument("--lr_warmup_steps", type=int, default=100)
    g.add_argument("--ema_decay", type=float, default=0.999)
    g.add_argument("--class_dropout_prob", type=float, default=0.1)
    g.add_argument("--mixed_precision", default="bf16")
    g.add_argument("--torch_compile", action=argparse.BooleanOptionalAction, default=True)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--logging_steps", type=int, default=50)
    g.add_argument("--data_on_device", choices=("auto", "always", "never"), default="auto",
                   help="The trainer's --data_on_device (auto: the 61 MB of 32x32 Fashion-MNIST stay on the GPU). "
                        "Rows before it existed trained from the DataLoader ('never').")
    p.add_argument("--plan", action="store_true", help="Print each contender's expected call time; train nothing.")
    p.add_argument("--report_only", action="store_true", help="Rebuild the table and plots from the JSON.")
    p.add_argument("--tune", default=None, metavar="MODEL", help="Run --variants of MODEL for --tune_minutes each.")
    p.add_argument("--variants", nargs="*", default=None, metavar="LABEL:KEY=VALUE,...",
                   help="Tune variants: 'base' or LABEL:overrides; a KEY of the model config (num_decoder_layers=4) "
                        "or a trainer flag (--mask_ratio=0.25; values of a multi-value flag joined by '/'); "
                        "unmasked_share=F sets the fine-tuning share. "
                        "Default: the model's own list (see CONTENDERS).")
    p.add_argument("--tune_minutes", type=float, default=1.0)
    p.add_argument("--tune_eval_samples", type=int, default=2000)
    p.add_argument("--tune_compile", action=argparse.BooleanOptionalAction, default=False,
                   help="Compile the tune runs too. Off by default: the trainer's clock counts compilation, which "
                        "would take most of a one-minute run, so short variants train eager and compare eager.")
    p.add_argument("--call", default=None, help="Label of this call in the table (e.g. 'h200 session 5 call 2').")
    p.add_argument("--quick", action="store_true",
                   help="CPU smoke test: tiny models, eager fp32, seconds of training, a few samples. Not a result.")
    return p.parse_args(argv)


def apply_quick(args: argparse.Namespace) -> None:
    """--quick: settings a 2-core CPU runs in seconds (tiny configs are chosen per contender in `model_config`)."""
    if not getattr(args, "quick", False):
        return
    import trainer_vs_harness

    trainer_vs_harness.quiet_cpu_threads()
    args.minutes, args.eval_points, args.tune_minutes = 0.15, 2, 0.1
    args.eval_num_samples, args.eval_batch_size, args.eval_inference_steps = 20, 10, 2
    args.tune_eval_samples = 20
    args.train_batch_size = min(args.train_batch_size, 8)
    args.mixed_precision, args.torch_compile, args.logging_steps = "no", False, 5
    args.lr_warmup_steps = 2


def shared_settings(args: argparse.Namespace) -> Dict[str, Any]:
    """Every setting the contenders share (the table's settings section; each row records its own copy)."""
    return {
        "data": f"Fashion-MNIST train split (60000), resized to {args.resolution}x{args.resolution}, 1 channel, "
                "pixels in [-1, 1], no flips",
        "resolution": args.resolution, "train_batch_size": args.train_batch_size, "optimizer": "AdamW (fused)",
        "learning_rate": args.learning_rate, "adam_betas": [0.9, 0.999], "adam_weight_decay": 0.0,
        "adam_epsilon": 1e-8, "max_grad_norm": None, "lr_scheduler": args.lr_scheduler,
        "lr_warmup_steps": args.lr_warmup_steps, "ema_decay": args.ema_decay,
        "ema": "diffusers EMAModel warm-up min(decay, (1 + t) / (10 + t))",
        "class_dropout_prob": args.class_dropout_prob,
        "mixed_precision": args.mixed_precision, "torch_compile": args.torch_compile, "allow_tf32": True,
        "edm_sigma_data / p_mean / p_std": [0.5, -1.2, 1.2], "seed": args.seed,
        "minutes": args.minutes, "eval_every_minutes": eval_every(args), "eval_num_samples": args.eval_num_samples,
        "eval_batch_size": args.eval_batch_size, "eval_inference_steps": args.eval_inference_steps,
        "eval_guidance_scale": args.guidance_scale, "eval_weights": "EMA, eager fp32 module",
        "eval_reference": "Fashion-MNIST train split at the same resolution (FD-FMNIST: embedded classifier)",
        "eval_sampler": f"DPM-Solver++ 2M: {EDM_SAMPLER} (EDM rows) / {DDPM_SAMPLER} (DDPM row)",
        "logging_steps": args.logging_steps, "dataloader_num_workers": 0,
        "data_on_device": getattr(args, "data_on_device", "auto"),
    }


def eval_every(args: argparse.Namespace) -> float:
    return args.minutes / max(args.eval_points, 1)


def contender_config(contender: Contender, args: argparse.Namespace,
                     overrides: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """The contender's model config as a dict: its preset's (or, with --quick, its tiny config) + ``overrides``."""
    base = contender.tiny if args.quick else contender.preset
    if isinstance(base, str):
        module, cls = contender.model_cls.split(":")
        config = dict(getattr(importlib.import_module(module), cls).preset_config(base))
    else:
        config = dict(base)
    config.update(overrides or {})
    return config


def model_config(contender: Contender, args: argparse.Namespace, work: Path,
                 overrides: Optional[Dict[str, Any]] = None, tag: str = "") -> str:
    """``--model_config`` value: the preset name, or a config JSON (preset / tiny config + ``overrides``)."""
    base = contender.tiny if args.quick else contender.preset
    if not overrides and isinstance(base, str):
        return base
    config = contender_config(contender, args, overrides)
    path = work / f"{contender.name}{tag}_config.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(config, indent=1))
    return str(path)


def trainer_flags(contender: Contender, args: argparse.Namespace, out_dir: Path, max_train_steps: int,
                  unmasked_steps: int, evaluate: bool = True, minutes: Optional[float] = None,
                  eval_samples: Optional[int] = None, eval_every_minutes: Optional[float] = None,
                  config: Optional[str] = None, extra: Sequence[str] = ()) -> List[str]:
    """The trainer flags of one contender's run: the shared settings, then the recipe's own flags, then ``extra``
    (tune overrides). ``evaluate=False`` leaves out the time budget and the evaluation (trainer_vs_harness.py)."""
    minutes = args.minutes if minutes is None else minutes
    flags = [
        "--output_dir", str(out_dir), "--seed", str(args.seed), "--resolution", str(args.resolution),
        "--train_batch_size", str(args.train_batch_size), "--learning_rate", str(args.learning_rate),
        "--lr_scheduler", args.lr_scheduler, "--lr_warmup_steps", str(args.lr_warmup_steps),
        "--adam_beta1", "0.9", "--adam_beta2", "0.999", "--adam_weight_decay", "0", "--adam_epsilon", "1e-8",
        "--mixed_precision", args.mixed_precision, "--allow_tf32", "--use_ema", "--ema_decay", str(args.ema_decay),
        "--class_dropout_prob", str(args.class_dropout_prob), "--objective", contender.objective,
        "--dataloader_num_workers", "0", "--data_on_device", getattr(args, "data_on_device", "auto"),
        "--max_train_steps", str(max_train_steps),
        "--unmasked_finetune_steps", str(unmasked_steps), "--validation_steps", "0",
        "--checkpointing_steps", "100000000", "--checkpoints_total_limit", "1", "--report_to", "tensorboard",
        "--logging_steps", str(args.logging_steps), "--validation_scheduler", contender.sampler,
        "--validation_inference_steps", str(args.eval_inference_steps),
        "--validation_guidance_scale", str(args.guidance_scale), "--validation_images_per_class", "4",
        "--model_config", config or model_config(contender, args, out_dir.parent),
    ]
    if args.torch_compile:
        flags.append("--torch_compile")
    if args.fashion_mnist_dir:
        flags += ["--fashion_mnist_dir", args.fashion_mnist_dir]
    if args.quick:
        flags += ["--max_train_samples", "256"]
    if evaluate:
        flags += ["--max_train_time_minutes", str(minutes),
                  "--eval_every_minutes", str(eval_every(args) if eval_every_minutes is None else eval_every_minutes),
                  "--eval_num_samples", str(eval_samples or args.eval_num_samples),
                  "--eval_batch_size", str(args.eval_batch_size)]
    # The recipe's own flags come after the shared ones (--objective repeated by MDTv2 rows: the last one counts).
    return flags + list(contender.flags) + list(extra)


# ----------------------------------------------------------------------------------------------------------------
# Estimates
# ----------------------------------------------------------------------------------------------------------------
def forward_gflop(contender: Contender, args: argparse.Namespace, overrides: Optional[Dict[str, Any]] = None) -> float:
    """GFLOP of one sampling forward per image (no masking; `FlopCounterMode`, batch 1 on the CPU)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    module, cls = contender.model_cls.split(":")
    model_cls = getattr(importlib.import_module(module), cls)
    base = contender.tiny if args.quick else contender.preset
    config = dict(model_cls.preset_config(base)) if isinstance(base, str) else dict(base)
    config.update(overrides or {})
    config.update(sample_size=args.resolution, in_channels=1, num_classes=10)
    if "caption_channels" in inspect.signature(model_cls.__init__).parameters:
        config["caption_channels"] = None  # class-conditional, as the study trains it
    with torch.random.fork_rng(devices=[]):
        model = model_cls(**config).eval()
    x = torch.randn(1, 1, args.resolution, args.resolution)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(x, torch.full((1,), 0.5), class_labels=torch.zeros(1, dtype=torch.long))
    return counter.get_total_flops() / 1e9


def measured_eval_tflops(data: Dict[str, Any]) -> Optional[float]:
    """Effective sampling TFLOP/s over the evaluations the merged rows measured."""
    flop = sec = 0.0
    for run in data.get("runs", {}).values():
        if run.get("quick"):
            continue  # a CPU smoke test says nothing about the GPU's sampling rate
        g, s = run.get("forward_gflop_per_img"), run.get("settings", {})
        for t in run.get("eval_seconds") or []:
            if g and t and t > EVAL_FIXED_S:
                cfg = 2 if s.get("eval_guidance_scale", 1.0) > 1 else 1
                flop += s["eval_num_samples"] * s["eval_inference_steps"] * cfg * g * 1e9
                sec += t - EVAL_FIXED_S
    return flop / sec / 1e12 if sec > 0 else None


def estimate_call(contender: Contender, args: argparse.Namespace, gflop: float, eval_tflops: Optional[float],
                  minutes: Optional[float] = None, eval_points: Optional[int] = None,
                  eval_samples: Optional[int] = None) -> Dict[str, Any]:
    """Expected seconds of one study call for ``contender`` (see the assumptions at the top of the file)."""
    minutes = args.minutes if minutes is None else minutes
    n_evals = max(args.eval_points if eval_points is None else eval_points, 1)
    samples = eval_samples or args.eval_num_samples
    tflops = eval_tflops or ASSUMED_EVAL_TFLOPS
    cfg = 2 if args.guidance_scale > 1 else 1
    eval_s = samples * args.eval_inference_steps * cfg * gflop * 1e9 / (tflops * 1e12) + EVAL_FIXED_S
    total = ASSUMED_SETUP_S + 60 * minutes + n_evals * eval_s + ASSUMED_FINISH_S
    return {"train_s": 60 * minutes, "evals": n_evals, "eval_s": eval_s, "setup_s": ASSUMED_SETUP_S,
            "finish_s": ASSUMED_FINISH_S, "total_s": total, "eval_tflops": tflops,
            "eval_tflops_source": "measured (merged rows)" if eval_tflops else "assumed",
            "fits": total <= CALL_BUDGET_S}


def print_estimate(name: str, est: Dict[str, Any], gflop: float) -> None:
    print(f"estimate {name}: {est['setup_s']:.0f} s set-up + {est['train_s']:.0f} s training (compilation included) "
          f"+ {est['evals']} evals x {est['eval_s']:.0f} s ({gflop:.1f} GFLOP/img forward, {est['eval_tflops']:.0f} "
          f"TFLOP/s {est['eval_tflops_source']}) + {est['finish_s']:.0f} s = {est['total_s']:.0f} s"
          + ("" if est["fits"] else f"  ** over the {CALL_BUDGET_S:.0f} s of one call: lower --eval_inference_steps "
                                    "or --eval_points, or --minutes **"), flush=True)


def maskdit_unmasked_cost(config: Dict[str, Any], mask_ratio: float) -> float:
    """Cost of an unmasked MaskDiT step relative to a masked one, from the block widths and token counts (the
    encoder sees all tokens instead of 1 - mask_ratio of them; the decoder always sees all)."""
    enc = config.get("num_layers", 12) * config.get("hidden_size", 768) ** 2
    dec = config.get("num_decoder_layers", 8) * config.get("decoder_hidden_size", 512) ** 2
    return (enc + dec) / (enc * (1 - mask_ratio) + dec)


def expected_img_s(name: str, args: argparse.Namespace) -> Tuple[Optional[float], str]:
    """Trainer img/s to plan a contender's steps with: --expected_img_s, else the side-by-side call at the study's
    batch (the nearest batch if that one is missing)."""
    for item in args.expected_img_s:
        key, _, value = item.partition("=")
        if key == name:
            return float(value), "--expected_img_s"
    rows = load_throughput(args.throughput_json).get("rows", {})
    cands = [r for r in rows.values() if r.get("model") == name and r.get("trainer_img_per_s")]
    if not cands:
        return None, "none"
    best = min(cands, key=lambda r: abs(r["batch_size"] - args.train_batch_size))
    return best["trainer_img_per_s"], f"{args.throughput_json} (batch {best['batch_size']})"


def plan_steps(contender: Contender, args: argparse.Namespace, share: float, minutes: float,
               config_overrides: Optional[Dict[str, Any]] = None, mask_ratio: float = 0.5) -> Dict[str, Any]:
    """--max_train_steps / --unmasked_finetune_steps of a timed run. Without an unmasked share the step limit is
    out of reach (the time budget ends the run). With one, the trainer needs the run's length in steps, so it is
    estimated from the expected img/s: the unmasked share then falls on the last steps before the time budget."""
    if share <= 0:
        return {"max_train_steps": 100_000_000, "unmasked_steps": 0, "share": 0.0}
    ips, source = expected_img_s(contender.name, args)
    if ips is None:
        return {"max_train_steps": 100_000_000, "unmasked_steps": 0, "share": 0.0, "requested_share": share,
                "note": "unmasked fine-tuning NOT applied: no img/s estimate (pass --throughput_json or "
                        "--expected_img_s)"}
    config = contender_config(contender, args, config_overrides)
    rel = maskdit_unmasked_cost(config, mask_ratio)
    allowance = 0.0 if args.quick or not args.torch_compile else COMPILE_ALLOWANCE_S + UNMASKED_RECOMPILE_S
    seconds = max(60 * minutes - allowance, 1.0)
    steps = int(seconds * ips / args.train_batch_size / ((1 - share) + share * rel))
    return {"max_train_steps": max(steps, 1), "unmasked_steps": int(round(share * steps)), "share": share,
            "expected_img_s": ips, "expected_img_s_source": source, "unmasked_step_cost": rel,
            "compile_allowance_s": allowance}


# ----------------------------------------------------------------------------------------------------------------
# JSON: merge by contender
# ----------------------------------------------------------------------------------------------------------------
def _write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    os.replace(tmp, path)


def load_study(paths: Sequence[Optional[Path]]) -> Dict[str, Any]:
    """The first existing study JSON of ``paths`` (earlier calls' rows), else an empty study."""
    for path in paths:
        if path is not None and Path(path).exists():
            data = json.loads(Path(path).read_text())
            data.setdefault("runs", {})
            return data
    return {"study": "issue 23: equal wall-clock convergence, Fashion-MNIST 32x32, B-size models", "runs": {}}


def merge_run(data: Dict[str, Any], record: Dict[str, Any]) -> Dict[str, Any]:
    """Put ``record`` in ``data['runs']`` under its contender name, replacing only that contender's row."""
    data.setdefault("runs", {})[record["contender"]] = record
    return data


def load_throughput(path: Optional[str]) -> Dict[str, Any]:
    if not path or not Path(path).exists():
        return {}
    try:
        return json.loads(Path(path).read_text())
    except ValueError:
        return {}


def normalisation(data: Dict[str, Any], throughput: Dict[str, Any], path: Optional[str],
                  batch: int) -> Dict[str, Any]:
    """Trainer img/s per contender from one side-by-side call at ``batch`` (kept in the study JSON, so a report
    rebuilt later without --throughput_json uses the same numbers)."""
    usable = [r for r in throughput.get("rows", {}).values()
              if r.get("batch_size") == batch and r.get("trainer_img_per_s") and r.get("status") == "ok"]
    if usable:
        calls = {r["model"]: f"{r.get('call') or '-'} ({(r.get('env') or {}).get('device')}, "
                             f"{(r.get('env') or {}).get('date')})" for r in usable}
        return {"source": path, "batch_size": batch, "img_per_s": {r["model"]: r["trainer_img_per_s"] for r in usable},
                "calls": calls, "one_call": len(set(calls.values())) == 1}
    return data.get("normalisation") or {}


# ----------------------------------------------------------------------------------------------------------------
# One contender
# ----------------------------------------------------------------------------------------------------------------
def environment() -> Dict[str, Any]:
    import torch

    try:
        import diffusers

        dv = diffusers.__version__
    except ImportError:
        dv = None
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({platform.processor() or 'cpu'})"
    return {"device": dev, "torch": torch.__version__, "cuda": torch.version.cuda, "diffusers": dv,
            "python": platform.python_version(), "date": time.strftime("%Y-%m-%d %H:%M:%S")}


def classifier_sha256() -> Optional[str]:
    """sha256 of the FD-FMNIST classifier the evaluations used: rows scored by different classifiers (e.g. trained
    on different machines) are not comparable, so the report flags them."""
    try:
        from diffusers_masked.evaluation.classifier import default_classifier_path

        path = default_classifier_path()
        return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None
    except Exception:
        return None


def ensure_classifier() -> Dict[str, Any]:
    """Load the FD-FMNIST classifier here, training and caching it first if the cache has none.

    The trainer's evaluation would otherwise train it lazily inside its ``no_grad`` sampling block, which fails
    ("element 0 of tensors does not require grad"); here it trains with gradients on, once, and the child process
    finds it in the cache (``DIFFUSERS_MASKED_CACHE``). Carrying one cache into every call keeps the FD features
    identical across machines."""
    from diffusers_masked.evaluation import load_fashion_mnist_classifier

    t0 = time.time()
    _, info = load_fashion_mnist_classifier(progress=False)
    return {"seconds": time.time() - t0, "sha256": info.get("sha256"), "test_accuracy": info.get("test_accuracy")}


def read_eval_log(path: Path) -> List[Dict[str, Any]]:
    """The trainer's eval_log.jsonl as records with plain keys (fd, conditional_accuracy, ...)."""
    if not path.exists():
        return []
    evals = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue  # a line being written
        evals.append({"step": rec.get("step"), "images_seen": rec.get("images_seen"),
                      "wall_clock_s": rec.get("wall_clock_s"), "scheduler": rec.get("scheduler"),
                      "fd": rec.get("eval/fd"), "conditional_accuracy": rec.get("eval/conditional_accuracy")})
    return evals


def eval_seconds(evals: Sequence[Dict[str, Any]], stamps: Sequence[float], arrivals: Dict[int, float],
                 step_s: Optional[float]) -> List[Optional[float]]:
    """Seconds each evaluation took: the gap it left between two optimizer-step stamps minus a normal step; the
    last (no step after it) from when its record appeared."""
    out: List[Optional[float]] = []
    for i, e in enumerate(evals):
        k = e.get("step") or 0
        if 1 <= k < len(stamps) and step_s is not None:
            out.append(max(stamps[k] - stamps[k - 1] - step_s, 0.0))
        elif 1 <= k <= len(stamps) and i in arrivals:
            out.append(max(arrivals[i] - stamps[k - 1], 0.0))
        else:
            out.append(None)
    return out


def run_contender(name: str, args: argparse.Namespace, data: Dict[str, Any], out: Path, work: Path,
                  tag: str = "", minutes: Optional[float] = None, eval_samples: Optional[int] = None,
                  eval_every_minutes: Optional[float] = None, overrides: Optional[Dict[str, Any]] = None,
                  extra_flags: Sequence[str] = (), share: Optional[float] = None,
                  save=None) -> Dict[str, Any]:
    """Train one contender (or tune variant) in a probed child process; the record is merged and saved (``save``)
    whenever a new evaluation appears, and once more at the end."""
    import trainer_vs_harness as tvh

    contender = CONTENDERS[name]
    minutes = args.minutes if minutes is None else minutes
    key = name + tag
    record: Dict[str, Any] = {
        "contender": key, "model": name, "label": contender.label, "objective": contender.objective,
        "sampler": contender.sampler, "what_differs": contender.what_differs, "settings": shared_settings(args),
        "env": environment(), "call": args.call, "quick": args.quick, "status": "starting"}
    if minutes != args.minutes:
        record["settings"] = dict(record["settings"], minutes=minutes, eval_every_minutes=eval_every_minutes,
                                  eval_num_samples=eval_samples or args.eval_num_samples)
    reason = unsupported_reason(contender)
    if reason:
        record["status"] = f"not run: {reason}"
        print(f"=== {key}: {record['status']}", flush=True)
        save(record)
        return record
    run_dir = work / key
    if run_dir.exists():
        shutil.rmtree(run_dir)
    mask_ratio = float(flag_value(list(contender.flags) + list(extra_flags), "--mask_ratio", 0.5))
    steps = plan_steps(contender, args, contender.unmasked_share if share is None else share, minutes, overrides,
                       mask_ratio)
    record["steps_plan"] = steps
    config = model_config(contender, args, work, overrides, tag) if overrides else None
    flags = trainer_flags(contender, args, run_dir, steps["max_train_steps"], steps["unmasked_steps"],
                          minutes=minutes, eval_samples=eval_samples, eval_every_minutes=eval_every_minutes,
                          config=config, extra=extra_flags)
    record.update(script=contender.script, argv=flags, overrides=overrides or {}, extra_flags=list(extra_flags))
    try:
        gflop = forward_gflop(contender, args, overrides)
        record["forward_gflop_per_img"] = gflop
        points = max(1, round(minutes / eval_every_minutes)) if eval_every_minutes else args.eval_points
        est = estimate_call(contender, args, gflop, measured_eval_tflops(data), minutes=minutes, eval_points=points,
                            eval_samples=eval_samples)
        record["estimate"] = est
        print_estimate(key, est, gflop)
    except Exception as err:  # the estimate is a convenience
        print(f"estimate failed: {type(err).__name__}: {err}", flush=True)
    if steps.get("note"):
        print(f"warning {key}: {steps['note']}", flush=True)
    probe = work / f"{key}_probe.json"
    eval_log = run_dir / "eval_log.jsonl"
    arrivals: Dict[int, float] = {}
    env_dir = {"FASHION_MNIST_DIR": args.fashion_mnist_dir} if args.fashion_mnist_dir else {}
    os.environ.update(env_dir)

    def poll() -> None:
        evals = read_eval_log(eval_log)
        if len(evals) > len(arrivals):
            for i in range(len(arrivals), len(evals)):
                arrivals[i] = time.time()
            record.update(status="running (evaluations so far)", evals=evals)
            save(record)

    try:
        record["classifier"] = ensure_classifier()
        print(f"FD classifier ready ({record['classifier']['seconds']:.0f} s, sha256 "
              f"{str(record['classifier']['sha256'])[:12]})", flush=True)
    except Exception as err:
        record["status"] = f"failed: FD classifier: {type(err).__name__}: {err}"
        save(record)
        return record
    record["status"] = "running"
    save(record)
    print(f"=== {key}: {contender.script} {' '.join(flags)}", flush=True)
    res = tvh.run_probed_trainer(contender.script, flags, probe, work / f"{key}_trainer.log", poll=poll)
    stamps = tvh.read_probe(probe).get("step_stamps", [])
    evals = read_eval_log(eval_log)
    batch = args.train_batch_size
    steady = tvh.steady_img_s(stamps, batch)
    step_s = batch / steady if steady else None
    record.update(evals=evals, wall_s=res["wall_s"], rc=res["rc"], steps_run=len(stamps),
                  steady_img_s=steady, steady_img_s_source="optimizer-step stamps, median of 25-step windows",
                  eval_seconds=eval_seconds(evals, stamps, arrivals, step_s),
                  launch_to_first_step_s=(stamps[0] - res["t_launch"]) if stamps else None,
                  classifier_sha256=classifier_sha256())
    try:
        record["train_results"] = json.loads((run_dir / "train_results.json").read_text())
    except (OSError, ValueError):
        record["train_results"] = None
    tr = record["train_results"] or {}
    if steady and tr.get("train_time_s") and tr.get("images_seen"):
        # Training-clock seconds not spent at the steady pace: compilation, recompilations, slower unmasked steps.
        record["time_above_steady_s"] = tr["train_time_s"] - tr["images_seen"] / steady
    if steps.get("unmasked_steps"):
        start = steps["max_train_steps"] - steps["unmasked_steps"]
        record["unmasked_steps_run"] = max(0, len(stamps) - start)
    if res["rc"] == 0 and evals:
        record["status"] = "ok"
    else:
        record["status"] = f"failed (rc {res['rc']})" if not evals else f"partial (rc {res['rc']})"
        record["tail"] = res["tail"][-20:]
    save(record)
    print(f"=== {key}: {record['status']}, {len(evals)} evals, final FD "
          f"{evals[-1]['fd'] if evals else None}, steady {steady and round(steady, 1)} img/s, wall "
          f"{res['wall_s']:.0f} s", flush=True)
    return record


# ----------------------------------------------------------------------------------------------------------------
# Table (pure functions of the JSON: testable without training)
# ----------------------------------------------------------------------------------------------------------------
def first_reach(points: Sequence[Tuple[float, float]], target: float) -> Tuple[Optional[float], bool]:
    """x at which the FD curve ``points`` ((x, fd) in x order) first reaches ``target``, linearly interpolated
    between the two evaluations around it; ``(x, True)`` when already the first evaluation is at or below it (the
    true crossing is earlier), ``(None, False)`` when never."""
    prev = None
    for x, fd in points:
        if fd is None or x is None:
            continue
        if fd <= target:
            if prev is None:
                return x, True
            x0, f0 = prev
            return (x0 + (f0 - target) / (f0 - fd) * (x - x0)) if f0 != fd else x, False
        prev = (x, fd)
    return None, False


def curves(run: Dict[str, Any], norm_img_s: Optional[float]) -> Dict[str, List[Tuple[float, float]]]:
    evals = [e for e in run.get("evals") or [] if e.get("fd") is not None]
    out = {"wall": [(e["wall_clock_s"], e["fd"]) for e in evals],
           "images": [(e["images_seen"], e["fd"]) for e in evals]}
    if norm_img_s:
        out["norm"] = [(e["images_seen"] / norm_img_s, e["fd"]) for e in evals]
    return out


def summarize(data: Dict[str, Any], baseline: str = "dit") -> List[Dict[str, Any]]:
    """One summary row per merged run: final FD and accuracy, img/s, and when it first reached the baseline's final
    FD, in training wall-clock and in normalised time, with the ratio to the baseline's own (final) time."""
    norm = (data.get("normalisation") or {}).get("img_per_s", {})
    runs = data.get("runs", {})
    base = runs.get(baseline)
    base_curves = curves(base, norm.get(baseline)) if base else {}
    target = base_curves["wall"][-1][1] if base_curves.get("wall") else None
    base_wall = base_curves["wall"][-1][0] if base_curves.get("wall") else None
    base_norm = base_curves["norm"][-1][0] if base_curves.get("norm") else None
    rows = []
    for key in sorted(runs, key=lambda k: (DEFAULT_STUDY_MODELS.index(runs[k].get("model", k))
                                           if runs[k].get("model", k) in DEFAULT_STUDY_MODELS else 99, k)):
        run = runs[key]
        c = curves(run, norm.get(run.get("model", key)))
        last = (run.get("evals") or [{}])[-1] if run.get("evals") else {}
        tr = run.get("train_results") or {}
        row = {"contender": key, "label": run.get("label", key), "status": run.get("status"),
               "objective": run.get("objective"), "sampler": run.get("sampler"),
               "what_differs": run.get("what_differs", ""), "params": tr.get("num_parameters"),
               "steady_img_s": run.get("steady_img_s"), "run_img_s": tr.get("images_per_s"),
               "norm_img_s": norm.get(run.get("model", key)), "steps": tr.get("global_step") or last.get("step"),
               "images_seen": last.get("images_seen"), "final_fd": last.get("fd"),
               "final_acc": last.get("conditional_accuracy"), "evals": len(c["wall"]),
               "time_above_steady_s": run.get("time_above_steady_s"), "call": run.get("call"),
               "device": (run.get("env") or {}).get("device")}
        for axis, ref in (("wall", base_wall), ("norm", base_norm)):
            x, early = first_reach(c.get(axis, []), target) if target is not None and c.get(axis) else (None, False)
            row[f"reach_{axis}"] = x
            row[f"reach_{axis}_at_first_eval"] = early
            row[f"reach_{axis}_x_baseline"] = x / ref if x is not None and ref else None
        rows.append(row)
    return rows


def _f(v, spec: str, none: str = "-") -> str:
    return none if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def _reach(row: Dict[str, Any], axis: str) -> str:
    x = row[f"reach_{axis}"]
    if x is None:
        return "not reached" if row["evals"] else "-"
    ratio = row[f"reach_{axis}_x_baseline"]
    early = "<= " if row[f"reach_{axis}_at_first_eval"] else ""
    return f"{early}{x:.0f} s ({early}{ratio:.2f}x)" if ratio is not None else f"{early}{x:.0f} s"


def markdown(data: Dict[str, Any]) -> str:
    rows = summarize(data)
    runs = data.get("runs", {})
    base = runs.get("dit")
    norm = data.get("normalisation") or {}
    ref = (base or next(iter(runs.values()), {})).get("settings", {})
    lines = ["# Equal wall-clock study (issue 23)", ""]
    if base and base.get("evals"):
        lines.append(f"Target: DiT's final FD-FMNIST {base['evals'][-1]['fd']:.2f} (after "
                     f"{base['evals'][-1]['wall_clock_s']:.0f} s of training); a reduced-token recipe wins if it "
                     "reaches it in at most 0.60x DiT's time.")
    else:
        lines.append("No DiT row yet: the time-to-target columns need the baseline's final FD.")
    lines += ["", "| contender | objective / sampler | params | trainer img/s (steady) | side-by-side img/s | steps | "
              "images seen | final FD | cond. acc. | reaches DiT's final FD: wall-clock (x DiT) | normalised time "
              "(x DiT) | time above steady pace s | what differs |", "|---" * 13 + "|"]
    for r in rows:
        if r["status"] and r["status"].startswith("not run"):
            lines.append(f"| {r['label']} | {r['objective']} / {r['sampler']} | | | | | | | | {r['status']} | | | "
                         f"{r['what_differs']} |")
            continue
        status = "" if r["status"] == "ok" else f" ({r['status']})"
        lines.append(
            f"| {r['label']}{status} | {r['objective']} / {r['sampler']} | "
            f"{_f(r['params'] and r['params'] / 1e6, '.1f')}M | {_f(r['steady_img_s'], '.0f')} | "
            f"{_f(r['norm_img_s'], '.0f')} | {_f(r['steps'], 'd')} | {_f(r['images_seen'], 'd')} | "
            f"{_f(r['final_fd'], '.2f')} | {_f(r['final_acc'], '.3f')} | {_reach(r, 'wall')} | "
            f"{_reach(r, 'norm') if r['norm_img_s'] else '-'} | {_f(r['time_above_steady_s'], '.0f')} | "
            f"{r['what_differs']} |")
    lines += ["", "FD-FMNIST at each evaluation (training wall-clock s / normalised s / images seen: FD, accuracy):",
              ""]
    for key, run in runs.items():
        nv = (norm.get("img_per_s") or {}).get(run.get("model", key))
        pts = [f"{e['wall_clock_s']:.0f} / {_f(nv and e['images_seen'] / nv, '.0f')} / {e['images_seen']}: "
               f"{_f(e['fd'], '.2f')}, {_f(e['conditional_accuracy'], '.3f')}" for e in run.get("evals") or []]
        lines.append(f"- {key}: " + ("; ".join(pts) if pts else run.get("status", "")))
    lines += ["", "Settings shared by every contender (each row's JSON record holds its own copy and its full "
              "trainer command line):", "", "| setting | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in ref.items()]

    def comparable(settings: Dict[str, Any]) -> Dict[str, Any]:
        return {k: v for k, v in settings.items() if k != "minutes"}

    differ = [key for key, run in runs.items()
              if run.get("settings") and comparable(run["settings"]) != comparable(ref)]
    notes = []
    if differ:
        notes.append(f"Rows whose shared settings differ from the table's: {', '.join(differ)} (see their JSON).")
    shas = {run.get("classifier_sha256") for run in runs.values() if run.get("classifier_sha256")}
    if len(shas) > 1:
        notes.append("The rows were scored with different FD classifiers (sha256 differ): their FDs are not "
                     "comparable; carry one classifier cache (DIFFUSERS_MASKED_CACHE) into every call.")
    if norm.get("img_per_s"):
        calls = sorted(set((norm.get("calls") or {}).values()))
        notes.append(f"Normalised time = images seen / trainer img/s of one side-by-side call: {norm.get('source')} "
                     f"(batch {norm.get('batch_size')}; {'; '.join(calls) or norm.get('device', '?')})."
                     + ("" if norm.get("one_call", True) else " **The side-by-side rows come from more than one "
                        "call**: re-time them together for a clean normalisation."))
    else:
        notes.append("No side-by-side trainer call at the study's batch yet (trainer_vs_harness.py --batch_size "
                     f"{ref.get('train_batch_size')}): normalised time not shown.")
    notes.append("Wall-clock = the trainer's training clock at each evaluation: compilation and recompilation count, "
                 "sampling and scoring do not. 'time above steady pace' = training clock - images seen / steady "
                 "img/s (mostly compilation).")
    for key, run in runs.items():
        plan = run.get("steps_plan") or {}
        if plan.get("note"):
            notes.append(f"{key}: {plan['note']}.")
        elif plan.get("unmasked_steps"):
            notes.append(f"{key}: --max_train_steps {plan['max_train_steps']} planned from "
                         f"{plan['expected_img_s']:.0f} img/s ({plan['expected_img_s_source']}), the last "
                         f"{plan['unmasked_steps']} unmasked; "
                         f"{run.get('unmasked_steps_run', '?')} unmasked steps ran before the time budget.")
    devs = {(r.get("env") or {}).get("device") for r in runs.values()}
    if len(devs) > 1:
        notes.append(f"Rows ran on different devices: {sorted(d for d in devs if d)}.")
    calls = []
    for key, run in runs.items():
        env = run.get("env") or {}
        calls.append(f"{key}: {run.get('call') or '-'} ({env.get('device')}, {env.get('date')})")
    lines += ["", "Notes:", ""] + [f"- {n}" for n in notes] + ["", "Calls: " + "; ".join(calls)]
    return "\n".join(lines) + "\n"


def plot(data: Dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = data.get("runs", {})
    norm = (data.get("normalisation") or {}).get("img_per_s", {})
    base = runs.get("dit")
    target = base["evals"][-1]["fd"] if base and base.get("evals") else None
    panels = [("wall", "training wall-clock (s; compilation included)")]
    if norm:
        panels.append(("norm", "normalised time (s) = images seen / side-by-side trainer img/s"))
    for fname, axes_spec in (("fd_vs_time.png", panels), ("fd_vs_images.png", [("images", "images seen")])):
        fig, axes = plt.subplots(1, len(axes_spec), figsize=(6.5 * len(axes_spec), 4.2), squeeze=False)
        for ax, (axis, xlabel) in zip(axes[0], axes_spec):
            for key, run in runs.items():
                pts = curves(run, norm.get(run.get("model", key))).get(axis) or []
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=run.get("label", key))
            if target is not None:
                ax.axhline(target, color="gray", linestyle="--", linewidth=1, label="DiT's final FD")
            ax.set_xlabel(xlabel)
            ax.set_ylabel("FD-FMNIST (lower is better)")
            ax.set_yscale("log")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / fname, dpi=120)
        plt.close(fig)


def write_report(data: Dict[str, Any], out: Path) -> str:
    md = markdown(data)
    (out / "convergence.md").write_text(md)
    try:
        plot(data, out)
    except Exception as err:  # matplotlib missing: the table and JSON still stand
        print(f"plots not written: {type(err).__name__}: {err}", flush=True)
    return md


# ----------------------------------------------------------------------------------------------------------------
# Tuning
# ----------------------------------------------------------------------------------------------------------------
def parse_variant(spec: str) -> Tuple[str, Dict[str, Any], List[str], Optional[float]]:
    """``LABEL:key=value,--flag=value`` -> (label, model config overrides, trainer flags, unmasked share)."""
    label, _, body = spec.partition(":")
    overrides: Dict[str, Any] = {}
    flags: List[str] = []
    share = None
    for item in filter(None, (s.strip() for s in body.split(","))):
        key, _, value = item.partition("=")
        if key.startswith("--"):
            flags += [key] + value.replace("/", " ").split()  # "/" separates the values of a multi-value flag
        elif key == "unmasked_share":
            share = float(value)
        else:
            try:
                overrides[key] = json.loads(value)
            except ValueError:
                overrides[key] = value
    return label, overrides, flags, share


def tune_markdown(tune: Dict[str, Any]) -> str:
    lines = ["# Tuning runs (short, one call per model)", "",
             "Each variant trains for the tune minutes with the study's shared settings (eager unless the row's "
             "settings say torch_compile) and is scored once at the end. Normalised time = images seen / the "
             "variant's own steady img/s: variants with close normalised times compare directly on FD.", "",
             "| model | variant | overrides | steady img/s | steps | images seen | normalised s | time above steady s "
             "| FD | cond. acc. | status | call |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for model, variants in tune.items():
        for label, r in variants.items():
            last = (r.get("evals") or [{}])[-1] if r.get("evals") else {}
            ov = ", ".join([f"{k}={v}" for k, v in (r.get("overrides") or {}).items()]
                           + ([" ".join(r["extra_flags"])] if r.get("extra_flags") else []))
            share = (r.get("steps_plan") or {}).get("share")
            ov = (ov + (f", unmasked share {share}" if share else "")) or "-"
            steady = r.get("steady_img_s")
            norm_s = last.get("images_seen") / steady if steady and last.get("images_seen") else None
            lines.append(f"| {model} | {label} | {ov} | {_f(steady, '.0f')} | {_f(last.get('step'), 'd')} | "
                         f"{_f(last.get('images_seen'), 'd')} | {_f(norm_s, '.0f')} | "
                         f"{_f(r.get('time_above_steady_s'), '.0f')} | {_f(last.get('fd'), '.2f')} | "
                         f"{_f(last.get('conditional_accuracy'), '.3f')} | {r.get('status')} | "
                         f"{r.get('call') or '-'} |")
    return "\n".join(lines) + "\n"


def run_tune(args: argparse.Namespace, out: Path, work: Path) -> None:
    name = args.tune
    if name not in CONTENDERS:
        raise SystemExit(f"Unknown model {name!r}; choose from {', '.join(CONTENDERS)}.")
    contender = CONTENDERS[name]
    specs = args.variants or list(contender.variants)
    args.torch_compile = args.tune_compile
    path = out / "tune.json"
    tune = json.loads(path.read_text()) if path.exists() else {}
    tune.setdefault(name, {})
    data = load_study([Path(args.merge_from) if args.merge_from else None, out / "convergence.json"])
    minutes = args.tune_minutes
    print(f"tune {name}: {len(specs)} variants x {minutes} min (plus set-up and one evaluation of "
          f"{args.tune_eval_samples} samples each)", flush=True)
    for spec in specs:
        label, overrides, flags, share = parse_variant(spec)

        def save(record, label=label):
            tune[name][label] = record
            _write_json(path, tune)
            (out / "tune.md").write_text(tune_markdown(tune))

        # A short run has no room for MaskDiT's unmasked stage (its recompile alone is half a minute) unless asked.
        run_contender(name, args, data, out, work, tag=f"__{label}", minutes=minutes,
                      eval_samples=args.tune_eval_samples, eval_every_minutes=minutes, overrides=overrides,
                      extra_flags=flags, share=share if share is not None else 0.0, save=save)
    print(tune_markdown(tune), flush=True)


# ----------------------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------------------
def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    args = parse_args(argv)
    apply_quick(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work_dir or out / "runs")
    spec = args.models or ("all" if args.plan else "dit")
    names = list(DEFAULT_STUDY_MODELS) if spec == "all" else [m.strip() for m in spec.split(",") if m.strip()]
    for name in names:
        if name not in CONTENDERS:
            raise SystemExit(f"Unknown model {name!r}; choose from {', '.join(CONTENDERS)} or all.")
    data = load_study([Path(args.merge_from) if args.merge_from else None, out / "convergence.json"])
    throughput = load_throughput(args.throughput_json)
    data["normalisation"] = normalisation(data, throughput, args.throughput_json, args.train_batch_size)
    if args.plan:
        tflops = measured_eval_tflops(data)
        for name in names:
            c = CONTENDERS[name]
            g = forward_gflop(c, args)
            print_estimate(name, estimate_call(c, args, g, tflops), g)
            plan = plan_steps(c, args, c.unmasked_share, args.minutes)
            if plan.get("share") or plan.get("note"):
                print(f"  steps {name}: {plan}", flush=True)
        return data
    if args.report_only:
        print(write_report(data, out), flush=True)
        _write_json(out / "convergence.json", data)
        return data
    import trainer_vs_harness as tvh

    tvh.install_signal_handlers()
    if args.tune:
        run_tune(args, out, work)
        return data

    def save(record: Dict[str, Any]) -> None:
        merge_run(data, record)
        _write_json(out / "convergence.json", data)

    for name in names:
        run_contender(name, args, data, out, work, save=save)
        write_report(data, out)
    md = write_report(data, out)
    print("\n" + md, flush=True)
    return data


if __name__ == "__main__":
    main()
