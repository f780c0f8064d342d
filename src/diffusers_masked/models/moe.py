"""Expert-choice mixture-of-experts feed-forward layer (Zhou et al. 2022), as MicroDiT uses it.

In expert-choice routing every expert picks the ``capacity`` tokens it likes best, instead of every token picking
its top experts. Each expert therefore processes exactly the same number of tokens, so the load is balanced by
construction and no auxiliary balancing loss is needed; a token may be processed by zero, one or several experts.

Routing is per sample (tokens of different images never compete), so a sample's output does not depend on the
rest of the batch (classifier-free guidance batching, batch size). The capacity is computed from static shapes
(``int(capacity_factor * tokens / num_experts)``), selection uses `torch.topk` + `torch.gather`, and the results are
scatter-added back: no boolean indexing and no host synchronisation, so the layer compiles to one static graph.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def expert_capacity(num_tokens: int, num_experts: int, capacity_factor: float) -> int:
    """Tokens each expert picks: ``int(capacity_factor * num_tokens / num_experts)``, clamped to [1, num_tokens]."""
    return max(1, min(num_tokens, int(capacity_factor * num_tokens / num_experts)))


class ExpertWeights(nn.Module):
    """All experts' two-layer MLPs as two batched tensors, ``(num_experts, in, out)`` each, applied with `torch.bmm`.

    The ``(experts, in_features, out_features)`` layout is the one peft's ``target_parameters`` expects for MoE
    weights, so LoRA can target ``ff.experts.up_proj`` / ``ff.experts.down_proj`` (the weights are read inside this
    module's own `forward`, which is what peft's parameter wrapper hooks).

    Args:
        num_experts (`int`): Number of experts.
        dim (`int`): Token width.
        inner_dim (`int`): Hidden width of one expert.
        activation_fn (`str`, defaults to `"gelu"`): ``"gelu"``, ``"gelu-approximate"`` or ``"silu"``.
    """

    def __init__(self, num_experts: int, dim: int, inner_dim: int, activation_fn: str = "gelu"):
        super().__init__()
        if activation_fn not in ("gelu", "gelu-approximate", "silu"):
            raise ValueError(f"Unknown activation_fn {activation_fn!r}; use 'gelu', 'gelu-approximate' or 'silu'.")
        self.activation_fn = activation_fn
        self.up_proj = nn.Parameter(torch.empty(num_experts, dim, inner_dim))
        self.down_proj = nn.Parameter(torch.empty(num_experts, inner_dim, dim))
        nn.init.trunc_normal_(self.up_proj, std=0.02)
        nn.init.trunc_normal_(self.down_proj, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` (E, M, D): the M tokens each expert processes -> (E, M, D)."""
        h = torch.bmm(x, self.up_proj.to(x.dtype))
        if self.activation_fn == "gelu":
            h = F.gelu(h)
        elif self.activation_fn == "gelu-approximate":
            h = F.gelu(h, approximate="tanh")
        else:
            h = F.silu(h)
        return torch.bmm(h, self.down_proj.to(h.dtype))


class ExpertChoiceFeedForward(nn.Module):
    """Expert-choice MoE MLP; drop-in for `FeedForward` inside `DiTBlock` (``feed_forward=``).

    For tokens ``x`` of shape (B, T, D): router probabilities ``p = softmax(router(x))`` over the experts; expert
    ``e`` takes the ``k = expert_capacity(T, E, capacity_factor)`` tokens with the largest ``p[:, :, e]``; output of a
    token = sum over the experts that took it of ``p[token, e] * expert_e(token)`` (probabilities not renormalised,
    as MicroDiT); a token no expert took gets zeros (the block's residual still carries it).

    Args:
        dim (`int`): Input and output width.
        inner_dim (`int`): Hidden width of each expert.
        num_experts (`int`, defaults to 8): Number of experts.
        capacity_factor (`float`, defaults to 2.0): Average number of experts per token (capacity = factor * T / E).
        activation_fn (`str`, defaults to `"gelu"`): Expert activation: ``"gelu"`` (exact, MicroDiT),
            ``"gelu-approximate"`` or ``"silu"``.
    """

    def __init__(
        self,
        dim: int,
        inner_dim: int,
        num_experts: int = 8,
        capacity_factor: float = 2.0,
        activation_fn: str = "gelu",
    ):
        super().__init__()
        if num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {num_experts}.")
        if capacity_factor <= 0:
            raise ValueError(f"capacity_factor must be > 0, got {capacity_factor}.")
        self.dim = dim
        self.inner_dim = inner_dim
        self.num_experts = num_experts
        self.capacity_factor = capacity_factor
        self.router = nn.Linear(dim, num_experts, bias=False)
        self.experts = ExpertWeights(num_experts, dim, inner_dim, activation_fn)
        nn.init.trunc_normal_(self.router.weight, std=0.02)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Routing decision for ``x`` (B, T, D).

        Returns:
            probs (B, T, E): softmax router probabilities (float32); gates (B, E, k): ``probs`` of the picked tokens;
            token_ids (B, E, k): the tokens each expert picked.
        """
        k = expert_capacity(x.shape[1], self.num_experts, self.capacity_factor)
        # Softmax in float32: bf16 logits would give many exact ties in top-k.
        probs = self.router(x).float().softmax(dim=-1)
        gates, token_ids = torch.topk(probs.transpose(1, 2), k, dim=-1)
        return probs, gates, token_ids

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        b, t, d = hidden_states.shape
        e = self.num_experts
        _, gates, token_ids = self.route(hidden_states)
        k = token_ids.shape[-1]
        flat_ids = token_ids.reshape(b, e * k, 1).expand(-1, -1, d)
        picked = torch.gather(hidden_states, 1, flat_ids)  # (B, E*k, D), expert-major
        # (E, B*k, D): one batched matmul per projection for all experts.
        picked = picked.reshape(b, e, k, d).transpose(0, 1).reshape(e, b * k, d)
        h = self.experts(picked)
        h = h.reshape(e, b, k, d).transpose(0, 1).reshape(b, e * k, d)
        h = h.float() * gates.reshape(b, e * k, 1)
        # Accumulate in float32: a token may collect several experts' outputs.
        out = torch.zeros(b, t, d, device=hidden_states.device, dtype=torch.float32)
        out = out.scatter_add(1, flat_ids, h)
        return out.to(hidden_states.dtype)
