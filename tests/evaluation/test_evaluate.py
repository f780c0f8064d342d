import json

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, DiffusionPipeline, EDMEulerScheduler
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from PIL import Image

import diffusers_masked  # noqa: F401
from diffusers_masked import MaskDiTPipeline, MaskDiTTransformer2DModel
from diffusers_masked.evaluate import main, parse_args
from diffusers_masked.evaluation import evaluate_pipeline, generate_images, read_prompts, save_classifier


@pytest.fixture
def tiny_pipeline_dir(tmp_path):
    torch.manual_seed(0)
    transformer = MaskDiTTransformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=1,
        hidden_size=32,
        num_layers=1,
        num_attention_heads=2,
        decoder_hidden_size=16,
        num_decoder_layers=1,
        decoder_num_attention_heads=2,
        num_classes=10,
    )
    # adaLN-Zero init outputs zeros: make the samples depend on the class and the noise.
    for p in transformer.parameters():
        torch.nn.init.normal_(p, std=0.05)
    pipe = MaskDiTPipeline(transformer=transformer, scheduler=EDMEulerScheduler())
    path = tmp_path / "pipe"
    pipe.save_pretrained(path)
    return path


@pytest.fixture
def classifier_file(tmp_path, tiny_classifier):
    return save_classifier(tiny_classifier, {"test_accuracy": None}, tmp_path / "clf" / "tiny.safetensors")


def _cli(pipe_dir, classifier_file, tmp_path, *extra):
    out = tmp_path / "out.json"
    argv = [
        "--pipeline",
        str(pipe_dir),
        "--num_samples",
        "20",
        "--batch_size",
        "10",
        "--num_inference_steps",
        "2",
        "--guidance_scale",
        "1.5",
        "--reference_num_samples",
        "100",
        "--classifier_path",
        str(classifier_file),
        "--cache_dir",
        str(tmp_path / "cache"),
        "--device",
        "cpu",
        "--output",
        str(out),
        "--no_progress",
        *extra,
    ]
    assert main(argv) == 0
    return json.loads(out.read_text())


def test_command_end_to_end(fashion_mnist, tiny_pipeline_dir, classifier_file, tmp_path):
    stats_path = tmp_path / "ref.npz"
    result = _cli(
        tiny_pipeline_dir,
        classifier_file,
        tmp_path,
        "--save_reference_stats",
        str(stats_path),
        "--save_images",
        str(tmp_path / "imgs"),
    )
    m, s = result["metrics"], result["settings"]
    assert m["fd_name"] == "FD-FMNIST" and np.isfinite(m["fd"]) and m["fd"] > 0
    assert 0.0 <= m["conditional_accuracy"] <= 1.0 and len(m["per_class_accuracy"]) == 10
    assert s["num_samples"] == 20 and s["seed"] == 0 and s["num_inference_steps"] == 2
    assert s["guidance_scale"] == 1.5 and s["image_shape"] == [1, 8, 8] and s["conditioning"] == "class"
    assert s["pipeline_path"].endswith("pipe") and s["scheduler"] == "EDMEulerScheduler"
    assert result["reference"]["type"] == "fashion-mnist" and result["reference"]["num_samples"] == 100
    assert result["feature_extractor"]["identity"].startswith("fashion-mnist-classifier-")
    assert result["timings"]["generation_seconds"] > 0
    assert len(list((tmp_path / "imgs").glob("*.png"))) == 20
    # The saved statistics, used as the reference, give the same distance.
    again = _cli(tiny_pipeline_dir, classifier_file, tmp_path, "--reference", str(stats_path))
    assert again["metrics"]["fd"] == pytest.approx(m["fd"], rel=1e-6)
    assert again["reference"]["type"] == "stats"


def test_scheduler_override_is_used_and_recorded(fashion_mnist, tiny_pipeline_dir, classifier_file, tmp_path):
    result = _cli(tiny_pipeline_dir, classifier_file, tmp_path, "--scheduler", "EDMDPMSolverMultistepScheduler")
    assert result["settings"]["scheduler"] == "EDMDPMSolverMultistepScheduler"
    base = _cli(tiny_pipeline_dir, classifier_file, tmp_path)
    assert base["metrics"]["fd"] != result["metrics"]["fd"]  # other sampler, other samples
    with pytest.raises(ValueError, match="not a diffusers scheduler"):
        _cli(tiny_pipeline_dir, classifier_file, tmp_path, "--scheduler", "NoSuchScheduler")


