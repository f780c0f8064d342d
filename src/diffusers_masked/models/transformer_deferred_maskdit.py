"""DeferredMaskDiT: MicroDiT's deferred masking (Sehwag et al., "Stretching Each Dollar: Diffusion Training from
Scratch on a Micro-Budget") as a diffusers model."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn as nn
from diffusers.configuration_utils import register_to_config
# diffusers' pipeline loader checks a component against the loading classes (ModelMixin, ...) it finds in the
# component's own module, the one model_index.json names: so ModelMixin must stay importable from here.
from diffusers.models.modeling_utils import ModelMixin  # noqa: F401

from .layers import DiTBlock, FinalLayer, init_dit_weights, maybe_checkpoint, round_up, swiglu_hidden_dim
from .masking import TokenMask, gather_tokens, restore_tokens, run_routed_blocks
from .modeling_common import check_int_arg, check_number_arg
from .moe import ExpertChoiceFeedForward
from .transformer_base import MaskedTransformer2DModel


MASK_STRATEGIES = ("deferred", "naive")

#: Sizes of the official code (``MicroDiT_XL_2``, ``MicroDiT_Tiny_2``) plus a tiny size for tests and examples.
DEFERRED_MASKDIT_SIZE_PRESETS = {
    "XL": dict(
        hidden_size=1024,
        num_layers=28,
        attention_head_dim=64,
        patch_mixer_layers=6,
        patch_mixer_hidden_size=768,
        patch_mixer_mlp_ratio=4.0,
    ),
    "TINY": dict(
        hidden_size=512,
        num_layers=16,
        attention_head_dim=32,
        patch_mixer_layers=4,
        patch_mixer_hidden_size=512,
        patch_mixer_mlp_ratio=4.0,
    ),
    "DEBUG": dict(
        hidden_size=64,
        num_layers=4,
        attention_head_dim=16,
        patch_mixer_layers=2,
        patch_mixer_hidden_size=48,
        patch_mixer_mlp_ratio=2.0,
        num_experts=4,
        ff_multiple_of=16,
        caption_channels=32,
    ),
}


# ----------------------------------------------------------------------------------------------------------------
# Layer-wise scaling
# ----------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BlockWidths:
    """Widths of one transformer block under layer-wise scaling.

    Attributes:
        attention_ratio (`float`): Self-attention width / token width.
        attention_dim (`int`): Width of the q / k / v projections (``num_attention_heads * head_dim``).
        num_attention_heads (`int`): Heads of the self-attention.
        ff_ratio (`float`): Requested MLP expansion.
        ff_inner_dim (`int`): Hidden width of the dense SwiGLU MLP or of each expert.
        is_moe (`bool`): Whether the block uses the expert-choice MoE instead of the dense MLP.
    """

    attention_ratio: float
    attention_dim: int
    num_attention_heads: int
    ff_ratio: float
    ff_inner_dim: int
    is_moe: bool


def per_block_ratios(ratios: Union[float, Sequence[float]], num_layers: int) -> List[float]:
    """``(first, last)`` -> ``num_layers`` values spread linearly (``np.linspace``, as the official presets);
    a single number or exactly ``num_layers`` values are used as given."""
    if isinstance(ratios, (int, float)):
        return [float(ratios)] * num_layers
    ratios = [float(r) for r in ratios]
    if len(ratios) == num_layers:
        return ratios
    if len(ratios) == 2:
        return [float(r) for r in np.linspace(ratios[0], ratios[1], num_layers)]
    raise ValueError(
        f"Width ratios must be one number, a (first, last) pair or one value per block ({num_layers}), got {ratios}."
    )


def attention_width(dim: int, ratio: float, head_dim: int) -> int:
    """Self-attention width for ratio ``ratio``: ``int(dim * ratio)`` rounded up to a multiple of ``2 * head_dim``
    (an even number of heads), except that a ratio of exactly 1 keeps ``dim`` (official MicroDiT rule)."""
    if ratio == 1.0:
        return dim
    return 2 * head_dim * math.ceil(int(dim * ratio) / (2 * head_dim))


def ff_width(dim: int, ratio: float, multiple_of: int, moe: bool) -> int:
    """MLP hidden width: requested ``int(dim * ratio)``; a dense SwiGLU MLP keeps 2/3 of it (same parameters as a
    two-matrix MLP), experts keep all of it; both rounded up to ``multiple_of`` (official MicroDiT rule)."""
    if not moe:
        return swiglu_hidden_dim(dim, ratio, multiple_of)
    return round_up(int(dim * ratio), multiple_of)


def is_moe_block(index: int, num_layers: int, num_experts: int, experts_every_n: int, is_patch_mixer: bool) -> bool:
    """Every ``experts_every_n``-th block (1-based) is MoE; the backbone's last block never is, the patch-mixer's
    first block never is (official placement: backbone 1, 3, ..., 25 of 28; mixer 1, 3, 5 of 6)."""
    if num_experts <= 0 or experts_every_n <= 0 or (index + 1) % experts_every_n:
        return False
    return index >= 1 if is_patch_mixer else index < num_layers - 1


def layerwise_block_widths(
    hidden_size: int,
    num_layers: int,
    attention_head_dim: int,
    attention_ratios: Union[float, Sequence[float]] = (0.5, 1.0),
    ff_ratios: Union[float, Sequence[float]] = (0.5, 4.0),
    ff_multiple_of: int = 256,
    num_experts: int = 8,
    experts_every_n: int = 2,
    is_patch_mixer: bool = False,
) -> List[BlockWidths]:
    """Per-block widths of a stack under layer-wise scaling (attention and MLP widths grow linearly with depth).

    For ``MicroDiT_XL_2`` (1024 wide, 28 blocks, head 64, ratios 0.5->1.0 and 0.5->4.0) block 0 has 512-wide
    attention (8 heads) and a 512-wide SwiGLU, block 27 1024-wide attention (16 heads) and a 2816-wide SwiGLU.
    """
    att = per_block_ratios(attention_ratios, num_layers)
    ff = per_block_ratios(ff_ratios, num_layers)
    widths = []
    for i in range(num_layers):
        moe = is_moe_block(i, num_layers, num_experts, experts_every_n, is_patch_mixer)
        att_dim = attention_width(hidden_size, att[i], attention_head_dim)
        widths.append(
            BlockWidths(
                attention_ratio=att[i],
                attention_dim=att_dim,
                num_attention_heads=att_dim // attention_head_dim,
                ff_ratio=ff[i],
                ff_inner_dim=ff_width(hidden_size, ff[i], ff_multiple_of, moe),
                is_moe=moe,
            )
        )
    return widths


def _patch_mixer_map(in_dim: int, out_dim: int, norm_eps: float) -> nn.Module:
    # LayerNorm + Linear between the backbone width and the mixer width; nothing when they are equal (official).
    if in_dim == out_dim:
        return nn.Identity()
    return nn.Sequential(nn.LayerNorm(in_dim, eps=norm_eps, bias=False), nn.Linear(in_dim, out_dim, bias=False))


# ----------------------------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------------------------
class DeferredMaskDiTTransformer2DModel(MaskedTransformer2DModel):
    r"""MicroDiT: a light patch-mixer over all tokens, then random masking, then the backbone on the kept tokens.

    Training (``mask_ratio > 0``, 0.75 in the paper): patch tokens (+ fixed sin-cos positions) go through the
    patch-mixer (a few transformer blocks) over ALL tokens, so every token carries information about the whole image;
    only then are tokens masked ("deferred masking"), keeping the same number per sample, and the backbone runs on
    the kept tokens only. There is no decoder and no extra loss: the prediction at masked positions is zero (in
    output space, as the official code) and the loss uses kept tokens only (``output.mask`` marks them).
    ``mask_strategy="naive"`` masks before the patch-mixer instead (the paper's baseline). Inference
    (``mask_ratio == 0``) runs mixer and backbone over all tokens.

    Backbone: layer-wise scaling (attention and MLP widths grow linearly over depth, `layerwise_block_widths`),
    expert-choice mixture-of-experts MLPs in every second block but the last (`ExpertChoiceFeedForward`), SwiGLU dense
    MLPs, QK-LayerNorm across heads, LayerNorms with a learnable scale and no bias, GELU(tanh) adaLN.
    Conditioning: text-encoder caption tokens are projected, refined by ``num_caption_refiner_layers`` attention
    blocks and cross-attended by every mixer and backbone block; their (masked) mean, through an MLP, is added to
    the sinusoidal timestep embedding to form the adaLN conditioning. Class labels (``num_classes``) replace text as
    an alternative, so the same model serves class-conditional data.

    The model is a raw network: what ``sample`` means is fixed by the scheduler it is trained and sampled with
    (EDM with ``sigma_data=0.9`` and ``prediction_type="epsilon"`` preconditioning by default, as the paper).

    LoRA (peft, through diffusers' `PeftAdapterMixin`): attention projections are named ``to_q``, ``to_k``, ``to_v``,
    ``to_out.0`` (``attn1`` self-, ``attn2`` cross-attention), dense MLPs ``ff.net.0.proj`` / ``ff.net.2``, MoE
    routers ``ff.router``; expert weights are batched ``(experts, in, out)`` tensors ``ff.experts.up_proj`` /
    ``ff.experts.down_proj`` that peft's ``target_parameters`` can adapt.

    Presets (`from_preset`; patch 2, 4 or 8; ``caption_channels`` 1024 = the paper's OpenCLIP ViT-H text features):

    | preset | backbone layers x width | head dim | attention ratio | MLP ratio | patch-mixer | experts | params (/2) |
    |---|---|---|---|---|---|---|---|
    | XL/2 (MicroDiT_XL_2) | 28 x 1024 | 64 | 0.5 -> 1.0 | 0.5 -> 4.0 | 6 x 768, MLP 4.0 | 8, capacity 2 | 1,165,442,320 |
    | Tiny/2 (MicroDiT_Tiny_2) | 16 x 512 | 32 | 0.5 -> 1.0 | 0.5 -> 4.0 | 4 x 512, MLP 4.0 | 8, capacity 2 | 200,692,752 |
    | Debug/2 (tests) | 4 x 64 | 16 | 0.5 -> 1.0 | 0.5 -> 4.0 | 2 x 48, MLP 2.0 | 4, capacity 2 | 588,384 |

    Args:
        sample_size (`int`, defaults to 32): Height = width of the input (latent or pixel) the positions are built for.
        patch_size (`int`, defaults to 2): Patch side.
        in_channels (`int`, defaults to 4): Input channels.
        out_channels (`int`, *optional*): Output channels; defaults to ``in_channels``.
        hidden_size (`int`, defaults to 1024): Backbone token width.
        num_layers (`int`, defaults to 28): Backbone blocks.
        attention_head_dim (`int`, defaults to 64): Width of one attention head (the head count varies per block).
        ff_multiple_of (`int`, defaults to 256): MLP hidden widths are rounded up to a multiple of this.
        attention_ratios (`tuple` or `list` of `float`, defaults to `(0.5, 1.0)`): Self-attention width / token width:
            a (first, last) pair spread linearly over the backbone blocks, or one value per block.
        ff_ratios (`tuple` or `list` of `float`, defaults to `(0.5, 4.0)`): Requested MLP expansion, same format.
        route_start (`int`, *optional*): TREAD token routing inside the backbone (off unless a forward passes
            ``route_ratio`` / ``route_ids``): first backbone block the routed tokens skip; `None` = 2 (the TREAD
            paper's). The patch-mixer is never routed: routing starts after the deferred mask and picks among the
            tokens it kept. MoE blocks in the span see fewer tokens; expert-choice capacity is computed from that
            (static) count, so shapes stay static.
        route_end (`int`, *optional*): Last backbone block the routed tokens skip (inclusive); `None` =
            ``num_layers - 4``, shrunk to fit small backbones. Negative values count from the end.
        num_experts (`int`, defaults to 8): Experts per MoE MLP; 0 makes every MLP dense.
        expert_capacity (`float`, defaults to 2.0): Capacity factor: each expert takes
            ``int(expert_capacity * tokens / num_experts)`` tokens, so a token gets this many experts on average.
        experts_every_n (`int`, defaults to 2): Every n-th block is MoE (the backbone's last block never is).
        patch_mixer_layers (`int`, defaults to 6): Patch-mixer blocks (0 = no mixer: deferred and naive masking agree).
        patch_mixer_hidden_size (`int`, defaults to 768): Patch-mixer width (mapped in from and out to
            ``hidden_size`` with LayerNorm + Linear when different).
        patch_mixer_attention_ratio (`float`, defaults to 1.0): Patch-mixer self-attention width / mixer width.
        patch_mixer_mlp_ratio (`float`, defaults to 4.0): Patch-mixer MLP expansion.
        mask_strategy (`str`, defaults to `"deferred"`): ``"deferred"`` masks after the patch-mixer (MicroDiT),
            ``"naive"`` before it.
        caption_channels (`int`, *optional*, defaults to 1024): Width of the text-encoder tokens
            (``encoder_hidden_states``); `None` for a model without text conditioning.
        num_caption_refiner_layers (`int`, defaults to 1): Attention blocks refining the caption tokens.
        caption_refiner_mlp_ratio (`float`, defaults to 4.0): MLP expansion of the caption refiner (SwiGLU, 2/3 of it).
        num_classes (`int`, *optional*): Number of classes for class conditioning instead of text (set
            ``caption_channels=None``); id ``num_classes`` is the unconditional (null) class.
        class_dropout_prob (`float`, defaults to 0.1): Share of labels / captions the trainer replaces by the null
            class / an all-zero caption (classifier-free guidance).
        timestep_frequency_dim (`int`, defaults to 512): Sinusoidal timestep features.
        pos_interpolation_scale (`float`, defaults to 1.0): Divides the sin-cos positions (2.0 for 512 px in the paper).
        attention_bias (`bool`, defaults to `False`): Biases in attention, MLP and mixer-map linears.
        norm_eps (`float`, defaults to 1e-6): LayerNorm epsilon.

    Older versions had a ``train_mask_ratio`` config key; it is a training setting (the recipe's ``--mask_ratio``,
    paper default `default_mask_ratio`), and saved configs that still carry it load with a note that it is ignored.
    """

    _no_split_modules = ["DiTBlock", "CaptionRefinerBlock"]
    _size_presets = DEFERRED_MASKDIT_SIZE_PRESETS
    #: The paper's training mask ratio (for training recipes; `forward` masks only what it is asked to).
    default_mask_ratio = 0.75
    _retired_config_keys = {
        "train_mask_ratio": "the training mask ratio is a training setting (the recipe's --mask_ratio; the paper's "
        "0.75 is DeferredMaskDiTTransformer2DModel.default_mask_ratio), not part of the model.",
    }

    @register_to_config
    def __init__(
        self,
        # Input and output.
        sample_size: int = 32, patch_size: int = 2, in_channels: int = 4, out_channels: Optional[int] = None,
        # Backbone (the kept tokens) with layer-wise scaling, and the span of it that TREAD routing may skip.
        hidden_size: int = 1024, num_layers: int = 28, attention_head_dim: int = 64, ff_multiple_of: int = 256,
        attention_ratios: Sequence[float] = (0.5, 1.0), ff_ratios: Sequence[float] = (0.5, 4.0),
        route_start: Optional[int] = None, route_end: Optional[int] = None,
        # Expert-choice mixture of experts in every experts_every_n-th block.
        num_experts: int = 8, expert_capacity: float = 2.0, experts_every_n: int = 2,
        # Patch-mixer over all tokens, and where the mask goes.
        patch_mixer_layers: int = 6, patch_mixer_hidden_size: int = 768, patch_mixer_attention_ratio: float = 1.0,
        patch_mixer_mlp_ratio: float = 4.0, mask_strategy: str = "deferred",
        # Conditioning: caption tokens (or class labels) and the timestep.
        caption_channels: Optional[int] = 1024, num_caption_refiner_layers: int = 1, caption_refiner_mlp_ratio: float = 4.0,
        num_classes: Optional[int] = None, class_dropout_prob: float = 0.1, timestep_frequency_dim: int = 512,
        pos_interpolation_scale: float = 1.0, attention_bias: bool = False, norm_eps: float = 1e-6,
    ):
        super().__init__(
            widths=[("hidden_size", hidden_size, None, None),
                    ("patch_mixer_hidden_size", patch_mixer_hidden_size, None, None)],
            depths=[("num_layers", num_layers, 1), ("patch_mixer_layers", patch_mixer_layers, 0)],
        )
        owner = type(self).__name__
        check_int_arg(owner, "attention_head_dim", attention_head_dim, limit="width")
        check_int_arg(owner, "ff_multiple_of", ff_multiple_of, limit="width")
        check_int_arg(owner, "num_experts", num_experts, minimum=0, limit="experts")
        check_int_arg(owner, "experts_every_n", experts_every_n, minimum=0, limit="layers")
        check_int_arg(owner, "timestep_frequency_dim", timestep_frequency_dim, minimum=2, limit="width")
        check_number_arg(owner, "expert_capacity", expert_capacity, 0.0, low_open=True)
        check_number_arg(owner, "pos_interpolation_scale", pos_interpolation_scale, 0.0, low_open=True)
        for name, ratios in (("attention_ratios", attention_ratios), ("ff_ratios", ff_ratios),
                             ("patch_mixer_attention_ratio", patch_mixer_attention_ratio),
                             ("patch_mixer_mlp_ratio", patch_mixer_mlp_ratio),
                             ("caption_refiner_mlp_ratio", caption_refiner_mlp_ratio)):
            for ratio in ratios if isinstance(ratios, (list, tuple)) else [ratios]:
                check_number_arg(owner, name, ratio, 0.0, 64.0, low_open=True)
        if mask_strategy not in MASK_STRATEGIES:
            raise ValueError(f"mask_strategy must be one of {MASK_STRATEGIES}, got {mask_strategy!r}.")
        for name, width in (("hidden_size", hidden_size), ("patch_mixer_hidden_size", patch_mixer_hidden_size)):
            if width % attention_head_dim:
                raise ValueError(f"{name}={width} must be divisible by attention_head_dim={attention_head_dim}.")

        # Inputs and conditioning (the caption path when text-conditioned).
        self._init_common(
            hidden_size, num_routed_blocks=num_layers, routed_blocks_name="backbone blocks",
            pos_interpolation_scale=pos_interpolation_scale, timestep_frequency_dim=timestep_frequency_dim,
            timestep_act_fn="gelu-approximate", caption_head_dim=attention_head_dim,
            caption_ff_inner_dim=ff_width(hidden_size, caption_refiner_mlp_ratio, ff_multiple_of, moe=False),
        )
        mixer_dim = patch_mixer_hidden_size if patch_mixer_layers > 0 else hidden_size
        text_dim = hidden_size if caption_channels is not None else None

        # Patch-mixer (all tokens), with maps from / to the backbone width.
        self.patch_mixer_proj_in = _patch_mixer_map(hidden_size, mixer_dim, norm_eps)
        self.patch_mixer_proj_out = _patch_mixer_map(mixer_dim, hidden_size, norm_eps)
        self.patch_mixer_caption_proj = (
            _patch_mixer_map(hidden_size, mixer_dim, norm_eps) if text_dim is not None else None
        )
        mixer_widths = layerwise_block_widths(
            mixer_dim, patch_mixer_layers, attention_head_dim, patch_mixer_attention_ratio, patch_mixer_mlp_ratio,
            ff_multiple_of, num_experts, experts_every_n, is_patch_mixer=True,
        )
        self.patch_mixer_blocks = nn.ModuleList(
            [self._make_block(mixer_dim, w, mixer_dim if text_dim else None) for w in mixer_widths]
        )

        # Backbone (kept tokens only while training).
        self.block_widths = layerwise_block_widths(
            hidden_size, num_layers, attention_head_dim, attention_ratios, ff_ratios, ff_multiple_of, num_experts,
            experts_every_n,
        )
        self.transformer_blocks = nn.ModuleList(
            [self._make_block(hidden_size, w, text_dim) for w in self.block_widths]
        )
        self.final_layer = FinalLayer(
            hidden_size, hidden_size, patch_size, self.out_channels,
            adaln_activation="gelu-approximate", norm_elementwise_affine=True, norm_eps=norm_eps,
        )
        self._init_weights()

    def _make_block(self, dim: int, widths: BlockWidths, cross_attention_dim: Optional[int]) -> DiTBlock:
        cfg = self.config
        moe = None
        if widths.is_moe:
            moe = ExpertChoiceFeedForward(dim, widths.ff_inner_dim, cfg.num_experts, cfg.expert_capacity)
        return DiTBlock(
            dim,
            widths.num_attention_heads,
            cfg.attention_head_dim,
            cond_dim=cfg.hidden_size,
            ff_inner_dim=widths.ff_inner_dim,
            activation_fn="swiglu",
            attention_bias=cfg.attention_bias,
            ff_bias=cfg.attention_bias,
            norm_elementwise_affine=True,
            norm_bias=False,
            norm_eps=cfg.norm_eps,
            qk_norm="layer_norm_across_heads",
            cross_attention_dim=cross_attention_dim,
            cross_attention_heads=dim // cfg.attention_head_dim if cross_attention_dim else None,
            adaln_activation="gelu-approximate",
            feed_forward=moe,
        )

    def _init_weights(self) -> None:
        init_dit_weights(self)  # xavier linears, adaLN-Zero, zero output layer
        self._init_caption_weights()
        trunc = nn.init.trunc_normal_
        # Official "depth init": output projections of block i get std 0.02 / sqrt(2 (i + 1)); mixer blocks use
        # the backbone's last value.
        stacks = [(self.transformer_blocks, None), (self.patch_mixer_blocks, self.config.num_layers)]
        for blocks, fixed_depth in stacks:
            for i, block in enumerate(blocks):
                out_std = 0.02 / math.sqrt(2 * (fixed_depth if fixed_depth is not None else i + 1))
                for attn in (block.attn1, block.attn2):
                    if attn is None:
                        continue
                    for lin in (attn.to_q, attn.to_k, attn.to_v):
                        trunc(lin.weight, std=0.02)
                    trunc(attn.to_out[0].weight, std=out_std)
                if isinstance(block.ff, ExpertChoiceFeedForward):
                    trunc(block.ff.router.weight, std=0.02)
                    trunc(block.ff.experts.up_proj, std=0.02)
                    trunc(block.ff.experts.down_proj, std=out_std)
                else:
                    trunc(block.ff.net[0].proj.weight, std=0.02)
                    trunc(block.ff.net[2].weight, std=out_std)

    def forward_tokens(self, hidden_states: torch.Tensor, cond: torch.Tensor, token_mask: Optional[TokenMask] = None,
                       route_ids: Optional[torch.Tensor] = None, text: Optional[torch.Tensor] = None,
                       text_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Patch-mixer over all tokens, the mask (after the mixer, or before it with ``mask_strategy="naive"``),
        backbone on the kept tokens; no decoder: masked tokens get a zero prediction and are left out of the loss
        (see `MaskedTransformer2DModel.forward_tokens`)."""
        mixer_text = self.patch_mixer_caption_proj(text) if text is not None else None
        deferred = self.config.mask_strategy == "deferred"
        x = self.embed_patches(hidden_states)
        if token_mask is not None and not deferred:
            x = gather_tokens(x, token_mask.ids_keep)
        x = self.patch_mixer_proj_in(x)
        for block in self.patch_mixer_blocks:
            x = maybe_checkpoint(self, block, x, cond, None, mixer_text, text_mask)
        if token_mask is not None and deferred:
            # Deferred masking: every kept token has already mixed with all tokens.
            x = gather_tokens(x, token_mask.ids_keep)
        x = self.patch_mixer_proj_out(x)
        blocks = self.transformer_blocks
        x = run_routed_blocks(
            x, len(blocks), lambda i, t: maybe_checkpoint(self, blocks[i], t, cond, None, text, text_mask), route_ids,
            self.route_span,
        )
        x = self.final_layer(x, cond)
        if token_mask is not None:
            x = restore_tokens(x, token_mask.ids_restore, x.new_zeros(x.shape[-1]))
        return x
