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
                        layers_per_block=1, norm_num_groups=4, sample_size=16)
    model = randomize(MaskDiTTransformer2DModel(**{**TINY_MASKDIT, "in_channels": 4}), std=0.02).eval()
    pipe = MaskDiTPipeline(model, EDMEulerScheduler(), vae=vae)
    img = pipe([1], num_inference_steps=2, output_type="np").images
    assert img.shape == (1, 16, 16, 3) and np.isfinite(img).all()


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
