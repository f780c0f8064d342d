"""The trainer's collaborators, each alone with stand-ins: config sorting, callbacks (logging, checkpoints, grids,
evaluation, time budget), the run clock, the batch order, checkpoint listing and the resume command."""

import argparse
import time
from types import SimpleNamespace

import pytest
import torch

from diffusers_masked.training.batches import EpochBatchSampler, TrainingData
from diffusers_masked.training.callbacks import (
    Checkpointing,
    Evaluation,
    LoopProgress,
    MetricsLogger,
    TimeBudget,
    ValidationGrids,
    evaluation_record,
)
from diffusers_masked.training.checkpointing import CheckpointManager
from diffusers_masked.training.cli import parse_args
from diffusers_masked.training.config import RecipeConfig, TrainConfig, from_namespace
from diffusers_masked.training.context import LossOutput, TrainContext
from diffusers_masked.training.outputs import resume_command
from diffusers_masked.training.recipe_maskdit import MaskDiTConfig, MaskDiTRecipe
from diffusers_masked.training.state import RunClock, TrainState
from diffusers_masked.training.trainer import tracker_config


class FakeAccelerator:
    """The parts of `accelerate.Accelerator` the callbacks use, single process."""

    def __init__(self, is_main=True):
        self.is_main_process = self.is_local_main_process = is_main
        self.device = torch.device("cpu")
        self.num_processes = 1
        self.logged, self.reduced = [], []

    def gather(self, tensor):
        return tensor

    def reduce(self, tensor, reduction="sum"):
        self.reduced.append(float(tensor))
        return tensor

    def log(self, record, step):
        self.logged.append((step, record))


def output(loss=1.0, **logs):
    return LossOutput(torch.tensor(loss), {"mask_ratio": 0.5, **{k: torch.tensor(v) for k, v in logs.items()}})


def clock(images_per_step=8):
    c = RunClock(TrainState(torch.Generator()), images_per_step)
    c.start()
    return c


# ---- config ---------------------------------------------------------------------------------------------------
def test_every_flag_lands_in_one_section_and_back():
    config = parse_args(MaskDiTRecipe(), ["--learning_rate", "3e-4", "--mae_loss_coef", "0.2", "--hub_token", "x"])
    assert config.optim.learning_rate == 3e-4 and isinstance(config.recipe, MaskDiTConfig)
    assert config.recipe.mae_loss_coef == 0.2 and config.model.unmasked_finetune_steps == 150
    flat = config.flat()
    assert flat["learning_rate"] == 3e-4 and flat["mae_loss_coef"] == 0.2 and flat["output_dir"] == config.output_dir
    assert "hub_token" not in tracker_config(config) and tracker_config(config)["seed"] == 0
    off = config.replace("optim", use_ema=False)
    assert not off.optim.use_ema and config.optim.use_ema  # frozen sections: a copy, the original unchanged


def test_a_flag_without_a_section_is_refused():
    namespace = argparse.Namespace(**TrainConfig().flat(), no_such_flag=1)
    with pytest.raises(TypeError, match="no_such_flag"):
        from_namespace(namespace, RecipeConfig, [], [])


def test_finetuning_follows_the_step():
    config = parse_args(MaskDiTRecipe(), ["--max_train_steps", "10", "--unmasked_finetune_steps", "2"])
    ctx = TrainContext(config)
    assert not ctx.finetuning
    ctx.step = 8
    assert ctx.finetuning and MaskDiTRecipe().mask_ratio(ctx) == 0.0


def test_loss_output_keeps_unused_parameters_in_the_graph():
    unused = torch.nn.Parameter(torch.ones(3))
    loss = torch.tensor(2.0, requires_grad=True)
    out = LossOutput(loss, unused=[unused])
    total = out.for_backward()
    assert total.item() == 2.0
    total.backward()
    assert unused.grad is not None and torch.all(unused.grad == 0)
    assert LossOutput(loss).for_backward() is loss


