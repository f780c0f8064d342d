"""MaskDiT (Zheng et al., "Fast Training of Diffusion Models with Masked Transformers") as a diffusers model."""

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
    modulate,
    sincos_pos_embed_2d,
    unpatchify,
)
from .masking import (
    check_ids_keep,
    check_route_ratio,
    gather_tokens,
    random_route_ids,
    random_token_mask,
    resolve_route_span,
    restore_tokens,
    run_routed_blocks,
    token_mask_from_ids_keep,
)
from .modeling_common import (
    MaskedModelMixin,
    MaskedTransformer2DModelOutput,
    check_class_labels,
    check_common_model_args,
    check_image_input,
    check_masking_args,
    check_no_text_input,
    check_number_arg,
    prepare_timestep,
)

#: Encoder sizes of the paper / official code (DiT sizes). Every size uses the 8 x 512 (16 heads) decoder.
MASKDIT_SIZE_PRESETS = {
    "S": dict(num_layers=12, hidden_size=384, num_attention_heads=6),
    "B": dict(num_layers=12, hidden_size=768, num_attention_heads=12),
    "L": dict(num_layers=24, hidden_size=1024, num_attention_heads=16),
    "XL": dict(num_layers=28, hidden_size=1152, num_attention_heads=16),
}


class MaskDiTEncoderToDecoder(nn.Module):
    """Bridge from encoder width to decoder width: LayerNorm, adaLN shift/scale from the conditioning, Linear."""

    def __init__(self, encoder_dim: int, decoder_dim: int, cond_dim: int, norm_eps: float = 1e-6):
        super().__init__()
        self.norm = nn.LayerNorm(encoder_dim, eps=norm_eps, elementwise_affine=False)
        self.adaln_modulation = nn.Linear(cond_dim, 2 * encoder_dim)
        self.proj = nn.Linear(encoder_dim, decoder_dim)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaln_modulation(nn.functional.silu(cond)).chunk(2, dim=-1)
        return self.proj(modulate(self.norm(x), shift, scale))


