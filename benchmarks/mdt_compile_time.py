#!/usr/bin/env python
"""What torch.compile costs MDTv2's per-batch mask ratio: the first training steps of a compiled MDTv2 with the
kept-token count compiled as a static size (one recompilation per new count, up to dynamo's automatic dynamic
shape on the second) against a dynamic size from the first step (what the trainer does).

Each variant runs in a fresh process with an empty inductor cache (a warm cache would hide the compilation), from
the same seed, for ``--steps`` AdamW steps of the recipe's loss (`mdtv2_loss`, DDPM with learned variance, the
recipe's 4 ratio levels of U[0.3, 0.5), class-conditional), and prints: compiled graphs, the first step, the first
``--steps`` steps in all, and the median of the last half of the steps (the steady step). The losses of both
variants must agree (same computation).

    python benchmarks/mdt_compile_time.py                          # CPU: a tiny 32x32 model (3 minutes)
    python benchmarks/mdt_compile_time.py --preset B/4 --sample_size 64 --batch_size 128 --steps 30   # GPU
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List

VARIANTS = ("static", "dynamic")


def parse_args(argv: List[str] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default=None, help="MDTv2 size preset (e.g. B/4); default: the 3.1M demo model.")
    p.add_argument("--sample_size", type=int, default=32)
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--device", default=None, help="Default: cuda if available, else cpu.")
    p.add_argument("--out", default=None, help="Also write the rows as JSON here.")
    p.add_argument("--worker", default=None, choices=VARIANTS, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def run_variant(args: argparse.Namespace, variant: str) -> Dict[str, Any]:
    """One variant's steps in this process (called in a fresh subprocess by `main`)."""
    import torch

    from diffusers_masked import MDTv2Transformer2DModel
    from diffusers_masked.training.context import TrainContext
    from diffusers_masked.training.recipe import draw_ids_keep
    from diffusers_masked.training.recipe_mdt import MDTv2Recipe, mdtv2_loss
    from diffusers_masked.training.trainer import parse_args as trainer_args

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(0)
    common = dict(sample_size=args.sample_size, in_channels=1, num_classes=10, learn_sigma=True)
    if args.preset:
        model = MDTv2Transformer2DModel.from_preset(args.preset, **common)
    else:
        model = MDTv2Transformer2DModel(**MDTv2Recipe.demo_model_config, **common)
    model.to(device).train()
    recipe = MDTv2Recipe()
    config = trainer_args(recipe, [])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    compiled = torch.compile(model)
    x0 = torch.rand(args.batch_size, 1, args.sample_size, args.sample_size, device=device) * 2 - 1
    labels = torch.arange(args.batch_size, device=device) % 10
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    times, losses, kept = [], [], []
    for step in range(args.steps):
        ctx = TrainContext(config, generator=torch.Generator(device).manual_seed(step), model=model, step=step)
        ctx.objective = recipe.build_objective(ctx)
        ratio = recipe.mask_ratio(ctx)
        start = time.perf_counter()
        with autocast:
            loss, _ = mdtv2_loss(compiled, ctx.objective, x0, {"class_labels": labels}, ratio,
                                 generator=ctx.generator, bare=model, varying_keep=variant == "dynamic")
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())  # a host sync: this is a benchmark, the step must be finished to be timed
        times.append(time.perf_counter() - start)
        kept.append(draw_ids_keep(model, 1, ratio, device, None).shape[1])
    from torch._dynamo.utils import counters

    tail = times[len(times) // 2:]
    return {"variant": variant, "device": str(device), "preset": args.preset or "demo", "batch_size": args.batch_size,
            "sample_size": args.sample_size, "steps": args.steps, "graphs": int(counters["stats"]["unique_graphs"]),
            "kept_token_counts": sorted(set(kept)), "first_step_s": times[0], "all_steps_s": sum(times),
            "steady_step_ms": 1000 * statistics.median(tail), "losses": losses,
            "torch": torch.__version__}


def main(argv: List[str] = None) -> int:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(run_variant(args, args.worker)))
        return 0
    rows = []
    own = list(argv if argv is not None else sys.argv[1:])
    for variant in args.variants:
        with tempfile.TemporaryDirectory() as cache:
            env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache}
            done = subprocess.run([sys.executable, __file__, *own, "--worker", variant], env=env, check=True,
                                  stdout=subprocess.PIPE, text=True)
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    print(f"MDTv2 {rows[0]['preset']}, {rows[0]['sample_size']}x{rows[0]['sample_size']}, batch {args.batch_size}, "
          f"{args.steps} steps, {rows[0]['device']}, torch {rows[0]['torch']}; kept-token counts "
          f"{rows[0]['kept_token_counts']}")
    print(f"| kept-token count | graphs | first step s | {args.steps} steps s | steady step ms |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['graphs']} | {r['first_step_s']:.1f} | {r['all_steps_s']:.1f} | "
              f"{r['steady_step_ms']:.1f} |")
    if len(rows) == 2:
        same = all(math.isclose(a, b, rel_tol=1e-3, abs_tol=1e-4) for a, b in zip(rows[0]["losses"], rows[1]["losses"]))
        print(f"losses agree: {same}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
