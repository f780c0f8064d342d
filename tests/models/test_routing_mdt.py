"""TREAD routing as a knob on MDTv2's encoder: composed with the mask, the relative position bias, the long skips."""

import pytest
import torch

from diffusers_masked import MDTv2Transformer2DModel
from diffusers_masked.models.masking import random_ids_keep, random_route_ids
from testing_utils import randomize

# 6 encoder blocks (in-blocks 0..2, out-blocks 3..5; long skips 2->3, 1->4, 0->5) + 2 decoder blocks, 16 tokens.
CFG = dict(sample_size=8, patch_size=2, in_channels=4, hidden_size=32, num_layers=8, num_decoder_layers=2,
           num_attention_heads=2, num_classes=10)
# A span holding a whole skip (1..4), one a skip leaves (1..3: 1->4), one skips enter (3..4), the whole encoder.
SPANS = [(1, 4), (1, 3), (3, 4), (0, 5)]


def make(**kw):
    torch.manual_seed(0)
    return randomize(MDTv2Transformer2DModel(**{**CFG, **kw})).eval()


def inputs():
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 4, 8, 8, generator=g), torch.randint(0, 1000, (2,), generator=g), torch.tensor([1, 10])


def mask_and_route():
    ids = random_ids_keep(2, 16, 0.5, generator=torch.Generator().manual_seed(0))  # 8 of 16 tokens kept
    route = random_route_ids(2, 8, 0.5, generator=torch.Generator().manual_seed(1))  # 4 of them go through
    return ids, route


def test_off_by_default_ratio_zero_is_exact_and_explicit_routing_is_honoured_in_eval_mode():
    # The rule every model follows: a route that is asked for (route_ids, or route_ratio > 0) is taken in training
    # and eval mode alike; without one (the default, and what pipelines pass) every token goes through every block.
    model = make()
    assert model.route_span == (2, 2)  # 6 encoder blocks: the paper's span (2, E - 4) shrunk to fit
    assert make(num_layers=28, num_decoder_layers=4).route_span == (2, 20)
    x, t, y = inputs()
    ids, route = mask_and_route()
    with torch.no_grad():
        model.train()
        plain = model(x, t, y, ids_keep=ids).sample
        zero = model(x, t, y, ids_keep=ids, route_ratio=0.0).sample
        routed = model(x, t, y, ids_keep=ids, route_ids=route).sample
        drawn = model(x, t, y, ids_keep=ids, route_ratio=0.5, generator=torch.Generator().manual_seed(1)).sample
        model.eval()
        eval_plain = model(x, t, y, ids_keep=ids).sample
        eval_routed = model(x, t, y, ids_keep=ids, route_ratio=0.5, route_ids=route).sample
        eval_drawn = model(x, t, y, ids_keep=ids, route_ratio=0.5, generator=torch.Generator().manual_seed(1)).sample
    assert torch.equal(plain, zero) and not torch.allclose(plain, routed)
    assert torch.equal(eval_plain, plain) and torch.equal(eval_routed, routed) and torch.equal(eval_drawn, drawn)
    assert not torch.allclose(eval_drawn, eval_plain)


