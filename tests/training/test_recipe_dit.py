import json
import os
from pathlib import Path

import pytest
import torch
from diffusers import DiffusionPipeline
from safetensors.torch import load_file

from diffusers_masked import RoutedDiTPipeline
from diffusers_masked.training import main
from diffusers_masked.training.objectives import build_objective
from diffusers_masked.training.recipe_dit import RoutedDiTRecipe, routed_dit_loss
from diffusers_masked.training.trainer import parse_args

FMNIST = Path(os.environ.get("FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist"))
needs_fmnist = pytest.mark.skipif(
    not (FMNIST / "train-images-idx3-ubyte.gz").exists(), reason="apt-get install dataset-fashion-mnist"
)
TINY = dict(patch_size=7, hidden_size=32, num_layers=4, num_attention_heads=2)  # 16 tokens, span 2..2


def tiny_args(tmp_path, out="run", **extra):
    cfg = tmp_path / "tiny.json"
    cfg.write_text(json.dumps(TINY))
    args = ["--output_dir", str(tmp_path / out), "--model_config", str(cfg), "--max_train_samples", "64",
            "--train_batch_size", "8", "--max_train_steps", "4", "--checkpointing_steps", "2",
            "--validation_steps", "0", "--validation_inference_steps", "2", "--validation_images_per_class", "1",
            "--report_to", "none", "--logging_steps", "1", "--learning_rate", "1e-3", "--use_ema"]
    for key, value in extra.items():
        args += [f"--{key}"] + ([] if value is True else [str(value)])
    return args


def test_defaults_are_the_papers():
    args = parse_args(RoutedDiTRecipe(), [])
    assert args.recipe.route_ratio == 0.5 and args.recipe.route_start is None and args.recipe.route_end is None
    assert args.model.objective == "edm" and args.model.mask_ratio == 0.0


@pytest.mark.parametrize("flags, match", [(["--route_ratio", "1"], "--route_ratio 1"),
                                          (["--route_ratio", "-0.5"], "--route_ratio -0.5"),
                                          (["--mask_ratio", "0.5"], "DiT does not mask")])
def test_bad_flags_fail_early(flags, match, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_args(RoutedDiTRecipe(), flags)
    assert exit_info.value.code == 2 and match in capsys.readouterr().err


def test_loss_routes_half_the_tokens_and_covers_every_pixel():
    from diffusers_masked import RoutedDiTTransformer2DModel

    model = RoutedDiTTransformer2DModel(sample_size=8, patch_size=2, in_channels=1, hidden_size=16, num_layers=4,
                                        num_attention_heads=2, num_classes=3)
    seen = []
    model.blocks[2].register_forward_hook(lambda m, a, o: seen.append(a[0].shape[1]))
    x0 = torch.randn(4, 1, 8, 8)
    cond = {"class_labels": torch.tensor([0, 1, 2, 3])}
    g = torch.Generator().manual_seed(0)
    loss, logs = routed_dit_loss(model, build_objective("edm"), x0, cond, 0.5, g)
    loss.backward()
    assert seen == [8] and torch.isfinite(loss) and float(logs["route_ratio"]) == 0.5
    routed_dit_loss(model, build_objective("edm"), x0, cond, 0.0, g)
    assert seen == [8, 16]


@needs_fmnist
def test_tiny_run_writes_a_loadable_pipeline(tmp_path):
    result = main(RoutedDiTRecipe(), tiny_args(tmp_path, route_end=-2, unmasked_finetune_steps=1))
    assert result["finished"]
    pipe = DiffusionPipeline.from_pretrained(tmp_path / "run")
    assert isinstance(pipe, RoutedDiTPipeline)
    assert pipe.transformer.route_span == (2, 2) and pipe.transformer.config.route_end == -2
    images = pipe([0, 1], num_inference_steps=2, output_type="np").images
    assert images.shape[:3] == (2, 28, 28)
    card = (tmp_path / "run" / "README.md").read_text()
    assert "TREAD" in card and "blocks 2..2" in card and "{{" not in card


@needs_fmnist
def test_resume_reproduces_the_uninterrupted_run(tmp_path):
    main(RoutedDiTRecipe(), tiny_args(tmp_path, out="straight"))
    main(RoutedDiTRecipe(), tiny_args(tmp_path, out="resumed", stop_after_steps=2))
    main(RoutedDiTRecipe(), tiny_args(tmp_path, out="resumed", resume_from_checkpoint="latest"))
    a = load_file(tmp_path / "straight" / "transformer" / "diffusion_pytorch_model.safetensors")
    b = load_file(tmp_path / "resumed" / "transformer" / "diffusion_pytorch_model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@needs_fmnist
def test_compiled_run_trains_in_one_graph(tmp_path, monkeypatch):
    real_compile = torch.compile

    def eager_compile(model, **kwargs):
        return real_compile(model, backend="eager", fullgraph=True)  # a graph break raises

    monkeypatch.setattr(torch, "compile", eager_compile)
    torch._dynamo.reset()
    result = main(RoutedDiTRecipe(), tiny_args(tmp_path, torch_compile=True))
    torch._dynamo.reset()
    assert result["finished"]
