"""Fréchet distance between feature Gaussians, computed by torchmetrics' `FrechetInceptionDistance`.

A `FeatureSpec` says which network turns images into features (the Fashion-MNIST classifier for "FD-FMNIST", the
torch-fidelity Inception for standard FID, or any `nn.Module`). `ReferenceStats` are the mean and covariance of
reference features, stored as ``.npz`` with ``mu`` / ``sigma`` like ADM / guided-diffusion reference batches.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Optional, Tuple, Union

import numpy as np
import torch
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance

from .classifier import ClassifierFeatures, FashionMNISTClassifier, load_fashion_mnist_classifier, to_unit_float

logger = logging.getLogger(__name__)

INCEPTION_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_WEIGHTS_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_WEIGHTS_FILE}"


@dataclass
class FeatureSpec:
    """How images become features.

    Attributes:
        name: Metric name in reports ("FD-FMNIST", "FID", "FD-custom").
        identity: Fingerprint of the extractor (name + weights hash); reference statistics carry it so that stats of
            one extractor are never compared with features of another.
        metric_kwargs: Arguments of torchmetrics' `FrechetInceptionDistance` (``feature``, ``input_img_size``,
            ``feature_extractor_weights_path``, ``normalize``).
        prepare: Float [0, 1] images (B, C, H, W) -> what the metric's network takes.
        classifier: Optional classifier whose argmax gives conditional accuracy.
        info: Extra facts for the report (classifier test accuracy, weights path, ...).
    """

    name: str
    identity: str
    metric_kwargs: Dict[str, Any]
    prepare: Callable[[torch.Tensor], torch.Tensor] = to_unit_float
    classifier: Optional[nn.Module] = None
    info: Dict[str, Any] = field(default_factory=dict)

    def describe(self) -> Dict[str, Any]:
        return {"name": self.name, "identity": self.identity, **self.info}


def fashion_mnist_features(
    classifier: Optional[FashionMNISTClassifier] = None,
    classifier_path: Optional[Union[str, os.PathLike]] = None,
    cache_dir: Optional[Union[str, os.PathLike]] = None,
    progress: bool = True,
) -> FeatureSpec:
    """FD-FMNIST: penultimate features of the Fashion-MNIST classifier (given, loaded from ``classifier_path``, or
    the cached default, trained once when missing)."""
    if classifier is None:
        classifier, info = load_fashion_mnist_classifier(classifier_path, cache_dir=cache_dir, progress=progress)
        digest = info["sha256"][:12]
        info = {k: info[k] for k in ("path", "test_accuracy", "seed", "epochs", "train_seconds") if k in info}
    else:
        digest = _module_digest(classifier)
        info = {"path": None}
    return FeatureSpec(
        name="FD-FMNIST",
        identity=f"fashion-mnist-classifier-{digest}",
        metric_kwargs={"feature": ClassifierFeatures(classifier), "normalize": True},
        classifier=classifier,
        info={
            "feature_extractor": "FashionMNISTClassifier penultimate layer",
            "num_features": classifier.num_features,
            **info,
        },
    )


def _module_digest(module: nn.Module) -> str:
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:12]


def custom_features(
    module: nn.Module,
    input_img_size: Tuple[int, int, int],
    name: str = "FD-custom",
    classifier: Optional[nn.Module] = None,
) -> FeatureSpec:
    """Any `nn.Module` that maps float [0, 1] images (B, C, H, W) to features (B, D), as torchmetrics accepts it:
    without a ``num_features`` attribute the metric probes it once with a random image of ``input_img_size``."""
    return FeatureSpec(
        name=name,
        identity=f"{type(module).__name__}-{_module_digest(module)}",
        metric_kwargs={"feature": module, "input_img_size": tuple(input_img_size), "normalize": True},
        classifier=classifier,
        info={"feature_extractor": type(module).__name__, "input_img_size": list(input_img_size)},
    )


def _to_rgb_uint8(images: torch.Tensor) -> torch.Tensor:
    x = to_unit_float(images)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    return (x.clamp(0, 1) * 255).round().to(torch.uint8)


def inception_features(weights_path: Optional[Union[str, os.PathLike]]) -> FeatureSpec:
    """Standard FID: the 2048-d pool features of torch-fidelity's TF-compatible Inception-v3, from a local weights
    file (never downloaded here). Grey images are repeated to RGB; torch-fidelity resizes to 299 itself."""
    if weights_path is None or not Path(weights_path).is_file():
        where = f" ({weights_path} does not exist)" if weights_path is not None else ""
        raise FileNotFoundError(
            f"Standard FID needs the torch-fidelity Inception-v3 weights file{where}. This tool never downloads: "
            f"fetch {INCEPTION_WEIGHTS_URL} on a machine with network access and pass its path with "
            "--inception_weights (Python: inception_weights=...). Without it, use the Fashion-MNIST feature "
            "(--feature fashion-mnist)."
        )
    try:
        import torch_fidelity  # noqa: F401
    except ImportError as err:
        raise ImportError(
            "Standard FID runs torchmetrics' Inception, which needs torch-fidelity: `pip install torch-fidelity` "
            "(or `pip install torchmetrics[image]`). It requires torchvision: install the torchvision build that "
            "matches your torch (e.g. from https://download.pytorch.org/whl/), or `import peft` / diffusers' "
            "LoRA loaders break with 'operator torchvision::nms does not exist'."
        ) from err
    weights_path = str(Path(weights_path).resolve())
    with open(weights_path, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()[:12]
    return FeatureSpec(
        name="FID",
        identity=f"inception-v3-compat-2048-{digest}",
        metric_kwargs={"feature": 2048, "feature_extractor_weights_path": weights_path, "normalize": False},
        prepare=_to_rgb_uint8,
        info={"feature_extractor": "torch-fidelity inception-v3-compat pool3 (2048)", "weights_path": weights_path},
    )


def build_metric(spec: FeatureSpec, device: Union[str, torch.device] = "cpu") -> FrechetInceptionDistance:
    """A fresh torchmetrics metric for ``spec`` on ``device`` (double-precision states, eigenvalue-based trace of
    the matrix square root inside torchmetrics)."""
    return FrechetInceptionDistance(reset_real_features=False, **spec.metric_kwargs).to(device)


@dataclass
class ReferenceStats:
    """Mean ``mu`` (D,) and covariance ``sigma`` (D, D) of reference features, plus where they came from.

    ``num_samples`` is 0 when unknown (stats from elsewhere); ``feature_extractor`` is the `FeatureSpec.identity`
    they were computed with (None for foreign files such as ADM's); ``image_shape`` is (C, H, W) of the images."""

    mu: np.ndarray
    sigma: np.ndarray
    num_samples: int = 0
    feature_extractor: Optional[str] = None
    image_shape: Optional[Tuple[int, int, int]] = None
    source: Optional[str] = None

    def __post_init__(self):
        self.mu = np.asarray(self.mu, dtype=np.float64).reshape(-1)
        self.sigma = np.asarray(self.sigma, dtype=np.float64)
        d = self.mu.shape[0]
        if self.sigma.shape != (d, d):
            raise ValueError(f"sigma must have shape ({d}, {d}) to match mu, got {self.sigma.shape}.")
        if self.image_shape is not None:
            self.image_shape = tuple(int(v) for v in self.image_shape)

    @property
    def dim(self) -> int:
        return self.mu.shape[0]

    def save(self, path: Union[str, os.PathLike]) -> Path:
        """Write ``mu`` / ``sigma`` (float64, the ADM key names) plus our metadata as plain arrays (no pickle)."""
        path = Path(path)
        if path.suffix != ".npz":
            raise ValueError(f"Reference statistics are saved as .npz, got {path}.")
        path.parent.mkdir(parents=True, exist_ok=True)
        extra: Dict[str, Any] = {"num_samples": np.int64(self.num_samples)}
        if self.feature_extractor:
            extra["feature_extractor"] = np.str_(self.feature_extractor)
        if self.image_shape:
            extra["image_shape"] = np.asarray(self.image_shape, dtype=np.int64)
        if self.source:
            extra["source"] = np.str_(self.source)
        tmp = path.with_name(path.stem + f".tmp{os.getpid()}.npz")
        np.savez(tmp, mu=self.mu, sigma=self.sigma, **extra)
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: Union[str, os.PathLike]) -> "ReferenceStats":
        """Read an ``.npz`` with ``mu`` and ``sigma`` (ours or an ADM / guided-diffusion reference batch)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"Reference statistics file {path} does not exist.")
        with np.load(path, allow_pickle=False) as data:
            keys = set(data.files)
            if not {"mu", "sigma"} <= keys:
                raise ValueError(
                    f"{path} has no 'mu' / 'sigma' arrays (keys: {sorted(keys)}); save statistics with "
                    "--save_reference_stats, or pass the images instead."
                )
            return cls(
                mu=data["mu"],
                sigma=data["sigma"],
                num_samples=int(data["num_samples"]) if "num_samples" in keys else 0,
                feature_extractor=str(data["feature_extractor"]) if "feature_extractor" in keys else None,
                image_shape=tuple(data["image_shape"].tolist()) if "image_shape" in keys else None,
                source=str(data["source"]) if "source" in keys else str(path),
            )

    def describe(self) -> Dict[str, Any]:
        return {
            "source": self.source,
            "num_samples": self.num_samples,
            "feature_extractor": self.feature_extractor,
            "image_shape": list(self.image_shape) if self.image_shape else None,
            "feature_dim": self.dim,
        }


def check_stats_match(stats: ReferenceStats, spec: FeatureSpec, image_shape: Optional[Tuple[int, ...]] = None) -> None:
    """Refuse to compare features of one extractor (or image size) with reference stats of another."""
    if stats.feature_extractor is None:
        logger.warning(
            "Reference statistics %s do not say which feature extractor made them; assuming %s.",
            stats.source,
            spec.identity,
        )
    if stats.feature_extractor is not None and stats.feature_extractor != spec.identity:
        raise ValueError(
            f"The reference statistics ({stats.source}) were computed with feature extractor "
            f"{stats.feature_extractor!r}, but this evaluation uses {spec.identity!r}. Recompute them from images "
            "with the same extractor (pass the images as reference and --save_reference_stats)."
        )
    if image_shape is not None and stats.image_shape is not None and tuple(stats.image_shape) != tuple(image_shape):
        raise ValueError(
            f"Image sizes differ: the reference statistics ({stats.source}) come from images of shape (C, H, W) = "
            f"{tuple(stats.image_shape)}, the generated images are {tuple(image_shape)}. Use reference images of the "
            "generated size."
        )


def stats_from_metric(metric: FrechetInceptionDistance) -> Tuple[np.ndarray, np.ndarray, int]:
    """(mu, sigma, n) of the metric's real-feature states, the same estimator torchmetrics uses in `compute`."""
    n = int(metric.real_features_num_samples)
    if n < 2:
        raise ValueError(f"At least 2 reference images are needed for a covariance, got {n}.")
    mu = metric.real_features_sum / n
    sigma = (metric.real_features_cov_sum - n * torch.outer(mu, mu)) / (n - 1)
    return mu.cpu().numpy(), sigma.cpu().numpy(), n


