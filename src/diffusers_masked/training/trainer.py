"""The one Accelerate training loop shared by every model of this package.

`main(recipe)` parses diffusers-style flags into a typed `TrainConfig`, builds data / model / optimizer / EMA,
trains with checkpoints that resume exactly, saves validation grids, and finally writes a complete pipeline folder
(+ model card, optional Hub upload). Model-specific parts (flags, model, loss, pipeline) come from a
`TrainingRecipe`; what happens after each step comes from small callbacks (`callbacks.py`).

Works with plain ``python train_examples/train_maskdit.py`` and with ``accelerate launch [--num_processes N]``.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch

from .batches import TrainingData, images_per_step
from .callbacks import (
    Callback,
    Checkpointing,
    Evaluation,
    LoopProgress,
    MetricsLogger,
    TimeBudget,
    ValidationGrids,
)
from .checkpointing import CheckpointManager, OutputDirLock, remove_leftovers
from .cli import build_parser, check_fsdp, parse_args
from .config import TrainConfig
from .context import TrainContext, unwrap_model
from .model_setup import build_ema, build_lr_scheduler, build_optimizer, build_transformer, without_ema_for_lora
from .outputs import FinalOutputs, report_fsdp_result, report_stopped_early
from .recipe import TrainingRecipe
from .sampling import PipelineEvaluator, PipelineSampler, log_grid
from .state import RunClock, TrainState

logger = logging.getLogger(__name__)

__all__ = ["Trainer", "build_parser", "main", "parse_args", "tracker_config"]


def _report_to(name: Optional[str]) -> Optional[str]:
    """accelerate's ``log_with``: None for 'none', and for tensorboard when it is not installed (with a warning)."""
    if name in (None, "none", ""):
        return None
    if name == "tensorboard":
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            logger.warning("tensorboard is not installed (pip install tensorboard); logging disabled.")
            return None
    return name


def _make_accelerator(config: TrainConfig):
    from accelerate import Accelerator
    from accelerate.utils import DDPCommunicationHookType, DistributedDataParallelKwargs, ProjectConfiguration

    out = Path(config.output_dir)
    return Accelerator(
        gradient_accumulation_steps=config.optim.gradient_accumulation_steps,
        mixed_precision=config.distributed.mixed_precision,
        log_with=_report_to(config.logging.report_to),
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / config.logging.logging_dir)),
        # Gradients as views of DDP's all-reduce buckets: no copy back after each all-reduce and one gradient
        # buffer less (same values; nothing here calls detach_() on a gradient).
        kwargs_handlers=[DistributedDataParallelKwargs(
            gradient_as_bucket_view=True, comm_hook=DDPCommunicationHookType(config.distributed.ddp_comm_hook))],
    )


def tracker_config(config: TrainConfig) -> Dict[str, Any]:
    """The flags the trackers record: every scalar one, never the Hub token."""
    return {k: v for k, v in config.flat().items() if isinstance(v, (int, float, str, bool)) and k != "hub_token"}


