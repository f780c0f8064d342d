#!/usr/bin/env bash
# GPU runs on a lent machine (results and commands: benchmarks/README.md). Usage: bash benchmarks/run_gpu.sh STAGE [ARG]
# Needs .wheels/ (diffusers, datasets, dill, multiprocess, importlib_metadata; timm for official_implementations) and
# .data/fashion-mnist/ carried along (official_implementations also third_party/, see benchmarks/official_models.py;
# study / tune also .cache_dm/, the FD-FMNIST classifier cache, so that every call scores with the same classifier).
# Stages are named by what they measure. benchmarks/README.md cites the older ones by call number:
#   call1 = trainer_demo_and_eager_all, call2 = xl_compiled_deferred_maskdit256_mdt_split,
#   call3 = xl_profiles_mdt_compiled_b128, ddp = ddp_b2_pixels, call4 = mdt_xl_one_lookup_bias,
#   call6 = xl_compiled_b32_mdt_joint_sampling, call7 = xl_compiled_deferred_b32_b256,
#   call8 = xl_mdt_compiled_b32_profiles_b32, call9 = xl_cuda_graphs_b32, call10 = official_implementations,
#   call11 = b2_compiled_all, call12 = xl_cuda_graphs_mdt_moe_b32, call13 = b2_compiled_b128_trainer_cuda_graphs,
#   call14 = b2_compiled_deferred_b32_b256, call14b = b2_compiled_moe_b128_mdt_b256,
#   call15 = b2_b32_modes_and_profiles, call16 = trainer_compile_modes, mdtfix = mdt_xl_eager_split_and_joint;
#   conv = the issue-12 study (1 min, 28x28; replaced by "study", the old script is in git history) + the resume
#   check kept as resume_check_1gpu; call5 = that study's DeferredMaskDiT row.
set -uo pipefail
STAGE=${1:?usage: bash benchmarks/run_gpu.sh STAGE [ARG] (stages: see the case list below)}
ARG=${2:-}
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site $(ls .wheels/*.whl | grep -v /timm-) \
    >/dev/null 2>&1 || echo "pip install failed"
# timm only for the official implementations (benchmarks/official_models.py), kept off the main path.
ls .wheels/timm-*.whl >/dev/null 2>&1 && { python3 -m pip install -q --no-index --no-deps --no-compile \
    --target /tmp/timm_pkg .wheels/timm-*.whl >/dev/null 2>&1 || echo "timm install failed"; }
export PYTHONPATH=$PWD/src:/tmp/site PATH=/tmp/site/bin:$PATH
LOG=$OUT/log.txt
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch, diffusers, datasets, accelerate; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'diffusers', diffusers.__version__, 'datasets', datasets.__version__, 'accelerate', accelerate.__version__, 'gpus', torch.cuda.device_count())"
  # Host-side threads against the CPUs this container may use: a step whose host work is parallelised over more
  # threads than the CPU quota allows waits on throttled threads.
  python3 -c "import os, torch; print('cpus', os.cpu_count(), 'affinity', len(os.sched_getaffinity(0)), 'torch threads', torch.get_num_threads())"
  echo "cgroup cpu.max: $(cat /sys/fs/cgroup/cpu.max 2>/dev/null || echo n/a)"
} 2>&1 | tee -a "$LOG"
FM=".data/fashion-mnist"
# Progress-bar refreshes and per-file checkpoint lines would flood the log. Line-buffered: a pipe makes tr and grep
# hold 4 KiB blocks, and a call cut by its time limit then loses the lines that say where its time went.
LB=$(command -v stdbuf >/dev/null && echo "stdbuf -oL")
flt() { $LB tr '\r' '\n' | grep --line-buffered -v "it/s\|s/it\|^\s*$\|accelerate.checkpointing\|should be kept in float32"; }
T_STAGE=$SECONDS
case "$STAGE" in
trainer_overhead)
  # Issue 23 part 2: every study contender's trainer img/s against the harness step of the same model, batch
  # (BATCH, default 128), bf16 and compilation, in this one call; rows merge with earlier calls' table.
  # MODELS=a,b limits the contenders; PROFILE=MODEL adds a torch.profiler run of that trainer; HARNESS_BUDGET (s)
  # stops starting models. For the study's normalised time run it at the study's batch, trainers only:
  # BATCH=256 NO_HARNESS=1.
  timeout 570 python3 benchmarks/trainer_vs_harness.py --out "$OUT/trainer_overhead" --batch_size "${BATCH:-128}" \
      --fashion_mnist_dir "$FM" --work_dir /tmp/tvh --time_budget_s "${HARNESS_BUDGET:-480}" --call "${CALL:-}" \
      --merge_from benchmarks/results_h200/trainer_overhead/trainer_vs_harness.json \
      ${MODELS:+--models "$MODELS"} ${PROFILE:+--profile "$PROFILE"} ${NO_HARNESS:+--no-harness} 2>&1 | flt \
      | tee -a "$LOG"
  ;;
study)
  # Issue 23 part 1: one contender (ARG: dit, tread_dit, maskdit, deferred_maskdit, mdtv2, mdtv2_ddpm) of the equal
  # wall-clock study, merged into the committed rows (copy $OUT/study back to benchmarks/results_h200/study/).
  # STUDY_ARGS adds flags (e.g. "--minutes 4"); the evaluations so far are in $OUT/study even if the call is cut.
  : "${ARG:?usage: bash benchmarks/run_gpu.sh study MODEL}"
  export DIFFUSERS_MASKED_CACHE=$PWD/.cache_dm FASHION_MNIST_DIR=$PWD/$FM
  CARRIED_CACHE=$(ls .cache_dm/fashion_mnist_classifier/*.safetensors 2>/dev/null)
  [ -n "$CARRIED_CACHE" ] || echo "warning: no .cache_dm carried: the FD" \
      "classifier trains on this CPU first (time off this call) and scores unlike other calls' rows" | tee -a "$LOG"
  timeout 570 python3 benchmarks/convergence.py --models "$ARG" --out "$OUT/study" --work_dir /tmp/study \
      --merge_from benchmarks/results_h200/study/convergence.json --fashion_mnist_dir "$FM" --call "${CALL:-}" \
      --throughput_json benchmarks/results_h200/trainer_overhead/trainer_vs_harness.json ${STUDY_ARGS:-} 2>&1 \
      | flt | tee -a "$LOG"
  # Carry it into later calls if it was made here (a call returns at most 8 files: not when it was carried).
  [ -n "$CARRIED_CACHE" ] || cp -r .cache_dm "$OUT/cache_dm" 2>/dev/null
  ;;
tune)
  # Issue 23: short variants of one recipe (ARG) in one call, e.g. MaskDiT's decoder depth, TREAD's span,
  # DeferredMaskDiT's patch-mixer depth (defaults in convergence.py CONTENDERS; VARIANTS="label:key=value,... ..."
  # overrides, TUNE_MINUTES per variant). Rows merge with benchmarks/results_h200/tune/tune.json. An unmasked_share
  # variant (MaskDiT's ft25) plans its steps from the compiled trainer img/s: run it with TUNE_COMPILE=1.
  : "${ARG:?usage: bash benchmarks/run_gpu.sh tune MODEL}"
  export DIFFUSERS_MASKED_CACHE=$PWD/.cache_dm FASHION_MNIST_DIR=$PWD/$FM
  CARRIED_CACHE=$(ls .cache_dm/fashion_mnist_classifier/*.safetensors 2>/dev/null)
  [ -n "$CARRIED_CACHE" ] || echo "warning: no .cache_dm carried" \
      | tee -a "$LOG"
  mkdir -p "$OUT/tune"; cp benchmarks/results_h200/tune/tune.json "$OUT/tune/" 2>/dev/null
  timeout 570 python3 benchmarks/convergence.py --tune "$ARG" --out "$OUT/tune" --work_dir /tmp/tune \
      --merge_from benchmarks/results_h200/study/convergence.json --fashion_mnist_dir "$FM" --call "${CALL:-}" \
      --tune_minutes "${TUNE_MINUTES:-1}" ${VARIANTS:+--variants $VARIANTS} \
      --throughput_json benchmarks/results_h200/trainer_overhead/trainer_vs_harness.json \
      ${TUNE_COMPILE:+--tune_compile} 2>&1 | flt | tee -a "$LOG"
  [ -n "$CARRIED_CACHE" ] || cp -r .cache_dm "$OUT/cache_dm" 2>/dev/null
  ;;
text_to_image)
  # Issue 22: one text-to-image model of each kind on the default Fashion-MNIST scenes (64x64, 1 channel, 256 tokens
  # of patch 4), bf16, compiled, TRAIN_MINUTES of training each (default 5; compilation counts, and a B/4 text model
  # compiles for about 100 s: 1.5 minutes gave one step in call t2i4), the same optimizer,
  # EMA and caption dropout, one shared caption cache; then the scene score + FD of the EMA pipeline on the 1000
  # held-out captions at guidance 1, 2 and 4 (python -m diffusers_masked.evaluate --scenes). TEXT_ENCODER: a local
  # MiniLM folder (default .minilm16, an fp16 copy of the pip package's weights: the fp32 one exceeds the carry).
  export DIFFUSERS_MASKED_CACHE=$PWD/.cache_dm FASHION_MNIST_DIR=$PWD/$FM
  TE=${TEXT_ENCODER:-.minilm16}; MIN=${TRAIN_MINUTES:-5}; W=/tmp/t2i; rm -rf "$W"; mkdir -p "$W" "$OUT/t2i"
  if [ -f .t2i_carry/scenes.tar.xz ]; then
    # When the data set and the encoder do not fit the carry together (64 MiB): the scenes written on the host by
    # make_fashion_mnist_scenes.py (defaults) and a MiniLM whose word-embedding rows unused by any scene caption are
    # zeroed (39 ids kept; identical outputs on the scene captions), both xz-compressed: written by
    # `python benchmarks/make_t2i_carry.py --out .t2i_carry`; carry .t2i_carry, .wheels and .cache_dm.
    tar xJf .t2i_carry/scenes.tar.xz -C "$W" && mv "$W/scenes_test" "$W/scenes"
    tar xJf .t2i_carry/minilm_scenes.tar.xz -C "$W" && TE=$W/minilm_scenes
  else
    python3 train_examples/make_fashion_mnist_scenes.py --output_dir "$W/scenes" 2>&1 | tail -n 1 | tee -a "$LOG"
  fi
  [ -f "$W/scenes/scenes_info.json" ] || { echo "no scenes written: stage stopped" | tee -a "$LOG"; exit 1; }
  for spec in ${T2I_MODELS:-maskdit:B/4 mdt:B/4 deferred_maskdit:TINY/4}; do
    m=${spec%%:*}; cfg=${spec#*:}; o=$W/$m; s=$SECONDS
    echo "== $m $cfg: ${MIN} min ==" | tee -a "$LOG"
    timeout $(( ${MIN%.*} * 60 + 150 )) python3 train_examples/train_$m.py --conditioning text --scenes_dir "$W/scenes" \
        --text_encoder_path "$TE" --max_sequence_length 48 --text_cache_dir "$W/text_cache" --model_config "$cfg" \
        --train_batch_size 128 --learning_rate 2e-4 --lr_scheduler constant --lr_warmup_steps 100 --use_ema \
        --ema_decay 0.999 --caption_dropout_prob 0.1 --mixed_precision bf16 --allow_tf32 $([ "${T2I_COMPILE:-1}" = 1 ] && echo --torch_compile) \
        --max_train_steps 100000000 --unmasked_finetune_steps 0 --max_train_time_minutes "$MIN" \
        --checkpointing_steps 100000000 --checkpoints_total_limit 1 --validation_steps 0 \
        --validation_guidance_scale 2.0 --validation_inference_steps 25 --logging_steps 100 --report_to none \
        --seed 0 --output_dir "$o" > "$W/$m.raw" 2>&1
    echo "-- $m rc=$? wall=$((SECONDS - s))s" | tee -a "$LOG"
    tr '\r' '\n' < "$W/$m.raw" | flt | grep -v "^train: .*[0-9]/s\|Encoding captions: *[0-9]\?[0-9]%" > "$OUT/t2i/$m.log"
    grep -E "parameters|Error|error:|Traceback|Saved the pipeline" "$OUT/t2i/$m.log" | tail -n 4 | tee -a "$LOG"
    mkdir -p "$OUT/t2i/$m"; cp "$o"/{train_results.json,sample_grid.png,prompts.txt,README.md} "$OUT/t2i/$m/" 2>/dev/null
    for g in ${T2I_GUIDANCE:-1.0 2.0 4.0}; do
      timeout 200 python3 -m diffusers_masked.evaluate --pipeline "$o" --scenes "$W/scenes" --num_samples "${T2I_EVAL_SAMPLES:-1000}" \
          --batch_size 500 --num_inference_steps 25 --guidance_scale $g --no_progress \
          --output "$OUT/t2i/$m/scenes_g$g.json" 2>&1 | grep -v "float32" | tail -n 3 | tee -a "$LOG"
    done
    # At most 8 files come back from a call: one archive per model, written as soon as its runs are done.
    tar czf "$OUT/t2i_$m.tgz" -C "$OUT/t2i" "$m" "$m.log" && rm -rf "$OUT/t2i/$m" "$OUT/t2i/$m.log"
  done
  ;;
mdt_compile)
  # What MDTv2's per-batch mask ratio costs torch.compile: the kept-token count compiled static (a recompilation at
  # a new count) against dynamic from the first step (the trainer's way); fresh inductor cache per variant.
  timeout 570 python3 benchmarks/mdt_compile_time.py --preset "${MDT_PRESET:-B/4}" --sample_size 64 \
      --batch_size "${BATCH:-128}" --steps "${STEPS:-30}" --out "$OUT/mdt_compile_time.json" 2>&1 | flt | tee -a "$LOG"
  ;;
resume_check_1gpu)
  # Issue 12: a 1-GPU stop at step 20 and resume (the stage "conv" also ran the first equal wall-clock study).
  for a in "--stop_after_steps 20" "--resume_from_checkpoint latest"; do
    python3 train_examples/train_maskdit.py --max_train_steps 40 --train_batch_size 256 --mixed_precision bf16 \
        --validation_steps 0 --checkpointing_steps 20 --output_dir /tmp/r --report_to none $a 2>&1 | tail -n 2 | tee -a "$LOG"
  done
  cat /tmp/r/train_results.json | tee -a "$LOG"
  ;;
trainer_demo_and_eager_all)
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
xl_compiled_deferred_maskdit256_mdt_split)
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
xl_profiles_mdt_compiled_b128)
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
ddp_b2_pixels)
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
import json, sys
sys.path.insert(0, "benchmarks")
from tb_curves import read_curves
out = {}
for tag, d in (("gpu1", "/tmp/d1"), ("gpu2", "/tmp/d2"), ("gpu2_resumed", "/tmp/d3")):
    curves = read_curves(d)
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
g2b = out.get("m2bf16", {}).get("img_per_s_steady")
out["scaling_efficiency_bf16_allreduce"] = g2b / (2 * g1) if g1 and g2b else None
json.dump(out, open(sys.argv[1], "w"), indent=1)
for tag in ("gpu1", "gpu2", "gpu2_resumed"):
    l = out[tag]["loss"]
    print(tag, "img/s", out[tag]["img_per_s_steady"], "final", out[tag]["train_results"].get("final_loss"),
          "loss@", {k: round(v, 4) for k, v in l.items() if k % 50 == 0})
print("scaling efficiency", out["scaling_efficiency"])
PY
  cp /tmp/d2/sample_grid.png "$OUT/ddp_sample_grid.png" 2>/dev/null
  ;;
mdt_xl_one_lookup_bias)
  # Issue 6 follow-up: MDTv2 after the one-lookup relative position bias (eager before/after rows, profile), then
  # compiled MDTv2-XL/2 with the branches back-propagated one after the other (the recipe's --split_branch_backward).
  B="python3 benchmarks/train_throughput.py --no-explain"
  F="should be kept in float32"
  echo "== MDTv2 XL eager: joint b32 (+ profile), split b32/b128 ==" | tee -a "$LOG"
  $B --out "$OUT/r/mdt_eager_joint" --modes eager --sizes XL --models mdt --batch_sizes 32 \
      --profile mdt:XL:32:eager 2>&1 | grep -v "$F" | tee -a "$LOG"
  $B --out "$OUT/r/mdt_eager_split" --modes eager --sizes XL --models mdt --batch_sizes 32 128 \
      --mdt_split_backward 2>&1 | grep -v "$F" | tee -a "$LOG"
  echo "== MDTv2 XL compiled, split backward, b128 then b32 ==" | tee -a "$LOG"
  timeout 430 $B --out "$OUT/r/mdt_compiled_split" --modes compile --sizes XL --models mdt \
      --compile_batch_sizes 128 32 --mdt_split_backward --time_budget_s 300 2>&1 | grep -v "$F" | tee -a "$LOG"
  tar czf "$OUT/results.tgz" -C "$OUT" r && rm -rf "$OUT/r"
  ;;
xl_compiled_b32_mdt_joint_sampling)
  # Issue 6, rows still missing (an XL compile takes ~100-200 s): compiled b32 of DiT and MaskDiT, compiled MDTv2 b32
  # with the joint backward, and sampling of MDTv2Pipeline after the attention-bias changes (vs DiTPipeline).
  B="python3 benchmarks/train_throughput.py --no-explain"
  F="should be kept in float32"
  timeout 260 $B --out "$OUT/r/c_b32" --modes compile --sizes XL --models dit maskdit --compile_batch_sizes 32 \
      2>&1 | grep -v "$F" | tee -a "$LOG"
  timeout 170 $B --out "$OUT/r/mdt_c32_joint" --modes compile --sizes XL --models mdt --compile_batch_sizes 32 \
      2>&1 | grep -v "$F" | tee -a "$LOG"
  timeout 130 $B --out "$OUT/r/inference" --skip_training --inference --models dit mdt 2>&1 | grep -v "$F" | tee -a "$LOG"
  tar czf "$OUT/results.tgz" -C "$OUT" r && rm -rf "$OUT/r"
  ;;
xl_compiled_deferred_b32_b256)
  # Issue 6, rows still missing: compiled DeferredMaskDiT dense / MoE at b32 and b256 (DiT-XL/2 compiled b256 OOMs,
  # so b256 ratios use DiT's b128 row).
  B="python3 benchmarks/train_throughput.py --no-explain"
  timeout 570 $B --out "$OUT/r/c_deferred" --modes compile --sizes XL --models deferred deferred_moe \
      --compile_batch_sizes 32 256 --time_budget_s 470 2>&1 | grep -v "should be kept in float32" | tee -a "$LOG"
  tar czf "$OUT/results.tgz" -C "$OUT" r && rm -rf "$OUT/r"
  ;;
xl_mdt_compiled_b32_profiles_b32)
  # Issue 6, still open after call6: compiled MDTv2 b32 with the joint backward (its compile needs > 170 s), and
  # compiled profiles of MaskDiT and DiT at b32, where MaskDiT ran at 0.91x DiT (why masking does not pay there).
  B="python3 benchmarks/train_throughput.py --no-explain"
  F="should be kept in float32"
  timeout 300 $B --out "$OUT/r/mdt_c32_joint" --modes compile --sizes XL --models mdt --compile_batch_sizes 32 \
      2>&1 | grep -v "$F" | tee -a "$LOG"
  timeout 270 $B --out "$OUT/r/prof_b32" --skip_training --profile maskdit:XL:32:compile dit:XL:32:compile \
      2>&1 | grep -v "$F" | tee -a "$LOG"
  tar czf "$OUT/results.tgz" -C "$OUT" r && rm -rf "$OUT/r"
  ;;
xl_cuda_graphs_b32)
  # Issue 6: the b32 profiles (call8) show a host-bound compiled MaskDiT step; try CUDA graphs (reduce-overhead).
  B="python3 benchmarks/train_throughput.py --no-explain"
  timeout 540 $B --out "$OUT/r/c_b32_cudagraphs" --modes compile --compile_mode reduce-overhead --sizes XL \
      --models dit maskdit deferred --compile_batch_sizes 32 --time_budget_s 380 2>&1 \
      | grep -v "should be kept in float32" | tee -a "$LOG"
  tar czf "$OUT/results.tgz" -C "$OUT" r && rm -rf "$OUT/r"
  ;;
official_implementations)
  # Issue 6: the official implementations in our harness, side by side (third_party/ carried, timm wheel in .wheels;
  # see benchmarks/official_models.py), and the trainer's --torch_compile_mode on a GPU.
  B="python3 benchmarks/train_throughput.py --no-explain"
  F="should be kept in float32"
  timeout 260 $B --out "$OUT/r/official_maskdit" --models official_maskdit --sizes XL --batch_sizes 128 \
      --compile_batch_sizes 128 2>&1 | grep -v "$F" | tee -a "$LOG"
  timeout 90 $B --out "$OUT/r/official_mdt" --models official_mdt --modes eager --sizes XL --batch_sizes 32 64 \
      2>&1 | grep -v "$F" | tee -a "$LOG"
  for m in "--torch_compile" "--torch_compile_mode reduce-overhead"; do
    echo "== train_maskdit.py 300 steps b32 bf16 $m ==" | tee -a "$LOG"
    rm -rf /tmp/tc; timeout 100 python3 train_examples/train_maskdit.py --max_train_steps 300 --train_batch_size 32 \
        --mixed_precision bf16 --validation_steps 0 --checkpointing_steps 1000 --output_dir /tmp/tc \
        --fashion_mnist_dir "$FM" --report_to none --logging_steps 100 $m 2>&1 | tr '\r' '\n' | grep -v "^$" \
        | grep -i "error\|warn\|skipping cudagraph\|loss" | tail -n 8 | tee -a "$LOG"
    cat /tmp/tc/train_results.json 2>/dev/null | tee -a "$LOG"; echo | tee -a "$LOG"
  done
  tar czf "$OUT/results.tgz" -C "$OUT" r && rm -rf "$OUT/r"
  ;;
b2_compiled_all)
  # Issue 6: compiled B/2 rows of every model (the B/2 table has eager rows only).
  timeout 570 python3 benchmarks/train_throughput.py --no-explain --out "$OUT/r/compile_b2" --modes compile --sizes B \
      --compile_batch_sizes 32 128 256 --time_budget_s 500 2>&1 | grep -v "should be kept in float32" | tee -a "$LOG"
  tar czf "$OUT/results.tgz" -C "$OUT" r && rm -rf "$OUT/r"
  ;;
xl_cuda_graphs_mdt_moe_b32)
  # Issue 6: CUDA graphs where call9 did not go: MDTv2 and DeferredMaskDiT MoE at b32, MaskDiT at b128.
  B="python3 benchmarks/train_throughput.py --no-explain --modes compile --compile_mode reduce-overhead --sizes XL"
  F="should be kept in float32"
  timeout 400 $B --out "$OUT/r/cg_b32" --models mdt deferred_moe --compile_batch_sizes 32 --time_budget_s 250 \
      2>&1 | grep -v "$F" | tee -a "$LOG"
  timeout 170 $B --out "$OUT/r/cg_maskdit_b128" --models maskdit --compile_batch_sizes 128 2>&1 | grep -v "$F" \
      | tee -a "$LOG"
  tar czf "$OUT/results.tgz" -C "$OUT" r && rm -rf "$OUT/r"
  ;;
b2_compiled_b128_trainer_cuda_graphs)
  # Issue 6: what call11's time budget skipped (B/2 compiled, b128), then the trainer's CUDA-graph mode on a GPU with
  # its whole log kept (call10's 100 s timeout cut both trainer runs before they wrote anything).
  timeout 330 python3 benchmarks/train_throughput.py --no-explain --out "$OUT/r/compile_b2_b128" --modes compile --sizes B \
      --models mdt deferred deferred_moe --compile_batch_sizes 128 --time_budget_s 300 2>&1 \
      | grep -v "should be kept in float32" | tee -a "$LOG"
  tar czf "$OUT/results.tgz" -C "$OUT" r
  rm -rf /tmp/tc; timeout 190 python3 train_examples/train_maskdit.py --max_train_steps 200 --train_batch_size 32 \
      --mixed_precision bf16 --validation_steps 0 --checkpointing_steps 1000 --output_dir /tmp/tc \
      --fashion_mnist_dir "$FM" --report_to none --logging_steps 50 --torch_compile_mode reduce-overhead 2>&1 \
      | tr '\r' '\n' | grep -v "^$" > "$OUT/trainer_reduce_overhead.log"
  echo "trainer rc=$?" | tee -a "$LOG"; tail -n 15 "$OUT/trainer_reduce_overhead.log" | tee -a "$LOG"
  cat /tmp/tc/train_results.json 2>/dev/null | tee -a "$LOG"; cp /tmp/tc/sample_grid.png "$OUT"/ 2>/dev/null
  ;;
b2_compiled_deferred_b32_b256)
  # Issue 6: the compiled B/2 rows calls 11 and 13 did not reach (each batch size compiles afresh, 55-105 s at B/2).
  # Results stay as plain files under $OUT/r so that a run cut by the call's limit still brings them back.
  F="should be kept in float32"; B="python3 benchmarks/train_throughput.py --no-explain --modes compile --sizes B"
  timeout 370 $B --out "$OUT/r/compile_b2_deferred" --models deferred deferred_moe --compile_batch_sizes 32 256 \
      --time_budget_s 260 2>&1 | grep -v "$F" | tee -a "$LOG"
  ;;
b2_compiled_moe_b128_mdt_b256)
  # The rest of call14 (its first run with 95 s / 105 s limits for these two was cut during compilation).
  F="should be kept in float32"; B="python3 benchmarks/train_throughput.py --no-explain --modes compile --sizes B"
  timeout 200 $B --out "$OUT/r/compile_b2_moe128" --models deferred_moe --compile_batch_sizes 128 2>&1 | grep -v "$F" \
      | tee -a "$LOG"
  timeout 260 $B --out "$OUT/r/compile_b2_mdt256" --models mdt --compile_batch_sizes 256 2>&1 | grep -v "$F" \
      | tee -a "$LOG"
  ;;
b2_b32_modes_and_profiles)
  # Issue 6: MaskDiT-B/2 compiled b32 (505.9 img/s, call11) ran slower than its eager b32 of an earlier session
  # (615.7): eager and default compile of MaskDiT-B/2 and DiT-B/2 at b32 in one call, MaskDiT with CUDA graphs
  # (launch-bound or not), then profiles of MaskDiT compiled and eager.
  B="python3 benchmarks/train_throughput.py --no-explain --sizes B --batch_sizes 32 --compile_batch_sizes 32"
  F="should be kept in float32"
  timeout 200 $B --models dit maskdit --out "$OUT/r/b2_b32" 2>&1 | grep -v "$F" | tee -a "$LOG"
  timeout 100 $B --models maskdit --out "$OUT/r/b2_b32_cg" --modes compile --compile_mode reduce-overhead 2>&1 \
      | grep -v "$F" | tee -a "$LOG"
  timeout 150 python3 benchmarks/train_throughput.py --no-explain --out "$OUT/r/b2_profile" --skip_training \
      --profile maskdit:B:32:compile maskdit:B:32:eager 2>&1 | grep -v "$F" | tee -a "$LOG"
  ;;
trainer_compile_modes)
  # Issue 6: the trainer's compile modes on a GPU after the graph-break and sampling fixes (call13: first step 101 s,
  # the final grid compiled the model again), full logs kept; --unmasked_finetune_steps 0 keeps one shape.
  for m in "--torch_compile" "--torch_compile_mode reduce-overhead" ""; do
    n=$(echo "${m:-eager}" | tr -d ' -' ); rm -rf /tmp/tc
    timeout $([ -n "$m" ] && echo 170 || echo 110) python3 train_examples/train_maskdit.py --max_train_steps 400 --train_batch_size 32 \
        --mixed_precision bf16 --validation_steps 0 --checkpointing_steps 1000 --output_dir /tmp/tc \
        --fashion_mnist_dir "$FM" --report_to none --logging_steps 50 --unmasked_finetune_steps 0 $m 2>&1 \
        | tr '\r' '\n' | grep -v "^$" > "$OUT/trainer_$n.log"
    echo "== trainer $n rc=$? ==" | tee -a "$LOG"; grep -o "img_s=[0-9.]*, loss=[0-9.]*" "$OUT/trainer_$n.log" | uniq \
        | tee -a "$LOG"; cat /tmp/tc/train_results.json 2>/dev/null | tee -a "$LOG"
  done
  ;;
mdt_xl_eager_split_and_joint)
  python3 benchmarks/train_throughput.py --no-explain --out "$OUT/mdtfix" --modes eager --sizes XL --models mdt \
      --batch_sizes 32 128 --mdt_split_backward --profile mdt:XL:32:eager 2>&1 | grep -v "float32" | tee -a "$LOG"
  python3 benchmarks/train_throughput.py --no-explain --out "$OUT/mdtfix2" --modes eager --sizes XL --models mdt \
      --batch_sizes 32 128 2>&1 | grep -v "float32" | tee -a "$LOG"
  ;;
ddp_xl)
  # Issue 7 at XL/2 scale on cached latents of a RANDOM VAE (no pretrained VAE offline; benchmarks/make_random_vae.py):
  # Fashion-MNIST resized to 256 px -> 32x32x4 latents = 256 tokens at patch 2. Global batch 256 everywhere:
  # MaskDiT-XL/2 1 GPU x 128 x 2 accumulation vs 2 GPUs x 128, then 2 GPUs stopped at STOP and resumed; short 2-GPU
  # runs of MDTv2-XL/2 and DeferredMaskDiT-XL/2 (class-conditional: no MiniLM on the host); FSDP2 (then FSDP1) attempt
  # with DeferredMaskDiT-XL/2 (1.17B, the largest preset). CPU=1 runs the same commands scaled down on CPU processes
  # (benchmarks/rehearse_ddp_cpu.sh). DDP_XL_PARTS picks parts; STAGE_BUDGET_S caps the stage (timeouts shrink).
  W=${DDP_XL_WORK:-/tmp/ddp_xl}; PARTS=${DDP_XL_PARTS:-"cache ddp comm resume short fsdp"}; BUDGET=${STAGE_BUDGET_S:-560}
  if [ "${CPU:-0}" = 1 ]; then
    DATA_DIR=${FASHION_MNIST_DIR:-/usr/share/datasets/fashion-mnist}; RES=64; NS=128; MP=bf16; NW=1; LOGS=5; EVERY=5
    CFG_M=S/2; CFG_MDT=S/2; CFG_DEF=Debug/2; B=8; B_MDT=4; B_DEF=8; STEPS=20; STOP=10; SHORT=6; FSTEPS=4
    # `accelerate launch --cpu --num_processes 2` starts ONE non-distributed process; real 2-process gloo DDP needs
    # the multi-GPU launcher plus ACCELERATE_USE_CPU (Accelerator(cpu=True) -> MULTI_CPU).
    export ACCELERATE_USE_CPU=true OMP_NUM_THREADS=1
    L1="accelerate launch --num_processes 1"; L2="accelerate launch --multi_gpu --num_processes 2"
    T_CACHE=300; T_RUN=300; T_SHORT=300; T_FSDP=300
  else
    DATA_DIR=$FM; RES=256; NS=8192; MP=bf16; NW=4; LOGS=5; EVERY=25
    CFG_M=XL/2; CFG_MDT=XL/2; CFG_DEF=XL/2; B=128; B_MDT=32; B_DEF=128; STEPS=100; STOP=50; SHORT=40; FSTEPS=20
    L1="accelerate launch --num_processes 1"; L2="accelerate launch --multi_gpu --num_processes 2"
    T_CACHE=100; T_RUN=150; T_SHORT=${T_SHORT:-100}; T_FSDP=110
  fi
  PARTS=" ${PARTS/short/mdt deferred} "
  # A later call on the same warm machine reuses the VAE and latent cache; a fresh machine builds them first.
  [ -d "$W/latents" ] || PARTS="$PARTS cache "
  [[ "$PARTS" == *" cache "* ]] && rm -rf "$W"
  mkdir -p "$W" "$OUT/ddp_xl_logs"; T0=$SECONDS
  # Same --vae_path / --resolution / --max_train_samples / --latent_cache_dir everywhere: the cache fingerprint
  # matches, so only the first run encodes ("Encoding latents" must appear in one log only).
  DATA="--fashion_mnist_dir $DATA_DIR --vae_path $W/vae --cache_latents --latent_cache_dir $W/latents --resolution $RES \
      --max_train_samples $NS --dataloader_num_workers $NW"
  QUIET="--mixed_precision $MP --validation_steps 0 --validation_inference_steps 10 --validation_images_per_class 2 \
      --report_to tensorboard --logging_steps $LOGS"
  # Shrink a timeout to what is left of the stage budget (25 s kept for the summary); 0 = skip.
  tmo() { local left=$((BUDGET - (SECONDS - T0) - 25)); [ "$left" -lt 30 ] && echo 0 || echo $(( $1 < left ? $1 : left )); }
  xrun() { local tag=$1 t; t=$(tmo "$2"); shift 2; echo "== $tag (timeout ${t}s) ==" | tee -a "$LOG"
    [ "$t" = 0 ] && { echo "skipped: stage budget spent" | tee -a "$LOG"; echo "$tag -1 0" >> "$W/times.txt"; return; }
    local s=$SECONDS; timeout "$t" "$@" > "$W/$tag.raw" 2>&1 & local pid=$!
    if [ "${DDP_XL_SPY:-0}" = 1 ]; then
      # Exit-hang probe: 15 s after rank 0 reports the saved pipeline, dump the stacks of whatever still runs.
      ( while kill -0 $pid 2>/dev/null; do
          if grep -q "Saved the pipeline" "$W/$tag.raw"; then
            sleep 15; kill -0 $pid 2>/dev/null || break
            for p in $(pgrep -f "train_examples/"); do echo "== py-spy $p: $(tr '\0' ' ' < /proc/$p/cmdline | cut -c1-120)"
              py-spy dump --native --pid "$p"; done > "$OUT/ddp_xl_logs/$tag.spy.txt" 2>&1
            break
          fi; sleep 2; done ) &
    fi
    wait $pid; local rc=$?
    tr '\r' '\n' < "$W/$tag.raw" | grep -v "^\s*$\|should be kept in float32" | grep -v "^train: .*[0-9]/s" \
      | grep -v "^Encoding latents: *[0-9]\?[0-9]%" > "$OUT/ddp_xl_logs/$tag.txt"
    echo "$tag $rc $((SECONDS - s))" >> "$W/times.txt"
    grep -E "Resumed|parameters|Encoding latents: 100|Error|error:|Traceback|train: 100%|Distributed" "$OUT/ddp_xl_logs/$tag.txt" \
      | grep -v "^\s*warnings.warn" | tail -n 6 | tee -a "$LOG"
    [ "$rc" != 0 ] && tail -n 25 "$OUT/ddp_xl_logs/$tag.txt" | tee -a "$LOG"
    echo "-- $tag rc=$rc wall=$((SECONDS - s))s" | tee -a "$LOG"; }
  if [[ "$PARTS" == *" cache "* ]]; then
    python3 benchmarks/make_random_vae.py --out "$W/vae" --calibrate_dir "$DATA_DIR" 2>&1 | tail -n 1 | tee -a "$LOG"
    # One cheap 1-process, 1-step S/2 run only to build the shared latent cache.
    xrun cache "$T_CACHE" $L1 train_examples/train_maskdit.py $DATA $QUIET --model_config S/2 --train_batch_size $B \
        --max_train_steps 1 --output_dir "$W/cache_run"
    rm -rf "$W"/cache_run/checkpoint-* "$W/cache_run/transformer"
  fi
  M="train_examples/train_maskdit.py $DATA $QUIET --model_config $CFG_M --use_ema --train_batch_size $B \
      --max_train_steps $STEPS --unmasked_finetune_steps 0"
  if [[ "$PARTS" == *" ddp "* ]]; then
    # Checkpoints only at the end of m1 / m2 (a mid-run save would land in a throughput window); m3 saves at STOP.
    xrun m1 "$T_RUN" $L1 $M --gradient_accumulation_steps 2 --checkpointing_steps 100000 --output_dir "$W/m1"
    rm -rf "$W"/m1/checkpoint-* "$W/m1/transformer"
    xrun m2 "$T_RUN" $L2 $M --checkpointing_steps 100000 --output_dir "$W/m2"
    rm -rf "$W"/m2/checkpoint-* "$W/m2/transformer"
  fi
  if [[ "$PARTS" == *" comm "* ]]; then
    # The same 2-GPU run with gradients all-reduced in bfloat16 (--ddp_comm_hook bf16).
    xrun m2bf16 "$T_RUN" $L2 $M --ddp_comm_hook bf16 --checkpointing_steps 100000 --output_dir "$W/m2bf16"
    rm -rf "$W"/m2bf16/checkpoint-* "$W/m2bf16/transformer"
  fi
  if [[ "$PARTS" == *" resume "* ]]; then
    xrun m3_stop "$T_RUN" $L2 $M --checkpointing_steps $STOP --stop_after_steps $STOP --output_dir "$W/m3"
    xrun m3_resume "$T_RUN" $L2 $M --checkpointing_steps $STOP --resume_from_checkpoint latest --output_dir "$W/m3"
    ls "$W/m3" | tr '\n' ' ' | tee -a "$LOG"; echo | tee -a "$LOG"
    rm -rf "$W"/m3/checkpoint-* "$W/m3/transformer"
  fi
  if [[ "$PARTS" == *" mdt "* ]]; then
    # MDTv2 runs two branches per step (memory-hungry): micro-batch 32. No EMA (smaller final checkpoints).
    xrun mdt "$T_SHORT" $L2 train_examples/train_mdt.py $DATA $QUIET --model_config $CFG_MDT --no-use_ema \
        --train_batch_size $B_MDT --max_train_steps $SHORT --lr_warmup_steps 10 --checkpointing_steps 100000 \
        --output_dir "$W/mdt"
    rm -rf "$W"/mdt/checkpoint-* "$W/mdt/transformer"
  fi
  if [[ "$PARTS" == *" deferred "* ]]; then
    xrun deferred "$T_SHORT" $L2 train_examples/train_deferred_maskdit.py $DATA $QUIET --model_config $CFG_DEF \
        --conditioning class --no-use_ema --train_batch_size $B_DEF --max_train_steps $SHORT --lr_warmup_steps 10 \
        --checkpointing_steps 100000 --output_dir "$W/deferred"
    rm -rf "$W"/deferred/checkpoint-* "$W/deferred/transformer"
  fi
  if [[ "$PARTS" == *" fsdp "* ]]; then
    # --stop_after_steps keeps the run "unfinished": finish() samples on the main process only, which would hang
    # under FSDP (every rank must join the all-gathers); the sharded checkpoint at the stop is still written.
    FD="train_examples/train_deferred_maskdit.py $DATA $QUIET --model_config $CFG_DEF --conditioning class \
        --no-use_ema --train_batch_size $B_DEF --max_train_steps 100000 --stop_after_steps $FSTEPS --lr_warmup_steps 10"
    xrun fsdp2 "$T_FSDP" accelerate launch --num_processes 2 --use_fsdp --fsdp_version 2 \
        --fsdp_auto_wrap_policy TRANSFORMER_BASED_WRAP --fsdp_transformer_layer_cls_to_wrap DiTBlock \
        --fsdp_reshard_after_forward true --fsdp_state_dict_type SHARDED_STATE_DICT $FD --output_dir "$W/fsdp2"
    if ! grep -q "^fsdp2 0 " "$W/times.txt"; then
      xrun fsdp1 "$T_FSDP" accelerate launch --num_processes 2 --use_fsdp --fsdp_version 1 \
          --fsdp_sharding_strategy FULL_SHARD --fsdp_auto_wrap_policy TRANSFORMER_BASED_WRAP \
          --fsdp_transformer_layer_cls_to_wrap DiTBlock --fsdp_use_orig_params true \
          --fsdp_state_dict_type SHARDED_STATE_DICT $FD --output_dir "$W/fsdp1"
    fi
    du -sh "$W"/fsdp*/checkpoint-* 2>/dev/null | tee -a "$LOG"; rm -rf "$W"/fsdp*/checkpoint-*
  fi
  python3 - "$OUT/ddp_xl_summary.json" "$W" "$EVERY" <<'PY' 2>&1 | tee -a "$LOG"
import json, os, statistics, sys
sys.path.insert(0, "benchmarks")
from tb_curves import read_curves
path, work, every = sys.argv[1], sys.argv[2], int(sys.argv[3])
times = {}
if os.path.exists(f"{work}/times.txt"):
    for line in open(f"{work}/times.txt"):
        tag, rc, wall = line.split()
        times[tag] = {"rc": int(rc), "wall_s": int(wall)}
out = {"runs_exit_and_wall": times}
for tag in ("m1", "m2", "m2bf16", "m3", "mdt", "deferred", "fsdp2", "fsdp1"):
    d = f"{work}/{tag}"
    if not os.path.isdir(d):
        continue
    curves = read_curves(d)
    try:
        res = json.load(open(f"{d}/train_results.json"))
    except Exception as err:
        res = {"error": f"{type(err).__name__}: {err}"}
    steps = sorted(curves.get("img_per_s", {}))
    # Median of the logged windows after the first one (warm-up), robust to a stall (worker restart at an epoch).
    ips = [curves["img_per_s"][s] for s in (steps[1:] if len(steps) > 1 else steps)]
    out[tag] = {"train_results": res, "loss": dict(sorted(curves.get("loss", {}).items())),
                "img_per_s_windows": {s: curves["img_per_s"][s] for s in steps},
                "img_per_s_steady": statistics.median(ips) if ips else None}
g1 = out.get("m1", {}).get("img_per_s_steady"); g2 = out.get("m2", {}).get("img_per_s_steady")
out["scaling_efficiency"] = g2 / (2 * g1) if g1 and g2 else None
g2b = out.get("m2bf16", {}).get("img_per_s_steady")
out["scaling_efficiency_bf16_allreduce"] = g2b / (2 * g1) if g1 and g2b else None
if "m2" in out and "m3" in out:  # the stopped + resumed run should retrace the uninterrupted 2-GPU curve
    a, b = out["m2"]["loss"], out["m3"]["loss"]
    common = sorted(set(a) & set(b))
    out["m3_vs_m2_max_abs_loss_diff"] = max(abs(a[s] - b[s]) for s in common) if common else None
json.dump(out, open(path, "w"), indent=1)
for tag in ("m1", "m2", "m2bf16", "m3", "mdt", "deferred", "fsdp2", "fsdp1"):
    if tag not in out:
        continue
    r, l = out[tag], out[tag]["loss"]
    print(f"{tag:9s} img/s {r['img_per_s_steady'] and round(r['img_per_s_steady'], 1)} run img/s "
          f"{r['train_results'].get('images_per_s') and round(r['train_results']['images_per_s'], 1)} final "
          f"{r['train_results'].get('final_loss')} steps {r['train_results'].get('global_step')} "
          f"params {r['train_results'].get('num_parameters')} loss@ {({k: round(v, 4) for k, v in l.items() if k % every == 0})}")
print("exit codes / wall s:", times)
print("scaling efficiency (m2 / (2 x m1)):", out["scaling_efficiency"])
print("scaling efficiency, bf16 all-reduce (m2bf16 / (2 x m1)):", out["scaling_efficiency_bf16_allreduce"])
print("resumed vs uninterrupted 2-GPU max |loss diff|:", out.get("m3_vs_m2_max_abs_loss_diff"))
PY
  du -sh "$W" 2>/dev/null | tee -a "$LOG"
  ;;
tread)
  # Issue 21: TREAD-DiT (route 0.5 over blocks 2..L-4), our DiT (no routing) and diffusers DiT at b128 and b256,
  # compiled (one graph per model with a dynamic batch dimension: one compilation serves both batch sizes). Run as
  # two calls on one warm H200 (results_h200/tread_*): call 1 = XL (budget 470 s), call 2 = B (budget 170 s, which
  # skipped TREAD-DiT-B b256). SIZES / BUDGET override: SIZES=B BUDGET=170 bash benchmarks/run_gpu.sh tread
  echo "== compiled ${SIZES:-XL B}/2: diffusers DiT, DiT (ours), TREAD-DiT; b128 b256 ==" | tee -a "$LOG"
  timeout 560 python3 benchmarks/train_throughput.py --no-explain --out "$OUT/tread" --modes compile --dynamic_batch \
      --sizes ${SIZES:-XL B} --models dit ours_dit tread_dit --compile_batch_sizes 128 256 \
      --time_budget_s ${BUDGET:-470} 2>&1 | grep -v "should be kept in float32" | tee -a "$LOG"
  ;;
*)
  echo "unknown stage $STAGE" | tee -a "$LOG"; exit 2
  ;;
esac
echo "== stage $STAGE${ARG:+ $ARG}: wall $((SECONDS - T_STAGE)) s" | tee -a "$LOG"
ls -la "$OUT" "$OUT"/* | tee -a "$LOG"
