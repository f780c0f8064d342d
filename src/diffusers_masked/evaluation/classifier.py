"""A small Fashion-MNIST CNN: its penultimate features give "FD-FMNIST", its predictions conditional accuracy.

The Inception network of FID was trained on ImageNet photos and sees 28x28 grey clothes badly. A classifier trained on
the data set itself is the usual domain-specific replacement. It is trained once (seeded, on CPU in about a minute)
and cached as safetensors under ``~/.cache/diffusers_masked/`` (``$DIFFUSERS_MASKED_CACHE`` or ``cache_dir``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

CACHE_ENV_VAR = "DIFFUSERS_MASKED_CACHE"
CLASSIFIER_SUBDIR = "fashion_mnist_classifier"
# Mean / std of Fashion-MNIST train pixels in [0, 1].
_PIXEL_MEAN, _PIXEL_STD = 0.2860, 0.3530

# The recipe of the cached default classifier; changing it changes the cache key.
DEFAULT_CLASSIFIER_RECIPE: Dict[str, Any] = {
    "channels": [32, 64, 128],
    "hidden_size": 128,
    "seed": 0,
    "epochs": 5,
    "batch_size": 256,
    "learning_rate": 3e-3,
}


def default_cache_dir() -> Path:
    """``$DIFFUSERS_MASKED_CACHE`` or ``~/.cache/diffusers_masked``."""
    return Path(os.environ.get(CACHE_ENV_VAR) or Path.home() / ".cache" / "diffusers_masked").expanduser()


def to_unit_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] or float [0, 1] images (B, C, H, W) -> float32 in [0, 1]."""
    if images.dtype == torch.uint8:
        return images.float().div(255.0)
    return images.float()


