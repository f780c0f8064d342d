"""`evaluate_pipeline`: generate, score (Fréchet distance + conditional accuracy), and report every setting."""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn

from .classifier import FashionMNISTClassifier
from .frechet import (
    FeatureSpec,
    FrechetDistance,
    check_stats_match,
    custom_features,
    fashion_mnist_features,
    inception_features,
)
from .reference import ReferenceLike, reference_stats
from .sampling import (
    expected_image_shape,
    generate_images,
    pipeline_call_parameters,
    pipeline_conditioning,
    pipeline_num_classes,
)

# Feature specs by (kind, path, cache dir): loading the classifier / hashing weights happens once per process.
_SPECS: Dict[Tuple[Any, ...], FeatureSpec] = {}


def get_feature_spec(
    feature: Union[str, nn.Module, FeatureSpec] = "fashion-mnist",
    input_img_size: Optional[Tuple[int, int, int]] = None,
    inception_weights: Optional[Union[str, os.PathLike]] = None,
    classifier_path: Optional[Union[str, os.PathLike]] = None,
    cache_dir: Optional[Union[str, os.PathLike]] = None,
    progress: bool = True,
) -> FeatureSpec:
    """``"fashion-mnist"`` (FD-FMNIST, default), ``"inception"`` (standard FID, needs ``inception_weights``), a
    `FashionMNISTClassifier` (FD-FMNIST with that classifier), any other `nn.Module` (custom features;
    ``input_img_size`` (C, H, W) for torchmetrics' probe) or a ready `FeatureSpec`."""
    if isinstance(feature, FeatureSpec):
        return feature
    if isinstance(feature, FashionMNISTClassifier):
        return fashion_mnist_features(classifier=feature)
    if isinstance(feature, nn.Module):
        if not hasattr(feature, "num_features") and input_img_size is None:
            raise ValueError(
                "A custom feature module without a num_features attribute needs input_img_size=(C, H, W)."
            )
        return custom_features(feature, input_img_size or (1, 28, 28))
    key = (feature, str(inception_weights), str(classifier_path), str(cache_dir))
    if key not in _SPECS:
        if feature in ("fashion-mnist", "fmnist"):
            _SPECS[key] = fashion_mnist_features(
                classifier_path=classifier_path, cache_dir=cache_dir, progress=progress
            )
        elif feature == "inception":
            _SPECS[key] = inception_features(inception_weights)
        else:
            raise ValueError(f"feature must be 'fashion-mnist', 'inception' or an nn.Module, got {feature!r}.")
    return _SPECS[key]


def software_versions() -> Dict[str, str]:
    """torch, python and (when installed) diffusers versions, recorded with every evaluation's settings."""
    versions = {"torch": torch.__version__, "python": platform.python_version()}
    try:
        import diffusers

        versions["diffusers"] = diffusers.__version__
    except ImportError:  # pragma: no cover
        pass
    return versions


def timings_record(t_reference: float, t_generate: float, t_score: float, t_start: float,
                   num_samples: int) -> Dict[str, float]:
    """The ``timings`` block of an evaluation result (seconds; ``t_start`` is a `time.perf_counter` stamp)."""
    return {
        "reference_seconds": round(t_reference, 3),
        "generation_seconds": round(t_generate, 3),
        "scoring_seconds": round(t_score, 3),
        "total_seconds": round(time.perf_counter() - t_start, 3),
        "images_per_second": round(num_samples / max(t_generate, 1e-9), 3),
    }


def _default(params: Dict[str, Any], name: str, value: Any) -> Any:
    if value is not None:
        return value
    param = params.get(name)
    return None if param is None or param.default is param.empty else param.default


