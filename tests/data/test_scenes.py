"""Fashion-MNIST scenes: deterministic generator, captions that parse back to the layout of their image, the held-out
split, the folder format (metadata.jsonl, HF imagefolder) and the make_fashion_mnist_scenes.py script. Runs on tiny
synthetic idx files, so it needs no installed data set."""

import gzip
import json
import runpy
import struct
from pathlib import Path

import numpy as np
import pytest

from diffusers_masked.data import FASHION_MNIST_CLASSES
from diffusers_masked.data.scenes import (
    CAPTION_GRAMMAR,
    EMPTY,
    ITEM_NAMES,
    ITEM_OFFSET,
    POSITIONS,
    TEMPLATES,
    cell_origin,
    compose_scene,
    ensure_scenes,
    generate_scenes,
    is_heldout_layout,
    layout_caption,
    layout_captions,
    load_scenes,
    parse_caption,
    write_scenes,
)

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "train_examples" / "make_fashion_mnist_scenes.py"


def _write_idx(path, array):
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(">" + "I" * array.ndim, *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.tobytes())


@pytest.fixture(scope="module")
def tiny_fmnist(tmp_path_factory):
    """Fashion-MNIST stand-in: 5 train and 2 test pictures per class, each one distinct and clearly inked."""
    root = tmp_path_factory.mktemp("fmnist")
    rng = np.random.default_rng(0)
    arrays = {}
    for split, stem, per_class in (("train", "train", 5), ("test", "t10k", 2)):
        labels = np.repeat(np.arange(10, dtype=np.uint8), per_class)
        images = rng.integers(30, 256, size=(len(labels), 28, 28), dtype=np.uint8)
        _write_idx(root / f"{stem}-images-idx3-ubyte.gz", images)
        _write_idx(root / f"{stem}-labels-idx1-ubyte.gz", labels)
        arrays[split] = (images, labels.astype(np.int64))
    return str(root), arrays


def test_generator_is_deterministic_and_byte_identical(tiny_fmnist, tmp_path):
    root, _ = tiny_fmnist
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    for out, seed in ((a, 0), (b, 0), (c, 1)):
        write_scenes(out, num_train=30, num_test=8, seed=seed, fashion_mnist_root=root)
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert len(files) == 30 + 8 + 3  # PNGs, two metadata.jsonl, scenes_info.json
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    for rel in files:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel
    assert (a / "train" / "metadata.jsonl").read_bytes() != (c / "train" / "metadata.jsonl").read_bytes()
    # The test split draws from its own stream: more training scenes leave it unchanged.
    more = generate_scenes(8, "test", seed=0, fashion_mnist=tiny_fmnist[1]["test"])
    assert [json.loads(line)["layout"] for line in (a / "test" / "metadata.jsonl").read_text().splitlines()] == \
        more.layouts.tolist()


def test_captions_parse_back_to_the_layout_of_their_image(tiny_fmnist):
    _, arrays = tiny_fmnist
    for split in ("train", "test"):
        images, labels = arrays[split]
        scenes = generate_scenes(300, split, seed=3, fashion_mnist=arrays[split])
        assert scenes.images.shape == (300, 64, 64) and scenes.images.dtype == np.uint8
        for image, layout, captions, sources in zip(scenes.images, scenes.layouts, scenes.captions, scenes.sources):
            assert 1 <= (layout != EMPTY).sum() <= 4
            assert captions[0] == layout_caption(layout, "at")  # canonical: reading order
            assert len(set(captions)) == len(captions) and 1 <= len(captions) <= len(TEMPLATES) + 1
            for caption in captions:
                assert parse_caption(caption) == layout.tolist(), caption
            for cell in range(4):
                y, x = cell_origin(cell)
                patch = image[y : y + 32, x : x + 32]
                if layout[cell] == EMPTY:
                    assert sources[cell] == EMPTY and not patch.any()
                else:
                    # The picture itself, unresampled, centred with a 2-pixel black border.
                    inner = patch[ITEM_OFFSET : ITEM_OFFSET + 28, ITEM_OFFSET : ITEM_OFFSET + 28]
                    assert np.array_equal(inner, images[sources[cell]])
                    assert labels[sources[cell]] == layout[cell]
                    assert patch.sum() == inner.sum()


