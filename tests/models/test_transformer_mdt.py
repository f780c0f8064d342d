import pytest
import torch

from diffusers_masked import MDTv2Transformer2DModel
from diffusers_masked.models.masking import random_token_mask
from diffusers_masked.models.transformer_mdt import (
    MDT_SIZE_PRESETS,
    MDTv2Block,
    relative_position_biases,
    relative_position_index,
)


def gather_relative_index(index, ids_keep):
    """Reference: each sample's (K, K) block of the (N, N) relative position index."""
    b, k = ids_keep.shape
    return torch.gather(index[ids_keep], 2, ids_keep.unsqueeze(1).expand(b, k, k))


def tiny(**overrides):
    config = dict(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        hidden_size=32,
        num_layers=4,
        num_decoder_layers=2,
        num_attention_heads=2,
        num_classes=10,
    )
    config.update(overrides)
    return MDTv2Transformer2DModel(**config)


def randomize(model, std=0.05):
    # adaLN-Zero starts every block as the identity and the output at zero; make the network non-trivial.
    torch.manual_seed(123)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(std=std)
    return model


def inputs(model, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    x = torch.randn(batch, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    y = torch.randint(0, cfg.num_classes, (batch,), generator=g)
    return x, t, y


@pytest.mark.parametrize("size", ["S", "B", "L", "XL"])
@pytest.mark.parametrize("patch", [2, 4])
def test_preset_family_shapes(size, patch):
    # Preset structure (decoder depth, encoder halves) with tiny widths so the test stays fast.
    preset = MDTv2Transformer2DModel.preset_config(f"{size}/{patch}", hidden_size=32, num_attention_heads=2, sample_size=8)
    assert preset["num_decoder_layers"] == MDT_SIZE_PRESETS[size]["num_decoder_layers"]
    model = MDTv2Transformer2DModel(**preset)
    half = (preset["num_layers"] - preset["num_decoder_layers"]) // 2
    assert len(model.encoder_in_blocks) == len(model.encoder_out_blocks) == half
    assert len(model.decoder_blocks) == preset["num_decoder_layers"]
    x, t, y = inputs(model)
    out = model(x, t, y)
    assert out.sample.shape == (2, 8, 8, 8)  # learned sigma: 2 * in_channels
    assert out.mask is None
    out = model(x, t, y, mask_ratio=0.4)
    assert out.sample.shape == (2, 8, 8, 8)
    n = (8 // patch) ** 2
    assert out.mask.shape == (2, n)


def test_xl2_preset_config_and_constants():
    cfg = MDTv2Transformer2DModel.preset_config("MDTv2-XL/2")
    assert (cfg["num_layers"], cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_decoder_layers"]) == (28, 1152, 16, 4)
    assert MDTv2Transformer2DModel.default_mask_ratio == 0.3
    assert MDTv2Transformer2DModel.mask_ratio_range == (0.3, 0.5)
    with pytest.raises(ValueError):
        MDTv2Transformer2DModel.preset_config("XXL/2")


@pytest.mark.slow
def test_xl2_parameter_count():
    with torch.device("meta"):
        model = MDTv2Transformer2DModel.from_preset("XL/2")
    n = sum(p.numel() for p in model.parameters())
    # Official MDTv2-XL/2 has 742,263,904 parameters incl. 3 never-used rows per bias table (29 tables x 16 heads).
    assert n + 3 * 16 * 29 == 742_263_904


def test_relative_position_index_formula_and_symmetry():
    g = 4
    idx = relative_position_index(g)
    assert idx.shape == (g * g, g * g)
    for i in range(g * g):
        for j in range(g * g):
            expected = (i // g - j // g + g - 1) * (2 * g - 1) + (i % g - j % g + g - 1)
            assert idx[i, j] == expected
    num_offsets = (2 * g - 1) ** 2
    assert torch.equal(idx + idx.T, torch.full_like(idx, num_offsets - 1))
    assert torch.all(idx.diagonal() == (num_offsets - 1) // 2)
    assert idx.min() == 0 and idx.max() == num_offsets - 1
    # Equal offsets share one entry: (0,0)->(1,1) and (2,2)->(3,3).
    assert idx[0, g + 1] == idx[2 * g + 2, 3 * g + 3]


def test_every_block_has_its_own_bias_table():
    model = tiny()
    blocks = [m for m in model.modules() if isinstance(m, MDTv2Block)]
    # 1 + 1 encoder, 2 decoder, 1 side block
    assert len(blocks) == 5
    tables = [b.rel_pos_bias.relative_position_bias_table for b in blocks]
    assert all(t.shape == ((2 * 4 - 1) ** 2, 2) for t in tables)
    assert len({t.data_ptr() for t in tables}) == len(tables)
    assert model.pos_embed.requires_grad and model.decoder_pos_embed.requires_grad
    assert "relative_position_index" not in model.state_dict()


def test_bias_reaches_attention_and_masked_bias_gather():
    model = randomize(tiny())
    idx = model.relative_position_index
    block = model.encoder_in_blocks[0]
    full = block.rel_pos_bias(idx)
    assert full.shape == (1, 2, 16, 16)
    ids_keep = random_token_mask(3, 16, 0.5, generator=torch.Generator().manual_seed(0)).ids_keep
    kept = block.rel_pos_bias(idx, ids_keep)
    assert kept.shape == (3, 2, 8, 8)
    table = block.rel_pos_bias.relative_position_bias_table
    rel = gather_relative_index(idx, ids_keep)
    for b in range(3):
        ref = full[0][:, ids_keep[b]][:, :, ids_keep[b]]
        torch.testing.assert_close(kept[b], ref)
        torch.testing.assert_close(kept[b], table[rel[b]].permute(2, 0, 1))
    # The bias changes the output: scaling the table must change the block's result.
    x, cond = torch.randn(1, 16, 32), torch.randn(1, 32)
    before = block(x, cond, block.rel_pos_bias(idx))
    with torch.no_grad():
        table.mul_(50)
    assert not torch.allclose(block(x, cond, block.rel_pos_bias(idx)), before)


@pytest.mark.parametrize("masked", [False, True])
def test_joint_bias_lookup_matches_per_block_lookups(masked):
    """One concatenated lookup for many blocks gives each block its own bias and the same gradients."""
    model = randomize(tiny())
    blocks = [m for m in model.modules() if isinstance(m, MDTv2Block)]
    idx = model.relative_position_index
    ids_keep = random_token_mask(3, 16, 0.5, generator=torch.Generator().manual_seed(2)).ids_keep if masked else None
    tables = [b.rel_pos_bias.relative_position_bias_table for b in blocks]
    joint = relative_position_biases(tables, idx, ids_keep)
    weights = [torch.randn_like(j) for j in joint]
    grads = torch.autograd.grad(sum((j * w).sum() for j, w in zip(joint, weights)), tables)
    for blk, bias, w, g in zip(blocks, joint, weights, grads):
        assert bias.is_contiguous()
        rel = idx if ids_keep is None else gather_relative_index(idx, ids_keep)
        ref = blk.rel_pos_bias.relative_position_bias_table[rel]
        ref = ref.permute(2, 0, 1).unsqueeze(0) if ids_keep is None else ref.permute(0, 3, 1, 2)
        torch.testing.assert_close(bias, ref)
        (ref_grad,) = torch.autograd.grad((ref * w).sum(), blk.rel_pos_bias.relative_position_bias_table)
        torch.testing.assert_close(g, ref_grad)
    # Under autocast the biases come out in the compute dtype (no per-block cast later).
    half = relative_position_biases(tables, idx, ids_keep, torch.bfloat16)
    assert all(h.dtype == torch.bfloat16 for h in half)


def test_mask_ratio_zero_never_runs_side_interpolater():
    model = randomize(tiny())
    calls = []
    handle = model.side_interpolater.register_forward_hook(lambda *a: calls.append(1))
    x, t, y = inputs(model)
    model(x, t, y)
    model(x, t, y, mask_ratio=0.0)
    assert calls == []
    model(x, t, y, mask_ratio=0.3)
    assert calls == [1]
    handle.remove()


def test_masked_shortcut_uses_side_output_only_at_masked_positions():
    model = randomize(tiny())
    side = model.side_interpolater
    tm = random_token_mask(2, 16, 0.5, generator=torch.Generator().manual_seed(1))
    x_kept, cond = torch.randn(2, 8, 32), torch.randn(2, 32)
    idx = model.relative_position_index
    from diffusers_masked.models.masking import restore_tokens

    q = restore_tokens(x_kept, tm.ids_restore, side.mask_token) + model.decoder_pos_embed
    bias = side.block.rel_pos_bias(idx)
    k_hat = side.block(q, cond, bias)
    out = side(x_kept, cond, tm, model.decoder_pos_embed, bias)
    m = tm.mask.unsqueeze(-1)
    torch.testing.assert_close(out, torch.where(m, k_hat, q))
    # Visible tokens pass through unchanged (encoder output + position), masked ones are the prediction.
    assert not torch.allclose(k_hat[m.expand_as(k_hat)], q[m.expand_as(q)])


def test_masked_tokens_do_not_influence_encoder_kept_outputs():
    model = randomize(tiny())
    x, t, y = inputs(model)
    tm = random_token_mask(2, 16, 0.5, generator=torch.Generator().manual_seed(2))
    cond = model.embed_condition(t, y, x.dtype)
    enc, _ = model.encode(x, cond, tm)
    # Change the pixels of every masked patch (patch 2x2 on a 4x4 grid).
    x2 = x.clone()
    for b in range(2):
        for tok in torch.nonzero(tm.mask[b]).flatten().tolist():
            r, c = divmod(tok, 4)
            x2[b, :, 2 * r : 2 * r + 2, 2 * c : 2 * c + 2] += 10.0
    enc2, _ = model.encode(x2, cond, tm)
    torch.testing.assert_close(enc, enc2)
    # Without masking they do influence it (the test can fail).
    full, _ = model.encode(x, cond)
    full2, _ = model.encode(x2, cond)
    assert not torch.allclose(full, full2)


def test_ids_keep_matches_generator_mask_and_reproducible():
    model = randomize(tiny())
    x, t, y = inputs(model)
    a = model(x, t, y, mask_ratio=0.4, generator=torch.Generator().manual_seed(5))
    b = model(x, t, y, mask_ratio=0.4, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(a.sample, b.sample)
    assert torch.equal(a.mask, b.mask)
    tm = random_token_mask(2, 16, 0.4, generator=torch.Generator().manual_seed(5))
    c = model(x, t, y, ids_keep=tm.ids_keep)
    torch.testing.assert_close(a.sample, c.sample)
    assert not torch.allclose(a.sample, model(x, t, y).sample)


def test_v1_switches_remove_skips():
    model = tiny(long_skip_connections=False, dense_input_shortcut=False)
    assert all(b.skip_linear is None for b in model.encoder_out_blocks)
    assert all(b.skip_linear is None for b in model.decoder_blocks)
    v2 = tiny()
    assert all(b.skip_linear is not None for b in v2.encoder_out_blocks)
    assert all(b.skip_linear is not None for b in v2.decoder_blocks)
    randomize(model)
    x, t, y = inputs(model)
    assert model(x, t, y, mask_ratio=0.3).sample.shape == (2, 8, 8, 8)


def test_gradients_reach_all_parameters_over_both_branches():
    model = randomize(tiny())
    x, t, y = inputs(model)
    loss = model(x, t, y).sample.square().mean() + model(x, t, y, mask_ratio=0.4).sample.square().mean()
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.any(p.grad != 0)]
    assert missing == []


def test_gradient_checkpointing_same_gradients():
    model = randomize(tiny())
    x, t, y = inputs(model)
    gen = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    model(x, t, y, mask_ratio=0.4, generator=gen()).sample.sum().backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.enable_gradient_checkpointing()
    assert model.gradient_checkpointing
    model(x, t, y, mask_ratio=0.4, generator=gen()).sample.sum().backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref[n], msg=n)


def test_save_load_roundtrip(tmp_path):
    model = randomize(tiny())
    model.save_pretrained(tmp_path)
    loaded = MDTv2Transformer2DModel.from_pretrained(tmp_path)
    x, t, y = inputs(model)
    torch.testing.assert_close(model(x, t, y).sample, loaded(x, t, y).sample)


def test_bf16_forward():
    model = randomize(tiny()).to(torch.bfloat16)
    x, t, y = inputs(model)
    out = model(x.bfloat16(), t, y, mask_ratio=0.3)
    assert out.sample.dtype == torch.bfloat16 and torch.isfinite(out.sample.float()).all()


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(hidden_states=torch.randn(2, 3, 8, 8)),  # wrong channels
        dict(hidden_states=torch.randn(2, 4, 16, 16)),  # wrong size
        dict(hidden_states=torch.randn(4, 8, 8)),  # not 4-D
        dict(class_labels=None),
        dict(class_labels=torch.tensor([0, 11])),  # out of range
        dict(mask_ratio=1.0),
        dict(mask_ratio=-0.1),
        dict(timestep=torch.zeros(3)),
        dict(encoder_hidden_states=torch.randn(2, 4, 8)),
        dict(ids_keep=torch.zeros(2, 17, dtype=torch.long)),
    ],
)
def test_bad_inputs_raise(kwargs):
    model = tiny()
    call = dict(hidden_states=torch.randn(2, 4, 8, 8), timestep=torch.tensor([1, 2]), class_labels=torch.tensor([0, 1]))
    call.update(kwargs)
    with pytest.raises(ValueError):
        model(**call)


@pytest.mark.parametrize(
    "overrides",
    [dict(num_layers=5, num_decoder_layers=2), dict(num_decoder_layers=0), dict(hidden_size=33), dict(sample_size=9)],
)
def test_bad_config_raises(overrides):
    with pytest.raises(ValueError):
        tiny(**overrides)


@pytest.mark.parametrize("mask_ratio", [0.0, 0.5])
def test_compiles_fullgraph_under_autocast(mask_ratio):
    # backend="eager": dynamo's full tracing (fails on any graph break) without inductor codegen.
    model = randomize(tiny())
    x, t, y = inputs(model)
    # Generators are not traceable: the trainer passes the mask as ids_keep (drawn outside) or a ratio.
    kw = {}
    if mask_ratio:
        kw["ids_keep"] = random_token_mask(2, 16, mask_ratio, generator=torch.Generator().manual_seed(0)).ids_keep
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = compiled(x, t, y, **kw).sample
        ref = model(x, t, y, **kw).sample
    torch.testing.assert_close(out, ref)


def test_two_forwards_then_backward_survive_in_place_buffer_broadcast():
    """DDP re-broadcasts buffers in place before each forward; MDTv2 trains two branches before one backward."""
    model = randomize(tiny())
    x, t, y = inputs(model)
    full = model(x, t, y).sample
    model.relative_position_index.add_(0)  # what DDP's broadcast does to the version counter
    masked = model(x, t, y, mask_ratio=0.5).sample
    (full.square().mean() + masked.square().mean()).backward()
    assert model.encoder_in_blocks[0].rel_pos_bias.relative_position_bias_table.grad is not None


def test_bias_lookup_backward_is_bit_reproducible():
    # Large enough (> 32768 looked-up elements) that CPU advanced-indexing backward would add with float atomics
    # across threads; repeated backward passes must give the same table gradients bit for bit.
    threads = torch.get_num_threads()
    torch.set_num_threads(max(2, threads))
    try:
        g = torch.Generator().manual_seed(0)
        grid, blocks, heads = 8, 4, 4
        index = relative_position_index(grid)
        tables = [torch.randn((2 * grid - 1) ** 2, heads, generator=g, requires_grad=True) for _ in range(blocks)]
        ids_keep = torch.argsort(torch.rand(16, grid * grid, generator=g), dim=1)[:, :32]
        grad_out = [torch.randn(16, heads, 32, 32, generator=g) for _ in range(blocks)]
        grads = []
        for _ in range(8):
            torch.autograd.backward(relative_position_biases(tables, index, ids_keep), grad_out)
            grads.append(torch.cat([t.grad for t in tables]))
            for t in tables:
                t.grad = None
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(grads[0], other) for other in grads[1:])
