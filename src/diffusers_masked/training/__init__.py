"""Training: typed configs, objectives, the shared Accelerate trainer and one recipe per model."""

from ..data import FASHION_MNIST_CLASSES, load_fashion_mnist, load_fashion_mnist_arrays, read_idx
from .cli import build_parser, parse_args
from .config import TrainConfig
from .context import LossOutput, TrainContext
from .objectives import DDPMObjective, EDMObjective, NoisyBatch, Objective, build_objective
from .recipe import TrainingRecipe
from .trainer import Trainer, main

__all__ = [
    "DDPMObjective",
    "EDMObjective",
    "FASHION_MNIST_CLASSES",
    "LossOutput",
    "NoisyBatch",
    "Objective",
    "TrainConfig",
    "TrainContext",
    "Trainer",
    "TrainingRecipe",
    "build_objective",
    "build_parser",
    "load_fashion_mnist",
    "load_fashion_mnist_arrays",
    "main",
    "parse_args",
    "read_idx",
]
