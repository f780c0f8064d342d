"""MDTv2 (Gao et al., "Masked Diffusion Transformer is a Strong Image Synthesizer", v2) as a diffusers model."""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
import torch.nn as nn
from diffusers.configuration_utils import register_to_config
# diffusers' pipeline loader checks a component against the loading classes (ModelMixin, ...) it finds in the
# component's own module, the one model_index.json names: so ModelMixin must stay importable from here.
from diffusers.models.modeling_utils import ModelMixin  # noqa: F401

from .layers import DiTBlock, FinalLayer, init_dit_weights, maybe_checkpoint, sincos_pos_embed_2d
from .masking import TokenMask, gather_tokens, restore_tokens, route_enter, route_exit
from .transformer_base import DIT_SIZE_PRESETS, MaskedTransformer2DModel, text_block_args


#: Sizes of the official code (DiT sizes). ``num_layers`` counts encoder + decoder blocks (the side block is extra).
#: Decoder depths: XL and L use 4 (released MDTv2-XL/2 checkpoint and XL scripts), S uses 6 (the official S/2
#: script), B has no official script and uses 4; the paper and scripts disagree for S/B (sail-sg/MDT issue #39), so
#: pass ``num_decoder_layers`` to change it.
MDT_SIZE_PRESETS = {
    size: dict(config, num_decoder_layers=6 if size == "S" else 4) for size, config in DIT_SIZE_PRESETS.items()
}


def relative_position_index(grid_size: int) -> torch.Tensor:
    """(N, N) index into a ``((2G-1)**2, heads)`` table for a ``G x G`` row-major token grid (N = G*G).

    ``index[i, j] = (row_i - row_j + G - 1) * (2G - 1) + (col_i - col_j + G - 1)``: one entry per 2-D offset, so
    the bias of a pair depends only on their relative position (BEiT / Swin layout). ``index[i, j] +
    index[j, i] == (2G-1)**2 - 1`` and the diagonal is the centre entry."""
    coords = torch.arange(grid_size)
    rows = coords.repeat_interleave(grid_size)  # token i sits at (i // G, i % G)
    cols = coords.repeat(grid_size)
    d_row = rows[:, None] - rows[None, :] + grid_size - 1
    d_col = cols[:, None] - cols[None, :] + grid_size - 1
    return d_row * (2 * grid_size - 1) + d_col


