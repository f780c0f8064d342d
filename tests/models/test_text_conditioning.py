"""Text conditioning of MaskDiT and MDTv2 (``caption_channels``): caption cross-attention in the blocks and the pooled
caption in the adaLN conditioning, through the shared base class; class conditioning stays the default."""

import pytest
import torch

from diffusers_masked import MaskDiTTransformer2DModel, MDTv2Transformer2DModel
from diffusers_masked.models.masking import random_token_mask
from testing_utils import TINY_MASKDIT, randomize

CAPTION = 24
TINY = {
    "maskdit": (MaskDiTTransformer2DModel, TINY_MASKDIT),
    "mdt": (MDTv2Transformer2DModel, dict(sample_size=8, patch_size=2, in_channels=3, hidden_size=32, num_layers=4,
                                          num_decoder_layers=2, num_attention_heads=2, num_classes=10)),
}


def text_model(which, **overrides):
    cls, config = TINY[which]
    torch.manual_seed(0)
    return randomize(cls(**{**config, "num_classes": None, "caption_channels": CAPTION, **overrides})).eval()


def inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, 8, 8, generator=g)
    t = torch.rand(2, generator=g)
    text = torch.randn(2, 5, CAPTION, generator=g)
    text_mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    return x, t, text, text_mask


def change_masked_patches(x, token_mask):
    """``x`` with the pixels of every masked 2x2 patch (4x4 grid) moved far away."""
    x2 = x.clone()
    for b in range(x.shape[0]):
        for tok in torch.nonzero(token_mask.mask[b]).flatten().tolist():
            r, c = divmod(tok, 4)
            x2[b, :, 2 * r: 2 * r + 2, 2 * c: 2 * c + 2] += 10.0
    return x2


@pytest.mark.parametrize("which", TINY)
def test_class_conditioning_stays_the_default_with_the_same_state_dict(which):
    cls, config = TINY[which]
    model = cls(**config)
    assert model.config.caption_channels is None and not model.is_text_conditioned
    assert not [k for k in model.state_dict() if "caption" in k or "attn2" in k]


@pytest.mark.parametrize("which", TINY)
def test_text_forward_uses_the_caption_and_trains_every_parameter(which):
    model = text_model(which).train()
    assert model.is_text_conditioned and model.class_embed is None
    x, t, text, text_mask = inputs()
    out = model(x, t, encoder_hidden_states=text, encoder_attention_mask=text_mask, mask_ratio=0.5,
                generator=torch.Generator().manual_seed(0))
    assert out.sample.shape == (2, model.out_channels, 8, 8) and out.mask.sum(1).tolist() == [8, 8]
    out.sample.square().mean().backward()
    assert [n for n, p in model.named_parameters() if p.grad is None] == []
    model.eval()
    with torch.no_grad():
        a = model(x, t, encoder_hidden_states=text, encoder_attention_mask=text_mask).sample
        b = model(x, t, encoder_hidden_states=text.flip(0), encoder_attention_mask=text_mask).sample
        # Padding tokens (mask 0) are ignored, whatever their values.
        padded = text.clone()
        padded[0, 3:] = 100.0
        c = model(x, t, encoder_hidden_states=padded, encoder_attention_mask=text_mask).sample
    assert not torch.allclose(a, b)
    torch.testing.assert_close(c, a)


@pytest.mark.parametrize("which", TINY)
def test_every_block_cross_attends_and_a_fresh_caption_branch_starts_at_zero(which):
    cls, config = TINY[which]
    torch.manual_seed(0)
    fresh = cls(**{**config, "num_classes": None, "caption_channels": CAPTION})
    blocks = [m for m in fresh.modules() if hasattr(m, "attn2") and hasattr(m, "adaln_modulation")]
    assert blocks and all(b.attn2 is not None for b in blocks)
    assert all(torch.all(b.attn2.to_out[0].weight == 0) for b in blocks)
    assert len(fresh.caption_refiner) == 1 and torch.all(fresh.caption_refiner[0].attn.to_out[0].weight == 0)


def test_maskdit_text_output_does_not_depend_on_the_masked_tokens():
    # MaskDiT's encoder sees the kept tokens only and the decoder gets mask tokens at the masked places, so with a
    # caption too the whole prediction is blind to the masked patches.
    model = text_model("maskdit")
    x, t, text, text_mask = inputs()
    token_mask = random_token_mask(2, 16, 0.5, generator=torch.Generator().manual_seed(2))
    x2 = change_masked_patches(x, token_mask)
    kw = dict(encoder_hidden_states=text, encoder_attention_mask=text_mask)
    with torch.no_grad():
        out = model(x, t, ids_keep=token_mask, **kw).sample
        out2 = model(x2, t, ids_keep=token_mask, **kw).sample
        full, full2 = model(x, t, **kw).sample, model(x2, t, **kw).sample
    torch.testing.assert_close(out, out2)
    assert not torch.allclose(full, full2)  # without the mask they do matter (the test can fail)


