"""Building blocks shared by the transformers of this package (MaskDiT, MDTv2, DeferredMaskDiT, the routed DiT).

Every block works on token sequences ``(batch, tokens, dim)`` whose length may be the full patch grid or only
the kept tokens of a masked batch, so the same block runs in the encoder (few tokens) and the decoder (all tokens).
Attention projections use diffusers' names (``to_q``, ``to_k``, ``to_v``, ``to_out.0``) and feed-forward layers
use ``ff.net.0.proj`` / ``ff.net.2`` so that peft ``target_modules`` written for diffusers transformers work here.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers.models.embeddings import TimestepEmbedding, Timesteps, get_2d_sincos_pos_embed


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN modulation ``x * (1 + scale) + shift`` with per-sample ``shift`` / ``scale`` of shape (B, D)."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def get_activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """Activation used on the conditioning vector before an adaLN projection."""
    if name == "silu":
        return F.silu
    if name == "gelu-approximate":
        return lambda x: F.gelu(x, approximate="tanh")
    if name == "gelu":
        return F.gelu
    raise ValueError(f"Unknown activation {name!r}; use 'silu', 'gelu' or 'gelu-approximate'.")


# ----------------------------------------------------------------------------------------------------------------
# Patches and positions
# ----------------------------------------------------------------------------------------------------------------
class PatchEmbed(nn.Module):
    """Split an image into non-overlapping ``patch_size`` patches and project each to ``embed_dim``.

    Tokens come out row-major (token index = row * grid_width + column), the order every position table here uses.

    Args:
        patch_size (`int`): Side of a square patch in pixels / latent cells.
        in_channels (`int`): Channels of the input image or latent.
        embed_dim (`int`): Width of the produced tokens.
        bias (`bool`, defaults to `True`): Whether the projection has a bias.
    """

    def __init__(self, patch_size: int, in_channels: int, embed_dim: int, bias: bool = True):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_channels, embed_dim, kernel_size=patch_size, stride=patch_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


def sincos_pos_embed_2d(embed_dim: int, grid_size: int, interpolation_scale: float = 1.0) -> torch.Tensor:
    """Fixed 2-D sin-cos position table of shape (1, grid_size**2, embed_dim), MAE / DiT layout.

    The first half of the channels encodes the column, the second half the row (diffusers' own helper)."""
    table = get_2d_sincos_pos_embed(
        embed_dim, grid_size, base_size=grid_size, interpolation_scale=interpolation_scale, output_type="pt"
    )
    return table.float().unsqueeze(0)


def patchify(x: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, N, p*p*C); per token the values are ordered (p_h, p_w, C), the inverse of `unpatchify`."""
    b, c, h, w = x.shape
    p = patch_size
    x = x.reshape(b, c, h // p, p, w // p, p)
    x = torch.einsum("bchpwq->bhwpqc", x)
    return x.reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(x: torch.Tensor, patch_size: int, channels: int, height: int, width: int) -> torch.Tensor:
    """(B, N, p*p*C) -> (B, C, H, W) for a grid of ``height // p`` rows and ``width // p`` columns."""
    b = x.shape[0]
    p = patch_size
    gh, gw = height // p, width // p
    x = x.reshape(b, gh, gw, p, p, channels)
    x = torch.einsum("bhwpqc->bchpwq", x)
    return x.reshape(b, channels, gh * p, gw * p)


# ----------------------------------------------------------------------------------------------------------------
# Conditioning embedders
# ----------------------------------------------------------------------------------------------------------------
class TimestepEmbedder(nn.Module):
    """Sinusoidal timestep features followed by a two-layer MLP (diffusers' `Timesteps` + `TimestepEmbedding`).

    The sinusoid divides by ``frequency_dim / 2`` with cosines first (``downscale_freq_shift=0``), as DiT's and
    MaskDiT's official code do. Works for integer DDPM steps and for EDM's float ``c_noise = ln(sigma) / 4``.

    Args:
        embed_dim (`int`): Output width.
        frequency_dim (`int`, defaults to 256): Number of sinusoidal features.
        act_fn (`str`, defaults to `"silu"`): Activation between the two linear layers (a diffusers activation name,
            or ``"gelu-approximate"`` for the tanh GELU of MicroDiT).
        freq_shift (`float`, defaults to 0.0): ``downscale_freq_shift`` of the sinusoid (1 as diffusers' DiT).
    """

    def __init__(self, embed_dim: int, frequency_dim: int = 256, act_fn: str = "silu", freq_shift: float = 0.0):
        super().__init__()
        self.time_proj = Timesteps(frequency_dim, flip_sin_to_cos=True, downscale_freq_shift=freq_shift)
        if act_fn == "gelu-approximate":
            # diffusers' TimestepEmbedding only knows exact GELU; swap in the tanh approximation (same parameters).
            self.timestep_embedder = TimestepEmbedding(frequency_dim, embed_dim, act_fn="gelu")
            self.timestep_embedder.act = nn.GELU(approximate="tanh")
        else:
            self.timestep_embedder = TimestepEmbedding(frequency_dim, embed_dim, act_fn=act_fn)

    def forward(self, timestep: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return self.timestep_embedder(self.time_proj(timestep).to(dtype))


class LabelEmbedder(nn.Module):
    """Class embedding table with one extra row, id ``num_classes``, for the unconditional ("null") class.

    Label dropout for classifier-free guidance is done by the trainer (it replaces ids with `null_class_id`), never
    inside the model, so a forward pass is a pure function of its inputs.

    Args:
        num_classes (`int`): Number of real classes.
        embed_dim (`int`): Output width.
    """

    def __init__(self, num_classes: int, embed_dim: int):
        super().__init__()
        self.num_classes = num_classes
        self.embedding_table = nn.Embedding(num_classes + 1, embed_dim)

    @property
    def null_class_id(self) -> int:
        return self.num_classes

    def forward(self, class_labels: torch.Tensor) -> torch.Tensor:
        return self.embedding_table(class_labels)


# ----------------------------------------------------------------------------------------------------------------
# Attention and feed-forward
# ----------------------------------------------------------------------------------------------------------------
class Attention(nn.Module):
    """Multi-head (self- or cross-) attention through `F.scaled_dot_product_attention`.

    PyTorch picks the SDPA backend (flash, memory-efficient, cuDNN or math) per call; nothing here forces one.

    Args:
        query_dim (`int`): Width of the query tokens (and of the output).
        heads (`int`): Number of heads.
        dim_head (`int`): Width of one head; the projections are ``heads * dim_head`` wide.
        cross_attention_dim (`int`, *optional*): Width of the key/value tokens for cross-attention; defaults to
            ``query_dim`` (self-attention).
        bias (`bool`, defaults to `True`): Bias on the q/k/v projections.
        out_bias (`bool`, defaults to `True`): Bias on the output projection.
        qk_norm (`str`, *optional*): ``"layer_norm_across_heads"`` normalises q and k over all heads jointly
            (MicroDiT), ``"layer_norm"`` per head; `None` for none.
        eps (`float`, defaults to 1e-6): Epsilon of the q/k norms.
    """

    def __init__(
        self,
        query_dim: int,
        heads: int,
        dim_head: int,
        cross_attention_dim: Optional[int] = None,
        bias: bool = True,
        out_bias: bool = True,
        qk_norm: Optional[str] = None,
        eps: float = 1e-6,
    ):
        super().__init__()
        inner_dim = heads * dim_head
        kv_dim = cross_attention_dim if cross_attention_dim is not None else query_dim
        self.heads = heads
        self.dim_head = dim_head
        self.is_cross_attention = cross_attention_dim is not None
        self.to_q = nn.Linear(query_dim, inner_dim, bias=bias)
        self.to_k = nn.Linear(kv_dim, inner_dim, bias=bias)
        self.to_v = nn.Linear(kv_dim, inner_dim, bias=bias)
        self.to_out = nn.ModuleList([nn.Linear(inner_dim, query_dim, bias=out_bias)])
        if qk_norm is None:
            self.norm_q = self.norm_k = None
        elif qk_norm == "layer_norm_across_heads":
            self.norm_q = nn.LayerNorm(inner_dim, eps=eps, elementwise_affine=False)
            self.norm_k = nn.LayerNorm(inner_dim, eps=eps, elementwise_affine=False)
        elif qk_norm == "layer_norm":
            self.norm_q = nn.LayerNorm(dim_head, eps=eps, elementwise_affine=False)
            self.norm_k = nn.LayerNorm(dim_head, eps=eps, elementwise_affine=False)
        else:
            raise ValueError(f"Unknown qk_norm {qk_norm!r}; use None, 'layer_norm' or 'layer_norm_across_heads'.")
        self.qk_norm = qk_norm

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """``attention_mask``: bool (True = attend) or additive float, broadcastable to (B, heads, Nq, Nk)."""
        b, n, _ = hidden_states.shape
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        q = self.to_q(hidden_states)
        k = self.to_k(context)
        v = self.to_v(context)
        if self.qk_norm == "layer_norm_across_heads":
            q, k = self.norm_q(q), self.norm_k(k)
        q = q.view(b, n, self.heads, self.dim_head).transpose(1, 2)
        k = k.view(b, -1, self.heads, self.dim_head).transpose(1, 2)
        v = v.view(b, -1, self.heads, self.dim_head).transpose(1, 2)
        if self.qk_norm == "layer_norm":
            q, k = self.norm_q(q), self.norm_k(k)
        if attention_mask is not None and attention_mask.dtype != torch.bool:
            # Contiguous in the key dimension: a permuted bias (e.g. MDTv2's relative position bias) otherwise
            # rules out the memory-efficient SDPA kernel and falls back to the math path (full fp32 scores).
            attention_mask = attention_mask.to(q.dtype).contiguous()
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask)
        out = out.transpose(1, 2).reshape(b, n, self.heads * self.dim_head)
        return self.to_out[0](out)


class _GELUProjection(nn.Module):
    def __init__(self, dim_in: int, dim_out: int, approximate: str, bias: bool):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out, bias=bias)
        self.approximate = approximate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.proj(x), approximate=self.approximate)


