from .masking import TokenMask, gather_tokens, num_kept_tokens, random_token_mask, restore_tokens, scatter_tokens
from .modeling_common import MaskedTransformer2DModelOutput
from .transformer_maskdit import MaskDiTTransformer2DModel

__all__ = [
    "MaskDiTTransformer2DModel",
    "MaskedTransformer2DModelOutput",
    "TokenMask",
    "gather_tokens",
    "num_kept_tokens",
    "random_token_mask",
    "restore_tokens",
    "scatter_tokens",
]
