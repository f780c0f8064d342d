"""Swapping a pipeline's sampler by name."""

from __future__ import annotations

from typing import Any


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
