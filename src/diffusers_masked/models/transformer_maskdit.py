"""MaskDiT (Zheng et al., "Fast Training of Diffusion Models with Masked Transformers") as a diffusers model."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
from diffusers.configuration_utils import register_to_config
# diffusers' pipeline loader checks a component against the loading classes (ModelMixin, ...) it finds in the
# component's own module, the one model_index.json names: so ModelMixin must stay importable from here.
from diffusers.models.modeling_utils import ModelMixin  # noqa: F401

from .layers import DiTBlock, FinalLayer, init_dit_weights, maybe_checkpoint, modulate, sincos_pos_embed_2d
from .masking import TokenMask, gather_tokens, restore_tokens, run_routed_blocks
from .transformer_base import DIT_SIZE_PRESETS, MaskedTransformer2DModel, text_block_args


#: Encoder sizes of the paper / official code (DiT sizes). Every size uses the 8 x 512 (16 heads) decoder.
MASKDIT_SIZE_PRESETS = DIT_SIZE_PRESETS


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


class MaskDiTTransformer2DModel(MaskedTransformer2DModel):
    r"""MaskDiT: a DiT encoder that sees only the unmasked tokens and a light decoder over all tokens.

    Training (``mask_ratio > 0``): patch tokens (+ fixed sin-cos positions) are masked at random, keeping the same
    number per sample; the encoder runs on the kept tokens only; a bridge maps them to the decoder width; one shared
    learnable ``mask_token`` fills the masked places; decoder positions are added again; the decoder predicts every
    token. Inference (``mask_ratio == 0``) is an ordinary encoder-decoder DiT over all tokens.

    Conditioning: class labels (the paper's ImageNet setting, the default), or caption tokens when
    ``caption_channels`` is set: the text-encoder tokens are projected and refined (`CaptionRefinerBlock`), every
    encoder and decoder block cross-attends to them, and their pooled mean is added to the timestep embedding of the
    adaLN conditioning, as DeferredMaskDiT (MicroDiT) does. The caption branch of every block starts at zero, so a
    fresh text model starts as the plain DiT (adaLN-Zero). The unconditional caption of classifier-free guidance is
    an all-zero caption embedding (MicroDiT's), which the trainer's caption dropout feeds and the pipeline uses.

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
        hidden_size (`int`, defaults to 1152): Encoder width (also the conditioning width).
        num_layers (`int`, defaults to 28): Encoder blocks.
        num_attention_heads (`int`, defaults to 16): Encoder heads.
        route_start (`int`, *optional*): TREAD token routing inside the encoder (off unless a forward passes
            ``route_ratio`` / ``route_ids``): first encoder block the routed tokens skip; `None` = 2 (the TREAD
            paper's). Routing composes with masking: it picks among the tokens the mask kept.
        route_end (`int`, *optional*): Last encoder block the routed tokens skip (inclusive); `None` =
            ``num_layers - 4``, shrunk to fit small encoders. Negative values count from the end.
        decoder_hidden_size (`int`, defaults to 512): Decoder width.
        num_decoder_layers (`int`, defaults to 8): Decoder blocks.
        decoder_num_attention_heads (`int`, defaults to 16): Decoder heads.
        mlp_ratio (`float`, defaults to 4.0): MLP expansion of encoder and decoder blocks.
        norm_eps (`float`, defaults to 1e-6): LayerNorm epsilon.
        learn_sigma (`bool`, defaults to `False`): Predict a variance too (doubles the output channels).
        num_classes (`int`, *optional*, defaults to 1000): Classes of a class-conditional model (ImageNet's 1000 in
            the paper); `None` for an unconditional one. Id ``num_classes`` is the unconditional (null) class used by
            classifier-free guidance.
        class_dropout_prob (`float`, defaults to 0.1): Share of labels (captions) the trainer replaces by the null
            class (the all-zero caption).
        caption_channels (`int`, *optional*): Text conditioning instead of classes (set ``num_classes=None``): width
            of the text-encoder tokens (``encoder_hidden_states``), cross-attended by every encoder and decoder block.
            `None` (the default): no text path, and the state dict of the class-conditional model.
        num_caption_refiner_layers (`int`, defaults to 1): Attention blocks refining the caption tokens (text models).
    """

    _no_split_modules = ["DiTBlock", "CaptionRefinerBlock"]
    _size_presets = MASKDIT_SIZE_PRESETS
    #: The paper's training mask ratio (for training recipes; `forward` masks only what it is asked to).
    default_mask_ratio = 0.5

    @register_to_config
    def __init__(
        self,
        # Input and output.
        sample_size: int = 32, patch_size: int = 2, in_channels: int = 4, out_channels: Optional[int] = None,
        # Encoder (the kept tokens), and the span of it that TREAD routing may skip.
        hidden_size: int = 1152, num_layers: int = 28, num_attention_heads: int = 16,
        route_start: Optional[int] = None, route_end: Optional[int] = None,
        # Decoder (all tokens), and what both stacks share.
        decoder_hidden_size: int = 512, num_decoder_layers: int = 8, decoder_num_attention_heads: int = 16,
        mlp_ratio: float = 4.0, norm_eps: float = 1e-6, learn_sigma: bool = False,
        # Conditioning: class labels (the default), or caption tokens when caption_channels is set.
        num_classes: Optional[int] = 1000, class_dropout_prob: float = 0.1,
        caption_channels: Optional[int] = None, num_caption_refiner_layers: int = 1,
    ):
        super().__init__(
            widths=[("hidden_size", hidden_size, "num_attention_heads", num_attention_heads),
                    ("decoder_hidden_size", decoder_hidden_size, "decoder_num_attention_heads",
                     decoder_num_attention_heads)],
            depths=[("num_layers", num_layers, 1), ("num_decoder_layers", num_decoder_layers, 0)],
        )
        self._init_common(hidden_size, num_routed_blocks=num_layers, routed_blocks_name="encoder blocks")
        grid = sample_size // patch_size
        # Cross-attention to the caption tokens (hidden_size wide) in every block of a text-conditioned model.
        text_dim = hidden_size if caption_channels is not None else None

        self.encoder_blocks = nn.ModuleList(
            [
                DiTBlock(hidden_size, num_attention_heads, hidden_size // num_attention_heads, mlp_ratio=mlp_ratio,
                         norm_eps=norm_eps, cross_attention_dim=text_dim, cross_attention_heads=num_attention_heads)
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
                    cross_attention_dim=text_dim,
                    cross_attention_heads=decoder_num_attention_heads,
                )
                for _ in range(num_decoder_layers)
            ]
        )
        self.final_layer = FinalLayer(decoder_hidden_size, hidden_size, patch_size, self.out_channels, norm_eps=norm_eps)
        self._init_weights()

    def _init_weights(self) -> None:
        init_dit_weights(self)
        # As the official code: the bridge starts at zero too, and the mask token ~ N(0, 0.02).
        nn.init.zeros_(self.encoder_to_decoder.adaln_modulation.weight)
        nn.init.zeros_(self.encoder_to_decoder.adaln_modulation.bias)
        nn.init.zeros_(self.encoder_to_decoder.proj.weight)
        nn.init.zeros_(self.encoder_to_decoder.proj.bias)
        nn.init.normal_(self.mask_token, std=0.02)
        self._init_caption_weights(zero_cross_attention=True)

    def encode(self, hidden_states: torch.Tensor, cond: torch.Tensor, ids_keep: Optional[torch.Tensor] = None,
               route_ids: Optional[torch.Tensor] = None, text: Optional[torch.Tensor] = None,
               text_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Encoder over the kept tokens (all tokens when ``ids_keep`` is None); returns (B, K, hidden_size).
        ``route_ids`` (B, K'), ids into the K kept tokens, route the others past the encoder's route span; ``text``
        / ``text_mask``: the caption tokens of a text-conditioned model (see `encode_captions`)."""
        x = self.embed_patches(hidden_states)
        if ids_keep is not None:
            x = gather_tokens(x, ids_keep)
        blocks = self.encoder_blocks
        text_args = text_block_args(text, text_mask)
        return run_routed_blocks(
            x, len(blocks), lambda i, t: maybe_checkpoint(self, blocks[i], t, cond, None, *text_args), route_ids,
            self.route_span,
        )

    def forward_tokens(self, hidden_states: torch.Tensor, cond: torch.Tensor, token_mask: Optional[TokenMask] = None,
                       route_ids: Optional[torch.Tensor] = None, text: Optional[torch.Tensor] = None,
                       text_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Encoder on the kept tokens, bridge, mask token at the masked places, decoder over all tokens (see
        `MaskedTransformer2DModel.forward_tokens`)."""
        ids_keep = token_mask.ids_keep if token_mask is not None else None
        x = self.encode(hidden_states, cond, ids_keep, route_ids, text, text_mask)
        x = self.encoder_to_decoder(x, cond)
        if token_mask is not None:
            x = restore_tokens(x, token_mask.ids_restore, self.mask_token)
        x = x + self.decoder_pos_embed.to(x.dtype)
        text_args = text_block_args(text, text_mask)
        for block in self.decoder_blocks:
            x = maybe_checkpoint(self, block, x, cond, None, *text_args)
        return self.final_layer(x, cond)
