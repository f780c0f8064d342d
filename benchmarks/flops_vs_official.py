"""FLOPs of one MaskDiT-XL/2 training step (forward + backward, mask 0.5, decoder + MAE): ours against the official.

The throughput target "MaskDiT >= 1.2x the official MaskDiT" compares two implementations of one model; this script
shows whether they do the same work. Each side is counted in its own process with
``torch.utils.flop_counter.FlopCounterMode`` on CPU (batch 2, 32x32x4 latents). CPU attention kernels have no FLOP
formula, so on CPU only the matmuls are counted, on both sides alike.

Needs the official file (never committed; see ``tests/fixtures/maskdit/README.md``):
``third_party/maskdit/models/maskdit.py`` and timm in ``/tmp/timm_pkg``. Usage::

    python benchmarks/flops_vs_official.py
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from typing import Dict

HERE = os.path.dirname(os.path.abspath(__file__))
BATCH = 2


def _count(step) -> Dict[str, float]:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        step()
    per_op = {str(k): v / BATCH / 1e9 for k, v in counter.get_flop_counts()["Global"].items()}
    return {"gflop_per_img": counter.get_total_flops() / BATCH / 1e9, "per_op": per_op}


def count_official() -> Dict[str, float]:
    import torch

    # The official import path stubs torchvision out of this process (timm imports it), which breaks diffusers'
    # imports: hence one process per side.
    sys.path.insert(0, os.path.join(HERE, "..", "scripts", "fixtures"))
    import _official_env as env

    env.enable_timm()
    env.add_third_party("maskdit")
    from models import maskdit as official

    torch.manual_seed(0)
    net = official.DiT_XL_2(input_size=32, in_channels=4, num_classes=1000, use_decoder=True, mae_loss_coef=0.1)
    net.train()
    x, t = torch.randn(BATCH, 4, 32, 32), torch.rand(BATCH)
    labels = torch.nn.functional.one_hot(torch.randint(0, 1000, (BATCH,)), 1000).float()  # official: one-hot labels
    result = _count(lambda: net(x, t, labels, mask_ratio=0.5)["x"].float().pow(2).mean().backward())
    result["params_m"] = sum(p.numel() for p in net.parameters()) / 1e6
    return result


def count_ours() -> Dict[str, float]:
    import torch

    sys.path.insert(0, HERE)
    import train_throughput as bench

    torch.manual_seed(0)
    model = bench.build_model("maskdit", "XL", False).train()
    x, labels = torch.randn(BATCH, 4, 32, 32), torch.randint(0, 1000, (BATCH,))
    loss_fn = bench.make_loss_fn("maskdit", 0.4)
    result = _count(lambda: loss_fn(model, x, labels).backward())
    result["params_m"] = sum(p.numel() for p in model.parameters()) / 1e6
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--side", choices=["official", "ours"], default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        print(json.dumps(count_official() if args.side == "official" else count_ours()))
        return
    rows = {}
    for side in ("ours", "official"):
        proc = subprocess.run([sys.executable, __file__, "--side", side], capture_output=True, text=True)
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
