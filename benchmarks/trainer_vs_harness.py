#!/usr/bin/env python
"""Trainer overhead (issue 23, part 2): each study contender's img/s in the trainer against the raw training step of
the benchmark harness (`train_throughput.py`), same model, batch, precision and compilation, in ONE process call.

Per contender (the study's settings, `convergence.py`, at ``--batch_size``, compiled, bf16, 32x32 Fashion-MNIST):

1. the trainer: ``train_examples/train_<model>.py`` with the study's flags for ``--steps`` optimizer steps, with
   sample grids, evaluation and intermediate checkpoints off. It runs in a child process under a probe that only
   registers torch's global optimizer step post-hook (no trainer internals): the hook timestamps every optimizer
   step, with a CUDA synchronisation at the two ends of the window ``--warmup_steps`` .. ``--steps``, so the trainer
   img/s is (steps in the window x batch) / (seconds between the two synchronised stamps): steady state, after
   compilation and (MDTv2) the recompilations of its mask-ratio shapes. The trainer's own logged ``img_per_s``
   windows (tensorboard) are kept as a cross-check.
2. the harness: `train_throughput.measure_train_step` on the transformer config that trainer run saved (so the
   architecture is identical), random inputs of the same shape and 10 classes, the same loss function the recipe
   trains with, fused AdamW, bf16 as accelerate applies it for the trainer (autocast around the model's forward),
   ``torch.compile`` with the trainer's arguments (mode default, dynamic shapes left to dynamo): the same compiled
   graph, so inductor's cache makes this compilation short.

Prints and writes a markdown table (model, harness img/s, trainer img/s, trainer / harness, target >= 0.90) and
merges the rows into ``OUT/trainer_vs_harness.json`` by (model, batch), so calls for other models or batches add up.
``--profile MODEL`` adds a torch.profiler run of that model's trainer (a few steps after the warm-up) with a
CPU-side breakdown (EMA update, data loading, host syncs, logging, LR scheduler, gradient clipping, ...).

    python benchmarks/trainer_vs_harness.py --out OUT --batch_size 128                 # GPU: every contender
    python benchmarks/trainer_vs_harness.py --out OUT --models maskdit --profile maskdit
    python benchmarks/trainer_vs_harness.py --quick --out /tmp/tvh                     # CPU smoke test, tiny models
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Deque, Dict, List, Optional, Sequence, Tuple

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

#: Target of issue 23 part 2: the trainer within 10% of the harness.
TARGET_RATIO = 0.90


# ----------------------------------------------------------------------------------------------------------------
# The probe: runs a train_examples script in this (child) process with an optimizer step hook
# ----------------------------------------------------------------------------------------------------------------
def _write_json(path: Path, data: Any) -> None:
    """Atomic JSON write: a reader (or a call cut by its time limit) never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    os.replace(tmp, path)


