"""What happens after an optimizer step, one job per callback: logging, checkpoints, validation grids, evaluation
and the wall-clock budget.

The loop calls ``on_step_end(progress, output)`` of each callback in order after every optimizer step. Each one gets
its collaborators at construction, so it can be tested alone with stand-ins.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Optional

import torch

from .context import LossOutput
from .state import RunClock, TrainState

logger = logging.getLogger(__name__)


@dataclass
class LoopProgress:
    """Where the loop is: ``step`` optimizer steps done, ``stop_at`` the last step of this segment (the time budget
    may move it earlier), ``budget_reached`` whether it did."""

    step: int
    stop_at: int
    budget_reached: bool = False

    @property
    def at_end(self) -> bool:
        return self.step == self.stop_at


class Callback:
    """Base of the loop's collaborators."""

    def on_step_end(self, progress: LoopProgress, output: LossOutput) -> None:
        """Called after each optimizer step (and the EMA update)."""

    def close(self) -> None:
        """Called once after the last step."""


class MetricsLogger(Callback):
    """Progress bar every step; every ``every`` steps (and at the end of the segment) the loss averaged over the
    processes, throughput and the recipe's logs go to the trackers. The loss is read from the device only then."""

    def __init__(self, accelerator: Any, state: TrainState, clock: RunClock, lr_scheduler: Any, every: int,
                 total_steps: int, images_per_step: int):
        from tqdm.auto import tqdm

        self.accelerator, self.state, self.clock, self.lr_scheduler = accelerator, state, clock, lr_scheduler
        self.every, self.images_per_step = every, images_per_step
        self.bar = tqdm(total=total_steps, initial=state.global_step, disable=not accelerator.is_local_main_process,
                        desc="train")
        self.window_t, self.window_steps = time.time(), 0

    def on_step_end(self, progress: LoopProgress, output: LossOutput) -> None:
        self.bar.update(1)
        self.window_steps += 1
        if progress.step % self.every and not progress.at_end:
            return
        acc = self.accelerator
        loss = acc.gather(output.loss.detach().reshape(1)).mean().item()
        self.state.last_loss = loss
        now = time.time()
        ips = self.window_steps * self.images_per_step / max(now - self.window_t, 1e-9)
        self.window_t, self.window_steps = now, 0
        record = {"loss": loss, "lr": self.lr_scheduler.get_last_lr()[0], "img_per_s": ips,
                  "images_seen": progress.step * self.images_per_step, "wall_clock_s": self.clock.train_seconds(),
                  **{k: float(v) for k, v in output.logs.items()}}
        self.bar.set_postfix(loss=f"{loss:.4f}", img_s=f"{ips:.1f}")
        acc.log(record, step=progress.step)

    def close(self) -> None:
        self.bar.close()


class Checkpointing(Callback):
    """A checkpoint every ``every`` steps and at the end of the segment (``save(step)`` runs on every process)."""

    def __init__(self, save: Callable[[int], Any], every: int):
        self.save, self.every = save, every

    def on_step_end(self, progress: LoopProgress, output: LossOutput) -> None:
        if progress.step % self.every == 0 or progress.at_end:
            self.save(progress.step)


class ValidationGrids(Callback):
    """A sample grid ``OUTPUT_DIR/samples/step_N.png`` every ``every`` steps (main process; time left out of the
    training time)."""

    def __init__(self, sample_grid: Callable[[Path], Any], log_grid: Callable[[Any, int], None], every: int,
                 folder: Path, clock: RunClock, is_main: bool):
        self.sample_grid, self.log_grid, self.every = sample_grid, log_grid, every
        self.folder, self.clock, self.is_main = folder, clock, is_main

    def on_step_end(self, progress: LoopProgress, output: LossOutput) -> None:
        if not (self.every and progress.step % self.every == 0 and self.is_main):
            return
        with self.clock.excluded_time():
            grid = self.sample_grid(self.folder / f"step_{progress.step:07d}.png")
            self.log_grid(grid, progress.step)


