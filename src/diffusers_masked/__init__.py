"""diffusers-masked: masked diffusion transformers (MaskDiT, MDTv2, DeferredMaskDiT) for Hugging Face diffusers.

Importing this package registers its pipeline and model classes with `diffusers`, so that
`diffusers.DiffusionPipeline.from_pretrained(folder)` returns, e.g., a `MaskDiTPipeline`.
"""

__version__ = "0.1.0"

from .models import MaskDiTTransformer2DModel, MaskedTransformer2DModelOutput
from .models import MDTv2Transformer2DModel
from .pipelines import MaskDiTPipeline
from .pipelines import MDTv2Pipeline
from .models import DeferredMaskDiTTransformer2DModel
from .pipelines import DeferredMaskDiTPipeline
from .models import RoutedDiTTransformer2DModel
from .pipelines import RoutedDiTPipeline

_EXPORTED_TO_DIFFUSERS = {
    "MaskDiTTransformer2DModel": MaskDiTTransformer2DModel,
    "MaskDiTPipeline": MaskDiTPipeline,
    "MDTv2Transformer2DModel": MDTv2Transformer2DModel,
    "MDTv2Pipeline": MDTv2Pipeline,
    "DeferredMaskDiTTransformer2DModel": DeferredMaskDiTTransformer2DModel,
    "DeferredMaskDiTPipeline": DeferredMaskDiTPipeline,
    "RoutedDiTTransformer2DModel": RoutedDiTTransformer2DModel,
    "RoutedDiTPipeline": RoutedDiTPipeline,
}


def _register_with_diffusers() -> None:
    """`DiffusionPipeline.from_pretrained` looks a saved pipeline's `_class_name` up in the `diffusers` module only,
    so our classes must be attributes of it."""
    import diffusers

    for name, cls in _EXPORTED_TO_DIFFUSERS.items():
        if getattr(diffusers, name, None) is not cls:
            setattr(diffusers, name, cls)


_register_with_diffusers()

__all__ = ["MaskDiTPipeline", "MaskDiTTransformer2DModel", "MaskedTransformer2DModelOutput", "MDTv2Pipeline", "MDTv2Transformer2DModel", "DeferredMaskDiTPipeline", "DeferredMaskDiTTransformer2DModel", "RoutedDiTPipeline", "RoutedDiTTransformer2DModel"]
