import pytest
import torch

from diffusers_masked import (
    DeferredMaskDiTTransformer2DModel,
    MaskDiTTransformer2DModel,
    MDTv2Transformer2DModel,
)
from diffusers_masked.training.context import TrainContext
from diffusers_masked.training.recipe import draw_ids_keep
from diffusers_masked.training.recipe_deferred_maskdit import DeferredMaskDiTRecipe
from diffusers_masked.training.recipe_maskdit import MaskDiTRecipe
from diffusers_masked.training.recipe_mdt import MDTv2Recipe
from diffusers_masked.training.trainer import parse_args

TINY = dict(sample_size=8, patch_size=2, in_channels=1, num_classes=3)


def tiny(which: str):
    torch.manual_seed(0)
    if which == "maskdit":
        model = MaskDiTTransformer2DModel(hidden_size=32, num_layers=2, num_decoder_layers=1, decoder_hidden_size=32,
                                          num_attention_heads=2, decoder_num_attention_heads=2, **TINY)
        return model, MaskDiTRecipe(), []
    if which == "mdt":
        model = MDTv2Transformer2DModel(hidden_size=32, num_layers=4, num_decoder_layers=2, num_attention_heads=2,
                                        **TINY)
        return model, MDTv2Recipe(), []
    model = DeferredMaskDiTTransformer2DModel.from_preset("DEBUG/2", caption_channels=None, **TINY)
    return model, DeferredMaskDiTRecipe(), ["--conditioning", "class"]


@pytest.mark.parametrize("route", [[], ["--route_ratio", "0.5"]], ids=["plain", "routed"])
@pytest.mark.parametrize("which", ["maskdit", "mdt", "deferred"])
def test_compiled_training_step_is_one_graph_and_draws_the_same_mask(which, route):
    """The trainer hands the loss a seeded generator; none may reach the compiled forward (dynamo cannot trace a
    Generator: it used to break every compiled training forward at the mask draw). TREAD routing (drawn by the
    loss too) keeps the step one graph."""
    model, recipe, argv = tiny(which)
    ratio = ["--mask_ratio", "0.4"] if which == "mdt" else []
    config = parse_args(recipe, argv + route + ratio)
    x0 = torch.rand(4, 1, 8, 8) * 2 - 1
    batch = {"x0": x0, "class_labels": torch.tensor([0, 1, 2, 0])}

    def loss_of(forward):
        ctx = TrainContext(config, generator=torch.Generator().manual_seed(3), model=model)
        ctx.objective = recipe.build_objective(ctx)
        return recipe.compute_loss(forward, batch, ctx)

    eager_loss = loss_of(model).loss
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="eager", fullgraph=True)  # any graph break raises
    out = loss_of(compiled)
    out.for_backward().backward()
    torch.testing.assert_close(out.loss, eager_loss)
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    torch._dynamo.reset()


def test_draw_ids_keep_draws_what_the_model_draws():
    model, _, _ = tiny("maskdit")
    x, t, labels = torch.randn(3, 1, 8, 8), torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0, 1, 2])
    own = model(x, t, class_labels=labels, mask_ratio=0.5, generator=torch.Generator().manual_seed(7))
    ids_keep = draw_ids_keep(model, 3, 0.5, x.device, torch.Generator().manual_seed(7))
    given = model(x, t, class_labels=labels, ids_keep=ids_keep)
    assert ids_keep.shape == (3, 8)
    assert torch.equal(own.mask, given.mask)
    torch.testing.assert_close(own.sample, given.sample)
    assert draw_ids_keep(model, 3, 0.0, x.device, None) is None


def test_mdtv2_per_batch_mask_ratios_compile_once():
    """MDTv2 draws a mask ratio per batch, so the kept-token count changes between steps: the compiled forward is
    built twice (the full branch and the masked branch, with a dynamic kept-token count), not again at each new
    ratio (a full recompilation, minutes for a B-size model)."""
    from torch._dynamo.testing import CompileCounter

    model, recipe, _ = tiny("mdt")
    config = parse_args(recipe, [])
    x0 = torch.rand(4, 1, 8, 8) * 2 - 1
    batch = {"x0": x0, "class_labels": torch.tensor([0, 1, 2, 0])}
    torch._dynamo.reset()
    counter = CompileCounter()
    compiled = torch.compile(model, backend=counter)
    ratios = set()
    for step in range(8):
        ctx = TrainContext(config, generator=torch.Generator().manual_seed(step), model=model, step=step)
        ctx.objective = recipe.build_objective(ctx)
        out = recipe.compute_loss(compiled, batch, ctx)
        ratios.add(round(out.logs["mask_ratio"], 4))
        assert torch.isfinite(out.loss)
    assert len({round(16 * (1 - r)) for r in ratios}) >= 2  # several kept-token counts were drawn
    assert counter.frame_count == 2
    torch._dynamo.reset()
