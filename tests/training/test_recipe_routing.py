"""TREAD routing flags of the masked recipes (MaskDiT, MDTv2, DeferredMaskDiT): off by default, usage errors up
front, the span reaches the model config, the losses route, and a tiny routed run trains."""

import json
import os
from pathlib import Path

import pytest
import torch

from diffusers_masked import DeferredMaskDiTTransformer2DModel, MaskDiTTransformer2DModel, MDTv2Transformer2DModel
from diffusers_masked.training import main
from diffusers_masked.training.context import TrainContext
from diffusers_masked.training.objectives import build_objective
from diffusers_masked.training.recipe_deferred_maskdit import DeferredMaskDiTRecipe, deferred_maskdit_loss
from diffusers_masked.training.recipe_maskdit import MaskDiTRecipe, maskdit_loss
from diffusers_masked.training.recipe_mdt import MDTv2Recipe
from diffusers_masked.training.trainer import parse_args

FMNIST = Path(os.environ.get("FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist"))
needs_fmnist = pytest.mark.skipif(
    not (FMNIST / "train-images-idx3-ubyte.gz").exists(), reason="apt-get install dataset-fashion-mnist"
)
RECIPES = [MaskDiTRecipe, MDTv2Recipe, DeferredMaskDiTRecipe]


@pytest.mark.parametrize("recipe_cls", RECIPES)
def test_routing_is_off_by_default_and_the_span_flags_reach_the_config(recipe_cls):
    recipe = recipe_cls()
    # (DeferredMaskDiT's text overrides need its text encoder loaded; class conditioning needs none)
    base = ["--conditioning", "class"] if recipe_cls is DeferredMaskDiTRecipe else []
    args = parse_args(recipe, base)
    assert args.recipe.route_ratio == 0.0 and args.recipe.route_start is None and args.recipe.route_end is None
    assert recipe.model_overrides(TrainContext(args)).keys().isdisjoint({"route_start", "route_end"})
    args = parse_args(recipe, base + ["--route_ratio", "0.5", "--route_start", "1", "--route_end", "-2"])
    overrides = recipe.model_overrides(TrainContext(args))
    assert overrides["route_start"] == 1 and overrides["route_end"] == -2


@pytest.mark.parametrize("recipe_cls", RECIPES)
@pytest.mark.parametrize("flags, match", [(["--route_ratio", "1"], "--route_ratio 1"),
                                          (["--route_ratio", "-0.5"], "--route_ratio -0.5"),
                                          (["--route_end", "3"], "--route_ratio is 0")])
def test_bad_route_flags_fail_early(recipe_cls, flags, match, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_args(recipe_cls(), flags)
    assert exit_info.value.code == 2 and match in capsys.readouterr().err


def _span_hook(block, seen):
    block.register_forward_hook(lambda m, a, o: seen.append(a[0].shape[1]))


def test_maskdit_loss_routes_among_the_kept_tokens():
    model = MaskDiTTransformer2DModel(sample_size=8, patch_size=2, in_channels=1, hidden_size=16, num_layers=4,
                                      num_attention_heads=2, decoder_hidden_size=16, num_decoder_layers=1,
                                      decoder_num_attention_heads=2, num_classes=3).train()
    seen = []
    _span_hook(model.encoder_blocks[2], seen)
    x0, cond = torch.randn(4, 1, 8, 8), {"class_labels": torch.tensor([0, 1, 2, 3])}
    g = torch.Generator().manual_seed(0)
    loss, _ = maskdit_loss(model, build_objective("edm"), x0, cond, 0.5, 0.1, g, route_ratio=0.5)
    loss.backward()
    maskdit_loss(model, build_objective("edm"), x0, cond, 0.5, 0.1, g)
    assert seen == [4, 8] and torch.isfinite(loss)


def test_mdt_recipe_routes_both_branches_and_not_in_the_unmasked_finetune():
    recipe = MDTv2Recipe()
    args = parse_args(recipe, ["--route_ratio", "0.5", "--max_train_steps", "10", "--unmasked_finetune_steps", "2",
                               "--mask_ratio", "0.5"])
    model = MDTv2Transformer2DModel(sample_size=8, patch_size=2, in_channels=1, hidden_size=16, num_layers=8,
                                    num_decoder_layers=2, num_attention_heads=2, num_classes=3).train()
    seen = []
    _span_hook(model.encoder_in_blocks[2], seen)  # block 2: the default span (2, 2) of 6 encoder blocks
    batch = {"x0": torch.randn(4, 1, 8, 8), "class_labels": torch.tensor([0, 1, 2, 3])}
    ctx = TrainContext(args, generator=torch.Generator().manual_seed(0), model=model)
    ctx.objective = recipe.build_objective(ctx)
    assert recipe.mask_ratio(ctx) == 0.5
    recipe.compute_loss(model, batch, ctx).for_backward().backward()
    assert seen == [8, 4]  # full branch: 8 of 16 tokens go through; masked branch: 4 of the 8 kept
    ctx.step = 9
    assert recipe.mask_ratio(ctx) == 0.0  # the unmasked fine-tune also stops routing
    recipe.compute_loss(model, batch, ctx)
    assert seen == [8, 4, 16]
    assert [n for n, p in model.named_parameters() if p.grad is None] == []


def test_deferred_maskdit_loss_routes_in_the_backbone():
    model = DeferredMaskDiTTransformer2DModel.from_preset("Debug/2", sample_size=8, in_channels=1).train()
    seen = []
    _span_hook(model.transformer_blocks[2], seen)
    x0, g = torch.randn(4, 1, 8, 8), torch.Generator().manual_seed(0)
    cond = {"encoder_hidden_states": torch.randn(4, 5, model.config.caption_channels)}
    loss, _ = deferred_maskdit_loss(model, build_objective("edm"), x0, cond, 0.5, g, route_ratio=0.5)
    loss.backward()
    assert seen == [4] and torch.isfinite(loss)


@needs_fmnist
def test_tiny_routed_maskdit_run_trains(tmp_path):
    cfg = tmp_path / "tiny.json"
    cfg.write_text(json.dumps(dict(patch_size=7, hidden_size=32, num_layers=4, num_attention_heads=2,
                                   decoder_hidden_size=16, num_decoder_layers=1, decoder_num_attention_heads=2)))
    args = ["--output_dir", str(tmp_path / "run"), "--model_config", str(cfg), "--max_train_samples", "32",
            "--train_batch_size", "8", "--max_train_steps", "2", "--checkpointing_steps", "2",
            "--validation_steps", "0", "--report_to", "none", "--logging_steps", "1",
            "--unmasked_finetune_steps", "0", "--route_ratio", "0.5", "--route_start", "1", "--route_end", "2"]
    result = main(MaskDiTRecipe(), args)
    assert result["finished"]
    model = MaskDiTTransformer2DModel.from_pretrained(tmp_path / "run" / "transformer")
    assert model.route_span == (1, 2)
