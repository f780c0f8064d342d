#!/usr/bin/env bash
# GPU runs of issues 4, 6 and 7 on a lent machine (see benchmarks/README.md). Usage: bash benchmarks/run_gpu.sh STAGE
# Needs .wheels/ (diffusers, datasets, dill, multiprocess, importlib_metadata) and .data/fashion-mnist/ carried along.
set -uo pipefail
STAGE=${1:-call1}
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .wheels/*.whl >/dev/null 2>&1 || echo "pip install failed"
export PYTHONPATH=$PWD/src:/tmp/site
LOG=$OUT/log.txt
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch, diffusers, datasets, accelerate; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'diffusers', diffusers.__version__, 'datasets', datasets.__version__, 'accelerate', accelerate.__version__, 'gpus', torch.cuda.device_count())"
} 2>&1 | tee -a "$LOG"
FM=".data/fashion-mnist"
case "$STAGE" in
conv)
  # Issue 12: equal wall-clock convergence study (classifier cache carried in .cache_dm/), then a 1-GPU resume check.
  export DIFFUSERS_MASKED_CACHE=$PWD/.cache_dm FASHION_MNIST_DIR=$PWD/$FM
  timeout 480 python3 benchmarks/convergence.py --minutes 1.0 --eval_every_minutes 0.33 --eval_num_samples 1000 \
      --train_batch_size 128 --out "$OUT/conv" --work_dir /tmp/convruns 2>&1 | tr '\r' '\n' | grep -v "it/s\|s/it\|^$" \
      | grep -v "accelerate.checkpointing\|Saving current state" | tail -n 40 | tee -a "$LOG"
  for a in "--stop_after_steps 20" "--resume_from_checkpoint latest"; do
    python3 train_examples/train_maskdit.py --max_train_steps 40 --train_batch_size 256 --mixed_precision bf16 \
        --validation_steps 0 --checkpointing_steps 20 --output_dir /tmp/r --report_to none $a 2>&1 | tail -n 2 | tee -a "$LOG"
  done
  cat /tmp/r/train_results.json | tee -a "$LOG"
  ;;
call1)
  echo "== train_maskdit.py, 300 steps, b256, bf16 ==" | tee -a "$LOG"
  timeout 240 python3 train_examples/train_maskdit.py --max_train_steps 300 --train_batch_size 256 \
      --mixed_precision bf16 --validation_steps 0 --output_dir /tmp/fm --fashion_mnist_dir "$FM" --report_to none \
      --logging_steps 50 2>&1 | tr '\r' '\n' | grep -v "^$" | tail -n 40 | tee -a "$LOG"
  cp /tmp/fm/sample_grid.png /tmp/fm/train_results.json "$OUT"/ 2>/dev/null
  cat /tmp/fm/train_results.json | tee -a "$LOG"
  echo "== benchmark: eager, all models, XL and B, b32/128/256, graph breaks ==" | tee -a "$LOG"
  python3 benchmarks/train_throughput.py --out "$OUT/eager" --modes eager --sizes XL B \
      --batch_sizes 32 128 256 --time_budget_s 230 2>&1 | grep -v "should be kept in float32" | tee -a "$LOG"
  echo "== benchmark: compiled XL DiT and MaskDiT at b128 ==" | tee -a "$LOG"
  python3 benchmarks/train_throughput.py --out "$OUT/compile" --modes compile --no-explain --sizes XL \
      --models dit maskdit --compile_batch_sizes 128 --time_budget_s 150 2>&1 \
      | grep -v "should be kept in float32" | tee -a "$LOG"
  ;;
call2)
  B="python3 benchmarks/train_throughput.py --no-explain"
  F="should be kept in float32"
  echo "== compiled XL DeferredMaskDiT dense / MoE at b128 ==" | tee -a "$LOG"
  $B --out "$OUT/r/c_deferred" --modes compile --sizes XL --models deferred deferred_moe --compile_batch_sizes 128 \
      --time_budget_s 200 2>&1 | grep -v "$F" | tee -a "$LOG"
  echo "== compiled XL MaskDiT at b256 ==" | tee -a "$LOG"
  $B --out "$OUT/r/c_maskdit256" --modes compile --sizes XL --models maskdit --compile_batch_sizes 256 \
      2>&1 | grep -v "$F" | tee -a "$LOG"
  echo "== MDTv2 XL eager, branches back-propagated one after the other ==" | tee -a "$LOG"
  $B --out "$OUT/r/mdt_split" --modes eager --sizes XL --models mdt --batch_sizes 32 128 --mdt_split_backward \
      2>&1 | grep -v "$F" | tee -a "$LOG"
  echo "== inference + profiles ==" | tee -a "$LOG"
  $B --out "$OUT/r/more" --skip_training --inference --profile maskdit:XL:128:eager dit:XL:128:eager \
      mdt:XL:32:eager deferred:XL:128:eager 2>&1 | grep -v "$F" | tee -a "$LOG"
  tar czf "$OUT/results.tgz" -C "$OUT" r && rm -rf "$OUT/r"
  ;;
call3)
  B="python3 benchmarks/train_throughput.py --no-explain"
  F="should be kept in float32"
  echo "== profiles + inference ==" | tee -a "$LOG"
  $B --out "$OUT/r/more" --skip_training --inference --inference_repeats 2 --profile mdt:XL:32:eager \
      maskdit:XL:128:eager deferred:XL:128:eager 2>&1 | grep -v "$F" | tee -a "$LOG"
  echo "== compiled MDTv2 XL b128, split backward ==" | tee -a "$LOG"
  timeout 300 $B --out "$OUT/r/mdt_c" --modes compile --sizes XL --models mdt --compile_batch_sizes 128 \
      --mdt_split_backward 2>&1 | grep -v "$F" | tee -a "$LOG"
  tar czf "$OUT/results.tgz" -C "$OUT" r && rm -rf "$OUT/r"
  ;;
ddp)
  # MaskDiT B/2 on Fashion-MNIST pixels (28x28x1, 196 tokens), bf16, 200 steps, global batch 256:
  # 1 GPU x 256 vs 2 GPUs x 128; then 2 GPUs stopped at 100 and resumed from the checkpoint.
  COMMON="train_examples/train_maskdit.py --model_config B/2 --fashion_mnist_dir $FM --mixed_precision bf16 \
      --max_train_steps 200 --validation_steps 0 --report_to tensorboard --logging_steps 10 --checkpointing_steps 100"
  run() { local tag=$1; shift; echo "== $tag ==" | tee -a "$LOG"
    timeout 240 "$@" 2>&1 | tr '\r' '\n' | grep -E "Resumed|parameters|Error|error|Traceback|train: 100%" | tail -n 8 | tee -a "$LOG"; }
  run gpu1 accelerate launch --num_processes 1 $COMMON --train_batch_size 256 --output_dir /tmp/d1
  run gpu2 accelerate launch --multi_gpu --num_processes 2 $COMMON --train_batch_size 128 --output_dir /tmp/d2
  run gpu2_stop100 accelerate launch --multi_gpu --num_processes 2 $COMMON --train_batch_size 128 \
      --output_dir /tmp/d3 --stop_after_steps 100
  run gpu2_resume accelerate launch --multi_gpu --num_processes 2 $COMMON --train_batch_size 128 \
      --output_dir /tmp/d3 --resume_from_checkpoint latest
  python3 - "$OUT/ddp_summary.json" <<'PY' 2>&1 | tee -a "$LOG"
import glob, json, sys
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
out = {}
for tag, d in (("gpu1", "/tmp/d1"), ("gpu2", "/tmp/d2"), ("gpu2_resumed", "/tmp/d3")):
    curves = {}
    for f in sorted(glob.glob(f"{d}/logs/**/events.out.tfevents.*", recursive=True)):
        acc = EventAccumulator(f); acc.Reload()
        for key in ("loss", "img_per_s"):
            if key in acc.Tags().get("scalars", []):
                for e in acc.Scalars(key):
                    curves.setdefault(key, {})[e.step] = e.value
    res = {}
    try:
        res = json.load(open(f"{d}/train_results.json"))
    except Exception as err:
        res = {"error": str(err)}
    ips = [v for s, v in sorted(curves.get("img_per_s", {}).items()) if s > 10]
    out[tag] = {"train_results": res, "loss": dict(sorted(curves.get("loss", {}).items())),
                "img_per_s_steady": sum(ips) / len(ips) if ips else None}
