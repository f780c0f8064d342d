"""The official MaskDiT and MDTv2 training steps, for ``train_throughput.py --models official_maskdit official_mdt``.

Development only: never imported by the package or the tests. The official code is not part of this repository;
extract it into the git-ignored ``third_party/`` folder (commits as in ``tests/fixtures/*/README.md``)::

    G=<git dir of Anima-Lab/MaskDiT>; C=73cfb96ca9c6d1d78ab567ffeea099f96692a6e4
    for f in models/maskdit.py utils.py train_utils/loss.py train_utils/helper.py; do
        mkdir -p third_party/maskdit/$(dirname $f); git --git-dir=$G show $C:$f > third_party/maskdit/$f; done
    G=<git dir of sail-sg/MDT>; C=7d26c2162c462bd0b90f97f3a1c36cdaaac616ec
    for f in __init__.py models.py gaussian_diffusion.py respace.py diffusion_utils.py; do
        git --git-dir=$G show $C:masked_diffusion/$f > third_party/mdt/masked_diffusion/$f; done
    pip install --no-deps --target /tmp/timm_pkg timm      # or TIMM_TARGET=<folder holding timm/>

Both run their own training step as their training scripts build it, in the harness' bf16 autocast with fused
AdamW:

- ``official_maskdit``: ``EDMPrecond`` around ``DiT-{size}/2`` with the 8 x 512 decoder and ``mae_loss_coef=0.1``,
  loss = the official ``EDMLoss(net, images, one_hot_labels, mask_ratio=0.5, mae_loss_coef=0.1).mean()``.
- ``official_mdt``: ``MDTv2_{size}_2(mask_ratio=0.30, decode_layer=4, learn_sigma=True)`` and the official
  ``create_diffusion("")`` (linear 1000 steps, learned range, MSE + VB with its Min-SNR weight); the step sums the
  means of ``training_losses`` without and with ``enable_mask=True`` and back-propagates once, as ``train_util.py``.
  Its masked branch draws r ~ U[0.30, 0.50) per call, so its token count changes every step: eager only.

timm's package imports torchvision, which the layers used here never touch; where torchvision is missing it is
stubbed out (``scripts/fixtures/_official_env.py``). That stub breaks diffusers' lazy imports, so the harness runs
these models in an invocation of their own.
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import Callable, Tuple

import torch

OFFICIAL_MODELS = ("official_maskdit", "official_mdt")
OFFICIAL_LABELS = {"official_maskdit": "official MaskDiT @0.5", "official_mdt": "official MDTv2 (full+masked)"}
HERE = os.path.dirname(os.path.abspath(__file__))


def _setup(name: str) -> None:
    fixtures = os.path.join(HERE, "..", "scripts", "fixtures")
    if fixtures not in sys.path:
        sys.path.insert(0, fixtures)
    import _official_env as env

    env.enable_timm()
    env.add_third_party("maskdit" if name == "official_maskdit" else "mdt")


def available(name: str) -> Tuple[bool, str]:
    """Whether the official files and timm are in place; the note says what is missing."""
    try:
        _setup(name)
        if name == "official_maskdit":
            importlib.import_module("models.maskdit")
            importlib.import_module("train_utils.loss")
        else:
            importlib.import_module("masked_diffusion.models")
        return True, ""
    except (Exception, SystemExit) as err:
        return False, f"{type(err).__name__}: {err}"


class _DDPLike(torch.nn.Module):
    """The official EDM loss reads ``net.module.model`` (it is handed the DDP wrapper); this wrapper gives it that
    attribute without any communication."""

    def __init__(self, module: torch.nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)


def build(name: str, size: str, sample_size: int = 32) -> torch.nn.Module:
    """The official model ``name`` at ``size`` (XL, L, B, S) for ``sample_size``-square 4-channel latents."""
    _setup(name)
    if name == "official_maskdit":
        official = importlib.import_module("models.maskdit")
        precond = official.EDMPrecond(img_resolution=sample_size, img_channels=4, num_classes=1000, model_type=f"DiT-{size}/2",
                                      use_decoder=True, mae_loss_coef=0.1, pad_cls_token=False)
        return _DDPLike(precond)
    official = importlib.import_module("masked_diffusion.models")
    return getattr(official, f"MDTv2_{size}_2")(input_size=sample_size, num_classes=1000, learn_sigma=True, mask_ratio=0.30,
                                                 decode_layer=4)


def loss_fn(name: str) -> Callable[[torch.nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]:
    """``loss_fn(model, x0, labels) -> scalar`` running the official training loss on integer ``labels``."""
    _setup(name)
    if name == "official_maskdit":
        edm_loss = importlib.import_module("train_utils.loss").EDMLoss()

        def maskdit_step(model, x0, labels):
            onehot = torch.nn.functional.one_hot(labels, 1000).to(x0.dtype)  # the official data loader's labels
            return edm_loss(model, x0, onehot, mask_ratio=0.5, mae_loss_coef=0.1).mean()

        return maskdit_step
    diffusion = importlib.import_module("masked_diffusion").create_diffusion(timestep_respacing="")

    def mdt_step(model, x0, labels):
        t = torch.randint(0, diffusion.num_timesteps, (x0.shape[0],), device=x0.device)
        full = diffusion.training_losses(model, x0, t, model_kwargs={"y": labels})["loss"].mean()
        masked = diffusion.training_losses(model, x0, t, model_kwargs={"y": labels, "enable_mask": True})["loss"]
        return full + masked.mean()

    return mdt_step
