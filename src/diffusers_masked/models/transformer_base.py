"""The base class of this package's diffusion transformers: everything around their blocks, written once.

MaskDiT, MDTv2, DeferredMaskDiT and the routed DiT share their inputs (patch tokens + positions), their conditioning
(timestep + class, or a caption), how a forward is told which tokens to keep (``ids_keep`` / a `TokenMask`) and which
to route past a span of blocks (``route_ids``), and their output (unpatchified prediction + mask). A model file keeps
only what its paper adds: its blocks, and `MaskedTransformer2DModel.forward_tokens`, the path of the tokens through
them.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from diffusers.configuration_utils import ConfigMixin
from diffusers.loaders import PeftAdapterMixin
from diffusers.models.modeling_utils import ModelMixin

from .layers import (
    CaptionMLP,
    CaptionRefinerBlock,
    DiTBlock,
    LabelEmbedder,
    PatchEmbed,
    TimestepEmbedder,
    maybe_checkpoint,
    sincos_pos_embed_2d,
    swiglu_hidden_dim,
    unpatchify,
)
from .masking import (
    TokenMask,
    check_ids_keep,
    check_mask_ratio,
    check_route_ratio,
    check_token_mask,
    random_token_mask,
    resolve_route_ids,
    resolve_route_span,
    token_mask_from_ids_keep,
)
from .modeling_common import (
    MaskedModelMixin,
    MaskedTransformer2DModelOutput,
    check_class_labels,
    check_common_model_args,
    check_image_input,
    check_int_arg,
    check_no_text_input,
    check_number_arg,
    prepare_timestep,
    training_mask_ratio_hint,
)

#: DiT paper sizes (Table 1 of Peebles & Xie), shared by the DiT-shaped models (DiT, MaskDiT's encoder, MDTv2).
DIT_SIZE_PRESETS = {
    "S": dict(num_layers=12, hidden_size=384, num_attention_heads=6),
    "B": dict(num_layers=12, hidden_size=768, num_attention_heads=12),
    "L": dict(num_layers=24, hidden_size=1024, num_attention_heads=16),
    "XL": dict(num_layers=28, hidden_size=1152, num_attention_heads=16),
}

#: (name, width, heads name, heads) of an attention stack / (name, layers, minimum) of a block stack, for the checks.
WidthSpec = Tuple[str, int, Optional[str], Optional[int]]
DepthSpec = Tuple[str, int, int]


class MaskedTransformer2DModel(MaskedModelMixin, ModelMixin, ConfigMixin, PeftAdapterMixin):
    r"""Base class of the masked (and routed) diffusion transformers of this package.

    A subclass is a diffusers model with ``@register_to_config`` on its ``__init__``, whose config has at least
    ``sample_size``, ``patch_size``, ``in_channels``, ``out_channels``, ``num_classes``, ``class_dropout_prob``,
    ``norm_eps``, ``route_start`` and ``route_end`` (optionally ``learn_sigma``, ``mlp_ratio``, ``caption_channels``,
    ``num_caption_refiner_layers``). Its ``__init__`` calls ``super().__init__(widths, depths)`` first (the shared
    checks, before any weight is allocated), then `_init_common` (route span, token grid, patch / position / timestep
    / class embedders and the caption path), then builds its blocks; it implements `forward_tokens`.

    One `forward` serves every subclass:

    1. checks the input, the mask, the routing and the conditioning;
    2. the kept tokens: ``ids_keep`` (or a `TokenMask`) as given; or, as a convenience, a random mask drawn here from
       ``mask_ratio`` and ``generator`` (the one place a model draws a mask; a trainer that compiles the model draws
       ``ids_keep`` itself, with `masking.random_ids_keep`, since a generator cannot be traced);
    3. the conditioning: ``time_embed(t)`` + ``class_embed(y)`` or, for a text-conditioned model, + the pooled caption;
       the caption tokens themselves go to the blocks' cross-attention;
    4. the route: ``route_ids`` as given, or drawn from ``route_ratio`` and ``generator``;
    5. `forward_tokens` (the model's own part), then unpatchify and the mask.

    Masking and routing are done when asked for, in training and eval mode alike; nothing is masked or routed unless
    asked (the forward's defaults are 0 / None, and inference passes neither). The paper defaults a training recipe
    uses are class attributes (`default_mask_ratio`, `mask_ratio_range`), never applied by the model itself.
    """

    _supports_gradient_checkpointing = True
    #: Whether the model can drop tokens (it has a decoder, or a loss on the kept tokens only). A model that cannot
    #: refuses ``mask_ratio`` / ``ids_keep`` with a message pointing to routing.
    supports_masking: bool = True
    #: The paper's training mask ratio, for training recipes and messages; `forward` never applies it.
    default_mask_ratio: Optional[float] = None
    #: A paper's per-batch mask ratio range ``[low, high)`` (MDTv2), for training recipes and messages.
    mask_ratio_range: Optional[Tuple[float, float]] = None

    # ------------------------------------------------------------------------------------------------------------
    # Construction
    # ------------------------------------------------------------------------------------------------------------
    def __init__(self, widths: Sequence[WidthSpec] = (), depths: Sequence[DepthSpec] = ()):
        """The shared constructor preamble, run by a subclass's ``__init__`` first (``@register_to_config`` has set
        ``self.config`` by then): checks of the shared config keys and of the subclass's attention stacks
        (``widths``) and block stacks (``depths``), before any weight is allocated."""
        super().__init__()
        cfg = self.config
        owner = type(self).__name__
        check_common_model_args(
            owner, cfg.sample_size, cfg.patch_size, cfg.in_channels, cfg.out_channels, cfg.num_classes,
            cfg.class_dropout_prob, cfg.norm_eps, widths=widths, depths=depths,
        )
        if "mlp_ratio" in cfg:
            check_number_arg(owner, "mlp_ratio", cfg.mlp_ratio, 0.0, 64.0, low_open=True)
        caption_channels = cfg.get("caption_channels")
        check_int_arg(owner, "caption_channels", caption_channels, limit="width", allow_none=True)
        if "num_caption_refiner_layers" in cfg:
            check_int_arg(owner, "num_caption_refiner_layers", cfg.num_caption_refiner_layers, minimum=0,
                          limit="layers")
        if caption_channels is not None and cfg.num_classes is not None:
            raise ValueError(
                f"{owner}: use either text conditioning (caption_channels) or class conditioning (num_classes), not "
                "both: pass caption_channels=None for a class-conditional model, or num_classes=None for a "
                "text-conditioned one."
            )

    def _init_common(
        self,
        hidden_size: int,
        num_routed_blocks: int,
        routed_blocks_name: str,
        learnable_pos_embed: bool = False,
        pos_interpolation_scale: float = 1.0,
        timestep_frequency_dim: int = 256,
        timestep_act_fn: str = "silu",
        timestep_freq_shift: float = 0.0,
        caption_head_dim: Optional[int] = None,
        caption_ff_inner_dim: Optional[int] = None,
    ) -> None:
        """Route span, token grid, output channels and the shared input / conditioning modules.

        Registers, in this order (the order fixes the random initialisation): ``patch_embed``; ``pos_embed`` (a fixed
        sin-cos buffer, or a learnable parameter initialised later by the model); ``time_embed``; ``class_embed``
        (`None` without classes); for a text-conditioned model ``caption_projection``, ``caption_refiner`` and
        ``caption_pooled_projection`` (else all `None`).

        Args:
            hidden_size (`int`): Width of the patch tokens and of the conditioning vector.
            num_routed_blocks (`int`): Blocks of the stack TREAD routing may span (``route_start`` / ``route_end``).
            routed_blocks_name (`str`): That stack's name in messages (e.g. "encoder blocks").
            learnable_pos_embed (`bool`, defaults to `False`): A learnable (MDTv2) instead of a fixed table.
            pos_interpolation_scale (`float`, defaults to 1.0): Divides the fixed sin-cos positions.
            timestep_frequency_dim (`int`, defaults to 256): Sinusoidal timestep features.
            timestep_act_fn (`str`, defaults to `"silu"`): Activation of the timestep MLP.
            timestep_freq_shift (`float`, defaults to 0.0): ``downscale_freq_shift`` of the timestep sinusoid.
            caption_head_dim (`int`, *optional*): Head width of the caption refiner (text-conditioned models);
                defaults to ``hidden_size // num_attention_heads``.
            caption_ff_inner_dim (`int`, *optional*): SwiGLU width of the caption refiner (text-conditioned models);
                defaults to `swiglu_hidden_dim` of ``hidden_size`` and ``mlp_ratio``.
        """
        cfg = self.config
        self.route_span = resolve_route_span(
            num_routed_blocks, cfg.route_start, cfg.route_end, type(self).__name__, blocks_name=routed_blocks_name
        )
        out_channels = cfg.out_channels
        if out_channels is None:
            out_channels = cfg.in_channels * 2 if cfg.get("learn_sigma", False) else cfg.in_channels
        self.out_channels = out_channels
        grid = cfg.sample_size // cfg.patch_size
        self.num_tokens = grid * grid

        self.patch_embed = PatchEmbed(cfg.patch_size, cfg.in_channels, hidden_size)
        if learnable_pos_embed:
            self.pos_embed = nn.Parameter(torch.zeros(1, self.num_tokens, hidden_size))
        else:
            table = sincos_pos_embed_2d(hidden_size, grid, pos_interpolation_scale)
            self.register_buffer("pos_embed", table, persistent=False)
        self.time_embed = TimestepEmbedder(hidden_size, timestep_frequency_dim, timestep_act_fn, timestep_freq_shift)
        self.class_embed = LabelEmbedder(cfg.num_classes, hidden_size) if cfg.num_classes is not None else None
        if self.is_text_conditioned:
            if caption_head_dim is None:
                caption_head_dim = hidden_size // cfg.num_attention_heads
            if caption_ff_inner_dim is None:
                caption_ff_inner_dim = swiglu_hidden_dim(hidden_size, cfg.get("mlp_ratio", 4.0))
            self.caption_projection = CaptionMLP(cfg.caption_channels, hidden_size, cfg.norm_eps)
            self.caption_refiner = nn.ModuleList(
                [
                    CaptionRefinerBlock(hidden_size, caption_head_dim, caption_ff_inner_dim, cfg.norm_eps)
                    for _ in range(cfg.num_caption_refiner_layers)
                ]
            )
            self.caption_pooled_projection = CaptionMLP(hidden_size, hidden_size, cfg.norm_eps)
        else:
            self.caption_projection = self.caption_refiner = self.caption_pooled_projection = None
        self.gradient_checkpointing = False

    def _init_caption_weights(self, zero_cross_attention: bool = False) -> None:
        """Caption MLPs ~ N(0, 0.02); the caption refiner starts as the identity (zero output projections), so a fresh
        model sees the projected text-encoder features. With ``zero_cross_attention`` (DiT-style models) every
        block's caption cross-attention starts at zero too (`_zero_init_cross_attention`). Nothing without text
        conditioning."""
        if zero_cross_attention:
            self._zero_init_cross_attention()
        for mlp in (self.caption_projection, self.caption_pooled_projection):
            if mlp is not None:
                nn.init.normal_(mlp.linear_1.weight, std=0.02)
                nn.init.normal_(mlp.linear_2.weight, std=0.02)
        for block in self.caption_refiner or []:
            nn.init.zeros_(block.attn.to_out[0].weight)
            nn.init.zeros_(block.ff.net[2].weight)

    def _zero_init_cross_attention(self) -> None:
        """Zero the output projection of every caption cross-attention (DiT-style models): a fresh text-conditioned
        model then starts with every block the identity, as adaLN-Zero intends. Nothing without text conditioning."""
        for module in self.modules():
            if isinstance(module, DiTBlock) and module.attn2 is not None:
                nn.init.zeros_(module.attn2.to_out[0].weight)
                if module.attn2.to_out[0].bias is not None:
                    nn.init.zeros_(module.attn2.to_out[0].bias)

    # ------------------------------------------------------------------------------------------------------------
    # Conditioning
    # ------------------------------------------------------------------------------------------------------------
    @property
    def null_class_id(self) -> Optional[int]:
        """Class id of the unconditional class (``num_classes``), or `None` for a model without classes."""
        return self.config.num_classes

    @property
    def is_text_conditioned(self) -> bool:
        """Whether the model reads caption tokens (``caption_channels`` set)."""
        return self.config.get("caption_channels") is not None

    def embed_patches(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> patch tokens + positions (B, N, hidden_size), in row-major grid order."""
        return self.patch_embed(hidden_states) + self.pos_embed.to(hidden_states.dtype)

    def embed_condition(
        self, timestep: torch.Tensor, class_labels: Optional[torch.Tensor], dtype: torch.dtype
    ) -> torch.Tensor:
        """Conditioning vector ``time_embed(t) (+ class_embed(y))``, shape (B, hidden_size); a text-conditioned
        `forward` adds the pooled caption of `encode_captions`."""
        cond = self.time_embed(timestep, dtype)
        if self.class_embed is not None:
            cond = cond + self.class_embed(class_labels)
        return cond

    @staticmethod
    def _caption_key_mask(
        encoder_attention_mask: Optional[torch.Tensor], batch_size: int, length: int, device: torch.device
    ) -> torch.Tensor:
        """(B, L) bool, True = real token; a row with no real token attends to all (avoids NaN softmax)."""
        if encoder_attention_mask is None:
            return torch.ones(batch_size, length, dtype=torch.bool, device=device)
        if encoder_attention_mask.shape != (batch_size, length):
            raise ValueError(
                f"encoder_attention_mask must have shape (batch, caption_tokens) = ({batch_size}, {length}) with "
                f"1 for real tokens and 0 for padding, got {tuple(encoder_attention_mask.shape)}."
            )
        keep = encoder_attention_mask.to(device) > 0
        return keep | ~keep.any(dim=1, keepdim=True)

    def encode_captions(
        self, encoder_hidden_states: torch.Tensor, encoder_attention_mask: Optional[torch.Tensor] = None
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Project and refine caption tokens (text-conditioned models).

        Returns:
            tokens (B, L, hidden_size): refined caption tokens for cross-attention; pooled (B, hidden_size): their
            mean over real tokens through an MLP (added to the timestep embedding); key_mask (B, L) bool.
        """
        b, length, _ = encoder_hidden_states.shape
        keep = self._caption_key_mask(encoder_attention_mask, b, length, encoder_hidden_states.device)
        attn_mask = keep[:, None, None, :]
        y = self.caption_projection(encoder_hidden_states)
        for block in self.caption_refiner:
            y = maybe_checkpoint(self, block, y, attn_mask)
        weights = keep.to(y.dtype).unsqueeze(-1)
        pooled = (y * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1)
        return y, self.caption_pooled_projection(pooled), keep

    def _check_text_inputs(self, encoder_hidden_states: Optional[torch.Tensor], batch_size: int) -> None:
        if not self.is_text_conditioned:
            check_no_text_input(self, encoder_hidden_states)
            return
        c = self.config.caption_channels
        if encoder_hidden_states is None:
            raise ValueError(
                f"This {type(self).__name__} is text-conditioned: pass encoder_hidden_states of shape ({batch_size}, "
                f"tokens, {c}) (text-encoder last hidden state); use an all-zero tensor for the unconditional caption."
            )
        shape = tuple(encoder_hidden_states.shape)
        if encoder_hidden_states.dim() != 3 or shape[0] != batch_size or shape[2] != c:
            raise ValueError(
                f"encoder_hidden_states must have shape ({batch_size}, tokens, {c}), got {shape}; caption_channels "
                "must equal the text encoder's hidden size."
            )

    # ------------------------------------------------------------------------------------------------------------
    # Masking and routing
    # ------------------------------------------------------------------------------------------------------------
    def prepare_token_mask(
        self,
        ids_keep: Union[None, torch.Tensor, TokenMask],
        mask_ratio: float,
        generator: Optional[torch.Generator],
        batch_size: int,
        device: torch.device,
    ) -> Optional[TokenMask]:
        """The `TokenMask` a forward uses, or `None` (every token kept).

        ``ids_keep`` (B, K) or a `TokenMask` is used as given (checked: `masking.check_ids_keep`); without it,
        ``mask_ratio > 0`` draws a random mask with ``generator`` (the convenience path, for eager use)."""
        name = type(self).__name__
        if not self.supports_masking:
            if ids_keep is not None or isinstance(mask_ratio, bool) or not isinstance(mask_ratio, (int, float)) \
                    or mask_ratio != 0:
                given = ", ids_keep" if ids_keep is not None else ""
                raise ValueError(
                    f"{name} does not mask (got mask_ratio={mask_ratio!r}{given}): it has no decoder to fill removed "
                    "tokens. Use route_ratio (TREAD routing: tokens skip blocks and come back) for cheaper training, "
                    "or MaskDiTTransformer2DModel for masked training."
                )
            return None
        check_mask_ratio(mask_ratio, name, training_mask_ratio_hint(self))
        if isinstance(ids_keep, TokenMask):
            token_mask = check_token_mask(ids_keep, batch_size, self.num_tokens, owner=name)
            return TokenMask(*(t.to(device) for t in (token_mask.ids_keep, token_mask.ids_restore, token_mask.mask)))
        if ids_keep is not None:
            ids_keep = check_ids_keep(ids_keep, batch_size, self.num_tokens, owner=name)
            return token_mask_from_ids_keep(ids_keep.to(device), self.num_tokens)
        if mask_ratio > 0:
            return random_token_mask(batch_size, self.num_tokens, mask_ratio, device=device, generator=generator)
        return None

    # ------------------------------------------------------------------------------------------------------------
    # Forward
    # ------------------------------------------------------------------------------------------------------------
    def forward_tokens(self, hidden_states: torch.Tensor, cond: torch.Tensor, token_mask: Optional[TokenMask] = None,
                       route_ids: Optional[torch.Tensor] = None, text: Optional[torch.Tensor] = None,
                       text_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The model's own part of `forward`: image -> output tokens.

        Args:
            hidden_states (`torch.Tensor` of shape (B, in_channels, H, W)): The checked model input.
            cond (`torch.Tensor` of shape (B, hidden_size)): The adaLN conditioning vector.
            token_mask (`TokenMask`, *optional*): The tokens to keep; `None` keeps all.
            route_ids (`torch.LongTensor` of shape (B, K'), *optional*): Ids, into the tokens the routed stack sees,
                of those that go through the route span.
            text (`torch.Tensor` of shape (B, L, hidden_size), *optional*): Refined caption tokens.
            text_mask (`torch.BoolTensor` of shape (B, 1, 1, L), *optional*): True for real caption tokens.

        Returns:
            (B, N, patch_size**2 * out_channels): the prediction of every token, in grid order.
        """
        raise NotImplementedError

    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: Union[torch.Tensor, float, int],
        class_labels: Optional[torch.LongTensor] = None,
        encoder_hidden_states: Optional[torch.Tensor] = None,
        encoder_attention_mask: Optional[torch.Tensor] = None,
        mask_ratio: float = 0.0,
        generator: Optional[torch.Generator] = None,
        ids_keep: Union[None, torch.LongTensor, TokenMask] = None,
        return_dict: bool = True,
        route_ratio: float = 0.0,
        route_ids: Optional[torch.LongTensor] = None,
    ) -> Union[MaskedTransformer2DModelOutput, tuple]:
        """
        Args:
            hidden_states (`torch.Tensor` of shape (B, in_channels, sample_size, sample_size)): Noisy input (already
                scaled by the scheduler's `scale_model_input`).
            timestep (`torch.Tensor` or number): Scalar or (B,): a DDPM step or EDM's ``c_noise = ln(sigma) / 4``.
            class_labels (`torch.LongTensor` of shape (B,), *optional*): Class ids of a class-conditional model;
                ``num_classes`` = unconditional.
            encoder_hidden_states (`torch.Tensor` of shape (B, L, caption_channels), *optional*): Text-encoder tokens
                of a text-conditioned model; all zeros = the unconditional caption. Refused by the other models.
            encoder_attention_mask (`torch.Tensor` of shape (B, L), *optional*): 1 (or True) for real caption tokens,
                0 for padding; `None` = all real.
            mask_ratio (`float`, defaults to 0.0): Convenience for eager use: without ``ids_keep``, draw a random mask
                removing this share of the tokens, in [0, 1), with ``generator``.
            generator (`torch.Generator`, *optional*): Makes the drawn mask / route reproducible (eager mode; compiled
                training passes ``ids_keep`` / ``route_ids`` instead, a generator cannot be traced).
            ids_keep (`torch.LongTensor` of shape (B, K) or `TokenMask`, *optional*): The tokens to keep (``mask_ratio``
                is then ignored): one row of 1 <= K <= N distinct ids in [0, N) per sample (checked as
                `masking.check_ids_keep` says; the value checks skip GPU training steps by default), or a `TokenMask`
                from `masking.random_token_mask`.
            return_dict (`bool`, defaults to `True`): Return a `MaskedTransformer2DModelOutput` or a tuple.
            route_ratio (`float`, defaults to 0.0): TREAD routing: share of the routed stack's tokens (among those the
                mask kept) that skip its blocks ``route_start..route_end``, in [0, 1); 0 = off.
            route_ids (`torch.LongTensor` of shape (B, K'), *optional*): Ids, into the tokens the routed stack sees,
                of the tokens that go through the span; replaces the random draw (``route_ratio`` is then ignored).

        Masks and routes are honoured whenever given, in training and eval mode alike.

        Returns:
            `MaskedTransformer2DModelOutput` (or ``(sample, mask)``): ``sample`` (B, out_channels, H, W) for every
            token; ``mask`` (B, N) bool, True where a token was masked, `None` when nothing was.
        """
        check_image_input(self, hidden_states)
        b, _, h, w = hidden_states.shape
        device = hidden_states.device
        token_mask = self.prepare_token_mask(ids_keep, mask_ratio, generator, b, device)
        check_route_ratio(route_ratio, type(self).__name__)
        self._check_text_inputs(encoder_hidden_states, b)
        timestep = prepare_timestep(timestep, b, device)
        class_labels = check_class_labels(self, class_labels, b)

        cond = self.embed_condition(timestep, class_labels, hidden_states.dtype)
        text = text_mask = None
        if self.is_text_conditioned:
            text, pooled, keep = self.encode_captions(
                encoder_hidden_states.to(hidden_states.dtype), encoder_attention_mask
            )
            cond = cond + pooled
            text_mask = keep[:, None, None, :]

        num_routed_tokens = token_mask.num_kept if token_mask is not None else self.num_tokens
        route_ids = resolve_route_ids(
            route_ids, route_ratio, b, num_routed_tokens, type(self).__name__, device=device, generator=generator
        )
        tokens = self.forward_tokens(hidden_states, cond, token_mask, route_ids, text, text_mask)
        sample = unpatchify(tokens, self.config.patch_size, self.out_channels, h, w)
        mask = token_mask.mask if token_mask is not None else None
        if not return_dict:
            return (sample, mask)
        return MaskedTransformer2DModelOutput(sample=sample, mask=mask)


def text_block_args(text: Optional[torch.Tensor], text_mask: Optional[torch.Tensor]) -> Tuple[torch.Tensor, ...]:
    """The trailing positional block arguments of the caption cross-attention (`maybe_checkpoint` takes positional
    arguments only): ``(text, text_mask)``, or ``()`` without text, so that the blocks of a class-conditional model
    are called with their class-conditional arguments only."""
    return () if text is None else (text, text_mask)