class MaskDiTTransformer2DModel(MaskedModelMixin, ModelMixin, ConfigMixin, PeftAdapterMixin):
    r"""MaskDiT: a DiT encoder that sees only the unmasked tokens and a light decoder over all tokens.

    Training (``mask_ratio > 0``): patch tokens (+ fixed sin-cos positions) are masked at random, keeping the same
    number per sample; the encoder runs on the kept tokens only; a bridge maps them to the decoder width; one shared
    learnable ``mask_token`` fills the masked places; decoder positions are added again; the decoder predicts every
    token. Inference (``mask_ratio == 0``) is an ordinary encoder-decoder DiT over all tokens.

    The model is a raw network: what ``sample`` means (EDM's F, epsilon, v) is fixed by the scheduler it is trained
    and sampled with (EDM by default, as the paper).

    LoRA (peft, through diffusers' `PeftAdapterMixin`): attention projections are named ``to_q``, ``to_k``, ``to_v``,
    ``to_out.0`` and MLPs ``ff.net.0.proj`` / ``ff.net.2``. Sensible targets: the encoder attention (the heavy
    part, ``encoder_blocks.*.attn1.to_*``); add the decoder (``decoder_blocks.*``) when the new data changes fine
    detail, since the decoder alone sees every token.

    Presets (`from_preset`, encoder sizes of the paper; decoder 8 blocks x 512 wide, 16 heads, for all):

    | preset | encoder layers | width | heads | patch |
    |---|---|---|---|---|
    | S/2, S/4, S/8 | 12 | 384 | 6 | 2/4/8 |
    | B/2, B/4, B/8 | 12 | 768 | 12 | 2/4/8 |
    | L/2, L/4, L/8 | 24 | 1024 | 16 | 2/4/8 |
    | XL/2, XL/4, XL/8 | 28 | 1152 | 16 | 2/4/8 |

    Args:
        sample_size (`int`, defaults to 32): Height = width of the input (latent or pixel) the positions are built for.
        patch_size (`int`, defaults to 2): Patch side.
        in_channels (`int`, defaults to 4): Input channels.
        out_channels (`int`, *optional*): Output channels; defaults to ``in_channels`` (``2 * in_channels`` with
            ``learn_sigma``).
        hidden_size (`int`, defaults to 1152): Encoder width.
        num_layers (`int`, defaults to 28): Encoder blocks.
        num_attention_heads (`int`, defaults to 16): Encoder heads.
        decoder_hidden_size (`int`, defaults to 512): Decoder width.
        num_decoder_layers (`int`, defaults to 8): Decoder blocks.
        decoder_num_attention_heads (`int`, defaults to 16): Decoder heads.
        mlp_ratio (`float`, defaults to 4.0): MLP expansion of encoder and decoder blocks.
        num_classes (`int`, *optional*, defaults to 1000): Number of classes; `None` for an unconditional model.
            Id ``num_classes`` is the unconditional (null) class used by classifier-free guidance.
        class_dropout_prob (`float`, defaults to 0.1): Share of labels the trainer replaces by the null class.
        learn_sigma (`bool`, defaults to `False`): Predict a variance too (doubles the output channels).
        norm_eps (`float`, defaults to 1e-6): LayerNorm epsilon.
        route_start (`int`, *optional*): TREAD token routing inside the encoder (off unless a forward passes
            ``route_ratio`` / ``route_ids``): first encoder block the routed tokens skip; `None` = 2 (the TREAD
            paper's). Routing composes with masking: it picks among the tokens the mask kept.
        route_end (`int`, *optional*): Last encoder block the routed tokens skip (inclusive); `None` =
            ``num_layers - 4``, shrunk to fit small encoders. Negative values count from the end.
    """

    _supports_gradient_checkpointing = True
    _no_split_modules = ["DiTBlock"]
    _size_presets = MASKDIT_SIZE_PRESETS
    #: The paper's training mask ratio.
    default_mask_ratio = 0.5

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
        decoder_hidden_size: int = 512,
        num_decoder_layers: int = 8,
        decoder_num_attention_heads: int = 16,
        mlp_ratio: float = 4.0,
        num_classes: Optional[int] = 1000,
        class_dropout_prob: float = 0.1,
        learn_sigma: bool = False,
        norm_eps: float = 1e-6,
        route_start: Optional[int] = None,
        route_end: Optional[int] = None,
    ):
        super().__init__()
        owner = type(self).__name__
        check_common_model_args(
            owner, sample_size, patch_size, in_channels, out_channels, num_classes, class_dropout_prob, norm_eps,
            widths=[("hidden_size", hidden_size, "num_attention_heads", num_attention_heads),
                    ("decoder_hidden_size", decoder_hidden_size, "decoder_num_attention_heads",
                     decoder_num_attention_heads)],
            depths=[("num_layers", num_layers, 1), ("num_decoder_layers", num_decoder_layers, 0)],
        )
        check_number_arg(owner, "mlp_ratio", mlp_ratio, 0.0, 64.0, low_open=True)
        self.route_span = resolve_route_span(num_layers, route_start, route_end, owner, blocks_name="encoder blocks")
        if out_channels is None:
            out_channels = in_channels * 2 if learn_sigma else in_channels
        self.out_channels = out_channels
        grid = sample_size // patch_size
        self.num_tokens = grid * grid

        self.patch_embed = PatchEmbed(patch_size, in_channels, hidden_size)
        self.register_buffer("pos_embed", sincos_pos_embed_2d(hidden_size, grid), persistent=False)
        self.time_embed = TimestepEmbedder(hidden_size)
        self.class_embed = LabelEmbedder(num_classes, hidden_size) if num_classes is not None else None

        self.encoder_blocks = nn.ModuleList(
            [
                DiTBlock(hidden_size, num_attention_heads, hidden_size // num_attention_heads, mlp_ratio=mlp_ratio, norm_eps=norm_eps)
                for _ in range(num_layers)
            ]
        )
        self.encoder_to_decoder = MaskDiTEncoderToDecoder(hidden_size, decoder_hidden_size, hidden_size, norm_eps)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_hidden_size))
        self.register_buffer("decoder_pos_embed", sincos_pos_embed_2d(decoder_hidden_size, grid), persistent=False)
        self.decoder_blocks = nn.ModuleList(
            [
                DiTBlock(
                    decoder_hidden_size,
                    decoder_num_attention_heads,
                    decoder_hidden_size // decoder_num_attention_heads,
                    cond_dim=hidden_size,
                    mlp_ratio=mlp_ratio,
                    norm_eps=norm_eps,
                )
                for _ in range(num_decoder_layers)
            ]
        )
        self.final_layer = FinalLayer(decoder_hidden_size, hidden_size, patch_size, out_channels, norm_eps=norm_eps)
        self.gradient_checkpointing = False
        self._init_weights()

    def _init_weights(self) -> None:
        init_dit_weights(self)
        # As the official code: the bridge starts at zero too, and the mask token ~ N(0, 0.02).
        nn.init.zeros_(self.encoder_to_decoder.adaln_modulation.weight)
        nn.init.zeros_(self.encoder_to_decoder.adaln_modulation.bias)
        nn.init.zeros_(self.encoder_to_decoder.proj.weight)
        nn.init.zeros_(self.encoder_to_decoder.proj.bias)
        nn.init.normal_(self.mask_token, std=0.02)

    @property
    def null_class_id(self) -> Optional[int]:
        """Class id of the unconditional class (``num_classes``), or `None` for an unconditional model."""
        return self.config.num_classes

    def encode(
        self,
        hidden_states: torch.Tensor,
        cond: torch.Tensor,
        ids_keep: Optional[torch.Tensor] = None,
        route_ids: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Encoder over the kept tokens (all tokens when ``ids_keep`` is None); returns (B, K, hidden_size).
        ``route_ids`` (B, K'), ids into the K kept tokens, route the others past the encoder's route span."""
        x = self.patch_embed(hidden_states) + self.pos_embed.to(hidden_states.dtype)
        if ids_keep is not None:
            x = gather_tokens(x, ids_keep)
        blocks = self.encoder_blocks
        return run_routed_blocks(
            x, len(blocks), lambda i, t: maybe_checkpoint(self, blocks[i], t, cond), route_ids, self.route_span
        )

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
        return_dict: bool = True,
        route_ratio: float = 0.0,
        route_ids: Optional[torch.LongTensor] = None,
    ) -> Union[MaskedTransformer2DModelOutput, tuple]:
        """
        Args:
            hidden_states (`torch.Tensor` of shape (B, in_channels, sample_size, sample_size)): Noisy input (already
                scaled by the scheduler's `scale_model_input`).
            timestep (`torch.Tensor` or number): Scalar or (B,): a DDPM step or EDM's ``c_noise``.
            class_labels (`torch.LongTensor` of shape (B,), *optional*): Class ids; ``num_classes`` = unconditional.
            encoder_hidden_states, encoder_attention_mask: Unused (MaskDiT has no text conditioning); accepted so
                that every model of this package shares one signature.
            mask_ratio (`float`, defaults to 0.0): Share of tokens to remove before the encoder, in [0, 1).
            generator (`torch.Generator`, *optional*): Makes the random mask reproducible.
            ids_keep (`torch.LongTensor` of shape (B, K), *optional*): Use these kept token ids instead of drawing a
                mask (``mask_ratio`` is then ignored): one row of 1 <= K <= N distinct ids in [0, N) per sample
                (checked as `masking.check_ids_keep` says; the value checks skip GPU training steps by default).
            return_dict (`bool`, defaults to `True`): Return a `MaskedTransformer2DModelOutput` or a tuple.
            route_ratio (`float`, defaults to 0.0): TREAD routing inside the encoder: share of the encoder's tokens
                (those the mask kept) that skip encoder blocks ``route_start..route_end``, in [0, 1); 0 = off.
            route_ids (`torch.LongTensor` of shape (B, K'), *optional*): Ids, into the K tokens the encoder sees,
                of the tokens that go through the span; replaces the random draw (``route_ratio`` is then ignored).
        """
        check_image_input(self, hidden_states)
        ids_keep = check_masking_args(self, mask_ratio, ids_keep, hidden_states.shape[0])
        check_route_ratio(route_ratio, type(self).__name__)
        check_no_text_input(self, encoder_hidden_states)
        b, _, h, w = hidden_states.shape
        device = hidden_states.device
        timestep = prepare_timestep(timestep, b, device)
        class_labels = check_class_labels(self, class_labels, b)

        cond = self.time_embed(timestep, hidden_states.dtype)
        if self.class_embed is not None:
            cond = cond + self.class_embed(class_labels)

        token_mask = None
        if ids_keep is not None:
            token_mask = token_mask_from_ids_keep(ids_keep.to(device), self.num_tokens)
        elif mask_ratio > 0:
            token_mask = random_token_mask(b, self.num_tokens, mask_ratio, device=device, generator=generator)

        num_encoder_tokens = token_mask.num_kept if token_mask is not None else self.num_tokens
        if route_ids is not None:
            route_ids = check_ids_keep(route_ids, b, num_encoder_tokens, owner=f"{type(self).__name__} route_ids")
        elif route_ratio > 0:
            route_ids = random_route_ids(b, num_encoder_tokens, route_ratio, device=device, generator=generator)
        x = self.encode(hidden_states, cond, token_mask.ids_keep if token_mask is not None else None, route_ids)
        x = self.encoder_to_decoder(x, cond)
        if token_mask is not None:
            x = restore_tokens(x, token_mask.ids_restore, self.mask_token)
        x = x + self.decoder_pos_embed.to(x.dtype)
        for block in self.decoder_blocks:
            x = maybe_checkpoint(self, block, x, cond)
        x = self.final_layer(x, cond)
        sample = unpatchify(x, self.config.patch_size, self.out_channels, h, w)
        mask = token_mask.mask if token_mask is not None else None
        if not return_dict:
            return (sample, mask)
        return MaskedTransformer2DModelOutput(sample=sample, mask=mask)
