"""benchmarks/convergence.py (issue 23 study): table, merge and flag logic on fabricated records (fast), and the
--quick path of one contender on the CPU (~30 s, a tiny random FD classifier)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

import convergence as conv  # noqa: E402


def _run(name, evals, img_s=1000.0, status="ok", **extra):
    """A study record as run_contender writes it; ``evals`` = [(wall_s, images_seen, fd, acc)]."""
    return {"contender": name, "model": name, "label": name, "objective": "edm", "sampler": conv.EDM_SAMPLER,
            "what_differs": f"{name} things", "status": status, "steady_img_s": img_s,
            "settings": conv.shared_settings(conv.parse_args([])), "env": {"device": "GPU X", "date": "today"},
            "train_results": {"num_parameters": 130_000_000, "global_step": evals[-1][1] // 256 if evals else 0,
                              "images_per_s": img_s * 0.9},
            "evals": [{"step": im // 256, "images_seen": im, "wall_clock_s": w, "fd": fd, "conditional_accuracy": a}
                      for w, im, fd, a in evals], **extra}


def _study():
    data = {"runs": {}}
    conv.merge_run(data, _run("dit", [(60, 60_000, 300.0, 0.5), (120, 120_000, 150.0, 0.7), (300, 300_000, 50.0, 0.9)]))
    # reaches 50 between its 2nd and 3rd evaluation: 100 -> 40 over 100..200 s => 50 at 100 + 50/60 x 100 s
    conv.merge_run(data, _run("maskdit", [(50, 80_000, 200.0, 0.4), (100, 160_000, 100.0, 0.6),
                                          (200, 320_000, 40.0, 0.8)], img_s=1600.0))
    conv.merge_run(data, _run("deferred_maskdit", [(100, 200_000, 400.0, 0.2), (300, 600_000, 90.0, 0.5)]))
    conv.merge_run(data, {"contender": "mdtv2", "model": "mdtv2", "label": "MDTv2 (EDM)", "objective": "edm",
                          "sampler": conv.EDM_SAMPLER, "what_differs": "x",
                          "status": "not run: train_mdt.py has no --edm_sigma_data"})
    data["normalisation"] = {"source": "t.json", "batch_size": 256, "device": "GPU Y", "date": "d",
                             "img_per_s": {"dit": 1000.0, "maskdit": 2000.0, "deferred_maskdit": 2000.0}}
    return data


def test_first_reach_interpolates_and_flags_edges():
    pts = [(10, 100.0), (20, 50.0), (30, 20.0)]
    assert conv.first_reach(pts, 50.0) == (20, False)
    x, early = conv.first_reach(pts, 35.0)
    assert not early and x == pytest.approx(25.0)
    assert conv.first_reach(pts, 200.0) == (10, True)  # already at the first evaluation: an upper bound
    assert conv.first_reach(pts, 10.0) == (None, False)
    assert conv.first_reach([], 1.0) == (None, False)


def test_summarize_reach_times_against_dit():
    rows = {r["contender"]: r for r in conv.summarize(_study())}
    assert list(rows) == ["dit", "maskdit", "deferred_maskdit", "mdtv2"]  # study order
    dit, mask, deferred = rows["dit"], rows["maskdit"], rows["deferred_maskdit"]
    assert dit["final_fd"] == 50.0 and dit["reach_wall"] == 300 and dit["reach_wall_x_baseline"] == pytest.approx(1.0)
    assert mask["reach_wall"] == pytest.approx(100 + 50 / 60 * 100)
    assert mask["reach_wall_x_baseline"] == pytest.approx((100 + 50 / 60 * 100) / 300)
    # normalised time = images / side-by-side img/s: DiT 300 s; MaskDiT crosses between 80 s and 160 s
    assert dit["reach_norm"] == pytest.approx(300.0)
    assert mask["reach_norm"] == pytest.approx(80 + 50 / 60 * 80)
    assert deferred["reach_wall"] is None and deferred["final_fd"] == 90.0
    assert rows["mdtv2"]["status"].startswith("not run")


def test_markdown_has_every_column_and_says_what_is_missing():
    md = conv.markdown(_study())
    assert "DiT's final FD-FMNIST 50.00" in md
    assert "not reached" in md and "not run: train_mdt.py" in md
    assert "| maskdit | edm / EDMDPMSolverMultistepScheduler |" in md
    assert "0.61x" in md  # MaskDiT: 183 s of DiT's 300 s
    assert "Normalised time = images seen / trainer img/s of one side-by-side call: t.json" in md
    assert "| eval_inference_steps | 16 |" in md and "| train_batch_size | 256 |" in md
    no_dit = {"runs": {k: v for k, v in _study()["runs"].items() if k != "dit"}}
    assert "No DiT row yet" in conv.markdown(no_dit)


def test_markdown_flags_mismatched_settings_and_classifiers():
    data = _study()
    data["runs"]["maskdit"]["settings"] = dict(data["runs"]["maskdit"]["settings"], learning_rate=1.0)
    data["runs"]["dit"]["classifier_sha256"] = "a"
    data["runs"]["maskdit"]["classifier_sha256"] = "b"
    md = conv.markdown(data)
    assert "shared settings differ from the table's: maskdit" in md
    assert "different FD classifiers" in md


def test_merge_keeps_other_contenders_and_replaces_its_own(tmp_path):
    path = tmp_path / "convergence.json"
    conv._write_json(path, _study())
    data = conv.load_study([None, tmp_path / "missing.json", path])
    new = _run("maskdit", [(60, 1, 5.0, 1.0)])
    conv.merge_run(data, new)
    assert set(data["runs"]) == {"dit", "maskdit", "deferred_maskdit", "mdtv2"}
    assert data["runs"]["maskdit"]["evals"][0]["fd"] == 5.0
    assert data["runs"]["dit"]["evals"][-1]["fd"] == 50.0
    assert conv.load_study([tmp_path / "none.json"])["runs"] == {}


def test_report_only_writes_table_and_plots(tmp_path):
    pytest.importorskip("matplotlib")
    conv._write_json(tmp_path / "convergence.json", _study())
    conv.main(["--report_only", "--out", str(tmp_path)])
    assert (tmp_path / "fd_vs_time.png").stat().st_size > 0 and (tmp_path / "fd_vs_images.png").stat().st_size > 0
    assert "Equal wall-clock study" in (tmp_path / "convergence.md").read_text()


def _shared(flags, contender):
    """The flags every contender shares: the list minus the contender's own flags, output dir and model config."""
    own = len(contender.flags)
    shared = flags[: len(flags) - own]
    out = []
    skip = False
    for i, f in enumerate(shared):
        if skip:
            skip = False
            continue
        if f in ("--output_dir", "--model_config", "--objective", "--validation_scheduler", "--max_train_steps",
                 "--unmasked_finetune_steps"):
            skip = True
            continue
        out.append(f)
    return out


