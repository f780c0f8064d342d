import numpy as np
import pytest
import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DDPMScheduler,
    DiffusionPipeline,
    DPMSolverMultistepScheduler,
    EDMDPMSolverMultistepScheduler,
    EDMEulerScheduler,
)

from diffusers_masked import MaskDiTPipeline, MaskDiTTransformer2DModel
from testing_utils import TINY_MASKDIT, randomize

ID2LABEL = {i: f"class{i}" for i in range(10)}
ID2LABEL[3] = "boot, ankle boot"


def make_pipe(scheduler=None, **overrides):
    torch.manual_seed(0)
    model = randomize(MaskDiTTransformer2DModel(**{**TINY_MASKDIT, **overrides}), std=0.02).eval()
    return MaskDiTPipeline(model, scheduler or EDMEulerScheduler(), id2label=ID2LABEL)


def test_determinism_with_generator():
    pipe = make_pipe()
    a = pipe([1, 2], num_inference_steps=4, generator=torch.Generator().manual_seed(0), output_type="np").images
    b = pipe([1, 2], num_inference_steps=4, generator=torch.Generator().manual_seed(0), output_type="np").images
    c = pipe([1, 2], num_inference_steps=4, generator=torch.Generator().manual_seed(1), output_type="np").images
    assert a.shape == (2, 8, 8, 3)
    assert np.array_equal(a, b) and not np.array_equal(a, c)


@pytest.mark.parametrize(
    "scheduler",
    [DDPMScheduler(), DDIMScheduler(), DPMSolverMultistepScheduler(), EDMEulerScheduler(),
     EDMDPMSolverMultistepScheduler(), DDPMScheduler(variance_type="learned_range")],
    ids=lambda s: f"{type(s).__name__}-{getattr(s.config, 'variance_type', None)}",
)
@pytest.mark.parametrize("learn_sigma", [False, True])
def test_every_scheduler_gives_finite_images(scheduler, learn_sigma):
    pipe = make_pipe(scheduler, learn_sigma=learn_sigma)
    if getattr(scheduler.config, "variance_type", None) == "learned_range" and not learn_sigma:
        with pytest.raises(ValueError, match="learned variance"):
            pipe([0, 9], num_inference_steps=3)
        return
    out = pipe([0, 9], num_inference_steps=3, guidance_scale=2.0, output_type="pt").images
    assert out.shape == (2, 3, 8, 8) and torch.isfinite(out).all()
    assert out.min() >= 0 and out.max() <= 1


def test_output_types_class_names_and_images_per_prompt():
    pipe = make_pipe()
    pil = pipe(["ankle boot", "class5"], num_inference_steps=2, num_images_per_prompt=2).images
    assert len(pil) == 4 and pil[0].size == (8, 8)
    lat = pipe(3, num_inference_steps=2, output_type="latent").images
    assert lat.shape == (1, 3, 8, 8)
    assert pipe.get_label_ids(["boot", "class0"]) == [3, 0]
    with pytest.raises(ValueError, match="Unknown class name"):
        pipe("dog", num_inference_steps=2)
    with pytest.raises(ValueError, match="out of range"):
        pipe([10], num_inference_steps=2)
    with pytest.raises(ValueError, match="class-conditional"):
        pipe(None, num_inference_steps=2)
    with pytest.raises(ValueError, match="output_type"):
        pipe(1, num_inference_steps=2, output_type="jpg")


def test_cfg_uses_null_class_and_scale_one_disables_it():
    pipe = make_pipe()
    calls = []
    orig = pipe.transformer.forward
    pipe.transformer.forward = lambda *a, **k: calls.append(k["class_labels"].tolist()) or orig(*a, **k)
    pipe([4], num_inference_steps=1, guidance_scale=3.0)
    pipe([4], num_inference_steps=1, guidance_scale=1.0)
    assert calls == [[4, 10], [4]]