def probe_main(argv: List[str]) -> None:
    """``trainer_vs_harness.py _probe --out FILE [...] -- SCRIPT FLAGS...``: run SCRIPT as ``__main__`` and write the
    wall-clock time (``time.time()``, comparable across processes) after each step of the first optimizer that
    steps (the trainer's; the FD classifier, trained lazily at the first evaluation, steps later)."""
    p = argparse.ArgumentParser(prog="trainer_vs_harness.py _probe")
    p.add_argument("--out", required=True)
    p.add_argument("--sync_steps", type=int, nargs="*", default=[],
                   help="Optimizer steps after which CUDA is synchronised before the stamp (window ends).")
    p.add_argument("--profile_out", default=None)
    p.add_argument("--profile_wait", type=int, default=30)
    p.add_argument("--profile_active", type=int, default=5)
    p.add_argument("--profile_trace", action="store_true")
    p.add_argument("--profile_python", action="store_true")
    p.add_argument("script")
    p.add_argument("rest", nargs=argparse.REMAINDER)
    ns = p.parse_args(argv)
    rest = ns.rest[1:] if ns.rest[:1] == ["--"] else ns.rest

    import runpy

    import torch
    from torch.optim.optimizer import register_optimizer_step_post_hook

    out = Path(ns.out)
    t_start = time.time()
    stamps: List[float] = []
    main_opt: List[Any] = []
    sync = set(ns.sync_steps)
    prof = None
    if ns.profile_out:
        from torch.profiler import ProfilerActivity, profile, schedule

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
        # with_stack turns on the Python tracer: the trainer's Python-side work (EMA, LR scheduler, logging, data
        # loading) appears as python_function events that the breakdown sums by file and function name. It slows
        # the host several-fold, so a host-bound step looks far more host-bound than it is: off by default.
        prof = profile(activities=acts, schedule=schedule(wait=ns.profile_wait, warmup=2, active=ns.profile_active,
                                                          repeat=1),
                       on_trace_ready=lambda pr: write_profile(pr, Path(ns.profile_out), ns.profile_active, stamps,
                                                               ns.profile_trace, ns.profile_python),
                       with_stack=ns.profile_python)

    def flush() -> None:
        _write_json(out, {"t_start": t_start, "step_stamps": stamps, "sync_steps": sorted(sync),
                          "cuda": torch.cuda.is_available()})

    def hook(optimizer, args, kwargs) -> None:
        if not main_opt:
            main_opt.append(optimizer)
        if optimizer is not main_opt[0]:
            return
        n = len(stamps) + 1
        if n in sync and torch.cuda.is_available():
            torch.cuda.synchronize()
        stamps.append(time.time())
        if prof is not None:
            prof.step()
        if n % 200 == 0:
            flush()

    register_optimizer_step_post_hook(hook)
    sys.argv = [ns.script] + rest
    if prof is not None:
        prof.start()
    try:
        runpy.run_path(ns.script, run_name="__main__")
    finally:
        if prof is not None:
            try:
                prof.stop()
            except Exception:  # already finished its schedule
                pass
        flush()


#: CPU-side categories of the profile breakdown: (label, regex over event names). Python function events are named
#: "path(line): function"; aten ops and record_function ranges by their own names.
PROFILE_CATEGORIES: Tuple[Tuple[str, str], ...] = (
    ("data loading (DataLoader next)", r"^enumerate\(DataLoader\)|dataloader\.py\(\d+\): __next__$"),
    ("batch to device (clean_batch)", r"\): clean_batch$"),
    ("EMA update", r"ema\.py\(\d+\): step$|_foreach_lerp"),
    ("optimizer step", r"^Optimizer\.step#"),
    ("zero_grad", r"^Optimizer\.zero_grad#"),
    ("LR scheduler", r"lr_scheduler\.py\(\d+\): step$"),
    ("gradient clipping", r"clip_grad_norm|_foreach_norm"),
    ("logging (accelerate log / trackers)", r"accelerator\.py\(\d+\): log$|tracking\.py\(\d+\): log$"),
    ("progress bar (tqdm)", r"tqdm/std\.py\(\d+\): (update|set_postfix|refresh)$"),
    ("per-step callbacks (on_step_end)", r"\): on_step_end$"),
    ("host syncs (item / synchronize)", r"^aten::(item|_local_scalar_dense)$|^cuda(Stream|Device|Event)Synchronize$"),
    ("host-to-device copies", r"^cudaMemcpyAsync$|^aten::_to_copy$"),
    ("compiled graphs (launch side)", r"Torch-Compiled Region|^CompiledFunction$"),
    ("backward (autograd engine)", r"^autograd::engine::evaluate_function|run_backward"),
    ("random draws (noise, masks, labels)", r"^aten::(randn|rand|randint|normal_|uniform_|random_|argsort|sort)$"),
)


def _outermost_total_us(events: Sequence[Any], pattern: str) -> Tuple[float, int]:
    """Sum of the CPU durations (us) of the events whose name matches ``pattern``, counting only outermost ones
    (a matching event inside another matching one is not counted twice)."""
    import re

    rx = re.compile(pattern)
    spans = sorted((e.time_range.start, e.time_range.end) for e in events
                   if e.device_type.name == "CPU" and rx.search(e.name))
    total, count, end = 0.0, 0, -1.0
    for s, e in spans:
        if s >= end:
            total += e - s
            count += 1
            end = e
        elif e > end:  # overlapping (another thread): count the part not yet covered
            total += e - end
            end = e
    return total, count


