import pytest
import torch

from diffusers_masked import MaskDiTTransformer2DModel
from diffusers_masked.models.transformer_maskdit import MASKDIT_SIZE_PRESETS

from testing_utils import TINY_MASKDIT, randomize

TINY_SIZES = dict(hidden_size=32, num_layers=1, num_attention_heads=2, decoder_hidden_size=16,
                  num_decoder_layers=1, decoder_num_attention_heads=2)


def test_preset_table_matches_paper_sizes():
    cfg = MaskDiTTransformer2DModel.preset_config("XL/2")
    assert (cfg["num_layers"], cfg["hidden_size"], cfg["num_attention_heads"], cfg["patch_size"]) == (28, 1152, 16, 2)
    assert MaskDiTTransformer2DModel.preset_config("DiT-B/4")["patch_size"] == 4
    assert len(MaskDiTTransformer2DModel.available_presets()) == 12
    with pytest.raises(ValueError, match="Unknown preset"):
        MaskDiTTransformer2DModel.preset_config("XXL/2")


@pytest.mark.parametrize("size", list(MASKDIT_SIZE_PRESETS))
@pytest.mark.parametrize("patch", [2, 4, 8])
def test_shapes_every_preset_family(size, patch):
    model = MaskDiTTransformer2DModel.from_preset(f"{size}/{patch}", sample_size=16, **TINY_SIZES)
    n = (16 // patch) ** 2
    x = torch.randn(2, 4, 16, 16)
    out = model(x, torch.tensor([0.1, 0.2]), class_labels=torch.tensor([1, 1000]), mask_ratio=0.5)
    assert out.sample.shape == (2, 4, 16, 16)
    assert out.mask.shape == (2, n) and out.mask.dtype == torch.bool
    assert (out.mask.sum(1) == n - round(n * 0.5)).all()
    plain = model(x, 0.3, class_labels=torch.tensor([1, 2]))
    assert plain.mask is None


def test_learn_sigma_doubles_output_and_unconditional_model():
    m = MaskDiTTransformer2DModel(**{**TINY_MASKDIT, "learn_sigma": True})
    assert m(torch.randn(1, 3, 8, 8), 1, class_labels=torch.tensor([0])).sample.shape == (1, 6, 8, 8)
    u = MaskDiTTransformer2DModel(**{**TINY_MASKDIT, "num_classes": None})
    assert u(torch.randn(1, 3, 8, 8), 1).sample.shape == (1, 3, 8, 8)


def test_masked_tokens_do_not_influence_encoder_output(tiny_maskdit):
    captured = []
    tiny_maskdit.encoder_to_decoder.register_forward_hook(lambda m, inp, out: captured.append(inp[0].clone()))
    x = torch.randn(2, 3, 8, 8)
    labels = torch.tensor([3, 4])
    out = tiny_maskdit(x, 0.5, class_labels=labels, mask_ratio=0.5, generator=torch.Generator().manual_seed(0))
    # overwrite every masked patch with other values; same kept ids
    mask_pix = out.mask.view(2, 1, 4, 4).repeat_interleave(2, 2).repeat_interleave(2, 3).expand_as(x)
    x2 = torch.where(mask_pix, torch.randn_like(x) * 5, x)
    out2 = tiny_maskdit(x2, 0.5, class_labels=labels, mask_ratio=0.5, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out.mask, out2.mask)
    assert captured[0].shape == (2, 8, 32)
    assert torch.allclose(captured[0], captured[1], atol=1e-6)
    # ...while a kept patch does matter
    x3 = torch.where(mask_pix, x, x + 1.0)
    tiny_maskdit(x3, 0.5, class_labels=labels, mask_ratio=0.5, generator=torch.Generator().manual_seed(0))
    assert not torch.allclose(captured[0], captured[2], atol=1e-4)


def test_ids_keep_reproduces_random_mask(tiny_maskdit):
    x = torch.randn(2, 3, 8, 8)
    labels = torch.tensor([1, 2])
    out = tiny_maskdit(x, 0.5, class_labels=labels, mask_ratio=0.5, generator=torch.Generator().manual_seed(3))
    from diffusers_masked.models.masking import random_token_mask

    tm = random_token_mask(2, 16, 0.5, generator=torch.Generator().manual_seed(3))
    again = tiny_maskdit(x, 0.5, class_labels=labels, ids_keep=tm.ids_keep)
    assert torch.allclose(out.sample, again.sample, atol=1e-6)
    assert torch.equal(out.mask, again.mask)


def test_save_load_round_trip(tmp_path, tiny_maskdit):
    tiny_maskdit.save_pretrained(tmp_path)
    assert (tmp_path / "diffusion_pytorch_model.safetensors").exists()
    loaded = MaskDiTTransformer2DModel.from_pretrained(tmp_path).eval()
    x = torch.randn(2, 3, 8, 8)
    a = tiny_maskdit(x, 0.2, class_labels=torch.tensor([0, 10])).sample
    b = loaded(x, 0.2, class_labels=torch.tensor([0, 10])).sample
    assert torch.equal(a, b)


def test_gradient_checkpointing_same_gradients():
    torch.manual_seed(0)
    m = randomize(MaskDiTTransformer2DModel(**TINY_MASKDIT))
    x = torch.randn(2, 3, 8, 8)
    args = dict(class_labels=torch.tensor([1, 2]), ids_keep=torch.tensor([[0, 5, 7, 9], [1, 2, 3, 15]]))
    m(x, 0.3, **args).sample.square().sum().backward()
    ref = [p.grad.clone() for p in m.parameters()]
    m.zero_grad()
    m.enable_gradient_checkpointing()
    m(x, 0.3, **args).sample.square().sum().backward()
    for g, p in zip(ref, m.parameters()):
        assert torch.allclose(g, p.grad, atol=1e-6)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(mask_ratio=1.0), "mask_ratio"),
        (dict(mask_ratio=-0.2), "mask_ratio"),
        (dict(x=torch.randn(1, 3, 9, 9)), "divisible by patch_size"),
        (dict(x=torch.randn(1, 3, 12, 12)), "sample_size"),
        (dict(x=torch.randn(1, 1, 8, 8)), "in_channels"),
        (dict(x=torch.randn(3, 8, 8)), "shape"),
        (dict(class_labels=torch.tensor([11])), "out of range"),
        (dict(class_labels=torch.tensor([-1])), "out of range"),
        (dict(class_labels=None), "class-conditional"),
        (dict(class_labels=torch.tensor([1.0])), "integer"),
        (dict(timestep=torch.tensor([1.0, 2.0, 3.0])), "timestep"),
    ],
)
def test_bad_input_raises_value_error(tiny_maskdit, kwargs, match):
    x = kwargs.pop("x", torch.randn(1, 3, 8, 8))
    t = kwargs.pop("timestep", 0.5)
    kwargs.setdefault("class_labels", torch.tensor([1]))
    with pytest.raises(ValueError, match=match):
        tiny_maskdit(x, t, **kwargs)


