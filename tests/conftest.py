import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))

import diffusers_masked  # noqa: E402,F401  (registers the plugin classes with diffusers)

from testing_utils import TINY_MASKDIT, randomize  # noqa: E402


@pytest.fixture
def tiny_maskdit():
    from diffusers_masked import MaskDiTTransformer2DModel

    torch.manual_seed(0)
    return randomize(MaskDiTTransformer2DModel(**TINY_MASKDIT)).eval()
