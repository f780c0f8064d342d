"""Swapping a pipeline's sampler by name, and which training objective a scheduler samples."""

from __future__ import annotations

import math
from typing import Any, Dict, Mapping, Optional, Union


def scheduler_class(name: str) -> type:
    """The diffusers scheduler class called ``name``; a `ValueError` naming the known ones if there is none."""
    import diffusers
    from diffusers import SchedulerMixin

    cls = getattr(diffusers, name, None)
    if not (isinstance(cls, type) and issubclass(cls, SchedulerMixin)):
        known = sorted(n for n in dir(diffusers) if n.endswith("Scheduler"))
        raise ValueError(f"{name!r} is not a diffusers scheduler class; choose one of: {', '.join(known)}.")
    return cls


def build_scheduler(name: str, config: Any):
    """The diffusers scheduler class ``name`` (e.g. ``"DDIMScheduler"``) built from another scheduler's ``config``."""
    return scheduler_class(name).from_config(config)


# Ancestral DDPM on a respaced schedule of tens of steps leaves visible noise in the samples (with a learned variance
# trained for the full schedule, more so), and image metrics read that noise as content: the scene score counts a
# noisy empty cell as inked. The trainer's validation grids already sample DDPM models with DPM-Solver++.
FEW_STEP_DDPM_LIMIT = 250


def few_step_sampler_name(scheduler: Any, num_inference_steps: Optional[int]) -> Optional[str]:
    """The scheduler class to sample with in place of a saved one that would leave noise at this number of steps:
    ``"DPMSolverMultistepScheduler"`` for a `DDPMScheduler` below `FEW_STEP_DDPM_LIMIT` steps, else None (keep the
    saved one)."""
    if num_inference_steps is None:
        return None
    if type(scheduler).__name__ == "DDPMScheduler" and num_inference_steps < FEW_STEP_DDPM_LIMIT:
        return "DPMSolverMultistepScheduler"
    return None


# ---------------------------------------------------------------------------------------------------------------------
# Which training objective a scheduler samples
# ---------------------------------------------------------------------------------------------------------------------
# A model's raw output means nothing without its training objective: an EDM-trained network read by a DDPM scheduler
# (or a v-prediction one read as epsilon) samples noise without any error. Pipelines record the objective and compare
# it with the scheduler they are called with.
TRAINING_OBJECTIVES = ("edm", "epsilon", "v_prediction", "sample")
_DDPM_SCHEDULE_KEYS = ("num_train_timesteps", "beta_schedule", "beta_start", "beta_end")


def scheduler_family(scheduler: Any) -> str:
    """``"edm"`` for schedulers with EDM preconditioning (timesteps are ``c_noise``), ``"ddpm"`` for schedulers built
    on a discrete beta schedule (timesteps are training steps: DDPM, DDIM, DPM-Solver, Euler, ...), else ``"other"``
    (e.g. flow matching)."""
    if hasattr(scheduler, "precondition_inputs") and hasattr(scheduler, "precondition_noise"):
        return "edm"
    config = getattr(scheduler, "config", {}) or {}
    if config.get("beta_schedule") is not None or config.get("trained_betas") is not None:
        return "ddpm"
    return "other"


def describe_training_objective(scheduler: Any) -> Optional[Dict[str, Any]]:
    """The training objective a scheduler's configuration implies, as a JSON-able dict for a pipeline's config.

    EDM schedulers give ``{"objective": "edm", "prediction_type", "sigma_data"}``; DDPM-family schedulers give
    ``{"objective": <prediction_type>, "num_train_timesteps", "beta_schedule", "beta_start", "beta_end"}``; other
    schedulers (and `None`) give `None` (nothing known).

    Args:
        scheduler (`SchedulerMixin` or `None`): The scheduler the model was trained with (or its inference twin).
    """
    if scheduler is None:
        return None
    config = scheduler.config
    family = scheduler_family(scheduler)
    if family == "edm":
        return {
            "objective": "edm", "prediction_type": config.get("prediction_type"), "sigma_data": config.get("sigma_data")
        }
    if family == "ddpm":
        record = {"objective": config.get("prediction_type", "epsilon")}
        record.update({k: config.get(k) for k in _DDPM_SCHEDULE_KEYS if config.get(k) is not None})
        return record
    return None


def normalize_training_objective(value: Union[None, str, Mapping[str, Any]]) -> Optional[Dict[str, Any]]:
    """A pipeline's ``training_objective`` argument as a dict (a bare name such as ``"edm"`` becomes
    ``{"objective": "edm"}``); a `ValueError` for anything else."""
    if value is None:
        return None
    record = {"objective": value} if isinstance(value, str) else dict(value) if isinstance(value, Mapping) else None
    if record is None or record.get("objective") not in TRAINING_OBJECTIVES:
        raise ValueError(
            f"training_objective must be one of {TRAINING_OBJECTIVES} or a dict with an 'objective' key among them "
            f"(see diffusers_masked.utils.describe_training_objective), got {value!r}."
        )
    return record


def _differs(a: Any, b: Any) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return not math.isclose(float(a), float(b), rel_tol=1e-6, abs_tol=1e-12)
    return a != b


def training_objective_mismatch(objective: Optional[Mapping[str, Any]], scheduler: Any) -> Optional[str]:
    """Why ``scheduler`` does not sample a model trained with ``objective`` (a `describe_training_objective` dict),
    or `None` when they agree or nothing is recorded."""
    if not objective or scheduler is None:
        return None
    name = objective.get("objective")
    family = scheduler_family(scheduler)
    sched_name = type(scheduler).__name__
    config = scheduler.config
    if name == "edm":
        if family != "edm":
            return (
                f"the model was trained with the EDM objective but {sched_name} is not an EDM scheduler, so it reads "
                "the output as something else and the samples are noise; use EDMEulerScheduler or "
                f"EDMDPMSolverMultistepScheduler with sigma_data={objective.get('sigma_data')}."
            )
        keys = ("sigma_data", "prediction_type")
    else:
        if family != "ddpm":
            return (
                f"the model was trained with a DDPM objective (prediction_type={name!r}) but {sched_name} is "
                f"{'an EDM' if family == 'edm' else 'not a DDPM-family'} scheduler, so the samples are noise; use "
                "DDPMScheduler, DDIMScheduler, DPMSolverMultistepScheduler (or another beta-schedule scheduler) "
                f"with prediction_type={name!r}."
            )
        if _differs(config.get("prediction_type"), name):
            return (
                f"the model predicts {name!r} but {sched_name} has prediction_type="
                f"{config.get('prediction_type')!r}; build it with prediction_type={name!r}."
            )
        keys = _DDPM_SCHEDULE_KEYS
    wrong = [
        f"{k}={config.get(k)!r} (trained with {objective[k]!r})"
        for k in keys
        if objective.get(k) is not None and config.get(k) is not None and _differs(config.get(k), objective[k])
    ]
    if wrong:
        return f"{sched_name} does not match the training objective: {', '.join(wrong)}."
    return None
