#!/usr/bin/env bash
# GPU benchmarks on a device host (one H100/H200), after the wheel bundle is installed
# (../shared/gpu/README.md: `bash .whl/stage.sh keep partNN` per part, then `bash .whl/stage.sh install`):
#
#   bash bench/gpu.sh serve sft        # any of: serve sft step rollout
#
# Builds the 3B-shaped random-weight Qwen2.5-VL once (/tmp/vigorl-3b), runs the named benchmarks and
# copies their bench/results/*.json to $OUT (the device tool brings that folder back). Pass the commit that
# runs as VIGORL_COMMIT=<sha> (the device copy's .git can be stale).
set -euo pipefail
export PYTHONPATH=${SITE:-/tmp/vigorl-site}:$PWD VLLM_USE_FLASHINFER_SAMPLER=0 HF_HUB_OFFLINE=1
MODEL=/tmp/vigorl-3b
OUT=${OUT:-/tmp/vigorl-out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
[ -f "$MODEL/vigorl_model.json" ] || python3 -m jobs.cli tiny --preset 3b --out "$MODEL" --dtype bfloat16 --device cuda
for what in "$@"; do
  case "$what" in
    serve) python3 -m bench.serve_gateway --model "$MODEL" --dtype bfloat16 --policy-gpus 1 \
             --gpu-memory-utilization 0.4 --requests 48 --max-tokens 128 --name gateway_overhead_gpu ;;
    sft) python3 -m bench.sft_throughput --gpu --model "$MODEL" ;;
    step) python3 -m bench.sft_profile --model "$MODEL" --micro-steps 6 ;;
    rollout) python3 -m bench.rollout_lockstep --model "$MODEL" --dtype bfloat16 --conversations 64 --name async_vs_lockstep_gpu ;;
    *) echo "unknown benchmark $what (serve, sft, step, rollout)"; exit 2 ;;
  esac
done
cp bench/results/*gpu*.json "$OUT"/ 2>/dev/null || true
ls -la "$OUT"
