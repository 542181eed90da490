#!/usr/bin/env bash
# Asynchronous GRPO (max_staleness 1) against synchronous (0) on ONE GPU (H100/H200) with the 3B-shaped
# random-weight Qwen2.5-VL: the GPU counterpart of bench/grpo_async.py (same job, same metric).
# On a device host, after the GPU packages are installed (bench/gpu.sh says how), stages in any split:
#
#   VIGORL_COMMIT=<sha> bash bench/grpo_async_gpu.sh model sync   # one call: build the model, the sync arm
#   VIGORL_COMMIT=<sha> bash bench/grpo_async_gpu.sh async        # next call (the machine still warm)
#   bash bench/grpo_async_gpu.sh result                           # here or there: -> runs/bench/grpo_async_gpu.json
#   RESULT_OUT=bench/results bash bench/grpo_async_gpu.sh result  # the same, into the committed results
#
# Each arm runs `python -m jobs.grpo` on configs/grpo_tiny.yaml with the GPU overrides below; the trainer
# (Ray Train, DeepSpeed ZeRO-2, gpus_per_worker 0.5) and the vLLM replica (policy.gpus 0.5) share the GPU.
# The job checkpoints at its end (a 3B ZeRO checkpoint is ~50 GB: minutes of disk writes, and two of them
# do not fit a 64 GiB disk); that is outside every step's time, so the arm ends the job (SIGINT, then
# SIGKILL of its process group) once metrics.jsonl holds the last step, and job_seconds stops there.
# An arm's raw records go to $WORK/<arm>.json (kept while the machine is warm) and to $OUT.
set -euo pipefail
export PYTHONPATH=${SITE:-/tmp/vigorl-site}:$PWD VLLM_USE_FLASHINFER_SAMPLER=0 HF_HUB_OFFLINE=1
MODEL=${MODEL:-/tmp/vigorl-3b}
WORK=${WORK:-/tmp/vigorl-grpo-async-gpu}
OUT=${OUT:-$WORK/out}
STEPS=${STEPS:-5}
STALENESS=${STALENESS:-1}
ARM_TIMEOUT=${ARM_TIMEOUT:-520}
mkdir -p "$WORK" "$OUT"
# Both arms: single-turn grounding, 16 prompts x 4 samples = 64 rollouts per RL step, 2 optimizer steps.
JOB_ARGS=(--config configs/grpo_tiny.yaml --model "$MODEL" --use_gpu true --gpus_per_worker 0.5
  --policy.gpus 0.5 --policy.engine.dtype bfloat16 --policy.engine.gpu_memory_utilization "${GPU_UTIL:-0.3}"
  --policy.engine.enforce_eager "${EAGER:-true}" --precision bf16 --gradient_checkpointing true --zero_stage 2
  --micro_batch_size 2 --rollout_batch_size 16 --group_size 4 --train_batch_size 32 --max_tokens_per_turn 256
  --max_response_tokens 512 --lr 1e-6 --mode grounded --data synthetic --task grounding --freeze_projector true
  --keep_checkpoints 1 --rollout_concurrency 64 --max_failures 0)


arm() {  # arm NAME STALENESS
  python3 - "$1" "$2" "$STEPS" "$WORK" "$ARM_TIMEOUT" "${JOB_ARGS[@]}" <<'EOF'
import json, os, shutil, signal, subprocess, sys, time
from pathlib import Path
import yaml

name, k, steps, work, timeout, extra = sys.argv[1], sys.argv[2], int(sys.argv[3]), Path(sys.argv[4]), float(sys.argv[5]), sys.argv[6:]
runs = work / "runs"
run_dir = runs / "grpo" / f"bench-{name}"
shutil.rmtree(run_dir, ignore_errors=True)  # a kept run would be continued
argv = [sys.executable, "-m", "jobs.grpo", *extra, "--run_name", f"bench-{name}", "--runs_dir", str(runs),
        "--max_steps", str(steps), "--save_every", str(10 ** 6), "--max_staleness", k]
log_path = work / f"{name}.log"
print(f"{name}: {' '.join(argv[1:])}", flush=True)
metrics = run_dir / "metrics.jsonl"

def records():
    if not metrics.is_file():
        return []
    return [r for r in (json.loads(x) for x in metrics.read_text().splitlines() if x.strip()) if "time/step" in r]

def smi(*query):
    try:
        return subprocess.run(["nvidia-smi", *query, "--format=csv,noheader,nounits"], capture_output=True,
                              text=True, timeout=30).stdout.split()
    except (OSError, subprocess.TimeoutExpired):
        return []

def gpu_used():
    out = smi("--query-gpu=memory.used")
    return int(out[0]) if out else -1

started, load_before, peak = time.perf_counter(), os.getloadavg()[0], 0
ended = None
with open(log_path, "w") as log:
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    while proc.poll() is None and time.perf_counter() - started < timeout:
        time.sleep(1)
        peak = max(peak, gpu_used())
        if len(records()) >= steps:
            ended = time.perf_counter()  # the last step is logged: the rest is the end-of-run checkpoint
            break
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)  # the job's finally: kill workers, delete the app, ray.shutdown()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # anything of the job's group still there
    except ProcessLookupError:
        pass
seconds = (ended or time.perf_counter()) - started
for i in range(60):  # the next arm needs the GPU back
    if gpu_used() < 2000:
        break
    if i == 30:  # processes of this job that outlived its process group (Ray's, vLLM's): by their ids
        for pid in smi("--query-compute-apps=pid"):
            try:
                os.kill(int(pid.strip(",")), signal.SIGKILL)
            except (ValueError, ProcessLookupError, PermissionError):
                pass
    time.sleep(1)
shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
recs = records()
cfg = yaml.safe_load((run_dir / "config.yaml").read_text()) if (run_dir / "config.yaml").is_file() else {}
gpu = " ".join(smi("--query-gpu=name,memory.total,driver_version"))
raw = {"name": name, "records": recs, "job_seconds": seconds, "complete": len(recs) >= steps,
       "exit": proc.returncode, "load": [round(load_before, 2), round(os.getloadavg()[0], 2)],
       "peak_gpu_memory_mib": peak, "gpu_memory_after_mib": gpu_used(), "gpu": gpu, "config": cfg,
       "argv": argv[1:]}
(work / f"{name}.json").write_text(json.dumps(raw, indent=1) + "\n")
print(f"{name}: {len(recs)}/{steps} steps in {seconds:.0f} s, exit {proc.returncode}, peak GPU {peak} MiB; "
      f"step times {[round(r['time/step'], 2) for r in recs]}", flush=True)
if not recs:
    print("".join(log_path.read_text(errors="replace").splitlines(keepends=True)[-80:]), flush=True)
EOF
  cp "$WORK/$1.json" "$WORK/$1.log" "$OUT"/ 2>/dev/null || true
}

result() {
  python3 - "$WORK" "$STALENESS" "${RESULT_OUT:-runs/bench}" <<'EOF'
import json, sys
from pathlib import Path
from bench.common import provenance
from bench.grpo_async import TIMES, summarize_arm

work, staleness = Path(sys.argv[1]), int(sys.argv[2])
raw = {name: json.loads((work / f"{name}.json").read_text()) for name in ("sync", "async")}
arms = {}
for name, run in raw.items():
    arms[name] = {**summarize_arm(run), "complete": run["complete"], "peak_gpu_memory_mib": run["peak_gpu_memory_mib"],
                  "per_step": [{k: r.get(k) for k in ("step", "rollouts", "time/step", "time/wait", "time/train",
                                                      "time/sync", "time/generation_idle", "staleness_histogram")}
                               for r in run["records"]]}
cfg = raw["sync"]["config"]
keep = ("mode", "task", "seed", "rollout_batch_size", "group_size", "train_batch_size", "micro_batch_size",
        "max_tokens_per_turn", "max_response_tokens", "precision", "zero_stage", "gradient_checkpointing",
        "use_gpu", "gpus_per_worker", "num_workers", "rollout_workers", "rollout_concurrency", "replay_capacity",
        "importance_cap", "lr", "max_steps")
prov = provenance()
prov["machine"]["gpu"] = raw["sync"]["gpu"]
result = {
    "ratio": arms["async"]["trajectories_per_second"] / arms["sync"]["trajectories_per_second"],
    "metric": "trajectories trained per second of wall time: sum(rollouts) / sum(time/step) over the steps after "
              "the first (warm-up), async / sync",
    "what": f"baseline = synchronous GRPO (max_staleness 0); new = asynchronous GRPO (max_staleness {staleness}); "
            "same config, seed, model and steps; trainer and vLLM replica share one GPU",
    "note": "one GPU shared by the trainer (Ray Train + DeepSpeed ZeRO-2, 0.5 GPU) and one vLLM replica (0.5 GPU, "
            "eager): overlapping generation with training only uses what each leaves idle on the same chip; "
            "weight sync is one safetensors file per version in /dev/shm (written by the trainer, read by vLLM's worker). job_seconds stop at the last step's record "
            "(the end-of-run checkpoint is cut off).",
    **arms,
    "config": {
        "config": "configs/grpo_tiny.yaml + GPU overrides (bench/grpo_async_gpu.sh)",
        "model": "3B-shaped Qwen2.5-VL, random weights (jobs.tiny --preset 3b, bfloat16)",
        "max_staleness": {name: raw[name]["config"].get("max_staleness") for name in raw},
        **{k: cfg.get(k) for k in keep},
        "policy": cfg.get("policy"),
        "save_every": "none inside the run (the end-of-run checkpoint is cut off)",
        "warmup_steps": 1,
        "argv": raw["sync"]["argv"],
    },
    **prov,
}
path = Path(sys.argv[3]) / "grpo_async_gpu.json"
path.parent.mkdir(parents=True, exist_ok=True)
path.write_text(json.dumps(result, indent=2) + "\n")
for name in ("sync", "async"):
    a = arms[name]
    print(f"{name}: {a['trajectories_per_second']:.3f} traj/s over {a['steady_steps']} steady steps; "
          + " ".join(f"{k} {a['seconds'][k]:.2f}s" for k in TIMES) + f"; staleness {a['staleness_histogram']}")
print(f"ratio async/sync {result['ratio']:.3f} -> {path}")
EOF
  cp "${RESULT_OUT:-runs/bench}/grpo_async_gpu.json" "$OUT"/ 2>/dev/null || true
}

[ $# -gt 0 ] || set -- model sync async result
for what in "$@"; do
  case "$what" in
    model) nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
           [ -f "$MODEL/vigorl_model.json" ] || python3 -m jobs.tiny --preset 3b --out "$MODEL" --dtype bfloat16 --device cuda ;;
    sync) arm sync 0 ;;
    async) arm async "$STALENESS" ;;
    result) result ;;
    *) echo "unknown stage $what (model sync async result)"; exit 2 ;;
  esac
done