def load_stats_into_metric(metric: FrechetInceptionDistance, stats: ReferenceStats) -> None:
    """Set the metric's real-feature states so that its `compute` sees exactly ``stats`` (inverse of
    `stats_from_metric`; when n is unknown any n >= 2 reconstructs the same mu and sigma)."""
    dim = metric.real_features_sum.shape[0]
    if stats.dim != dim:
        raise ValueError(
            f"The reference statistics ({stats.source}) have {stats.dim} features, the feature extractor gives "
            f"{dim}: they were made with another network (2048 = Inception FID, 128 = the Fashion-MNIST classifier)."
        )
    n = max(stats.num_samples, 2)
    device = metric.real_features_sum.device
    mu = torch.as_tensor(stats.mu, dtype=torch.float64, device=device)
    sigma = torch.as_tensor(stats.sigma, dtype=torch.float64, device=device)
    metric.real_features_sum = mu * n
    metric.real_features_cov_sum = sigma * (n - 1) + n * torch.outer(mu, mu)
    metric.real_features_num_samples = torch.tensor(n, dtype=torch.long, device=device)


def compute_reference_stats(
    spec: FeatureSpec,
    batches: Iterable[torch.Tensor],
    device: Union[str, torch.device] = "cpu",
    source: Optional[str] = None,
) -> ReferenceStats:
    """Feature statistics of image batches (uint8 or [0, 1] float, (B, C, H, W), all of one shape)."""
    metric = build_metric(spec, device)
    image_shape = None
    for batch in batches:
        shape = tuple(batch.shape[1:])
        if image_shape is not None and shape != image_shape:
            raise ValueError(f"Reference images have different shapes {image_shape} and {shape}; resize them first.")
        image_shape = shape
        metric.update(spec.prepare(batch.to(device)), real=True)
    if image_shape is None:
        raise ValueError(f"No reference images in {source or 'the reference'}.")
    mu, sigma, n = stats_from_metric(metric)
    return ReferenceStats(mu, sigma, n, spec.identity, image_shape, source)


