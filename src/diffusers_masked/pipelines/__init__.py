from .pipeline_base import MaskedTransformerPipelineBase
from .pipeline_maskdit import MaskDiTPipeline
from .pipeline_mdt import MDTv2Pipeline, power_cosine_guidance_scale
from .pipeline_deferred_maskdit import DeferredMaskDiTPipeline, default_deferred_maskdit_scheduler

__all__ = ["MaskDiTPipeline", "MaskedTransformerPipelineBase", "MDTv2Pipeline", "power_cosine_guidance_scale", "DeferredMaskDiTPipeline", "default_deferred_maskdit_scheduler"]
