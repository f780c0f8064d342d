#!/usr/bin/env bash
# CPU rehearsal of the `ddp_xl` stage of benchmarks/run_gpu.sh (issue 7): the same commands, scaled down (S/2,
# Debug/2, 64 px -> 8x8x4 latents, a few steps, `accelerate launch --cpu`), to check flags, the shared latent cache,
# stop + resume and the summary before spending GPU time. Numbers (img/s) mean nothing here.
#   bash benchmarks/rehearse_ddp_cpu.sh                      # all parts, ~10 min on 2 cores
#   DDP_XL_PARTS="cache ddp" bash benchmarks/rehearse_ddp_cpu.sh
set -uo pipefail
cd "$(dirname "$0")/.."
export CPU=1 OUT=${OUT:-/tmp/ddp_xl_rehearsal} DDP_XL_WORK=${DDP_XL_WORK:-/tmp/ddp_xl_cpu} STAGE_BUDGET_S=${STAGE_BUDGET_S:-3000}
export CUDA_VISIBLE_DEVICES="" HF_HUB_OFFLINE=1
rm -rf "$OUT"
bash benchmarks/run_gpu.sh ddp_xl
n=$(grep -l "Encoding latents" "$OUT"/ddp_xl_logs/*.txt 2>/dev/null | wc -l)
echo "logs that encoded latents: $n (expected 1: cache)"
