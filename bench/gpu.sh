#!/usr/bin/env bash
# GPU benchmarks on one H100/H200 host:
#
#   bash bench/gpu.sh serve sft        # any of: model serve sft trace step vision rollout plain
#
# Install (once per host). The host brings Python 3.12, torch 2.11 for CUDA 13 and transformers 5.16-5.19;
# vigorl adds, without touching that torch: vLLM 0.26.0 (the vLLM release built for torch 2.11 and CUDA 13),
# Ray 2.60.0 (`ray[serve,train,data]`), DeepSpeed 0.19.8 (PyPI has only its sdist: `pip wheel --no-deps
# deepspeed==0.19.8` builds a pure-Python wheel; it needs `hjson`) and tensorboardX, with their pure-Python
# dependencies. Put their wheels in a folder (on a machine with network: `pip download` them for Python 3.12,
# manylinux x86_64, then drop torch, triton and nvidia-* wheels, which the host has), copy it over, then:
#
#   python3 -m pip install --no-index --no-deps --target /tmp/vigorl-site WHEELS/*.whl
#
# This script puts that site folder ($SITE, default /tmp/vigorl-site) and the checkout on PYTHONPATH; `ray`
# lands in $SITE/bin, off PATH (use the Python API). VLLM_USE_FLASHINFER_SAMPLER=0: vLLM samples with its PyTorch
# top-k/top-p code instead of FlashInfer's kernels. Check: `PYTHONPATH=$SITE python3 -c "import vllm, ray, deepspeed"`.
#
# Builds the 3B-shaped random-weight Qwen2.5-VL once (/tmp/vigorl-3b), runs the named benchmarks with
# `--out $OUT` (default /tmp/vigorl-out), so the results (*gpu*.json) land there and not in bench/results/;
# copy one into bench/results/ to commit it. `model` alone only builds the model (one call), so the next call
# has its full time for benchmarks. Pass the commit that runs as VIGORL_COMMIT=<sha> (a copied .git can be stale).
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
             --gpu-memory-utilization 0.4 --requests "${SERVE_REQUESTS:-64}" --repeats 2 --max-tokens 128 \
             --gateway-replicas "${GATEWAY_REPLICAS:-1}" --zoom-replicas "${ZOOM_REPLICAS:-1}" \
             --name "gateway_overhead_gpu${SERVE_SUFFIX:-}" --out "$OUT" ;;
    # The job's kernels (auto: Liger's when liger-kernel is installed); SFT_KERNELS=none|compile to compare.
    sft) python3 -m bench.sft_throughput --gpu --model "$MODEL" --kernels "${SFT_KERNELS:-auto}" \
           --micro-batch "${SFT_MICRO:-2}" --out "$OUT" ;;
    # The job alone with one optimizer step traced: where the GPU idles and what the host did then (bench.trace_gaps).
    trace) python3 -m bench.sft_throughput --gpu --model "$MODEL" --kernels "${SFT_KERNELS:-auto}" \
             --micro-batch "${SFT_MICRO:-2}" --steps 6 --warmup 3 --trace-step 5 --out "$OUT" ;;
    # The frozen vision tower's forward alone: as the job prepared it before, then with its blocks compiled.
    vision) python3 -m bench.vision_profile --model "$MODEL" --out "$OUT" ;;
    step) python3 -m bench.sft_profile --model "$MODEL" --micro-steps 6 --micro-batch 2 --no-checkpointing \
             --arms "${STEP_ARMS:-stock,vigorl,vigorl_liger,vigorl_compile,deepspeed}" ${STEP_ARGS:-} --out "$OUT" ;;
    # Turn lengths with a long tail (thoughts of 8-900 tokens, log-spaced), as a trained model's.
    # CONVERSATIONS=256 for GRPO-sized batches; ROLLOUT_ARGS="--profile --tails digits,grammar" samples the event
    # loop's stack and adds the grammar-tail comparison (bench/rollout_lockstep.py).
    rollout) python3 -m bench.rollout_lockstep --model "$MODEL" --conversations "${CONVERSATIONS:-64}" \
               --repeats "${ROLLOUT_REPEATS:-3}" --think-lengths 8,16,32,64,128,256,512,900 \
               --name "async_vs_lockstep_gpu${ROLLOUT_SUFFIX:-}" --out "$OUT" ${ROLLOUT_ARGS:-} ;;
    # The rollout driver (single- and multi-turn, paper's multi-turn budgets) against plain vLLM, one run.
    plain) python3 -m bench.rollout_vs_plain --model "$MODEL" --max-tokens 512 --name gpu --out "$OUT" ${PLAIN_ARGS:-} ;;
    model) ;;
    *) echo "unknown benchmark $what (model, serve, sft, trace, step, vision, rollout, plain)"; exit 2 ;;
  esac
done
ls -la "$OUT"
