from .masking import (
    TokenMask,
    check_ids_keep,
    gather_tokens,
    num_kept_tokens,
    random_ids_keep,
    random_token_mask,
    restore_tokens,
    scatter_tokens,
    set_ids_keep_value_checks,
)
from .modeling_common import MaskedTransformer2DModelOutput
from .transformer_base import MaskedTransformer2DModel
from .transformer_maskdit import MaskDiTTransformer2DModel
from .transformer_mdt import MDTv2Transformer2DModel
from .moe import ExpertChoiceFeedForward
from .transformer_deferred_maskdit import DeferredMaskDiTTransformer2DModel, layerwise_block_widths
from .transformer_dit import RoutedDiTTransformer2DModel

__all__ = [
    "RoutedDiTTransformer2DModel",
    "MaskDiTTransformer2DModel",
    "MaskedTransformer2DModel",
    "MaskedTransformer2DModelOutput",
    "MDTv2Transformer2DModel",
    "DeferredMaskDiTTransformer2DModel",
    "ExpertChoiceFeedForward",
    "layerwise_block_widths",
    "TokenMask",
    "check_ids_keep",
    "gather_tokens",
    "num_kept_tokens",
    "random_ids_keep",
    "random_token_mask",
    "restore_tokens",
    "scatter_tokens",
    "set_ids_keep_value_checks",
]
