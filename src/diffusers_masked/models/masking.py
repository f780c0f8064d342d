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


def check_mask_ratio(mask_ratio: float, owner: Optional[str] = None, training_hint: Optional[str] = None) -> None:
    """Raise a ValueError unless ``0 <= mask_ratio < 1``.

    ``owner`` (e.g. the model's class name) and ``training_hint`` (its usual training ratio, e.g. "0.5") make the
    message name the model at hand instead of listing every scheme's ratio."""
    if isinstance(mask_ratio, bool) or not isinstance(mask_ratio, (int, float)) or not 0.0 <= float(mask_ratio) < 1.0:
        prefix = f"{owner}: " if owner else ""
        hint = training_hint or "the training ratio of the scheme (MaskDiT 0.5, MDTv2 0.3-0.5, DeferredMaskDiT 0.75)"
        raise ValueError(
            f"{prefix}mask_ratio must be a number in [0, 1) (the share of tokens removed), got {mask_ratio!r}. "
            f"Use 0.0 for inference and {hint} for training."
        )


#: Value checks of a given ``ids_keep`` (ids in range, no id twice in a row) read results back to the host, a device
#: sync on GPU. ``"auto"``: run them except inside `torch.compile` and in CUDA forwards with autograd on (training
#: steps, whose ids come from `random_ids_keep` and are valid by construction); ``"always"``: also in those CUDA
#: training steps (a debug setting: one sync per forward); ``"never"``: shape checks only. Compiled graphs never run
#: them (a host read would break the graph). Set it with `set_ids_keep_value_checks`.
_IDS_KEEP_VALUE_CHECKS = "auto"
_VALUE_CHECK_MODES = ("auto", "always", "never")


def set_ids_keep_value_checks(mode: str) -> None:
    """Choose when `check_ids_keep` checks the ids' values: ``"auto"`` (default), ``"always"`` or ``"never"``."""
    global _IDS_KEEP_VALUE_CHECKS
    if mode not in _VALUE_CHECK_MODES:
        raise ValueError(f"ids_keep value-check mode must be one of {_VALUE_CHECK_MODES}, got {mode!r}.")
    _IDS_KEEP_VALUE_CHECKS = mode


