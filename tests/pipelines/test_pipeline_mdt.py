import math

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DiffusionPipeline,
    DPMSolverMultistepScheduler,
    EDMDPMSolverMultistepScheduler,
    EDMEulerScheduler,
)

from diffusers_masked import MDTv2Pipeline, MDTv2Transformer2DModel
from diffusers_masked.pipelines.pipeline_mdt import power_cosine_guidance_at_progress, power_cosine_guidance_scale


def tiny_transformer():
    model = MDTv2Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        hidden_size=32,
        num_layers=4,
        num_decoder_layers=2,
        num_attention_heads=2,
        num_classes=3,
    )
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(std=0.05)
    return model.eval()


def make_pipe(scheduler=None):
    scheduler = scheduler or MDTv2Pipeline.default_scheduler()
    return MDTv2Pipeline(tiny_transformer(), scheduler, id2label={0: "cat", 1: "dog", 2: "fish"})


def run(pipe, **kwargs):
    args = dict(class_labels=[0, 2], num_inference_steps=4, generator=torch.Generator().manual_seed(0), output_type="pt")
    args.update(kwargs)
    return pipe(**args).images


@pytest.mark.parametrize("g,p", [(3.8, 4.0), (4.0, 0.01), (2.0, 1.0)])
def test_power_cosine_formula(g, p):
    T = 1000
    assert power_cosine_guidance_scale(g, p, 0, T) == pytest.approx(g)
    assert power_cosine_guidance_scale(g, p, T, T) == pytest.approx(1.0)
    mid = (g - 1) * (1 - math.cos(math.pi * 0.5**p)) / 2 + 1
    assert power_cosine_guidance_scale(g, p, 500, T) == pytest.approx(mid)
    tens = power_cosine_guidance_scale(g, p, torch.tensor([0.0, 500.0, 1000.0]), T)
    torch.testing.assert_close(tens, torch.tensor([g, mid, 1.0], dtype=torch.float64))


def test_power_cosine_known_values():
    # Values for the paper's FID setting (cfg 3.8, power 4): guidance is ~off until t ~ 500.
    assert power_cosine_guidance_scale(3.8, 4.0, 999) == pytest.approx(1.0, abs=1e-6)
    assert power_cosine_guidance_scale(3.8, 4.0, 500) == pytest.approx(1.0 + 2.8 * (1 - math.cos(math.pi / 16)) / 2)
    assert 1.6 < power_cosine_guidance_scale(3.8, 4.0, 250) < 1.7


def test_guidance_scale_at_uses_schedule():
    pipe = make_pipe()
    pipe._guidance_power, pipe._guidance_schedule = 4.0, "power-cosine"
    assert pipe.guidance_scale_at(3.8, 0, torch.tensor(0)) == pytest.approx(3.8)
    assert pipe.guidance_scale_at(3.8, 0, torch.tensor(999)) == pytest.approx(1.0, abs=1e-6)
    pipe._guidance_schedule = "constant"
    assert pipe.guidance_scale_at(3.8, 0, torch.tensor(999)) == 3.8


def test_pipeline_records_scales_per_step():
    pipe = make_pipe()
    seen = []
    original = pipe.guidance_scale_at

    def spy(g, i, t):
        w = original(g, i, t)
        seen.append((int(t), w))
        return w

    pipe.guidance_scale_at = spy
    run(pipe, guidance_scale=3.8, guidance_power=4.0)
    assert [t for t, _ in seen] == [999, 666, 333, 0]
    for t, w in seen:
        assert w == pytest.approx(power_cosine_guidance_scale(3.8, 4.0, t, 1000))


def test_deterministic_and_shape():
    pipe = make_pipe()
    a = run(pipe)
    b = run(pipe)
    assert a.shape == (2, 4, 8, 8)
    torch.testing.assert_close(a, b)
    c = run(pipe, generator=torch.Generator().manual_seed(1))
    assert not torch.allclose(a, c)


def test_schedule_changes_output():
    pipe = make_pipe()
    a = run(pipe, guidance_schedule="power-cosine", output_type="latent")
    b = run(pipe, guidance_schedule="constant", output_type="latent")
    c = run(pipe, guidance_scale=1.0, output_type="latent")
    assert not torch.allclose(a, b)
    assert not torch.allclose(a, c)


def test_default_steps_is_250():
    import inspect

    assert inspect.signature(MDTv2Pipeline.__call__).parameters["num_inference_steps"].default == 250


@pytest.mark.parametrize(
    "scheduler",
    [
        MDTv2Pipeline.default_scheduler(),
        DDIMScheduler(beta_start=1e-4, beta_end=0.02, beta_schedule="linear", clip_sample=False),
        DPMSolverMultistepScheduler(beta_start=1e-4, beta_end=0.02, beta_schedule="linear"),
    ],
    ids=["ddpm-learned-range", "ddim", "dpm-solver"],
)
def test_schedulers(scheduler):
    pipe = make_pipe(scheduler)
    images = run(pipe, output_type="np")
    assert images.shape == (2, 8, 8, 4) and np.isfinite(images).all()


def test_scheduler_swapped_from_learned_variance_config():
    """The diffusers idiom `DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)` inherits
    variance_type='learned_range', with which DPM-Solver keeps only 3 output channels (4 here)."""
    config = MDTv2Pipeline.default_scheduler().config
    swapped = DPMSolverMultistepScheduler.from_config(config)
    assert swapped.config.variance_type == "learned_range"
    got = run(make_pipe(swapped))
    ref = run(make_pipe(DPMSolverMultistepScheduler.from_config(config, variance_type=None)))
    assert got.shape == (2, 4, 8, 8)
    torch.testing.assert_close(got, ref)


