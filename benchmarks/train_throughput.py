#!/usr/bin/env python
"""Training-step throughput of the masked transformers against diffusers' `DiTTransformer2DModel`, on one GPU.

One row = one (model, size, batch size, mode). A step is the whole training step: noising, forward, the model's real
loss, backward, fused AdamW step and ``zero_grad(set_to_none=True)``, under bf16 autocast with fp32 master weights.

- ``dit``: diffusers `DiTTransformer2DModel` built from config (in_channels 4, learned sigma = 8 output channels,
  ``num_embeds_ada_norm`` 1000), DDPM epsilon MSE on the first 4 channels (DiT's main loss; its tiny VLB term is
  left out).
- ``maskdit``: `MaskDiTTransformer2DModel` at mask ratio 0.5 with `maskdit_loss` + `EDMObjective` (DSM on the kept
  tokens + 0.1 x MAE on the masked ones).
- ``mdt``: `MDTv2Transformer2DModel` with `recipe_mdt.mdtv2_loss`: both branches as trained (full + masked at a
  fixed ratio, default 0.4 = the mean of MDTv2's U[0.3, 0.5)), epsilon MSE + learned-variance VLB.
- ``deferred`` / ``deferred_moe``: `DeferredMaskDiTTransformer2DModel` (MicroDiT backbone preset, class-conditional
  with 1000 classes so it is comparable with DiT), mask ratio 0.75, `deferred_maskdit_loss`; dense MLPs
  (``num_experts=0``) or the preset's expert-choice MoE.
- ``ours_dit`` / ``tread_dit``: our `RoutedDiTTransformer2DModel` (DiT paper sizes, learned sigma = 8 output
  channels like the ``dit`` row) with `routed_dit_loss` + `EDMObjective`, without routing (our DiT) and with TREAD
  routing at the paper's defaults (route ratio 0.5 over blocks 2 .. num_layers - 4: 2..24 of XL, 2..8 of B).
- ``official_maskdit`` / ``official_mdt`` (not in the default list): the official implementations' own training
  steps, from files extracted into the git-ignored ``third_party/`` (``benchmarks/official_models.py`` says how).
  They run in an invocation of their own (their timm import path may stub torchvision, which breaks diffusers).

Timing: warm-up steps (compilation included) are excluded; then ``--repeats`` x ``--iters`` steps timed with CUDA
events; the table reports the median step. Peak memory is `torch.cuda.max_memory_allocated` over warm-up and timed
steps (weights, grads, AdamW state and activations). MFU counts FLOPs with `torch.utils.flop_counter.FlopCounterMode`
over one eager training step (forward + backward; matmuls, convolutions and attention, i.e. only the tokens a model
actually computes: masked tokens that skip the encoder cost nothing), scaled linearly in the batch size, divided by
the step time and by ``--peak_tflops`` (H100 SXM dense bf16: 989).

    python benchmarks/train_throughput.py --out results/                   # everything, on a GPU
    python benchmarks/train_throughput.py --quick --out /tmp/q             # CPU smoke test (tiny configs)
    python benchmarks/train_throughput.py --models dit maskdit --sizes XL --batch_sizes 128 --modes compile
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
import traceback
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch._dynamo

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import official_models  # noqa: E402
from official_models import OFFICIAL_LABELS, OFFICIAL_MODELS  # noqa: E402

ALL_MODELS = ("dit", "maskdit", "mdt", "deferred", "deferred_moe", "ours_dit", "tread_dit")
MODEL_LABELS = {
    "dit": "diffusers DiT",
    "maskdit": "MaskDiT @0.5",
    "mdt": "MDTv2 (full+masked)",
    "deferred": "DeferredMaskDiT dense @0.75",
    "deferred_moe": "DeferredMaskDiT MoE @0.75",
    "ours_dit": "DiT (ours)",
    "tread_dit": "TREAD-DiT route 0.5",
    **OFFICIAL_LABELS,
}
# Mask ratio each model trains with (MDTv2: --mdt_mask_ratio).
TRAIN_MASK_RATIO = {"dit": 0.0, "maskdit": 0.5, "deferred": 0.75, "deferred_moe": 0.75, "ours_dit": 0.0,
                    "tread_dit": 0.0}
# Route ratio of the routed DiT rows (TREAD's default).
TRAIN_ROUTE_RATIO = {"ours_dit": 0.0, "tread_dit": 0.5}
# diffusers DiT sizes (DiT paper): layers, heads, head dim.
DIT_SIZES = {"XL": (28, 16, 72), "L": (24, 16, 64), "B": (12, 12, 64), "S": (12, 6, 64)}
# The DeferredMaskDiT presets have no B size; "B" maps to MicroDiT's Tiny backbone (16 x 512) as the small variant.
DEFERRED_PRESET_FOR_SIZE = {"XL": "XL", "B": "TINY", "TINY": "TINY", "DEBUG": "DEBUG"}


# ----------------------------------------------------------------------------------------------------------------
# Models and losses
# ----------------------------------------------------------------------------------------------------------------
def _model_exists(name: str) -> Tuple[bool, str]:
    """Whether the model (and its training loss) can be imported; the note says why not."""
    if name in OFFICIAL_MODELS:
        return official_models.available(name)
    try:
        if name == "dit":
            from diffusers import DiTTransformer2DModel  # noqa: F401
        elif name == "maskdit":
            from diffusers_masked.models.transformer_maskdit import MaskDiTTransformer2DModel  # noqa: F401
            from diffusers_masked.training.recipe_maskdit import maskdit_loss  # noqa: F401
        elif name == "mdt":
            from diffusers_masked.models.transformer_mdt import MDTv2Transformer2DModel  # noqa: F401
        elif name in ("deferred", "deferred_moe"):
            from diffusers_masked.models.transformer_deferred_maskdit import DeferredMaskDiTTransformer2DModel  # noqa: F401
        elif name in TRAIN_ROUTE_RATIO:
            from diffusers_masked.training.recipe_dit import routed_dit_loss  # noqa: F401
        return True, ""
    except Exception as err:  # a model another engineer has not finished yet
        return False, f"{type(err).__name__}: {err}"


def build_model(name: str, size: str, tiny: bool) -> torch.nn.Module:
    """Randomly initialised model ``name`` at ``size`` for 32x32x4 latents (8x8x4 in tiny/quick mode)."""
    sample = 8 if tiny else 32
    if name in OFFICIAL_MODELS:
        return official_models.build(name, "S" if tiny else size, sample)
    if name == "dit":
        from diffusers import DiTTransformer2DModel

        layers, heads, head_dim = (2, 2, 16) if tiny else DIT_SIZES[size]
        return DiTTransformer2DModel(
            num_attention_heads=heads, attention_head_dim=head_dim, in_channels=4, out_channels=8,
            num_layers=layers, sample_size=sample, patch_size=2, num_embeds_ada_norm=1000, norm_type="ada_norm_zero",
        )
    if name == "maskdit":
        from diffusers_masked.models.transformer_maskdit import MaskDiTTransformer2DModel

        if tiny:
            return MaskDiTTransformer2DModel(sample_size=sample, hidden_size=32, num_layers=2, num_attention_heads=2,
                                             decoder_hidden_size=32, num_decoder_layers=1, decoder_num_attention_heads=2)
        return MaskDiTTransformer2DModel.from_preset(f"{size}/2", sample_size=sample, in_channels=4)
    if name == "mdt":
        from diffusers_masked.models.transformer_mdt import MDTv2Transformer2DModel

        if tiny:
            return MDTv2Transformer2DModel(sample_size=sample, hidden_size=32, num_layers=4, num_decoder_layers=2,
                                           num_attention_heads=2)
        return MDTv2Transformer2DModel.from_preset(f"{size}/2", sample_size=sample, in_channels=4)
    if name in ("deferred", "deferred_moe"):
        from diffusers_masked.models.transformer_deferred_maskdit import DeferredMaskDiTTransformer2DModel

        preset = "DEBUG" if tiny else DEFERRED_PRESET_FOR_SIZE[size]
        overrides: Dict[str, Any] = dict(sample_size=sample, in_channels=4, caption_channels=None, num_classes=1000)
        if name == "deferred":
            overrides["num_experts"] = 0
        return DeferredMaskDiTTransformer2DModel.from_preset(f"{preset}/2", **overrides)
    if name in TRAIN_ROUTE_RATIO:
        from diffusers_masked.models.transformer_dit import RoutedDiTTransformer2DModel

        if tiny:
            return RoutedDiTTransformer2DModel(sample_size=sample, hidden_size=32, num_layers=4, num_attention_heads=2,
                                               learn_sigma=True)
        return RoutedDiTTransformer2DModel.from_preset(f"{size}/2", sample_size=sample, in_channels=4, learn_sigma=True)
    raise ValueError(f"Unknown model {name!r}; choose from {ALL_MODELS + OFFICIAL_MODELS}.")


def make_loss_fn(name: str, mdt_mask_ratio: float, split_backward: bool = False) -> Callable[[torch.nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]:
    """``loss_fn(model, x0, labels) -> scalar loss`` of one training step, the loss each model trains with."""
    if name in OFFICIAL_MODELS:
        return official_models.loss_fn(name)
    if name == "dit":
        from diffusers_masked.training.objectives import DDPMObjective

        objective = DDPMObjective(prediction_type="epsilon", learned_variance=True)

        def dit_loss(model, x0, labels):
            noisy = objective.add_noise(x0)
            out = model(noisy.model_input, timestep=noisy.timestep, class_labels=labels).sample
            return ((out[:, : x0.shape[1]].float() - noisy.noise.float()) ** 2).mean()

        return dit_loss
    if name == "maskdit":
        from diffusers_masked.training.objectives import EDMObjective
        from diffusers_masked.training.recipe_maskdit import maskdit_loss

        objective = EDMObjective()
        ratio = TRAIN_MASK_RATIO[name]
        return lambda model, x0, labels: maskdit_loss(model, objective, x0, {"class_labels": labels}, ratio, 0.1)[0]
    if name == "mdt":
        try:
            from diffusers_masked.training.objectives import DDPMObjective
            from diffusers_masked.training.recipe_mdt import LearnedVarianceVLB, mdtv2_loss
        except ImportError:  # no recipe yet: both branches with plain MSE
            def mdt_fallback(model, x0, labels):
                full = model(x0, torch.zeros(x0.shape[0], device=x0.device), class_labels=labels).sample
                masked = model(x0, torch.zeros(x0.shape[0], device=x0.device), class_labels=labels,
                               mask_ratio=mdt_mask_ratio).sample
                return (full.float() ** 2).mean() + (masked.float() ** 2).mean()

            return mdt_fallback
        objective = DDPMObjective(prediction_type="epsilon", learned_variance=True)
        vlb = LearnedVarianceVLB(objective)
        backward_part = None
        if split_backward:
            # What the trainer does with --split_branch_backward: the full branch is back-propagated before the
            # masked branch runs (same gradients, one branch's activations alive at a time).
            def backward_part(compute):
                loss = compute()
                if torch.is_grad_enabled():
                    loss.backward()
                return loss.detach()

        return lambda model, x0, labels: mdtv2_loss(model, objective, x0, {"class_labels": labels}, mdt_mask_ratio,
                                                    backward_part=backward_part, vlb=vlb)[0]
    if name in ("deferred", "deferred_moe"):
        from diffusers_masked.training.objectives import EDMObjective
        from diffusers_masked.training.recipe_deferred_maskdit import deferred_maskdit_loss

        objective = EDMObjective(sigma_data=0.9, p_mean=-0.6, p_std=1.2)
        ratio = TRAIN_MASK_RATIO[name]
        return lambda model, x0, labels: deferred_maskdit_loss(model, objective, x0, {"class_labels": labels}, ratio)[0]
    if name in TRAIN_ROUTE_RATIO:
        from diffusers_masked.training.objectives import EDMObjective
        from diffusers_masked.training.recipe_dit import routed_dit_loss

        objective = EDMObjective()
        ratio = TRAIN_ROUTE_RATIO[name]
        return lambda model, x0, labels: routed_dit_loss(model, objective, x0, {"class_labels": labels}, ratio)[0]
    raise ValueError(f"Unknown model {name!r}.")


def forward_for_explain(name: str) -> Callable:
    """The training forward pass of each model (what `torch.compile` sees), for graph-break checks."""

    def fwd(model, x, t, labels, ids_keep=None):
        if name == "dit":
            return model(x, timestep=t, class_labels=labels).sample
        if name in TRAIN_ROUTE_RATIO:
            return model(x, t, class_labels=labels, route_ids=ids_keep).sample
        return model(x, t, class_labels=labels, ids_keep=ids_keep).sample

    return fwd


def ids_keep_for_explain(name: str, model: torch.nn.Module, batch_size: int, mdt_mask_ratio: float,
                         device: torch.device) -> Optional[torch.Tensor]:
    """The mask as the trainer's losses draw it: outside the compiled forward, from the run's seeded generator."""
    from diffusers_masked.training.recipe import draw_ids_keep

    ratio = mdt_mask_ratio if name == "mdt" else TRAIN_ROUTE_RATIO.get(name) or TRAIN_MASK_RATIO[name]
    return draw_ids_keep(model, batch_size, ratio, device, torch.Generator().manual_seed(0))


# ----------------------------------------------------------------------------------------------------------------
# Measurement helpers
# ----------------------------------------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def time_steps(step: Callable[[], None], iters: int, device: torch.device) -> float:
    """Mean seconds per step over ``iters`` back-to-back steps (CUDA events on a GPU, a synced clock on CPU)."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            step()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1000.0 / iters
    t0 = time.perf_counter()
    for _ in range(iters):
        step()
    return (time.perf_counter() - t0) / iters