def test_saved_ddpm_scheduler_samples_few_steps_with_dpm_solver(fashion_mnist, tiny_pipeline_dir, classifier_file, tmp_path):
    # Ancestral DDPM at a few steps leaves noise that the metrics read as content: the default swaps in DPM-Solver++,
    # `--scheduler saved` keeps the saved sampler.
    pipe = DiffusionPipeline.from_pretrained(tiny_pipeline_dir)
    pipe.scheduler = DDPMScheduler()
    ddpm_dir = tmp_path / "ddpm_pipe"
    pipe.save_pretrained(ddpm_dir)
    swapped = _cli(ddpm_dir, classifier_file, tmp_path)
    assert swapped["settings"]["scheduler"] == "DPMSolverMultistepScheduler"
    kept = _cli(ddpm_dir, classifier_file, tmp_path, "--scheduler", "saved")
    assert kept["settings"]["scheduler"] == "DDPMScheduler"
    assert kept["metrics"]["fd"] != swapped["metrics"]["fd"]


def test_samples_do_not_depend_on_batch_size(tiny_pipeline_dir):
    pipe = DiffusionPipeline.from_pretrained(tiny_pipeline_dir)
    assert isinstance(pipe, MaskDiTPipeline)
    a = torch.cat([x for x, _ in generate_images(pipe, 6, batch_size=2, num_inference_steps=2, progress=False)])
    b, labels = next(generate_images(pipe, 6, batch_size=6, num_inference_steps=2, progress=False))
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert labels.tolist() == [0, 1, 2, 3, 4, 5]
    c, _ = next(generate_images(pipe, 6, batch_size=6, seed=1, num_inference_steps=2, progress=False))
    assert not torch.allclose(b, c)


def test_python_api_reuses_reference_stats(fashion_mnist, tiny_pipeline_dir, tiny_classifier):
    pipe = DiffusionPipeline.from_pretrained(tiny_pipeline_dir)
    kwargs = dict(num_samples=10, batch_size=10, num_inference_steps=2, reference_num_samples=50, progress=False)
    first = evaluate_pipeline(pipe, feature=tiny_classifier, **kwargs)
    second = evaluate_pipeline(pipe, feature=tiny_classifier, **kwargs)
    assert first["metrics"]["fd"] == pytest.approx(second["metrics"]["fd"], rel=1e-9)
    assert first["metrics"]["fd_name"] == "FD-FMNIST" and second["reference"]["type"] == "cached"
    assert 0.0 <= first["metrics"]["conditional_accuracy"] <= 1.0

    class MeanPool(torch.nn.Module):
        def forward(self, x):
            return torch.nn.functional.adaptive_avg_pool2d(x.float(), 2).flatten(1)

    # Any nn.Module as feature (torchmetrics probes its output size); no classifier -> FD only.
    third = evaluate_pipeline(pipe, feature=MeanPool(), input_img_size=(1, 8, 8), **kwargs)
    assert third["metrics"]["conditional_accuracy"] is None and third["metrics"]["fd_name"] == "FD-custom"
    assert third["feature_extractor"]["identity"].startswith("MeanPool-")


def test_bad_references_give_clear_errors(tiny_pipeline_dir, tiny_classifier, tmp_path):
    pipe = DiffusionPipeline.from_pretrained(tiny_pipeline_dir)
    kwargs = dict(feature=tiny_classifier, num_samples=4, batch_size=4, num_inference_steps=1, progress=False)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="No reference images"):
        evaluate_pipeline(pipe, reference=str(empty), **kwargs)
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    for i in range(3):
        Image.fromarray(np.full((16, 16), 40 * i, np.uint8)).save(wrong / f"{i}.png")
    with pytest.raises(ValueError, match="Image sizes differ"):
        evaluate_pipeline(pipe, reference=str(wrong), **kwargs)
    with pytest.raises(FileNotFoundError, match="not found"):
        evaluate_pipeline(pipe, reference=str(tmp_path / "nothing"), **kwargs)
    with pytest.raises(FileNotFoundError):
        evaluate_pipeline(pipe, reference=str(tmp_path / "nothing.npz"), **kwargs)
    with pytest.raises(FileNotFoundError, match="Inception"):
        evaluate_pipeline(pipe, feature="inception", inception_weights=str(tmp_path / "w.pth"), num_samples=4)

    class MeanPool(torch.nn.Module):
        def forward(self, x):
            return torch.nn.functional.adaptive_avg_pool2d(x.float(), 2).flatten(1)

    # Accuracy asked for, but a custom feature module brings no classifier.
    with pytest.raises(ValueError, match="Conditional accuracy needs"):
        evaluate_pipeline(
            pipe, reference=str(wrong), accuracy=True, **dict(kwargs, feature=MeanPool()), input_img_size=(1, 8, 8)
        )


