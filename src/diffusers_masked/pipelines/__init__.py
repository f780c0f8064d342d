from .pipeline_base import MaskedTransformerPipelineBase
from .pipeline_maskdit import MaskDiTPipeline

__all__ = ["MaskDiTPipeline", "MaskedTransformerPipelineBase"]