class Evaluation(Callback):
    """Scores samples every ``every_steps`` steps and every ``every_minutes`` minutes of training time (main
    process; time left out of the training time); `final` scores the end of the run unless the last step was.

    Args:
        evaluate: ``evaluate(step, train_seconds) -> record`` (see `evaluation_record`).
    """

    def __init__(self, evaluate: Callable[[int, float], Dict[str, Any]], every_steps: int, every_minutes: float,
                 clock: RunClock, is_main: bool):
        self.evaluate, self.every_steps, self.every_minutes = evaluate, every_steps, every_minutes
        self.clock, self.is_main = clock, is_main
        self.num_timed = 0  # time-triggered evaluations so far
        self.last: Optional[Dict[str, Any]] = None

    def on_step_end(self, progress: LoopProgress, output: LossOutput) -> None:
        train_s = self.clock.train_seconds()
        due_minutes = bool(self.every_minutes) and train_s >= 60 * self.every_minutes * (self.num_timed + 1)
        self.num_timed += int(due_minutes)
        due = due_minutes or (self.every_steps and progress.step % self.every_steps == 0)
        if due and self.is_main:
            seconds = self.clock.train_seconds()
            with self.clock.excluded_time():
                self.last = self.evaluate(progress.step, seconds)

    def final(self, step: int, train_seconds: float) -> Dict[str, Any]:
        """The evaluation of ``step`` (reused when the loop just ran it)."""
        if self.last is None or self.last["step"] != step:
            self.last = self.evaluate(step, train_seconds)
        return self.last


class TimeBudget(Callback):
    """--max_train_time_minutes: stop at the first step past the budget, with a checkpoint.

    Every process must stop on the same step; the main process's clock decides, as only it leaves its sampling
    time out (the others spend it waiting in the next all-reduce)."""

    #: Warn when the segment's first step (torch.compile's compilation, mostly) took more than this share of the
    #: budget: a short budget can then end after a handful of steps, and the run trained nothing to speak of.
    first_step_warn_share = 0.5

    def __init__(self, minutes: float, accelerator: Any, clock: RunClock, save: Callable[[int], Any]):
        self.minutes, self.accelerator, self.clock, self.save = minutes, accelerator, clock, save
        self.first_step_seconds: Optional[float] = None

    def on_step_end(self, progress: LoopProgress, output: LossOutput) -> None:
        if progress.step >= progress.stop_at:
            return
        acc = self.accelerator
        seconds = self.clock.train_seconds()
        if self.first_step_seconds is None:
            self.first_step_seconds = seconds
        over_budget = acc.is_main_process and seconds > 60 * self.minutes
        if acc.num_processes > 1:  # the decision travels as a tensor: a host sync, so only when it must
            over_budget = acc.reduce(torch.tensor(float(over_budget), device=acc.device), reduction="sum").item() > 0
        if over_budget:
            progress.stop_at, progress.budget_reached = progress.step, True
            self._warn_if_first_step_took_the_budget(progress.step)
            self.save(progress.step)

    def _warn_if_first_step_took_the_budget(self, step: int) -> None:
        budget = 60 * self.minutes
        if self.accelerator.is_main_process and self.first_step_seconds > self.first_step_warn_share * budget:
            logger.warning(
                "The time budget (--max_train_time_minutes %g) ended after %d steps of this run: its first step took "
                "%.0f s of the %.0f s (with --torch_compile that is mostly compilation, which the budget counts). "
                "Raise --max_train_time_minutes well above the compilation time, or train without --torch_compile "
                "for short runs.", self.minutes, step - self.clock.start_step, self.first_step_seconds, budget,
            )


def evaluation_record(report: Dict[str, Any], step: int, images_per_step: int, train_seconds: float) -> Dict[str, Any]:
    """One line of ``eval_log.jsonl``: the step, images seen, training seconds, scheduler and the scores."""
    return {"step": step, "images_seen": step * images_per_step, "wall_clock_s": train_seconds,
            "scheduler": report.get("settings", {}).get("scheduler"),
            **{f"eval/{k}": v for k, v in report["metrics"].items() if isinstance(v, (int, float))}}


def append_jsonl(path: Path, record: Dict[str, Any]) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
