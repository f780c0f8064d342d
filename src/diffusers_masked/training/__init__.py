"""Training: objectives, data, the shared Accelerate trainer and one recipe per model."""

from ..data import FASHION_MNIST_CLASSES, load_fashion_mnist, load_fashion_mnist_arrays, read_idx
from .objectives import DDPMObjective, EDMObjective, NoisyBatch, Objective, build_objective
from .recipe import TrainingRecipe
from .trainer import Trainer, main, parse_args

__all__ = [
    "DDPMObjective",
    "EDMObjective",
    "FASHION_MNIST_CLASSES",
    "NoisyBatch",
    "Objective",
    "Trainer",
    "TrainingRecipe",
    "build_objective",
    "load_fashion_mnist",
    "load_fashion_mnist_arrays",
    "main",
    "parse_args",
    "read_idx",
]
