import pytest
import torch
from diffusers import DiTTransformer2DModel

from diffusers_masked import RoutedDiTTransformer2DModel
from diffusers_masked.models.masking import (
    random_route_ids,
    resolve_route_span,
    route_enter,
    route_exit,
    run_routed_blocks,
)
from testing_utils import randomize

TINY_DIT = dict(sample_size=8, patch_size=2, in_channels=3, hidden_size=32, num_layers=6, num_attention_heads=4,
                num_classes=10)  # 16 tokens; paper span 2..max(2, 6 - 4) = 2..2 unless set


def make(**overrides):
    torch.manual_seed(0)
    return randomize(RoutedDiTTransformer2DModel(**{**TINY_DIT, **overrides})).eval()


def inputs(b=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 3, 8, 8, generator=g), torch.rand(b, generator=g), torch.tensor([0, 5, 10][:b])


def test_paper_span_defaults_and_presets():
    assert resolve_route_span(12, None, None) == (2, 8)  # DiT-B/2: blocks 2..8 (official tread.yaml)
    assert resolve_route_span(28, None, None) == (2, 24)  # DiT-XL/2: i = 2, j = B - 4
    assert resolve_route_span(28, 3, -2) == (3, 26)
    cfg = RoutedDiTTransformer2DModel.preset_config("XL/2")
    assert (cfg["num_layers"], cfg["hidden_size"], cfg["num_attention_heads"], cfg["patch_size"]) == (28, 1152, 16, 2)
    assert len(RoutedDiTTransformer2DModel.available_presets()) == 12


@pytest.mark.parametrize(
    "kwargs, match",
    [(dict(route_start=6), "outside the 6 blocks"), (dict(route_end=-7), "outside the 6 blocks"),
     (dict(route_start=4, route_end=3), "span is empty"), (dict(route_start=1.5), "integer block index")],
)
def test_bad_span_is_a_clear_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RoutedDiTTransformer2DModel(**{**TINY_DIT, **kwargs})


@pytest.mark.parametrize("ratio", [1.0, -0.1, 1.5, float("nan"), True])
def test_bad_route_ratio_is_a_clear_error(ratio):
    x, t, y = inputs()
    with pytest.raises(ValueError, match=r"route_ratio must be a number in \[0, 1\)"):
        make()(x, t, y, route_ratio=ratio)


def test_masking_does_not_compose_with_dit():
    x, t, y = inputs()
    with pytest.raises(ValueError, match="does not mask.*route_ratio"):
        make()(x, t, y, mask_ratio=0.5)
    with pytest.raises(ValueError, match="does not mask"):
        make()(x, t, y, ids_keep=torch.zeros(3, 4, dtype=torch.long))


def test_route_ratio_zero_equals_the_plain_model_exactly():
    model = make()
    x, t, y = inputs()
    with torch.no_grad():
        plain = model(x, t, y).sample
        zero = model(x, t, y, route_ratio=0.0, generator=torch.Generator().manual_seed(1)).sample
        # a "route" that keeps every token is the plain model too
        full = model(x, t, y, route_ids=torch.arange(16).repeat(3, 1)).sample
        routed = model(x, t, y, route_ratio=0.5, generator=torch.Generator().manual_seed(1)).sample
    assert torch.equal(plain, zero) and torch.equal(plain, full)
    assert not torch.allclose(plain, routed)


def test_routed_tokens_come_back_bit_identical_at_the_span_end():
    x = torch.randn(2, 10, 4)
    ids = random_route_ids(2, 10, 0.5, generator=torch.Generator().manual_seed(0))
    assert ids.shape == (2, 5)
    seen = []

    def block(i, h):
        seen.append((i, h.shape[1]))
        return h * 2.0 + i

    out = run_routed_blocks(x, 5, block, ids, (1, 3))
    assert seen == [(0, 10), (1, 5), (2, 5), (3, 5), (4, 10)]
    after0 = x * 2.0
    skipped = torch.ones(2, 10, dtype=torch.bool)
    skipped.scatter_(1, ids, False)
    expected_skipped = after0 * 2.0 + 4  # only blocks 0 and 4 touched them
    assert torch.equal(out[skipped], expected_skipped[skipped])
    # the routed-through tokens got blocks 0..4
    through = ((((after0 * 2 + 1) * 2 + 2) * 2 + 3) * 2 + 4)
    assert torch.equal(out[~skipped], through[~skipped])
    # route_exit keeps the start sequence for the skipped tokens, bit for bit
    start = torch.randn(2, 10, 4)
    back = route_exit(start, route_enter(start, ids) + 1, ids)
    assert torch.equal(back[skipped], start[skipped]) and torch.equal(back[~skipped], start[~skipped] + 1)