def relative_position_biases(
    tables: Sequence[torch.Tensor],
    index: torch.Tensor,
    ids_keep: Optional[torch.Tensor] = None,
    dtype: Optional[torch.dtype] = None,
) -> Tuple[torch.Tensor, ...]:
    """Attention biases of several blocks in one lookup.

    Args:
        tables: One ``((2G-1)**2, heads)`` table per block.
        index: The (N, N) `relative_position_index`.
        ids_keep: (B, K) kept token ids, or `None` for all tokens.
        dtype: dtype of the returned biases (the attention's compute dtype); defaults to the tables' dtype.

    Returns:
        One contiguous bias per table, (B, heads, K, K) with ``ids_keep`` else (1, heads, N, N).

    Why one lookup: the backward of a table lookup accumulates duplicate indices serially per table row, so looking
    every block up separately with a per-sample (B, K, K) index is slow (its backward accumulates thousands of
    duplicate indices per table row; benchmarks/README.md has the profile). Here the
    tables are concatenated (one wide lookup instead of one per block), looked up with the static (N, N) index
    (each table row is used ~N*N/(2G-1)**2 times), and the kept rows/columns are then taken per sample from that
    (N, N) bias, whose backward has only ~B*(K/N)**2 duplicates per entry.

    Why `F.embedding` and not advanced indexing: indexing's backward is ``index_put_(accumulate=True)``, which on CPU
    adds with float atomics across threads once a lookup has >= 32768 elements, so two identical CPU training runs
    drifted apart (~3e-7 relative in the tables' gradients). Embedding's backward accumulates every table row in
    index order on CPU and CUDA, so identical runs are bit-identical (and no slower; timings in benchmarks/README.md).
    Compiled graphs lower either backward to atomic scatter-adds, which are not reproducible on the GPU, so bit-exact
    runs need eager mode.
    """
    heads = tables[0].shape[1]
    table = torch.cat(list(tables), dim=1) if len(tables) > 1 else tables[0]  # (T, L*heads)
    n = index.shape[0]
    bias = nn.functional.embedding(index, table)  # (N, N, L*heads)
    if ids_keep is not None:
        # Row-major (query, key) pair ids into the flattened (N*N, L*heads) bias of all tokens.
        pair_ids = ids_keep[:, :, None] * n + ids_keep[:, None, :]
        bias = nn.functional.embedding(pair_ids, bias.view(n * n, -1))  # (B, K, K, L*heads)
    else:
        bias = bias.unsqueeze(0)
    b, nq, nk, _ = bias.shape
    # One copy into (L, B, heads, Nq, Nk): each block's bias is then contiguous in the key dimension, which the
    # memory-efficient SDPA kernel needs (a strided bias sends attention to the slow math path).
    bias = bias.view(b, nq, nk, len(tables), heads).permute(3, 0, 4, 1, 2)
    dtype = dtype or table.dtype
    # A cast copies straight into the contiguous layout; without one, `.to` would return the strided view.
    bias = bias.contiguous() if dtype == bias.dtype else bias.to(dtype=dtype, memory_format=torch.contiguous_format)
    return bias.unbind(0)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype attention runs in: the autocast dtype when autocast is on, else ``x``'s dtype (also on a device
    without autocast, e.g. ``meta``)."""
    device_type = x.device.type
    # Dynamo cannot trace `is_autocast_available` in torch 2.11 (a graph break in every compiled step); a compiled
    # graph runs on a device that has autocast, so the check is only needed in eager mode.
    if not torch.compiler.is_compiling() and not torch.amp.is_autocast_available(device_type):
        return x.dtype
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return x.dtype


class RelativePositionBias(nn.Module):
    """Learnable local relative position bias: one value per 2-D offset and head, added to the attention logits.

    The model looks the tables of all its blocks up together (`relative_position_biases`); calling this module
    looks up its own table only.

    Args:
        grid_size (`int`): Tokens per side of the patch grid.
        num_heads (`int`): Attention heads (one bias per head).
    """

    def __init__(self, grid_size: int, num_heads: int):
        super().__init__()
        # The official table has 3 extra rows (BEiT's cls-token slots) that are never indexed; they are left out.
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * grid_size - 1) ** 2, num_heads))

    def forward(self, index: torch.Tensor, ids_keep: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``index`` (N, N) -> bias (1, heads, N, N); with ``ids_keep`` (B, K) -> bias (B, heads, K, K)."""
        return relative_position_biases([self.relative_position_bias_table], index, ids_keep)[0]


