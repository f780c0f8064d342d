"""DiT (Peebles & Xie, "Scalable Diffusion Models with Transformers") with TREAD token routing (Krause et al. 2025,
"TREAD: Token Routing for Efficient Architecture-agnostic Diffusion Training") as a diffusers model."""

from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn as nn
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.loaders import PeftAdapterMixin
from diffusers.models.modeling_utils import ModelMixin

from .layers import (
    DiTBlock,
    FinalLayer,
    LabelEmbedder,
    PatchEmbed,
    TimestepEmbedder,
    init_dit_weights,
    maybe_checkpoint,
    sincos_pos_embed_2d,
    unpatchify,
)
from .masking import (
    DEFAULT_ROUTE_RATIO,
    check_ids_keep,
    check_route_ratio,
    random_route_ids,
    resolve_route_span,
    run_routed_blocks,
)
from .modeling_common import (
    MaskedModelMixin,
    MaskedTransformer2DModelOutput,
    check_class_labels,
    check_common_model_args,
    check_image_input,
    check_no_text_input,
    check_number_arg,
    prepare_timestep,
)

#: DiT paper sizes (Table 1 of Peebles & Xie); patch 2, 4 or 8.
DIT_SIZE_PRESETS = {
    "S": dict(num_layers=12, hidden_size=384, num_attention_heads=6),
    "B": dict(num_layers=12, hidden_size=768, num_attention_heads=12),
    "L": dict(num_layers=24, hidden_size=1024, num_attention_heads=16),
    "XL": dict(num_layers=28, hidden_size=1152, num_attention_heads=16),
}


