"""Tests of the planner (`python -m diffusers_masked.plan`): its FLOP counts against the benchmark's, memory
estimate, JSON output and argument errors. Small configs only."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from diffusers_masked import plan as planner

ROOT = Path(__file__).resolve().parents[1]
# What the planner adds to FlopCounterMode: CPU's fused attention ops (uncounted by torch on CPU).
_CPU_ATTENTION_OPS = ("aten._scaled_dot_product_flash_attention_for_cpu",
                      "aten._scaled_dot_product_flash_attention_for_cpu_backward")


def _bench():
    """benchmarks/train_throughput.py from the source tree (tests may use the repo layout; the package does not)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import train_throughput
    finally:
        sys.path.pop(0)
    return train_throughput


def _attention_flops(count: planner.StepCount) -> int:
    return sum(v for k, v in count.per_op.items() if k in _CPU_ATTENTION_OPS)


@pytest.mark.parametrize("name,bench_name", [("maskdit", "maskdit"), ("mdt", "mdt"),
                                             ("deferred_maskdit", "deferred")])
def test_fake_flops_agree_with_benchmark_count(name, bench_name):
    """The planner's shape-only (fake tensor) count of a tiny training step equals what the benchmark's
    `count_step_flops` counts on a real CPU step of the benchmark's own tiny model and loss, plus attention (which
    torch does not count on CPU, and which the planner counts with torch's GPU formulas)."""
    bench = _bench()
    torch.manual_seed(0)
    model = bench.build_model(bench_name, "XL", tiny=True).train()
    ratio = bench.TRAIN_MASK_RATIO.get(bench_name, 0.4)
    loss_fn = bench.make_loss_fn(bench_name, 0.4)
    b = 2
    x0, labels = torch.randn(b, 4, 8, 8), torch.randint(0, 1000, (b,))

    def step():
        loss_fn(model, x0, labels).backward()

    bench_flops = bench.count_step_flops(step)

    cfg = {k: v for k, v in model.config.items() if not k.startswith("_")}
    build = lambda: type(model)(**dict(cfg, num_classes=None))  # noqa: E731
    fake = planner.count_step(build, planner.make_loss_fn(name, ratio), b, 4, 8)
    attention = _attention_flops(fake)
    if name == "mdt":
        # MDTv2's attention has a float bias, which CPU runs on the math path: bmm ops that torch counts itself.
        assert attention == 0 and fake.per_op.get("aten.bmm", 0) > 0
    else:
        assert attention > 0
    assert fake.flops - attention == bench_flops
    # And the fake count is the real count: the same step run for real under the planner's counter.
    real = planner.count_step(build, planner.make_loss_fn(name, ratio), b, 4, 8, fake=False)
    assert real.flops == fake.flops


def test_diffusers_dit_fake_count_matches_real():
    build, loss = planner.diffusers_dit_step((2, 2, 16), 2, 8, 4)
    fake = planner.count_step(build, loss, 2, 4, 8)
    real = planner.count_step(build, loss, 2, 4, 8, fake=False)
    assert fake.flops == real.flops > 0 and _attention_flops(fake) > 0


@pytest.fixture(scope="module")
def small_plan():
    """One plan of MaskDiT-S/2 at 64 px (8x8 latent, 16 tokens), through the command line's --json."""
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = planner.main(["--model", "maskdit", "--preset", "S/2", "--resolution", "64", "--batch_sizes", "1", "4",
                           "16", "--json"])
    assert rc == 0
    return json.loads(out.getvalue())


def test_json_plan_masked_below_unmasked(small_plan):
    g = small_plan["gflop_per_image"]
    assert 0 < g["reduced"] < g["unmasked"]
    assert small_plan["flop_ratio_vs_unmasked"] == pytest.approx(g["unmasked"] / g["reduced"])
    assert small_plan["tokens"] == 16 and small_plan["mask_ratio"] == 0.5
    # No "DiT costs more" here: at S/2 MaskDiT's 8 x 512 decoder is wider than the 384-wide encoder, so the masked
    # step costs more than diffusers DiT-S/2 (the planner's point: masking does not always pay).
    assert small_plan["diffusers_dit"]["gflop_per_image"] > 0
    assert small_plan["diffusers_dit"]["flop_ratio"] == pytest.approx(
        small_plan["diffusers_dit"]["gflop_per_image"] / g["reduced"])
    assert small_plan["params"] > 0


