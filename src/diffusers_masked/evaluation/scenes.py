"""Scene score: a small offline GenEval for the Fashion-MNIST scenes (`diffusers_masked.data.scenes`).

A generated image is cut into its 2x2 cells. Each cell is

* **empty** when its *ink* -- the share of the cell's pixels brighter than `EMPTY_INK_LEVEL` (0.1 of full scale) --
  is below `EMPTY_INK_THRESHOLD` (0.015, i.e. about 15 of a 32x32 cell's 1024 pixels). Calibration
  (`calibrate_empty_threshold`): real empty cells have ink 0; the faintest of all 70,000 Fashion-MNIST pictures
  (a shirt of the train split) inks 0.029 of a cell, the faintest test picture 0.050; the threshold is the midpoint
  0.0146 of 0 and 0.029, rounded. Counting bright pixels rather than averaging intensity ignores faint haze and a
  few stray specks, which samples of a diffusion model have and real scenes do not.
* otherwise **classified** by the embedded Fashion-MNIST classifier (`classifier.py`) on the cell's central crop,
  28/32 of the cell: on a 64x64 scene that is exactly the 28x28 picture the generator pasted there, the classifier's
  own input size, so real scenes are classified as well as Fashion-MNIST itself; other image sizes are resized to
  the classifier's input size.

Against the layout the caption asks for (4 class ids or -1 per cell):

* ``item_accuracy``: share of named items found in their cell (cell not empty and classified as the named class);
* ``empty_accuracy``: share of unnamed cells left empty;
* ``scene_score``: the mean of the two (both halves weigh the same whatever the item count);
* ``exact_match``: share of images whose 4 cells are all right (stricter: one wrong cell fails the image).

Real held-out scenes score close to 1 (items are bounded by the classifier's accuracy, about 0.92); captions paired
with other images score near chance (items about 0.06, empty cells about 0.4). FD is reported next to it, like
``evaluate_pipeline`` does it: ``fd`` on whole images (resized to the classifier's input; or Inception FID), and
``fd_cells`` on the classifier features of the 4 cell crops, which sees the items at their own scale.

Python (e.g. from a trainer)::

    from diffusers_masked.data.scenes import load_scenes
    from diffusers_masked.evaluation import evaluate_scenes
    test = load_scenes("data/fashion-mnist-scenes", split="test")
    result = evaluate_scenes(pipeline, test.prompts(), test.layouts, reference="data/fashion-mnist-scenes/test")
    result["metrics"]["scene_score"], result["metrics"]["fd_cells"]
"""

from __future__ import annotations

import inspect
import json
import os
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..data.scenes import (
    CELL_SIZE,
    EMPTY,
    GRID,
    ITEM_OFFSET,
    METADATA_FILE,
    NUM_CELLS,
    POSITIONS,
    SceneSet,
    check_layout,
    load_scenes,
    parse_caption,
    scene_split_dir,
)
from .classifier import FashionMNISTClassifier, load_fashion_mnist_classifier, to_unit_float
from .fashion_mnist import FASHION_MNIST_CLASSES
from .frechet import FeatureSpec, FrechetDistance, ReferenceStats, check_stats_match, compute_reference_stats
from .frechet import stats_cache_key
from .reference import ReferenceLike, reference_stats, resolve_reference
from .sampling import expected_image_shape, generate_images, pipeline_call_parameters, pipeline_conditioning

#: A pixel counts as ink above this intensity (float scale [0, 1]).
EMPTY_INK_LEVEL = 0.1
#: A cell is empty when less than this share of its pixels is ink (calibrated on real scenes, see module doc).
EMPTY_INK_THRESHOLD = 0.015

ImagesLike = Union[torch.Tensor, np.ndarray]
PathLike = Union[str, os.PathLike]

# Cell-feature reference statistics by key (path, mtime, extractor, ...): in-training evaluation pays them once.
_CELL_STATS: Dict[str, ReferenceStats] = {}


# --------------------------------------------------------------------------------------------------------------------
# Cells


