import pytest
import torch

from diffusers_masked.models.moe import ExpertChoiceFeedForward, expert_capacity


def _moe(dim=16, inner=24, experts=4, capacity=2.0, seed=0):
    torch.manual_seed(seed)
    return ExpertChoiceFeedForward(dim, inner, num_experts=experts, capacity_factor=capacity)


def _reference(moe: ExpertChoiceFeedForward, x: torch.Tensor) -> torch.Tensor:
    """Slow loop over samples and experts: out[t] = sum_{e picked t} p[t, e] * expert_e(x[t])."""
    b, t, d = x.shape
    k = expert_capacity(t, moe.num_experts, moe.capacity_factor)
    probs = (x @ moe.router.weight.T).softmax(-1)
    out = torch.zeros_like(x)
    for i in range(b):
        for e in range(moe.num_experts):
            chosen = probs[i, :, e].argsort(descending=True)[:k]
            h = torch.nn.functional.gelu(x[i, chosen] @ moe.experts.up_proj[e]) @ moe.experts.down_proj[e]
            out[i, chosen] += probs[i, chosen, e : e + 1] * h
    return out


def test_capacity_formula():
    assert expert_capacity(256, 8, 2.0) == 64
    assert expert_capacity(64, 8, 2.0) == 16  # MicroDiT backbone at 75% masking, 256 px
    assert expert_capacity(10, 8, 2.0) == 2  # int(2.5)
    assert expert_capacity(3, 8, 1.0) == 1  # never zero
    assert expert_capacity(4, 2, 8.0) == 4  # never more than the tokens


def test_every_expert_takes_exactly_its_capacity_of_distinct_top_tokens():
    moe = _moe(experts=4)
    x = torch.randn(3, 10, 16)
    probs, gates, token_ids = moe.route(x)
    k = expert_capacity(10, 4, 2.0)
    assert token_ids.shape == (3, 4, k) and gates.shape == (3, 4, k)
    assert torch.allclose(probs.sum(-1), torch.ones(3, 10))
    for i in range(3):
        for e in range(4):
            ids = token_ids[i, e]
            assert len(set(ids.tolist())) == k
            # The chosen tokens are the expert's k highest-probability tokens, and gates are those probabilities.
            threshold = probs[i, :, e].sort(descending=True).values[k - 1]
            assert torch.all(probs[i, ids, e] >= threshold)
            assert torch.allclose(gates[i, e], probs[i, ids, e])


def test_output_matches_reference_loop_and_unpicked_tokens_get_zero():
    moe = _moe()
    x = torch.randn(2, 12, 16)
    out = moe(x)
    assert out.shape == x.shape and torch.isfinite(out).all()
    torch.testing.assert_close(out, _reference(moe, x), rtol=1e-5, atol=1e-6)
    _, _, token_ids = moe.route(x)
    for i in range(2):
        unpicked = sorted(set(range(12)) - set(token_ids[i].flatten().tolist()))
        if unpicked:
            assert torch.all(out[i, unpicked] == 0)


def test_routing_is_per_sample():
    moe = _moe()
    x = torch.randn(4, 8, 16)
    torch.testing.assert_close(moe(x)[1:2], moe(x[1:2]), rtol=1e-5, atol=1e-6)


def test_gradients_reach_every_expert_and_the_router():
    moe = _moe(experts=8, capacity=1.0)
    x = torch.randn(2, 16, 16, requires_grad=True)
    moe(x).square().sum().backward()
    for name in ("up_proj", "down_proj"):
        grad = getattr(moe.experts, name).grad
        assert grad is not None
        assert torch.all(grad.flatten(1).abs().sum(1) > 0), f"an expert's {name} got no gradient"
    assert moe.router.weight.grad.abs().sum() > 0
    assert x.grad.abs().sum() > 0


def test_bf16_is_finite_and_close_to_fp32():
    moe = _moe()
    x = torch.randn(2, 12, 16)
    ref = moe(x)
    out = moe.to(torch.bfloat16)(x.to(torch.bfloat16))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), ref, rtol=0.05, atol=0.02)


def test_no_graph_breaks():
    moe = _moe()
    explanation = torch._dynamo.explain(moe)(torch.randn(2, 12, 16))
    assert explanation.graph_break_count == 0
    assert explanation.graph_count == 1


def test_peft_lora_can_target_router_and_expert_weights():
    peft = pytest.importorskip("peft")
    moe = _moe()
    x = torch.randn(2, 12, 16)
    ref = moe(x)
    config = peft.LoraConfig(r=2, target_modules=["router"], target_parameters=["experts.up_proj", "experts.down_proj"])
    model = peft.get_peft_model(torch.nn.Sequential(moe), config)
    torch.testing.assert_close(model(x), ref)  # LoRA B starts at zero: same function
    lora = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert any("router" in n for n in lora)
    assert sum("experts" in n for n in lora) >= 4  # A and B for both expert tensors
    model(x).square().sum().backward()
    assert all(p.grad is not None for n, p in lora.items() if "lora_B" in n)
    for n, p in lora.items():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.1)
    assert not torch.allclose(model(x), ref)


@pytest.mark.parametrize(
    "kwargs",
    [dict(num_experts=0), dict(capacity_factor=0.0), dict(activation_fn="relu6")],
)
def test_bad_arguments_raise(kwargs):
    with pytest.raises(ValueError):
        ExpertChoiceFeedForward(8, 16, **kwargs)