@pytest.mark.parametrize("span", SPANS)
@pytest.mark.parametrize("masked", [False, True])
def test_a_route_through_every_token_in_any_order_is_the_plain_model(span, masked):
    # Every token goes through the span, in a shuffled order: only right bias lookups (by grid position) and
    # right skip gathers / scatters give back the plain model's output.
    model = make(route_start=span[0], route_end=span[1]).train()
    x, t, y = inputs()
    ids = random_ids_keep(2, 16, 0.5, generator=torch.Generator().manual_seed(0)) if masked else None
    k = 8 if masked else 16
    perm = torch.stack([torch.randperm(k, generator=torch.Generator().manual_seed(s)) for s in (3, 4)])
    with torch.no_grad():
        plain = model(x, t, y, ids_keep=ids).sample
        shuffled = model(x, t, y, ids_keep=ids, route_ids=perm).sample
    torch.testing.assert_close(shuffled, plain, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("span", SPANS)
def test_tokens_that_skip_the_span_see_it_as_the_identity_long_skips_included(span):
    # Elementwise stand-in blocks make the reference easy: run every block on all tokens, and inside the span keep
    # the new value only for the routed-through tokens (the others pass unchanged, skips included).
    start, end = span
    model = make(route_start=start, route_end=end).train()
    blocks = list(model.encoder_in_blocks) + list(model.encoder_out_blocks)
    for i, blk in enumerate(blocks):
        blk.forward = lambda x, c, b, skip=None, i=i: x * 1.5 + (i + 1) + (0 if skip is None else 0.25 * skip)
    x, t, y = inputs()
    cond = model.embed_condition(t, y, x.dtype)
    route = random_route_ids(2, 16, 0.5, generator=torch.Generator().manual_seed(1))
    through = torch.zeros(2, 16, 1, dtype=torch.bool).scatter(1, route.unsqueeze(-1), True)
    with torch.no_grad():
        out, _ = model.encode(x, cond, route_ids=route)
        ref = model.patch_embed(x) + model.pos_embed
        skips = []
        for i, blk in enumerate(blocks):
            new = blk.forward(ref, None, None, skips.pop() if i >= 3 else None)
            ref = torch.where(through, new, ref) if start <= i <= end else new
            if i < 3:
                skips.append(ref)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)


def test_only_encoder_blocks_in_the_span_see_fewer_tokens():
    model = make(route_start=1, route_end=3).train()
    seen = []
    named = [("enc", b) for b in list(model.encoder_in_blocks) + list(model.encoder_out_blocks)]
    named += [("side", model.side_interpolater.block)] + [("dec", b) for b in model.decoder_blocks]
    for i, (kind, blk) in enumerate(named):
        blk.register_forward_hook(lambda m, a, o, k=(kind, i): seen.append(
            (*k, a[0].shape[1], a[2].shape[-1], a[3].shape[1] if len(a) > 3 and a[3] is not None else None)))
    x, t, y = inputs()
    ids, route = mask_and_route()
    out = model(x, t, y, ids_keep=ids, route_ids=route)
    # (kind, index, tokens, bias keys, skip tokens): the span (1..3) holds 4 tokens, its bias and skip too
    assert seen == [("enc", 0, 8, 8, None), ("enc", 1, 4, 4, None), ("enc", 2, 4, 4, None), ("enc", 3, 4, 4, 4),
                    ("enc", 4, 8, 8, 8), ("enc", 5, 8, 8, 8), ("side", 6, 16, 16, None), ("dec", 7, 16, 16, 16),
                    ("dec", 8, 16, 16, 16)]
    out.sample.square().mean().backward()
    assert [n for n, p in model.named_parameters() if p.grad is None] == []
    with pytest.raises(ValueError, match="route_ids"):
        model(x, t, y, ids_keep=ids, route_ids=torch.zeros(2, 9, dtype=torch.long))


def test_bad_route_settings_are_clear_errors():
    with pytest.raises(ValueError, match="outside the 6 encoder blocks.*decoder is never routed"):
        MDTv2Transformer2DModel(**{**CFG, "route_end": 6})
    with pytest.raises(ValueError, match="span is empty"):
        MDTv2Transformer2DModel(**{**CFG, "route_start": 4, "route_end": 3})
    x, t, y = inputs()
    with pytest.raises(ValueError, match="route_ratio must be a number in"):
        make().train()(x, t, y, route_ratio=1.0)


def test_compile_fullgraph_masked_and_routed():
    model = make(route_start=1, route_end=3).train()
    x, t, y = inputs()
    ids, route = mask_and_route()
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x, t, y, ids_keep=ids, route_ids=route).sample,
                                   model(x, t, y, ids_keep=ids, route_ids=route).sample)
    torch._dynamo.reset()


def test_gradient_checkpointing_gives_the_same_routed_gradients():
    x, t, y = inputs()
    ids, route = mask_and_route()
    grads = []
    for checkpointing in (False, True):
        model = make(route_start=1, route_end=3).train()
        if checkpointing:
            model.enable_gradient_checkpointing()
        model(x, t, y, ids_keep=ids, route_ids=route).sample.square().mean().backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for n, g in grads[0].items():
        torch.testing.assert_close(grads[1][n], g, msg=n)