class FashionMNISTClassifier(nn.Module):
    r"""Conv stages (3x3 stride 2, BatchNorm, ReLU; strided convs instead of max-pool keep CPU training to about a
    minute), then one hidden linear layer (the feature layer) and the class head.

    Args:
        channels (`Sequence[int]`, defaults to `(32, 64, 128)`): Channels of each conv stage (each halves the size).
        hidden_size (`int`, defaults to 128): Width of the penultimate layer = the feature dimension.
        num_classes (`int`, defaults to 10): Number of classes.
        image_size (`int`, defaults to 28): Inputs of another size are resized to it (bilinear, antialiased).
    """

    def __init__(
        self,
        channels: Sequence[int] = (32, 64, 128),
        hidden_size: int = 128,
        num_classes: int = 10,
        image_size: int = 28,
    ):
        super().__init__()
        self.config = {
            "channels": list(channels),
            "hidden_size": hidden_size,
            "num_classes": num_classes,
            "image_size": image_size,
        }
        self.image_size = image_size
        stages, in_ch = [], 1
        spatial = image_size
        for ch in channels:
            stages += [nn.Conv2d(in_ch, ch, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(ch), nn.ReLU()]
            in_ch, spatial = ch, (spatial - 1) // 2 + 1
        self.conv = nn.Sequential(*stages)
        self.hidden = nn.Linear(in_ch * spatial * spatial, hidden_size)
        self.dropout = nn.Dropout(0.25)
        self.head = nn.Linear(hidden_size, num_classes)

    @property
    def num_features(self) -> int:
        return self.config["hidden_size"]

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 or [0, 1] float images (B, 1 or 3, H, W) -> normalised (B, 1, image_size, image_size)."""
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"Expected images of shape (B, 1 or 3, H, W), got {tuple(images.shape)}.")
        x = to_unit_float(images).to(self.hidden.weight.device)
        if x.shape[1] == 3:
            # Fashion-MNIST is grey; a colour sample is compared through its luminance.
            x = (x * x.new_tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
        if x.shape[-2:] != (self.image_size, self.image_size):
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", antialias=True)
        return (x - _PIXEL_MEAN) / _PIXEL_STD

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Penultimate activations (B, hidden_size)."""
        x = self.conv(self.preprocess(images)).flatten(1)
        return F.relu(self.hidden(x))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Class logits (B, num_classes)."""
        return self.head(self.dropout(self.features(images)))


class ClassifierFeatures(nn.Module):
    """Wraps a classifier so that torchmetrics' `FrechetInceptionDistance(feature=...)` gets its penultimate
    features; stays in eval mode whatever the metric does (BatchNorm / Dropout must not change the features)."""

    def __init__(self, classifier: FashionMNISTClassifier):
        super().__init__()
        self.classifier = classifier.eval()
        self.num_features = classifier.num_features

    def train(self, mode: bool = True) -> "ClassifierFeatures":
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier.features(images)


@torch.no_grad()
def classifier_accuracy(
    classifier: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 1000
) -> float:
    """Share of ``images`` (uint8 or [0, 1] float, (N, C, H, W)) that ``classifier`` assigns to ``labels``."""
    was_training = classifier.training
    classifier.eval()
    correct = 0
    for i in range(0, len(images), batch_size):
        logits = classifier(images[i : i + batch_size])
        correct += (logits.argmax(-1).cpu() == labels[i : i + batch_size].cpu()).sum().item()
    classifier.train(was_training)
    return correct / max(len(images), 1)


def train_fashion_mnist_classifier(
    seed: int = 0,
    epochs: int = 5,
    batch_size: int = 256,
    learning_rate: float = 3e-3,
    channels: Sequence[int] = (32, 64, 128),
    hidden_size: int = 128,
    max_train_samples: Optional[int] = None,
    max_test_samples: Optional[int] = None,
    root: Optional[str] = None,
    progress: bool = True,
) -> Tuple[FashionMNISTClassifier, Dict[str, Any]]:
    """Train the classifier on the Fashion-MNIST train split; returns it (eval mode) and a dict with the recipe, the
    test accuracy and the training time. Deterministic for a given ``seed`` on a given machine: initialisation,
    shuffling and dropout draw from generators seeded here, and the global RNG state is restored afterwards."""
    from tqdm.auto import tqdm

    from .fashion_mnist import load_fashion_mnist_arrays

    train_x, train_y = load_fashion_mnist_arrays("train", root)
    test_x, test_y = load_fashion_mnist_arrays("test", root)
    if max_train_samples is not None:
        train_x, train_y = train_x[:max_train_samples], train_y[:max_train_samples]
    if max_test_samples is not None:
        test_x, test_y = test_x[:max_test_samples], test_y[:max_test_samples]
    train_x = torch.from_numpy(np.array(train_x))[:, None]
    train_y = torch.from_numpy(train_y)
    start, cpu_start = time.perf_counter(), time.process_time()
    # enable_grad: the first evaluation of a training run trains this classifier from inside a no-grad block.
    with torch.random.fork_rng(devices=[]), torch.enable_grad():
        torch.manual_seed(seed)
        model = FashionMNISTClassifier(channels=channels, hidden_size=hidden_size)
        shuffle = torch.Generator().manual_seed(seed)
        optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=1e-4)
        steps_per_epoch = (len(train_x) + batch_size - 1) // batch_size
        scheduler = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=learning_rate, total_steps=epochs * steps_per_epoch, pct_start=0.2
        )
        model.train()
        bar = tqdm(total=epochs * steps_per_epoch, desc="Training Fashion-MNIST classifier", disable=not progress)
        for _ in range(epochs):
            order = torch.randperm(len(train_x), generator=shuffle)
            for i in range(0, len(order), batch_size):
                idx = order[i : i + batch_size]
                loss = F.cross_entropy(model(train_x[idx]), train_y[idx])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
        bar.close()
    train_seconds = time.perf_counter() - start
    cpu_seconds = time.process_time() - cpu_start
    model.eval()
    accuracy = classifier_accuracy(model, torch.from_numpy(np.array(test_x))[:, None], torch.from_numpy(test_y))
    info = {
        "seed": seed,
        "epochs": epochs,
        "batch_size": batch_size,
        "learning_rate": learning_rate,
        "channels": list(channels),
        "hidden_size": hidden_size,
        "num_train_samples": len(train_x),
        "num_test_samples": len(test_x),
        "test_accuracy": accuracy,
        "train_seconds": round(train_seconds, 2),
        # CPU time of all threads: on a busy machine wall time overstates the cost, this does not.
        "train_cpu_seconds": round(cpu_seconds, 2),
        "torch_version": torch.__version__,
        "num_threads": torch.get_num_threads(),
    }
    return model, info


def _recipe_key(recipe: Dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:10]


def _file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


_LOADED: Dict[str, Tuple[FashionMNISTClassifier, Dict[str, Any]]] = {}


def load_classifier_file(path: Union[str, os.PathLike]) -> Tuple[FashionMNISTClassifier, Dict[str, Any]]:
    """Load a classifier saved by `save_classifier` (``.safetensors`` with a ``.json`` of the same stem)."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"Classifier weights {path} not found. Leave the path unset to train and cache the default classifier "
            "(about a minute on CPU), or point it at a file written by diffusers_masked.evaluation.save_classifier."
        )
    key = str(path.resolve())
    if key not in _LOADED:
        meta_path = path.with_suffix(".json")
        info = json.loads(meta_path.read_text()) if meta_path.exists() else {}
        model = FashionMNISTClassifier(**info.get("config", {}))
        model.load_state_dict(load_file(str(path)))
        info["sha256"] = _file_sha256(path)
        info["path"] = str(path)
        _LOADED[key] = (model.eval(), info)
    return _LOADED[key]