g1, g2 = out["gpu1"]["img_per_s_steady"], out["gpu2"]["img_per_s_steady"]
out["scaling_efficiency"] = g2 / (2 * g1) if g1 and g2 else None
json.dump(out, open(sys.argv[1], "w"), indent=1)
for tag in ("gpu1", "gpu2", "gpu2_resumed"):
    l = out[tag]["loss"]
    print(tag, "img/s", out[tag]["img_per_s_steady"], "final", out[tag]["train_results"].get("final_loss"),
          "loss@", {k: round(v, 4) for k, v in l.items() if k % 50 == 0})
print("scaling efficiency", out["scaling_efficiency"])
PY
  cp /tmp/d2/sample_grid.png "$OUT/ddp_sample_grid.png" 2>/dev/null
  ;;
mdtfix)
  python3 benchmarks/train_throughput.py --no-explain --out "$OUT/mdtfix" --modes eager --sizes XL --models mdt \
      --batch_sizes 32 128 --mdt_split_backward --profile mdt:XL:32:eager 2>&1 | grep -v "float32" | tee -a "$LOG"
  python3 benchmarks/train_throughput.py --no-explain --out "$OUT/mdtfix2" --modes eager --sizes XL --models mdt \
      --batch_sizes 32 128 2>&1 | grep -v "float32" | tee -a "$LOG"
  ;;
esac
ls -la "$OUT" "$OUT"/* | tee -a "$LOG"
