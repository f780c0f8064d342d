from .pipeline_base import MaskedTransformerPipelineBase
from .pipeline_maskdit import MaskDiTPipeline
from .pipeline_mdt import MDTv2Pipeline, power_cosine_guidance_at_progress, power_cosine_guidance_scale
from .pipeline_deferred_maskdit import DeferredMaskDiTPipeline, default_deferred_maskdit_scheduler
from .pipeline_dit import RoutedDiTPipeline

__all__ = ["MaskDiTPipeline", "MaskedTransformerPipelineBase", "MDTv2Pipeline", "power_cosine_guidance_scale", "power_cosine_guidance_at_progress", "DeferredMaskDiTPipeline", "default_deferred_maskdit_scheduler", "RoutedDiTPipeline"]