def test_unconditional_model_rejects_labels():
    m = MaskDiTTransformer2DModel(**{**TINY_MASKDIT, "num_classes": None})
    with pytest.raises(ValueError, match="unconditional"):
        m(torch.randn(1, 3, 8, 8), 1, class_labels=torch.tensor([0]))


def test_constructor_rejects_bad_geometry():
    with pytest.raises(ValueError, match="divisible"):
        MaskDiTTransformer2DModel(**{**TINY_MASKDIT, "sample_size": 9})


@pytest.mark.parametrize("mask_ratio", [0.0, 0.5])
def test_compiles_fullgraph_without_graph_breaks(tiny_maskdit, mask_ratio):
    # backend="eager" runs dynamo's full tracing (fullgraph=True fails on any graph break) without inductor codegen.
    torch._dynamo.reset()
    compiled = torch.compile(tiny_maskdit, fullgraph=True, backend="eager")
    x = torch.randn(2, 3, 8, 8)
    out = compiled(x, torch.tensor([0.1, 0.2]), class_labels=torch.tensor([1, 2]), mask_ratio=mask_ratio)
    assert out.sample.shape == (2, 3, 8, 8)


@pytest.mark.slow
def test_compiles_with_inductor(tiny_maskdit):
    torch._dynamo.reset()
    compiled = torch.compile(tiny_maskdit, fullgraph=True)
    x = torch.randn(2, 3, 8, 8)
    ref = tiny_maskdit(x, 0.3, class_labels=torch.tensor([1, 2])).sample
    out = compiled(x, 0.3, class_labels=torch.tensor([1, 2])).sample
    assert torch.allclose(ref, out, atol=1e-4)
