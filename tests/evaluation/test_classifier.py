import time

import pytest
import torch

from diffusers_masked.evaluation import (
    FashionMNISTClassifier,
    load_classifier_file,
    load_fashion_mnist_classifier,
    save_classifier,
    train_fashion_mnist_classifier,
)


def _tiny_run(seed):
    return train_fashion_mnist_classifier(
        seed=seed,
        epochs=1,
        batch_size=64,
        channels=(4, 8),
        hidden_size=16,
        max_train_samples=256,
        max_test_samples=256,
        progress=False,
    )


def test_classifier_training_is_deterministic_under_a_seed(fashion_mnist):
    rng_before = torch.get_rng_state()
    a, info_a = _tiny_run(seed=3)
    assert torch.equal(torch.get_rng_state(), rng_before), "training must not disturb the global RNG"
    b, info_b = _tiny_run(seed=3)
    c, _ = _tiny_run(seed=4)
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa, pb), name
    assert not torch.equal(a.head.weight, c.head.weight)
    assert info_a["test_accuracy"] == info_b["test_accuracy"]
    assert info_a["num_train_samples"] == 256 and 0.0 <= info_a["test_accuracy"] <= 1.0


def test_classifier_save_load_round_trip(tmp_path, tiny_classifier):
    path = save_classifier(tiny_classifier, {"test_accuracy": 0.5}, tmp_path / "clf.safetensors")
    loaded, info = load_classifier_file(path)
    assert info["test_accuracy"] == 0.5 and len(info["sha256"]) == 64
    assert loaded.config == tiny_classifier.config
    x = torch.rand(5, 1, 28, 28)
    torch.testing.assert_close(loaded.features(x), tiny_classifier.features(x))
    with pytest.raises(FileNotFoundError, match="not found"):
        load_classifier_file(tmp_path / "missing.safetensors")


def test_classifier_accepts_other_sizes_colour_and_uint8(tiny_classifier):
    x = torch.rand(3, 1, 32, 32)
    assert tiny_classifier(x).shape == (3, 10)
    assert tiny_classifier.features(x.expand(-1, 3, -1, -1)).shape == (3, 16)
    u8 = (x * 255).round().to(torch.uint8)
    torch.testing.assert_close(tiny_classifier.features(u8), tiny_classifier.features(u8.float() / 255))
    with pytest.raises(ValueError, match="1 or 3"):
        tiny_classifier(torch.rand(2, 4, 28, 28))


def test_no_cached_classifier_and_no_training_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="--train_classifier"):
        load_fashion_mnist_classifier(cache_dir=tmp_path, train_if_missing=False)


@pytest.mark.slow
def test_default_classifier_reaches_90_percent(fashion_mnist, tmp_path):
    start = time.perf_counter()
    model, info = load_fashion_mnist_classifier(cache_dir=tmp_path, progress=False)
    assert info["test_accuracy"] >= 0.90, info
    assert isinstance(model, FashionMNISTClassifier)
    # Second call: from memory / disk, no retraining.
    elapsed = time.perf_counter() - start
    start = time.perf_counter()
    load_fashion_mnist_classifier(cache_dir=tmp_path)
    assert time.perf_counter() - start < max(1.0, 0.1 * elapsed)
