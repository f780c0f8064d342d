import torch

from diffusers_masked.models.layers import (
    Attention,
    DiTBlock,
    FeedForward,
    PatchEmbed,
    patchify,
    sincos_pos_embed_2d,
    unpatchify,
)


def test_patchify_inverts_unpatchify_and_matches_patch_embed_order():
    x = torch.randn(2, 3, 8, 12)
    tokens = patchify(x, 4)
    assert tokens.shape == (2, 6, 48)
    assert torch.equal(unpatchify(tokens, 4, 3, 8, 12), x)
    # token 1 = row 0, column 1 (row-major), as PatchEmbed's flatten order
    assert torch.equal(tokens[:, 1].view(2, 4, 4, 3).permute(0, 3, 1, 2), x[:, :, 0:4, 4:8])
    pe = PatchEmbed(4, 3, 5)
    emb = pe(x)
    manual = torch.einsum("bchw,ochw->bo", x[:, :, 0:4, 4:8], pe.proj.weight) + pe.proj.bias
    assert torch.allclose(emb[:, 1], manual, atol=1e-5)


def test_sincos_table_layout():
    t = sincos_pos_embed_2d(8, 4)
    assert t.shape == (1, 16, 8)
    # first half encodes the column: tokens 0 and 4 (same column, other row) share it
    assert torch.allclose(t[0, 0, :4], t[0, 4, :4]) and not torch.allclose(t[0, 0, 4:], t[0, 4, 4:])


def test_attention_matches_manual_softmax_and_mask():
    torch.manual_seed(0)
    attn = Attention(16, heads=2, dim_head=8)
    x = torch.randn(2, 5, 16)
    bias = torch.randn(1, 2, 5, 5)
    out = attn(x, attention_mask=bias)
    q = attn.to_q(x).view(2, 5, 2, 8).transpose(1, 2)
    k = attn.to_k(x).view(2, 5, 2, 8).transpose(1, 2)
    v = attn.to_v(x).view(2, 5, 2, 8).transpose(1, 2)
    w = torch.softmax(q @ k.transpose(-1, -2) / 8**0.5 + bias, dim=-1)
    ref = attn.to_out[0]((w @ v).transpose(1, 2).reshape(2, 5, 16))
    assert torch.allclose(out, ref, atol=1e-5)


def test_feedforward_names_and_block_identity_at_zero_modulation():
    ff = FeedForward(8, 32, "swiglu")
    names = {n for n, _ in ff.named_parameters()}
    assert {"net.0.proj.weight", "net.2.weight"} <= names
    block = DiTBlock(16, 2, 8, cross_attention_dim=12)
    torch.nn.init.zeros_(block.adaln_modulation.weight)
    torch.nn.init.zeros_(block.adaln_modulation.bias)
    torch.nn.init.zeros_(block.attn2.to_out[0].weight)
    torch.nn.init.zeros_(block.attn2.to_out[0].bias)
    x = torch.randn(2, 4, 16)
    out = block(x, torch.randn(2, 16), None, torch.randn(2, 3, 12))
    assert torch.equal(out, x)  # zero gates: the block starts as the identity (adaLN-Zero)