def test_every_contender_gets_the_same_shared_flags(tmp_path):
    args = conv.parse_args(["--fashion_mnist_dir", "/data/fm"])
    flags = {n: conv.trainer_flags(c, args, tmp_path / n, 10_000, 0) for n, c in conv.CONTENDERS.items()}
    ref = _shared(flags["dit"], conv.CONTENDERS["dit"])
    for name, f in flags.items():
        assert _shared(f, conv.CONTENDERS[name]) == ref, name
    for key, value in (("--resolution", "32"), ("--train_batch_size", "256"), ("--eval_num_samples", "5000"),
                       ("--validation_guidance_scale", "1.0"), ("--eval_every_minutes", "1.0"),
                       ("--max_train_time_minutes", "5.0"), ("--class_dropout_prob", "0.1"), ("--ema_decay", "0.999")):
        assert conv.flag_value(flags["dit"], key) == value, key
    assert "--torch_compile" in flags["dit"] and conv.flag_value(flags["dit"], "--mixed_precision") == "bf16"
    assert conv.flag_value(flags["mdtv2_ddpm"], "--objective") == "epsilon"
    assert conv.flag_value(flags["mdtv2_ddpm"], "--validation_scheduler") == conv.DDPM_SAMPLER
    assert conv.flag_value(flags["deferred_maskdit"], "--edm_sigma_data") == "0.5"
    assert conv.flag_value(flags["deferred_maskdit"], "--model_config") == "TINY/2"
    assert conv.flag_value(flags["maskdit"], "--model_config") == "B/2"


def test_study_flags_parse_in_the_trainer(tmp_path):
    """The trainer's own parser accepts every runnable contender's command line (usage errors surface here, not
    on the device)."""
    training = pytest.importorskip("diffusers_masked.training")
    import importlib
    import re

    args = conv.parse_args([])
    for name, c in conv.CONTENDERS.items():
        if name == "mdtv2" and conv.unsupported_reason(c):
            continue
        source = (conv.ROOT / c.script).read_text()
        module, cls = re.search(r"from (diffusers_masked\.training\.\w+) import (\w+Recipe)", source).groups()
        recipe = getattr(importlib.import_module(module), cls)()
        # A usage error exits (SystemExit); what the parsed object looks like is the trainer's business.
        assert training.parse_args(recipe, conv.trainer_flags(c, args, tmp_path / name, 10_000, 0)) is not None