def test_learned_variance_passed_to_ddpm():
    pipe = make_pipe()
    shapes = []
    step = pipe.scheduler.step

    def spy(model_output, *a, **k):
        shapes.append(model_output.shape[1])
        return step(model_output, *a, **k)

    pipe.scheduler.step = spy
    run(pipe)
    assert shapes == [8] * 4


def test_class_names_and_save_load_roundtrip(tmp_path):
    pipe = make_pipe()
    a = run(pipe, class_labels=["cat", "fish"])
    torch.testing.assert_close(a, run(pipe, class_labels=[0, 2]))
    pipe.save_pretrained(tmp_path)
    loaded = DiffusionPipeline.from_pretrained(tmp_path)
    assert isinstance(loaded, MDTv2Pipeline)
    assert isinstance(loaded.transformer, MDTv2Transformer2DModel)
    assert loaded.id2label == {0: "cat", 1: "dog", 2: "fish"}
    torch.testing.assert_close(run(loaded), a)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(class_labels=None),
        dict(class_labels=[5]),
        dict(class_labels=["horse"]),
        dict(guidance_schedule="linear"),
        dict(guidance_power=0.0),
        dict(num_inference_steps=0),
        dict(output_type="jpg"),
        dict(latents=torch.randn(1, 4, 8, 8)),
    ],
)
def test_bad_inputs_raise(kwargs):
    pipe = make_pipe()
    with pytest.raises(ValueError):
        run(pipe, **kwargs)


def spy_scales(pipe):
    seen = []
    original = pipe.guidance_scale_at

    def spy(g, i, t):
        w = original(g, i, t)
        seen.append(w)
        return w

    pipe.guidance_scale_at = spy
    return seen


SCHEDULERS = {
    "ddpm": lambda: MDTv2Pipeline.default_scheduler(),
    # linspace: the first step is t = 999 (DDIM's default "leading" spacing starts at t = 800 for 5 steps, where the
    # timestep form of the schedule is already above 1).
    "ddim": lambda: DDIMScheduler(beta_start=1e-4, beta_end=0.02, beta_schedule="linear", clip_sample=False,
                                  timestep_spacing="linspace"),
    "dpm-solver++": lambda: DPMSolverMultistepScheduler(beta_start=1e-4, beta_end=0.02, beta_schedule="linear"),
    "edm-euler": lambda: EDMEulerScheduler(),
    "edm-dpm-solver": lambda: EDMDPMSolverMultistepScheduler(),
}


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_power_cosine_schedule_with_every_scheduler(name):
    """The schedule rises from 1 (no guidance) on the noisiest step to guidance_scale on the last one, whatever the
    scheduler's timesteps mean (DDPM training steps or EDM's ln(sigma) / 4)."""
    pipe = make_pipe(SCHEDULERS[name]())
    seen = spy_scales(pipe)
    guided = run(pipe, guidance_scale=3.8, guidance_power=1.0, num_inference_steps=5, output_type="latent")
    assert torch.isfinite(guided).all() and guided.shape == (2, 4, 8, 8)
    assert len(seen) == 5 and seen == sorted(seen)
    assert seen[0] == pytest.approx(1.0, abs=1e-3) and 1.0 < seen[2] < seen[-1]
    if name.startswith("edm"):  # progress = step / (steps - 1): full guidance on the last step
        expected = [power_cosine_guidance_at_progress(3.8, 1.0, i / 4) for i in range(5)]
    else:  # timesteps are training steps: the official 1 - t / T (DPM-Solver's last model call is at t = 200)
        expected = [power_cosine_guidance_scale(3.8, 1.0, t, 1000) for t in pipe.scheduler.timesteps.tolist()]
    assert seen == pytest.approx(expected)
    constant = run(pipe, guidance_scale=3.8, guidance_schedule="constant", num_inference_steps=5, output_type="latent")
    assert not torch.allclose(guided, constant)


def test_edm_schedule_follows_step_progress():
    pipe = make_pipe(EDMEulerScheduler())
    seen = spy_scales(pipe)
    run(pipe, guidance_scale=3.8, guidance_power=4.0, num_inference_steps=5)
    expected = [power_cosine_guidance_at_progress(3.8, 4.0, i / 4) for i in range(5)]
    assert seen == pytest.approx(expected)


def test_progress_form_matches_official_timestep_form():
    for t in (0, 4, 250, 500, 999):
        assert power_cosine_guidance_scale(3.8, 4.0, t) == pytest.approx(
            power_cosine_guidance_at_progress(3.8, 4.0, 1 - t / 1000))
    assert power_cosine_guidance_at_progress(3.8, 4.0, 1.5) == pytest.approx(3.8)  # clamped
    assert power_cosine_guidance_at_progress(3.8, 4.0, -0.5) == pytest.approx(1.0)


@pytest.mark.parametrize(
    "kwargs",
    [dict(guidance_power=float("nan")), dict(guidance_scale=float("nan")), dict(guidance_channels=0),
     dict(guidance_channels=5), dict(class_labels=[[0], [2.5]]), dict(num_images_per_prompt=0)],
)
def test_more_bad_inputs_raise(kwargs):
    with pytest.raises(ValueError):
        run(make_pipe(), **kwargs)


def test_nested_class_labels():
    pipe = make_pipe()
    torch.testing.assert_close(run(pipe, class_labels=[[0], [2]]), run(pipe, class_labels=[0, 2]))