def test_test_layouts_are_held_out_from_training(tiny_fmnist):
    _, arrays = tiny_fmnist
    train = generate_scenes(400, "train", fashion_mnist=arrays["train"])
    test = generate_scenes(100, "test", fashion_mnist=arrays["test"])
    assert not any(is_heldout_layout(layout) for layout in train.layouts)
    assert all(is_heldout_layout(layout) for layout in test.layouts)
    assert not {tuple(layout) for layout in train.layouts} & {tuple(layout) for layout in test.layouts}
    # Both splits keep the uniform 1-4 item count.
    for scenes in (train, test):
        counts = np.bincount((scenes.layouts != EMPTY).sum(1), minlength=5)[1:]
        assert counts.min() > 0.15 * len(scenes)
    # A hash of the layout decides, whatever the seed; about the asked-for share of all layouts.
    assert is_heldout_layout([8, -1, -1, -1]) == is_heldout_layout([8, -1, -1, -1])
    everything = [[c, d, -1, -1] for c in range(10) for d in range(10)]
    assert 0.02 < np.mean([is_heldout_layout(layout) for layout in everything]) < 0.2
    no_holdout = generate_scenes(50, "test", holdout_fraction=0.0, fashion_mnist=arrays["test"])
    assert not all(is_heldout_layout(layout) for layout in no_holdout.layouts)


def test_caption_templates():
    layout = [8, -1, -1, 7]
    assert layout_caption(layout) == "a bag at top left and a sneaker at bottom right"
    assert layout_caption(layout, "at", order=[3, 0]) == "a sneaker at bottom right and a bag at top left"
    assert layout_caption(layout, "colon") == "top left: a bag and bottom right: a sneaker"
    assert layout_caption(layout, "corner") == "a bag in the upper left corner and a sneaker in the lower right corner"
    assert layout_caption(layout, "there") == (
        "at the top left there is a bag, and at the bottom right there is a sneaker"
    )
    assert layout_caption([0, 1, 9, -1]) == (
        "a t-shirt at top left, a pair of trousers at top right and an ankle boot at bottom left"
    )
    assert layout_captions([5, -1, -1, -1]) == [
        "a sandal at top left",
        "top left: a sandal",
        "a sandal in the upper left corner",
        "at the top left there is a sandal",
    ]
    assert len(ITEM_NAMES) == len(FASHION_MNIST_CLASSES) and len(POSITIONS) == 4
    with pytest.raises(ValueError, match="at least one item"):
        layout_caption([-1, -1, -1, -1])
    with pytest.raises(ValueError, match="class ids"):
        layout_caption([10, -1, -1, -1])
    with pytest.raises(ValueError, match="template"):
        layout_caption(layout, "poem")


def test_parser_accepts_the_grammar_and_names_what_it_does_not_know():
    assert parse_caption("A Bag at Top-Left, and a T-shirt/top in the lower right corner.") == [8, -1, -1, 0]
    assert parse_caption("bottom left: boots; upper right: a pair of trousers") == [-1, 1, 9, -1]
    assert parse_caption("at the top right there is a sneaker and a coat at bottom left") == [-1, 7, 4, -1]
    assert parse_caption("a shirt at top left and a t shirt at top right") == [6, 0, -1, -1]
    with pytest.raises(ValueError, match=r"Unknown word\(s\) 'purple', 'hat'.*Grammar"):
        parse_caption("a purple hat at top left")
    with pytest.raises(ValueError, match="names the top left cell twice"):
        parse_caption("a bag at top left and a coat at upper left")
    with pytest.raises(ValueError, match=r"clause 'a bag' .* 1 item\(s\) and 0 position\(s\)"):
        parse_caption("a bag and a coat at top left")
    with pytest.raises(ValueError, match=r"2 item\(s\)"):
        parse_caption("a bag a coat at top left")
    with pytest.raises(ValueError, match="empty"):
        parse_caption("  ")
    assert "top/upper left" in CAPTION_GRAMMAR and "ankle boot" in CAPTION_GRAMMAR


def test_compose_scene_checks_its_input():
    item = np.full((28, 28), 200, np.uint8)
    scene = compose_scene([None, item, None, None])
    assert scene[2:30, 34:62].min() == 200 and scene.sum() == 200 * 28 * 28
    with pytest.raises(ValueError, match="28x28"):
        compose_scene([np.zeros((32, 32), np.uint8), None, None, None])
    with pytest.raises(ValueError, match="4 cells"):
        compose_scene([item])


