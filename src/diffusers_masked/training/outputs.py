"""What a run leaves in its output folder at the end: the pipeline (or LoRA weights), the final sample grid,
``train_results.json``, the model card and the optional Hub upload; or, for a run stopped early, how to resume."""

from __future__ import annotations

import json
import logging
import shlex
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

from .callbacks import Evaluation
from .context import TrainContext
from .recipe import TrainingRecipe
from .sampling import PipelineSampler

logger = logging.getLogger(__name__)


class FinalOutputs:
    """Writes the finished run's folder (main process only).

    Args:
        recipe: The run's recipe (pipeline class, card template and fields).
        ctx: The run (config, bare model, objective, data).
        sampler: Builds the pipeline and the final grid.
        ema: The EMA, copied into the model before saving (None without --use_ema).
        evaluation: The in-training evaluation, scored once more at the end (None without --eval_*).
    """

    def __init__(self, recipe: TrainingRecipe, ctx: TrainContext, sampler: PipelineSampler, ema: Any = None,
                 evaluation: Optional[Evaluation] = None):
        self.recipe, self.ctx, self.sampler, self.ema, self.evaluation = recipe, ctx, sampler, ema, evaluation
        self.output_dir = Path(ctx.config.output_dir)

    def write(self, result: Dict[str, Any]) -> None:
        """Final evaluation, sample grid, pipeline or LoRA weights, ``train_results.json``, card, Hub upload."""
        out, cfg = self.output_dir, self.ctx.config
        if self.evaluation is not None:
            record = self.evaluation.final(result["global_step"], result["train_time_s"])
            result.update({k: v for k, v in record.items() if k.startswith("eval/")})
        grid_path = out / "sample_grid.png"
        self.sampler.sample_grid(grid_path)
        if cfg.model.lora_rank:
            self.save_lora()
        else:
            self.save_pipeline()
        result["sample_grid"] = str(grid_path)
        write_results(out, result)
        from .hub import push_to_hub, write_model_card

        write_model_card(self.recipe, self.ctx, result)
        if cfg.hub.push_to_hub:
            push_to_hub(cfg.hub, out)
        logger.info("Saved the pipeline to %s (sample grid %s).", out, grid_path)

    def save_pipeline(self) -> Path:
        """The complete pipeline folder (with the EMA weights when used)."""
        if self.ema is not None:
            self.ema.copy_to(self.ctx.model.parameters())
        self.sampler.pipeline().save_pretrained(self.output_dir, safe_serialization=True)
        return self.output_dir

    def save_lora(self) -> Path:
        """Only the adapter: OUTPUT_DIR/pytorch_lora_weights.safetensors (load with `pipe.load_lora_weights`)."""
        from peft.utils import get_peft_model_state_dict

        model = self.ctx.model
        self.recipe.pipeline_cls.save_lora_weights(
            self.output_dir,
            transformer_lora_layers=get_peft_model_state_dict(model),
            transformer_lora_adapter_metadata=model.peft_config["default"].to_dict(),
        )
        return self.output_dir / "pytorch_lora_weights.safetensors"


def write_results(output_dir: Path, result: Dict[str, Any]) -> Path:
    path = output_dir / "train_results.json"
    path.write_text(json.dumps(result, indent=2))
    return path


def report_fsdp_result(output_dir: Path, checkpoint: Path, result: Dict[str, Any]) -> None:
    """An FSDP run's result is its sharded final checkpoint (see `cli.check_fsdp`): say how to merge it."""
    write_results(output_dir, result)
    logger.info("FSDP run finished; the sharded weights are in %s. Merge them with `accelerate merge-weights "
                "%s/pytorch_model_fsdp_0 MERGED_DIR` (one file of full weights) and load them into the "
                "transformer with `load_state_dict`.", checkpoint, checkpoint)


def resume_command(command_line: List[str], recipe_name: str) -> str:
    """The command that resumes this run: the same flags (a Hub token masked) plus ``--resume_from_checkpoint
    latest``."""
    flags, items = [], iter(command_line)
    for item in items:
        if item in ("--resume_from_checkpoint", "--hub_token"):
            next(items, None)
            flags += ["--hub_token", "YOUR_TOKEN"] if item == "--hub_token" else []  # never print a secret
        elif item.startswith("--hub_token="):
            flags.append("--hub_token=YOUR_TOKEN")
        elif not item.startswith("--resume_from_checkpoint="):
            flags.append(item)
    own = sys.argv[0] if sys.argv else ""
    own_script = own.endswith(".py") and not own.endswith("__main__.py")
    script = own if own_script else f"train_examples/train_{recipe_name}.py"
    return shlex.join(["python", script, *flags, "--resume_from_checkpoint", "latest"])


def report_stopped_early(ctx: TrainContext, step: int, checkpoint: Path, recipe_name: str) -> None:
    """Say that --stop_after_steps ended the run before --max_train_steps, and how to go on."""
    o = ctx.config.optim
    command = resume_command(list(ctx.config.command_line), recipe_name)
    print(f"Stopped early at step {step} of {o.max_train_steps} (--stop_after_steps {o.stop_after_steps}); no "
          f"pipeline written yet. Checkpoint: {checkpoint}. Resume with:\n  {command}", flush=True)
