#!/usr/bin/env python
"""Equal wall-clock convergence study on Fashion-MNIST: DiT (our `RoutedDiTTransformer2DModel` without routing, the
unmasked baseline) vs TREAD-DiT (the same with token routing) vs MaskDiT vs MDTv2 vs DeferredMaskDiT, all trained by
the same trainer on the same data for the same training time.

Each model trains for ``--minutes`` of training time (sampling / scoring time excluded) and is scored every
``--eval_every_minutes`` with FD-FMNIST (Fréchet distance in the features of the embedded Fashion-MNIST classifier)
and conditional accuracy, on EMA weights. Writes to ``--out``: ``convergence.json``, ``convergence.md`` (table) and
``fd_vs_time.png`` / ``fd_vs_images.png``.

    python benchmarks/convergence.py --minutes 2 --size B --out benchmarks/results          # GPU study
    python benchmarks/convergence.py --quick --out /tmp/conv                                 # CPU smoke test
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path
from typing import Any, Dict, List

import torch
from diffusers_masked.training import main as train_main
from diffusers_masked.training.recipe_deferred_maskdit import DeferredMaskDiTRecipe
from diffusers_masked.training.recipe_dit import RoutedDiTRecipe
from diffusers_masked.training.recipe_maskdit import MaskDiTRecipe
from diffusers_masked.training.recipe_mdt import MDTv2Recipe

MODELS = {
    # The unmasked baseline: our DiT (models/transformer_dit.py) without routing; TREAD-DiT = the same with routing.
    "dit": (RoutedDiTRecipe, ["--route_ratio", "0"]),
    "tread_dit": (RoutedDiTRecipe, []),
    "maskdit": (MaskDiTRecipe, []),
    "mdtv2": (MDTv2Recipe, []),
    "deferred_maskdit": (DeferredMaskDiTRecipe, ["--conditioning", "class"]),
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=",".join(MODELS), help="Comma-separated subset of " + ", ".join(MODELS))
    p.add_argument("--size", default="B", choices=["S", "B", "L", "XL"], help="Preset size of every model (patch 2).")
    p.add_argument("--minutes", type=float, default=2.0, help="Training time per model.")
    p.add_argument("--eval_every_minutes", type=float, default=0.5)
    p.add_argument("--eval_num_samples", type=int, default=2000)
    p.add_argument("--eval_inference_steps", type=int, default=40)
    p.add_argument("--train_batch_size", type=int, default=256)
    p.add_argument("--learning_rate", type=float, default=2e-4)
    p.add_argument("--mixed_precision", default="bf16" if torch.cuda.is_available() else "no")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--work_dir", default=None, help="Where the runs are written (default OUT/runs).")
    p.add_argument("--quick", action="store_true", help="Tiny models, seconds of training: a CPU smoke test.")
    return p.parse_args(argv)


def run_model(name: str, args: argparse.Namespace, work: Path) -> Dict[str, Any]:
    recipe_cls, extra = MODELS[name]
    out = work / name
    argv = [
        "--output_dir", str(out), "--seed", str(args.seed), "--train_batch_size", str(args.train_batch_size),
        "--learning_rate", str(args.learning_rate), "--max_train_steps", "10000000",
        "--max_train_time_minutes", str(args.minutes), "--eval_every_minutes", str(args.eval_every_minutes),
        "--eval_num_samples", str(args.eval_num_samples), "--validation_inference_steps", str(args.eval_inference_steps),
        "--validation_steps", "0", "--checkpointing_steps", "100000000", "--report_to", "none",
        "--mixed_precision", args.mixed_precision, "--use_ema", "--ema_decay", "0.999", "--lr_warmup_steps", "100",
        "--unmasked_finetune_steps", "0", "--logging_steps", "50", *extra,
    ]
    if args.quick:
        cfg = work / f"{name}_tiny.json"
        cfg.parent.mkdir(parents=True, exist_ok=True)
        tiny_dit = dict(patch_size=4, hidden_size=32, num_layers=4, num_attention_heads=2)
        tiny = {"dit": tiny_dit, "tread_dit": tiny_dit, "maskdit": dict(patch_size=4, hidden_size=32, num_layers=1, num_attention_heads=2,
                                              decoder_hidden_size=16, num_decoder_layers=1, decoder_num_attention_heads=2),
                "mdtv2": dict(patch_size=4, hidden_size=32, num_layers=3, num_decoder_layers=1, num_attention_heads=2),
                "deferred_maskdit": None}[name]
        if tiny is not None:
            cfg.write_text(json.dumps(tiny))
            argv += ["--model_config", str(cfg)]
        else:
            argv += ["--model_config", "Debug/4"]
        argv += ["--max_train_samples", "256", "--eval_batch_size", "16"]
    elif name == "deferred_maskdit":
        # MicroDiT ships XL and Tiny sizes only; Tiny/2 (512 wide, 16 blocks, MoE) stands in for S and B.
        argv += ["--model_config", "XL/2" if args.size in ("L", "XL") else "Tiny/2"]
    else:
        argv += ["--model_config", f"{args.size}/2"]
    t0 = time.time()
    result = train_main(recipe_cls(), argv)
    log = [json.loads(line) for line in (out / "eval_log.jsonl").read_text().splitlines()]
    return {"model": name, "result": result, "eval": log, "parameters": result["num_parameters"],
            "run_seconds": time.time() - t0}


def plot(runs: List[Dict[str, Any]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for x_key, x_label, fname in (("wall_clock_s", "training time (s)", "fd_vs_time.png"),
                                  ("images_seen", "images seen", "fd_vs_images.png")):
        fig, ax = plt.subplots(figsize=(6, 4))
        for run in runs:
            xs = [e[x_key] for e in run["eval"]]
            ys = [e.get("eval/fd") for e in run["eval"]]
            ax.plot(xs, ys, marker="o", label=run["model"])
        ax.set_xlabel(x_label)
        ax.set_ylabel("FD-FMNIST (lower is better)")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / fname, dpi=120)
        plt.close(fig)


def table(runs: List[Dict[str, Any]], args: argparse.Namespace) -> str:
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu"
    import diffusers

    lines = [
        f"Equal wall-clock study: {args.minutes} min of training per model, size {args.size}/2 on Fashion-MNIST 28x28 "
        f"(196 tokens), batch {args.train_batch_size}, lr {args.learning_rate}, {args.mixed_precision}, EMA 0.999. "
        f"Device: {device}; torch {torch.__version__}, diffusers {diffusers.__version__}. FD-FMNIST on "
        f"{args.eval_num_samples} class-balanced samples ({args.eval_inference_steps} steps, CFG 1.5) vs the "
        "Fashion-MNIST train split.",
        "",
        "| model | params | steps | images seen | img/s | final FD-FMNIST | best FD | cond. accuracy |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        ev = run["eval"]
        last = ev[-1] if ev else {}
        best = min((e.get("eval/fd", float("inf")) for e in ev), default=float("nan"))
        r = run["result"]
        params = f"{run['parameters'] / 1e6:.2f}M" if run["parameters"] else "?"
        lines.append(
            f"| {run['model']} | {params} | {r['global_step']} | {r['images_seen']} | {r['images_per_s']:.0f} | "
            f"{last.get('eval/fd', float('nan')):.2f} | {best:.2f} | {last.get('eval/conditional_accuracy', float('nan')):.3f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.quick:
        args.minutes, args.eval_every_minutes, args.eval_num_samples, args.eval_inference_steps = 0.05, 0.02, 32, 2
        args.train_batch_size = 16
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work_dir or out / "runs")
    runs = []
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        if name not in MODELS:
            raise ValueError(f"Unknown model {name!r}; choose from {list(MODELS)}.")
        print(f"=== {name}", flush=True)
        runs.append(run_model(name, args, work))
        (out / "convergence.json").write_text(json.dumps({"settings": vars(args), "runs": runs}, indent=2, default=str))
    md = table(runs, args)
    (out / "convergence.md").write_text(md)
    plot(runs, out)
    print(md)


if __name__ == "__main__":
    main()