def _as_float_images(images: ImagesLike) -> torch.Tensor:
    """(N, H, W) / (N, H, W, C) / (N, C, H, W), uint8 or [0, 1] float, numpy or torch -> float (N, C, H, W)."""
    x = torch.from_numpy(np.asarray(images)) if isinstance(images, np.ndarray) else images
    if x.ndim == 3:
        x = x[:, None]
    if x.ndim == 4 and x.shape[1] not in (1, 3) and x.shape[-1] in (1, 3):
        x = x.permute(0, 3, 1, 2)
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise ValueError(
            "Scene images must be (N, H, W), (N, H, W, C) or (N, C, H, W) with 1 or 3 channels, got "
            f"{tuple(x.shape)}."
        )
    if x.shape[-1] % GRID or x.shape[-2] % GRID:
        raise ValueError(
            f"Scene images are cut into a {GRID}x{GRID} grid: height and width must be even, got "
            f"{tuple(x.shape[-2:])}."
        )
    return to_unit_float(x.detach().cpu())


def _grey(x: torch.Tensor) -> torch.Tensor:
    if x.shape[1] == 3:
        return (x * x.new_tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
    return x


def scene_cells(images: ImagesLike) -> torch.Tensor:
    """The 4 cells of each image: float (N, 4, C, H/2, W/2), cells in reading order."""
    x = _as_float_images(images)
    n, c, h, w = x.shape
    cells = x.reshape(n, c, GRID, h // GRID, GRID, w // GRID).permute(0, 2, 4, 1, 3, 5)
    return cells.reshape(n, NUM_CELLS, c, h // GRID, w // GRID)


def cell_ink(images: ImagesLike, level: float = EMPTY_INK_LEVEL) -> torch.Tensor:
    """Share of each cell's pixels brighter than ``level`` (luminance for colour images): float (N, 4)."""
    cells = scene_cells(images)
    n = cells.shape[0]
    grey = _grey(cells.flatten(0, 1)).reshape(n, NUM_CELLS, -1)
    return (grey > level).float().mean(-1)


def cell_crops(images: ImagesLike, size: Optional[int] = None) -> torch.Tensor:
    """Central 28/32 of every cell (exactly the pasted Fashion-MNIST picture on a 64x64 scene), resized to
    ``size`` when given and different (bilinear, antialiased, as the classifier resizes): float (N * 4, C, s, s)."""
    cells = scene_cells(images).flatten(0, 1)
    ch, cw = cells.shape[-2:]
    mh, mw = round(ch * ITEM_OFFSET / CELL_SIZE), round(cw * ITEM_OFFSET / CELL_SIZE)
    crops = cells[..., mh : ch - mh, mw : cw - mw]
    if size is not None and tuple(crops.shape[-2:]) != (size, size):
        crops = F.interpolate(crops, size=(size, size), mode="bilinear", antialias=True).clamp(0, 1)
    return crops


def _module_device(module: nn.Module) -> torch.device:
    param = next(module.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


@torch.no_grad()
def predict_layouts(
    images: ImagesLike,
    classifier: nn.Module,
    empty_threshold: float = EMPTY_INK_THRESHOLD,
    ink_level: float = EMPTY_INK_LEVEL,
    batch_size: int = 1024,
) -> torch.Tensor:
    """What each cell holds: int64 (N, 4), the classifier's class or -1 where the cell is empty (ink below
    ``empty_threshold``). ``classifier`` maps float [0, 1] crops (B, C, s, s) to logits; ``s`` is its
    ``image_size`` attribute (28 without one)."""
    ink = cell_ink(images, ink_level)
    crops = cell_crops(images, getattr(classifier, "image_size", 28))
    device = _module_device(classifier)
    was_training = classifier.training
    classifier.eval()
    try:
        classes = torch.cat(
            [classifier(chunk.to(device)).argmax(-1).cpu() for chunk in crops.split(batch_size)]
        ).reshape(ink.shape)
    finally:
        classifier.train(was_training)
    return torch.where(ink < empty_threshold, torch.full_like(classes, EMPTY), classes)


def _as_layouts(layouts: Union[Sequence[Sequence[int]], np.ndarray, torch.Tensor], source: str) -> torch.Tensor:
    array = torch.as_tensor(np.asarray(layouts, dtype=np.int64))
    if array.ndim != 2 or array.shape[1] != NUM_CELLS:
        raise ValueError(f"{source} must be (N, {NUM_CELLS}) class ids or {EMPTY} per cell, got {tuple(array.shape)}.")
    return array


# --------------------------------------------------------------------------------------------------------------------
# Scores


def score_layouts(
    predicted: Union[Sequence[Sequence[int]], np.ndarray, torch.Tensor],
    layouts: Union[Sequence[Sequence[int]], np.ndarray, torch.Tensor],
) -> Dict[str, Any]:
    """Scene metrics of predicted against asked-for layouts (both (N, 4), class id or -1 per cell); see the module
    docstring. Also per item count (1-4) and per class. JSON-serialisable; a share without cases is None."""
    pred, target = _as_layouts(predicted, "predicted"), _as_layouts(layouts, "layouts")
    if pred.shape != target.shape:
        raise ValueError(f"{len(pred)} predicted layouts for {len(target)} asked-for layouts.")
    named, empty = target != EMPTY, target == EMPTY
    hit = pred == target
    item_accuracy = _share(hit[named])
    empty_accuracy = _share(hit[empty])
    halves = [v for v in (item_accuracy, empty_accuracy) if v is not None]
    exact = hit.all(1)
    counts = named.sum(1)
    per_count = {}
    for k in range(1, NUM_CELLS + 1):
        rows = counts == k
        if rows.any():
            per_count[str(k)] = {
                "num_images": int(rows.sum()),
                "item_accuracy": _share(hit[rows][named[rows]]),
                "empty_accuracy": _share(hit[rows][empty[rows]]),
                "exact_match": _share(exact[rows]),
            }
    per_class = {
        name: _share(hit[target == c]) for c, name in enumerate(FASHION_MNIST_CLASSES) if (target == c).any()
    }
    per_position = {POSITIONS[c]: _share(hit[:, c][named[:, c]]) for c in range(NUM_CELLS)}
    # Why items are missed: left empty, or drawn as another class.
    missed = named & ~hit
    return {
        "scene_score": sum(halves) / len(halves) if halves else None,
        "item_accuracy": item_accuracy,
        "empty_accuracy": empty_accuracy,
        "exact_match": _share(exact),
        "num_images": len(target),
        "num_named_items": int(named.sum()),
        "num_empty_cells": int(empty.sum()),
        "missed_items_left_empty": int((missed & (pred == EMPTY)).sum()),
        "missed_items_wrong_class": int((missed & (pred != EMPTY)).sum()),
        "per_item_count": per_count,
        "per_class_item_accuracy": per_class,
        "per_position_item_accuracy": per_position,
    }


def _share(mask: torch.Tensor) -> Optional[float]:
    return float(mask.float().mean()) if mask.numel() else None


def calibrate_empty_threshold(
    images: ImagesLike,
    layouts: Union[Sequence[Sequence[int]], np.ndarray, torch.Tensor],
    ink_level: float = EMPTY_INK_LEVEL,
) -> Dict[str, float]:
    """The empty-cell threshold that real scenes suggest: the midpoint between the most ink of an empty cell and the
    least ink of a filled one (``threshold``), with both ends. `EMPTY_INK_THRESHOLD` is this on Fashion-MNIST."""
    ink = cell_ink(images, ink_level)
    target = _as_layouts(layouts, "layouts")
    filled, empty = ink[target != EMPTY], ink[target == EMPTY]
    if not len(filled):
        raise ValueError("Calibration needs scenes with items.")
    max_empty = float(empty.max()) if len(empty) else 0.0
    min_filled = float(filled.min())
    if max_empty >= min_filled:
        raise ValueError(
            f"Empty and filled cells overlap in ink ({max_empty:.4f} >= {min_filled:.4f}): these are not clean real "
            "scenes (or their layouts do not match their images)."
        )
    return {
        "threshold": (max_empty + min_filled) / 2,
        "max_empty_ink": max_empty,
        "min_item_ink": min_filled,
        "ink_level": ink_level,
    }


def _load_classifier(
    classifier: Optional[nn.Module],
    classifier_path: Optional[PathLike],
    cache_dir: Optional[PathLike],
    progress: bool,
) -> Tuple[nn.Module, Dict[str, Any]]:
    if classifier is not None:
        return classifier, {"classifier": type(classifier).__name__, "path": None}
    model, info = load_fashion_mnist_classifier(classifier_path, cache_dir=cache_dir, progress=progress)
    keep = ("path", "sha256", "test_accuracy", "seed", "epochs")
    return model, {"classifier": type(model).__name__, **{k: info[k] for k in keep if k in info}}


def score_scenes(
    images: ImagesLike,
    layouts: Union[Sequence[Sequence[int]], np.ndarray, torch.Tensor],
    classifier: Optional[nn.Module] = None,
    classifier_path: Optional[PathLike] = None,
    cache_dir: Optional[PathLike] = None,
    empty_threshold: float = EMPTY_INK_THRESHOLD,
    ink_level: float = EMPTY_INK_LEVEL,
    progress: bool = True,
) -> Dict[str, Any]:
    """`score_layouts` of ``images`` (already generated, or real) against ``layouts``: the cells classified by
    ``classifier`` (default: the cached Fashion-MNIST classifier, trained once when missing)."""
    target = _as_layouts(layouts, "layouts")
    if len(target) != len(images):
        raise ValueError(f"{len(images)} images for {len(target)} layouts.")
    model, _ = _load_classifier(classifier, classifier_path, cache_dir, progress)
    return score_layouts(predict_layouts(images, model, empty_threshold, ink_level), target)


# --------------------------------------------------------------------------------------------------------------------
# Generation + scoring


class CallablePipeline:
    """Lets a plain function stand in for a text-to-image pipeline (tests, custom samplers).

    ``fn(prompt=[...], generator=[...], **kwargs)`` returns images for the prompts: a tensor / array (B, C, H, W)
    or (B, H, W), uint8 or [0, 1] float, or an object with ``.images``. Keyword arguments of the evaluation
    (``num_inference_steps``, ``guidance_scale``, ...) reach ``fn`` only where its signature takes them."""

    def __init__(self, fn: Callable[..., Any]):
        self.fn = fn
        self._progress_bar_config: Dict[str, Any] = {}
        params = inspect.signature(fn).parameters
        self._takes_all = any(p.kind == p.VAR_KEYWORD for p in params.values())
        self._params = set(params)

    def set_progress_bar_config(self, **kwargs: Any) -> None:
        self._progress_bar_config.update(kwargs)

    def __call__(
        self,
        prompt: List[str],
        generator: Optional[List[torch.Generator]] = None,
        output_type: str = "pt",
        **kwargs: Any,
    ) -> SimpleNamespace:
        kwargs = {k: v for k, v in kwargs.items() if self._takes_all or k in self._params}
        out = self.fn(prompt=prompt, generator=generator, **kwargs)
        images = getattr(out, "images", out)
        return SimpleNamespace(images=_as_float_images(images))


def _scene_reference(
    reference: Union[ReferenceLike, SceneSet, None],
) -> Union[ReferenceLike, None]:
    """Scene sets become their images; a scene data set folder becomes its folder of test images (reading the whole
    root recursively would mix in the training scenes)."""
    if isinstance(reference, SceneSet):
        return reference.images
    if isinstance(reference, (str, os.PathLike)) and Path(reference).is_dir():
        try:
            return str(scene_split_dir(reference, "test"))
        except FileNotFoundError:
            return reference  # a plain folder of images
    return reference


def resized_scene_reference(split_dir: PathLike, resolution: int) -> Union[str, np.ndarray]:
    """The real scenes of a split folder as the FD reference of ``resolution``-pixel samples: the folder itself at the
    scenes' own size, else its images resized as the trainer resizes its training images (`resize_center_crop`),
    uint8 (N, resolution, resolution). A model trained with ``--resolution 32`` is then compared with 32x32 scenes."""
    from ..data.images import resize_center_crop

    # One image tells the size; the folder itself is read again by the FD reference when it is returned as is.
    if load_scenes(split_dir, limit=1).images.shape[-2:] == (resolution, resolution):
        return str(split_dir)
    images = load_scenes(split_dir).images
    return np.stack([resize_center_crop(im[..., None], resolution)[..., 0] for im in images])


def _cell_reference_stats(
    reference: ReferenceLike,
    spec: FeatureSpec,
    image_shape: Tuple[int, int, int],
    num_samples: Optional[int],
    device: Union[str, torch.device],
) -> Tuple[Optional[ReferenceStats], Dict[str, Any]]:
    """Cell-crop feature statistics of the reference images; None when the reference holds statistics only (an
    ``.npz`` of mu / sigma), which cannot be cut into cells."""
    key = None
    if isinstance(reference, (str, os.PathLike)):
        path = Path(reference)
        mtime = path.stat().st_mtime if path.exists() else None
        parts = {"ref": str(reference), "mtime": mtime, "spec": spec.identity, "shape": list(image_shape)}
        key = stats_cache_key({**parts, "n": num_samples, "cells": True})
        if key in _CELL_STATS:
            return _CELL_STATS[key], {"type": "cached", **_CELL_STATS[key].describe()}
    images, stats, desc = resolve_reference(reference, image_shape, num_samples)
    if images is None:
        return None, {**desc, "note": "statistics only: no cell statistics"}
    crops = cell_crops(images, getattr(spec.classifier, "image_size", 28))
    source = f"cells of {desc.get('path', desc['type'])}"
    stats = compute_reference_stats(spec, crops.split(1000), device=device, source=source)
    if key is not None:
        _CELL_STATS[key] = stats
    return stats, {**desc, "num_cells": len(crops)}


def evaluate_scenes(
    pipeline: Any,
    prompts: Sequence[str],
    layouts: Optional[Union[Sequence[Sequence[int]], np.ndarray, torch.Tensor]] = None,
    reference: Union[ReferenceLike, SceneSet, None] = None,
    num_samples: Optional[int] = None,
    batch_size: int = 64,
    seed: int = 0,
    num_inference_steps: Optional[int] = None,
    guidance_scale: Optional[float] = None,
    classifier: Optional[nn.Module] = None,
    classifier_path: Optional[PathLike] = None,
    cache_dir: Optional[PathLike] = None,
    feature: Union[str, nn.Module, FeatureSpec] = "fashion-mnist",
    inception_weights: Optional[PathLike] = None,
    empty_threshold: float = EMPTY_INK_THRESHOLD,
    ink_level: float = EMPTY_INK_LEVEL,
    reference_num_samples: Optional[int] = None,
    save_images_dir: Optional[PathLike] = None,
    progress: bool = True,
    **pipeline_kwargs: Any,
) -> Dict[str, Any]:
    r"""Generate one image per prompt (cycled up to ``num_samples``) and report the scene score next to FD.

    Mirrors `evaluate_pipeline` (same seeding, same report layout) and is as cheap to call again from a trainer:
    classifier, feature specs and reference statistics stay cached in memory.

    Args:
        pipeline: A text-to-image pipeline of this package, any diffusers pipeline taking ``prompt`` /
            ``generator`` / ``output_type``, or a plain function (see `CallablePipeline`).
        prompts: Captions in the scene grammar (e.g. ``load_scenes(path, "test").prompts()``).
        layouts: The layout each prompt asks for ((N, 4), class id or -1); parsed from the prompts when None.
        reference: Real scenes for FD: a scene data set folder (its ``test`` split is used), a split folder, a
            `SceneSet`, an image array, or what `evaluate_pipeline` takes (an ``.npz`` of statistics gives ``fd``
            only). None skips FD.
        num_samples: Images to generate (default: one per prompt). Sample ``i`` uses prompt ``i % len(prompts)``
            and seed ``seed + i``.
        classifier / classifier_path / cache_dir: The cell classifier (default: the cached Fashion-MNIST one).
        feature / inception_weights: Features of the whole-image ``fd`` (as `evaluate_pipeline`); ``fd_cells``
            always uses the cell classifier's features (when it is a `FashionMNISTClassifier`).
        empty_threshold / ink_level: The empty-cell rule (module docstring).
        save_images_dir: Also write the samples as PNGs with a ``metadata.jsonl`` (prompt, asked-for and predicted
            layout), a scene folder that `load_scenes` reads back.
        pipeline_kwargs: Passed to the pipeline call (only those its signature takes).

    Returns:
        ``{"metrics": {"scene_score", "item_accuracy", "empty_accuracy", "exact_match", "fd", "fd_name",
        "fd_cells", ...}, "settings", "classifier", "feature_extractor", "reference", "timings"}``; JSON-serialisable.
    """
    from .evaluator import _default, _save_pngs, get_feature_spec, software_versions, timings_record

    t_start = time.perf_counter()
    prompts = list(prompts)
    if not prompts:
        raise ValueError("evaluate_scenes needs prompts: e.g. load_scenes(folder, 'test').prompts().")
    if layouts is None:
        layouts = [parse_caption(p) for p in prompts]
    target = _as_layouts([check_layout(l) for l in np.asarray(layouts).tolist()], "layouts")
    if len(target) != len(prompts):
        raise ValueError(f"{len(target)} layouts for {len(prompts)} prompts: give one layout per prompt.")
    num_samples = len(prompts) if num_samples is None else int(num_samples)
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}.")
    if not hasattr(pipeline, "set_progress_bar_config") and callable(pipeline) and not isinstance(pipeline, nn.Module):
        pipeline = CallablePipeline(pipeline)
    conditioning = pipeline_conditioning(pipeline)
    if conditioning != "text":
        raise ValueError(
            f"Scene evaluation generates from captions, but {type(pipeline).__name__} is {conditioning} (it takes no "
            "prompt). Train a text-to-image model on the scene data set, or pass a function of (prompt, generator)."
        )
    device = getattr(pipeline, "device", torch.device("cpu"))

    # Classifier and feature extractors (loaded once per process).
    clf, clf_info = _load_classifier(classifier, classifier_path, cache_dir, progress)
    if isinstance(feature, str) and feature in ("fashion-mnist", "fmnist") and isinstance(clf, FashionMNISTClassifier):
        spec = get_feature_spec(clf)  # the same network for cells and whole images
    else:
        spec = get_feature_spec(feature, None, inception_weights, classifier_path, cache_dir, progress)
    cell_spec = get_feature_spec(clf) if isinstance(clf, FashionMNISTClassifier) else None

    # Reference first: a bad reference fails before the (expensive) generation.
    reference = _scene_reference(reference)
    t_reference = 0.0
    ref_desc: Dict[str, Any] = {}
    cell_desc: Dict[str, Any] = {}
    fd = fd_cells = None

    def open_reference(shape: Tuple[int, int, int]) -> None:
        nonlocal fd, fd_cells, ref_desc, cell_desc, t_reference
        if reference is None:
            return
        t0 = time.perf_counter()
        stats, ref_desc = reference_stats(
            reference, spec, shape, reference_num_samples, device=device, cache_dir=cache_dir
        )
        check_stats_match(stats, spec, shape)
        fd = FrechetDistance(spec, stats, device=device)
        if cell_spec is not None:
            cell_stats, cell_desc = _cell_reference_stats(reference, cell_spec, shape, reference_num_samples, device)
            if cell_stats is not None:
                fd_cells = FrechetDistance(cell_spec, cell_stats, device=device)
        t_reference += time.perf_counter() - t0

    image_shape = expected_image_shape(pipeline)
    if image_shape is not None:
        open_reference(image_shape)

    sample_prompts = [prompts[i % len(prompts)] for i in range(num_samples)]
    sample_layouts = target[torch.arange(num_samples) % len(prompts)]
    predicted: List[torch.Tensor] = []
    rows: List[str] = []
    if save_images_dir is not None:
        Path(save_images_dir).mkdir(parents=True, exist_ok=True)
    t_generate = t_score = 0.0
    offset = 0
    t0 = time.perf_counter()
    for images, _ in generate_images(
        pipeline,
        num_samples,
        batch_size,
        seed,
        num_inference_steps,
        guidance_scale,
        prompts=sample_prompts,
        progress=progress,
        **pipeline_kwargs,
    ):
        t1 = time.perf_counter()
        t_generate += t1 - t0
        if image_shape is None:
            image_shape = tuple(images.shape[1:])
            open_reference(image_shape)
        pred = predict_layouts(images, clf, empty_threshold, ink_level)
        predicted.append(pred)
        if fd is not None:
            fd.update(images)
        if fd_cells is not None:
            fd_cells.update(cell_crops(images, getattr(clf, "image_size", 28)))
        if save_images_dir is not None:
            _save_pngs(images, None, offset, save_images_dir)
            for i in range(len(images)):
                row = {
                    "file_name": f"{offset + i:06d}.png",
                    "text": sample_prompts[offset + i],
                    "layout": sample_layouts[offset + i].tolist(),
                    "predicted_layout": pred[i].tolist(),
                }
                rows.append(json.dumps(row))
        offset += len(images)
        t0 = time.perf_counter()
        t_score += t0 - t1
    if save_images_dir is not None:
        (Path(save_images_dir) / METADATA_FILE).write_text("".join(r + "\n" for r in rows), encoding="utf-8")

    t1 = time.perf_counter()
    metrics = score_layouts(torch.cat(predicted), sample_layouts)
    fd_value = fd.compute() if fd is not None and num_samples >= 2 else None
    fd_cells_value = fd_cells.compute() if fd_cells is not None and num_samples >= 1 else None
    t_score += time.perf_counter() - t1
    metrics.update(
        {
            "fd": fd_value,
            "fd_name": spec.name,
            "fd_cells": fd_cells_value,
            "fd_cells_name": f"{cell_spec.name}-cells" if cell_spec is not None else None,
        }
    )

    params = pipeline_call_parameters(pipeline)
    transformer = getattr(pipeline, "transformer", None)
    scheduler = getattr(pipeline, "scheduler", None)
    settings: Dict[str, Any] = {
        "mode": "scenes",
        "pipeline_class": type(pipeline).__name__,
        "pipeline_path": getattr(getattr(pipeline, "config", None), "_name_or_path", None),
        "transformer_class": type(transformer).__name__ if transformer is not None else None,
        "scheduler": type(scheduler).__name__ if scheduler is not None else None,
        "conditioning": conditioning,
        "num_prompts": len(prompts),
        "num_samples": num_samples,
        "batch_size": batch_size,
        "seed": seed,
        "seed_scheme": "sample i uses prompt i % num_prompts and torch.Generator('cpu').manual_seed(seed + i)",
        "num_inference_steps": _default(params, "num_inference_steps", num_inference_steps),
        "guidance_scale": _default(params, "guidance_scale", guidance_scale),
        "pipeline_kwargs": {
            k: v for k, v in pipeline_kwargs.items() if isinstance(v, (int, float, str, bool, type(None)))
        },
        "empty_rule": f"cell empty when < {empty_threshold} of its pixels exceed {ink_level}",
        "empty_threshold": empty_threshold,
        "ink_level": ink_level,
        "image_shape": list(image_shape) if image_shape is not None else None,
        "device": str(device),
        **software_versions(),
    }
    return {
        "metrics": metrics,
        "settings": settings,
        "classifier": clf_info,
        "feature_extractor": spec.describe(),
        "reference": {**ref_desc, "cells": cell_desc} if reference is not None else None,
        "timings": timings_record(t_reference, t_generate, t_score, t_start, num_samples),
    }
