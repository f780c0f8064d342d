"""The training data stream's device-resident path (`DeviceBatches`): the same batches as the DataLoader for every
data set it takes, and when --data_on_device keeps the data on the device."""

import json

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from diffusers_masked.data import ImageClassDataset, LatentCacheDataset, collate_batch
from diffusers_masked.data.text_cache import CaptionedImageDataset
from diffusers_masked.training.batches import (
    DeviceBatches,
    EpochBatchSampler,
    gatherable_tensors,
    use_device_data,
)

CPU = torch.device("cpu")


def image_dataset(n=20, size=4):
    import datasets

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(n, size, size), dtype=np.uint8)
    ds = datasets.Dataset.from_dict({"image": list(images), "label": list(rng.integers(0, 10, size=n))},
                                    features=datasets.Features({"image": datasets.Array2D((size, size), "uint8"),
                                                                "label": datasets.Value("int64")}))
    return ImageClassDataset(ds, "image", "label", resolution=size, channels=1, preload=True)


def latent_cache(tmp_path, n=12):
    moments = np.random.default_rng(1).standard_normal((n, 8, 2, 2)).astype(np.float16)
    moments.tofile(tmp_path / "moments.npy")
    np.save(tmp_path / "labels.npy", np.arange(n) % 3)
    (tmp_path / "meta.json").write_text(json.dumps({"shape": list(moments.shape)}))
    return LatentCacheDataset(tmp_path)


def loader_batches(dataset, sampler):
    return list(DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_batch))


def assert_same(loader, device):
    assert len(loader) == len(device) > 0
    for a, b in zip(loader, device):
        assert a.keys() == b.keys()
        for k in a:
            assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("rank", [0, 1])
@pytest.mark.parametrize("epoch,start", [(0, 0), (3, 1)])
def test_images_gathered_on_the_device_match_the_loader(rank, epoch, start):
    dataset = image_dataset()
    sampler = EpochBatchSampler(len(dataset), 3, num_replicas=2, rank=rank, seed=5)
    sampler.set_position(epoch, start)
    device = DeviceBatches(gatherable_tensors(dataset), sampler, CPU)
    assert_same(loader_batches(dataset, sampler), list(device))
    pixels = next(iter(device))["pixel_values"]
    assert pixels.dtype == torch.float32 and -1.0 <= pixels.min() and pixels.max() <= 1.0


def test_latent_cache_gathered_on_the_device_matches_the_loader(tmp_path):
    dataset = latent_cache(tmp_path)
    sampler = EpochBatchSampler(len(dataset), 4, num_replicas=1, rank=0, seed=0)
    assert_same(loader_batches(dataset, sampler), list(DeviceBatches(gatherable_tensors(dataset), sampler, CPU)))


def test_captioned_rows_carry_their_image_index_on_the_host():
    images = image_dataset(n=12)
    captioned = CaptionedImageDataset.__new__(CaptionedImageDataset)
    captioned.images, captioned.return_text = images, False
    sampler = EpochBatchSampler(12, 4, num_replicas=1, rank=0, seed=0)
    perm = sampler.permutation()
    batches = list(DeviceBatches(gatherable_tensors(captioned), sampler, CPU, num_images=5))
    for i, batch in enumerate(batches):
        assert torch.equal(batch["image_index"], perm[4 * i: 4 * i + 4] % 5)
        assert batch["image_index"].device.type == "cpu"
    captioned.return_text = True  # the caption pick happens inside the data set: not a plain gather
    assert gatherable_tensors(captioned) is None


def test_which_data_stays_on_the_device():
    tensors = gatherable_tensors(image_dataset())
    assert use_device_data("always", tensors, CPU)
    assert not use_device_data("never", tensors, CPU)
    assert not use_device_data("auto", tensors, CPU)  # auto: CUDA only
    assert not use_device_data("auto", None, CPU)
    lazy = image_dataset()
    lazy.images = None  # not preloaded: each batch decodes images
    assert gatherable_tensors(lazy) is None
    with pytest.raises(ValueError, match="--data_on_device auto or never"):
        use_device_data("always", None, CPU)
