"""Scene score: real held-out scenes score near 1, captions paired with other images near chance; the empty-cell
threshold is what calibration on real scenes gives; `evaluate_scenes` and ``python -m diffusers_masked.evaluate
--scenes`` run end to end on a fake pipeline that returns the real scene for its caption."""

import dataclasses
import json
from types import SimpleNamespace

import diffusers
import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput

from diffusers_masked.data import load_fashion_mnist_arrays
from diffusers_masked.data.scenes import EMPTY, generate_scenes, load_scenes, write_scene_split
from diffusers_masked.evaluate import main, parse_args
from diffusers_masked.evaluation import (
    EMPTY_INK_LEVEL,
    EMPTY_INK_THRESHOLD,
    calibrate_empty_threshold,
    cell_crops,
    cell_ink,
    evaluate_scenes,
    load_fashion_mnist_classifier,
    predict_layouts,
    resized_scene_reference,
    save_classifier,
    score_layouts,
    score_scenes,
)


class LookupClassifier(torch.nn.Module):
    """An exact-match "classifier" over the Fashion-MNIST test pictures: it isolates what the metric adds (cells,
    crops, positions, empty cells, caption/layout pairing) from the accuracy of a trained network."""

    image_size = 28

    def __init__(self, images, labels):
        super().__init__()
        self.table = {}
        for image, label in zip(images, labels):
            self.table.setdefault(image.tobytes(), int(label))

    def forward(self, x):
        keys = (x[:, 0] * 255).round().to(torch.uint8).cpu().numpy()
        labels = [self.table.get(k.tobytes(), 0) for k in keys]
        return torch.nn.functional.one_hot(torch.tensor(labels), 10).float()


