#!/usr/bin/env bash
# GPU benchmarks on a device host (one H100/H200), after the wheel bundle is installed
# (../shared/gpu/README.md: `bash .whl/stage.sh keep partNN` per part, then `bash .whl/stage.sh install`):
#
#   bash bench/gpu.sh serve sft        # any of: model serve sft step rollout plain
#
# Builds the 3B-shaped random-weight Qwen2.5-VL once (/tmp/vigorl-3b), runs the named benchmarks and
# copies the bench/results/*gpu*.json files they wrote to $OUT (the device tool brings that folder back).
# `model` alone only builds the model (one device call), so the next call has its full time for benchmarks.
# Pass the commit that runs as VIGORL_COMMIT=<sha> (the device copy's .git can be stale).
set -euo pipefail
export PYTHONPATH=${SITE:-/tmp/vigorl-site}:$PWD VLLM_USE_FLASHINFER_SAMPLER=0 HF_HUB_OFFLINE=1
MODEL=/tmp/vigorl-3b
OUT=${OUT:-/tmp/vigorl-out}
mkdir -p "$OUT"
started=$(mktemp)  # results newer than this file are this run's
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
[ -f "$MODEL/vigorl_model.json" ] || python3 -m jobs.cli tiny --preset 3b --out "$MODEL" --dtype bfloat16 --device cuda
for what in "$@"; do
  case "$what" in
    serve) python3 -m bench.serve_gateway --model "$MODEL" --dtype bfloat16 --policy-gpus 1 \
             --gpu-memory-utilization 0.4 --requests 48 --max-tokens 128 --name gateway_overhead_gpu ;;
    sft) python3 -m bench.sft_throughput --gpu --model "$MODEL" ;;
    step) python3 -m bench.sft_profile --model "$MODEL" --micro-steps 6 ;;
    rollout) python3 -m bench.rollout_lockstep --model "$MODEL" --conversations 64 --name async_vs_lockstep_gpu ;;
    # The rollout driver (single- and multi-turn, paper's multi-turn budgets) against plain vLLM, one run.
    plain) python3 -m bench.rollout_vs_plain --model "$MODEL" --max-tokens 512 --name gpu ${PLAIN_ARGS:-} ;;
    model) ;;
    *) echo "unknown benchmark $what (model, serve, sft, step, rollout, plain)"; exit 2 ;;
  esac
done
find bench/results -name '*gpu*.json' -newer "$started" -exec cp {} "$OUT"/ \;
ls -la "$OUT"