class FrechetDistance:
    """Accumulates generated images against fixed reference statistics; `compute()` -> float.

    Example:
        >>> fd = FrechetDistance(spec, stats)
        >>> fd.update(images)  # float [0, 1] or uint8, (B, C, H, W), any number of times
        >>> fd.compute()
    """

    def __init__(self, spec: FeatureSpec, reference: ReferenceStats, device: Union[str, torch.device] = "cpu"):
        self.spec = spec
        self.reference = reference
        self.device = device
        self.metric = build_metric(spec, device)
        load_stats_into_metric(self.metric, reference)
        self.image_shape: Optional[Tuple[int, ...]] = None

    def update(self, images: torch.Tensor) -> None:
        shape = tuple(images.shape[1:])
        if self.image_shape is None:
            check_stats_match(self.reference, self.spec, shape)
            self.image_shape = shape
        elif shape != self.image_shape:
            raise ValueError(f"Generated images changed shape from {self.image_shape} to {shape}.")
        self.metric.update(self.spec.prepare(images.to(self.device)), real=False)

    def compute(self) -> float:
        if int(self.metric.fake_features_num_samples) < 2:
            raise ValueError("At least 2 generated images are needed for a Fréchet distance.")
        return float(self.metric.compute())


def frechet_distance_between(
    spec: FeatureSpec, images_a: torch.Tensor, images_b: torch.Tensor, batch_size: int = 500
) -> float:
    """FD between two image sets (convenience for tests and notebooks)."""
    stats = compute_reference_stats(spec, images_a.split(batch_size))
    fd = FrechetDistance(spec, stats)
    for batch in images_b.split(batch_size):
        fd.update(batch)
    return fd.compute()


def stats_cache_key(parts: Dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]
