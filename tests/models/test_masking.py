import pytest
import torch

from diffusers_masked.models.masking import (
    gather_tokens,
    num_kept_tokens,
    random_token_mask,
    restore_tokens,
    scatter_tokens,
    token_mask_from_ids_keep,
)


@pytest.mark.parametrize("n,ratio", [(16, 0.5), (49, 0.5), (256, 0.75), (10, 0.33), (7, 0.0)])
def test_keeps_round_n_times_one_minus_ratio(n, ratio):
    tm = random_token_mask(4, n, ratio, generator=torch.Generator().manual_seed(1))
    k = round(n * (1 - ratio))
    assert num_kept_tokens(n, ratio) == k
    assert tm.ids_keep.shape == (4, k)
    assert (tm.mask.sum(1) == n - k).all()
    # kept ids are unique and exactly the unmasked positions
    for b in range(4):
        kept = set(tm.ids_keep[b].tolist())
        assert len(kept) == k
        assert kept == set(torch.nonzero(~tm.mask[b]).flatten().tolist())


def test_ids_restore_inverts_shuffle_and_masks_differ_per_sample():
    tm = random_token_mask(3, 20, 0.5, generator=torch.Generator().manual_seed(0))
    x = torch.arange(20).float().view(1, 20, 1).expand(3, 20, 1)
    kept = gather_tokens(x, tm.ids_keep)
    restored = restore_tokens(kept, tm.ids_restore, torch.tensor([-1.0]))
    assert torch.equal(restored[..., 0][~tm.mask], x[..., 0][~tm.mask])
    assert (restored[..., 0][tm.mask] == -1).all()
    assert not torch.equal(tm.mask[0], tm.mask[1])


def test_generator_makes_mask_reproducible():
    a = random_token_mask(2, 30, 0.5, generator=torch.Generator().manual_seed(5))
    b = random_token_mask(2, 30, 0.5, generator=torch.Generator().manual_seed(5))
    c = random_token_mask(2, 30, 0.5, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a.ids_keep, b.ids_keep)
    assert not torch.equal(a.ids_keep, c.ids_keep)


def test_restore_with_full_sequence_fill_and_scatter():
    tm = random_token_mask(2, 12, 0.25, generator=torch.Generator().manual_seed(0))
    full = torch.randn(2, 12, 3)
    kept = torch.randn(2, tm.num_kept, 3)
    out = restore_tokens(kept, tm.ids_restore, full)
    assert torch.equal(out[tm.mask], full[tm.mask])
    assert torch.equal(gather_tokens(out, tm.ids_keep), kept)
    assert torch.equal(scatter_tokens(full, kept, tm.ids_keep), out)


def test_mask_from_given_ids_keep():
    ids = torch.tensor([[3, 0, 5], [1, 2, 4]])
    tm = token_mask_from_ids_keep(ids, 6)
    assert tm.mask.tolist() == [[False, True, True, False, True, False], [True, False, False, True, False, True]]
    x = torch.randn(2, 6, 2)
    assert torch.equal(restore_tokens(gather_tokens(x, ids), tm.ids_restore, x), x)


@pytest.mark.parametrize("ratio", [-0.1, 1.0, 1.5, "0.5"])
def test_bad_ratio(ratio):
    with pytest.raises(ValueError, match="mask_ratio"):
        random_token_mask(1, 4, ratio)
