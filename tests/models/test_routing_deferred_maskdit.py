"""TREAD routing as a knob on DeferredMaskDiT's backbone (after the deferred mask; MoE blocks inside the span)."""

import pytest
import torch

from diffusers_masked import DeferredMaskDiTTransformer2DModel
from diffusers_masked.models.masking import random_ids_keep, random_route_ids
from diffusers_masked.models.moe import ExpertChoiceFeedForward

CAPTION = 32  # caption_channels of the Debug preset


def make(**kw):
    torch.manual_seed(0)
    model = DeferredMaskDiTTransformer2DModel.from_preset("Debug/2", sample_size=8, in_channels=3, **kw)
    # adaLN-Zero starts as identity with zero output: give every weight a value so outputs are non-trivial.
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.05)
    return model


def inputs():
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 3, 8, 8, generator=g), torch.rand(2, generator=g), torch.randn(2, 5, CAPTION, generator=g)


def mask_and_route():
    ids = random_ids_keep(2, 16, 0.5, generator=torch.Generator().manual_seed(0))  # 8 of 16 tokens kept
    route = random_route_ids(2, 8, 0.5, generator=torch.Generator().manual_seed(1))  # 4 of them go through
    return ids, route


def test_off_by_default_ratio_zero_is_exact_and_explicit_routing_is_honoured_in_eval_mode():
    model = make()
    assert model.route_span == (2, 2)  # Debug/2's 4 backbone blocks: the paper's span shrunk to fit
    x, t, text = inputs()
    ids, route = mask_and_route()
    kw = dict(encoder_hidden_states=text, ids_keep=ids)
    with torch.no_grad():
        model.train()
        plain = model(x, t, **kw).sample
        zero = model(x, t, **kw, route_ratio=0.0).sample
        routed = model(x, t, **kw, route_ids=route).sample
        drawn = model(x, t, **kw, route_ratio=0.5, generator=torch.Generator().manual_seed(1)).sample
        model.eval()
        eval_plain = model(x, t, **kw).sample
        eval_routed = model(x, t, **kw, route_ratio=0.5, route_ids=route).sample
        eval_drawn = model(x, t, **kw, route_ratio=0.5, generator=torch.Generator().manual_seed(1)).sample
    assert torch.equal(plain, zero) and not torch.allclose(plain, routed)
    assert torch.equal(eval_plain, plain) and torch.equal(eval_routed, routed) and torch.equal(eval_drawn, drawn)
    assert not torch.allclose(eval_drawn, eval_plain)


def test_only_backbone_blocks_in_the_span_see_fewer_tokens_moe_included():
    model = make(route_start=1, route_end=2).train()
    assert isinstance(model.transformer_blocks[1].ff, ExpertChoiceFeedForward)  # the span holds an MoE block
    seen = []
    for name, blocks in (("mixer", model.patch_mixer_blocks), ("backbone", model.transformer_blocks)):
        for i, blk in enumerate(blocks):
            blk.register_forward_hook(lambda m, a, o, k=(name, i): seen.append((*k, a[0].shape[1])))
    x, t, text = inputs()
    ids, route = mask_and_route()
    out = model(x, t, encoder_hidden_states=text, ids_keep=ids, route_ids=route)
    assert seen == [("mixer", 0, 16), ("mixer", 1, 16), ("backbone", 0, 8), ("backbone", 1, 4), ("backbone", 2, 4),
                    ("backbone", 3, 8)]
    assert out.mask.sum(1).tolist() == [8, 8]
    out.sample.square().mean().backward()
    # every expert still gets tokens (capacity from the routed count), so DDP sees no unused parameter
    assert [n for n, p in model.named_parameters() if p.grad is None] == []
    with pytest.raises(ValueError, match="route_ids"):
        model(x, t, encoder_hidden_states=text, ids_keep=ids, route_ids=torch.zeros(2, 9, dtype=torch.long))


def test_routed_tokens_skip_the_span_unchanged():
    # Backbone blocks replaced by "add 1": tokens that go through the span get +4 (blocks 0..3), the others +2
    # (blocks 0 and 3 only) and come back bit-identical otherwise, in their places.
    model = make(route_start=1, route_end=2).train()
    for blk in model.transformer_blocks:
        blk.forward = lambda x, *a, **k: x + 1
    got = {}
    # (`dict.update` returns None: a hook that returned a value would replace the module's input / output)
    model.patch_mixer_proj_out.register_forward_hook(lambda m, a, o: got.update(start=o))
    model.final_layer.register_forward_pre_hook(lambda m, a: got.update(end=a[0]))
    x, t, text = inputs()
    route = random_route_ids(2, 16, 0.5, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        model(x, t, encoder_hidden_states=text, route_ids=route)
    through = torch.zeros(2, 16, 1, dtype=torch.bool).scatter(1, route.unsqueeze(-1), True)
    s = got["start"]
    assert torch.equal(got["end"], torch.where(through, s + 1 + 1 + 1 + 1, s + 1 + 1))


def test_bad_route_settings_are_clear_errors():
    with pytest.raises(ValueError, match="outside the 4 backbone blocks"):
        make(route_end=4)
    with pytest.raises(ValueError, match="span is empty"):
        make(route_start=3, route_end=1)
    x, t, text = inputs()
    with pytest.raises(ValueError, match="route_ratio must be a number in"):
        make().train()(x, t, encoder_hidden_states=text, route_ratio=1.0)


def test_compile_fullgraph_masked_and_routed():
    model = make(route_start=1, route_end=2).train()
    x, t, text = inputs()
    ids, route = mask_and_route()
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x, t, encoder_hidden_states=text, ids_keep=ids, route_ids=route).sample,
                                   model(x, t, encoder_hidden_states=text, ids_keep=ids, route_ids=route).sample)
    torch._dynamo.reset()


def test_gradient_checkpointing_gives_the_same_routed_gradients():
    x, t, text = inputs()
    ids, route = mask_and_route()
    grads = []
    for checkpointing in (False, True):
        model = make(route_start=1, route_end=2).train()
        if checkpointing:
            model.enable_gradient_checkpointing()
        model(x, t, encoder_hidden_states=text, ids_keep=ids, route_ids=route).sample.square().mean().backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for n, g in grads[0].items():
        torch.testing.assert_close(grads[1][n], g, msg=n)