def test_mdt_text_encoder_output_does_not_depend_on_the_masked_tokens():
    # MDTv2's decoder sees the noisy masked tokens through its dense input shortcut (as the official code), so the
    # independence holds for the encoder, as the class-conditional test checks.
    model = text_model("mdt")
    x, t, text, text_mask = inputs()
    token_mask = random_token_mask(2, 16, 0.5, generator=torch.Generator().manual_seed(2))
    x2 = change_masked_patches(x, token_mask)
    with torch.no_grad():
        tokens, pooled, keep = model.encode_captions(text, text_mask)
        cond = model.embed_condition(t, None, x.dtype) + pooled
        text_mask_4d = keep[:, None, None, :]
        enc, _ = model.encode(x, cond, token_mask, None, tokens, text_mask_4d)
        enc2, _ = model.encode(x2, cond, token_mask, None, tokens, text_mask_4d)
        full, _ = model.encode(x, cond, None, None, tokens, text_mask_4d)
        full2, _ = model.encode(x2, cond, None, None, tokens, text_mask_4d)
    torch.testing.assert_close(enc, enc2)
    assert not torch.allclose(full, full2)


@pytest.mark.parametrize("which", TINY)
def test_save_and_load_round_trip(which, tmp_path):
    cls, _ = TINY[which]
    model = text_model(which, num_caption_refiner_layers=2)
    model.save_pretrained(tmp_path)
    loaded = cls.from_pretrained(tmp_path).eval()
    assert loaded.config.caption_channels == CAPTION and len(loaded.caption_refiner) == 2
    x, t, text, text_mask = inputs()
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(x, t, encoder_hidden_states=text, encoder_attention_mask=text_mask).sample,
            model(x, t, encoder_hidden_states=text, encoder_attention_mask=text_mask).sample,
            rtol=0, atol=0,
        )


@pytest.mark.parametrize("which", TINY)
def test_text_and_class_inputs_are_refused_where_they_do_not_belong(which):
    cls, config = TINY[which]
    model = text_model(which)
    x, t, text, _ = inputs()
    with pytest.raises(ValueError, match=r"text-conditioned \(caption_channels=24\), so it takes no class_labels"):
        model(x, t, class_labels=torch.tensor([1, 2]), encoder_hidden_states=text)
    with pytest.raises(ValueError, match=r"pass encoder_hidden_states of shape \(2, tokens, 24\)"):
        model(x, t)
    with pytest.raises(ValueError, match=r"must have shape \(2, tokens, 24\)"):
        model(x, t, encoder_hidden_states=torch.randn(2, 5, 7))
    with pytest.raises(ValueError, match="not both"):
        cls(**{**config, "caption_channels": CAPTION})  # num_classes=10 as well
    with pytest.raises(ValueError, match="takes class_labels, not encoder_hidden_states"):
        cls(**config)(x, t, class_labels=torch.tensor([1, 2]), encoder_hidden_states=text)


@pytest.mark.parametrize("which", TINY)
def test_text_model_compiles_without_graph_breaks_and_checkpoints_the_same_gradients(which):
    x, t, text, text_mask = inputs()
    ids = random_token_mask(2, 16, 0.5, generator=torch.Generator().manual_seed(2)).ids_keep
    kw = dict(encoder_hidden_states=text, encoder_attention_mask=text_mask, ids_keep=ids)
    model = text_model(which, route_start=1, route_end=1)
    route = torch.stack([torch.randperm(8, generator=torch.Generator().manual_seed(s))[:4] for s in (0, 1)])
    explanation = torch._dynamo.explain(model)(x, t, route_ids=route, **kw)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    torch._dynamo.reset()
    grads = []
    for checkpointing in (False, True):
        model = text_model(which, route_start=1, route_end=1).train()
        if checkpointing:
            model.enable_gradient_checkpointing()
        model(x, t, route_ids=route, **kw).sample.square().mean().backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for n, g in grads[0].items():
        torch.testing.assert_close(grads[1][n], g, msg=n)


def test_bf16_text_forward_runs():
    model = text_model("mdt").to(torch.bfloat16)
    x, t, text, text_mask = inputs()
    with torch.no_grad():
        out = model(x.bfloat16(), t, encoder_hidden_states=text, encoder_attention_mask=text_mask).sample
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
