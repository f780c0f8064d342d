"""Offline evaluation: Fréchet distance (FD-FMNIST with an embedded Fashion-MNIST classifier, or standard Inception
FID from local weights) and conditional accuracy of samples from any pipeline of this package.

Command line: ``python -m diffusers_masked.evaluate --help``. From Python (e.g. during training)::

    from diffusers_masked.evaluation import evaluate_pipeline
    result = evaluate_pipeline(pipeline, reference="fashion-mnist", num_samples=1000)
    result["metrics"]["fd"], result["metrics"]["conditional_accuracy"]

Text-to-image on the Fashion-MNIST scenes (`diffusers_masked.data.scenes`): `evaluate_scenes` reports the scene
score (named items found in their cell, empty cells left empty) next to FD; `score_scenes` scores given images.
"""

from .classifier import (
    ClassifierFeatures,
    FashionMNISTClassifier,
    default_cache_dir,
    load_classifier_file,
    load_fashion_mnist_classifier,
    save_classifier,
    train_fashion_mnist_classifier,
)
from .evaluator import evaluate_pipeline, get_feature_spec
from .fashion_mnist import FASHION_MNIST_CLASSES, load_fashion_mnist_arrays, load_fashion_mnist_reference
from .frechet import (
    FeatureSpec,
    FrechetDistance,
    ReferenceStats,
    compute_reference_stats,
    custom_features,
    fashion_mnist_features,
    frechet_distance_between,
    inception_features,
)
from .reference import reference_stats, resolve_reference
from .sampling import balanced_labels, generate_images, read_prompts
from .scenes import (
    EMPTY_INK_LEVEL,
    EMPTY_INK_THRESHOLD,
    CallablePipeline,
    calibrate_empty_threshold,
    cell_crops,
    cell_ink,
    evaluate_scenes,
    predict_layouts,
    resized_scene_reference,
    scene_cells,
    score_layouts,
    score_scenes,
)

__all__ = [
    "EMPTY_INK_LEVEL",
    "EMPTY_INK_THRESHOLD",
    "FASHION_MNIST_CLASSES",
    "CallablePipeline",
    "ClassifierFeatures",
    "FashionMNISTClassifier",
    "FeatureSpec",
    "FrechetDistance",
    "ReferenceStats",
    "balanced_labels",
    "calibrate_empty_threshold",
    "cell_crops",
    "cell_ink",
    "compute_reference_stats",
    "custom_features",
    "default_cache_dir",
    "evaluate_pipeline",
    "evaluate_scenes",
    "fashion_mnist_features",
    "frechet_distance_between",
    "generate_images",
    "get_feature_spec",
    "inception_features",
    "load_classifier_file",
    "load_fashion_mnist_arrays",
    "load_fashion_mnist_classifier",
    "load_fashion_mnist_reference",
    "predict_layouts",
    "resized_scene_reference",
    "read_prompts",
    "reference_stats",
    "resolve_reference",
    "save_classifier",
    "scene_cells",
    "score_layouts",
    "score_scenes",
    "train_fashion_mnist_classifier",
]
