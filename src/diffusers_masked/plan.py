"""When does masking pay? A planner for reduced-token training.

For one model, image size and mask (or route) ratio this prints what a training step costs, without a GPU and
without allocating the weights:

- FLOPs per training image of the reduced-token step and of the same model's unmasked step (forward + backward,
  `torch.utils.flop_counter.FlopCounterMode`, counted as ``benchmarks/train_throughput.py`` counts them), their ratio
  (the FLOP bound on the speed-up at equal hardware efficiency) and the same against diffusers'
  `DiTTransformer2DModel` of the matching size;
- the parameter count;
- an *estimate* of peak training memory per batch size;
- the speed ratio our GPU benchmark measured for that configuration, where there is one.

    python -m diffusers_masked.plan --model maskdit --preset XL/2 --resolution 256 --vae_scale 8
    python -m diffusers_masked.plan --model deferred_maskdit --preset XL/2 --resolution 256 --num_experts 0 --json

How it counts: every model is built and run inside `FakeTensorMode` (tensors with shapes and dtypes but no data), so
even XL/2 costs a few seconds of CPU and no weight memory. The step is each model's real training loss under bf16
autocast, then ``backward()``. FlopCounterMode counts matmuls, convolutions and attention; CPU's fused attention kernel
has no FLOP formula in torch, so the planner counts it with torch's own formulas for the GPU kernels (forward 2 bmm,
backward 5 bmm, as flash / memory-efficient attention are counted on the GPU). With that, the counts equal the
GFLOP/img column of ``benchmarks/README.md`` (e.g. DiT-XL/2 716, MaskDiT-XL/2 394).

One difference from the models as trained: the FLOP and memory passes build the model unconditional
(``num_classes=None``), because the class-label check of the models reads label values, which fake tensors do not
have. A label embedding is a table lookup, which FlopCounterMode counts as 0 FLOPs either way; the parameter count
comes from the class-conditional model.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

#: Model names the planner knows -> (class name in `diffusers_masked.models`, kind of token reduction).
MODELS: Dict[str, Tuple[str, str]] = {
    "maskdit": ("MaskDiTTransformer2DModel", "mask"),
    "mdt": ("MDTv2Transformer2DModel", "mask"),
    "deferred_maskdit": ("DeferredMaskDiTTransformer2DModel", "mask"),
    "dit": ("RoutedDiTTransformer2DModel", "route"),
}

#: Training ratio of each model when the user gives none: the benchmark's (MaskDiT's paper 0.5; MDTv2 0.4 = the
#: mean of its U[0.3, 0.5) draw; DeferredMaskDiT's paper 0.75; TREAD's route ratio 0.5).
DEFAULT_RATIO: Dict[str, float] = {"maskdit": 0.5, "mdt": 0.4, "deferred_maskdit": 0.75, "dit": 0.5}

#: diffusers DiT sizes (DiT paper): layers, heads, head dim; the benchmark's baseline.
DIFFUSERS_DIT_SIZES: Dict[str, Tuple[int, int, int]] = {
    "XL": (28, 16, 72), "L": (24, 16, 64), "B": (12, 12, 64), "S": (12, 6, 64),
}
#: DeferredMaskDiT has no DiT-sized presets; the benchmark compares XL with DiT-XL and TINY with DiT-B.
DEFERRED_DIT_SIZE: Dict[str, str] = {"XL": "XL", "TINY": "B"}

# Bytes per parameter of fp32 training with AdamW: weights, gradients, exp_avg, exp_avg_sq.
_STATE_BYTES_PER_PARAM = 16

#: Speed ratios measured by ``benchmarks/train_throughput.py`` (img/s of the model / img/s of diffusers DiT of the
#: matching size, same batch, same mode, one process on one GPU, bf16 autocast, 256 tokens = 32x32x4 latents).
#: Copied from the tables of ``benchmarks/README.md`` (raw JSON in ``benchmarks/results_h100/``); kept here so the
#: installed package does not need the source tree. Keys: (model, variant, preset, latent size, in_channels, ratio).
_H100 = "1x NVIDIA H100 80GB HBM3, torch 2.11.0+cu130, diffusers 0.42.1"
MEASURED: Dict[Tuple[str, str, str, int, int, float], List[Dict[str, Any]]] = {
    ("maskdit", "", "XL/2", 32, 4, 0.5): [
        dict(batch=32, mode="compile", img_s=394.0, dit_img_s=431.1),
        dict(batch=32, mode="compile reduce-overhead", img_s=673.0, dit_img_s=470.1),
        dict(batch=128, mode="compile", img_s=910.4, dit_img_s=569.9),
        dict(batch=128, mode="eager", img_s=603.1, dit_img_s=390.7),
        dict(batch=256, mode="compile", img_s=975.3, dit_img_s=569.9,
             note="DiT-XL/2 OOM at b256: vs its best (b128)"),
    ],
    ("deferred_maskdit", "dense", "XL/2", 32, 4, 0.75): [
        dict(batch=32, mode="compile", img_s=412.4, dit_img_s=431.1),
        dict(batch=32, mode="compile reduce-overhead", img_s=1128.8, dit_img_s=470.1),
        dict(batch=128, mode="compile", img_s=1480.1, dit_img_s=569.9),
        dict(batch=128, mode="eager", img_s=906.4, dit_img_s=390.7),
        dict(batch=256, mode="compile", img_s=2039.7, dit_img_s=569.9,
             note="DiT-XL/2 OOM at b256: vs its best (b128)"),
    ],
    ("deferred_maskdit", "moe", "XL/2", 32, 4, 0.75): [
        dict(batch=32, mode="compile", img_s=390.5, dit_img_s=431.1),
        dict(batch=32, mode="compile reduce-overhead", img_s=775.5, dit_img_s=470.1),
        dict(batch=128, mode="compile", img_s=1117.9, dit_img_s=569.9),
        dict(batch=256, mode="compile", img_s=1496.0, dit_img_s=569.9,
             note="DiT-XL/2 OOM at b256: vs its best (b128)"),
    ],
    ("mdt", "", "XL/2", 32, 4, 0.4): [
        dict(batch=32, mode="compile", img_s=188.0, dit_img_s=431.1, note="joint backward"),
        dict(batch=128, mode="compile", img_s=242.5, dit_img_s=569.9, note="split backward"),
    ],
    ("maskdit", "", "B/2", 32, 4, 0.5): [
        dict(batch=32, mode="compile", img_s=895.9, dit_img_s=1289.0,
             note="host-bound; both in one call (call15)"),
        dict(batch=128, mode="compile", img_s=2571.7, dit_img_s=2501.9),
        dict(batch=256, mode="compile", img_s=2775.1, dit_img_s=2676.2),
    ],
    ("mdt", "", "B/2", 32, 4, 0.4): [
        dict(batch=128, mode="compile", img_s=956.0, dit_img_s=2501.9),
        dict(batch=256, mode="compile", img_s=1072.9, dit_img_s=2676.2),
    ],
    ("deferred_maskdit", "dense", "TINY/2", 32, 4, 0.75): [
        dict(batch=128, mode="compile", img_s=2447.6, dit_img_s=2501.9, note="vs DiT-B/2"),
        dict(batch=256, mode="compile", img_s=5717.5, dit_img_s=2676.2, note="vs DiT-B/2"),
    ],
    ("deferred_maskdit", "moe", "TINY/2", 32, 4, 0.75): [
        dict(batch=128, mode="compile", img_s=2396.3, dit_img_s=2501.9, note="vs DiT-B/2"),
        dict(batch=256, mode="compile", img_s=4639.9, dit_img_s=2676.2, note="vs DiT-B/2"),
    ],
}
MEASURED_SOURCE = {
    "device": _H100,
    "dates": "2026-11-27 .. 2026-11-28",
    "command": "python3 benchmarks/train_throughput.py --modes compile --sizes XL --models dit maskdit "
               "--compile_batch_sizes 128 (and the other lines of benchmarks/run_gpu.sh)",
    "where": "benchmarks/README.md, tables 'Training throughput, XL/2, one H100' and 'B/2'",
}


# ----------------------------------------------------------------------------------------------------------------
# Counting
# ----------------------------------------------------------------------------------------------------------------
def _cpu_attention_flop_mapping() -> Dict[Any, Callable]:
    """FLOP formulas for CPU's fused attention ops, borrowed from torch's formulas for the GPU kernels.

    Without them FlopCounterMode on CPU counts no attention at all (``benchmarks/flops_vs_official.py`` notes it);
    with them a CPU count equals what the benchmark counts on the GPU (forward 2 bmm, backward 5 bmm)."""
    from torch.utils.flop_counter import sdpa_backward_flop_count, sdpa_flop_count

    def forward(query, key, value, *args, out_shape=None, **kwargs) -> int:
        return sdpa_flop_count(query, key, value)

    def backward(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
        return sdpa_backward_flop_count(grad_out, query, key, value)

    aten = torch.ops.aten
    mapping: Dict[Any, Callable] = {}
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        mapping[aten._scaled_dot_product_flash_attention_for_cpu] = forward
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu_backward"):
        mapping[aten._scaled_dot_product_flash_attention_for_cpu_backward] = backward
    return mapping


def flop_counter(count_cpu_attention: bool = True):
    """A `FlopCounterMode` that also counts CPU attention (see `_cpu_attention_flop_mapping`)."""
    from torch.utils.flop_counter import FlopCounterMode

    return FlopCounterMode(display=False, custom_mapping=_cpu_attention_flop_mapping() if count_cpu_attention else None)


class SavedActivations:
    """Bytes of the tensors autograd saves for backward (`torch.autograd.graph.saved_tensors_hooks`), each storage
    once, parameters excluded: the activation memory alive at the end of the forward, the usual training peak."""

    def __init__(self, params: Sequence[torch.Tensor]):
        self._param_keys = {self._key(p) for p in params}
        self._seen: set = set()
        self.bytes = 0

    @staticmethod
    def _key(t: torch.Tensor) -> int:
        try:
            return t.untyped_storage()._cdata
        except Exception:  # a tensor without storage (e.g. a subclass): count it by identity
            return id(t)

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        key = self._key(t)
        if key not in self._param_keys and key not in self._seen:
            self._seen.add(key)
            self.bytes += t.untyped_storage().nbytes() if hasattr(t, "untyped_storage") else t.numel() * t.element_size()
        return t

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)


def _build_fake(build: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    """``build()`` with fake weights, called inside an active `FakeTensorMode`.

    The model is built on the ``meta`` device (some initialisers, e.g. ``trunc_normal_``, read values, which fake
    tensors refuse), then ``to_empty`` gives it fake CPU tensors of the same shapes. Weight values do not matter:
    FLOPs and saved-activation sizes depend on shapes only."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    with unset_fake_temporarily(), torch.device("meta"):
        model = build()
    return model.to_empty(device="cpu")


