import math

import numpy as np
import pytest
import torch

from diffusers_masked import DeferredMaskDiTTransformer2DModel
from diffusers_masked.models.layers import count_parameters
from diffusers_masked.models.masking import num_kept_tokens
from diffusers_masked.models.moe import ExpertChoiceFeedForward
from diffusers_masked.models.transformer_deferred_maskdit import layerwise_block_widths

CAPTION = 32  # caption_channels of the Debug preset


def _model(seed=0, **overrides):
    torch.manual_seed(seed)
    config = dict(sample_size=8, in_channels=3)
    config.update(overrides)
    model = DeferredMaskDiTTransformer2DModel.from_preset("Debug/2", **config)
    # adaLN-Zero starts as identity with zero output: give every weight a value so outputs are non-trivial.
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.05)
    return model.eval()


def _inputs(batch=2, size=8, channels=3, tokens=5, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, channels, size, size, generator=g)
    t = torch.rand(batch, generator=g) - 0.5
    text = torch.randn(batch, tokens, CAPTION, generator=g)
    return x, t, text


# ------------------------------------------------------------------------------------------------------------------
# Layer-wise scaling and presets
# ------------------------------------------------------------------------------------------------------------------
def test_layerwise_widths_follow_the_official_formula():
    dim, depth, head = 1024, 28, 64
    widths = layerwise_block_widths(dim, depth, head, (0.5, 1.0), (0.5, 4.0), 256, num_experts=8, experts_every_n=2)
    q, f = np.linspace(0.5, 1.0, depth), np.linspace(0.5, 4.0, depth)
    for i, w in enumerate(widths):
        expected_att = dim if q[i] == 1.0 else 2 * head * math.ceil(int(dim * q[i]) / (2 * head))
        requested = int(dim * f[i])
        moe = i % 2 == 1 and i < depth - 1
        expected_ff = 256 * math.ceil((requested if moe else int(2 * requested / 3)) / 256)
        assert (w.attention_dim, w.num_attention_heads, w.ff_inner_dim, w.is_moe) == (
            expected_att, expected_att // head, expected_ff, moe
        ), i
    # Rows of the spec's table (research/official_microdit.md section 1.4).
    table = {0: (512, 8, 512, False), 1: (640, 10, 768, True), 7: (768, 12, 1536, True), 14: (896, 14, 1792, False),
             25: (1024, 16, 3840, True), 26: (1024, 16, 2816, False), 27: (1024, 16, 2816, False)}
    for i, row in table.items():
        w = widths[i]
        assert (w.attention_dim, w.num_attention_heads, w.ff_inner_dim, w.is_moe) == row, i
    assert sum(w.is_moe for w in widths) == 13
    mixer = layerwise_block_widths(768, 6, 64, 1.0, 4.0, 256, 8, 2, is_patch_mixer=True)
    assert [w.is_moe for w in mixer] == [False, True, False, True, False, True]
    assert {w.attention_dim for w in mixer} == {768} and [w.ff_inner_dim for w in mixer[:2]] == [2048, 3072]


def test_model_blocks_use_the_computed_widths():
    model = DeferredMaskDiTTransformer2DModel.from_preset("Debug/2", sample_size=8)
    for block, w in zip(model.transformer_blocks, model.block_widths):
        assert block.attn1.to_q.out_features == w.attention_dim
        assert block.attn1.heads == w.num_attention_heads
        assert block.attn2.to_q.out_features == model.config.hidden_size  # cross-attention stays full width
        if w.is_moe:
            assert isinstance(block.ff, ExpertChoiceFeedForward) and block.ff.inner_dim == w.ff_inner_dim
        else:
            assert block.ff.net[2].in_features == w.ff_inner_dim
    widths = [w.attention_dim for w in model.block_widths]
    assert widths == sorted(widths) and widths[0] < widths[-1]


def test_official_parameter_counts():
    with torch.device("meta"):
        xl = DeferredMaskDiTTransformer2DModel.from_preset("XL/2")
        tiny = DeferredMaskDiTTransformer2DModel.from_preset("Tiny/2")
    assert count_parameters(xl) == 1_165_442_320  # the paper's 1.16B sparse transformer
    assert count_parameters(tiny) == 200_692_752
    experts = sum(p.numel() for n, p in xl.named_parameters() if ".experts." in n)
    assert experts == 603_979_776
    assert "XL/2" in DeferredMaskDiTTransformer2DModel.available_presets()


def test_dense_option_has_no_experts():
    model = _model(num_experts=0)
    assert not any(isinstance(m, ExpertChoiceFeedForward) for m in model.modules())
    x, t, text = _inputs()
    assert torch.isfinite(model(x, t, encoder_hidden_states=text, mask_ratio=0.5).sample).all()


# ------------------------------------------------------------------------------------------------------------------
# Deferred masking
# ------------------------------------------------------------------------------------------------------------------
def _backbone_inputs(model, *args, **kwargs):
    seen = {}

    def hook(module, args):
        seen["x"] = args[0].clone()

    handle = model.transformer_blocks[0].register_forward_pre_hook(hook)
    try:
        out = model(*args, **kwargs)
    finally:
        handle.remove()
    return seen["x"], out