def test_folder_is_an_imagefolder_and_loads_back(tiny_fmnist, tmp_path):
    root, _ = tiny_fmnist
    out = tmp_path / "scenes"
    info = write_scenes(out, num_train=12, num_test=5, fashion_mnist_root=root)
    assert info["seed"] == 0 and json.loads((out / "scenes_info.json").read_text()) == info
    row = json.loads((out / "train" / "metadata.jsonl").read_text().splitlines()[0])
    assert set(row) == {"file_name", "text", "layout", "fashion_mnist_index"} and isinstance(row["text"], list)
    test = load_scenes(out)  # the data set root: its test split
    assert len(test) == 5 and test.split == "test" and test.images.shape == (5, 64, 64)
    assert test.prompts()[0] == test.captions[0][0]
    assert [parse_caption(p) for p in test.prompts("cycle")] == test.layouts.tolist()
    assert np.array_equal(test.images, generate_scenes(5, "test", fashion_mnist=tiny_fmnist[1]["test"]).images)
    assert len(load_scenes(out / "train", limit=4)) == 4

    datasets = pytest.importorskip("datasets")
    ds = datasets.load_dataset("imagefolder", data_dir=str(out), split="train")
    assert len(ds) == 12 and {"image", "text", "layout"} <= set(ds.column_names)
    assert ds[0]["text"] == row["text"] and ds[0]["layout"] == row["layout"] and ds[0]["image"].size == (64, 64)

    with pytest.raises(FileNotFoundError, match="make_fashion_mnist_scenes.py"):
        load_scenes(tmp_path / "nothing")


def test_existing_data_set_is_not_overwritten_silently(tiny_fmnist, tmp_path):
    root, _ = tiny_fmnist
    write_scenes(tmp_path, num_train=10, num_test=4, fashion_mnist_root=root)
    with pytest.raises(FileExistsError, match="--overwrite"):
        write_scenes(tmp_path, num_train=3, num_test=2, fashion_mnist_root=root)
    (tmp_path / "train" / "notes.txt").write_text("mine")
    write_scenes(tmp_path, num_train=3, num_test=2, fashion_mnist_root=root, overwrite=True)
    assert len(list((tmp_path / "train").glob("*.png"))) == 3  # no stale scenes left behind
    assert (tmp_path / "train" / "notes.txt").read_text() == "mine"  # only our own files are removed
    # PNGs without metadata (an interrupted run, or somebody's images) are not replaced silently either.
    other = tmp_path / "other" / "test"
    other.mkdir(parents=True)
    (other / "00000.png").write_bytes(b"not ours")
    with pytest.raises(FileExistsError, match="00000.png"):
        write_scenes(tmp_path / "other", num_train=2, num_test=2, fashion_mnist_root=root)


def test_ensure_scenes_builds_once_and_refuses_other_settings(tiny_fmnist, tmp_path):
    root, _ = tiny_fmnist
    out = ensure_scenes(tmp_path / "d", num_train=6, num_test=2, fashion_mnist_root=root)
    stamp = (out / "train" / "00000.png").stat().st_mtime_ns
    assert ensure_scenes(out, num_train=6, num_test=2, fashion_mnist_root=root) == out
    assert (out / "train" / "00000.png").stat().st_mtime_ns == stamp  # reused, not rewritten
    with pytest.raises(FileExistsError, match="seed: 0 there, 1 asked"):
        ensure_scenes(out, num_train=6, num_test=2, seed=1, fashion_mnist_root=root)


def test_script_writes_the_data_set(tiny_fmnist, tmp_path, capsys):
    root, _ = tiny_fmnist
    main = runpy.run_path(str(SCRIPT))["main"]
    argv = ["--output_dir", str(tmp_path / "s"), "--num_train", "6", "--num_test", "3", "--seed", "2",
            "--fashion_mnist_dir", root]
    assert main(argv) == 0
    assert "wrote 6 train and 3 test scenes" in capsys.readouterr().out
    assert len(load_scenes(tmp_path / "s", "train")) == 6
    assert main(argv) == 1 and "--overwrite" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--output_dir", str(tmp_path / "t"), "--num_train", "-1"])
    with pytest.raises(SystemExit):
        main(["--output_dir", str(tmp_path / "t"), "--holdout_fraction", "1.5"])
