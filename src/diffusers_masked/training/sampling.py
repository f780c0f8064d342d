"""Sampling from the model being trained: the pipeline, the EMA weights swapped in, validation grids and
in-training evaluation."""

from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import Any, Dict, Iterator, Optional, Union

import numpy as np
import torch

from .callbacks import append_jsonl, evaluation_record
from .context import TrainContext
from .objectives import DDPMObjective
from .recipe import TrainingRecipe


def validation_scheduler_name(config_name: Optional[str], objective: Any) -> Optional[str]:
    """Scheduler class for validation grids and in-training evaluation (None: the saved one).

    DDPM objectives sample with DPM-Solver++ by default: DDPM itself at 40 steps leaves visible noise."""
    if config_name is None:
        return "DPMSolverMultistepScheduler" if isinstance(objective, DDPMObjective) else None
    return None if config_name == "saved" else config_name


class PipelineSampler:
    """Builds the pipeline of the model being trained and samples from it with the weights that get saved.

    Sampling goes through the bare module (``ctx.model``) on purpose: the compiled one would compile again for
    no-grad inference (with ``reduce-overhead``, also record new CUDA graphs), which costs more than a grid takes.

    Args:
        recipe: Builds the pipeline (`TrainingRecipe.build_pipeline`) and the grid images.
        ctx: The run (model, objective, VAE, class names, config).
        ema: The EMA of the weights, or None.
    """

    def __init__(self, recipe: TrainingRecipe, ctx: TrainContext, ema: Any = None):
        self.recipe, self.ctx, self.ema = recipe, ctx, ema

    def pipeline(self):
        """The pipeline as it is saved (with the objective's own inference scheduler)."""
        ctx = self.ctx
        pipe = self.recipe.build_pipeline(ctx.model, ctx.objective.inference_scheduler(), ctx.vae, ctx)
        # Saved in model_index.json, so sampling the model with a scheduler of another objective warns.
        if hasattr(pipe, "record_training_objective"):
            pipe.record_training_objective(ctx.objective.scheduler)
        return pipe

    def sampling_pipeline(self):
        """`pipeline` with --validation_scheduler swapped in (validation grids and evaluation only)."""
        pipe = self.pipeline()
        name = validation_scheduler_name(self.ctx.config.validation.validation_scheduler, self.ctx.objective)
        if name:
            from ..utils import build_scheduler

            pipe.scheduler = build_scheduler(name, pipe.scheduler.config)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    @contextlib.contextmanager
    def sampling_weights(self) -> Iterator[torch.nn.Module]:
        """Eval mode and, with --use_ema, the EMA weights for the duration of the block."""
        model = self.ctx.model
        if self.ema is not None:
            self.ema.store(model.parameters())
            self.ema.copy_to(model.parameters())
        model.eval()
        try:
            yield model
        finally:
            model.train()
            if self.ema is not None:
                self.ema.restore(model.parameters())

    @torch.no_grad()
    def sample_grid(self, path: Path):
        """Validation grid (rows = classes, or prompts) with EMA weights when used; saved as PNG and returned as a
        PIL image. A text grid's prompts, one line per row, go to ``prompts.txt`` in the grid's folder."""
        from diffusers.utils import make_image_grid

        with self.sampling_weights():
            pipe = self.sampling_pipeline()
            gen = torch.Generator(device="cpu").manual_seed(self.ctx.config.seed)
            images, cols = self.recipe.validation_images(pipe, self.ctx, gen)
        rows = math.ceil(len(images) / cols)
        images = images + [images[0].copy() for _ in range(rows * cols - len(images))]
        grid = make_image_grid(images, rows=rows, cols=cols)
        if grid.width < 256:  # tiny images (Fashion-MNIST) are easier to judge enlarged
            factor = max(1, 256 // grid.width)
            grid = grid.resize((grid.width * factor, grid.height * factor), resample=0)
        path.parent.mkdir(parents=True, exist_ok=True)
        grid.save(path)
        prompts = self.recipe.validation_prompts(self.ctx)
        if prompts:
            (path.parent / "prompts.txt").write_text("".join(f"{p}\n" for p in prompts), encoding="utf-8")
        return grid

    def base_model_grid(self, path: Path) -> None:
        """In a LoRA run: the base model's grid (adapters off), for a before/after comparison."""
        model = self.ctx.model
        model.disable_adapters()
        try:
            self.sample_grid(path)
        finally:
            model.enable_adapters()


def log_grid(accelerator: Any, grid, step: int) -> None:
    """Send a validation grid to the trackers that show images (tensorboard, wandb)."""
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_image("validation", np.asarray(grid.convert("RGB")), step, dataformats="HWC")
        elif tracker.name == "wandb":
            import wandb

            tracker.log({"validation": [wandb.Image(grid)]}, step=step)


class PipelineEvaluator:
    """In-training evaluation: Fréchet distance (+ conditional accuracy) of --eval_num_samples samples of the
    sampling pipeline; each result is appended to ``OUTPUT_DIR/eval_log.jsonl`` and sent to the trackers."""

    def __init__(self, sampler: PipelineSampler, output_dir: Path, images_per_step: int):
        self.sampler, self.output_dir, self.images_per_step = sampler, output_dir, images_per_step
        self._resized_reference: Optional[Union[str, np.ndarray]] = None

    def __call__(self, step: int, train_seconds: float) -> Dict[str, Any]:
        with torch.no_grad():
            return self._evaluate(step, train_seconds)

    def _evaluate(self, step: int, train_seconds: float) -> Dict[str, Any]:
        ctx, v = self.sampler.ctx, self.sampler.ctx.config.validation
        common = dict(num_samples=v.eval_num_samples, batch_size=v.eval_batch_size, seed=ctx.config.seed,
                      num_inference_steps=v.validation_inference_steps, guidance_scale=v.validation_guidance_scale,
                      feature=v.eval_feature, inception_weights=v.eval_inception_weights, progress=False,
                      **self.sampler.recipe.eval_kwargs(ctx))
        with self.sampler.sampling_weights():
            pipe = self.sampler.sampling_pipeline()
            if ctx.text is not None and ctx.text.eval_layouts is not None:
                report = self._scene_report(pipe, common)
            else:
                from ..evaluation import evaluate_pipeline

                report = evaluate_pipeline(pipe, reference=v.eval_reference, **common)
        record = evaluation_record(report, step, self.images_per_step, train_seconds)
        append_jsonl(self.output_dir / "eval_log.jsonl", record)
        ctx.accelerator.log({key: value for key, value in record.items() if isinstance(value, (int, float))}, step=step)
        return record

    def _scene_report(self, pipe, common: Dict[str, Any]) -> Dict[str, Any]:
        """Scene score + FD (`evaluate_scenes`) on the held-out scene captions; FD against the held-out scenes
        unless --eval_reference names another reference."""
        from ..evaluation.scenes import evaluate_scenes

        ctx, v = self.sampler.ctx, self.sampler.ctx.config.validation
        reference: Any = v.eval_reference
        if "eval_reference" not in ctx.config.explicit_flags:
            reference = self._scene_reference()
        return evaluate_scenes(pipe, layouts=ctx.text.eval_layouts, reference=reference, **common)

    def _scene_reference(self) -> Any:
        """The held-out scenes: their folder, or at another --resolution their images resized as the training
        images are (read and resized once per run)."""
        if self._resized_reference is None:
            from ..evaluation.scenes import resized_scene_reference

            ctx = self.sampler.ctx
            self._resized_reference = resized_scene_reference(ctx.text.scenes_test_dir, ctx.data.resolution)
        return self._resized_reference
