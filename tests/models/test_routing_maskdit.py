"""TREAD routing as a knob on MaskDiT's encoder (composed with the mask: it routes among the kept tokens)."""

import pytest
import torch

from diffusers_masked import MaskDiTTransformer2DModel
from diffusers_masked.models.masking import random_ids_keep, random_route_ids
from testing_utils import randomize

CFG = dict(sample_size=8, patch_size=2, in_channels=3, hidden_size=32, num_layers=4, num_attention_heads=4,
           decoder_hidden_size=16, num_decoder_layers=1, decoder_num_attention_heads=2, num_classes=10)


def make(**kw):
    torch.manual_seed(0)
    return randomize(MaskDiTTransformer2DModel(**{**CFG, **kw})).eval()


def inputs():
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 3, 8, 8, generator=g), torch.rand(2, generator=g), torch.tensor([1, 10])


def test_off_by_default_and_ratio_zero_is_exact():
    model = make()
    assert model.route_span == (2, 2)
    x, t, y = inputs()
    ids = random_ids_keep(2, 16, 0.5, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = model(x, t, y, ids_keep=ids).sample
        b = model(x, t, y, ids_keep=ids, route_ratio=0.0).sample
        c = model(x, t, y, ids_keep=ids, route_ratio=0.5, generator=torch.Generator().manual_seed(1)).sample
    assert torch.equal(a, b) and not torch.allclose(a, c)


def test_routing_composes_with_the_mask_inside_the_encoder():
    model = make(route_start=1, route_end=2).train()
    seen = []
    for i, blk in enumerate(model.encoder_blocks):
        blk.register_forward_hook(lambda m, a, o, i=i: seen.append((i, a[0].shape[1])))
    x, t, y = inputs()
    ids = random_ids_keep(2, 16, 0.5, generator=torch.Generator().manual_seed(0))  # 8 kept tokens
    route = random_route_ids(2, 8, 0.5, generator=torch.Generator().manual_seed(1))  # 4 of them go through
    out = model(x, t, y, ids_keep=ids, route_ids=route)
    assert seen == [(0, 8), (1, 4), (2, 4), (3, 8)] and out.mask.sum(1).tolist() == [8, 8]
    out.sample.square().mean().backward()
    assert [n for n, p in model.named_parameters() if p.grad is None] == []
    with pytest.raises(ValueError, match="route_ids"):
        model(x, t, y, ids_keep=ids, route_ids=torch.zeros(2, 9, dtype=torch.long))


def test_bad_route_settings_are_clear_errors():
    with pytest.raises(ValueError, match="outside the 4 encoder blocks"):
        MaskDiTTransformer2DModel(**{**CFG, "route_end": 4})
    x, t, y = inputs()
    with pytest.raises(ValueError, match="route_ratio must be a number in"):
        make()(x, t, y, route_ratio=1.0)


def test_compile_fullgraph_masked_and_routed():
    model = make()
    x, t, y = inputs()
    ids = random_ids_keep(2, 16, 0.5, generator=torch.Generator().manual_seed(0))
    route = random_route_ids(2, 8, 0.5, generator=torch.Generator().manual_seed(1))
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x, t, y, ids_keep=ids, route_ids=route).sample,
                                   model(x, t, y, ids_keep=ids, route_ids=route).sample)
    torch._dynamo.reset()
