import gzip
import struct

import numpy as np
import pytest

from diffusers_masked.data import (
    FASHION_MNIST_CLASSES,
    ImageClassDataset,
    load_fashion_mnist,
    load_fashion_mnist_arrays,
    read_idx,
)


def write_idx(path, array, gz=True):
    codes = {np.uint8: 0x08}
    header = bytes([0, 0, codes[array.dtype.type], array.ndim]) + struct.pack(">" + "I" * array.ndim, *array.shape)
    data = header + array.tobytes()
    opener = gzip.open if gz else open
    with opener(path, "wb") as f:
        f.write(data)


@pytest.fixture
def tiny_fmnist(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(6, 28, 28), dtype=np.uint8)
    labels = np.array([0, 1, 2, 9, 9, 3], dtype=np.uint8)
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", images)
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", labels)
    write_idx(tmp_path / "t10k-images-idx3-ubyte", images[:2], gz=False)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", labels[:2], gz=False)
    return tmp_path, images, labels


def test_reader_on_tiny_idx_files(tiny_fmnist):
    root, images, labels = tiny_fmnist
    x, y = load_fashion_mnist_arrays("train", str(root))
    assert np.array_equal(x, images) and y.tolist() == labels.tolist()
    xt, yt = load_fashion_mnist_arrays("test", str(root))
    assert xt.shape == (2, 28, 28)
    ds = load_fashion_mnist("train", str(root))
    assert ds.features["label"].names == FASHION_MNIST_CLASSES
    assert ds.features["label"].int2str(9) == "Ankle boot"
    item = ImageClassDataset(ds, "image", "label", 28, 1)[3]
    assert item["pixel_values"].shape == (1, 28, 28) and item["class_labels"].item() == 9
    assert item["pixel_values"].min() >= -1 and item["pixel_values"].max() <= 1


def test_missing_data_names_the_install_command(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        load_fashion_mnist_arrays("train", str(tmp_path))


def test_corrupt_idx(tmp_path):
    (tmp_path / "bad").write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(ValueError, match="not an idx file"):
        read_idx(tmp_path / "bad")
    write_idx(tmp_path / "trunc", np.zeros((4, 3), dtype=np.uint8), gz=False)
    data = (tmp_path / "trunc").read_bytes()
    (tmp_path / "trunc").write_bytes(data[:-3])
    with pytest.raises(ValueError, match="truncated"):
        read_idx(tmp_path / "trunc")
