"""Scalar curves of a training run from its tensorboard event files (used by the DDP summaries in run_gpu.sh)."""

from __future__ import annotations

import glob
from typing import Dict, Sequence


def read_curves(run_dir: str, keys: Sequence[str] = ("loss", "img_per_s")) -> Dict[str, Dict[int, float]]:
    """``{key: {step: value}}`` for every scalar ``key`` logged under ``run_dir/logs``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    curves: Dict[str, Dict[int, float]] = {}
    for path in sorted(glob.glob(f"{run_dir}/logs/**/events.out.tfevents.*", recursive=True)):
        acc = EventAccumulator(path)
        acc.Reload()
        scalars = acc.Tags().get("scalars", [])
        for key in keys:
            if key in scalars:
                for event in acc.Scalars(key):
                    curves.setdefault(key, {})[event.step] = event.value
    return curves