class Trainer:
    """Builds a run from a recipe and its config; `run()` trains.

    Attributes: ``config``, ``accelerator``, ``ctx`` (what the recipe sees), ``data``, ``model`` (the module the
    step calls: DDP- / compile-wrapped), ``ema``, ``optimizer``, ``lr_scheduler``, ``state``, ``checkpoints``.
    """

    def __init__(self, recipe: TrainingRecipe, config: TrainConfig, dataset: Any = None):
        from accelerate.utils import DistributedType, set_seed

        self.recipe, self.dataset = recipe, dataset
        self.output_dir = Path(config.output_dir)
        self.accelerator = _make_accelerator(config)
        logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
        if config.distributed.ddp_comm_hook == "bf16" and self.accelerator.device.type != "cuda":
            raise ValueError("--ddp_comm_hook bf16 needs CUDA GPUs (NCCL); on this device use fp16 or no.")
        self.is_fsdp = self.accelerator.distributed_type == DistributedType.FSDP
        if self.is_fsdp:
            check_fsdp(config)
        if config.distributed.allow_tf32 and torch.cuda.is_available():
            torch.backends.cuda.matmul.allow_tf32 = True
        set_seed(config.seed)
        self.lock = OutputDirLock(self.output_dir)
        if self.accelerator.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            self.lock.acquire()  # before any work: a second run on this folder stops here
            remove_leftovers(self.output_dir)
        try:
            self.config = without_ema_for_lora(config)
            self._build()
        except BaseException:
            self.lock.release()
            raise

    def _build(self) -> None:
        acc, recipe, config = self.accelerator, self.recipe, self.config
        # One generator for every random draw of the step (noise, sigma, masks, label dropout, flips), distinct per
        # process and saved in checkpoints: resuming continues the same random stream.
        generator = torch.Generator(device=acc.device).manual_seed(config.seed * 1000 + acc.process_index)
        self.state = TrainState(generator)
        self.ctx = TrainContext(config=config, device=acc.device, accelerator=acc, generator=generator,
                                backward_part=self._backward_part if self._can_backward_part() else None)
        self.data = TrainingData(config, acc, self.dataset)
        self.ctx.data, self.ctx.vae, self.ctx.text = self.data.info, self.data.vae, self.data.text_info
        recipe.setup(self.ctx)
        self.ctx.objective = recipe.build_objective(self.ctx)
        self._build_model()
        self.clock = RunClock(self.state, images_per_step(config, acc.num_processes))
        # Saved as safetensors + JSON by the manager, not registered with accelerate (which would pickle them).
        objects: Dict[str, Any] = {"train_state": self.state}
        if self.ema is not None:
            objects["ema"] = self.ema
        self.checkpoints = CheckpointManager(acc, self.output_dir, objects, config.checkpoint.checkpoints_total_limit,
                                             before_save=self.clock.record_totals)
        self.sampler = PipelineSampler(recipe, self.ctx, self.ema)

    def _build_model(self) -> None:
        acc, ctx = self.accelerator, self.ctx
        model, self.label_lookup = build_transformer(self.recipe, ctx)
        ctx.model = model
        self.ema = build_ema(model, self.config, acc.device)
        optimizer = build_optimizer(self.recipe, [p for p in model.parameters() if p.requires_grad], ctx)
        lr_scheduler = build_lr_scheduler(optimizer, self.config, acc.num_processes)
        self.model, self.optimizer, self.lr_scheduler = acc.prepare(model, optimizer, lr_scheduler)
        m = self.config.model
        if m.compiles:
            mode = None if m.torch_compile_mode == "default" else m.torch_compile_mode
            self.model = torch.compile(self.model, mode=mode)
        ctx.model = unwrap_model(self.model, acc)

    def _can_backward_part(self) -> bool:
        """`TrainContext.backward_part` needs DDP's no_sync: single-process and DDP runs only (DeepSpeed steps its
        optimizer inside backward; FSDP's no_sync keeps unsharded gradients)."""
        from accelerate.utils import DistributedType

        kind = self.accelerator.distributed_type
        return kind in (DistributedType.NO, DistributedType.MULTI_GPU, DistributedType.MULTI_CPU)

    def _backward_part(self, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        """See `TrainContext.backward_part`."""
        with self.accelerator.no_sync(self.model):
            loss = compute()
            self.accelerator.backward(loss)
        return loss.detach()

    @property
    def unwrapped_model(self) -> torch.nn.Module:
        """The bare transformer (no DDP / torch.compile wrapper): what EMA, sampling and saving use."""
        return self.ctx.model

    # ---- run -----------------------------------------------------------------------------------------------------
    def run(self) -> Dict[str, Any]:
        """Train; the output-folder lock is released however the run ends."""
        try:
            return self._run()
        finally:
            self.lock.release()

    def _run(self) -> Dict[str, Any]:
        acc, cfg = self.accelerator, self.config
        if acc.is_main_process:
            acc.init_trackers(f"{self.recipe.name}", config=tracker_config(cfg))
        self._resume()
        if cfg.model.lora_rank and self.state.global_step == 0 and acc.is_main_process:
            self.sampler.base_model_grid(self.output_dir / "sample_grid_before.png")
        num_parameters = self._log_start()
        o = cfg.optim
        start = self.state.global_step
        stop_at = o.max_train_steps if o.stop_after_steps is None else start + o.stop_after_steps
        progress = LoopProgress(step=start, stop_at=min(o.max_train_steps, stop_at))
        batches = self.data.batches(lambda: self.state.global_step, o.gradient_accumulation_steps)
        callbacks = self._callbacks()
        self.clock.start()
        if start < progress.stop_at:
            self._train(batches, progress, callbacks)
        for callback in callbacks:
            callback.close()
        self.clock.record_totals()
        result = self._result(progress, num_parameters)
        self._finish(result)
        return result

    def _train(self, batches, progress: LoopProgress, callbacks: List[Callback]) -> None:
        """The loop: loss, backward, optimizer step, EMA, then the callbacks; until ``progress.stop_at``."""
        acc, ctx, state, recipe = self.accelerator, self.ctx, self.state, self.recipe
        max_grad_norm = self.config.optim.max_grad_norm
        for batch in batches:
            with acc.accumulate(self.model):
                ctx.step = state.global_step
                batch = self.data.prepare(batch, ctx.generator, self.label_lookup, ctx.step)
                output = recipe.compute_loss(self.model, batch, ctx)
                acc.backward(output.for_backward())
                if acc.sync_gradients and max_grad_norm:
                    acc.clip_grad_norm_(self.model.parameters(), max_grad_norm)
                self.optimizer.step()
                self.lr_scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
            if not acc.sync_gradients:
                continue
            state.global_step += 1
            progress.step = state.global_step
            if self.ema is not None:
                self.ema.step(ctx.model.parameters())
            for callback in callbacks:
                callback.on_step_end(progress, output)
            if progress.step >= progress.stop_at:
                break
        batches.close()

    def _callbacks(self) -> List[Callback]:
        """What runs after each step, in this order: logging, checkpoint, validation grid, evaluation, budget."""
        acc, cfg, clock = self.accelerator, self.config, self.clock
        v, main = cfg.validation, acc.is_main_process
        callbacks: List[Callback] = [
            MetricsLogger(acc, self.state, clock, self.lr_scheduler, cfg.logging.logging_steps,
                          cfg.optim.max_train_steps, clock.images_per_step),
            Checkpointing(self.checkpoints.save, cfg.checkpoint.checkpointing_steps),
            ValidationGrids(self.sampler.sample_grid, lambda grid, step: log_grid(acc, grid, step),
                            v.validation_steps, self.output_dir / "samples", clock, main),
        ]
        self.evaluation = None
        if v.evaluates:
            evaluate = PipelineEvaluator(self.sampler, self.output_dir, clock.images_per_step)
            self.evaluation = Evaluation(evaluate, v.eval_every_steps, v.eval_every_minutes, clock, main)
            callbacks.append(self.evaluation)
        if cfg.optim.max_train_time_minutes is not None:
            callbacks.append(TimeBudget(cfg.optim.max_train_time_minutes, acc, clock, self.checkpoints.save))
        return callbacks

    def _resume(self) -> None:
        path = self.checkpoints.resolve(self.config.checkpoint.resume_from_checkpoint)
        if path is None:
            return
        if self.is_fsdp:
            logger.warning("FSDP checkpoints are read by torch.distributed.checkpoint, whose metadata file is a "
                           "pickle: resume only FSDP checkpoints you wrote yourself.")
        self.checkpoints.resume(path)
        if self.ema is not None:
            self.ema.to(self.accelerator.device)  # the EMA shadow weights are loaded on the CPU
        logger.info("Resumed from %s at step %d.", path, self.state.global_step)

    def _log_start(self) -> int:
        """Log the model size and the batch; returns the number of parameters."""
        model, data = self.ctx.model, self.ctx.data
        num_parameters = sum(p.numel() for p in model.parameters())
        if self.accelerator.is_main_process:
            logger.info("%s: %.2fM parameters, input %dx%dx%d, %d samples, global batch %d", type(model).__name__,
                        num_parameters / 1e6, model.config.in_channels, data.sample_size, data.sample_size,
                        data.num_samples, self.clock.images_per_step)
        return num_parameters

    def _result(self, progress: LoopProgress, num_parameters: int) -> Dict[str, Any]:
        """``train_results.json``: whole-run totals (a resumed run reports every segment, not only this one)."""
        state, total_s = self.state, self.state.train_seconds
        return {"global_step": state.global_step,
                "final_loss": state.last_loss if state.last_loss is not None else float("nan"),
                "train_time_s": total_s, "images_per_s": state.images_seen / max(total_s, 1e-9),
                "finished": state.global_step >= self.config.optim.max_train_steps or progress.budget_reached,
                "images_seen": state.images_seen, "num_parameters": num_parameters}

    def _finish(self, result: Dict[str, Any]) -> None:
        """The pipeline, card and upload of a finished run; how to resume one stopped early."""
        acc = self.accelerator
        if acc.is_main_process:
            if not result["finished"]:
                report_stopped_early(self.ctx, self.state.global_step, self.checkpoints.list_checkpoints()[-1],
                                     self.recipe.name)
            elif self.is_fsdp:  # the sharded final checkpoint is the result (see cli.check_fsdp)
                report_fsdp_result(self.output_dir, self.checkpoints.list_checkpoints()[-1], result)
            else:
                FinalOutputs(self.recipe, self.ctx, self.sampler, self.ema, self.evaluation).write(result)
        acc.wait_for_everyone()
        acc.end_training()
        if acc.num_processes > 1:
            self._release_process_group()

    def _release_process_group(self) -> None:
        """Free the DDP wrapper, the last owner of the process group, while its worker threads are idle.

        PyTorch's gloo process group joins its worker threads in its destructor with the GIL held, and a worker may
        still need the GIL to free the last collective's tensors (pytorch/pytorch#56297): freeing the wrapper right
        after the final barrier could deadlock. Sleeping releases the GIL so the workers finish first; then the
        wrapper is dropped here instead of at an arbitrary later point."""
        time.sleep(0.5)
        self.model = self.ctx.model
        self.accelerator.free_memory()


def main(recipe: TrainingRecipe, argv: Optional[List[str]] = None, dataset: Any = None) -> Dict[str, Any]:
    """Entry point of the train_examples scripts: flags -> `TrainConfig` (once, here) -> `Trainer.run`.

    ``dataset``: an in-memory `datasets.Dataset` to train on instead of --dataset_name / --train_data_dir (its
    --image_column and --caption_column / --label_column are read as for a loaded one)."""
    return Trainer(recipe, parse_args(recipe, argv), dataset).run()
