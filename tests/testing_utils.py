"""Helpers shared by the tests (tests/ is on sys.path through conftest.py)."""

import torch

TINY_MASKDIT = dict(
    sample_size=8,
    patch_size=2,
    in_channels=3,
    hidden_size=32,
    num_layers=2,
    num_attention_heads=4,
    decoder_hidden_size=16,
    num_decoder_layers=1,
    decoder_num_attention_heads=2,
    num_classes=10,
)


def randomize(model: torch.nn.Module, std: float = 0.05, seed: int = 0) -> torch.nn.Module:
    """adaLN-Zero models output zeros at init; give every parameter random values for non-trivial tests."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return model