def test_memory_estimate_increases_with_batch(small_plan):
    mem = small_plan["memory_estimate"]
    peaks = [m["peak_gib"] for m in mem["per_batch"]]
    assert [m["batch_size"] for m in mem["per_batch"]] == [1, 4, 16]
    assert peaks[0] < peaks[1] < peaks[2]
    assert mem["activation_gib_per_image"] > 0
    assert mem["state_gib"] == pytest.approx(small_plan["params"] * 16 / 2**30)
    assert "estimate" in mem["method"]


def test_unmeasured_config_says_so(small_plan):
    assert small_plan["measured"] == []
    assert "no measurement" in planner.format_plan(small_plan)


def test_measured_table_lookup():
    rows = planner.measured_for("maskdit", "XL/2", 32, 4, 0.5, None, {})
    b128 = [r for r in rows if r["batch"] == 128 and r["mode"] == "compile"]
    assert len(b128) == 1 and b128[0]["ratio"] == pytest.approx(1.60, abs=0.005)
    dense = planner.measured_for("deferred_maskdit", "XL/2", 32, 4, 0.75, 0, {"num_experts": 0})
    assert any(r["batch"] == 128 and r["ratio"] == pytest.approx(2.60, abs=0.005) for r in dense)
    assert planner.measured_for("maskdit", "XL/2", 32, 4, 0.3, None, {}) == []


@pytest.mark.parametrize("argv,flag", [
    (["--model", "nope", "--preset", "XL/2", "--resolution", "256"], "--model"),
    (["--model", "maskdit", "--preset", "Q/2", "--resolution", "256"], "--preset"),
    (["--model", "maskdit", "--preset", "XL/2", "--resolution", "250"], "--resolution"),
    (["--model", "maskdit", "--preset", "XL/8", "--resolution", "72"], "--resolution"),
    (["--model", "maskdit", "--preset", "XL/2", "--resolution", "256", "--mask_ratio", "1.0"], "--mask_ratio"),
    (["--model", "maskdit", "--preset", "XL/2", "--resolution", "256", "--mask_ratio", "-0.1"], "--mask_ratio"),
    (["--model", "dit", "--preset", "XL/2", "--resolution", "256", "--mask_ratio", "0.5"], "--mask_ratio"),
    (["--model", "dit", "--preset", "XL/2", "--resolution", "256", "--route_ratio", "1.5"], "--route_ratio"),
    (["--model", "maskdit", "--preset", "XL/2", "--resolution", "256", "--route_ratio", "0.5"], "--route_ratio"),
    (["--model", "maskdit", "--preset", "XL/2", "--resolution", "256", "--num_experts", "4"], "--num_experts"),
    (["--model", "deferred_maskdit", "--preset", "B/2", "--resolution", "256"], "--preset"),
])
def test_bad_input_exits_2_naming_the_flag(argv, flag, capsys):
    with pytest.raises(SystemExit) as exc:
        planner.parse_args(argv)
    assert exc.value.code == 2
    assert flag in capsys.readouterr().err


def test_help_runs_as_module():
    proc = subprocess.run([sys.executable, "-m", "diffusers_masked.plan", "--help"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    for flag in ("--model", "--preset", "--resolution", "--vae_scale", "--mask_ratio", "--route_ratio",
                 "--batch_sizes", "--json"):
        assert flag in proc.stdout


def test_model_missing_from_install_is_a_usage_error(monkeypatch, capsys):
    """A model this install does not export (e.g. an older diffusers_masked without the routed DiT) is refused with
    the models that are there, not a traceback."""
    monkeypatch.setitem(planner.MODELS, "dit", ("NoSuchTransformer2DModel", "route"))
    with pytest.raises(SystemExit) as exc:
        planner.parse_args(["--model", "dit", "--preset", "XL/2", "--resolution", "256"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--model dit" in err and "maskdit" in err