def test_vae_decoding_uses_scaling_factor():
    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        layers_per_block=1, norm_num_groups=4, sample_size=16, scaling_factor=0.25,
                        shift_factor=0.5).eval()
    model = randomize(MaskDiTTransformer2DModel(**{**TINY_MASKDIT, "in_channels": 4}), std=0.02).eval()
    pipe = MaskDiTPipeline(model, EDMEulerScheduler(), vae=vae)
    args = dict(class_labels=[1], num_inference_steps=2)
    latents = pipe(**args, generator=torch.Generator().manual_seed(0), output_type="latent").images
    seen = []
    decode = vae.decode
    vae.decode = lambda z, *a, **k: seen.append(z.clone()) or decode(z, *a, **k)
    img = pipe(**args, generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert img.shape == (1, 3, 16, 16) and torch.isfinite(img).all()
    # The VAE gets z / scaling_factor + shift_factor (what a model trained on (z - shift) * scale must undo).
    torch.testing.assert_close(seen[0], latents / 0.25 + 0.5)
    expected = (decode(latents / 0.25 + 0.5).sample.clamp(-1, 1) + 1) / 2
    torch.testing.assert_close(img, expected, atol=1e-6, rtol=1e-5)


def test_save_and_diffusion_pipeline_from_pretrained(tmp_path):
    pipe = make_pipe()
    pipe.save_pretrained(tmp_path)
    loaded = DiffusionPipeline.from_pretrained(tmp_path)
    assert type(loaded) is MaskDiTPipeline
    assert loaded.id2label == pipe.id2label and loaded.labels["ankle boot"] == 3
    a = pipe([1, 3], num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="np").images
    b = loaded([1, 3], num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="np").images
    assert np.array_equal(a, b)


def test_unconditional_pipeline():
    pipe = make_pipe(num_classes=None)
    out = pipe(batch_size=3, num_inference_steps=2, output_type="np").images
    assert out.shape == (3, 8, 8, 3)


# ----------------------------------------------------------------------------------------------------------------------
# diffusers' pipeline conventions and input checks
# ----------------------------------------------------------------------------------------------------------------------
def sample(pipe, labels, **kwargs):
    args = dict(num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="pt")
    args.update(kwargs)
    return pipe(labels, **args).images


def test_nested_class_labels_are_flattened_like_dit_pipeline():
    pipe = make_pipe()
    flat = sample(pipe, [1, 3])
    torch.testing.assert_close(sample(pipe, [[1], [3]]), flat)
    torch.testing.assert_close(sample(pipe, torch.tensor([[1], [3]])), flat)
    torch.testing.assert_close(sample(pipe, [["class1"], ["boot"]]), flat)
    torch.testing.assert_close(sample(pipe, np.array([1, 3])), flat)


@pytest.mark.parametrize(
    "labels,kwargs,match",
    [
        ([], {}, "class_labels is empty"),
        (torch.tensor([], dtype=torch.long), {}, "class_labels is empty"),
        ([1.7], {}, "integer class ids"),
        (torch.tensor([0.5]), {}, "integer class ids"),
        ([True], {}, "integer class ids"),
        ([1], dict(num_images_per_prompt=0), "num_images_per_prompt"),
        ([1], dict(num_images_per_prompt=-2), "num_images_per_prompt"),
        ([1], dict(num_inference_steps=2.5), "num_inference_steps"),
        ([1], dict(num_inference_steps=-1), "num_inference_steps"),
        ([1], dict(guidance_scale=float("nan")), "guidance_scale"),
        ([1], dict(guidance_scale=float("inf")), "guidance_scale"),
        ([1, 2], dict(generator=[torch.Generator().manual_seed(0)] * 3), "3 generators for 2 images"),
        ([1], dict(latents=torch.full((1, 3, 8, 8), float("nan"))), "NaN"),
        ([1], dict(latents=torch.zeros(1, 3, 8, 8, dtype=torch.long)), "floating-point"),
    ],
)
def test_bad_call_inputs_raise_before_the_loop(labels, kwargs, match):
    pipe = make_pipe()
    calls = []
    forward = pipe.transformer.forward
    pipe.transformer.forward = lambda *a, **k: calls.append(1) or forward(*a, **k)
    with pytest.raises(ValueError, match=match):
        sample(pipe, labels, **kwargs)
    assert calls == []


def test_output_type_is_checked_before_the_loop():
    pipe = make_pipe()
    calls = []
    forward = pipe.transformer.forward
    pipe.transformer.forward = lambda *a, **k: calls.append(1) or forward(*a, **k)
    with pytest.raises(ValueError, match="output_type"):
        sample(pipe, [1], output_type="jpg")
    assert calls == []  # no wasted denoising loop


def test_generator_list_one_per_image():
    pipe = make_pipe()
    gens = [torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)]
    both = pipe([1, 1], num_inference_steps=2, generator=gens, output_type="pt").images
    first = pipe([1], num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="pt").images
    torch.testing.assert_close(both[:1], first)