def in_device_training_step(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` takes part in a training step on an accelerator: it is not on the CPU and autograd is on.

    The models skip their checks that read values back to the host there by default (`check_ids_keep`'s value checks,
    the class-id range check), since each would be a device sync in every training step. The one place that decides
    it, so a CPU test can run the steps as a GPU would (tests/training/test_step_host_syncs.py)."""
    return tensor.device.type != "cpu" and torch.is_grad_enabled()


def _run_value_checks(ids_keep: torch.Tensor, check_values: Optional[bool]) -> bool:
    if torch.compiler.is_compiling():
        return False
    if check_values is not None:
        return check_values
    if _IDS_KEEP_VALUE_CHECKS != "auto":
        return _IDS_KEEP_VALUE_CHECKS == "always"
    return not in_device_training_step(ids_keep)


def check_ids_keep(
    ids_keep: torch.Tensor,
    batch_size: int,
    num_tokens: int,
    owner: str = "ids_keep",
    check_values: Optional[bool] = None,
) -> torch.Tensor:
    """Validate kept token ids (B, K) for a batch of ``batch_size`` samples of ``num_tokens`` tokens each.

    Type, shape, batch size and ``1 <= K <= num_tokens`` are always checked (free: no device work). The values (each
    id in ``[0, num_tokens)``, no id twice in a sample, which would compute a token twice while the mask says
    another was kept) are checked as `set_ids_keep_value_checks` says; ``check_values`` overrides that per call.

    Returns:
        ``ids_keep`` as int64 (the dtype `torch.gather` needs).
    """
    if not isinstance(ids_keep, torch.Tensor):
        raise ValueError(f"{owner}: ids_keep must be an integer tensor of shape (batch, kept_tokens), got "
                         f"{type(ids_keep).__name__}.")
    if ids_keep.is_floating_point() or ids_keep.is_complex() or ids_keep.dtype == torch.bool:
        raise ValueError(f"{owner}: ids_keep must hold integer token ids, got dtype {ids_keep.dtype}.")
    shape = tuple(ids_keep.shape)
    if ids_keep.dim() != 2 or shape[0] != batch_size:
        raise ValueError(
            f"{owner}: ids_keep must have shape (batch={batch_size}, kept_tokens), one row of ids per sample, got "
            f"{shape}. Draw one row per sample (e.g. masking.random_ids_keep({batch_size}, {num_tokens}, ratio)); "
            "a row is not broadcast to the other samples."
        )
    if not 1 <= shape[1] <= num_tokens:
        raise ValueError(
            f"{owner}: ids_keep must keep between 1 and {num_tokens} tokens per sample, got {shape[1]}. "
            "To mask nothing, pass ids_keep=None and mask_ratio=0."
        )
    ids_keep = ids_keep.long()
    if _run_value_checks(ids_keep, check_values):
        in_range = (ids_keep >= 0) & (ids_keep < num_tokens)
        # Out-of-range ids are clamped for the count so that one host read answers both questions.
        counts = torch.zeros(batch_size, num_tokens, dtype=torch.int32, device=ids_keep.device)
        counts.scatter_add_(1, ids_keep.clamp(0, num_tokens - 1), torch.ones_like(ids_keep, dtype=torch.int32))
        all_in_range, max_count = torch.stack([in_range.all().int(), counts.max()]).tolist()
        if not all_in_range:
            lo, hi = int(ids_keep.min()), int(ids_keep.max())
            raise ValueError(f"{owner}: ids_keep holds ids in [{lo}, {hi}]; token ids must be in [0, {num_tokens}).")
        if max_count > 1:
            rows = (counts > 1).any(dim=1).nonzero().flatten().tolist()
            raise ValueError(
                f"{owner}: ids_keep repeats a token id within a sample (samples {rows[:10]}); each row must hold "
                f"distinct ids, e.g. the first K of a per-sample permutation (masking.random_ids_keep)."
            )
    return ids_keep


def check_token_mask(token_mask: TokenMask, batch_size: int, num_tokens: int, owner: str = "token_mask") -> TokenMask:
    """Validate a given `TokenMask` (from `random_token_mask` or `token_mask_from_ids_keep`): its ``ids_keep`` as
    `check_ids_keep` says, and the shapes of ``ids_restore`` (B, N) and ``mask`` (B, N). Returns it with int64 ids."""
    ids_keep = check_ids_keep(token_mask.ids_keep, batch_size, num_tokens, owner=owner)
    for name in ("ids_restore", "mask"):
        value = getattr(token_mask, name)
        if not isinstance(value, torch.Tensor) or tuple(value.shape) != (batch_size, num_tokens):
            shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise ValueError(
                f"{owner}: TokenMask.{name} must have shape (batch={batch_size}, tokens={num_tokens}), got {shape}; "
                "build the mask with masking.random_token_mask or masking.token_mask_from_ids_keep."
            )
    return TokenMask(ids_keep=ids_keep, ids_restore=token_mask.ids_restore.long(), mask=token_mask.mask.bool())


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


# ----------------------------------------------------------------------------------------------------------------
# Token routing (TREAD, Krause et al. 2025): the fourth reduced-token scheme
# ----------------------------------------------------------------------------------------------------------------
# Masking removes tokens for good (MaskDiT, MDTv2, DeferredMaskDiT: a decoder or the loss deals with the gap);
# routing lets a random share of the tokens pass a contiguous span of blocks untouched and puts them back, in
# their places, where the span ends. The kept ids are drawn exactly like a mask (`random_ids_keep` with the route
# ratio as the mask ratio), so shapes stay static; entering is a gather and leaving an out-of-place scatter.

#: The paper's placement (TREAD, "route placement"): start at block 2 and end 4 blocks before the last one
#: ("i = 2, j = B - 4" for every DiT size, e.g. blocks 2..8 of DiT-B/2's 12 and 2..24 of DiT-XL/2's 28), with half
#: of the tokens routed. ``route_end`` is the last block the routed tokens skip (inclusive, as the official code).
DEFAULT_ROUTE_RATIO = 0.5
DEFAULT_ROUTE_START = 2
DEFAULT_ROUTE_END_FROM_LAST = 4


def check_route_ratio(route_ratio: float, owner: Optional[str] = None) -> None:
    """Raise a ValueError unless ``0 <= route_ratio < 1`` (the share of tokens that skip the route's span)."""
    if (isinstance(route_ratio, bool) or not isinstance(route_ratio, (int, float)) or route_ratio != route_ratio
            or not 0.0 <= float(route_ratio) < 1.0):
        prefix = f"{owner}: " if owner else ""
        raise ValueError(
            f"{prefix}route_ratio must be a number in [0, 1) (the share of tokens that skip the routed blocks), got "
            f"{route_ratio!r}. Use 0.0 for inference (every token through every block) and "
            f"{DEFAULT_ROUTE_RATIO} (the TREAD paper's) for training."
        )


def default_route_span(num_blocks: int) -> tuple:
    """The paper's span for a stack of ``num_blocks`` blocks, ``(2, num_blocks - 4)``, shrunk to fit small stacks
    (at least one block, start <= end)."""
    start = min(DEFAULT_ROUTE_START, num_blocks - 1)
    end = max(start, num_blocks - DEFAULT_ROUTE_END_FROM_LAST)
    return start, end


def resolve_route_span(
    num_blocks: int, route_start: Optional[int], route_end: Optional[int], owner: str = "routing",
    blocks_name: str = "blocks",
) -> tuple:
    """``(start, end)`` block indices (inclusive) of a route over a stack of ``num_blocks`` blocks.

    `None` takes the paper's value (`default_route_span`); a negative index counts from the end, as Python's
    (``route_end=-4`` is the fourth block from the last). Raises a ValueError naming the fix when the span lies
    outside the stack or is empty."""
    default_start, default_end = default_route_span(num_blocks)
    span = []
    for name, value, default in (("route_start", route_start, default_start), ("route_end", route_end, default_end)):
        if value is None:
            span.append(default)
            continue
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{owner}: {name} must be an integer block index or None, got {value!r}.")
        index = value + num_blocks if value < 0 else value
        if not 0 <= index < num_blocks:
            raise ValueError(
                f"{owner}: {name}={value} is outside the {num_blocks} {blocks_name} (indices 0..{num_blocks - 1}, or "
                f"-{num_blocks}..-1 from the end). Use e.g. route_start={default_start}, route_end={default_end} (the "
                "TREAD paper's placement), or None for it."
            )
        span.append(index)
    start, end = span
    if start > end:
        raise ValueError(
            f"{owner}: the route span is empty (route_start={start} > route_end={end}); route_end is the last "
            f"block the routed tokens skip, inclusive, so it must be >= route_start. Use e.g. route_start={default_start},"
            f" route_end={default_end}."
        )
    return start, end


def random_route_ids(
    batch_size: int,
    num_tokens: int,
    route_ratio: float,
    device: torch.device | str | None = None,
    generator: Optional[torch.Generator] = None,
) -> Optional[torch.Tensor]:
    """Ids (B, K) of the tokens that go *through* a route's span (the others skip it); `None` for ratio 0.

    The same draw as `random_ids_keep` with ``mask_ratio=route_ratio``; K = ``num_kept_tokens(N, route_ratio)``."""
    check_route_ratio(route_ratio)
    if route_ratio == 0:
        return None
    return random_ids_keep(batch_size, num_tokens, route_ratio, device=device, generator=generator)


def resolve_route_ids(
    route_ids: Optional[torch.Tensor],
    route_ratio: float,
    batch_size: int,
    num_tokens: int,
    owner: str,
    device: torch.device | str | None = None,
    generator: Optional[torch.Generator] = None,
) -> Optional[torch.Tensor]:
    """The route ids a forward uses: the given ids (checked against ``num_tokens``), else a fresh draw for
    ``route_ratio > 0`` (with ``generator``), else `None` (no routing).

    What is asked for is done in training and eval mode alike: routing is a training device (TREAD), but the model
    does not second-guess an explicit request (e.g. a validation loss of the routed objective). Inference passes
    neither, so every token goes through every block."""
    if route_ids is not None:
        return check_ids_keep(route_ids, batch_size, num_tokens, owner=f"{owner} route_ids")
    if route_ratio > 0:
        return random_route_ids(batch_size, num_tokens, route_ratio, device=device, generator=generator)
    return None


def route_enter(x: torch.Tensor, route_ids: torch.Tensor) -> torch.Tensor:
    """Start of a route: the tokens ``route_ids`` (B, K) of ``x`` (B, N, D) continue into the span."""
    return gather_tokens(x, route_ids)


def route_exit(x_at_start: torch.Tensor, x_span: torch.Tensor, route_ids: torch.Tensor) -> torch.Tensor:
    """End of a route: the span's output ``x_span`` (B, K, D) goes back to positions ``route_ids``; every other
    token is taken, unchanged, from ``x_at_start`` (B, N, D), the sequence as it entered the span."""
    return scatter_tokens(x_at_start, x_span, route_ids)


def run_routed_blocks(
    x: torch.Tensor,
    num_blocks: int,
    run_block,
    route_ids: Optional[torch.Tensor] = None,
    route_span: Optional[tuple] = None,
) -> torch.Tensor:
    """Run ``run_block(index, x) -> x`` over ``num_blocks`` blocks with one route.

    With ``route_ids`` (B, K) and ``route_span = (start, end)``, blocks ``start..end`` (inclusive) see only the
    tokens ``route_ids``; the other tokens skip them and rejoin, bit-identical, after block ``end``. Without
    ``route_ids`` every token goes through every block (inference, ``route_ratio=0``). Any stack of blocks that maps
    (B, n, D) to (B, n, D) for any n can be routed this way."""
    if route_ids is None:
        for i in range(num_blocks):
            x = run_block(i, x)
        return x
    start, end = route_span
    x_at_start = x
    for i in range(num_blocks):
        if i == start:
            x_at_start = x
            x = route_enter(x, route_ids)
        x = run_block(i, x)
        if i == end:
            x = route_exit(x_at_start, x, route_ids)
    return x
