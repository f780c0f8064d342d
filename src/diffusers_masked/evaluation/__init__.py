"""Offline evaluation: Fréchet distance (FD-FMNIST with an embedded Fashion-MNIST classifier, or standard Inception
FID from local weights) and conditional accuracy of samples from any pipeline of this package.

Command line: ``python -m diffusers_masked.evaluate --help``. From Python (e.g. during training)::

    from diffusers_masked.evaluation import evaluate_pipeline
    result = evaluate_pipeline(pipeline, reference="fashion-mnist", num_samples=1000)
    result["metrics"]["fd"], result["metrics"]["conditional_accuracy"]
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

__all__ = [
    "FASHION_MNIST_CLASSES",
    "ClassifierFeatures",
    "FashionMNISTClassifier",
    "FeatureSpec",
    "FrechetDistance",
    "ReferenceStats",
    "balanced_labels",
    "compute_reference_stats",
    "custom_features",
    "default_cache_dir",
    "evaluate_pipeline",
    "fashion_mnist_features",
    "frechet_distance_between",
    "generate_images",
    "get_feature_spec",
    "inception_features",
    "load_classifier_file",
    "load_fashion_mnist_arrays",
    "load_fashion_mnist_classifier",
    "load_fashion_mnist_reference",
    "read_prompts",
    "reference_stats",
    "resolve_reference",
    "save_classifier",
    "train_fashion_mnist_classifier",
]
