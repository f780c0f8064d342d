"""What a recipe sees of a run: the `TrainContext`, the `LossOutput` it returns, and model unwrapping.

A recipe never gets the trainer. It gets the typed config and this small context: the device, the data's geometry
and class names, the objective, the bare transformer, the run's noise generator and the current step. Tests build
one directly (``TrainContext(config, torch.device("cpu"))``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import torch

from .config import TrainConfig
from .objectives import Objective

#: ``backward_part(compute)``: run ``compute()`` (a forward pass and its loss), back-propagate it at once without a
#: gradient all-reduce, return the detached loss (see `TrainContext.backward_part`).
BackwardPart = Callable[[Callable[[], torch.Tensor]], torch.Tensor]


def unwrap_model(model: torch.nn.Module, accelerator: Any = None) -> torch.nn.Module:
    """The bare transformer under the torch.compile and DDP / FSDP / DeepSpeed wrappers: the one place that knows
    them. Attribute reads (config, ``num_tokens``, parameters to keep in the graph) go to this module.

    torch.compile is stripped first: accelerate's ``unwrap_model`` keeps a compile wrapper and re-points its
    ``_orig_mod`` past DDP, which would change the wrapper the training step still calls."""
    model = getattr(model, "_orig_mod", model)
    if accelerator is not None:
        return accelerator.unwrap_model(model)
    return getattr(model, "module", model)


def to_device(tensor: torch.Tensor, device: torch.device, pin: bool = False) -> torch.Tensor:
    """Copy a host tensor of the step to the device without waiting for the GPU. The loader pins its batches (fresh
    buffers per batch); a blocking copy from pinned memory waits for the GPU to finish the previous step, and a copy
    from pageable memory goes through the driver's staging buffer and can hold the host just as long, so the host
    could not queue the next step. ``pin``: pin a fresh pageable tensor first (on CUDA), e.g. a host-side gather."""
    if pin and device.type == "cuda" and not tensor.is_pinned():
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=tensor.is_pinned())


@dataclass
class DataInfo:
    """The training data as the model sees it.

    Attributes:
        resolution: Image side in pixels.
        sample_size: Side of the model input (pixels, or latent cells with a VAE).
        channels: Channels of the model input (image or latent channels).
        pixel_channels: Channels of the images.
        class_names: Class names in label order, or None (unconditional data).
        id2label: Saved with the pipeline; after mapping onto a pretrained model, the base model's.
        num_samples: Training samples (images, or cached latents).
    """

    resolution: int
    sample_size: int
    channels: int
    pixel_channels: int
    class_names: Optional[List[str]] = None
    id2label: Optional[Dict[int, str]] = None
    num_samples: int = 0

    @property
    def num_classes(self) -> Optional[int]:
        return len(self.class_names) if self.class_names else None


@dataclass
class TrainContext:
    """The run as a recipe sees it; the trainer fills the fields as they become known.

    Attributes:
        config: The run's typed config; ``config.recipe`` is the recipe's own dataclass.
        device: Where the batches and the model live.
        accelerator: The `accelerate.Accelerator` (None in unit tests).
        generator: The run's noise generator: every random draw of a step (noise, masks, label dropout) uses it, so
            resuming continues the same stream.
        data: Geometry and class names of the data (set before `TrainingRecipe.setup`).
        objective: The diffusion objective (set after `TrainingRecipe.build_objective`).
        model: The bare transformer (no DDP / compile wrapper), for attribute reads, EMA, sampling and saving.
        step: Optimizer steps done before the current one (0-based index of the step being trained).
        backward_part: Declared for recipes whose step has independent forward passes (MDTv2's two branches):
            ``backward_part(compute)`` runs ``compute()`` and back-propagates it at once without a gradient
            all-reduce, so one part's activations are freed before the next part runs; the gradients accumulate
            and the backward of the loss the recipe returns syncs them. None where the setup cannot (DeepSpeed
            steps inside backward, FSDP's no_sync keeps unsharded gradients) and in unit tests.
        vae: The frozen VAE of a latent-space run, else None.
        text: The text side of a text-to-image run on captioned data (`text.TextInfo`: encoder, caption width,
            validation / evaluation prompts), else None.
    """

    config: TrainConfig
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    accelerator: Any = None
    generator: Optional[torch.Generator] = None
    data: Optional[DataInfo] = None
    objective: Optional[Objective] = None
    model: Optional[torch.nn.Module] = None
    step: int = 0
    backward_part: Optional[BackwardPart] = None
    vae: Any = None
    text: Any = None

    @property
    def class_names(self) -> Optional[List[str]]:
        return self.data.class_names if self.data is not None else None

    @property
    def id2label(self) -> Optional[Dict[int, str]]:
        return self.data.id2label if self.data is not None else None

    @property
    def num_processes(self) -> int:
        return self.accelerator.num_processes if self.accelerator is not None else 1

    @property
    def finetuning(self) -> bool:
        """Whether the current step is in the final --unmasked_finetune_steps (no masking, no routing)."""
        cfg = self.config
        return self.step >= cfg.optim.max_train_steps - cfg.model.unmasked_finetune_steps


LogValue = Union[torch.Tensor, float]


@dataclass
class LossOutput:
    """What `TrainingRecipe.compute_loss` returns.

    Attributes:
        loss: The scalar to back-propagate.
        logs: Detached values to log (tensors stay on the device; they are read only at logging steps).
        unused: Parameters this step left out of the graph (e.g. MaskDiT's mask token in an unmasked step). DDP
            waits for a gradient of every parameter, so `for_backward` touches them with weight 0.
    """

    loss: torch.Tensor
    logs: Dict[str, LogValue] = field(default_factory=dict)
    unused: Sequence[torch.nn.Parameter] = ()

    def for_backward(self) -> torch.Tensor:
        """``loss`` with the unused parameters kept in the graph (same value, zero gradients for them)."""
        if not self.unused:
            return self.loss
        return self.loss + 0.0 * sum(p.sum() for p in self.unused)
