"""FLOPs of one MaskDiT-XL/2 training step (forward + backward, mask 0.5, decoder + MAE): ours against the official.

The throughput target "MaskDiT >= 1.2x the official MaskDiT" compares two implementations of one model; this script
shows whether they do the same work. Each side is the training step `train_throughput.py` times (``maskdit`` and
``official_maskdit``), counted in its own process with ``torch.utils.flop_counter.FlopCounterMode`` on CPU (batch 2,
32x32x4 latents). CPU attention kernels have no FLOP formula, so on CPU only the matmuls are counted, on both sides
alike.

Needs the official files in ``third_party/`` and timm (see ``benchmarks/official_models.py``). Usage::

    python benchmarks/flops_vs_official.py
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from typing import Any, Dict

BATCH = 2


def count(name: str) -> Dict[str, Any]:
    """GFLOP per image (in total and per op) and parameters of one training step of harness model ``name``."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import train_throughput as bench

    torch.manual_seed(0)
    model = bench.build_model(name, "XL", False).train()
    loss_fn = bench.make_loss_fn(name, 0.4)
    x, labels = torch.randn(BATCH, 4, 32, 32), torch.randint(0, 1000, (BATCH,))
    with FlopCounterMode(display=False) as counter:
        loss_fn(model, x, labels).backward()
    per_op = {str(k): v / BATCH / 1e9 for k, v in counter.get_flop_counts()["Global"].items()}
    return {"gflop_per_img": counter.get_total_flops() / BATCH / 1e9, "per_op": per_op,
            "params_m": sum(p.numel() for p in model.parameters()) / 1e6}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=["maskdit", "official_maskdit"], default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.model:
        print(json.dumps(count(args.model)))
        return
    rows = {}
    # One process per side: the official import path may stub torchvision, which breaks diffusers' imports.
    for side, name in (("ours", "maskdit"), ("official", "official_maskdit")):
        proc = subprocess.run([sys.executable, __file__, "--model", name], capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"counting the {side} side failed:\n{proc.stderr[-2000:]}")
        rows[side] = json.loads(proc.stdout.strip().splitlines()[-1])
    print("| MaskDiT-XL/2 step @0.5 | params (M) | GFLOP/img (CPU: matmuls only) | mm | addmm |")
    print("|---|---|---|---|---|")
    for side, r in rows.items():
        ops = r["per_op"]
        print(f"| {side} | {r['params_m']:.1f} | {r['gflop_per_img']:.2f} | {ops.get('aten.mm', 0):.2f} | "
              f"{ops.get('aten.addmm', 0):.2f} |")


if __name__ == "__main__":
    main()
