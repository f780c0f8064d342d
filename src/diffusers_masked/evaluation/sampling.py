"""Reproducible sample generation from any pipeline of this package (class-conditional, text or unconditional).

Every sample ``i`` gets its own generator seeded with ``seed + i``, so a sample does not depend on the batch size or on
how many processes share the work (irreproducible FID seeds are the most common complaint about DiT-family repos).
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch


def pipeline_call_parameters(pipeline: Any) -> Dict[str, inspect.Parameter]:
    return dict(inspect.signature(pipeline.__call__).parameters)


def pipeline_conditioning(pipeline: Any) -> str:
    """``"class"``, ``"text"`` or ``"unconditional"``, from the transformer config and the call signature."""
    params = pipeline_call_parameters(pipeline)
    transformer = getattr(pipeline, "transformer", None)
    num_classes = getattr(getattr(transformer, "config", None), "num_classes", None)
    config = getattr(transformer, "config", None)
    # Every pipeline of ours takes `prompt` now, also around a class-conditional or unconditional transformer, so the
    # transformer decides: text-conditioned models carry a `caption_channels`; a bare callable is judged by its call.
    text_model = config is None or getattr(config, "caption_channels", None) is not None
    if "prompt" in params and text_model:
        return "text"
    if "class_labels" in params and num_classes:
        return "class"
    return "unconditional"


def pipeline_num_classes(pipeline: Any) -> Optional[int]:
    transformer = getattr(pipeline, "transformer", None)
    return getattr(getattr(transformer, "config", None), "num_classes", None) or None


def expected_image_shape(pipeline: Any) -> Optional[Tuple[int, int, int]]:
    """(C, H, W) of the pipeline's decoded images, from its configs; None when it cannot tell."""
    config = getattr(getattr(pipeline, "transformer", None), "config", None)
    if config is None or getattr(config, "sample_size", None) is None:
        return None
    size = config.sample_size
    size = (size, size) if isinstance(size, int) else tuple(size)
    vae = getattr(pipeline, "vae", None)
    if vae is None:
        return (config.in_channels, *size)
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    return (vae.config.out_channels, size[0] * factor, size[1] * factor)


def balanced_labels(num_samples: int, num_classes: int) -> List[int]:
    """0, 1, ..., K-1, 0, 1, ...: every class equally often (exactly when num_samples is a multiple of K)."""
    return [i % num_classes for i in range(num_samples)]


def read_prompts(path: Union[str, Path]) -> Tuple[List[str], Optional[List[int]]]:
    """Prompts from a ``.txt`` (one per line, blank lines skipped) or ``.jsonl`` (``{"prompt": ..., "label": k}``
    per line; labels optional, they enable conditional accuracy)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Prompt file {path} does not exist.")
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not lines:
        raise ValueError(f"Prompt file {path} is empty: write one prompt per line.")
    if path.suffix != ".jsonl":
        return lines, None
    prompts, labels = [], []
    for n, line in enumerate(lines, 1):
        row = json.loads(line)
        if "prompt" not in row:
            raise ValueError(f"{path} line {n} has no 'prompt' key.")
        prompts.append(str(row["prompt"]))
        labels.append(row.get("label"))
    if any(label is None for label in labels):
        if any(label is not None for label in labels):
            raise ValueError(f"{path}: give a 'label' on every line or on none.")
        return prompts, None
    return prompts, [int(label) for label in labels]


def generate_images(
    pipeline: Any,
    num_samples: int,
    batch_size: int = 64,
    seed: int = 0,
    num_inference_steps: Optional[int] = None,
    guidance_scale: Optional[float] = None,
    class_labels: Optional[Sequence[int]] = None,
    prompts: Optional[Sequence[str]] = None,
    progress: bool = True,
    **pipeline_kwargs: Any,
) -> Iterator[Tuple[torch.Tensor, Optional[torch.Tensor]]]:
    """Yield (images float [0, 1] (B, C, H, W) on CPU, class labels (B,) or None) batch by batch.

    Class-conditional pipelines get ``class_labels`` (default: class-balanced); text pipelines cycle through
    ``prompts``; unconditional ones get ``batch_size``. ``None`` steps / guidance keep the pipeline's defaults."""
    from tqdm.auto import tqdm

    if num_samples < 1 or batch_size < 1:
        raise ValueError(f"num_samples and batch_size must be >= 1, got {num_samples} and {batch_size}.")
    conditioning = pipeline_conditioning(pipeline)
    params = pipeline_call_parameters(pipeline)
    if conditioning == "class" and class_labels is None:
        class_labels = balanced_labels(num_samples, pipeline_num_classes(pipeline))
    if class_labels is not None and len(class_labels) != num_samples:
        raise ValueError(f"class_labels has {len(class_labels)} entries for {num_samples} samples.")
    if conditioning == "text" and not prompts:
        raise ValueError("This is a text-to-image pipeline: pass prompts (a prompt file with --prompts).")
    kwargs = dict(pipeline_kwargs)
    if num_inference_steps is not None:
        kwargs["num_inference_steps"] = num_inference_steps
    if guidance_scale is not None:
        kwargs["guidance_scale"] = guidance_scale
    kwargs = {k: v for k, v in kwargs.items() if k in params or any(p.kind == p.VAR_KEYWORD for p in params.values())}

    # Our own bar counts samples; the pipeline's per-step bar would print one line per batch.
    saved_bar_config = dict(getattr(pipeline, "_progress_bar_config", {}) or {})
    pipeline.set_progress_bar_config(disable=True)
    bar = tqdm(total=num_samples, desc="Generating", unit="img", disable=not progress)
    try:
        for start in range(0, num_samples, batch_size):
            idx = list(range(start, min(start + batch_size, num_samples)))
            generators = [torch.Generator("cpu").manual_seed(seed + i) for i in idx]
            call = dict(kwargs, generator=generators, output_type="pt")
            labels = None
            if conditioning == "class":
                labels = torch.tensor([int(class_labels[i]) for i in idx], dtype=torch.long)
                call["class_labels"] = labels.tolist()
            elif conditioning == "text":
                call["prompt"] = [prompts[i % len(prompts)] for i in idx]
                if class_labels is not None:
                    labels = torch.tensor([int(class_labels[i]) for i in idx], dtype=torch.long)
            elif "batch_size" in params:
                call["batch_size"] = len(idx)
            images = pipeline(**call).images
            if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[0] != len(idx):
                raise ValueError(
                    f"{type(pipeline).__name__} returned {type(images).__name__} "
                    f"{getattr(images, 'shape', '')} for output_type='pt'; expected a (B, C, H, W) tensor of "
                    f"{len(idx)} images."
                )
            bar.update(len(idx))
            yield images.float().clamp(0, 1).cpu(), labels
    finally:
        bar.close()
        pipeline._progress_bar_config = saved_bar_config