class RoutedDiTTransformer2DModel(MaskedModelMixin, ModelMixin, ConfigMixin, PeftAdapterMixin):
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
        sample_size (`int`, defaults to 32): Height = width of the input (latent or pixel) the positions are built for.
        patch_size (`int`, defaults to 2): Patch side.
        in_channels (`int`, defaults to 4): Input channels.
        out_channels (`int`, *optional*): Output channels; defaults to ``in_channels`` (``2 * in_channels`` with
            ``learn_sigma``).
        hidden_size (`int`, defaults to 1152): Token width.
        num_layers (`int`, defaults to 28): Transformer blocks.
        num_attention_heads (`int`, defaults to 16): Heads per block.
        mlp_ratio (`float`, defaults to 4.0): MLP expansion of the blocks.
        num_classes (`int`, *optional*, defaults to 1000): Number of classes; `None` for an unconditional model.
            Id ``num_classes`` is the unconditional (null) class used by classifier-free guidance.
        class_dropout_prob (`float`, defaults to 0.1): Share of labels the trainer replaces by the null class.
        learn_sigma (`bool`, defaults to `False`): Predict a variance too (doubles the output channels), as DiT with
            a DDPM ``learned_range`` scheduler.
        norm_eps (`float`, defaults to 1e-6): LayerNorm epsilon.
        timestep_freq_shift (`float`, defaults to 0.0): ``downscale_freq_shift`` of the timestep sinusoid: 0 as the
            official DiT / MaskDiT / TREAD code, 1 as diffusers' `DiTTransformer2DModel`.
        route_start (`int`, *optional*): First block the routed tokens skip; `None` = 2 (the paper's). Negative
            values count from the end.
        route_end (`int`, *optional*): Last block the routed tokens skip (inclusive); `None` = ``num_layers - 4``
            (the paper's), shrunk to fit small models. Negative values count from the end.
    """

    _supports_gradient_checkpointing = True
    _no_split_modules = ["DiTBlock"]
    _size_presets = DIT_SIZE_PRESETS
    #: The TREAD paper's training route ratio (share of tokens that skip the span).
    default_route_ratio = DEFAULT_ROUTE_RATIO

    @register_to_config
    def __init__(
        self,
        sample_size: int = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        out_channels: Optional[int] = None,
        hidden_size: int = 1152,
        num_layers: int = 28,
        num_attention_heads: int = 16,
        mlp_ratio: float = 4.0,
        num_classes: Optional[int] = 1000,
        class_dropout_prob: float = 0.1,
        learn_sigma: bool = False,
        norm_eps: float = 1e-6,
        timestep_freq_shift: float = 0.0,
        route_start: Optional[int] = None,
        route_end: Optional[int] = None,
    ):
        super().__init__()
        owner = type(self).__name__
        check_common_model_args(
            owner, sample_size, patch_size, in_channels, out_channels, num_classes, class_dropout_prob, norm_eps,
            widths=[("hidden_size", hidden_size, "num_attention_heads", num_attention_heads)],
            depths=[("num_layers", num_layers, 1)],
        )
        check_number_arg(owner, "mlp_ratio", mlp_ratio, 0.0, 64.0, low_open=True)
        check_number_arg(owner, "timestep_freq_shift", timestep_freq_shift, 0.0, 1.0)
        self.route_span = resolve_route_span(num_layers, route_start, route_end, owner, blocks_name="blocks")
        if out_channels is None:
            out_channels = in_channels * 2 if learn_sigma else in_channels
        self.out_channels = out_channels
        grid = sample_size // patch_size
        self.num_tokens = grid * grid

        self.patch_embed = PatchEmbed(patch_size, in_channels, hidden_size)
        self.register_buffer("pos_embed", sincos_pos_embed_2d(hidden_size, grid), persistent=False)
        self.time_embed = TimestepEmbedder(hidden_size)
        self.time_embed.time_proj.downscale_freq_shift = float(timestep_freq_shift)
        self.class_embed = LabelEmbedder(num_classes, hidden_size) if num_classes is not None else None
        self.blocks = nn.ModuleList(
            [
                DiTBlock(hidden_size, num_attention_heads, hidden_size // num_attention_heads, mlp_ratio=mlp_ratio,
                         norm_eps=norm_eps)
                for _ in range(num_layers)
            ]
        )
        self.final_layer = FinalLayer(hidden_size, hidden_size, patch_size, out_channels, norm_eps=norm_eps)
        self.gradient_checkpointing = False
        init_dit_weights(self)

    @property
    def null_class_id(self) -> Optional[int]:
        """Class id of the unconditional class (``num_classes``), or `None` for an unconditional model."""
        return self.config.num_classes

    def _check_routing(self, route_ratio: float, route_ids: Optional[torch.Tensor], mask_ratio: float,
                       ids_keep: Optional[torch.Tensor], batch_size: int) -> Optional[torch.Tensor]:
        name = type(self).__name__
        if ids_keep is not None or (not isinstance(mask_ratio, (int, float)) or isinstance(mask_ratio, bool)
                                    or mask_ratio != 0):
            raise ValueError(
                f"{name} does not mask (got mask_ratio={mask_ratio!r}{', ids_keep' if ids_keep is not None else ''}): "
                "DiT has no decoder to fill removed tokens. Use route_ratio (TREAD routing: tokens skip blocks and "
                "come back) for cheaper training, or MaskDiTTransformer2DModel for masked training."
            )
        check_route_ratio(route_ratio, name)
        if route_ids is None:
            return None
        return check_ids_keep(route_ids, batch_size, self.num_tokens, owner=f"{name} route_ids")

    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: Union[torch.Tensor, float, int],
        class_labels: Optional[torch.LongTensor] = None,
        encoder_hidden_states: Optional[torch.Tensor] = None,
        encoder_attention_mask: Optional[torch.Tensor] = None,
        mask_ratio: float = 0.0,
        generator: Optional[torch.Generator] = None,
        ids_keep: Optional[torch.LongTensor] = None,
        route_ratio: float = 0.0,
        route_ids: Optional[torch.LongTensor] = None,
        return_dict: bool = True,
    ) -> Union[MaskedTransformer2DModelOutput, tuple]:
        """
        Args:
            hidden_states (`torch.Tensor` of shape (B, in_channels, sample_size, sample_size)): Noisy input (already
                scaled by the scheduler's `scale_model_input`).
            timestep (`torch.Tensor` or number): Scalar or (B,): a DDPM step or EDM's ``c_noise``.
            class_labels (`torch.LongTensor` of shape (B,), *optional*): Class ids; ``num_classes`` = unconditional.
            encoder_hidden_states, encoder_attention_mask: Unused (no text conditioning); accepted so that every
                model of this package shares one signature.
            mask_ratio (`float`, defaults to 0.0), ids_keep: Part of the shared signature; DiT does not mask, so
                anything but 0 / None raises a ValueError that points to ``route_ratio``.
            generator (`torch.Generator`, *optional*): Makes the random route reproducible (eager mode; compiled
                training passes ``route_ids`` instead, a generator cannot be traced).
            route_ratio (`float`, defaults to 0.0): Share of tokens that skip blocks ``route_start..route_end``, in
                [0, 1). 0 at inference. The paper trains with 0.5.
            route_ids (`torch.LongTensor` of shape (B, K), *optional*): Ids of the tokens that go through the span
                (the others skip it); given, it replaces the random draw and ``route_ratio`` is ignored.
            return_dict (`bool`, defaults to `True`): Return a `MaskedTransformer2DModelOutput` or a tuple.

        Returns:
            `MaskedTransformer2DModelOutput` with ``sample`` (B, out_channels, H, W) for every token, and
            ``mask=None`` (routing removes nothing from the output).
        """
        check_image_input(self, hidden_states)
        b, _, h, w = hidden_states.shape
        route_ids = self._check_routing(route_ratio, route_ids, mask_ratio, ids_keep, b)
        check_no_text_input(self, encoder_hidden_states)
        device = hidden_states.device
        timestep = prepare_timestep(timestep, b, device)
        class_labels = check_class_labels(self, class_labels, b)

        cond = self.time_embed(timestep, hidden_states.dtype)
        if self.class_embed is not None:
            cond = cond + self.class_embed(class_labels)
        if route_ids is None and route_ratio > 0:
            route_ids = random_route_ids(b, self.num_tokens, route_ratio, device=device, generator=generator)

        x = self.patch_embed(hidden_states) + self.pos_embed.to(hidden_states.dtype)
        blocks = self.blocks
        x = run_routed_blocks(
            x, len(blocks), lambda i, t: maybe_checkpoint(self, blocks[i], t, cond), route_ids, self.route_span
        )
        x = self.final_layer(x, cond)
        sample = unpatchify(x, self.config.patch_size, self.out_channels, h, w)
        if not return_dict:
            return (sample, None)
        return MaskedTransformer2DModelOutput(sample=sample, mask=None)

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