def test_maskdit_step_plan_uses_the_expected_img_s():
    args = conv.parse_args(["--expected_img_s", "maskdit=2560"])
    plan = conv.plan_steps(conv.CONTENDERS["maskdit"], args, 0.1, 5.0)
    rel = conv.maskdit_unmasked_cost({"num_layers": 12, "hidden_size": 768, "num_decoder_layers": 8,
                                      "decoder_hidden_size": 512}, 0.5)
    assert rel == pytest.approx(1.63, abs=0.01)
    seconds = 300 - conv.COMPILE_ALLOWANCE_S - conv.UNMASKED_RECOMPILE_S
    assert plan["max_train_steps"] == int(seconds * 2560 / 256 / (0.9 + 0.1 * rel))
    assert plan["unmasked_steps"] == round(0.1 * plan["max_train_steps"])
    none = conv.plan_steps(conv.CONTENDERS["maskdit"], conv.parse_args([]), 0.1, 5.0)
    assert none["unmasked_steps"] == 0 and "NOT applied" in none["note"]
    assert conv.plan_steps(conv.CONTENDERS["dit"], args, 0.0, 5.0)["max_train_steps"] == 100_000_000


def test_parse_variant():
    assert conv.parse_variant("base") == ("base", {}, [], None)
    label, ov, flags, share = conv.parse_variant("x:num_decoder_layers=4,--mask_ratio=0.25,unmasked_share=0.1,"
                                                  "--mask_ratio_range=0.2/0.4")
    assert (label, ov, share) == ("x", {"num_decoder_layers": 4}, 0.1)
    assert flags == ["--mask_ratio", "0.25", "--mask_ratio_range", "0.2", "0.4"]


def test_estimate_counts_evaluations_and_flags_an_overrun():
    args = conv.parse_args([])
    est = conv.estimate_call(conv.CONTENDERS["dit"], args, gflop=40.0, eval_tflops=100.0)
    eval_s = 5000 * 16 * 40e9 / 100e12 + conv.EVAL_FIXED_S
    assert est["evals"] == 5 and est["eval_s"] == pytest.approx(eval_s)
    assert est["total_s"] == pytest.approx(conv.ASSUMED_SETUP_S + 300 + 5 * eval_s + conv.ASSUMED_FINISH_S)
    slow = conv.estimate_call(conv.CONTENDERS["dit"], conv.parse_args(["--guidance_scale", "1.5"]), 40.0, 10.0)
    assert not slow["fits"]


def test_measured_eval_rate_from_merged_rows():
    data = _study()
    data["runs"]["dit"].update(forward_gflop_per_img=40.0, eval_seconds=[16.0 + conv.EVAL_FIXED_S])
    # 5000 samples x 16 steps x 40 GFLOP in 16 s = 200 TFLOP/s
    assert conv.measured_eval_tflops(data) == pytest.approx(200.0)
    assert conv.measured_eval_tflops({"runs": {}}) is None


def _tiny_classifier_cache(cache):
    """A random tiny classifier where the evaluation looks for the default one (no minute of training)."""
    import torch

    from diffusers_masked.evaluation import FashionMNISTClassifier
    from diffusers_masked.evaluation.classifier import default_classifier_path, save_classifier

    torch.manual_seed(0)
    save_classifier(FashionMNISTClassifier(channels=(4, 8), hidden_size=16).eval(), {"test_accuracy": 0.1},
                    default_classifier_path(cache))


def test_quick_study_of_one_contender_merges_and_reports(tmp_path):
    fmnist = os.environ.get("FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist")
    if not os.path.exists(os.path.join(fmnist, "train-images-idx3-ubyte.gz")):
        pytest.skip("Fashion-MNIST not installed")
    cache = tmp_path / "cache"
    _tiny_classifier_cache(cache)
    out = tmp_path / "out"
    conv._write_json(out / "convergence.json", {"runs": {"dit": _run("dit", [(1, 8, 9.0, 0.1)])}})
    env = dict(os.environ, DIFFUSERS_MASKED_CACHE=str(cache))
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "convergence.py"), "--quick", "--models",
                           "maskdit", "--expected_img_s", "maskdit=400", "--out", str(out), "--work_dir",
                           str(tmp_path / "work")], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads((out / "convergence.json").read_text())
    assert set(data["runs"]) == {"dit", "maskdit"}  # the earlier row is kept
    run = data["runs"]["maskdit"]
    assert run["status"] == "ok", run.get("tail")
    assert len(run["evals"]) >= 1 and all(e["fd"] is not None for e in run["evals"])
    assert run["steady_img_s"] and run["steps_run"] >= run["train_results"]["global_step"]
    assert conv.flag_value(run["argv"], "--max_train_time_minutes") == "0.15"
    # the unmasked share became steps: 10% of the planned run, from the given img/s
    plan = run["steps_plan"]
    assert plan["unmasked_steps"] == round(0.1 * plan["max_train_steps"]) > 0
    assert conv.flag_value(run["argv"], "--unmasked_finetune_steps") == str(plan["unmasked_steps"])
    assert (out / "fd_vs_time.png").exists() and "| MaskDiT (mask 0.5) |" in (out / "convergence.md").read_text()
