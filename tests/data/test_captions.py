"""Captioned data: caption columns from an in-memory datasets.Dataset, a save_to_disk folder and an image folder with
metadata.jsonl; several captions per image; caption dropout; the missing-column / empty-caption errors."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from diffusers_masked.data.captions import (
    caption_dropout_mask,
    caption_offsets,
    captions_fingerprint,
    load_captioned_dataset,
    pick_caption_indices,
    pick_captions,
    read_captions,
)
from diffusers_masked.data.images import ImageClassDataset


def _images(n, size=8):
    return [Image.fromarray(np.full((size, size), 30 * i, np.uint8), "L") for i in range(n)]


def _dataset(captions, column="text"):
    import datasets

    return datasets.Dataset.from_dict({"image": _images(len(captions)), column: captions},
                                      features=None).cast_column("image", datasets.Image())


def _image_folder(root, rows, column="text"):
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "metadata.jsonl", "w") as f:
        for i, (image, caption) in enumerate(zip(_images(len(rows)), rows)):
            image.save(root / f"{i:03d}.png")
            f.write(json.dumps({"file_name": f"{i:03d}.png", column: caption}) + "\n")
    return root


def test_in_memory_dataset_with_a_caption_column():
    ds = load_captioned_dataset(_dataset(["a bag", "two sneakers", "a shirt"], "caption"), caption_column="caption")
    assert read_captions(ds, "caption") == [["a bag"], ["two sneakers"], ["a shirt"]]
    item = ImageClassDataset(ds, "image", None, 8, 1, preload=False)[1]  # the pixel part uses data/images.py
    assert item["pixel_values"].shape == (1, 8, 8) and -1 <= item["pixel_values"].min() <= 1


def test_saved_dataset_by_name_and_max_train_samples(tmp_path):
    _dataset([["a", "b"], ["c"], ["d"]]).save_to_disk(str(tmp_path / "saved"))
    ds = load_captioned_dataset(dataset_name=str(tmp_path / "saved"), max_train_samples=2)
    assert read_captions(ds) == [["a", "b"], ["c"]]


def test_image_folder_with_metadata_jsonl(tmp_path):
    rows = [["a bag at top left", "a bag, top left"], ["a sneaker at bottom right"], ["x", "y", "z"]]
    root = _image_folder(tmp_path / "scenes", rows)
    ds = load_captioned_dataset(train_data_dir=root, cache_dir=tmp_path / "hf")
    assert sorted(map(tuple, read_captions(ds))) == sorted(map(tuple, rows))
    images = ImageClassDataset(ds, "image", None, 4, 1)  # decoded + resized by the existing helpers
    assert images[0]["pixel_values"].shape == (1, 4, 4)


def test_missing_caption_column_lists_the_columns(tmp_path):
    with pytest.raises(ValueError, match=r"'text' is not a column.*\['image', 'prompt'\].*--caption_column prompt"):
        load_captioned_dataset(_dataset(["a"], "prompt"))
    with pytest.raises(ValueError, match=r"--image_column 'pixels'"):
        load_captioned_dataset(_dataset(["a"]), image_column="pixels")
    root = tmp_path / "plain"
    root.mkdir()
    _images(1)[0].save(root / "0.png")
    with pytest.raises(ValueError, match="has no metadata.jsonl"):
        load_captioned_dataset(train_data_dir=root, cache_dir=tmp_path / "hf")
    with pytest.raises(ValueError, match="exactly one"):
        load_captioned_dataset(_dataset(["a"]), train_data_dir=root)


def test_empty_captions_name_their_rows():
    with pytest.raises(ValueError, match=r"3 row\(s\).*rows 1, 3, 4; row 1 is \['']"):
        load_captioned_dataset(_dataset([["ok"], [""], ["fine"], ["  "], []]))
    with pytest.raises(ValueError, match=r"rows 0; row 0 is \['a', ''\]"):
        read_captions(_dataset([["a", ""], ["b"]]))
    with pytest.raises(ValueError, match=r"rows 1; row 1 is None"):
        read_captions(_dataset(["a", None]))


def test_several_captions_per_image_all_picked_and_seeded():
    captions = [["a0", "a1", "a2"], ["b0"], ["c0", "c1"]]
    offsets = caption_offsets(captions)
    assert offsets.tolist() == [0, 3, 4, 6]
    images = torch.tensor([0, 1, 2] * 200)
    picks = pick_caption_indices(offsets, images, torch.Generator().manual_seed(3))
    assert set(picks[images == 0].tolist()) == {0, 1, 2}
    assert set(picks[images == 1].tolist()) == {3}
    assert set(picks[images == 2].tolist()) == {4, 5}
    again = pick_caption_indices(offsets, images, torch.Generator().manual_seed(3))
    other = pick_caption_indices(offsets, images, torch.Generator().manual_seed(4))
    assert torch.equal(picks, again) and not torch.equal(picks, other)
    texts, drop = pick_captions(captions, [0, 2, 1], torch.Generator().manual_seed(3))
    assert texts[2] == "b0" and texts[0] in captions[0] and not drop.any()


def test_dropout_rate():
    drop = caption_dropout_mask(20000, 0.1, torch.Generator().manual_seed(0))
    assert abs(drop.float().mean().item() - 0.1) < 0.01
    assert not caption_dropout_mask(100, 0.0).any() and caption_dropout_mask(100, 1.0).all()
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        caption_dropout_mask(4, 1.5)


def test_fingerprint_sees_text_order_and_grouping():
    base = captions_fingerprint([["a", "b"], ["c"]])
    assert base == captions_fingerprint([["a", "b"], ["c"]])
    for other in ([["a", "b"], ["d"]], [["c"], ["a", "b"]], [["a"], ["b", "c"]]):
        assert captions_fingerprint(other) != base
