"""The in-memory data path (decode once, index a batch) gives exactly the per-sample path's batches."""

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, default_collate

from diffusers_masked.data import ImageClassDataset, LatentCacheDataset, collate_batch


def _dataset(n=12, size=10, channels=1, labels=True):
    import datasets

    rng = np.random.default_rng(0)
    shape = (size, size) if channels == 1 else (size, size, channels)
    feature = datasets.Array2D(shape=shape, dtype="uint8") if channels == 1 else datasets.Array3D(shape=shape, dtype="uint8")
    cols = {"image": rng.integers(0, 256, (n, *shape), dtype=np.uint8)}
    feats = {"image": feature}
    if labels:
        cols["label"] = rng.integers(0, 3, n)
        feats["label"] = datasets.ClassLabel(names=["a", "b", "c"])
    return datasets.Dataset.from_dict(cols, features=datasets.Features(feats))


@pytest.mark.parametrize("channels,resolution,labels", [(1, 10, True), (1, 8, True), (3, 10, False)])
def test_preloaded_batches_equal_per_sample_batches(channels, resolution, labels):
    ds = _dataset(channels=channels, labels=labels)
    fast = ImageClassDataset(ds, "image", "label", resolution, channels)
    slow = ImageClassDataset(ds, "image", "label", resolution, channels, preload=False)
    assert fast.images is not None and slow.images is None
    idx = [5, 0, 11, 3]
    batch = fast.__getitems__(idx)
    expected = default_collate([slow[i] for i in idx])
    for key in expected:
        assert batch[key].dtype == expected[key].dtype
        torch.testing.assert_close(batch[key], expected[key], rtol=0, atol=0)
    torch.testing.assert_close(fast[7]["pixel_values"], slow[7]["pixel_values"], rtol=0, atol=0)
    loader = DataLoader(fast, batch_sampler=[idx, idx[:1]], collate_fn=collate_batch)
    assert [b["pixel_values"].shape[0] for b in loader] == [4, 1]
    assert [b["pixel_values"].shape[0] for b in DataLoader(slow, batch_sampler=[idx], collate_fn=collate_batch)] == [4]


def test_preload_checks_channels():
    ds = _dataset(channels=3)
    with pytest.raises(ValueError, match="channels"):
        ImageClassDataset(ds, "image", "label", 10, 1)


def test_latent_cache_batches_equal_per_sample(tmp_path):
    import json

    shape = (6, 8, 2, 2)
    raw = np.memmap(tmp_path / "moments.npy", dtype=np.float16, mode="w+", shape=shape)
    raw[:] = np.random.default_rng(0).standard_normal(shape).astype(np.float16)
    raw.flush()
    np.save(tmp_path / "labels.npy", np.arange(6, dtype=np.int64))
    (tmp_path / "meta.json").write_text(json.dumps({"shape": list(shape), "flip": False, "fingerprint": None}))
    cache = LatentCacheDataset(tmp_path)
    idx = [4, 1, 2]
    batch = cache.__getitems__(idx)
    expected = default_collate([cache[i] for i in idx])
    for key in expected:
        torch.testing.assert_close(batch[key], expected[key], rtol=0, atol=0)