def evaluate_pipeline(
    pipeline: Any,
    reference: ReferenceLike = "fashion-mnist",
    num_samples: int = 10000,
    batch_size: int = 64,
    seed: int = 0,
    num_inference_steps: Optional[int] = None,
    guidance_scale: Optional[float] = None,
    feature: Union[str, nn.Module, FeatureSpec] = "fashion-mnist",
    input_img_size: Optional[Tuple[int, int, int]] = None,
    inception_weights: Optional[Union[str, os.PathLike]] = None,
    classifier: Optional[nn.Module] = None,
    classifier_path: Optional[Union[str, os.PathLike]] = None,
    cache_dir: Optional[Union[str, os.PathLike]] = None,
    class_labels: Optional[Sequence[int]] = None,
    prompts: Optional[Sequence[str]] = None,
    prompt_labels: Optional[Sequence[int]] = None,
    reference_num_samples: Optional[int] = None,
    save_reference_stats: Optional[Union[str, os.PathLike]] = None,
    accuracy: Optional[bool] = None,
    save_images_dir: Optional[Union[str, os.PathLike]] = None,
    progress: bool = True,
    **pipeline_kwargs: Any,
) -> Dict[str, Any]:
    r"""Generate ``num_samples`` images with ``pipeline`` and score them against ``reference``.

    Cheap to call repeatedly (e.g. from the trainer every N steps): the classifier, feature specs and reference
    statistics are cached in memory (the built-in Fashion-MNIST statistics also on disk).

    Args:
        pipeline: Any pipeline of this package (or any diffusers pipeline taking ``generator`` / ``output_type``).
        reference: ``"fashion-mnist"`` / ``"fashion-mnist:train"`` (resized to the generated size), a folder of
            images, an ``.npz`` with ``mu`` / ``sigma`` (ours or ADM's) or ``arr_0`` images, an array, or
            `ReferenceStats`.
        num_samples / batch_size / seed: Sample ``i`` uses seed ``seed + i``, whatever the batch size.
        num_inference_steps / guidance_scale: ``None`` keeps the pipeline's defaults (the report records them).
        feature: ``"fashion-mnist"`` (FD-FMNIST), ``"inception"`` (FID, with ``inception_weights``), an
            `nn.Module` (with ``input_img_size``) or a `FeatureSpec`.
        classifier: Classifier for conditional accuracy (defaults to the Fashion-MNIST one of the feature spec).
        class_labels: Labels to ask for (default: class-balanced ``i % num_classes``).
        prompts / prompt_labels: For text pipelines: prompts cycled over the samples and, optionally, the class
            each prompt describes (enables conditional accuracy).
        accuracy: Compute conditional accuracy; ``None`` = whenever labels and a matching classifier exist.
        save_reference_stats: Also write the reference statistics to this ``.npz``.
        save_images_dir: Also write the samples as PNGs (``{index:06d}_{label}.png``).
        pipeline_kwargs: Passed to the pipeline call (only those its signature takes).

    Returns:
        ``{"metrics": {"fd", "fd_name", "conditional_accuracy", "per_class_accuracy", ...}, "settings": {...},
        "feature_extractor": {...}, "reference": {...}, "timings": {...}}``; JSON-serialisable.
    """
    t_start = time.perf_counter()
    device = getattr(pipeline, "device", torch.device("cpu"))
    spec = get_feature_spec(feature, input_img_size, inception_weights, classifier_path, cache_dir, progress)
    conditioning = pipeline_conditioning(pipeline)
    num_classes = pipeline_num_classes(pipeline)
    labels = None
    if conditioning == "class":
        labels = list(class_labels) if class_labels is not None else [i % num_classes for i in range(num_samples)]
    elif conditioning == "text":
        if not prompts:
            raise ValueError("This is a text-to-image pipeline: pass prompts (or --prompts FILE).")
        if prompt_labels is not None:
            if len(prompt_labels) != len(prompts):
                raise ValueError(f"{len(prompt_labels)} prompt labels for {len(prompts)} prompts.")
            labels = [int(prompt_labels[i % len(prompts)]) for i in range(num_samples)]
    acc_model = classifier if classifier is not None else spec.classifier
    acc_classes = getattr(acc_model, "config", {}).get("num_classes") if acc_model is not None else None
    can_score_accuracy = labels is not None and acc_model is not None
    if can_score_accuracy and acc_classes is not None:
        can_score_accuracy = max(labels) < acc_classes
    if accuracy and not can_score_accuracy:
        raise ValueError(
            "Conditional accuracy needs known labels (a class-conditional pipeline, or prompt labels) and a "
            "classifier over the same classes (the Fashion-MNIST one for feature='fashion-mnist', or classifier=...)."
        )
    do_accuracy = can_score_accuracy if accuracy is None else bool(accuracy)

    # Reference first: a bad reference fails before the (expensive) generation.
    image_shape = expected_image_shape(pipeline)
    t0 = time.perf_counter()
    ref_stats = ref_desc = None
    if image_shape is not None:
        ref_stats, ref_desc = reference_stats(
            reference, spec, image_shape, reference_num_samples, device=device, cache_dir=cache_dir
        )
        check_stats_match(ref_stats, spec, image_shape)
    t_reference = time.perf_counter() - t0

    params = pipeline_call_parameters(pipeline)
    fd = FrechetDistance(spec, ref_stats, device=device) if ref_stats is not None else None
    correct, per_class_correct, per_class_total = 0, {}, {}
    t_generate = t_features = 0.0
    t0 = time.perf_counter()
    offset = 0
    if save_images_dir is not None:
        Path(save_images_dir).mkdir(parents=True, exist_ok=True)
    for images, batch_labels in generate_images(
        pipeline,
        num_samples,
        batch_size,
        seed,
        num_inference_steps,
        guidance_scale,
        class_labels=labels,
        prompts=prompts,
        progress=progress,
        **pipeline_kwargs,
    ):
        t1 = time.perf_counter()
        t_generate += t1 - t0
        if fd is None:  # shape unknown from the configs: resolve the reference on the first batch
            ref_stats, ref_desc = reference_stats(
                reference, spec, tuple(images.shape[1:]), reference_num_samples, device=device, cache_dir=cache_dir
            )
            fd = FrechetDistance(spec, ref_stats, device=device)
        fd.update(images)
        if do_accuracy:
            with torch.no_grad():
                was_training = acc_model.training
                pred = acc_model.eval()(images.to(next(acc_model.parameters()).device)).argmax(-1).cpu()
                acc_model.train(was_training)
            hit = pred == batch_labels
            correct += int(hit.sum())
            for lab, h in zip(batch_labels.tolist(), hit.tolist()):
                per_class_total[lab] = per_class_total.get(lab, 0) + 1
                per_class_correct[lab] = per_class_correct.get(lab, 0) + int(h)
        if save_images_dir is not None:
            _save_pngs(images, batch_labels, offset, save_images_dir)
        offset += len(images)
        t0 = time.perf_counter()
        t_features += t0 - t1
    t1 = time.perf_counter()
    fd_value = fd.compute()
    t_features += time.perf_counter() - t1
    if save_reference_stats is not None:
        ref_stats.save(save_reference_stats)
        ref_desc = dict(ref_desc, saved_to=str(save_reference_stats))

    metrics: Dict[str, Any] = {"fd": fd_value, "fd_name": spec.name}
    metrics[spec.name.lower().replace("-", "_")] = fd_value
    if do_accuracy:
        metrics["conditional_accuracy"] = correct / num_samples
        metrics["per_class_accuracy"] = {
            str(k): per_class_correct[k] / per_class_total[k] for k in sorted(per_class_total)
        }
    else:
        metrics["conditional_accuracy"] = None
    transformer = getattr(pipeline, "transformer", None)
    scheduler = getattr(pipeline, "scheduler", None)
    settings = {
        "pipeline_class": type(pipeline).__name__,
        "pipeline_path": getattr(getattr(pipeline, "config", None), "_name_or_path", None),
        "transformer_class": type(transformer).__name__ if transformer is not None else None,
        "scheduler": type(scheduler).__name__ if scheduler is not None else None,
        "scheduler_config": dict(scheduler.config) if scheduler is not None else None,
        "conditioning": conditioning,
        "num_classes": num_classes,
        "label_scheme": None
        if labels is None
        else ("given" if class_labels is not None or conditioning == "text" else "balanced i % num_classes"),
        "num_prompts": len(prompts) if prompts else None,
        "num_samples": num_samples,
        "batch_size": batch_size,
        "seed": seed,
        "seed_scheme": "sample i uses torch.Generator('cpu').manual_seed(seed + i)",
        "num_inference_steps": _default(params, "num_inference_steps", num_inference_steps),
        "guidance_scale": _default(params, "guidance_scale", guidance_scale),
        "pipeline_kwargs": {
            k: v for k, v in pipeline_kwargs.items() if isinstance(v, (int, float, str, bool, type(None)))
        },
        "image_shape": list(fd.image_shape),
        "device": str(device),
        "dtype": str(getattr(transformer, "dtype", None)),
        **software_versions(),
    }
    return {
        "metrics": metrics,
        "settings": settings,
        "feature_extractor": spec.describe(),
        "reference": ref_desc,
        "timings": timings_record(t_reference, t_generate, t_features, t_start, num_samples),
    }


def _save_pngs(
    images: torch.Tensor, labels: Optional[torch.Tensor], offset: int, folder: Union[str, os.PathLike]
) -> None:
    from PIL import Image

    arrays = (images.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    for i, array in enumerate(arrays):
        suffix = f"_{int(labels[i])}" if labels is not None else ""
        Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array).save(
            Path(folder) / f"{offset + i:06d}{suffix}.png"
        )