def test_a_matching_image_folder_works_as_reference(tiny_pipeline_dir, tiny_classifier, tmp_path):
    pipe = DiffusionPipeline.from_pretrained(tiny_pipeline_dir)
    folder = tmp_path / "ref"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(12):
        Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(folder / f"{i}.png")
    r = evaluate_pipeline(
        pipe,
        reference=str(folder),
        feature=tiny_classifier,
        num_samples=6,
        batch_size=3,
        num_inference_steps=1,
        progress=False,
    )
    assert r["reference"]["type"] == "folder" and r["reference"]["num_samples"] == 12
    assert np.isfinite(r["metrics"]["fd"])


def test_help_documents_every_flag(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    text = capsys.readouterr().out
    for flag in (
        "--pipeline",
        "--reference",
        "--num_samples",
        "--seed",
        "--num_inference_steps",
        "--guidance_scale",
        "--prompts",
        "--feature",
        "--inception_weights",
        "--classifier_path",
        "--cache_dir",
        "--save_reference_stats",
        "--output",
        "--batch_size",
    ):
        assert flag in text
    with pytest.raises(SystemExit):
        parse_args([])


class _FakeTextPipeline(DiffusionPipeline):
    """Stands in for a text-to-image pipeline: the image brightness encodes the prompt, the noise the seed."""

    def __init__(self):
        super().__init__()
        self.register_to_config()
        self.seen_prompts = []

    def __call__(self, prompt, num_inference_steps=10, guidance_scale=4.0, generator=None, output_type="pil"):
        self.seen_prompts += list(prompt)
        noise = torch.stack([torch.rand(1, 8, 8, generator=g) for g in generator])
        level = torch.tensor([len(p) % 5 / 5 for p in prompt]).view(-1, 1, 1, 1)
        return ImagePipelineOutput(images=(0.5 * noise + level).clamp(0, 1))


def test_text_pipeline_with_labelled_prompt_file(tmp_path, tiny_classifier):
    prompts_file = tmp_path / "prompts.jsonl"
    prompts_file.write_text('{"prompt": "a photo of a sneaker", "label": 7}\n{"prompt": "a bag", "label": 8}\n')
    prompts, labels = read_prompts(prompts_file)
    assert prompts == ["a photo of a sneaker", "a bag"] and labels == [7, 8]
    pipe = _FakeTextPipeline()
    reference = np.random.default_rng(0).integers(0, 256, (30, 8, 8), dtype=np.uint8)
    r = evaluate_pipeline(
        pipe,
        reference=reference,
        feature=tiny_classifier,
        prompts=prompts,
        prompt_labels=labels,
        num_samples=5,
        batch_size=2,
        progress=False,
    )
    assert pipe.seen_prompts == [prompts[i % 2] for i in range(5)]
    assert r["settings"]["conditioning"] == "text" and r["settings"]["num_prompts"] == 2
    assert r["settings"]["num_inference_steps"] == 10 and r["settings"]["guidance_scale"] == 4.0
    assert set(r["metrics"]["per_class_accuracy"]) == {"7", "8"}
    with pytest.raises(ValueError, match="prompts"):
        evaluate_pipeline(pipe, reference=reference, feature=tiny_classifier, num_samples=2, progress=False)
    (tmp_path / "empty.txt").write_text("\n")
    with pytest.raises(ValueError, match="empty"):
        read_prompts(tmp_path / "empty.txt")