@pytest.mark.parametrize("strategy, changes", [("deferred", True), ("naive", False)])
def test_patch_mixer_sees_all_tokens_only_when_deferred(strategy, changes):
    model = _model(mask_strategy=strategy)
    x, t, text = _inputs()
    ids_keep = torch.tensor([[0, 5, 9, 14], [3, 4, 8, 15]])  # 16 tokens of 2x2 patches
    base, _ = _backbone_inputs(model, x, t, encoder_hidden_states=text, ids_keep=ids_keep)
    x2 = x.clone()
    x2[:, :, 0:2, 2:4] += 3.0  # token 1: masked in both samples
    moved, _ = _backbone_inputs(model, x2, t, encoder_hidden_states=text, ids_keep=ids_keep)
    assert base.shape == (2, 4, model.config.hidden_size)
    assert (not torch.allclose(base, moved, atol=1e-6)) == changes


@pytest.mark.parametrize("strategy", ["deferred", "naive"])
@pytest.mark.parametrize("mask_ratio", [0.75, 0.3])
def test_backbone_runs_on_kept_tokens_only(strategy, mask_ratio):
    model = _model(mask_strategy=strategy)
    n = model.num_tokens
    kept = num_kept_tokens(n, mask_ratio)
    assert kept == round(n * (1 - mask_ratio))
    lengths = {"mixer": [], "backbone": []}
    hooks = [b.register_forward_pre_hook(lambda m, a: lengths["mixer"].append(a[0].shape[1])) for b in model.patch_mixer_blocks]
    hooks += [b.register_forward_pre_hook(lambda m, a: lengths["backbone"].append(a[0].shape[1])) for b in model.transformer_blocks]
    x, t, text = _inputs()
    out = model(x, t, encoder_hidden_states=text, mask_ratio=mask_ratio, generator=torch.Generator().manual_seed(0))
    for h in hooks:
        h.remove()
    assert lengths["backbone"] == [kept] * model.config.num_layers
    assert lengths["mixer"] == [n if strategy == "deferred" else kept] * model.config.patch_mixer_layers
    assert out.mask.shape == (2, n) and out.mask.sum(1).tolist() == [n - kept] * 2
    # No decoder: masked tokens predict zero; kept ones do not.
    per_token = out.sample.abs().reshape(2, 3, 4, 2, 4, 2).sum(dim=(1, 3, 5)).reshape(2, n)
    assert torch.all(per_token[out.mask] == 0) and torch.all(per_token[~out.mask] > 0)


def test_mask_replay_and_inference_path():
    model = _model()
    x, t, text = _inputs()
    out = model(x, t, encoder_hidden_states=text, mask_ratio=0.75, generator=torch.Generator().manual_seed(3))
    again = model(x, t, encoder_hidden_states=text, mask_ratio=0.75, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(out.sample, again.sample)
    ids_keep = torch.argsort(out.mask.to(torch.int8), dim=1, stable=True)[:, : num_kept_tokens(16, 0.75)]
    replay = model(x, t, encoder_hidden_states=text, ids_keep=ids_keep)
    torch.testing.assert_close(replay.sample, out.sample, rtol=1e-5, atol=1e-6)
    assert torch.equal(replay.mask, out.mask)
    full = model(x, t, encoder_hidden_states=text)
    assert full.mask is None and full.sample.shape == x.shape and (full.sample != 0).all()


# ------------------------------------------------------------------------------------------------------------------
# Conditioning
# ------------------------------------------------------------------------------------------------------------------
def test_text_conditioning_and_padding_invariance():
    model = _model()
    x, t, text = _inputs()
    out = model(x, t, encoder_hidden_states=text).sample
    other = model(x, t, encoder_hidden_states=torch.randn_like(text)).sample
    assert not torch.allclose(out, other)
    # Padding tokens (mask 0) are ignored by refiner, pooling and cross-attention.
    padded = torch.cat([text, torch.randn(2, 3, CAPTION)], dim=1)
    mask = torch.cat([torch.ones(2, 5), torch.zeros(2, 3)], dim=1).long()
    torch.testing.assert_close(model(x, t, encoder_hidden_states=padded, encoder_attention_mask=mask).sample, out,
                               rtol=1e-5, atol=1e-6)
    # The all-zero (unconditional) caption gives the same output whatever its length.
    null_short = model(x, t, encoder_hidden_states=torch.zeros(2, 3, CAPTION)).sample
    null_long = model(x, t, encoder_hidden_states=torch.zeros(2, 9, CAPTION)).sample
    torch.testing.assert_close(null_short, null_long, rtol=1e-5, atol=1e-6)


def test_class_conditioning_runs():
    model = _model(caption_channels=None, num_classes=10)
    assert model.caption_refiner is None and model.transformer_blocks[0].attn2 is None
    x, t, _ = _inputs()
    a = model(x, t, class_labels=torch.tensor([1, 2]), mask_ratio=0.75).sample
    b = model(x, t, class_labels=torch.tensor([1, 10])).sample
    c = model(x, t, class_labels=torch.tensor([1, 2])).sample
    assert a.shape == x.shape and torch.isfinite(a).all()
    torch.testing.assert_close(b[0], c[0])
    assert not torch.allclose(b[1], c[1])


def test_backward_and_gradient_checkpointing_agree():
    model = _model().train()
    x, t, text = _inputs()
    kwargs = dict(encoder_hidden_states=text, mask_ratio=0.5, generator=torch.Generator().manual_seed(0))
    model(x, t, **kwargs).sample.square().mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    assert all(g.abs().sum() > 0 for g in grads.values()), [n for n, g in grads.items() if g.abs().sum() == 0]
    model.zero_grad()
    model.enable_gradient_checkpointing()
    kwargs["generator"] = torch.Generator().manual_seed(0)
    model(x, t, **kwargs).sample.square().mean().backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[n], rtol=1e-4, atol=1e-7)


