import numpy as np
import pytest
import torch

from diffusers_masked.evaluation import (
    FrechetDistance,
    ReferenceStats,
    compute_reference_stats,
    custom_features,
    fashion_mnist_features,
    frechet_distance_between,
    inception_features,
    load_fashion_mnist_arrays,
)
from diffusers_masked.evaluation.classifier import ClassifierFeatures


def _class_images(label, n=None):
    images, labels = load_fashion_mnist_arrays("test")
    x = torch.from_numpy(np.array(images[labels == label]))[:, None]
    return x[:n] if n else x


def test_fd_of_a_set_with_itself_is_zero(fashion_mnist, tiny_classifier):
    spec = fashion_mnist_features(classifier=tiny_classifier)
    x = _class_images(0, 400)
    same = frechet_distance_between(spec, x, x)
    # Random-init features have an arbitrary scale: compare with another set of the same class.
    other = frechet_distance_between(spec, x, _class_images(0)[400:800])
    assert other > 0
    assert abs(same) < 1e-6 * other, (same, other)


def test_fd_between_classes_exceeds_fd_within_class(fashion_mnist, tiny_classifier):
    spec = fashion_mnist_features(classifier=tiny_classifier)
    shirts, trousers = _class_images(0), _class_images(1)
    within = frechet_distance_between(spec, shirts[:500], shirts[500:])
    between = frechet_distance_between(spec, shirts[:500], trousers[:500])
    assert between > 5 * within, (within, between)


def test_npz_round_trip_gives_same_fd(tmp_path, tiny_classifier):
    spec = fashion_mnist_features(classifier=tiny_classifier)
    g = torch.Generator().manual_seed(0)
    real = torch.randint(0, 256, (64, 1, 12, 12), generator=g, dtype=torch.uint8)
    fake = torch.rand(40, 1, 12, 12, generator=g)
    stats = compute_reference_stats(spec, real.split(16), source="random")
    path = stats.save(tmp_path / "ref.npz")
    with np.load(path) as data:
        assert {"mu", "sigma"} <= set(data.files)
        assert data["mu"].shape == (16,) and data["sigma"].shape == (16, 16)
    loaded = ReferenceStats.load(path)
    np.testing.assert_allclose(loaded.mu, stats.mu)
    np.testing.assert_allclose(loaded.sigma, stats.sigma)
    assert loaded.num_samples == 64 and loaded.image_shape == (1, 12, 12)
    assert loaded.feature_extractor == spec.identity

    fd_direct = frechet_distance_between(spec, real, fake)
    fd = FrechetDistance(spec, loaded)
    fd.update(fake)
    assert fd.compute() == pytest.approx(fd_direct, rel=1e-5)
    # An ADM-style file with only mu / sigma (no count) reconstructs the same statistics.
    np.savez(tmp_path / "adm.npz", mu=stats.mu, sigma=stats.sigma)
    fd = FrechetDistance(spec, ReferenceStats.load(tmp_path / "adm.npz"))
    fd.update(fake)
    assert fd.compute() == pytest.approx(fd_direct, rel=1e-4)


def test_stats_mismatch_is_refused(tmp_path, tiny_classifier):
    spec = fashion_mnist_features(classifier=tiny_classifier)
    stats = compute_reference_stats(spec, [torch.rand(8, 1, 12, 12)])
    fd = FrechetDistance(spec, stats)
    with pytest.raises(ValueError, match="Image sizes differ"):
        fd.update(torch.rand(4, 1, 16, 16))
    other = fashion_mnist_features(classifier=type(tiny_classifier)(channels=(4, 8), hidden_size=16))
    with pytest.raises(ValueError, match="feature extractor"):
        FrechetDistance(other, stats).update(torch.rand(4, 1, 12, 12))
    with pytest.raises(ValueError, match="features"):
        FrechetDistance(spec, ReferenceStats(np.zeros(2048), np.eye(2048)))
    np.savez(tmp_path / "bad.npz", arr_1=np.zeros(3))
    with pytest.raises(ValueError, match="mu"):
        ReferenceStats.load(tmp_path / "bad.npz")
    with pytest.raises(FileNotFoundError):
        ReferenceStats.load(tmp_path / "missing.npz")


def test_custom_feature_module_is_probed_by_torchmetrics():
    class MeanPool(torch.nn.Module):
        def forward(self, x):
            return torch.nn.functional.adaptive_avg_pool2d(x.float(), 2).flatten(1)

    spec = custom_features(MeanPool(), input_img_size=(1, 8, 8))
    x = torch.rand(30, 1, 8, 8)
    assert abs(frechet_distance_between(spec, x, x)) < 1e-6
    assert frechet_distance_between(spec, x, x * 0.5) > 1e-3


def test_classifier_features_stay_in_eval_mode(tiny_classifier):
    feats = ClassifierFeatures(tiny_classifier)
    feats.train()
    x = torch.rand(6, 1, 28, 28)
    assert not feats.classifier.training
    torch.testing.assert_close(feats(x[:3]), feats(x)[:3])


def test_inception_without_weights_says_how_to_get_them(tmp_path):
    with pytest.raises(FileNotFoundError, match="weights-inception-2015-12-05-6726825d.pth"):
        inception_features(None)
    with pytest.raises(FileNotFoundError, match="never downloads"):
        inception_features(tmp_path / "nope.pth")


def test_inception_without_torch_fidelity_says_what_to_install(tmp_path):
    pytest.importorskip("torchmetrics")
    try:
        import torch_fidelity  # noqa: F401

        pytest.skip("torch-fidelity is installed")
    except ImportError:
        pass
    weights = tmp_path / "weights.pth"
    weights.write_bytes(b"0")
    with pytest.raises(ImportError, match="pip install torch-fidelity"):
        inception_features(weights)