def write_profile(prof, path: Path, active: int, stamps: Sequence[float], trace: bool = False,
                  python_tracer: bool = False) -> None:
    """Top ops by self CPU and self device time, the CPU-side breakdown by category, and the step times; with
    ``trace`` also the Chrome trace (gzip; tens of MB with the Python tracer)."""
    events = prof.events()
    tracer = ("Python tracer on, so CPU times are inflated; compare categories with each other." if python_tracer
              else "Python tracer off (--profile_python turns it on): CPU times are close to an unprofiled step's, "
                   "categories that are Python functions read 0.")
    lines = [f"torch.profiler over {active} trainer steps (after the warm-up; step boundary = the optimizer step "
             f"post-hook). {tracer}", ""]
    steps_us = _outermost_total_us(events, r"^ProfilerStep")[0]
    lines.append(f"profiled steps: {steps_us / 1e3 / max(active, 1):.2f} ms wall per step (CPU span of ProfilerStep)")
    if len(stamps) > 12:
        d = [b - a for a, b in zip(stamps[2:-1], stamps[3:])]
        lines.append(f"unprofiled steps before the profile: median {statistics.median(d) * 1e3:.2f} ms per step "
                     f"(optimizer-step timestamps)")
    averages = prof.key_averages()
    # ProfilerStep's own "device time" is the sum of its kernels again: leave it out.
    busy = sum(getattr(a, "self_device_time_total", 0.0) for a in averages if not a.key.startswith("ProfilerStep"))
    has_cuda = busy > 0
    if has_cuda:
        # The table footer's "Self CUDA time total" (it may count a few kernels twice: an upper bound on busy time).
        lines.append(f"device (kernel) time: {busy / 1e3 / max(active, 1):.2f} ms per step; GPU idle share of the "
                     f"profiled step: at least {max(0.0, 1 - busy / max(steps_us, 1e-9)):.1%}")
    lines += ["", "CPU-side breakdown per step (outermost events of each category; categories can nest, e.g. "
              "host-to-device copies inside clean_batch):", "", "| category | ms per step | calls per step |",
              "|---|---|---|"]
    for label, pattern in PROFILE_CATEGORIES:
        us, n = _outermost_total_us(events, pattern)
        lines.append(f"| {label} | {us / 1e3 / max(active, 1):.3f} | {n / max(active, 1):.1f} |")
    table_kw = dict(row_limit=30, max_name_column_width=90)
    lines += ["", "Top ops by self CPU time:", averages.table(sort_by="self_cpu_time_total", **table_kw)]
    if has_cuda:
        lines += ["", "Top ops by self device time:", averages.table(sort_by="self_device_time_total", **table_kw)]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    if trace:
        try:
            prof.export_chrome_trace(str(path.with_suffix(".trace.json.gz")))
        except Exception as err:  # the text table is what matters
            print(f"chrome trace not written: {err}", flush=True)


# ----------------------------------------------------------------------------------------------------------------
# Running a probed trainer from the parent
# ----------------------------------------------------------------------------------------------------------------
_CHILDREN: List[subprocess.Popen] = []


def _terminate_children(signum=None, frame=None) -> None:
    """On SIGTERM (a `timeout` around this script): stop the trainer child too, then exit."""
    for proc in _CHILDREN:
        if proc.poll() is None:
            proc.terminate()
    if signum is not None:
        raise SystemExit(128 + signum)


def install_signal_handlers() -> None:
    signal.signal(signal.SIGTERM, _terminate_children)


def _is_progress_line(line: str) -> bool:
    # tqdm refreshes ("train:  12%|...| 1234/10000 [..., 5.6it/s, ...]") flood the device log.
    return ("it/s" in line or "s/it" in line) and "|" in line