@contextlib.contextmanager
def _no_ids_keep_value_checks(active: bool = True):
    """Turn off the models' check of the kept-token ids' values for the duration (fake tensors have no values to
    check; the ids come from our own `random_ids_keep`), and restore the user's setting afterwards."""
    from .models import masking

    previous = getattr(masking, "_IDS_KEEP_VALUE_CHECKS", "auto")
    if active:
        masking.set_ids_keep_value_checks("never")
    try:
        yield
    finally:
        masking.set_ids_keep_value_checks(previous)


@dataclass
class StepCount:
    """One counted training step."""

    flops: int
    batch_size: int
    per_op: Dict[str, int] = field(default_factory=dict)
    saved_bytes: Optional[int] = None

    @property
    def flops_per_image(self) -> float:
        return self.flops / self.batch_size


def count_step(build: Callable[[], torch.nn.Module], loss_fn: Callable[[torch.nn.Module, torch.Tensor], torch.Tensor],
               batch_size: int, channels: int, latent: int, measure_memory: bool = False,
               fake: bool = True) -> StepCount:
    """Count one training step (bf16 autocast forward of ``loss_fn(model, x0)``, then backward).

    With ``fake`` (the default) the model and data are fake tensors: shapes only, no weights allocated. ``fake=False``
    runs for real on CPU (tests use it to check the fake count)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    mode = FakeTensorMode(allow_non_fake_inputs=True) if fake else contextlib.nullcontext()
    with mode, _no_ids_keep_value_checks(fake):
        torch.manual_seed(0)
        model = _build_fake(build) if fake else build()
        model.train()
        x0 = torch.randn(batch_size, channels, latent, latent)
        saved = SavedActivations(list(model.parameters())) if measure_memory else None
        counter = flop_counter()
        with counter:
            with saved.hooks() if saved else contextlib.nullcontext():
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    loss = loss_fn(model, x0)
            loss.backward()
    per_op = {str(k): int(v) for k, v in counter.get_flop_counts().get("Global", {}).items()}
    return StepCount(int(counter.get_total_flops()), batch_size, per_op, saved.bytes if saved else None)


# ----------------------------------------------------------------------------------------------------------------
# Models and their training losses (the losses the trainer and the benchmark use)
# ----------------------------------------------------------------------------------------------------------------
def model_class(name: str):
    """The model class of planner name ``name``; `None` when this install of diffusers_masked lacks it."""
    import diffusers_masked.models as models

    return getattr(models, MODELS[name][0], None)


def available_models() -> List[str]:
    return [name for name in MODELS if model_class(name) is not None]


def model_config(name: str, preset: str, latent: int, in_channels: int, num_classes: Optional[int],
                 num_experts: Optional[int] = None) -> Dict[str, Any]:
    """Config of ``preset`` for ``latent`` x ``latent`` inputs, as the benchmark builds each model."""
    cls = model_class(name)
    overrides: Dict[str, Any] = dict(sample_size=latent, in_channels=in_channels, num_classes=num_classes)
    if name == "deferred_maskdit":
        overrides["caption_channels"] = None  # class-conditional (or unconditional), as the benchmark
        if num_experts is not None:
            overrides["num_experts"] = num_experts
    if name == "dit":
        overrides["learn_sigma"] = False
    return cls.preset_config(preset, **overrides)


def make_loss_fn(name: str, ratio: float) -> Callable[[torch.nn.Module, torch.Tensor], torch.Tensor]:
    """``loss(model, x0)`` of one training step of ``name`` at mask / route ``ratio`` (0 = the unmasked step)."""
    from .training.objectives import DDPMObjective, EDMObjective

    if name == "maskdit":
        from .training.recipe_maskdit import maskdit_loss

        objective = EDMObjective()
        return lambda model, x0: maskdit_loss(model, objective, x0, {}, ratio, 0.1)[0]
    if name == "mdt":
        from .training.recipe_mdt import LearnedVarianceVLB, mdtv2_loss

        objective = DDPMObjective(prediction_type="epsilon", learned_variance=True)
        vlb = LearnedVarianceVLB(objective)
        # Both branches (full + masked), one backward: the benchmark's MDTv2 step. Ratio 0: the full branch only.
        return lambda model, x0: mdtv2_loss(model, objective, x0, {}, ratio, vlb=vlb)[0]
    if name == "deferred_maskdit":
        from .training.recipe_deferred_maskdit import deferred_maskdit_loss

        objective = EDMObjective(sigma_data=0.9, p_mean=-0.6, p_std=1.2)
        return lambda model, x0: deferred_maskdit_loss(model, objective, x0, {}, ratio)[0]
    if name == "dit":
        from .training.recipe_dit import routed_dit_loss

        objective = EDMObjective()
        return lambda model, x0: routed_dit_loss(model, objective, x0, {}, ratio)[0]
    raise ValueError(f"unknown model {name!r}")


def diffusers_dit_size(name: str, preset: str) -> Optional[str]:
    """Size of the diffusers DiT the benchmark compares ``name`` / ``preset`` with (None if there is none)."""
    size = preset.split("/")[0].upper()
    if name == "deferred_maskdit":
        return DEFERRED_DIT_SIZE.get(size)
    return size if size in DIFFUSERS_DIT_SIZES else None


def diffusers_dit_step(size: Any, patch: int, latent: int, in_channels: int) -> Tuple[Callable, Callable]:
    """(build, loss) of the benchmark's baseline: diffusers `DiTTransformer2DModel` (learned sigma, 1000 classes),
    DDPM epsilon MSE on the first ``in_channels`` output channels. ``size``: a DiT size name or (layers, heads,
    head_dim)."""
    from diffusers import DiTTransformer2DModel

    layers, heads, head_dim = DIFFUSERS_DIT_SIZES[size] if isinstance(size, str) else size

    def build() -> torch.nn.Module:
        return DiTTransformer2DModel(
            num_attention_heads=heads, attention_head_dim=head_dim, in_channels=in_channels,
            out_channels=2 * in_channels, num_layers=layers, sample_size=latent, patch_size=patch,
            num_embeds_ada_norm=1000, norm_type="ada_norm_zero",
        )

    def loss(model, x0):
        b = x0.shape[0]
        t = torch.randint(0, 1000, (b,))
        labels = torch.randint(0, 1000, (b,))
        noise = torch.randn_like(x0)
        out = model(x0 + noise, timestep=t, class_labels=labels).sample
        return ((out[:, : x0.shape[1]].float() - noise.float()) ** 2).mean()

    return build, loss


# ----------------------------------------------------------------------------------------------------------------
# The plan
# ----------------------------------------------------------------------------------------------------------------
def measured_for(name: str, preset: str, latent: int, in_channels: int, ratio: float,
                 num_experts: Optional[int], model_cfg: Dict[str, Any]) -> List[Dict[str, Any]]:
    """Benchmark rows measured for exactly this configuration ([] if none)."""
    variant = ""
    if name == "deferred_maskdit":
        variant = "dense" if not model_cfg.get("num_experts") else "moe"
    key = (name, variant, preset.upper(), latent, in_channels, round(ratio, 4))
    return [dict(r, ratio=r["img_s"] / r["dit_img_s"]) for r in MEASURED.get(key, [])]


def plan(name: str, preset: str, resolution: int, vae_scale: int = 8, ratio: Optional[float] = None,
         batch_sizes: Sequence[int] = (32, 64, 128, 256), in_channels: int = 4, num_classes: Optional[int] = 1000,
         num_experts: Optional[int] = None, compare_diffusers: bool = True) -> Dict[str, Any]:
    """Everything the planner prints, as a dict (what ``--json`` writes)."""
    t0 = time.perf_counter()
    if ratio is None:
        ratio = DEFAULT_RATIO[name]
    latent = resolution // vae_scale
    cls = model_class(name)
    cfg = model_config(name, preset, latent, in_channels, num_classes, num_experts)
    patch = cfg["patch_size"]
    tokens = (latent // patch) ** 2

    with torch.device("meta"):
        full_model = cls(**cfg)
    n_params = sum(p.numel() for p in full_model.parameters())
    cfg = dict(full_model.config)  # with the class defaults the preset leaves out (e.g. num_experts)
    cfg = {k: v for k, v in cfg.items() if not k.startswith("_")}

    uncond = dict(cfg, num_classes=None)  # see the module docstring: label checks need data
    build = lambda: cls(**uncond)  # noqa: E731
    reduced = count_step(build, make_loss_fn(name, ratio), 2, in_channels, latent, measure_memory=True)
    reduced_b1 = count_step(build, make_loss_fn(name, ratio), 1, in_channels, latent, measure_memory=True)
    unmasked = count_step(build, make_loss_fn(name, 0.0), 1, in_channels, latent)

    dit = None
    dit_size = diffusers_dit_size(name, preset) if compare_diffusers else None
    if dit_size is not None:
        dit_build, dit_loss = diffusers_dit_step(dit_size, patch, latent, in_channels)
        dit_count = count_step(dit_build, dit_loss, 1, in_channels, latent)
        dit = {"model": f"diffusers DiTTransformer2DModel {dit_size}/{patch}",
               "gflop_per_image": dit_count.flops_per_image / 1e9,
               "flop_ratio": dit_count.flops_per_image / reduced.flops_per_image}

    # Activations: linear in the batch; the batch-1 / batch-2 difference is the per-image part, the rest (bf16 weight
    # copies that autocast saves for backward) is fixed.
    act_per_image = reduced.saved_bytes - reduced_b1.saved_bytes
    act_fixed = max(reduced_b1.saved_bytes - act_per_image, 0)
    states = n_params * _STATE_BYTES_PER_PARAM
    memory = [{"batch_size": b, "peak_gib": (states + act_fixed + b * act_per_image) / 2**30} for b in batch_sizes]

    measured = measured_for(name, preset, latent, in_channels, ratio, num_experts, cfg)
    kind = MODELS[name][1]
    return {
        "model": name, "class": cls.__name__, "preset": preset.upper(), "resolution": resolution,
        "vae_scale": vae_scale, "latent": f"{latent}x{latent}x{in_channels}", "patch_size": patch, "tokens": tokens,
        f"{kind}_ratio": ratio, "num_classes": num_classes,
        **({"num_experts": cfg.get("num_experts")} if name == "deferred_maskdit" else {}),
        "params": n_params,
        "gflop_per_image": {"reduced": reduced.flops_per_image / 1e9, "unmasked": unmasked.flops_per_image / 1e9},
        "flop_ratio_vs_unmasked": unmasked.flops_per_image / reduced.flops_per_image,
        "diffusers_dit": dit,
        "memory_estimate": {
            "method": "estimate = fp32 weights + grads + AdamW states (16 B/param) + activations saved for backward "
                      "(bf16 autocast, counted with saved-tensor hooks on one fake batch-1 and batch-2 step, "
                      "scaled linearly in the batch); no allocator slack, workspaces or compile savings",
            "state_gib": states / 2**30, "activation_gib_per_image": act_per_image / 2**30,
            "activation_fixed_gib": act_fixed / 2**30, "per_batch": memory,
        },
        "measured": measured, "measured_source": MEASURED_SOURCE if measured else None,
        "planner_seconds": time.perf_counter() - t0,
    }


def format_plan(p: Dict[str, Any]) -> str:
    """The human-readable table of a `plan` dict."""
    kind = "mask" if "mask_ratio" in p else "route"
    ratio = p[f"{kind}_ratio"]
    g = p["gflop_per_image"]
    lines = [
        f"{p['class']} {p['preset']} at {p['resolution']}px (VAE /{p['vae_scale']}: latent {p['latent']}, "
        f"patch {p['patch_size']}: {p['tokens']} tokens), {kind} ratio {ratio:g}"
        + (f", {p['num_experts'] or 'dense, no'} experts" if "num_experts" in p else ""),
        f"parameters: {p['params'] / 1e6:.1f}M",
        "",
        "| training step (fwd + bwd) | GFLOP / image | FLOP bound on speed-up |",
        "|---|---|---|",
        f"| {'masked' if kind == 'mask' else 'routed'}, ratio {ratio:g} | {g['reduced']:.1f} | 1.00x |",
        f"| same model, unmasked ({kind} 0) | {g['unmasked']:.1f} | {p['flop_ratio_vs_unmasked']:.2f}x |",
    ]
    if p["diffusers_dit"]:
        d = p["diffusers_dit"]
        lines.append(f"| {d['model']} | {d['gflop_per_image']:.1f} | {d['flop_ratio']:.2f}x |")
    else:
        lines.append("| diffusers DiTTransformer2DModel | no matching size | - |")
    lines += ["", "(FLOP bound = baseline FLOPs / reduced FLOPs: the speed-up at equal GPU efficiency; measured "
              "speed-ups are lower where the smaller kernels run less efficiently.)", ""]
    mem = p["memory_estimate"]
    lines += [f"peak training memory per GPU, an {mem['method']}:",
              "| batch per GPU | est. peak GiB | measured x diffusers DiT (same batch) |", "|---|---|---|"]
    by_batch: Dict[int, List[str]] = {}
    for r in p["measured"]:
        by_batch.setdefault(r["batch"], []).append(
            f"{r['ratio']:.2f}x {r['mode']}" + (f" ({r['note']})" if r.get("note") else ""))
    for m in mem["per_batch"]:
        meas = "; ".join(by_batch.pop(m["batch_size"], [])) or "no measurement"
        lines.append(f"| {m['batch_size']} | {m['peak_gib']:.1f} | {meas} |")
    for b, meas in sorted(by_batch.items()):
        lines.append(f"| {b} | (not asked) | {'; '.join(meas)} |")
    if p["measured_source"]:
        s = p["measured_source"]
        lines += ["", f"measured: {s['device']}, {s['dates']}; {s['where']}; e.g. `{s['command']}`"]
    else:
        lines += ["", "measured: no measurement for this configuration (the benchmark ran 32x32x4 latents, "
                      "XL/2 and B/2, at each model's default ratio)"]
    lines.append(f"(planner: {p['planner_seconds']:.1f} s on this CPU)")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m diffusers_masked.plan",
        description="When does masking pay? FLOPs per training image (reduced-token vs unmasked step vs diffusers "
                    "DiT), parameters, estimated peak training memory per batch size and our measured speed ratio.",
    )
    parser.add_argument("--model", required=True, choices=list(MODELS),
                        help="maskdit, mdt, deferred_maskdit, or dit (our DiT with TREAD token routing).")
    parser.add_argument("--preset", required=True, help="Size/patch preset, e.g. XL/2, B/4 (DeferredMaskDiT: XL/2, "
                                                        "TINY/2, ...).")
    parser.add_argument("--resolution", type=int, required=True, help="Image side in pixels, e.g. 256.")
    parser.add_argument("--vae_scale", type=int, default=8, help="VAE downsampling factor (8 for SD's VAE; 1 = pixel "
                                                                 "space). Default 8.")
    parser.add_argument("--mask_ratio", type=float, default=None,
                        help="Share of tokens masked in training, in [0, 1) (default: the model's, "
                             "maskdit 0.5, mdt 0.4, deferred_maskdit 0.75).")
    parser.add_argument("--route_ratio", type=float, default=None,
                        help="dit only: TREAD share of tokens routed past the span, in [0, 1) (default 0.5).")
    parser.add_argument("--batch_sizes", type=int, nargs="+", default=[32, 64, 128, 256],
                        help="Per-GPU batch sizes for the memory estimate (default 32 64 128 256).")
    parser.add_argument("--in_channels", type=int, default=4, help="Latent (or pixel) channels. Default 4.")
    parser.add_argument("--num_classes", type=int, default=1000,
                        help="Classes of the label embedding (affects the parameter count); 0 = unconditional.")
    parser.add_argument("--num_experts", type=int, default=None,
                        help="deferred_maskdit only: experts of the MoE blocks (0 = dense MLPs, the benchmark's "
                             "'deferred'; default: the preset's).")
    parser.add_argument("--no_diffusers_dit", action="store_true", help="Skip counting diffusers' DiT.")
    parser.add_argument("--json", action="store_true", help="Print the plan as JSON.")
    return parser


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Parse and check the flags; bad input exits 2 with a message that names the flag and the fix."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if model_class(args.model) is None:
        parser.error(f"--model {args.model}: this install of diffusers_masked has no {MODELS[args.model][0]}; "
                     f"choose one of {available_models()}.")
    kind = MODELS[args.model][1]
    if kind == "route" and args.mask_ratio is not None:
        parser.error("--mask_ratio: dit does not mask (it has no decoder); use --route_ratio for TREAD routing.")
    if kind == "mask" and args.route_ratio is not None:
        parser.error(f"--route_ratio: only dit routes tokens; use --mask_ratio for {args.model}.")
    flag = "--route_ratio" if kind == "route" else "--mask_ratio"
    ratio = args.route_ratio if kind == "route" else args.mask_ratio
    if ratio is not None and not 0.0 <= ratio < 1.0:
        parser.error(f"{flag} {ratio:g}: must be in [0, 1) (e.g. 0.5); 1 would remove every token.")
    args.ratio = ratio
    try:
        cfg = model_class(args.model).preset_config(args.preset)
    except ValueError:
        parser.error(f"--preset {args.preset}: unknown for {args.model}; choose one of "
                     f"{model_class(args.model).available_presets()}.")
    for name in ("resolution", "vae_scale", "in_channels"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} {getattr(args, name)}: must be a positive integer.")
    if args.resolution % args.vae_scale:
        parser.error(f"--resolution {args.resolution}: not divisible by --vae_scale {args.vae_scale}; use a "
                     f"multiple of {args.vae_scale}.")
    latent, patch = args.resolution // args.vae_scale, cfg["patch_size"]
    if latent % patch:
        step = args.vae_scale * patch
        parser.error(f"--resolution {args.resolution}: the latent side {latent} (= resolution / vae_scale) is not "
                     f"divisible by the patch size {patch} of {args.preset}; use a multiple of {step} (e.g. "
                     f"{max(step, args.resolution // step * step)}).")
    if any(b < 1 for b in args.batch_sizes):
        parser.error("--batch_sizes: every batch size must be a positive integer.")
    if args.num_classes < 0:
        parser.error("--num_classes: must be >= 0 (0 = unconditional).")
    if args.num_experts is not None and args.model != "deferred_maskdit":
        parser.error("--num_experts: only deferred_maskdit has experts; leave it out.")
    if args.num_experts is not None and args.num_experts < 0:
        parser.error("--num_experts: must be >= 0 (0 = dense MLPs).")
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    result = plan(args.model, args.preset, args.resolution, args.vae_scale, args.ratio, args.batch_sizes,
                  args.in_channels, args.num_classes or None, args.num_experts, not args.no_diffusers_dit)
    print(json.dumps(result, indent=2) if args.json else format_plan(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