def count_step_flops(step: Callable[[], None]) -> int:
    """FLOPs of one training step (forward + backward) as `FlopCounterMode` counts them."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        step()
    return int(counter.get_total_flops())


def explain_graph_breaks(model: torch.nn.Module, fwd: Callable, inputs: Tuple, autocast) -> Dict[str, Any]:
    """Graph and break counts of the compiled training forward (`torch._dynamo.explain`), with the first reasons."""
    torch._dynamo.reset()
    try:
        with autocast():
            info = torch._dynamo.explain(lambda *a: fwd(model, *a))(*inputs)
        reasons = []
        for br in info.break_reasons[:5]:
            where = ""
            if getattr(br, "user_stack", None):
                frame = br.user_stack[-1]
                where = f" ({os.path.basename(frame.filename)}:{frame.lineno})"
            reasons.append(f"{br.reason}{where}")
        return {"graphs": info.graph_count, "graph_breaks": info.graph_break_count, "reasons": reasons}
    except Exception as err:
        return {"graphs": None, "graph_breaks": None, "reasons": [f"explain failed: {type(err).__name__}: {err}"[:300]]}
    finally:
        torch._dynamo.reset()


def mark_batch_dynamic(module: torch.nn.Module, args: Tuple, kwargs: Dict[str, Any]) -> None:
    """Forward pre-hook of a compiled model (runs eagerly, before dynamo): mark dim 0 of every batch-sized tensor
    argument dynamic, so that the first compilation already has a symbolic batch size (the noised inputs are made in
    the loss, outside the compiled module, where nothing else could mark them)."""
    b = args[0].shape[0]
    for value in list(args) + list(kwargs.values()):
        if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == b:
            torch._dynamo.maybe_mark_dynamic(value, 0)


def compile_kwargs(args) -> Dict[str, Any]:
    """``torch.compile`` arguments of every compiled run (static shapes; ``--compile_mode`` may add CUDA graphs)."""
    # --dynamic_batch: one graph per model with a symbolic batch size serves every batch size of the row (one
    # compilation instead of one per batch size); the token count stays static.
    kw: Dict[str, Any] = {"backend": args.compile_backend, "dynamic": None if getattr(args, "dynamic_batch", False) else False}
    if args.compile_mode != "default":
        kw["mode"] = args.compile_mode
    return kw


# ----------------------------------------------------------------------------------------------------------------
# One (model, size, mode): all batch sizes
# ----------------------------------------------------------------------------------------------------------------
def bench_model(name: str, size: str, mode: str, batch_sizes: List[int], args, device: torch.device,
                deadline: float, flops_cache: Dict[Tuple[str, str], Tuple[int, float]]) -> List[Dict[str, Any]]:
    rows: List[Dict[str, Any]] = []
    base = {"model": name, "label": MODEL_LABELS[name], "size": size, "mode": mode}
    torch.manual_seed(0)
    model = build_model(name, size, args.quick).to(device)
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0, fused=device.type == "cuda")
    loss_fn = make_loss_fn(name, args.mdt_mask_ratio, args.mdt_split_backward)
    runner = model
    if mode == "compile":
        torch._dynamo.reset()
        runner = torch.compile(model, **compile_kwargs(args))
        if getattr(args, "dynamic_batch", False):
            runner.register_forward_pre_hook(mark_batch_dynamic, with_kwargs=True)
    use_autocast = device.type == "cuda" or args.quick

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16) if use_autocast else contextlib.nullcontext()

    oom_seen = False
    for b in batch_sizes:
        row = dict(base, batch_size=b, params_m=round(n_params / 1e6, 1))
        if time.time() > deadline:
            rows.append(dict(row, status="skipped (time budget)"))
            continue
        if oom_seen:
            rows.append(dict(row, status="OOM"))  # a smaller batch already did not fit
            continue
        gen = torch.Generator(device=device).manual_seed(b)
        x0 = torch.randn(b, 4, 8 if args.quick else 32, 8 if args.quick else 32, device=device, generator=gen)
        labels = torch.randint(0, 1000, (b,), device=device, generator=gen)

        def step():
            with autocast():
                loss = loss_fn(runner, x0, labels)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        try:
            if device.type == "cuda":
                _free(device)
                torch.cuda.reset_peak_memory_stats(device)
            t0 = time.time()
            step()
            _sync(device)
            first_step_s = time.time() - t0
            for _ in range(args.warmup - 1):
                step()
            _sync(device)
            times = [time_steps(step, args.iters, device) for _ in range(args.repeats)]
            step_s = statistics.median(times)
            peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
            key = (name, size)
            if key not in flops_cache:
                # Counted on the eager module (FlopCounterMode does not see inside compiled kernels).
                def eager_step():
                    with autocast():
                        loss = loss_fn(model, x0, labels)
                    loss.backward()
                    optimizer.zero_grad(set_to_none=True)

                flops_cache[key] = (count_step_flops(eager_step), b)
            flops = flops_cache[key][0] / flops_cache[key][1] * b if key in flops_cache else None
            tflops = flops / step_s / 1e12 if flops else None
            rows.append(dict(
                row, status="ok", img_per_s=b / step_s, step_ms=step_s * 1e3,
                step_ms_spread=(max(times) - min(times)) * 1e3, peak_mem_gib=peak, first_step_s=first_step_s,
                gflop_per_img=flops / b / 1e9 if flops else None, tflops=tflops,
                mfu=tflops / args.peak_tflops if tflops else None,
            ))
        except torch.OutOfMemoryError:
            oom_seen = True
            rows.append(dict(row, status="OOM"))
        except Exception as err:  # report and go on with the next row
            rows.append(dict(row, status=f"error: {type(err).__name__}: {str(err)[:200]}"))
            traceback.print_exc()
        finally:
            optimizer.zero_grad(set_to_none=True)
            del step, x0, labels
            _free(device)
        r = rows[-1]
        print(f"  {name:13s} {size:3s} b{b:<4d} {mode:7s} {r['status']:5s} "
              + (f"{r['img_per_s']:8.1f} img/s {r['peak_mem_gib']:6.1f} GiB first step {r['first_step_s']:.1f}s"
                 if r["status"] == "ok" else ""), flush=True)
    del runner, model, optimizer
    if mode == "compile":
        torch._dynamo.reset()
    _free(device)
    return rows


def measure_train_step(model: torch.nn.Module, loss_fn: Callable, x0: torch.Tensor, labels: torch.Tensor,
                       device: torch.device, compile_kw: Optional[Dict[str, Any]] = None, autocast_bf16: bool = True,
                       warmup: int = 3, iters: int = 5, repeats: int = 3) -> Dict[str, Any]:
    """The harness step of `bench_model` for a model built elsewhere (e.g. from the config a trainer run saved, so
    both time the same architecture): fused AdamW, ``loss_fn(runner, x0, labels)`` under bf16 autocast,
    ``torch.compile(model, **compile_kw)`` when ``compile_kw`` is given. Returns img/s (median of ``repeats`` x
    ``iters`` steps after ``warmup``), the step time and its spread, the first step's seconds (compilation) and the
    peak memory."""
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0, fused=device.type == "cuda")
    runner = torch.compile(model, **compile_kw) if compile_kw is not None else model

    def step():
        ctx = torch.autocast(device.type, dtype=torch.bfloat16) if autocast_bf16 else contextlib.nullcontext()
        with ctx:
            loss = loss_fn(runner, x0, labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    if device.type == "cuda":
        _free(device)
        torch.cuda.reset_peak_memory_stats(device)
    try:
        t0 = time.time()
        step()
        _sync(device)
        first_step_s = time.time() - t0
        for _ in range(warmup - 1):
            step()
        _sync(device)
        times = [time_steps(step, iters, device) for _ in range(repeats)]
        step_s = statistics.median(times)
        peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
        return {"img_per_s": x0.shape[0] / step_s, "step_ms": step_s * 1e3,
                "step_ms_spread": (max(times) - min(times)) * 1e3, "first_step_s": first_step_s,
                "peak_mem_gib": peak, "warmup": warmup, "iters": iters, "repeats": repeats}
    finally:
        optimizer.zero_grad(set_to_none=True)
        del runner, optimizer, step
        _free(device)


def add_ratios(rows: List[Dict[str, Any]]) -> None:
    """img/s ratio to diffusers DiT of the same size, batch size and mode (and to DiT compiled at that batch)."""
    ref = {(r["size"], r["batch_size"], r["mode"]): r.get("img_per_s") for r in rows if r["model"] == "dit"}
    ref_c = {(r["size"], r["batch_size"]): r.get("img_per_s") for r in rows if r["model"] == "dit" and r["mode"] == "compile"}
    for r in rows:
        if r.get("status") != "ok":
            continue
        d = ref.get((r["size"], r["batch_size"], r["mode"]))
        r["ratio_vs_dit"] = r["img_per_s"] / d if d else None
        dc = ref_c.get((r["size"], r["batch_size"]))
        r["ratio_vs_dit_compiled"] = r["img_per_s"] / dc if dc else None


# ----------------------------------------------------------------------------------------------------------------
# Inference timing
# ----------------------------------------------------------------------------------------------------------------
def bench_inference(args, device: torch.device) -> List[Dict[str, Any]]:
    """Wall time of ``--inference_steps`` sampling steps (CFG, batch ``--inference_batch``) per pipeline, bf16
    weights, same random-init SD-VAE decoder for all (decode included)."""
    from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline, EDMEulerScheduler

    rows = []
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    size = "XL"
    if args.quick:
        vae = AutoencoderKL(block_out_channels=(8, 8), layers_per_block=1, norm_num_groups=4, latent_channels=4,
                            down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
    else:
        vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
    vae = vae.to(device, dtype).eval()
    id2label = {i: f"class {i}" for i in range(1000)}
    labels = list(range(args.inference_batch))
    for name in args.models:
        ok, note = _model_exists(name)
        row = {"model": name, "label": MODEL_LABELS[name], "size": size, "batch_size": args.inference_batch,
               "steps": args.inference_steps}
        if not ok:
            rows.append(dict(row, status=f"skipped ({note[:120]})"))
            continue
        try:
            torch.manual_seed(0)
            model = build_model(name, size, args.quick).to(device, dtype).eval()
            if name == "dit":
                pipe = DiTPipeline(transformer=model, vae=vae, scheduler=DDIMScheduler(), id2label=id2label)
                kwargs = dict(output_type="pt")
            elif name == "maskdit":
                from diffusers_masked.pipelines.pipeline_maskdit import MaskDiTPipeline

                pipe = MaskDiTPipeline(transformer=model, scheduler=EDMEulerScheduler(), vae=vae, id2label=id2label)
                kwargs = dict(output_type="pt")
            elif name == "mdt":
                from diffusers_masked.pipelines.pipeline_mdt import MDTv2Pipeline

                sched = DDIMScheduler(timestep_spacing="linspace")
                pipe = MDTv2Pipeline(transformer=model, scheduler=sched, vae=vae, id2label=id2label)
                kwargs = dict(output_type="pt")
            elif name in TRAIN_ROUTE_RATIO:
                from diffusers_masked.pipelines.pipeline_dit import RoutedDiTPipeline

                pipe = RoutedDiTPipeline(transformer=model, scheduler=EDMEulerScheduler(), vae=vae, id2label=id2label)
                kwargs = dict(output_type="pt")
            else:
                from diffusers_masked.pipelines.pipeline_deferred_maskdit import DeferredMaskDiTPipeline

                sched = EDMEulerScheduler(sigma_data=0.9)
                pipe = DeferredMaskDiTPipeline(transformer=model, scheduler=sched, vae=vae, id2label=id2label)
                kwargs = dict(output_type="pt")
            pipe.set_progress_bar_config(disable=True)

            def run(steps):
                g = torch.Generator(device="cpu").manual_seed(0)
                return pipe(class_labels=labels, guidance_scale=4.0, num_inference_steps=steps, generator=g, **kwargs)

            run(2)  # warm-up (handles, kernels)
            _sync(device)
            times = []
            for _ in range(args.inference_repeats):
                t0 = time.perf_counter()
                run(args.inference_steps)
                _sync(device)
                times.append(time.perf_counter() - t0)
            sec = statistics.median(times)
            rows.append(dict(row, status="ok", seconds=sec, img_per_s=args.inference_batch / sec))
        except torch.OutOfMemoryError:
            rows.append(dict(row, status="OOM"))
        except Exception as err:
            traceback.print_exc()
            rows.append(dict(row, status=f"error: {type(err).__name__}: {str(err)[:200]}"))
        finally:
            model = pipe = None
            _free(device)
        r = rows[-1]
        print(f"  inference {name:13s} {r['status']} " + (f"{r['seconds']:.2f}s" if r["status"] == "ok" else ""), flush=True)
    dit_s = next((r["seconds"] for r in rows if r["model"] == "dit" and r.get("status") == "ok"), None)
    for r in rows:
        if r.get("status") == "ok" and dit_s:
            r["speed_vs_dit"] = dit_s / r["seconds"]
    return rows


# ----------------------------------------------------------------------------------------------------------------
# Profile
# ----------------------------------------------------------------------------------------------------------------
def profile_rows(specs: List[str], args, device: torch.device, out_dir: str) -> None:
    """``MODEL:SIZE:BATCH:MODE`` each: a few profiled steps; top ops by device time go to ``profile.txt``."""
    from torch.profiler import ProfilerActivity, profile

    path = os.path.join(out_dir, "profile.txt")
    with open(path, "a") as fh:
        for spec in specs:
            name, size, b, mode = spec.split(":")
            b = int(b)
            torch.manual_seed(0)
            model = build_model(name, size, args.quick).to(device).train()
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
            loss_fn = make_loss_fn(name, args.mdt_mask_ratio, args.mdt_split_backward)
            runner = torch.compile(model, **compile_kwargs(args)) if mode == "compile" else model
            x0 = torch.randn(b, 4, 8 if args.quick else 32, 8 if args.quick else 32, device=device)
            labels = torch.randint(0, 1000, (b,), device=device)

            def step():
                with torch.autocast(device.type, dtype=torch.bfloat16):
                    loss = loss_fn(runner, x0, labels)
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)

            try:
                for _ in range(3):
                    step()
                _sync(device)
                # Unprofiled wall time per step, to set against the kernels' device time in the table's footer
                # (a step much longer than its kernels is launch-bound).
                t0 = time.perf_counter()
                for _ in range(10):
                    step()
                _sync(device)
                wall_ms = (time.perf_counter() - t0) / 10 * 1e3
                acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
                with profile(activities=acts) as prof:
                    for _ in range(3):
                        step()
                    _sync(device)
                sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
                fh.write(f"==== {spec} (3 steps; unprofiled wall {wall_ms:.2f} ms/step) ====\n")
                fh.write(prof.key_averages().table(sort_by=sort, row_limit=30, max_name_column_width=70))
                fh.write("\n\n")
                print(f"  profiled {spec}", flush=True)
            except Exception as err:
                fh.write(f"==== {spec}: {type(err).__name__}: {err}\n")
            finally:
                del model, opt, runner
                if mode == "compile":
                    torch._dynamo.reset()
                _free(device)


# ----------------------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------------------
def _fmt(v, spec: str) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def markdown(rows: List[Dict[str, Any]], breaks: List[Dict[str, Any]], infer: List[Dict[str, Any]],
             env: Dict[str, Any], notes: List[str]) -> str:
    lines = [f"Device: {env['device']}; torch {env['torch']}; diffusers {env['diffusers']}; bf16 autocast; "
             f"latent 32x32x4 (256 tokens); MFU vs {env['peak_tflops']} TFLOP/s.", ""]
    lines += ["| model | size | batch | mode | img/s | x DiT (same mode) | x DiT compiled | peak GiB | MFU | GFLOP/img | "
              "first step s |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.get("status") != "ok":
            lines.append(f"| {r['label']} | {r['size']} | {r['batch_size']} | {r['mode']} | {r['status']} | | | | | | |")
            continue
        lines.append(
            f"| {r['label']} | {r['size']} | {r['batch_size']} | {r['mode']} | {r['img_per_s']:.1f} | "
            f"{_fmt(r.get('ratio_vs_dit'), '.2f')} | {_fmt(r.get('ratio_vs_dit_compiled'), '.2f')} | "
            f"{_fmt(r['peak_mem_gib'], '.1f')} | {_fmt(r.get('mfu'), '.1%')} | {_fmt(r.get('gflop_per_img'), '.3g')} | "
            f"{r['first_step_s']:.1f} |")
    if breaks:
        lines += ["", "Graph breaks of the compiled training forward (`torch._dynamo.explain`):", "",
                  "| model | size | graphs | breaks | first reasons |", "|---|---|---|---|---|"]
        for b in breaks:
            reasons = "; ".join(b["reasons"]).replace("|", "/").replace("\n", " ")[:400]
            lines.append(f"| {MODEL_LABELS[b['model']]} | {b['size']} | {b['graphs']} | {b['graph_breaks']} | {reasons} |")
    if infer:
        lines += ["", "Sampling (CFG 4.0, bf16 weights, random-init SD-VAE decode included):", "",
                  "| pipeline | size | batch | steps | seconds | img/s | x DiTPipeline |", "|---|---|---|---|---|---|---|"]
        for r in infer:
            if r.get("status") != "ok":
                lines.append(f"| {r['label']} | {r['size']} | {r['batch_size']} | {r['steps']} | {r['status']} | | |")
            else:
                lines.append(f"| {r['label']} | {r['size']} | {r['batch_size']} | {r['steps']} | {r['seconds']:.2f} | "
                             f"{r['img_per_s']:.1f} | {_fmt(r.get('speed_vs_dit'), '.2f')} |")
    if notes:
        lines += ["", "Notes:", ""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def environment(device: torch.device, peak_tflops: float) -> Dict[str, Any]:
    import diffusers

    dev = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.processor() or 'cpu'})"
    return {"device": dev, "torch": torch.__version__, "diffusers": diffusers.__version__,
            "cuda": torch.version.cuda, "python": platform.python_version(), "peak_tflops": peak_tflops}


# ----------------------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=str, default="benchmark_results",
                   help="Folder for results.md / results.json (and profile.txt with --profile).")
    p.add_argument("--models", nargs="+", default=list(ALL_MODELS), choices=ALL_MODELS + OFFICIAL_MODELS,
                   help="Models to time; those not importable yet are skipped with a note.")
    p.add_argument("--sizes", nargs="+", default=["XL", "B"],
                   help="Model sizes (patch 2). DeferredMaskDiT has XL and TINY presets; its 'B' row uses TINY.")
    p.add_argument("--batch_sizes", nargs="+", type=int, default=[32, 128, 256], help="Per-GPU batch sizes.")
    p.add_argument("--modes", nargs="+", default=["eager", "compile"], choices=["eager", "compile"],
                   help="eager and/or torch.compile of the whole transformer (dynamic=False).")
    p.add_argument("--compile_batch_sizes", nargs="+", type=int, default=None,
                   help="Batch sizes for compile rows (default: --batch_sizes); each one is a fresh compilation.")
    p.add_argument("--compile_backend", type=str, default="inductor", help="torch.compile backend.")
    p.add_argument("--dynamic_batch", action="store_true",
                   help="Compile each model once with a dynamic batch dimension (all its batch sizes share the graph) "
                        "instead of once per batch size: about half the compile time for two batch sizes.")
    p.add_argument("--compile_mode", type=str, default="default",
                   choices=["default", "reduce-overhead", "max-autotune-no-cudagraphs"],
                   help="torch.compile mode of the compiled runs; reduce-overhead replays the step's kernels as CUDA "
                        "graphs, which removes launch overhead where small batches leave the GPU waiting on the host.")
    p.add_argument("--warmup", type=int, default=3, help="Untimed steps before timing (the first compiles).")
    p.add_argument("--iters", type=int, default=5, help="Steps per timed repeat.")
    p.add_argument("--repeats", type=int, default=3, help="Timed repeats; the table reports the median.")
    p.add_argument("--mdt_mask_ratio", type=float, default=0.4,
                   help="Fixed mask ratio of MDTv2's masked branch (training draws U[0.3, 0.5) per batch).")
    p.add_argument("--mdt_split_backward", action="store_true",
                   help="MDTv2: back-propagate the full branch before running the masked one (same gradients, "
                   "about half the activation memory), as the recipe's --split_branch_backward; default: one "
                   "backward of the summed loss.")
    p.add_argument("--peak_tflops", type=float, default=989.0, help="Dense bf16 peak for MFU (H100 SXM: 989).")
    p.add_argument("--explain", action=argparse.BooleanOptionalAction, default=True,
                   help="Count graph breaks of each model's compiled training forward with torch._dynamo.explain.")
    p.add_argument("--skip_training", action="store_true", help="Only --explain / --inference / --profile.")
    p.add_argument("--inference", action="store_true",
                   help="Also time sampling: each pipeline vs diffusers DiTPipeline at XL/2.")
    p.add_argument("--inference_steps", type=int, default=50, help="num_inference_steps of the sampling timing.")
    p.add_argument("--inference_batch", type=int, default=16, help="Class labels per sampling call (CFG doubles it).")
    p.add_argument("--inference_repeats", type=int, default=3, help="Timed sampling calls; median reported.")
    p.add_argument("--profile", nargs="*", default=[], metavar="MODEL:SIZE:BATCH:MODE",
                   help="Profile these rows (torch.profiler, 3 steps) into OUT/profile.txt, e.g. maskdit:XL:128:compile.")
    p.add_argument("--time_budget_s", type=float, default=None,
                   help="Stop starting new rows after this many seconds (results so far are still written).")
    p.add_argument("--quick", action="store_true",
                   help="CPU smoke test: tiny configs, 8x8 latents, batch 2, backend 'eager' for compile rows, "
                   "2-step sampling. Not a timing.")
    p.add_argument("--device", type=str, default=None, help="Default: cuda if available, else cpu.")
    return p


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    args = build_parser().parse_args(argv)
    if args.quick:
        args.device = args.device or "cpu"
        args.batch_sizes = [2]
        args.compile_batch_sizes = [2]
        args.compile_backend = "eager"
        args.warmup, args.iters, args.repeats = 1, 1, 1
        args.inference_steps, args.inference_batch, args.inference_repeats = 2, 2, 1
        args.sizes = ["XL"]  # tiny configs regardless of size
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    os.makedirs(args.out, exist_ok=True)
    start = time.time()
    deadline = start + args.time_budget_s if args.time_budget_s else float("inf")
    env = environment(device, args.peak_tflops)
    print(f"device {env['device']}, torch {env['torch']}, diffusers {env['diffusers']}", flush=True)

    official = [m for m in args.models if m in OFFICIAL_MODELS]
    if official and len(official) != len(args.models):
        raise SystemExit(f"Run {official} in an invocation of their own (their timm import path may stub torchvision, "
                         "which breaks diffusers' imports of the other models).")
    if official and (args.inference or args.profile):
        raise SystemExit("--inference / --profile cover our pipelines and models only; drop them for official_*.")
    notes, available = [], []
    for name in args.models:
        ok, note = _model_exists(name)
        if ok:
            available.append(name)
        else:
            notes.append(f"{MODEL_LABELS[name]} skipped: not importable yet ({note[:160]}).")
    if "mdt" in available:
        try:
            import diffusers_masked.training.recipe_mdt  # noqa: F401
            how = ("each branch back-propagated separately (--mdt_split_backward)" if args.mdt_split_backward
                   else "one backward of the summed loss, as recipe_mdt.mdtv2_loss")
            notes.append(f"MDTv2 step = full branch + masked branch at fixed ratio {args.mdt_mask_ratio} "
                         f"(MDTv2Recipe branch losses), two forward/backward passes per step; {how}.")
        except ImportError:
            notes.append("MDTv2 recipe not importable: MDTv2 step = full + masked forward with plain MSE.")

    if args.dynamic_batch and "compile" in args.modes:
        notes.append("Compiled rows use one graph per model with a dynamic batch dimension (--dynamic_batch).")
    if args.compile_mode != "default" and "compile" in args.modes:
        notes.append(f"Compiled rows use torch.compile(mode={args.compile_mode!r}).")

    rows: List[Dict[str, Any]] = []
    breaks: List[Dict[str, Any]] = []
    infer: List[Dict[str, Any]] = []
    flops_cache: Dict[Tuple[str, str], Tuple[int, float]] = {}

    def write() -> None:
        add_ratios(rows)
        data = {"env": env, "args": vars(args), "rows": rows, "graph_breaks": breaks, "inference": infer,
                "notes": notes, "elapsed_s": time.time() - start}
        with open(os.path.join(args.out, "results.json"), "w") as fh:
            json.dump(data, fh, indent=2, default=str)
        with open(os.path.join(args.out, "results.md"), "w") as fh:
            fh.write(markdown(rows, breaks, infer, env, notes))

    if args.explain:
        for name in [m for m in available if m not in OFFICIAL_MODELS]:
            for size in args.sizes[:1]:
                if time.time() > deadline:
                    break
                torch.manual_seed(0)
                model = build_model(name, size, args.quick).to(device).train()
                s = 8 if args.quick else 32
                inputs = (torch.randn(2, 4, s, s, device=device), torch.rand(2, device=device),
                          torch.randint(0, 1000, (2,), device=device))
                if name in ("dit", "mdt"):
                    inputs = (inputs[0], torch.randint(0, 1000, (2,), device=device), inputs[2])
                inputs = inputs + (ids_keep_for_explain(name, model, 2, args.mdt_mask_ratio, device),)
                res = explain_graph_breaks(
                    model, forward_for_explain(name), inputs,
                    lambda: torch.autocast(device.type, dtype=torch.bfloat16))
                breaks.append(dict(model=name, size=size, **res))
                print(f"  explain {name} {size}: {res['graphs']} graphs, {res['graph_breaks']} breaks "
                      f"{res['reasons'][:2]}", flush=True)
                del model
                _free(device)
        write()

    if not args.skip_training:
        for mode in args.modes:
            for size in args.sizes:
                for name in available:
                    bss = args.batch_sizes
                    if mode == "compile" and args.compile_batch_sizes:
                        bss = args.compile_batch_sizes
                    if mode == "compile" and name == "official_mdt":
                        rows += [dict(model=name, label=MODEL_LABELS[name], size=size, mode=mode, batch_size=b,
                                      status="skipped (eager only: its mask ratio changes the shapes every step)")
                                 for b in bss]
                        continue
                    try:
                        rows += bench_model(name, size, mode, bss, args, device, deadline, flops_cache)
                    except torch.OutOfMemoryError:
                        rows += [dict(model=name, label=MODEL_LABELS[name], size=size, mode=mode, batch_size=b,
                                      status="OOM") for b in bss]
                        _free(device)
                    except Exception as err:
                        traceback.print_exc()
                        rows += [dict(model=name, label=MODEL_LABELS[name], size=size, mode=mode, batch_size=b,
                                      status=f"error: {type(err).__name__}: {str(err)[:200]}") for b in bss]
                        _free(device)
                    write()
        # FLOPs are counted in eager rows; give compile rows of the same config the same count.
        for r in rows:
            key = (r["model"], r["size"])
            if r.get("status") == "ok" and r.get("tflops") is None and key in flops_cache:
                flops = flops_cache[key][0] / flops_cache[key][1] * r["batch_size"]
                r["gflop_per_img"] = flops / r["batch_size"] / 1e9
                r["tflops"] = flops / (r["step_ms"] / 1e3) / 1e12
                r["mfu"] = r["tflops"] / args.peak_tflops
        write()

    if args.inference:
        infer = bench_inference(args, device)
        write()
    if args.profile:
        profile_rows(args.profile, args, device, args.out)
    write()

    md = markdown(rows, breaks, infer, env, notes)
    print("\n" + md, flush=True)
    print(f"total {time.time() - start:.0f}s; wrote {args.out}/results.md and results.json", flush=True)
    return {"rows": rows, "graph_breaks": breaks, "inference": infer, "notes": notes}


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
