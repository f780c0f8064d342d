"""benchmarks/trainer_vs_harness.py (issue 23 part 2): timing helpers and the table on fabricated rows (fast), the
--quick CPU run of one contender (~20 s: a trainer and a harness run)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

import trainer_vs_harness as tvh  # noqa: E402


def test_window_and_steady_img_s():
    stamps = [0.1 * i for i in range(1, 101)]  # 100 steps, 0.1 s each
    assert tvh.window_img_s(stamps, 8, 10, 100) == pytest.approx(90 * 8 / 9.0)
    assert tvh.window_img_s(stamps, 8, 0, 10) is None and tvh.window_img_s(stamps, 8, 10, 101) is None
    # one evaluation gap of 30 s after step 60: the median window ignores it
    gapped = stamps[:60] + [s + 30 for s in stamps[60:]]
    assert tvh.steady_img_s(gapped, 8, window=10, skip=10) == pytest.approx(80.0)
    assert tvh.steady_img_s(stamps[:15], 8, window=10, skip=10) == pytest.approx(80.0)  # short run: small windows
    assert tvh.steady_img_s(stamps[:1], 8) is None


def test_outermost_total_counts_nested_events_once():
    class E:
        def __init__(self, name, start, end):
            self.name, self.device_type = name, type("D", (), {"name": "CPU"})()
            self.time_range = type("T", (), {"start": start, "end": end})()

    events = [E("ema.py(10): step", 0, 10), E("aten::_foreach_lerp_", 2, 8), E("ema.py(10): step", 20, 25),
              E("other", 0, 100)]
    assert tvh._outermost_total_us(events, dict(tvh.PROFILE_CATEGORIES)["EMA update"]) == (15, 2)


def _row(model, harness, trainer, status="ok"):
    return {"model": model, "batch_size": 128, "steps": 120, "warmup_steps": 30, "status": status,
            "harness": {"img_per_s": harness, "peak_mem_gib": 12.0}, "trainer_img_per_s": trainer,
            "trainer_over_harness": trainer / harness if status == "ok" else None, "trainer_step_ms_median": 50.0,
            "trainer_step_ms_p90": 55.0, "call": "c1"}


def test_markdown_ratio_and_target():
    data = {"env": {"device": "GPU"}, "rows": {"dit@b128": _row("dit", 2500.0, 2400.0),
                                               "maskdit@b128": _row("maskdit", 2600.0, 2000.0),
                                               "mdtv2@b128": _row("mdtv2", 1.0, 1.0, status="not run: no EDM")}}
    md = tvh.markdown(data)
    assert "| dit | 128 | 2500.0 | 2400.0 | 0.960 | yes |" in md
    assert "| maskdit | 128 | 2600.0 | 2000.0 | 0.769 | **no** |" in md
    assert "| mdtv2 | 128 | not run: no EDM |" in md


def test_merge_keeps_rows_of_earlier_calls(tmp_path):
    path = tmp_path / "t.json"
    tvh._write_json(path, {"rows": {"dit@b128": _row("dit", 1.0, 1.0)}, "notes": ["n"]})
    data = tvh.load_merged([tmp_path / "missing.json", path])
    assert list(data["rows"]) == ["dit@b128"]
    assert tvh.load_merged([tmp_path / "missing.json"]) == {"rows": {}, "notes": []}


def test_overhead_flags_are_the_study_flags_without_evaluation(tmp_path):
    import convergence

    args = tvh.build_parser().parse_args(["--batch_size", "128"])
    flags = tvh.trainer_flags_for_overhead(convergence.CONTENDERS["maskdit"], args, tmp_path / "m")
    assert convergence.flag_value(flags, "--train_batch_size") == "128"
    assert convergence.flag_value(flags, "--max_train_steps") == "120"
    assert convergence.flag_value(flags, "--unmasked_finetune_steps") == "0"
    assert convergence.flag_value(flags, "--logging_steps") == "10"  # the last one counts
    assert "--eval_every_minutes" not in flags and "--torch_compile" in flags
    assert convergence.flag_value(flags, "--max_train_time_minutes") == "100000"
    no_budget = tvh.build_parser().parse_args(["--no-time_budget_check"])
    assert "--max_train_time_minutes" not in tvh.trainer_flags_for_overhead(
        convergence.CONTENDERS["dit"], no_budget, tmp_path / "d")


def test_quick_one_contender(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "trainer_vs_harness.py"), "--quick", "--models",
                           "dit", "--out", str(out), "--work_dir", str(tmp_path / "work"), "--quiet"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads((out / "trainer_vs_harness.json").read_text())
    row = data["rows"]["dit@b8"]
    assert row["status"] == "ok", row
    assert row["trainer_img_per_s"] > 0 and row["harness"]["img_per_s"] > 0 and row["trainer_over_harness"] > 0
    assert "| dit | 8 |" in (out / "trainer_vs_harness.md").read_text()
