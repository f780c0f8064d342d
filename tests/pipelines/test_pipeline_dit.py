import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DiffusionPipeline, DPMSolverMultistepScheduler, EDMEulerScheduler

from diffusers_masked import RoutedDiTPipeline, RoutedDiTTransformer2DModel
from testing_utils import randomize

TINY_DIT = dict(sample_size=8, patch_size=2, in_channels=3, hidden_size=32, num_layers=4, num_attention_heads=4,
                num_classes=10)
ID2LABEL = {i: f"class{i}" for i in range(10)}


def make_pipe(scheduler=None, vae=None, **overrides):
    torch.manual_seed(0)
    model = randomize(RoutedDiTTransformer2DModel(**{**TINY_DIT, **overrides}), std=0.02).eval()
    return RoutedDiTPipeline(model, scheduler or EDMEulerScheduler(), vae=vae, id2label=ID2LABEL)


def test_determinism_with_generator():
    pipe = make_pipe()
    run = lambda seed: pipe([1, 2], num_inference_steps=3, generator=torch.Generator().manual_seed(seed),
                            output_type="np").images
    a, b, c = run(0), run(0), run(1)
    assert a.shape == (2, 8, 8, 3)
    assert np.array_equal(a, b) and not np.array_equal(a, c)


@pytest.mark.parametrize("scheduler", [EDMEulerScheduler(), DDIMScheduler(), DPMSolverMultistepScheduler()],
                         ids=lambda s: type(s).__name__)
def test_any_scheduler_cfg_and_output_types(scheduler):
    pipe = make_pipe(scheduler)
    pt = pipe(["class0", 9], num_inference_steps=2, guidance_scale=2.0, output_type="pt").images
    assert pt.shape == (2, 3, 8, 8) and torch.isfinite(pt).all() and pt.min() >= 0 and pt.max() <= 1
    pil = pipe(3, num_inference_steps=2, num_images_per_prompt=2).images
    assert len(pil) == 2 and pil[0].size == (8, 8)
    assert pipe(3, num_inference_steps=2, output_type="latent").images.shape == (1, 3, 8, 8)


def test_guidance_changes_the_samples():
    pipe = make_pipe()
    run = lambda s: pipe([4], num_inference_steps=3, guidance_scale=s, generator=torch.Generator().manual_seed(0),
                         output_type="np").images
    assert not np.allclose(run(1.0), run(4.0))


def test_sampling_never_routes(monkeypatch):
    pipe = make_pipe()
    seen = []
    real = pipe.transformer.forward

    def spy(*args, **kwargs):
        seen.append((kwargs.get("route_ratio", 0.0), kwargs.get("route_ids")))
        return real(*args, **kwargs)

    monkeypatch.setattr(pipe.transformer, "forward", spy)
    pipe([1], num_inference_steps=2, guidance_scale=1.5)
    assert seen and all(r == 0.0 and ids is None for r, ids in seen)


def test_save_and_load_with_diffusion_pipeline(tmp_path):
    pipe = make_pipe()
    pipe.save_pretrained(tmp_path)
    loaded = DiffusionPipeline.from_pretrained(tmp_path)
    assert isinstance(loaded, RoutedDiTPipeline) and loaded.vae is None
    assert loaded.id2label[3] == "class3"
    kw = dict(num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np")
    a = pipe([2], **kw).images
    kw["generator"] = torch.Generator().manual_seed(0)
    assert np.array_equal(a, loaded([2], **kw).images)


def test_latent_space_with_a_vae():
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8,),
                        down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
                        norm_num_groups=8, sample_size=8).eval()
    pipe = make_pipe(vae=vae, in_channels=4)
    out = pipe([0], num_inference_steps=2, output_type="np").images
    assert out.shape == (1, 8, 8, 3) and np.isfinite(out).all()


def test_lora_save_load_and_routed_training_forward(tmp_path):
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    pipe = make_pipe()
    model = pipe.transformer
    x, t, lab = torch.randn(2, 3, 8, 8), torch.tensor([0.3, 0.6]), torch.tensor([1, 2])
    with torch.no_grad():
        base = model(x, t, class_labels=lab).sample
    model.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                 target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)
        with_lora = model(x, t, class_labels=lab).sample
    assert not torch.allclose(with_lora, base, atol=1e-4)
    # a routed training step reaches every adapter weight
    model.train()
    model(x, t, class_labels=lab, route_ratio=0.5, generator=torch.Generator().manual_seed(0)).sample.square().mean().backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if "lora" in n)
    model.eval()
    RoutedDiTPipeline.save_lora_weights(tmp_path, get_peft_model_state_dict(model),
                                        transformer_lora_adapter_metadata=model.peft_config["default"].to_dict())
    fresh = make_pipe()
    fresh.load_lora_weights(tmp_path)
    with torch.no_grad():
        assert torch.equal(fresh.transformer(x, t, class_labels=lab).sample, with_lora)
