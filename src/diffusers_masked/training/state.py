"""Counters of a run that survive a resume (`TrainState`) and its training-time clock (`RunClock`)."""

from __future__ import annotations

import contextlib
import logging
import math
import time
from typing import Any, Dict, Iterator, Optional

import torch

logger = logging.getLogger(__name__)


class TrainState:
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


class RunClock:
    """Training time of this run segment: wall-clock time minus what sampling and evaluation took.

    `start` marks the segment's first step; `record_totals` writes the whole-run totals (earlier segments from
    the checkpoint plus this one) into the `TrainState` before each checkpoint and at the end."""

    def __init__(self, state: TrainState, images_per_step: int):
        self.state, self.images_per_step = state, images_per_step
        self.t0 = time.time()
        self.excluded = 0.0
        self.start_step, self.prior_images, self.prior_seconds = 0, 0, 0.0
        self.started = False

    def start(self) -> None:
        """Begin the segment at the state's step (after a resume); an old checkpoint without totals counts steps."""
        self.t0, self.excluded, self.started = time.time(), 0.0, True
        self.start_step = self.state.global_step
        self.prior_images = self.state.images_seen or self.start_step * self.images_per_step
        self.prior_seconds = self.state.train_seconds

    def train_seconds(self) -> float:
        """Seconds of training in this segment so far."""
        return time.time() - self.t0 - self.excluded

    @contextlib.contextmanager
    def excluded_time(self) -> Iterator[None]:
        """Leave the block's time (sampling a grid, evaluating) out of the training time."""
        t = time.time()
        try:
            yield
        finally:
            self.excluded += time.time() - t

    def record_totals(self) -> None:
        """Whole-run totals up to now into the train state (saved with the next checkpoint)."""
        if not self.started:
            return
        step = self.state.global_step
        self.state.images_seen = self.prior_images + (step - self.start_step) * self.images_per_step
        self.state.train_seconds = self.prior_seconds + self.train_seconds()
