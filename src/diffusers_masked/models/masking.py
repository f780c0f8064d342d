"""Random token masking with a static number of kept tokens per sample.

Every sample of a batch keeps exactly ``num_kept_tokens(N, mask_ratio)`` tokens, chosen uniformly at random and
independently per sample (argsort of uniform noise, as MAE / MaskDiT / MDT / MicroDiT). Shapes therefore depend only
on ``(N, mask_ratio)``, never on the random draw, which keeps `torch.compile` graphs static. Selection uses
`torch.gather` with ``ids_keep``; no boolean indexing (that would need a host sync).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass
class TokenMask:
    """Result of `random_token_mask`.

    Attributes:
        ids_keep (`torch.LongTensor` of shape (B, K)): Indices of the kept tokens, in random order.
        ids_restore (`torch.LongTensor` of shape (B, N)): Inverse permutation: ``cat([kept, masked])`` gathered with
            it gives the original token order.
        mask (`torch.BoolTensor` of shape (B, N)): True where a token was masked (removed), in original order.
    """

    ids_keep: torch.Tensor
    ids_restore: torch.Tensor
    mask: torch.Tensor

    @property
    def num_kept(self) -> int:
        return self.ids_keep.shape[1]


def check_mask_ratio(mask_ratio: float) -> None:
    """Raise a ValueError unless ``0 <= mask_ratio < 1``."""
    if not isinstance(mask_ratio, (int, float)) or not 0.0 <= float(mask_ratio) < 1.0:
        raise ValueError(
            f"mask_ratio must be a number in [0, 1) (the share of tokens removed), got {mask_ratio!r}. "
            "Use 0.0 for inference and e.g. 0.5 for MaskDiT training."
        )


def num_kept_tokens(num_tokens: int, mask_ratio: float) -> int:
    """Tokens kept per sample: ``round(num_tokens * (1 - mask_ratio))``, at least 1."""
    check_mask_ratio(mask_ratio)
    return max(1, int(round(num_tokens * (1.0 - float(mask_ratio)))))


def _random_shuffle(
    batch_size: int, num_tokens: int, device: torch.device | str | None, generator: Optional[torch.Generator]
) -> torch.Tensor:
    """Per-sample random permutation of the token ids (B, N); the noise is drawn on the generator's device."""
    noise_device = generator.device if generator is not None else device
    noise = torch.rand(batch_size, num_tokens, generator=generator, device=noise_device)
    return torch.argsort(noise.to(device), dim=1)


def random_ids_keep(
    batch_size: int,
    num_tokens: int,
    mask_ratio: float,
    device: torch.device | str | None = None,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """The kept token ids (B, K) of `random_token_mask` with the same arguments and generator state, without
    building the restore ids and boolean mask (a model given ``ids_keep`` builds those itself)."""
    keep = num_kept_tokens(num_tokens, mask_ratio)
    return _random_shuffle(batch_size, num_tokens, device, generator)[:, :keep]


def random_token_mask(
    batch_size: int,
    num_tokens: int,
    mask_ratio: float,
    device: torch.device | str | None = None,
    generator: Optional[torch.Generator] = None,
) -> TokenMask:
    """Draw an independent random mask per sample that keeps the same number of tokens in every sample.

    Args:
        batch_size (`int`): B.
        num_tokens (`int`): N, tokens per sample.
        mask_ratio (`float`): Share of tokens to remove, in [0, 1).
        device: Device of the returned indices.
        generator (`torch.Generator`, *optional*): Makes the draw reproducible; the noise is drawn on the
            generator's device and moved to ``device``.
    """
    keep = num_kept_tokens(num_tokens, mask_ratio)
    ids_shuffle = _random_shuffle(batch_size, num_tokens, device, generator)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :keep]
    mask = torch.ones(batch_size, num_tokens, dtype=torch.bool, device=device)
    mask[:, :keep] = False
    mask = torch.gather(mask, 1, ids_restore)
    return TokenMask(ids_keep=ids_keep, ids_restore=ids_restore, mask=mask)


def token_mask_from_ids_keep(ids_keep: torch.Tensor, num_tokens: int) -> TokenMask:
    """Build a `TokenMask` from given kept indices (B, K), e.g. to replay a mask from a fixture or another model."""
    b, k = ids_keep.shape
    mask = torch.ones(b, num_tokens, dtype=torch.bool, device=ids_keep.device)
    mask.scatter_(1, ids_keep, False)
    # Kept tokens first (in the given order), then the masked ones in ascending order: a valid shuffle.
    masked_ids = torch.argsort(mask.to(torch.int8), dim=1, stable=True)[:, k:]
    ids_shuffle = torch.cat([ids_keep, masked_ids], dim=1)
    return TokenMask(ids_keep=ids_keep, ids_restore=torch.argsort(ids_shuffle, dim=1), mask=mask)


def gather_tokens(x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Select tokens: ``x`` (B, N, D), ``ids`` (B, K) -> (B, K, D)."""
    return torch.gather(x, 1, ids.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def restore_tokens(x_kept: torch.Tensor, ids_restore: torch.Tensor, fill: torch.Tensor) -> torch.Tensor:
    """Put kept tokens back in place and fill the masked positions.

    Args:
        x_kept (`torch.Tensor` of shape (B, K, D)): Tokens in ``ids_keep`` order.
        ids_restore (`torch.LongTensor` of shape (B, N)): From `TokenMask`.
        fill (`torch.Tensor`): Either one token broadcast to every masked place, shape (1, 1, D) or (D,) (a learned
            mask token), or a full sequence (B, N, D) whose masked positions are used (e.g. un-masked features).
    Returns:
        (B, N, D) tensor in original token order.
    """
    b, k, d = x_kept.shape
    n = ids_restore.shape[1]
    if fill.dim() == 3 and fill.shape[1] == n:
        # Full-sequence fill: kept positions come from x_kept, the rest from `fill`.
        ids_keep = torch.argsort(ids_restore, dim=1)[:, :k]
        return scatter_tokens(fill, x_kept, ids_keep)
    fill_tokens = fill.reshape(1, 1, d).to(x_kept.dtype).expand(b, n - k, d)
    x = torch.cat([x_kept, fill_tokens], dim=1)
    return gather_tokens(x, ids_restore)


def scatter_tokens(full: torch.Tensor, x_kept: torch.Tensor, ids_keep: torch.Tensor) -> torch.Tensor:
    """Out-of-place write of ``x_kept`` (B, K, D) into ``full`` (B, N, D) at positions ``ids_keep`` (B, K)."""
    index = ids_keep.unsqueeze(-1).expand(-1, -1, full.shape[-1])
    return full.scatter(1, index, x_kept.to(full.dtype))