def test_default_init_is_identity_at_output_and_save_load(tmp_path):
    torch.manual_seed(0)
    model = DeferredMaskDiTTransformer2DModel.from_preset("Debug/4", sample_size=8, in_channels=1)
    x = torch.randn(1, 1, 8, 8)
    text = torch.randn(1, 4, CAPTION)
    assert torch.all(model(x, 0.1, encoder_hidden_states=text).sample == 0)  # adaLN-Zero final layer
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.05)
    model.save_pretrained(tmp_path)
    loaded = DeferredMaskDiTTransformer2DModel.from_pretrained(tmp_path)
    assert loaded.config.patch_size == 4 and loaded.config.mask_strategy == "deferred"
    torch.testing.assert_close(loaded(x, 0.1, encoder_hidden_states=text).sample, model(x, 0.1, encoder_hidden_states=text).sample)


# ------------------------------------------------------------------------------------------------------------------
# Bad inputs
# ------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "overrides",
    [dict(mask_strategy="late"), dict(num_classes=10), dict(attention_ratios=(0.5, 0.7, 1.0)), dict(sample_size=7)],
)
def test_bad_config_raises(overrides):
    with pytest.raises(ValueError):
        DeferredMaskDiTTransformer2DModel.from_preset("Debug/2", **{"sample_size": 8, **overrides})


def test_bad_inputs_raise():
    model = _model()
    x, t, text = _inputs()
    with pytest.raises(ValueError, match="encoder_hidden_states"):
        model(x, t)
    with pytest.raises(ValueError, match="caption_channels"):
        model(x, t, encoder_hidden_states=torch.randn(2, 5, 7))
    with pytest.raises(ValueError, match="encoder_attention_mask"):
        model(x, t, encoder_hidden_states=text, encoder_attention_mask=torch.ones(2, 4))
    with pytest.raises(ValueError):
        model(x, t, class_labels=torch.tensor([0, 1]), encoder_hidden_states=text)
    with pytest.raises(ValueError, match="mask_ratio"):
        model(x, t, encoder_hidden_states=text, mask_ratio=1.0)
    with pytest.raises(ValueError):
        model(x[:, :2], t, encoder_hidden_states=text)
    class_model = _model(caption_channels=None, num_classes=10)
    with pytest.raises(ValueError, match="no text conditioning"):
        class_model(x, t, class_labels=torch.tensor([0, 1]), encoder_hidden_states=text)
    with pytest.raises(ValueError, match="class"):
        class_model(x, t, class_labels=torch.tensor([0, 11]))


def test_bf16_and_no_graph_breaks():
    model = _model()
    x, t, text = _inputs()
    mask = torch.ones(2, 5, dtype=torch.long)
    out = model.to(torch.bfloat16)(x.bfloat16(), t, encoder_hidden_states=text.bfloat16(), encoder_attention_mask=mask,
                                   mask_ratio=0.75).sample
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    model = model.float()
    explanation = torch._dynamo.explain(
        lambda x, t, y, m: model(x, t, encoder_hidden_states=y, encoder_attention_mask=m, mask_ratio=0.75).sample
    )(x, t, text, mask)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1


def test_lora_adapter_on_attention_router_and_experts():
    peft = pytest.importorskip("peft")
    model = _model()
    x, t, text = _inputs()
    ref = model(x, t, encoder_hidden_states=text).sample
    model.add_adapter(peft.LoraConfig(r=2, target_modules=["to_q", "to_k", "to_v", "to_out.0", "router"],
                                      target_parameters=["ff.experts.up_proj", "ff.experts.down_proj"]))
    torch.testing.assert_close(model(x, t, encoder_hidden_states=text).sample, ref)  # LoRA B starts at zero
    lora = {n: p for n, p in model.named_parameters() if "lora_" in n}
    assert any(".experts." in n for n in lora) and any(".router." in n for n in lora)
    model(x, t, encoder_hidden_states=text, mask_ratio=0.5).sample.square().mean().backward()
    assert all(p.grad is not None for n, p in lora.items() if "lora_B" in n)