# ---- callbacks ------------------------------------------------------------------------------------------------
def test_metrics_logger_reads_the_loss_only_at_logging_steps():
    acc, state = FakeAccelerator(is_main=False), TrainState(torch.Generator())
    scheduler = SimpleNamespace(get_last_lr=lambda: [0.1])
    logger = MetricsLogger(acc, state, clock(), scheduler, every=2, total_steps=3, images_per_step=8)
    progress = LoopProgress(step=0, stop_at=3)
    for step, loss in ((1, 1.0), (2, 2.0), (3, 3.0)):
        progress.step = step
        logger.on_step_end(progress, output(loss, dsm=0.25))
    logger.close()
    assert [step for step, _ in acc.logged] == [2, 3]  # every 2 steps and the segment's last
    step, record = acc.logged[0]
    assert record["loss"] == 2.0 and record["lr"] == 0.1 and record["images_seen"] == 16
    assert record["mask_ratio"] == 0.5 and record["dsm"] == 0.25 and record["img_per_s"] > 0
    assert state.last_loss == 3.0


def test_checkpointing_every_n_steps_and_at_the_end():
    saved = []
    callback = Checkpointing(saved.append, every=2)
    progress = LoopProgress(step=0, stop_at=5)
    for step in range(1, 6):
        progress.step = step
        callback.on_step_end(progress, output())
    assert saved == [2, 4, 5]


def test_validation_grids_on_the_main_process_with_their_time_left_out(tmp_path):
    made, logged, c = [], [], clock()

    def sample_grid(path):
        time.sleep(0.02)
        made.append(path.name)
        return "grid"

    for is_main in (True, False):
        grids = ValidationGrids(sample_grid, lambda grid, step: logged.append(step), 2, tmp_path, c, is_main)
        for step in (1, 2, 3, 4):
            grids.on_step_end(LoopProgress(step=step, stop_at=4), output())
    assert made == ["step_0000002.png", "step_0000004.png"] and logged == [2, 4]
    assert c.excluded >= 0.04
    ValidationGrids(sample_grid, None, 0, tmp_path, c, True).on_step_end(LoopProgress(2, 4), output())  # 0 = off


def test_evaluation_by_steps_by_minutes_and_once_more_at_the_end():
    calls, c = [], clock()

    def evaluate(step, seconds):
        calls.append(step)
        return {"step": step}

    by_steps = Evaluation(evaluate, every_steps=2, every_minutes=0.0, clock=c, is_main=True)
    for step in (1, 2, 3):
        by_steps.on_step_end(LoopProgress(step, 3), output())
    assert calls == [2]
    assert by_steps.final(2, 1.0) == {"step": 2} and calls == [2]  # the last evaluation is reused
    by_steps.final(3, 1.0)
    assert calls == [2, 3]
    calls.clear()
    seconds = iter([30.0, 61.0, 61.0, 90.0, 125.0, 125.0])
    c.train_seconds = lambda: next(seconds)
    by_minutes = Evaluation(evaluate, every_steps=0, every_minutes=1.0, clock=c, is_main=True)
    for step in (1, 2, 3, 4):
        by_minutes.on_step_end(LoopProgress(step, 9), output())
    assert calls == [2, 4] and by_minutes.num_timed == 2


def test_time_budget_stops_every_process_on_the_same_step_with_a_checkpoint():
    acc, saved, c = FakeAccelerator(), [], clock()
    acc.num_processes = 2  # the main process's clock decides for all
    budget = TimeBudget(1.0, acc, c, saved.append)
    progress = LoopProgress(step=1, stop_at=10)
    budget.on_step_end(progress, output())
    assert progress.stop_at == 10 and saved == [] and acc.reduced == [0.0]
    c.train_seconds = lambda: 61.0
    progress.step = 2
    budget.on_step_end(progress, output())
    assert progress.stop_at == 2 and progress.budget_reached and saved == [2]
    TimeBudget(0.0, acc, c, saved.append).on_step_end(LoopProgress(10, 10), output())  # at the end: nothing to do
    assert saved == [2]
    single = FakeAccelerator()
    TimeBudget(1.0, single, c, saved.append).on_step_end(LoopProgress(3, 10), output())
    assert saved == [2, 3] and single.reduced == []  # one process: no collective, no host sync


def test_time_budget_warns_when_the_first_step_took_most_of_it(caplog):
    acc, saved, c = FakeAccelerator(), [], clock()
    seconds = iter([50.0, 61.0])  # a 50 s first step (compilation) of a 60 s budget
    c.train_seconds = lambda: next(seconds)
    budget = TimeBudget(1.0, acc, c, saved.append)
    with caplog.at_level("WARNING", logger="diffusers_masked.training.callbacks"):
        budget.on_step_end(LoopProgress(1, 10), output())
        budget.on_step_end(LoopProgress(2, 10), output())
    assert saved == [2]
    assert "ended after 2 steps" in caplog.text and "first step took 50 s of the 60 s" in caplog.text
    caplog.clear()
    seconds = iter([5.0, 61.0])  # a quick first step: no warning
    c.train_seconds = lambda: next(seconds)
    quick = TimeBudget(1.0, acc, c, saved.append)
    with caplog.at_level("WARNING", logger="diffusers_masked.training.callbacks"):
        quick.on_step_end(LoopProgress(1, 10), output())
        quick.on_step_end(LoopProgress(2, 10), output())
    assert saved == [2, 2] and caplog.text == ""


