"""Optimizers the official recipes use that torch does not ship.

Adan is implemented here in plain torch because its packaged implementations come with timm (whose torchvision
dependency breaks `import peft` with the CPU torch wheels of our CI machines) or need a CUDA extension build.
"""

from __future__ import annotations

from typing import Iterable, Tuple

import torch


class Adan(torch.optim.Optimizer):
    r"""Adan: adaptive Nesterov momentum (Xie et al., 2022), the optimizer of the official MDTv2 training.

    With ``betas = (b1, b2, b3)`` written as decay factors (the official defaults 0.98, 0.92, 0.99), per step
    ``d = g - g_prev`` (zero at the first step) and

    ``m = b1 m + (1-b1) g``, ``v = b2 v + (1-b2) d``, ``n = b3 n + (1-b3) (g + b2 d)^2``,
    ``p <- (p - lr * (m_hat + b2 v_hat) / (sqrt(n_hat) + eps)) / (1 + lr * weight_decay)``

    where ``_hat`` are the bias-corrected moments. ``no_prox=True`` applies decoupled weight decay before the step
    instead of the proximal division. Gradient clipping is left to the trainer (it clips the global norm).

    Args:
        params: Parameters or parameter groups.
        lr (`float`, defaults to 1e-3): Learning rate.
        betas (`tuple`, defaults to (0.98, 0.92, 0.99)): Decay of the gradient, gradient-difference and second moments.
        eps (`float`, defaults to 1e-8): Added to the denominator.
        weight_decay (`float`, defaults to 0.0): Weight decay.
        no_prox (`bool`, defaults to `False`): Decoupled (AdamW-style) instead of proximal weight decay.
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: Tuple[float, float, float] = (0.98, 0.92, 0.99),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        no_prox: bool = False,
    ):
        if lr < 0 or eps < 0 or weight_decay < 0:
            raise ValueError(f"lr, eps and weight_decay must be >= 0, got {lr}, {eps}, {weight_decay}.")
        if len(betas) != 3 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"betas must be three numbers in [0, 1), got {betas}.")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, no_prox=no_prox))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            b1, b2, b3 = group["betas"]
            lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad.float()
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(grad)
                    state["exp_avg_diff"] = torch.zeros_like(grad)
                    state["exp_avg_sq"] = torch.zeros_like(grad)
                    state["prev_grad"] = grad.clone()
                state["step"] += 1
                k = state["step"]
                diff = grad - state["prev_grad"]
                state["prev_grad"].copy_(grad)
                m, v, n = state["exp_avg"], state["exp_avg_diff"], state["exp_avg_sq"]
                m.mul_(b1).add_(grad, alpha=1 - b1)
                v.mul_(b2).add_(diff, alpha=1 - b2)
                nesterov = grad + b2 * diff
                n.mul_(b3).addcmul_(nesterov, nesterov, value=1 - b3)
                denom = (n / (1 - b3**k)).sqrt_().add_(eps)
                update = (m / (1 - b1**k) + b2 * v / (1 - b2**k)) / denom
                param = p.float() if p.dtype != torch.float32 else p
                if group["no_prox"]:
                    param.mul_(1 - lr * wd).add_(update, alpha=-lr)
                else:
                    param.add_(update, alpha=-lr).div_(1 + lr * wd)
                if param is not p:
                    p.copy_(param)
        return loss


def build_optimizer(name: str, params: Iterable, lr: float, weight_decay: float = 0.0, **kwargs) -> torch.optim.Optimizer:
    """``"adamw"`` -> `torch.optim.AdamW`, ``"adan"`` -> `Adan` (MDTv2's official choice)."""
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, **kwargs)
    if name == "adan":
        return Adan(params, lr=lr, weight_decay=weight_decay, **kwargs)
    raise ValueError(f"Unknown optimizer {name!r}; use 'adamw' or 'adan'.")