class MDTv2Block(DiTBlock):
    """`DiTBlock` that owns a `RelativePositionBias` table; its bias is passed to the self-attention additively.

    Args:
        grid_size (`int`): Tokens per side of the patch grid (size of the bias table).
        dim (`int`): Token width.
        num_attention_heads (`int`): Heads; the head width is ``dim // num_attention_heads``.
        **kwargs: Further `DiTBlock` arguments (``mlp_ratio``, ``norm_eps``, ``skip_connection``, ...).
    """

    def __init__(self, grid_size: int, dim: int, num_attention_heads: int, **kwargs):
        super().__init__(dim, num_attention_heads, dim // num_attention_heads, **kwargs)
        self.rel_pos_bias = RelativePositionBias(grid_size, num_attention_heads)

    def forward(
        self,
        hidden_states: torch.Tensor,
        cond: torch.Tensor,
        attention_bias: torch.Tensor,
        skip: Optional[torch.Tensor] = None,
        encoder_hidden_states: Optional[torch.Tensor] = None,
        encoder_attention_mask: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """``attention_bias``: this block's bias from `relative_position_biases` (or ``self.rel_pos_bias(index)``);
        ``encoder_hidden_states`` / ``encoder_attention_mask``: caption tokens of a text-conditioned model."""
        return super().forward(
            hidden_states, cond, attention_mask=attention_bias, encoder_hidden_states=encoder_hidden_states,
            encoder_attention_mask=encoder_attention_mask, skip=skip,
        )


class MDTv2SideInterpolater(nn.Module):
    """Training-only side-interpolater: predicts the masked tokens from the encoder's kept tokens.

    Masked places are filled with a learnable ``mask_token``, the decoder position embedding is added (``q``), one
    block with full attention predicts ``k_hat``, and the masked shortcut keeps ``q`` at visible places and uses the
    prediction only at masked places: ``out = M * k_hat + (1 - M) * q`` with ``M = 1`` for masked tokens (as the
    official code; the paper's equation swaps the two terms but its text describes this).

    Args:
        grid_size (`int`): Tokens per side.
        dim (`int`): Token width.
        num_attention_heads (`int`): Heads of the side block.
        mlp_ratio (`float`): MLP expansion of the side block.
        norm_eps (`float`): LayerNorm epsilon.
        cross_attention_dim (`int`, *optional*): Width of the caption tokens the side block cross-attends to (text
            models).
    """

    def __init__(
        self,
        grid_size: int,
        dim: int,
        num_attention_heads: int,
        mlp_ratio: float,
        norm_eps: float,
        cross_attention_dim: Optional[int] = None,
    ):
        super().__init__()
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.block = MDTv2Block(
            grid_size, dim, num_attention_heads, mlp_ratio=mlp_ratio, norm_eps=norm_eps,
            cross_attention_dim=cross_attention_dim, cross_attention_heads=num_attention_heads,
        )

    def forward(
        self,
        x_kept: torch.Tensor,
        cond: torch.Tensor,
        token_mask: TokenMask,
        pos_embed: torch.Tensor,
        attention_bias: torch.Tensor,
        text: Optional[torch.Tensor] = None,
        text_mask: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """``attention_bias``: the side block's (1, heads, N, N) relative position bias; ``text`` / ``text_mask``:
        caption tokens of a text-conditioned model."""
        x = restore_tokens(x_kept, token_mask.ids_restore, self.mask_token) + pos_embed.to(x_kept.dtype)
        x_side = self.block(x, cond, attention_bias, None, text, text_mask)
        return torch.where(token_mask.mask.unsqueeze(-1), x_side, x)


class MDTv2Transformer2DModel(MaskedTransformer2DModel):
    r"""MDTv2: the asymmetric masked diffusion transformer with a side-interpolater.

    Layout (``E = num_layers - num_decoder_layers`` encoder blocks):

    - Position-aware encoder: patch tokens + a learnable global position embedding (sin-cos init, trained); every
      block (encoder, side, decoder) adds its own learnable relative position bias to its attention logits. The
      first ``E / 2`` blocks feed U-Net-style long shortcuts into the last ``E / 2`` (LIFO pairing, fused by
      ``Linear([x, skip])`` before each receiving block).
    - Training (``mask_ratio > 0`` or ``ids_keep``): the encoder runs on the kept tokens only (the same number per
      sample); the side-interpolater (`MDTv2SideInterpolater`) fills the masked places. Inference (``mask_ratio ==
      0``): the side-interpolater is skipped and only the learnable decoder position embedding is added.
    - Decoder: ``num_decoder_layers`` blocks over all tokens; each fuses the dense input shortcut, the patch tokens +
      global positions taken *before* masking (as the official code: in the masked branch the decoder therefore
      still sees the noisy masked tokens).
    - Final adaLN layer; with ``learn_sigma`` the output has ``2 * in_channels`` channels: noise prediction, then
      the learned-range variance values (guided-diffusion / DiT; `DDPMScheduler(variance_type="learned_range")`).
    - Conditioning: class labels (the paper's, the default), or caption tokens when ``caption_channels`` is set: the
      text-encoder tokens are projected and refined (`CaptionRefinerBlock`), every encoder, side and decoder block
      cross-attends to them (after its self-attention, before its MLP), and their pooled mean is added to the
      timestep embedding of the adaLN conditioning, as DeferredMaskDiT (MicroDiT) does. The caption branch of every
      block starts at zero (adaLN-Zero). The unconditional caption of classifier-free guidance is an all-zero caption
      embedding (MicroDiT's), which the trainer's caption dropout feeds and the pipeline uses.

    MDT v1 is the same class with ``long_skip_connections=False, dense_input_shortcut=False`` (and, in training, a
    fixed mask ratio 0.3 instead of MDTv2's per-batch ``U[0.3, 0.5)`` and no timestep loss weights); the v1 release
    used ``num_decoder_layers=2``. Label dropout for classifier-free guidance is done by the trainer.

    LoRA (peft, `PeftAdapterMixin`): attention projections are ``to_q``/``to_k``/``to_v``/``to_out.0``, MLPs
    ``ff.net.0.proj``/``ff.net.2``. Sensible targets: the encoder and decoder attention; the side-interpolater
    (``side_interpolater.*``) only matters for masked training, so leave it out of an adapter meant for sampling.

    Presets (`from_preset`; official widths / depths / heads; /4 and /8 keep the /2 sizes):

    | preset | layers (enc in/out + dec) | width | heads | decoder layers | params /2 (+ side block) |
    |---|---|---|---|---|---|
    | S/2, S/4, S/8 | 12 (3/3 + 6) | 384 | 6 | 6 | 38.4M |
    | B/2, B/4, B/8 | 12 (4/4 + 4) | 768 | 12 | 4 | 150.9M |
    | L/2, L/4, L/8 | 24 (10/10 + 4) | 1024 | 16 | 4 | 507.0M |
    | XL/2, XL/4, XL/8 | 28 (12/12 + 4) | 1152 | 16 | 4 | 742.3M |

    Args:
        sample_size (`int`, defaults to 32): Height = width of the input the position tables are built for.
        patch_size (`int`, defaults to 2): Patch side.
        in_channels (`int`, defaults to 4): Input channels.
        out_channels (`int`, *optional*): Output channels; defaults to ``2 * in_channels`` with ``learn_sigma``,
            else ``in_channels``.
        hidden_size (`int`, defaults to 1152): Token width of every block.
        num_layers (`int`, defaults to 28): Encoder + decoder blocks (DiT's depth); the side block is extra.
        num_decoder_layers (`int`, defaults to 4): Decoder blocks; ``num_layers - num_decoder_layers`` must be even.
        num_attention_heads (`int`, defaults to 16): Heads of every block.
        route_start (`int`, *optional*): TREAD token routing inside the encoder (off unless a forward passes
            ``route_ratio`` / ``route_ids``): first encoder block (of the ``num_layers - num_decoder_layers``,
            in-blocks then out-blocks) the routed tokens skip; `None` = 2 (the TREAD paper's). Routing composes with
            masking (it picks among the kept tokens); the side-interpolater and the decoder always see all tokens.
            Blocks in the span look their relative position bias up for the grid positions of the tokens they see.
            Long skips compose as if the span were the identity for the routed tokens: a skip from before the span
            into it is gathered to the span's tokens; a skip from inside the span to a block after it carries the
            routed tokens' span-start values, so any span inside the encoder is valid.
        route_end (`int`, *optional*): Last encoder block the routed tokens skip (inclusive); `None` =
            ``num_layers - num_decoder_layers - 4``, shrunk to fit small encoders. Negative values count from the end.
        mlp_ratio (`float`, defaults to 4.0): MLP expansion.
        norm_eps (`float`, defaults to 1e-6): LayerNorm epsilon.
        learn_sigma (`bool`, defaults to `True`): Also predict the learned-range variance (doubles out channels).
        long_skip_connections (`bool`, defaults to `True`): MDTv2's U-Net-style encoder shortcuts (`False`: v1).
        dense_input_shortcut (`bool`, defaults to `True`): MDTv2's input shortcut into every decoder block
            (`False`: v1).
        num_classes (`int`, *optional*, defaults to 1000): Number of classes; `None` for an unconditional model.
            Id ``num_classes`` is the unconditional (null) class used by classifier-free guidance.
        class_dropout_prob (`float`, defaults to 0.1): Share of labels the trainer replaces by the null class (of
            captions by the all-zero caption, for a text model).
        caption_channels (`int`, *optional*): Text conditioning instead of classes (set ``num_classes=None``): width
            of the text-encoder tokens (``encoder_hidden_states``). `None` (the default): class conditioning only, with
            the class-conditional state dict.
        num_caption_refiner_layers (`int`, defaults to 1): Attention blocks refining the caption tokens (text models).
    """

    _no_split_modules = ["MDTv2Block", "CaptionRefinerBlock"]
    _size_presets = MDT_SIZE_PRESETS
    #: Mask ratio of MDT v1 and lower end of MDTv2's range (for training recipes).
    default_mask_ratio = 0.3
    #: MDTv2 draws one mask ratio per batch from ``U[low, high)`` (for training recipes).
    mask_ratio_range: Tuple[float, float] = (0.3, 0.5)

    @register_to_config
    def __init__(
        self,
        # Input and output.
        sample_size: int = 32, patch_size: int = 2, in_channels: int = 4, out_channels: Optional[int] = None,
        # Encoder + decoder blocks (num_layers counts both), and the encoder span that TREAD routing may skip.
        hidden_size: int = 1152, num_layers: int = 28, num_decoder_layers: int = 4, num_attention_heads: int = 16,
        route_start: Optional[int] = None, route_end: Optional[int] = None,
        mlp_ratio: float = 4.0, norm_eps: float = 1e-6, learn_sigma: bool = True,
        # MDTv2's shortcuts (both False: MDT v1).
        long_skip_connections: bool = True, dense_input_shortcut: bool = True,
        # Conditioning: class labels (the default), or caption tokens when caption_channels is set.
        num_classes: Optional[int] = 1000, class_dropout_prob: float = 0.1,
        caption_channels: Optional[int] = None, num_caption_refiner_layers: int = 1,
    ):
        super().__init__(
            widths=[("hidden_size", hidden_size, "num_attention_heads", num_attention_heads)],
            depths=[("num_layers", num_layers, 3), ("num_decoder_layers", num_decoder_layers, 1)],
        )
        num_encoder_layers = num_layers - num_decoder_layers
        if num_decoder_layers < 1 or num_encoder_layers < 2 or num_encoder_layers % 2:
            raise ValueError(
                f"num_layers - num_decoder_layers must be an even number >= 2 (encoder halves joined by long "
                f"shortcuts) and num_decoder_layers >= 1; got num_layers={num_layers}, "
                f"num_decoder_layers={num_decoder_layers}."
            )
        # Only the encoder is routed: the side-interpolater and the decoder rebuild / predict every token.
        # The global position embedding is learnable, unlike DiT's fixed table (sin-cos only initialises it).
        self._init_common(
            hidden_size, num_routed_blocks=num_encoder_layers, learnable_pos_embed=True,
            routed_blocks_name="encoder blocks (num_layers - num_decoder_layers; the decoder is never routed)",
        )
        grid = sample_size // patch_size
        half = num_encoder_layers // 2
        # Cross-attention to the caption tokens (hidden_size wide) in every block of a text-conditioned model.
        text_dim = hidden_size if caption_channels is not None else None

        def block(skip: bool) -> MDTv2Block:
            return MDTv2Block(
                grid, hidden_size, num_attention_heads, mlp_ratio=mlp_ratio, norm_eps=norm_eps, skip_connection=skip,
                cross_attention_dim=text_dim, cross_attention_heads=num_attention_heads,
            )

        self.encoder_in_blocks = nn.ModuleList([block(False) for _ in range(half)])
        self.encoder_out_blocks = nn.ModuleList([block(long_skip_connections) for _ in range(half)])
        self.side_interpolater = MDTv2SideInterpolater(
            grid, hidden_size, num_attention_heads, mlp_ratio, norm_eps, cross_attention_dim=text_dim
        )
        # Shared by the side-interpolater (training) and the plain inference path, so inference uses trained values.
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, self.num_tokens, hidden_size))
        self.decoder_blocks = nn.ModuleList([block(dense_input_shortcut) for _ in range(num_decoder_layers)])
        self.final_layer = FinalLayer(hidden_size, hidden_size, patch_size, self.out_channels, norm_eps=norm_eps)
        self.register_buffer("relative_position_index", relative_position_index(grid), persistent=False)
        self._init_weights()

    def _init_weights(self) -> None:
        init_dit_weights(self)
        grid = self.config.sample_size // self.config.patch_size
        with torch.no_grad():
            self.pos_embed.copy_(sincos_pos_embed_2d(self.config.hidden_size, grid))
            self.decoder_pos_embed.copy_(sincos_pos_embed_2d(self.config.hidden_size, grid))
        nn.init.normal_(self.side_interpolater.mask_token, std=0.02)
        for m in self.modules():
            if isinstance(m, RelativePositionBias):
                nn.init.trunc_normal_(m.relative_position_bias_table, std=0.02)
        self._init_caption_weights(zero_cross_attention=True)

    def encode(self, hidden_states: torch.Tensor, cond: torch.Tensor, token_mask: Optional[TokenMask] = None,
               route_ids: Optional[torch.Tensor] = None, text: Optional[torch.Tensor] = None,
               text_mask: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """Encoder over the kept tokens (all when ``token_mask`` is None).

        ``route_ids`` (B, K'), ids into the K kept tokens, send the others past encoder blocks ``route_span``
        (TREAD); they rejoin unchanged after the span's last block. ``text`` / ``text_mask``: the caption tokens of
        a text-conditioned model (see `encode_captions`).

        Returns ``(x, input_skip)``: encoder output (B, K, hidden_size) in ``ids_keep`` order, and the full-length
        embedded input (B, N, hidden_size) taken before masking, for the decoder's dense input shortcut."""
        x = self.embed_patches(hidden_states)
        input_skip = x
        ids_keep = None
        if token_mask is not None:
            ids_keep = token_mask.ids_keep
            x = gather_tokens(x, ids_keep)
        blocks = list(self.encoder_in_blocks) + list(self.encoder_out_blocks)
        dtype = _compute_dtype(x)
        start, end = self.route_span
        if route_ids is None:
            biases = self._biases(blocks, ids_keep, dtype)
        else:
            # The span's blocks see only the routed-through tokens: their biases are looked up for those tokens'
            # grid positions (static shape (B, heads, K', K')), the other blocks' for the kept tokens as usual.
            span_positions = route_ids if ids_keep is None else torch.gather(ids_keep, 1, route_ids)
            outside_blocks = blocks[:start] + blocks[end + 1:]
            outside = self._biases(outside_blocks, ids_keep, dtype) if outside_blocks else ()
            inside = self._biases(blocks[start:end + 1], span_positions, dtype)
            biases = outside[:start] + inside + outside[start:]
        half = len(self.encoder_in_blocks)
        text_args = text_block_args(text, text_mask)
        skips = []  # (tensor, made inside the route span)
        x_at_start = x
        for i, (blk, bias) in enumerate(zip(blocks, biases)):
            routed = route_ids is not None and start <= i <= end
            if routed and i == start:
                x_at_start = x
                x = route_enter(x, route_ids)
            if i < half:
                x = maybe_checkpoint(self, blk, x, cond, bias, None, *text_args)
                skips.append((x, routed))
            else:
                skip = None
                if self.config.long_skip_connections:
                    skip, skip_routed = skips.pop()
                    # Long skips compose as if the span were the identity for the tokens that skip it: a full skip
                    # entering the span keeps the span's tokens; a span skip leaving it gets the skipping tokens'
                    # span-start values back (what an identity block would have passed on).
                    if routed and not skip_routed:
                        skip = route_enter(skip, route_ids)
                    elif skip_routed and not routed:
                        skip = route_exit(x_at_start, skip, route_ids)
                x = maybe_checkpoint(self, blk, x, cond, bias, skip, *text_args)
            if routed and i == end:
                x = route_exit(x_at_start, x, route_ids)
        return x, input_skip

    def _biases(self, blocks, ids_keep: Optional[torch.Tensor], dtype: torch.dtype) -> Tuple[torch.Tensor, ...]:
        tables = [blk.rel_pos_bias.relative_position_bias_table for blk in blocks]
        # The lookup keeps its index for the backward. DDP re-broadcasts buffers in place before every forward, so
        # with the buffer itself a second forward before the backward (MDTv2's masked branch) would invalidate the
        # first one's graph ("modified by an inplace operation"); a copy (N*N int64) is immune.
        index = self.relative_position_index.clone()
        return relative_position_biases(tables, index, ids_keep, dtype)

    def forward_tokens(self, hidden_states: torch.Tensor, cond: torch.Tensor, token_mask: Optional[TokenMask] = None,
                       route_ids: Optional[torch.Tensor] = None, text: Optional[torch.Tensor] = None,
                       text_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Encoder on the kept tokens; side-interpolater (only with a mask) or the decoder positions; decoder over
        all tokens with the dense input shortcut (see `MaskedTransformer2DModel.forward_tokens`)."""
        x, input_skip = self.encode(hidden_states, cond, token_mask, route_ids, text, text_mask)
        # Side block (masked forwards only) and decoder blocks see all tokens: one lookup with the static index.
        blocks = ([self.side_interpolater.block] if token_mask is not None else []) + list(self.decoder_blocks)
        biases = self._biases(blocks, None, _compute_dtype(x))
        if token_mask is not None:
            x = self.side_interpolater(x, cond, token_mask, self.decoder_pos_embed, biases[0], text, text_mask)
            biases = biases[1:]
        else:
            x = x + self.decoder_pos_embed.to(x.dtype)
        skip = input_skip if self.config.dense_input_shortcut else None
        for blk, bias in zip(self.decoder_blocks, biases):
            x = maybe_checkpoint(self, blk, x, cond, bias, skip, *text_block_args(text, text_mask))
        return self.final_layer(x, cond)