def test_evaluation_record():
    report = {"metrics": {"fd": 3.5, "note": "x"}, "settings": {"scheduler": "DDIMScheduler"}}
    assert evaluation_record(report, 4, 8, 1.5) == {"step": 4, "images_seen": 32, "wall_clock_s": 1.5,
                                                    "scheduler": "DDIMScheduler", "eval/fd": 3.5}


# ---- clock, batches, checkpoints, resume command ---------------------------------------------------------------
def test_run_clock_reports_whole_run_totals():
    state = TrainState(torch.Generator())
    state.global_step, state.images_seen, state.train_seconds = 4, 0, 10.0  # an old checkpoint: no image count
    c = RunClock(state, images_per_step=8)
    c.record_totals()
    assert state.images_seen == 0  # not started: nothing recorded
    c.start()
    state.global_step = 6
    with c.excluded_time():
        time.sleep(0.01)
    c.record_totals()
    assert state.images_seen == 6 * 8 and 10.0 <= state.train_seconds < 11.0
    assert c.excluded >= 0.01


def test_batches_resume_where_the_steps_left_off():
    """5 batches per epoch and 2 per step: the leftover batch joins the next step, and each epoch is entered where
    the finished steps left off (as the uninterrupted run)."""
    data = TrainingData.__new__(TrainingData)
    data.sampler = EpochBatchSampler(10, 2, 1, 0, seed=0)
    data.loader = data.sampler  # the sampler's index lists stand in for the loader's batches
    steps = [0]
    stream = data.batches(lambda: steps[0], accumulation=2)
    first_epoch = [next(stream) for _ in range(5)]
    assert first_epoch == list(EpochBatchSampler(10, 2, 1, 0, seed=0))
    steps[0] = 2  # two steps done when the epoch runs out (its 5th batch waits for a partner)
    second = next(stream)
    data.sampler.set_position(1, 0)
    assert second == next(iter(data.sampler))
    stream.close()
    resumed = data.batches(lambda: 5, accumulation=2)  # 10 micro-batches done: epoch 2, its batch 2
    first = next(resumed)
    data.sampler.set_position(2, 2)
    assert first == next(iter(data.sampler))
    with pytest.raises(ValueError, match="gradient_accumulation_steps"):
        data.batches(lambda: 0, accumulation=6)


def test_checkpoint_listing_ignores_unfinished_folders(tmp_path):
    for name in ("checkpoint-10", "checkpoint-2", ".checkpoint-12.tmp", ".checkpoint-1.99.deleting", "other"):
        (tmp_path / name).mkdir()
    manager = CheckpointManager(FakeAccelerator(), tmp_path, {})
    assert [p.name for p in manager.list_checkpoints()] == ["checkpoint-2", "checkpoint-10"]
    assert manager.resolve("latest").name == "checkpoint-10" and manager.resolve(None) is None
    assert "checkpoint-2" in manager._resume_hint(tmp_path / "checkpoint-10")
    assert "no older checkpoint" in manager._resume_hint(tmp_path / "checkpoint-2")
    assert CheckpointManager(FakeAccelerator(), tmp_path / "empty", {}).resolve("latest") is None
    with pytest.raises(FileNotFoundError):
        manager.resolve(str(tmp_path / "missing"))


def test_resume_command_masks_the_hub_token_and_asks_for_latest(monkeypatch):
    monkeypatch.setattr("sys.argv", ["train_examples/train_maskdit.py"])
    command = resume_command(["--hub_token", "secret", "--resume_from_checkpoint", "x", "--hub_token=s2",
                              "--max_train_steps", "9"], "maskdit")
    assert "secret" not in command and "s2" not in command and "YOUR_TOKEN" in command
    assert command.startswith("python train_examples/train_maskdit.py") and command.endswith(
        "--max_train_steps 9 --resume_from_checkpoint latest")