@pytest.fixture(scope="module")
def test_scenes():
    try:
        images, labels = load_fashion_mnist_arrays("test")
    except FileNotFoundError:
        pytest.skip("Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
    return generate_scenes(300, "test", seed=0), LookupClassifier(images, labels)


def _shuffled(layouts):
    # Every caption paired with another image (a derangement: no image keeps its own caption).
    return np.roll(layouts, 1, axis=0)


def test_real_scenes_score_near_one_and_shuffled_captions_near_chance(test_scenes):
    scenes, lookup = test_scenes
    real = score_scenes(scenes.images, scenes.layouts, classifier=lookup)
    assert real["item_accuracy"] >= 0.99 and real["empty_accuracy"] == 1.0 and real["exact_match"] >= 0.99
    assert real["num_images"] == 300 and real["num_named_items"] == int((scenes.layouts != EMPTY).sum())
    assert set(real["per_item_count"]) == {"1", "2", "3", "4"} and len(real["per_position_item_accuracy"]) == 4
    shuffled = score_scenes(scenes.images, _shuffled(scenes.layouts), classifier=lookup)
    # Chance: the other image holds the same class in that cell ~6% of the time, an empty cell ~40%.
    assert shuffled["item_accuracy"] < 0.2 and shuffled["empty_accuracy"] < 0.6
    assert shuffled["scene_score"] < 0.4 and shuffled["exact_match"] < 0.1


def test_cells_and_empty_rule(test_scenes):
    scenes, lookup = test_scenes
    ink = cell_ink(scenes.images[:50])
    layouts = torch.as_tensor(scenes.layouts[:50])
    assert (ink[layouts == EMPTY] == 0).all() and (ink[layouts != EMPTY] > EMPTY_INK_THRESHOLD).all()
    crops = cell_crops(scenes.images[:2])
    assert crops.shape == (8, 1, 28, 28)
    # uint8 / float, (N, H, W) / (N, C, H, W) and colour inputs give the same answer.
    float_images = torch.from_numpy(scenes.images[:20]).float().div(255)[:, None]
    pred = predict_layouts(scenes.images[:20], lookup)
    assert torch.equal(pred, predict_layouts(float_images, lookup))
    assert torch.equal(pred, predict_layouts(float_images.expand(-1, 3, -1, -1), lookup))
    # Faint haze and a few specks leave a cell empty; a 128x128 image is cut the same way (crops resized to 28).
    noisy = float_images.clone()
    noisy += 0.08 * torch.rand(noisy.shape, generator=torch.Generator().manual_seed(0))
    noisy[:, :, 40, 8:18] = 1.0  # 10 bright pixels in the bottom left cell
    assert torch.equal(predict_layouts(noisy, lookup) == EMPTY, pred == EMPTY)
    big = torch.nn.functional.interpolate(float_images, scale_factor=2, mode="nearest")
    assert cell_crops(big, 28).shape == (80, 1, 28, 28)
    assert torch.equal(cell_ink(big), cell_ink(float_images))
    with pytest.raises(ValueError, match="even"):
        cell_ink(torch.zeros(1, 1, 63, 64))


def test_empty_threshold_is_the_calibration_on_real_scenes(test_scenes):
    scenes, _ = test_scenes
    calibration = calibrate_empty_threshold(scenes.images, scenes.layouts)
    assert calibration["max_empty_ink"] == 0 and calibration["threshold"] > EMPTY_INK_THRESHOLD
    # The constant: midpoint between an empty cell (0) and the faintest picture of the whole train split in a cell.
    images, _ = load_fashion_mnist_arrays("train")
    faintest = ((images.astype(np.float32) / 255 > EMPTY_INK_LEVEL).sum((1, 2)) / 32**2).min()
    assert round(faintest / 2, 3) == EMPTY_INK_THRESHOLD
    with pytest.raises(ValueError, match="overlap"):
        calibrate_empty_threshold(scenes.images[:10], _shuffled(scenes.layouts[:10]))


def test_score_layouts_arithmetic():
    target = [[8, -1, -1, 7], [0, 1, 2, 3]]
    predicted = [[8, 5, -1, 7], [0, 1, -1, 4]]
    m = score_layouts(predicted, target)
    assert m["item_accuracy"] == pytest.approx(4 / 6) and m["empty_accuracy"] == pytest.approx(1 / 2)
    assert m["scene_score"] == pytest.approx((4 / 6 + 1 / 2) / 2) and m["exact_match"] == 0.0
    assert m["missed_items_left_empty"] == 1 and m["missed_items_wrong_class"] == 1
    assert m["per_item_count"]["4"]["empty_accuracy"] is None
    assert score_layouts(target, target)["exact_match"] == 1.0
    with pytest.raises(ValueError, match=r"\(N, 4\)"):
        score_layouts([[1, 2, 3]], [[1, 2, 3]])


class SceneOracle(DiffusionPipeline):
    """A text-to-image stand-in that returns, for sample i, real scene i (prompts are asked for in sample order,
    scene i % N for sample i); with ``shift`` the scene after it, which another caption describes."""

    def __init__(self, scenes=None, shift=0):
        super().__init__()
        self.register_to_config()
        self.scenes, self.shift, self.seen = scenes, shift, []

    def __call__(self, prompt, num_inference_steps=10, guidance_scale=4.0, generator=None, output_type="pil"):
        assert len(generator) == len(prompt) and output_type == "pt"
        start = len(self.seen)
        self.seen += list(prompt)
        picks = [(start + j) % len(self.scenes) for j in range(len(prompt))]
        for p, i in zip(prompt, picks):
            assert p in self.scenes.captions[i]
        picks = [(i + self.shift) % len(self.scenes) for i in picks]
        images = torch.from_numpy(self.scenes.images[picks]).float().div(255)[:, None]
        return ImagePipelineOutput(images=images)


def test_evaluate_scenes_reports_scene_score_and_fd(test_scenes, tmp_path):
    scenes, lookup = test_scenes
    small = generate_scenes(40, "test", seed=5)
    oracle = SceneOracle(small)
    # Cells judged by the lookup; whole-image FD in the features of a (random) Fashion-MNIST classifier file.
    features = save_classifier(_tiny_classifier(), {"test_accuracy": None}, tmp_path / "clf.safetensors")
    kwargs = dict(reference=small, classifier=lookup, classifier_path=features, batch_size=16, progress=False)
    r = evaluate_scenes(oracle, small.prompts("cycle"), small.layouts, num_inference_steps=3, **kwargs)
    m = r["metrics"]
    assert m["item_accuracy"] >= 0.99 and m["empty_accuracy"] == 1.0 and m["scene_score"] >= 0.99
    assert m["fd_name"] == "FD-FMNIST" and abs(m["fd"]) < 1e-3  # the real scenes themselves
    assert m["fd_cells"] is None  # the lookup classifier has no features
    assert oracle.seen == small.prompts("cycle")
    s = r["settings"]
    assert s["mode"] == "scenes" and s["num_samples"] == 40 and s["num_inference_steps"] == 3
    assert s["guidance_scale"] == 4.0 and s["image_shape"] == [1, 64, 64]
    assert s["empty_threshold"] == EMPTY_INK_THRESHOLD
    # Layouts parsed from the prompts when not given; more samples than prompts cycle them.
    wrong = evaluate_scenes(SceneOracle(small, shift=1), small.prompts(), num_samples=60, **kwargs)
    assert wrong["metrics"]["num_images"] == 60 and wrong["metrics"]["item_accuracy"] < 0.3
    json.dumps(r)


def _tiny_classifier():
    torch.manual_seed(0)
    from diffusers_masked.evaluation import FashionMNISTClassifier

    return FashionMNISTClassifier(channels=(4, 8), hidden_size=16).eval()


def test_evaluate_scenes_takes_a_plain_function_and_refuses_non_text_pipelines(test_scenes, tiny_classifier):
    scenes, _ = test_scenes
    small = generate_scenes(12, "test", seed=1)
    drawn = []

    def draw(prompt, generator, num_inference_steps=1):
        picks = list(range(len(drawn), len(drawn) + len(prompt)))
        drawn.extend(prompt)
        return small.images[picks]  # uint8 (B, H, W) is accepted

    r = evaluate_scenes(draw, small.prompts(), small.layouts, reference=small.images, classifier=tiny_classifier,
                        batch_size=5, progress=False)
    m = r["metrics"]
    assert m["empty_accuracy"] == 1.0 and 0.0 <= m["item_accuracy"] <= 1.0
    # Whole-image and cell FD of the real scenes against themselves.
    assert abs(m["fd"]) < 1e-3 and abs(m["fd_cells"]) < 1e-3 and m["fd_cells_name"] == "FD-FMNIST-cells"
    assert r["settings"]["pipeline_class"] == "CallablePipeline"

    class Unconditional(DiffusionPipeline):
        def __call__(self, batch_size=1, generator=None, output_type="pil"):
            raise AssertionError("never called")

    with pytest.raises(ValueError, match="takes no prompt"):
        evaluate_scenes(Unconditional(), small.prompts(), classifier=tiny_classifier, progress=False)
    with pytest.raises(ValueError, match="Unknown word"):
        evaluate_scenes(draw, ["a hat at top left"], classifier=tiny_classifier, progress=False)
    with pytest.raises(ValueError, match="3 layouts for 12 prompts"):
        evaluate_scenes(draw, small.prompts(), small.layouts[:3], classifier=tiny_classifier, progress=False)


def test_evaluate_command_scene_mode(test_scenes, tiny_classifier, tmp_path, monkeypatch):
    small = generate_scenes(24, "test", seed=2)
    write_scene_split(small, tmp_path / "scenes" / "test")
    classifier_file = save_classifier(tiny_classifier, {"test_accuracy": None}, tmp_path / "clf" / "tiny.safetensors")
    oracle = SceneOracle(small)
    monkeypatch.setattr(diffusers.DiffusionPipeline, "from_pretrained", classmethod(lambda cls, path: oracle))
    (tmp_path / "pipe").mkdir()
    out = tmp_path / "out.json"
    argv = ["--pipeline", str(tmp_path / "pipe"), "--scenes", str(tmp_path / "scenes"), "--batch_size", "10",
            "--num_inference_steps", "2", "--classifier_path", str(classifier_file), "--cache_dir",
            str(tmp_path / "cache"), "--device", "cpu", "--output", str(out), "--save_images", str(tmp_path / "imgs"),
            "--no_progress"]
    assert main(argv) == 0
    result = json.loads(out.read_text())
    m, s = result["metrics"], result["settings"]
    assert m["num_images"] == 24 and m["empty_accuracy"] == 1.0 and abs(m["fd_cells"]) < 1e-3
    assert s["scenes"].endswith("test") and s["scene_captions"] == "first" and "--scenes" in s["command"]
    assert oracle.seen == small.prompts()
    # The saved samples are a scene folder again, with what was asked and what was found.
    saved = load_scenes(tmp_path / "imgs")
    assert np.array_equal(saved.images, small.images) and saved.layouts.tolist() == small.layouts.tolist()
    row = json.loads((tmp_path / "imgs" / "metadata.jsonl").read_text().splitlines()[0])
    assert len(row["predicted_layout"]) == 4

    oracle.seen = []
    assert main(argv[:-1] + ["--scene_captions", "cycle", "--num_samples", "5", "--empty_threshold", "0.5"]) == 0
    again = json.loads(out.read_text())
    assert oracle.seen == small.prompts("cycle")[:5] and again["settings"]["empty_threshold"] == 0.5

    with pytest.raises(FileNotFoundError, match="make_fashion_mnist_scenes.py"):
        main(argv[:3] + [str(tmp_path / "missing")] + argv[4:])
    for bad in (["--prompts", "p.txt"], ["--accuracy"]):
        with pytest.raises(SystemExit):
            parse_args(argv + bad)
    with pytest.raises(SystemExit):
        parse_args(["--pipeline", "p", "--empty_threshold", "0.1"])  # scene flags need --scenes


class SmallSceneOracle(SceneOracle):
    """`SceneOracle` of a 32x32 model: the real scenes resized as the trainer resizes them for --resolution 32."""

    @property
    def transformer(self):
        return SimpleNamespace(config=SimpleNamespace(sample_size=32, in_channels=1, caption_channels=8))


def test_evaluate_command_resizes_the_scene_reference_to_the_model(tiny_classifier, tmp_path, monkeypatch):
    small = generate_scenes(24, "test", seed=2)
    write_scene_split(small, tmp_path / "scenes" / "test")
    resized = resized_scene_reference(tmp_path / "scenes" / "test", 32)
    assert resized.shape == (24, 32, 32) and resized.dtype == np.uint8
    assert resized_scene_reference(tmp_path / "scenes" / "test", 64) == str(tmp_path / "scenes" / "test")
    oracle = SmallSceneOracle(dataclasses.replace(small, images=resized))
    monkeypatch.setattr(diffusers.DiffusionPipeline, "from_pretrained", classmethod(lambda cls, path: oracle))
    (tmp_path / "pipe").mkdir()
    classifier_file = save_classifier(tiny_classifier, {"test_accuracy": None}, tmp_path / "clf" / "tiny.safetensors")
    out = tmp_path / "out.json"
    assert main(["--pipeline", str(tmp_path / "pipe"), "--scenes", str(tmp_path / "scenes"), "--batch_size", "12",
                 "--classifier_path", str(classifier_file), "--cache_dir", str(tmp_path / "cache"), "--device", "cpu",
                 "--output", str(out), "--no_progress"]) == 0
    result = json.loads(out.read_text())
    # The samples are the resized reference itself: both distances vanish.
    assert result["reference"]["resized_to"] == [32, 32] and result["settings"]["image_shape"] == [1, 32, 32]
    assert abs(result["metrics"]["fd"]) < 1e-3 and abs(result["metrics"]["fd_cells"]) < 1e-3


@pytest.mark.slow
def test_real_classifier_scores_real_scenes_near_one(test_scenes):
    scenes, _ = test_scenes
    classifier, info = load_fashion_mnist_classifier(progress=False)
    real = score_scenes(scenes.images, scenes.layouts, classifier=classifier)
    # Items are bounded by the classifier's accuracy on Fashion-MNIST (about 0.92).
    assert real["item_accuracy"] >= 0.9 and real["empty_accuracy"] >= 0.95, (real, info)
    shuffled = score_scenes(scenes.images, _shuffled(scenes.layouts), classifier=classifier)
    assert shuffled["item_accuracy"] < 0.2 and shuffled["scene_score"] < 0.4