def test_float64_latents_warn(caplog):
    pipe = make_pipe()
    latents = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    with caplog.at_level("WARNING"):
        out64 = sample(pipe, [1], latents=latents.double())
    assert "float64" in caplog.text
    torch.testing.assert_close(out64, sample(pipe, [1], latents=latents))


def test_non_finite_scheduler_timesteps_raise():
    pipe = make_pipe(EDMEulerScheduler(sigma_min=0.0))  # ln(0) / 4 = -inf at the last step
    with pytest.raises(ValueError, match="non-finite timesteps.*sigma_min"):
        sample(pipe, [1])


def test_scheduler_none_stays_none_through_save_and_load(tmp_path):
    pipe = MaskDiTPipeline(make_pipe().transformer, None, id2label=ID2LABEL, training_objective="edm")
    assert pipe.scheduler is None
    with pytest.raises(ValueError, match=r"no scheduler.*EDMEulerScheduler"):
        sample(pipe, [1])
    pipe.save_pretrained(tmp_path)
    loaded = DiffusionPipeline.from_pretrained(tmp_path)
    assert loaded.scheduler is None and loaded.training_objective == {"objective": "edm"}
    with pytest.raises(ValueError, match="no scheduler"):
        sample(loaded, [1])
    loaded.scheduler = EDMEulerScheduler()
    assert sample(loaded, [1]).shape == (1, 3, 8, 8)


def test_training_objective_is_saved_and_a_mismatching_scheduler_warns(tmp_path, caplog):
    import json

    pipe = make_pipe()
    assert pipe.training_objective == {"objective": "edm", "prediction_type": "epsilon", "sigma_data": 0.5}
    pipe.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "model_index.json").read_text())
    assert saved["training_objective"]["objective"] == "edm"
    with caplog.at_level("WARNING"):
        sample(DiffusionPipeline.from_pretrained(tmp_path), [1])
        sample(DiffusionPipeline.from_pretrained(tmp_path, scheduler=EDMDPMSolverMultistepScheduler()), [1])
    assert "training objective" not in caplog.text and "EDM objective" not in caplog.text
    for scheduler in (DDPMScheduler(), DDIMScheduler(), DPMSolverMultistepScheduler()):
        caplog.clear()
        loaded = DiffusionPipeline.from_pretrained(tmp_path, scheduler=scheduler)
        assert loaded.training_objective["objective"] == "edm"
        with caplog.at_level("WARNING"):
            sample(loaded, [1])
        assert "EDM objective" in caplog.text and type(scheduler).__name__ in caplog.text


def test_ddpm_objective_mismatches_warn(caplog):
    pipe = make_pipe(DDPMScheduler(prediction_type="v_prediction"))
    assert pipe.training_objective["objective"] == "v_prediction"
    for scheduler, text in [
        (DDIMScheduler(prediction_type="epsilon"), "prediction_type='epsilon'"),
        (EDMEulerScheduler(), "an EDM scheduler"),
        (DDIMScheduler(prediction_type="v_prediction", beta_schedule="scaled_linear"), "beta_schedule='scaled_linear'"),
    ]:
        caplog.clear()
        pipe.scheduler = scheduler
        with caplog.at_level("WARNING"):
            sample(pipe, [1])
        assert text in caplog.text
    caplog.clear()
    pipe.scheduler = DPMSolverMultistepScheduler(prediction_type="v_prediction")
    with caplog.at_level("WARNING"):
        sample(pipe, [1])
    assert caplog.text == ""
    with pytest.raises(ValueError, match="training_objective must be one of"):
        MaskDiTPipeline(pipe.transformer, EDMEulerScheduler(), training_objective="flow")
