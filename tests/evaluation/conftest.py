import os

import pytest
import torch

from diffusers_masked.evaluation import FashionMNISTClassifier

FMNIST_DIR = os.environ.get("FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist")


@pytest.fixture
def fashion_mnist():
    """Skips the test when Debian's dataset-fashion-mnist package is not installed."""
    if not os.path.exists(os.path.join(FMNIST_DIR, "t10k-images-idx3-ubyte.gz")):
        pytest.skip("Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    # Never read or write the user's ~/.cache (and never train the real classifier by accident).
    monkeypatch.setenv("DIFFUSERS_MASKED_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def tiny_classifier():
    torch.manual_seed(0)
    return FashionMNISTClassifier(channels=(4, 8), hidden_size=16).eval()