class _SwiGLUProjection(nn.Module):
    def __init__(self, dim_in: int, dim_out: int, bias: bool):
        super().__init__()
        # One matmul for value and gate: fewer kernel launches than two Linear layers.
        self.proj = nn.Linear(dim_in, 2 * dim_out, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = self.proj(x).chunk(2, dim=-1)
        return value * F.silu(gate)


class FeedForward(nn.Module):
    """Two-layer MLP ``net = [activation projection, identity, output linear]`` (diffusers' parameter names).

    Args:
        dim (`int`): Input and output width.
        inner_dim (`int`): Hidden width.
        activation_fn (`str`, defaults to `"gelu-approximate"`): ``"gelu-approximate"`` (DiT), ``"gelu"`` or
            ``"swiglu"`` (MicroDiT).
        bias (`bool`, defaults to `True`): Biases on both layers.
    """

    def __init__(self, dim: int, inner_dim: int, activation_fn: str = "gelu-approximate", bias: bool = True):
        super().__init__()
        if activation_fn == "gelu-approximate":
            act = _GELUProjection(dim, inner_dim, "tanh", bias)
        elif activation_fn == "gelu":
            act = _GELUProjection(dim, inner_dim, "none", bias)
        elif activation_fn == "swiglu":
            act = _SwiGLUProjection(dim, inner_dim, bias)
        else:
            raise ValueError(f"Unknown activation_fn {activation_fn!r}; use 'gelu-approximate', 'gelu' or 'swiglu'.")
        self.net = nn.ModuleList([act, nn.Identity(), nn.Linear(inner_dim, dim, bias=bias)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.net:
            x = layer(x)
        return x


# ----------------------------------------------------------------------------------------------------------------
# Transformer block and output layer
# ----------------------------------------------------------------------------------------------------------------
class DiTBlock(nn.Module):
    """adaLN-Zero transformer block (DiT) with the options the three masked models need.

    ``x = x + gate_msa * attn1(modulate(norm1(x)))``; optionally ``x = x + attn2(norm2(x), text)`` (cross-attention,
    ungated, as MicroDiT); ``x = x + gate_mlp * ff(modulate(norm3(x)))``. The six modulation vectors come from
    ``adaln_modulation(act(cond))`` in the order shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp.

    Args:
        dim (`int`): Token width.
        num_attention_heads (`int`): Heads of the self-attention.
        attention_head_dim (`int`): Width of one head (the self-attention may be narrower or wider than ``dim``).
        cond_dim (`int`, *optional*): Width of the conditioning vector; defaults to ``dim`` (MaskDiT's decoder uses
            the encoder's wider conditioning).
        ff_inner_dim (`int`, *optional*): Hidden width of the MLP; defaults to ``mlp_ratio * dim``.
        mlp_ratio (`float`, defaults to 4.0): MLP expansion when ``ff_inner_dim`` is not given.
        activation_fn (`str`, defaults to `"gelu-approximate"`): MLP activation (see `FeedForward`).
        attention_bias (`bool`, defaults to `True`): Biases in the attention projections.
        ff_bias (`bool`, defaults to `True`): Biases in the MLP.
        norm_elementwise_affine (`bool`, defaults to `False`): Learnable LayerNorm scale (MicroDiT: True).
        norm_bias (`bool`, defaults to `True`): LayerNorm bias when affine (MicroDiT: False).
        norm_eps (`float`, defaults to 1e-6): LayerNorm epsilon.
        qk_norm (`str`, *optional*): See `Attention`.
        cross_attention_dim (`int`, *optional*): Width of text tokens; adds an ungated cross-attention branch.
        cross_attention_heads (`int`, *optional*): Heads of the cross-attention (defaults to ``dim // head_dim``).
        adaln_activation (`str`, defaults to `"silu"`): Activation on ``cond`` before the modulation projection.
        skip_connection (`bool`, defaults to `False`): Fuse a long-skip input ``[x, skip] -> Linear(2D, D)`` before
            the block (MDTv2's U-Net-style shortcuts).
        feed_forward (`nn.Module`, *optional*): Replaces the dense MLP, e.g. a mixture-of-experts layer.
    """

    def __init__(
        self,
        dim: int,
        num_attention_heads: int,
        attention_head_dim: int,
        cond_dim: Optional[int] = None,
        ff_inner_dim: Optional[int] = None,
        mlp_ratio: float = 4.0,
        activation_fn: str = "gelu-approximate",
        attention_bias: bool = True,
        ff_bias: bool = True,
        norm_elementwise_affine: bool = False,
        norm_bias: bool = True,
        norm_eps: float = 1e-6,
        qk_norm: Optional[str] = None,
        cross_attention_dim: Optional[int] = None,
        cross_attention_heads: Optional[int] = None,
        adaln_activation: str = "silu",
        skip_connection: bool = False,
        feed_forward: Optional[nn.Module] = None,
    ):
        super().__init__()
        cond_dim = dim if cond_dim is None else cond_dim

        def norm() -> nn.LayerNorm:
            if norm_elementwise_affine:
                return nn.LayerNorm(dim, eps=norm_eps, elementwise_affine=True, bias=norm_bias)
            return nn.LayerNorm(dim, eps=norm_eps, elementwise_affine=False)

        self.skip_linear = nn.Linear(2 * dim, dim) if skip_connection else None
        self.norm1 = norm()
        self.attn1 = Attention(
            dim, num_attention_heads, attention_head_dim, bias=attention_bias, out_bias=attention_bias, qk_norm=qk_norm
        )
        if cross_attention_dim is not None:
            heads = cross_attention_heads or max(1, dim // attention_head_dim)
            self.norm2 = norm()
            self.attn2 = Attention(
                dim,
                heads,
                dim // heads,
                cross_attention_dim=cross_attention_dim,
                bias=attention_bias,
                out_bias=attention_bias,
                qk_norm=qk_norm,
            )
        else:
            self.norm2 = self.attn2 = None
        self.norm3 = norm()
        if feed_forward is None:
            inner = ff_inner_dim if ff_inner_dim is not None else int(dim * mlp_ratio)
            feed_forward = FeedForward(dim, inner, activation_fn=activation_fn, bias=ff_bias)
        self.ff = feed_forward
        self.adaln_activation = adaln_activation
        self.adaln_modulation = nn.Linear(cond_dim, 6 * dim)

    def forward(
        self,
        hidden_states: torch.Tensor,
        cond: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        encoder_hidden_states: Optional[torch.Tensor] = None,
        encoder_attention_mask: Optional[torch.Tensor] = None,
        skip: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        x = hidden_states
        if self.skip_linear is not None:
            if skip is None:
                raise ValueError("This block fuses a long skip connection: pass `skip`.")
            x = self.skip_linear(torch.cat([x, skip], dim=-1))
        mod = self.adaln_modulation(get_activation(self.adaln_activation)(cond))
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod.chunk(6, dim=-1)
        x = x + gate_msa.unsqueeze(1) * self.attn1(modulate(self.norm1(x), shift_msa, scale_msa), attention_mask=attention_mask)
        if self.attn2 is not None and encoder_hidden_states is not None:
            x = x + self.attn2(self.norm2(x), encoder_hidden_states, attention_mask=encoder_attention_mask)
        x = x + gate_mlp.unsqueeze(1) * self.ff(modulate(self.norm3(x), shift_mlp, scale_mlp))
        return x


class FinalLayer(nn.Module):
    """adaLN output layer: LayerNorm, shift/scale from the conditioning, linear to ``patch_size**2 * out_channels``.

    Args:
        dim (`int`): Token width.
        cond_dim (`int`): Conditioning width.
        patch_size (`int`): Patch side.
        out_channels (`int`): Output channels per pixel.
        adaln_activation (`str`, defaults to `"silu"`): Activation on ``cond``.
        norm_elementwise_affine (`bool`, defaults to `False`): Learnable LayerNorm scale.
        norm_eps (`float`, defaults to 1e-6): LayerNorm epsilon.
    """

    def __init__(
        self,
        dim: int,
        cond_dim: int,
        patch_size: int,
        out_channels: int,
        adaln_activation: str = "silu",
        norm_elementwise_affine: bool = False,
        norm_eps: float = 1e-6,
    ):
        super().__init__()
        if norm_elementwise_affine:
            self.norm_out = nn.LayerNorm(dim, eps=norm_eps, elementwise_affine=True, bias=False)
        else:
            self.norm_out = nn.LayerNorm(dim, eps=norm_eps, elementwise_affine=False)
        self.adaln_activation = adaln_activation
        self.adaln_modulation = nn.Linear(cond_dim, 2 * dim)
        self.proj_out = nn.Linear(dim, patch_size * patch_size * out_channels)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaln_modulation(get_activation(self.adaln_activation)(cond)).chunk(2, dim=-1)
        return self.proj_out(modulate(self.norm_out(x), shift, scale))


# ----------------------------------------------------------------------------------------------------------------
# Caption path (text conditioning)
# ----------------------------------------------------------------------------------------------------------------
class CaptionMLP(nn.Module):
    """``linear_1 -> GELU(tanh) -> LayerNorm -> linear_2``: projects caption tokens and the pooled caption.

    Args:
        in_dim (`int`): Width of the input (the text encoder's hidden size, or the model width for the pooled caption).
        dim (`int`): Output width.
        norm_eps (`float`, defaults to 1e-6): LayerNorm epsilon.
    """

    def __init__(self, in_dim: int, dim: int, norm_eps: float = 1e-6):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.norm = nn.LayerNorm(dim, eps=norm_eps, bias=False)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.norm(F.gelu(self.linear_1(x), approximate="tanh")))


class CaptionRefinerBlock(nn.Module):
    """Plain pre-norm transformer block (self-attention + SwiGLU, no timestep modulation) over caption tokens.

    Args:
        dim (`int`): Token width.
        attention_head_dim (`int`): Width of one head (``dim // attention_head_dim`` heads).
        ff_inner_dim (`int`): Hidden width of the SwiGLU MLP.
        norm_eps (`float`, defaults to 1e-6): LayerNorm and QK-norm epsilon.
    """

    def __init__(self, dim: int, attention_head_dim: int, ff_inner_dim: int, norm_eps: float = 1e-6):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps, bias=False)
        self.attn = Attention(
            dim, dim // attention_head_dim, attention_head_dim, bias=False, out_bias=False,
            qk_norm="layer_norm_across_heads", eps=norm_eps,
        )
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps, bias=False)
        self.ff = FeedForward(dim, ff_inner_dim, activation_fn="swiglu", bias=False)

    def forward(self, x: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), attention_mask=attention_mask)
        return x + self.ff(self.norm2(x))


def init_dit_weights(module: nn.Module, std: float = 0.02) -> None:
    """DiT initialisation: xavier-uniform linears with zero bias, xavier patch conv, N(0, std) embeddings, and
    zero adaLN / output projections so that every block starts as the identity (adaLN-Zero)."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, PatchEmbed):
            w = m.proj.weight
            nn.init.xavier_uniform_(w.view(w.shape[0], -1))
            if m.proj.bias is not None:
                nn.init.zeros_(m.proj.bias)
    for m in module.modules():
        if isinstance(m, LabelEmbedder):
            nn.init.normal_(m.embedding_table.weight, std=std)
        elif isinstance(m, TimestepEmbedder):
            nn.init.normal_(m.timestep_embedder.linear_1.weight, std=std)
            nn.init.normal_(m.timestep_embedder.linear_2.weight, std=std)
        elif isinstance(m, (DiTBlock, FinalLayer)):
            nn.init.zeros_(m.adaln_modulation.weight)
            nn.init.zeros_(m.adaln_modulation.bias)
            if isinstance(m, FinalLayer):
                nn.init.zeros_(m.proj_out.weight)
                nn.init.zeros_(m.proj_out.bias)


def maybe_checkpoint(owner: nn.Module, module: nn.Module, *args) -> torch.Tensor:
    """Run ``module(*args)`` through the owner's gradient-checkpointing function when enabled (diffusers'
    `enable_gradient_checkpointing`) and gradients are needed; positional arguments only, as that function takes."""
    if torch.is_grad_enabled() and getattr(owner, "gradient_checkpointing", False):
        return owner._gradient_checkpointing_func(module, *args)
    return module(*args)


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (buffers such as fixed position tables are not counted)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def swiglu_hidden_dim(dim: int, mlp_ratio: float, multiple_of: int = 1) -> int:
    """Hidden width of a SwiGLU MLP with the parameters of a two-matrix MLP of expansion ``mlp_ratio``: 2/3 of
    ``int(dim * mlp_ratio)``, rounded up to ``multiple_of`` (MicroDiT's rule)."""
    return round_up(int(2 * int(dim * mlp_ratio) / 3), multiple_of)


def round_up(value: float, multiple: int) -> int:
    """Smallest multiple of ``multiple`` that is >= ``value``."""
    return int(math.ceil(value / multiple) * multiple)