def run_probed_trainer(script: str, flags: Sequence[str], probe_path: Path, log_path: Path,
                       sync_steps: Sequence[int] = (), profile_out: Optional[Path] = None, profile_wait: int = 30,
                       profile_active: int = 5, profile_trace: bool = False, profile_python: bool = False,
                       poll: Optional[Callable[[], None]] = None, poll_s: float = 0.5,
                       echo: bool = True, timeout_s: Optional[float] = None) -> Dict[str, Any]:
    """Run ``script flags`` in a child process under the probe; its output goes to ``log_path`` (tqdm refreshes
    dropped) and, with ``echo``, to stdout. ``poll()`` runs every ``poll_s`` seconds while it trains.

    Returns ``{"rc", "wall_s", "t_launch", "t_end", "tail"}`` (``tail``: the last 60 log lines)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "_probe", "--out", str(probe_path)]
    if sync_steps:
        cmd += ["--sync_steps", *map(str, sync_steps)]
    if profile_out is not None:
        cmd += ["--profile_out", str(profile_out), "--profile_wait", str(profile_wait),
                "--profile_active", str(profile_active)] + (["--profile_trace"] if profile_trace else []) \
            + (["--profile_python"] if profile_python else [])
    cmd += ["--", str(script), *flags]
    env = dict(os.environ, PYTHONUNBUFFERED="1", TQDM_MININTERVAL="30")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    tail: Deque[str] = collections.deque(maxlen=60)
    t_launch = time.time()
    proc = subprocess.Popen(cmd, cwd=str(ROOT), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            bufsize=1)
    _CHILDREN.append(proc)

    def reader() -> None:
        with open(log_path, "w") as log:
            for raw in proc.stdout:
                for line in raw.replace("\r", "\n").splitlines():
                    if not line.strip() or _is_progress_line(line):
                        continue
                    log.write(line + "\n")
                    tail.append(line)
                    if echo:
                        print(line, flush=True)

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    try:
        while proc.poll() is None:
            if poll is not None:
                poll()
            if timeout_s is not None and time.time() - t_launch > timeout_s:
                proc.terminate()
            time.sleep(poll_s)
    finally:
        if proc.poll() is None:
            proc.terminate()
        proc.wait()
        thread.join(timeout=10)
        _CHILDREN.remove(proc)
    if poll is not None:
        poll()
    t_end = time.time()
    return {"rc": proc.returncode, "wall_s": t_end - t_launch, "t_launch": t_launch, "t_end": t_end,
            "tail": list(tail)}


def read_probe(path: Path) -> Dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {"step_stamps": [], "sync_steps": []}


def window_img_s(stamps: Sequence[float], batch: int, start: int, end: int) -> Optional[float]:
    """img/s between the stamps after optimizer steps ``start`` and ``end`` (1-based)."""
    if start < 1 or end > len(stamps) or end <= start:
        return None
    return (end - start) * batch / max(stamps[end - 1] - stamps[start - 1], 1e-9)


def steady_img_s(stamps: Sequence[float], batch: int, window: int = 25, skip: int = 25) -> Optional[float]:
    """Median img/s of consecutive ``window``-step windows after the first ``skip`` steps: steady state, robust to
    the windows that hold an evaluation (excluded from the trainer's clock but not from these stamps) or a
    recompilation."""
    if len(stamps) < 4 * (window + skip):  # a short run (CPU smoke test): smaller windows
        window = skip = max(1, len(stamps) // 8)
    rates = []
    i = max(skip, 1)
    while i + window <= len(stamps):
        rates.append(window * batch / max(stamps[i + window - 1] - stamps[i - 1], 1e-9))
        i += window
    return statistics.median(rates) if rates else None


# ----------------------------------------------------------------------------------------------------------------
# One contender: trainer, then harness
# ----------------------------------------------------------------------------------------------------------------
def harness_row(contender, config_path: Path, batch: int, quick: bool) -> Dict[str, Any]:
    """The harness step on the transformer config the trainer run saved (`train_throughput.measure_train_step`)."""
    import importlib

    import torch

    import train_throughput as tt

    module, cls_name = contender.model_cls.split(":")
    model_cls = getattr(importlib.import_module(module), cls_name)
    config = {k: v for k, v in json.loads(config_path.read_text()).items() if not k.startswith("_")}
    device = torch.device("cpu" if quick or not torch.cuda.is_available() else "cuda")
    torch.manual_seed(0)
    model = model_cls.from_config(config).to(device)
    size = config["sample_size"]
    gen = torch.Generator(device=device).manual_seed(batch)
    x0 = torch.randn(batch, config["in_channels"], size, size, device=device, generator=gen)
    labels = torch.randint(0, config.get("num_classes") or 10, (batch,), device=device, generator=gen)
    loss_fn = tt.make_loss_fn(contender.harness_loss, contender.harness_mdt_mask_ratio,
                              split_backward=contender.harness_split_backward)
    # bf16 exactly as the trainer gets it: accelerate's autocast wrapper around the model's forward (the loss
    # outside the model stays float32). The compiled graph is then the trainer run's, which inductor's on-disk
    # cache already holds: the harness compiles in seconds instead of another minute.
    from accelerate import Accelerator

    model = Accelerator(mixed_precision="no" if quick else "bf16", cpu=device.type == "cpu").prepare_model(model)
    # The trainer's torch.compile call: mode default, dynamic left to dynamo (None), inductor.
    compile_kw = None if quick else {}
    try:
        res = tt.measure_train_step(model, loss_fn, x0, labels, device, compile_kw=compile_kw,
                                    autocast_bf16=False, warmup=1 if quick else 3, iters=2 if quick else 10,
                                    repeats=1 if quick else 3)
        return dict(res, status="ok", compiled=compile_kw is not None)
    except torch.OutOfMemoryError:
        return {"status": "OOM"}
    finally:
        del model
        if not quick:
            torch._dynamo.reset()
            torch.cuda.empty_cache()  # before the next trainer child needs the memory


def trainer_flags_for_overhead(contender, args, out_dir: Path) -> List[str]:
    """The study's flags for ``contender`` at ``--batch_size`` for ``--steps`` steps, nothing else running."""
    import convergence

    argv = ["--train_batch_size", str(args.batch_size)] + (["--quick"] if args.quick else [])
    if args.fashion_mnist_dir:
        argv += ["--fashion_mnist_dir", args.fashion_mnist_dir]
    study = convergence.parse_args(argv)
    convergence.apply_quick(study)
    flags = convergence.trainer_flags(contender, study, out_dir, max_train_steps=args.steps, unmasked_steps=0,
                                      evaluate=False)
    if args.time_budget_check:
        # The study's per-step time-budget check (never reached here) is part of what the study's trainer does.
        flags += ["--max_train_time_minutes", "100000"]
    return flags + ["--logging_steps", str(args.logging_steps)]


def bench_contender(name: str, args, work: Path) -> Dict[str, Any]:
    import convergence

    contender = convergence.CONTENDERS[name]
    row: Dict[str, Any] = {"model": name, "label": contender.label, "batch_size": args.batch_size,
                           "steps": args.steps, "warmup_steps": args.warmup_steps}
    reason = convergence.unsupported_reason(contender)
    if reason:
        return dict(row, status=f"not run: {reason}")
    out_dir = work / f"{name}_b{args.batch_size}"
    if out_dir.exists():
        import shutil

        shutil.rmtree(out_dir)
    flags = trainer_flags_for_overhead(contender, args, out_dir)
    probe = work / f"{name}_b{args.batch_size}_probe.json"
    t0 = time.time()
    res = run_probed_trainer(contender.script, flags, probe, work / f"{name}_b{args.batch_size}_trainer.log",
                             sync_steps=(args.warmup_steps, args.steps), echo=not args.quiet)
    row.update(trainer_wall_s=res["wall_s"], trainer_rc=res["rc"], trainer_flags=flags)
    stamps = read_probe(probe).get("step_stamps", [])
    if res["rc"] != 0 or len(stamps) < args.steps:
        return dict(row, status=f"trainer failed (rc {res['rc']})", tail=res["tail"][-15:])
    row["trainer_img_per_s"] = window_img_s(stamps, args.batch_size, args.warmup_steps, args.steps)
    deltas = [b - a for a, b in zip(stamps[args.warmup_steps - 1:], stamps[args.warmup_steps:])]
    row["trainer_step_ms_median"] = statistics.median(deltas) * 1e3
    row["trainer_step_ms_p90"] = sorted(deltas)[int(0.9 * (len(deltas) - 1))] * 1e3
    row["trainer_first_steps_s"] = stamps[min(args.warmup_steps, len(stamps)) - 1] - res["t_launch"]
    try:
        results = json.loads((out_dir / "train_results.json").read_text())
        row["trainer_run_img_per_s"] = results.get("images_per_s")  # over the whole run, compilation included
        row["num_parameters"] = results.get("num_parameters")
    except (OSError, ValueError):
        pass
    row["trainer_logged_img_per_s"] = logged_windows(out_dir, args.warmup_steps)
    if not args.harness:
        return dict(row, status="ok", harness=None, trainer_over_harness=None, wall_s=time.time() - t0)
    config = out_dir / "transformer" / "config.json"
    if not config.exists():
        return dict(row, status="trainer wrote no transformer config")
    row["harness"] = harness_row(contender, config, args.batch_size, args.quick)
    h = row["harness"].get("img_per_s")
    t = row["trainer_img_per_s"]
    row["trainer_over_harness"] = t / h if t and h else None
    row["status"] = "ok"
    row["wall_s"] = time.time() - t0
    return row


def logged_windows(out_dir: Path, after_step: int) -> Optional[Dict[str, Any]]:
    """The trainer's own ``img_per_s`` log (tensorboard) after ``after_step``: median and count of the windows."""
    try:
        from tb_curves import read_curves

        curve = read_curves(str(out_dir), keys=("img_per_s",)).get("img_per_s", {})
    except Exception:  # tensorboard missing or a log format of another trainer version
        return None
    vals = [v for s, v in sorted(curve.items()) if s > after_step]
    return {"median": statistics.median(vals), "windows": len(vals)} if vals else None


# ----------------------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------------------
def _f(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def markdown(data: Dict[str, Any]) -> str:
    env = data.get("env", {})
    lines = [f"Trainer vs harness, {env.get('device', '?')}; torch {env.get('torch', '?')}, diffusers "
             f"{env.get('diffusers', '?')}. Trainer img/s: optimizer-step stamps between the synchronised steps "
             "WARMUP and STEPS of a probed `train_examples` run with the study's flags (sample grids, evaluation, "
             "checkpoints off); harness: `train_throughput.measure_train_step` on the config that run saved, "
             "same batch, bf16 through accelerate's autocast wrapper, `torch.compile` as the trainer calls it. "
             "Target trainer / harness >= "
             f"{TARGET_RATIO:.2f}.", "",
             "| model | batch | harness img/s | trainer img/s | trainer / harness | target met | trainer step ms "
             "(median / p90) | trainer logged img/s (median window) | trainer run img/s (incl. compile) | "
             "trainer launch to end of warm-up s | harness first step s | harness peak GiB | steps (warm-up) | call |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    import convergence

    order = list(convergence.CONTENDERS)
    rows = data.get("rows", {})
    for key in sorted(rows, key=lambda k: (rows[k].get("batch_size", 0), order.index(rows[k]["model"])
                                           if rows[k].get("model") in order else 99, k)):
        r = rows[key]
        h = r.get("harness") or {}
        ratio = r.get("trainer_over_harness")
        met = "-" if ratio is None else ("yes" if ratio >= TARGET_RATIO else "**no**")
        if r.get("status") != "ok":
            lines.append(f"| {r['model']} | {r['batch_size']} | {r.get('status')} | | | | | | | | | | | "
                         f"{r.get('call', '')} |")
            continue
        logged = (r.get("trainer_logged_img_per_s") or {}).get("median")
        lines.append(
            f"| {r['model']} | {r['batch_size']} | {_f(h.get('img_per_s'), '.1f')} | "
            f"{_f(r.get('trainer_img_per_s'), '.1f')} | {_f(ratio, '.3f')} | {met} | "
            f"{_f(r.get('trainer_step_ms_median'), '.1f')} / {_f(r.get('trainer_step_ms_p90'), '.1f')} | "
            f"{_f(logged, '.1f')} | {_f(r.get('trainer_run_img_per_s'), '.1f')} | "
            f"{_f(r.get('trainer_first_steps_s'), '.0f')} | {_f(h.get('first_step_s'), '.0f')} | "
            f"{_f(h.get('peak_mem_gib'), '.1f')} | {r['steps']} ({r['warmup_steps']}) | {r.get('call', '')} |")
    notes = data.get("notes") or []
    if notes:
        lines += ["", "Notes:", ""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def load_merged(paths: Sequence[Path]) -> Dict[str, Any]:
    """Rows of earlier calls (the first existing file of ``paths``), to add this call's rows to."""
    for path in paths:
        if path and path.exists():
            try:
                return json.loads(path.read_text())
            except ValueError:
                print(f"warning: {path} is not valid JSON; starting a new table", flush=True)
    return {"rows": {}, "notes": []}


# ----------------------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------------------
def quiet_cpu_threads() -> None:
    """CPU smoke tests run on shared cores, where spinning OpenMP threads slow each other down many times over:
    one thread, here and in the trainer children (which inherit the environment)."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


def build_parser() -> argparse.ArgumentParser:
    import convergence

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="benchmarks/results_h200/trainer_overhead")
    p.add_argument("--merge_from", default=None,
                   help="trainer_vs_harness.json of earlier calls to add to (default: OUT's own, if any).")
    p.add_argument("--models", default=",".join(convergence.DEFAULT_OVERHEAD_MODELS),
                   help="Comma-separated contenders of the study: " + ", ".join(convergence.CONTENDERS))
    p.add_argument("--batch_size", type=int, default=128, help="Per-GPU batch of both measurements.")
    p.add_argument("--steps", type=int, default=120, help="Optimizer steps of each trainer run.")
    p.add_argument("--warmup_steps", type=int, default=30,
                   help="Trainer steps before the timed window (compilation, MDTv2's mask-ratio shapes).")
    p.add_argument("--logging_steps", type=int, default=10, help="The trainer's --logging_steps (its default).")
    p.add_argument("--time_budget_check", action=argparse.BooleanOptionalAction, default=True,
                   help="Pass --max_train_time_minutes (never reached) as the study does: the trainer then checks "
                        "its clock every step.")
    p.add_argument("--harness", action=argparse.BooleanOptionalAction, default=True,
                   help="--no-harness times the trainers only (the study's side-by-side call for normalised time).")
    p.add_argument("--fashion_mnist_dir", default=None, help="Folder of the Fashion-MNIST idx files.")
    p.add_argument("--work_dir", default=None, help="Trainer outputs (default /tmp/trainer_vs_harness).")
    p.add_argument("--profile", default=None, metavar="MODEL",
                   help="Also profile MODEL's trainer (torch.profiler, a few steps after --warmup_steps) into "
                        "OUT/profile_MODEL_bBATCH.txt.")
    p.add_argument("--profile_active", type=int, default=5, help="Profiled trainer steps.")
    p.add_argument("--profile_trace", action="store_true",
                   help="Also write the profile's Chrome trace (OUT/profile_MODEL_bBATCH.trace.json.gz).")
    p.add_argument("--profile_python", action="store_true",
                   help="Profile with the Python tracer: names the trainer's Python-side work (EMA, scheduler, data "
                        "loading) but slows the host several-fold, so the step's timing is not the real one.")
    p.add_argument("--time_budget_s", type=float, default=540.0,
                   help="Start no further model once this many seconds have passed (the table is still written).")
    p.add_argument("--per_model_s", type=float, default=130.0,
                   help="Expected seconds per model (trainer + harness), used against --time_budget_s.")
    p.add_argument("--call", default=None, help="Label of this call in the table (e.g. 'h200 call 1').")
    p.add_argument("--quiet", action="store_true", help="Do not echo the trainer's log lines.")
    p.add_argument("--quick", action="store_true",
                   help="CPU smoke test: tiny models, eager (no compile), fp32, a few steps. Not a timing.")
    return p


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_probe"]:
        probe_main(argv[1:])
        return {}
    args = build_parser().parse_args(argv)
    import convergence

    if args.quick:
        args.steps, args.warmup_steps, args.logging_steps = 12, 4, 2
        args.batch_size = min(args.batch_size, 8)
        quiet_cpu_threads()
    install_signal_handlers()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work_dir or "/tmp/trainer_vs_harness")
    work.mkdir(parents=True, exist_ok=True)
    data = load_merged([Path(args.merge_from)] if args.merge_from else [out / "trainer_vs_harness.json"])
    data["env"] = convergence.environment()
    data.setdefault("rows", {})
    notes = set(data.get("notes") or [])
    notes.add("MDTv2's harness row runs its masked branch at the fixed mean ratio 0.4 (the trainer draws one of 4 "
              "levels of U[0.3, 0.5) per batch), both with the branches back-propagated one after the other.")
    start = time.time()
    names = [m.strip() for m in args.models.split(",") if m.strip()]
    for name in names + ([args.profile] if args.profile else []):
        if name not in convergence.CONTENDERS:
            raise SystemExit(f"Unknown model {name!r}; choose from {', '.join(convergence.CONTENDERS)}.")
    # The profile first: it is what a call for it is made for, and the models' rows stop at the time budget.
    if args.profile:
        name = args.profile
        contender = convergence.CONTENDERS[name]
        prof_dir = work / f"{name}_b{args.batch_size}_profile"
        if prof_dir.exists():
            import shutil

            shutil.rmtree(prof_dir)
        steps = args.warmup_steps + 2 + args.profile_active + 3
        pargs = argparse.Namespace(**{**vars(args), "steps": steps})
        flags = trainer_flags_for_overhead(contender, pargs, prof_dir)
        path = out / f"profile_{name}_b{args.batch_size}.txt"
        print(f"=== profile {name} b{args.batch_size} -> {path}", flush=True)
        res = run_probed_trainer(contender.script, flags, work / f"{name}_profile_probe.json",
                                 work / f"{name}_profile_trainer.log", profile_out=path,
                                 profile_wait=args.warmup_steps, profile_active=args.profile_active,
                                 profile_trace=args.profile_trace, profile_python=args.profile_python,
                                 echo=not args.quiet)
        print(f"=== profile rc {res['rc']} ({res['wall_s']:.0f} s)", flush=True)
        if res["rc"] != 0:
            print("\n".join(res["tail"][-15:]), flush=True)
    for name in names:
        key = f"{name}@b{args.batch_size}"
        if time.time() - start + args.per_model_s > args.time_budget_s:
            print(f"=== {name}: skipped (time budget)", flush=True)
            data["rows"].setdefault(key, {"model": name, "batch_size": args.batch_size, "steps": args.steps,
                                          "warmup_steps": args.warmup_steps, "status": "skipped (time budget)"})
            continue
        print(f"=== {name} b{args.batch_size}", flush=True)
        t0 = time.time()
        row = bench_contender(name, args, work)
        row.update(call=args.call or "", env=data["env"], quick=args.quick)
        data["rows"][key] = row
        print(f"=== {name}: {row.get('status')} trainer {_f(row.get('trainer_img_per_s'), '.1f')} img/s, harness "
              f"{_f((row.get('harness') or {}).get('img_per_s'), '.1f')} img/s, ratio "
              f"{_f(row.get('trainer_over_harness'), '.3f')} ({time.time() - t0:.0f} s)", flush=True)
        data["notes"] = sorted(notes)
        _write_json(out / "trainer_vs_harness.json", data)
        (out / "trainer_vs_harness.md").write_text(markdown(data))
    data["notes"] = sorted(notes)
    data["elapsed_s"] = time.time() - start
    _write_json(out / "trainer_vs_harness.json", data)
    md = markdown(data)
    (out / "trainer_vs_harness.md").write_text(md)
    print("\n" + md, flush=True)
    return data


if __name__ == "__main__":
    main()