def save_classifier(model: FashionMNISTClassifier, info: Dict[str, Any], path: Union[str, os.PathLike]) -> Path:
    """Write weights (safetensors) and ``info`` + the model config (JSON next to it); atomic renames so concurrent
    evaluations never read a half-written file."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp))
    meta_tmp = path.with_name(path.stem + f".json.tmp{os.getpid()}")
    meta_tmp.write_text(json.dumps({**info, "config": model.config}, indent=2))
    os.replace(meta_tmp, path.with_suffix(".json"))
    os.replace(tmp, path)
    return path


def default_classifier_path(cache_dir: Optional[Union[str, os.PathLike]] = None) -> Path:
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    return root / CLASSIFIER_SUBDIR / f"classifier-{_recipe_key(DEFAULT_CLASSIFIER_RECIPE)}.safetensors"


def load_fashion_mnist_classifier(
    path: Optional[Union[str, os.PathLike]] = None,
    cache_dir: Optional[Union[str, os.PathLike]] = None,
    train_if_missing: bool = True,
    progress: bool = True,
) -> Tuple[FashionMNISTClassifier, Dict[str, Any]]:
    """The default FD-FMNIST classifier and its info dict (test accuracy, recipe, sha256).

    With ``path`` the file must exist. Otherwise the cached default is used, and trained + cached first when missing
    (``train_if_missing``). Loaded classifiers are kept in memory, so repeated calls (e.g. during training) are free.
    """
    if path is not None:
        return load_classifier_file(path)
    path = default_classifier_path(cache_dir)
    if not path.is_file():
        if not train_if_missing:
            raise FileNotFoundError(
                f"No cached Fashion-MNIST classifier at {path}; run `python -m diffusers_masked.evaluate "
                "--train_classifier` once, or allow training it."
            )
        logger.warning("Training the Fashion-MNIST feature classifier once (cached at %s).", path)
        recipe = DEFAULT_CLASSIFIER_RECIPE
        model, info = train_fashion_mnist_classifier(
            seed=recipe["seed"],
            epochs=recipe["epochs"],
            batch_size=recipe["batch_size"],
            learning_rate=recipe["learning_rate"],
            channels=recipe["channels"],
            hidden_size=recipe["hidden_size"],
            progress=progress,
        )
        logger.warning("Classifier test accuracy %.4f after %.1f s.", info["test_accuracy"], info["train_seconds"])
        save_classifier(model, info, path)
    return load_classifier_file(path)
