"""Smoke tests of benchmarks/train_throughput.py (CPU, tiny configs; not timings)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "train_throughput.py"


def _run(tmp_path, *extra, timeout=300):
    out = tmp_path / "res"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--out", str(out), *extra],
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((out / "results.json").read_text()), (out / "results.md").read_text()


def test_help_documents_flags():
    proc = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0
    for flag in ("--quick", "--out", "--models", "--batch_sizes", "--modes", "--compile_mode", "--inference", "--profile"):
        assert flag in proc.stdout


def test_quick_dit_and_maskdit_eager(tmp_path):
    data, md = _run(tmp_path, "--models", "dit", "maskdit", "--modes", "eager", "--no-explain")
    rows = {(r["model"], r["mode"]): r for r in data["rows"]}
    assert set(rows) == {("dit", "eager"), ("maskdit", "eager")}
    for r in rows.values():
        assert r["status"] == "ok", r
        assert r["img_per_s"] > 0 and r["gflop_per_img"] > 0
    assert rows[("dit", "eager")]["ratio_vs_dit"] == pytest.approx(1.0)
    assert rows[("maskdit", "eager")]["ratio_vs_dit"] > 0
    assert "| diffusers DiT |" in md and "| MaskDiT @0.5 |" in md


@pytest.mark.slow
def test_quick_all_models_compile_explain_inference(tmp_path):
    data, md = _run(tmp_path, "--inference")
    statuses = {(r["model"], r["mode"]): r["status"] for r in data["rows"]}
    skipped = [n for n in data["notes"] if "skipped" in n]
    expected = len(data["args"]["models"]) - len(skipped)
    assert sum(s == "ok" for (m, mode), s in statuses.items() if mode == "eager") == expected, statuses
    assert sum(s == "ok" for (m, mode), s in statuses.items() if mode == "compile") == expected, statuses
    assert all(b["graph_breaks"] == 0 for b in data["graph_breaks"]), data["graph_breaks"]
    assert len([r for r in data["inference"] if r["status"] == "ok"]) == expected
    assert "Graph breaks" in md and "Sampling" in md


def test_quick_compile_mode_is_passed_and_noted(tmp_path):
    data, md = _run(tmp_path, "--models", "dit", "--modes", "compile", "--no-explain", "--compile_mode", "reduce-overhead")
    assert data["args"]["compile_mode"] == "reduce-overhead"
    assert [r["status"] for r in data["rows"]] == ["ok"]
    assert "mode='reduce-overhead'" in md


def test_official_models_need_an_invocation_of_their_own(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--out", str(tmp_path), "--models", "dit",
                           "official_maskdit"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode != 0 and "invocation of their own" in proc.stderr


def test_quick_profile_writes_table_with_unprofiled_step_time(tmp_path):
    _run(tmp_path, "--skip_training", "--no-explain", "--profile", "maskdit:XL:2:eager")
    text = (tmp_path / "res" / "profile.txt").read_text()
    header = next(line for line in text.splitlines() if line.startswith("==== maskdit:XL:2:eager"))
    wall_ms = float(header.split("unprofiled wall ")[1].split(" ms/step")[0])
    assert wall_ms > 0
    assert "Self CPU time total" in text