def test_routing_changes_only_the_blocks_inside_the_span():
    model = make(route_start=2, route_end=3)
    x, t, y = inputs()
    shapes = {}

    def record(name):
        def hook(module, args, output):
            shapes.setdefault(name, []).append((args[0].shape[1], output.detach().clone(), args[0].detach().clone()))
        return hook

    handles = [blk.register_forward_hook(record(i)) for i, blk in enumerate(model.blocks)]
    with torch.no_grad():
        model(x, t, y)
        ids = random_route_ids(3, 16, 0.5, generator=torch.Generator().manual_seed(3))
        model(x, t, y, route_ids=ids)
    for h in handles:
        h.remove()
    tokens = {i: [n for n, _, _ in v] for i, v in shapes.items()}
    assert tokens == {0: [16, 16], 1: [16, 16], 2: [16, 8], 3: [16, 8], 4: [16, 16], 5: [16, 16]}
    for i in (0, 1):  # before the span: the same computation
        assert torch.equal(shapes[i][0][1], shapes[i][1][1])
    # in the span the block sees exactly the routed-through tokens of its plain-run input at the span start
    assert torch.equal(shapes[2][1][2], route_enter(shapes[2][0][2], ids))
    assert not torch.allclose(shapes[4][0][1], shapes[4][1][1])  # after the span: the output changed


def test_gradients_reach_every_parameter_when_routed():
    model = make().train()
    x, t, y = inputs()
    out = model(x, t, y, route_ratio=0.5, generator=torch.Generator().manual_seed(0)).sample
    out.square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


def test_gradient_checkpointing_matches():
    x, t, y = inputs()
    ids = random_route_ids(3, 16, 0.5, generator=torch.Generator().manual_seed(0))
    grads = []
    for ckpt in (False, True):
        model = make().train()
        if ckpt:
            model.enable_gradient_checkpointing()
        model(x, t, y, route_ids=ids).sample.square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(grads[0], grads[1])


def test_compile_fullgraph_routed_and_plain():
    model = make()
    x, t, y = inputs()
    ids = random_route_ids(3, 16, 0.5, generator=torch.Generator().manual_seed(0))
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="eager", fullgraph=True)  # a graph break raises
    with torch.no_grad():
        torch.testing.assert_close(compiled(x, t, y, route_ids=ids).sample, model(x, t, y, route_ids=ids).sample)
        torch.testing.assert_close(compiled(x, t, y).sample, model(x, t, y).sample)
    torch._dynamo.reset()


def test_bf16_forward_is_finite():
    model = make().to(torch.bfloat16)
    x, t, y = inputs()
    out = model(x.bfloat16(), t, y, route_ratio=0.5, generator=torch.Generator().manual_seed(0)).sample
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


def test_save_load_round_trip(tmp_path):
    model = make(route_start=1, route_end=-2, learn_sigma=True)
    model.save_pretrained(tmp_path)
    loaded = RoutedDiTTransformer2DModel.from_pretrained(tmp_path).eval()
    assert loaded.route_span == (1, 4) and loaded.out_channels == 6
    x, t, y = inputs()
    with torch.no_grad():
        assert torch.equal(model(x, t, y).sample, loaded(x, t, y).sample)


def test_equals_diffusers_dit_for_the_same_weights():
    torch.manual_seed(0)
    dit = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=3, out_channels=6,
                                num_layers=3, sample_size=8, patch_size=2, num_embeds_ada_norm=10,
                                norm_eps=1e-6).eval()
    with torch.no_grad():
        for p in dit.parameters():
            p.normal_(0, 0.1)
        shared = dit.transformer_blocks[0].norm1.emb.state_dict()
        for block in dit.transformer_blocks[1:]:  # converted DiT checkpoints hold one embedder, copied per block
            block.norm1.emb.load_state_dict(shared)
    ours = RoutedDiTTransformer2DModel.from_diffusers_dit(dit).eval()
    x = torch.randn(4, 3, 8, 8)
    t = torch.tensor([0, 17, 500, 999])
    y = torch.tensor([0, 3, 9, 10])  # 10 = the null class
    with torch.no_grad():
        torch.testing.assert_close(ours(x, t, y).sample, dit(x, t, class_labels=y).sample, rtol=1e-5, atol=1e-5)
    # blocks with their own embedders cannot be shared: refused, not silently averaged
    with torch.no_grad():
        dit.transformer_blocks[2].norm1.emb.class_embedder.embedding_table.weight.add_(1.0)
    with pytest.raises(ValueError, match="Block 2's timestep / label embedder"):
        RoutedDiTTransformer2DModel.from_diffusers_dit(dit)
