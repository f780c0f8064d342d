"""DiT (Peebles & Xie, "Scalable Diffusion Models with Transformers") with TREAD token routing (Krause et al. 2025,
"TREAD: Token Routing for Efficient Architecture-agnostic Diffusion Training") as a diffusers model."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
from diffusers.configuration_utils import register_to_config
# diffusers' pipeline loader checks a component against the loading classes (ModelMixin, ...) it finds in the
# component's own module, the one model_index.json names: so ModelMixin must stay importable from here.
from diffusers.models.modeling_utils import ModelMixin  # noqa: F401

from .layers import DiTBlock, FinalLayer, init_dit_weights, maybe_checkpoint
from .masking import DEFAULT_ROUTE_RATIO, TokenMask, run_routed_blocks
from .modeling_common import check_number_arg
from .transformer_base import DIT_SIZE_PRESETS, MaskedTransformer2DModel


class RoutedDiTTransformer2DModel(MaskedTransformer2DModel):
    r"""An unmasked DiT over all tokens that can be trained with TREAD token routing.

    Without routing (``route_ratio=0``, the default, and always at inference) this is DiT: patch tokens + fixed
    sin-cos positions, ``num_layers`` adaLN-Zero blocks, an adaLN output layer. With ``route_ratio > 0`` (training)
    a random ``route_ratio`` share of the tokens of every sample skips blocks ``route_start..route_end`` (inclusive)
    and rejoins, unchanged and in its original place, after block ``route_end``; the loss covers every token. There is
    no decoder, no extra loss and no extra parameter, and every block still runs (on the other tokens), so every
    parameter gets a gradient at every step. The kept count is the same for every sample (static shapes).

    The routing mechanism lives in `diffusers_masked.models.masking` (`run_routed_blocks`); see "Token routing" in
    the README for the defaults, taken from the TREAD paper and the official code (CompVis/tread): ratio 0.5, span
    ``2 .. num_layers - 4`` (blocks 2..8 of B/2, 2..24 of XL/2), no routing at inference.

    Relation to diffusers' `DiTTransformer2DModel`: the same network. diffusers gives every block its own copy of the
    timestep / label embedder (identical copies in converted DiT checkpoints) and uses the shifted sinusoid
    (``downscale_freq_shift=1``); this class has one shared embedder and the official DiT sinusoid by default.
    `from_diffusers_dit` converts a diffusers model (it sets ``timestep_freq_shift=1``), after which the outputs
    agree to float rounding. diffusers' model also drops labels itself in training mode; here the trainer does it.

    LoRA (peft, through diffusers' `PeftAdapterMixin`): attention projections are ``blocks.*.attn1.to_q``,
    ``to_k``, ``to_v``, ``to_out.0`` and MLPs ``blocks.*.ff.net.0.proj`` / ``ff.net.2``, as diffusers' DiT.

    Presets (`from_preset`, DiT paper sizes):

    | preset | layers | width | heads | patch | default route span |
    |---|---|---|---|---|---|
    | S/2, S/4, S/8 | 12 | 384 | 6 | 2/4/8 | 2..8 |
    | B/2, B/4, B/8 | 12 | 768 | 12 | 2/4/8 | 2..8 |
    | L/2, L/4, L/8 | 24 | 1024 | 16 | 2/4/8 | 2..20 |
    | XL/2, XL/4, XL/8 | 28 | 1152 | 16 | 2/4/8 | 2..24 |

    Args:
        hidden_size (`int`, defaults to 1152): Token width.
        num_layers (`int`, defaults to 28): Transformer blocks.
        num_attention_heads (`int`, defaults to 16): Heads per block.
        route_start (`int`, *optional*): First block the routed tokens skip; `None` = 2 (the paper's). Negative
            values count from the end.
        route_end (`int`, *optional*): Last block the routed tokens skip (inclusive); `None` = ``num_layers - 4``
            (the paper's), shrunk to fit small models. Negative values count from the end.
        mlp_ratio (`float`, defaults to 4.0): MLP expansion of the blocks.
        norm_eps (`float`, defaults to 1e-6): LayerNorm epsilon.
        learn_sigma (`bool`, defaults to `False`): Predict a variance too (doubles the output channels), as DiT with
            a DDPM ``learned_range`` scheduler.
        sample_size (`int`, defaults to 32): Height = width of the input (latent or pixel) the positions are built for.
        patch_size (`int`, defaults to 2): Patch side.
        in_channels (`int`, defaults to 4): Input channels.
        out_channels (`int`, *optional*): Output channels; defaults to ``in_channels`` (``2 * in_channels`` with
            ``learn_sigma``).
        num_classes (`int`, *optional*, defaults to 1000): Number of classes; `None` for an unconditional model.
            Id ``num_classes`` is the unconditional (null) class used by classifier-free guidance.
        class_dropout_prob (`float`, defaults to 0.1): Share of labels the trainer replaces by the null class.
        timestep_freq_shift (`float`, defaults to 0.0): ``downscale_freq_shift`` of the timestep sinusoid: 0 as the
            official DiT / MaskDiT / TREAD code, 1 as diffusers' `DiTTransformer2DModel`.
    """

    _no_split_modules = ["DiTBlock"]
    _size_presets = DIT_SIZE_PRESETS
    #: DiT has no decoder to fill removed tokens: it routes (TREAD) but never masks.
    supports_masking = False
    #: The TREAD paper's training route ratio (share of tokens that skip the span).
    default_route_ratio = DEFAULT_ROUTE_RATIO

    @register_to_config
    def __init__(
        self,
        # Blocks, and the span of them that TREAD routing may skip.
        hidden_size: int = 1152, num_layers: int = 28, num_attention_heads: int = 16,
        route_start: Optional[int] = None, route_end: Optional[int] = None,
        mlp_ratio: float = 4.0, norm_eps: float = 1e-6, learn_sigma: bool = False,
        # Input and output.
        sample_size: int = 32, patch_size: int = 2, in_channels: int = 4, out_channels: Optional[int] = None,
        # Conditioning: class labels and the timestep sinusoid.
        num_classes: Optional[int] = 1000, class_dropout_prob: float = 0.1, timestep_freq_shift: float = 0.0,
    ):
        super().__init__(
            widths=[("hidden_size", hidden_size, "num_attention_heads", num_attention_heads)],
            depths=[("num_layers", num_layers, 1)],
        )
        check_number_arg(type(self).__name__, "timestep_freq_shift", timestep_freq_shift, 0.0, 1.0)
        self._init_common(hidden_size, num_routed_blocks=num_layers, routed_blocks_name="blocks",
                          timestep_freq_shift=float(timestep_freq_shift))
        self.blocks = nn.ModuleList(
            [
                DiTBlock(hidden_size, num_attention_heads, hidden_size // num_attention_heads, mlp_ratio=mlp_ratio,
                         norm_eps=norm_eps)
                for _ in range(num_layers)
            ]
        )
        self.final_layer = FinalLayer(hidden_size, hidden_size, patch_size, self.out_channels, norm_eps=norm_eps)
        init_dit_weights(self)

    def forward_tokens(self, hidden_states: torch.Tensor, cond: torch.Tensor, token_mask: Optional[TokenMask] = None,
                       route_ids: Optional[torch.Tensor] = None, text: Optional[torch.Tensor] = None,
                       text_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """All tokens through every block, the routed ones past blocks ``route_start..route_end`` (see
        `MaskedTransformer2DModel.forward_tokens`; DiT never masks, so ``token_mask`` is always `None`)."""
        x = self.embed_patches(hidden_states)
        blocks = self.blocks
        x = run_routed_blocks(
            x, len(blocks), lambda i, t: maybe_checkpoint(self, blocks[i], t, cond), route_ids, self.route_span
        )
        return self.final_layer(x, cond)

    # ---- diffusers' DiT ----------------------------------------------------------------------------------------
    @classmethod
    def from_diffusers_dit(cls, dit: nn.Module, **overrides) -> "RoutedDiTTransformer2DModel":
        """Build this model with the weights of a diffusers `DiTTransformer2DModel` (same outputs up to rounding).

        diffusers keeps a timestep / label embedder in every block; this model has one. The converter takes block
        0's and raises a ValueError when another block's differs (a model whose blocks were trained with separate
        embedders is not a DiT this class can represent)."""
        cfg = dit.config
        heads, head_dim = cfg.num_attention_heads, cfg.attention_head_dim
        blocks = dit.transformer_blocks
        emb0 = blocks[0].norm1.emb
        if emb0 is None:
            raise ValueError("from_diffusers_dit needs a class-conditional DiTTransformer2DModel (ada_norm_zero).")
        num_classes = emb0.class_embedder.num_classes
        if emb0.class_embedder.embedding_table.num_embeddings != num_classes + 1:
            raise ValueError("The diffusers DiT has no null-class embedding (class_dropout_prob=0); this model needs "
                             "one for classifier-free guidance.")
        for i, block in enumerate(blocks[1:], start=1):
            for (name, p0), (_, p) in zip(emb0.state_dict().items(), block.norm1.emb.state_dict().items()):
                if not torch.equal(p0, p):
                    raise ValueError(
                        f"Block {i}'s timestep / label embedder ({name}) differs from block 0's; this model shares "
                        "one embedder (as DiT's official weights and their diffusers conversion do)."
                    )
        config = dict(
            sample_size=cfg.sample_size, patch_size=cfg.patch_size, in_channels=cfg.in_channels,
            out_channels=cfg.out_channels or cfg.in_channels, hidden_size=heads * head_dim, num_layers=cfg.num_layers,
            num_attention_heads=heads, num_classes=num_classes, norm_eps=cfg.norm_eps, timestep_freq_shift=1.0,
        )
        if cfg.norm_eps != 1e-6:
            # diffusers' DiT uses 1e-6 in norm1 (AdaLayerNormZero) and norm_out but norm_eps in norm3; one epsilon
            # here. The official weights were trained with 1e-6 everywhere.
            config["norm_eps"] = 1e-6
        config.update(overrides)
        model = cls(**config)
        state = {
            "patch_embed.proj.weight": dit.pos_embed.proj.weight,
            "patch_embed.proj.bias": dit.pos_embed.proj.bias,
            "time_embed.timestep_embedder.linear_1.weight": emb0.timestep_embedder.linear_1.weight,
            "time_embed.timestep_embedder.linear_1.bias": emb0.timestep_embedder.linear_1.bias,
            "time_embed.timestep_embedder.linear_2.weight": emb0.timestep_embedder.linear_2.weight,
            "time_embed.timestep_embedder.linear_2.bias": emb0.timestep_embedder.linear_2.bias,
            "class_embed.embedding_table.weight": emb0.class_embedder.embedding_table.weight,
            "final_layer.adaln_modulation.weight": dit.proj_out_1.weight,
            "final_layer.adaln_modulation.bias": dit.proj_out_1.bias,
            "final_layer.proj_out.weight": dit.proj_out_2.weight,
            "final_layer.proj_out.bias": dit.proj_out_2.bias,
        }
        for i, block in enumerate(blocks):
            src = block.state_dict()
            for key in ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "ff.net.0.proj", "ff.net.2"):
                for kind in ("weight", "bias"):
                    state[f"blocks.{i}.{key}.{kind}"] = src[f"{key}.{kind}"]
            state[f"blocks.{i}.adaln_modulation.weight"] = src["norm1.linear.weight"]
            state[f"blocks.{i}.adaln_modulation.bias"] = src["norm1.linear.bias"]
        model.load_state_dict({k: v.detach().float().clone() for k, v in state.items()}, strict=True)
        dtype = next(dit.parameters()).dtype
        return model if dtype == torch.float32 else model.to(dtype=dtype)
