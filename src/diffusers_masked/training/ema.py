"""The EMA of the weights, as diffusers' `EMAModel` but with a cheaper update step.

diffusers' foreach step is ``s -= (1 - decay) * (s - p)``: two passes over every tensor and a temporary copy of all
weights each step. ``torch._foreach_lerp_(s, p, 1 - decay)`` computes ``s + (1 - decay) * (p - s)`` in one pass:
the same value (up to float rounding) without the temporary. Everything else (decay schedule, state dict,
checkpoints, `copy_to` / `store` / `restore`) is `EMAModel`'s.
"""

from __future__ import annotations

from typing import Iterable

import torch
from diffusers.training_utils import EMAModel


class LerpEMAModel(EMAModel):
    """`EMAModel` whose ``foreach=True`` step is one fused lerp; falls back to diffusers' step otherwise (frozen
    parameters, ``foreach=False``)."""

    @torch.no_grad()
    def step(self, parameters: Iterable[torch.nn.Parameter]):
        if isinstance(parameters, torch.nn.Module) or not self.foreach:
            return super().step(parameters)
        parameters = list(parameters)
        if len(parameters) != len(self.shadow_params) or not all(p.requires_grad for p in parameters):
            return super().step(parameters)
        self.optimization_step += 1
        decay = self.get_decay(self.optimization_step)
        self.cur_decay_value = decay
        torch._foreach_lerp_(self.shadow_params, parameters, 1 - decay)
