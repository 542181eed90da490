"""GRPO step time split: how much of an RL step the weight sync takes, single-turn and multi-turn.

    .venv/bin/python -m bench.grpo_step                  # CPU, tiny model -> runs/bench/grpo_step_cpu.json (--out)
    .venv/bin/python -m bench.grpo_step --steps 8 --multiturn-steps 5 --runs-dir /tmp/grpo-bench

Runs the GRPO job (`python -m jobs.grpo`) twice as a subprocess, each on its shipped tiny config with a
fresh run folder and checkpoints only at the end (outside every step's time):
- single_turn: configs/grpo_tiny.yaml (grounded pointing, one assistant turn);
- multi_turn: configs/grpo_tiny_multiturn.yaml (the zoom loop; VIGORL_PLANNED_ZOOMS=2 makes the random-weight
  model zoom under a grammar).
The result records each arm's batch settings (prompts x samples, optimizer steps per RL step).
Each arm's numbers come from its run's per-step records (runs/grpo/<run>/metrics.jsonl). The first step
of a run carries the warm-up and is reported apart; the means and shares are over the steps after it.

What the job's times are (jobs/grpo.py, train_worker): a step is wait (request the prompts, then block
until the rollout workers have put every group) + train (old/reference log-probs and the optimizer
steps) + sync (publish the weights until every replica serves them) + a small rest (advantages, batching).
`generate` is the span from the first group's start to the last group's arrival, so it lies inside `wait`;
`score` is summed over rollouts (it would overlap generation too). Their shares are of the same step and
are not meant to add up with the others.

ratio = 1 - sum(time/sync) / sum(time/step) over the steady steps of both arms: the share of the step
NOT spent in weight sync. The "baseline" is the step itself; the goal is sync < 5% of the step (ratio
>= 0.95). Sync: the trainer writes its weights to one safetensors file, the run's WeightStore announces it,
and the trainer waits until every replica has loaded it into vLLM. The tiny model keeps every part of the
step short; with real models, train, generate and the weights sent all grow, so CPU shares do not carry over.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from jobs.common import REPO_ROOT

TIMES = ("generate", "score", "wait", "train", "sync", "step")
ARMS = {"single_turn": "configs/grpo_tiny.yaml", "multi_turn": "configs/grpo_tiny_multiturn.yaml"}


def run_arm(name: str, config: str, steps: int, runs_dir: Path, extra: list[str], timeout: float) -> tuple[dict, dict]:
    """Run the job; returns (per-step records, the run's resolved config). Raises with the job's output tail."""
    argv = [sys.executable, "-m", "jobs.grpo", "--config", config, "--run_name", f"bench-{name}",
            "--runs_dir", str(runs_dir), "--max_steps", str(steps), "--save_every", str(10 ** 6), *extra]
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    if "multiturn" in Path(config).name:  # a random-weight model zooms only under a plan (vigorl_core.rollout.planned)
        env.setdefault("VIGORL_PLANNED_ZOOMS", "2")
    log_path = runs_dir / f"{name}.log"
    print(f"{name}: {' '.join(argv[1:])} (output: {log_path})", flush=True)
    started, load_before = time.perf_counter(), os.getloadavg()[0]
    with open(log_path, "w") as log:
        # Own session: a job past its timeout is ended with the Ray processes it started.
        proc = subprocess.Popen(argv, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    seconds = time.perf_counter() - started
    run_dir = runs_dir / "grpo" / f"bench-{name}"
    metrics = run_dir / "metrics.jsonl"
    if proc.returncode or not metrics.is_file():
        tail = "".join(log_path.read_text(errors="replace").splitlines(keepends=True)[-60:])
        raise RuntimeError(f"{name}: jobs.grpo exited {proc.returncode} after {seconds:.0f} s; last lines of "
                           f"{log_path}:\n{tail}")
    records = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()]
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    # Other work on the machine skews CPU numbers: the load is recorded with them.
    load = [round(load_before, 2), round(os.getloadavg()[0], 2)]
    return {"records": [r for r in records if "time/step" in r], "job_seconds": seconds, "load": load}, cfg


def _times(records: list[dict]) -> dict:
    """Mean seconds per step of each time, and each as a share of the step (sum over sum)."""
    step = sum(r["time/step"] for r in records)
    return {
        "seconds": {k: statistics.fmean(r[f"time/{k}"] for r in records) for k in TIMES},
        "share_of_step": {k: sum(r[f"time/{k}"] for r in records) / step for k in TIMES if k != "step"},
        "rest_seconds": statistics.fmean(r["time/step"] - r["time/wait"] - r["time/train"] - r["time/sync"]
                                         for r in records),
    }


def _arm(run: dict, cfg: dict) -> dict:
    records = run["records"]
    steady = [r for r in records if r["step"] > 1]
    if not steady:
        raise RuntimeError("need at least 2 steps per arm: the first one is warm-up")
    split, rollouts = _times(steady), cfg["rollout_batch_size"] * cfg["group_size"]
    return {
        **split,
        "sync_share": split["share_of_step"]["sync"],
        "steady_steps": len(steady),
        "first_step": {k: records[0][f"time/{k}"] for k in TIMES},
        "step_seconds": [round(r["time/step"], 3) for r in records],
        "sync_seconds": [round(r["time/sync"], 3) for r in records],
        "rollouts_per_step": rollouts,
        "optimizer_steps_per_rl_step": rollouts // (cfg["train_batch_size"] or rollouts),
        "turns_per_conversation": statistics.fmean(r["turns"] for r in steady),
        "zooms_per_conversation": statistics.fmean(r["zooms"] for r in steady),
        "generated_tokens_per_rollout": statistics.fmean(r["generated_tokens"] for r in steady),
        "response_tokens_per_rollout": statistics.fmean(r["response_tokens"] for r in steady),
        "trained_tokens_per_step": statistics.fmean(r["trained_tokens"] for r in steady),
        "reward_mean": [round(r["reward_mean"], 4) for r in records],
        "policy_version": records[-1]["policy_version"],
        "job_seconds": run["job_seconds"],
        "load_average_1m_before_after": run["load"],
    }


def job_overrides(settings: list[str], model: str | None) -> list[str]:
    """`--set KEY=VALUE` options and --model (default: the tiny model; configs/grpo_tiny.yaml would otherwise
    start from the SFT checkpoint of its run name) as the job's `--KEY VALUE` arguments."""
    extra = [x for kv in settings for x in ("--" + kv.partition("=")[0], kv.partition("=")[2])]
    return extra + ["--model", model or "tiny"]


def measure_and_write(args, measure, prefix: str, area: str, name: str) -> tuple[dict, Path]:
    """Run `measure(args, runs_dir)` in --runs-dir (kept) or a temp folder (deleted), note a commit that changed
    meanwhile (`commit_at_start`; the result's commit is read when it is written), and write the result to
    --out (a folder, default runs/bench/, or a .json file). Returns (result, path)."""
    from bench.common import provenance, write_result

    runs_dir = Path(args.runs_dir or tempfile.mkdtemp(prefix=prefix)).resolve()
    runs_dir.mkdir(parents=True, exist_ok=True)
    commit = provenance()["commit"]
    try:
        result = measure(args, runs_dir)
    finally:
        if not args.runs_dir:
            shutil.rmtree(runs_dir, ignore_errors=True)
    if provenance()["commit"] != commit:
        result["commit_at_start"] = commit
    return result, write_result(area, name, result, args.out)


def _measure(args, runs_dir: Path) -> dict:
    extra = job_overrides(args.set, args.model)
    arms, configs, steady = {}, {}, []
    for name, steps in (("single_turn", args.steps), ("multi_turn", args.multiturn_steps)):
        run, cfg = run_arm(name, ARMS[name], steps, runs_dir, extra, args.timeout)
        arms[name], configs[name] = _arm(run, cfg), cfg
        steady += [r for r in run["records"] if r["step"] > 1]
    sync, step = sum(r["time/sync"] for r in steady), sum(r["time/step"] for r in steady)
    keep = ("mode", "task", "rollout_batch_size", "group_size", "train_batch_size", "micro_batch_size",
            "max_tokens_per_turn", "max_response_tokens", "max_turns", "kl_coef", "num_workers",
            "rollout_workers", "precision", "zero_stage", "max_steps")
    result = {
        "ratio": 1 - sync / step,
        "metric": "share of the GRPO step NOT spent in weight sync: 1 - sum(time/sync) / sum(time/step) over the "
                  "steps after the first, both arms together",
        "what": "baseline = the step itself (time/step of jobs.grpo); new = the step minus weight sync "
                "(publish until every replica serves the new weights)",
        "goal": "sync < 5% of the step (ratio >= 0.95)",
        "sync_share": {"both": sync / step, **{name: arm["sync_share"] for name, arm in arms.items()}},
        "sync_seconds_total": sync, "step_seconds_total": step,
        **arms,
        "config": {
            "model": args.model or "tiny (random weights)",
            "arms": {name: {"config": ARMS[name], **{k: configs[name].get(k) for k in keep},
                            "policy": configs[name].get("policy")} for name in arms},
            "save_every": "end of run only (outside the step times)",
            "overrides": args.set,
            "warmup_steps": 1,
        },
    }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6, help="RL steps of the single-turn run (default 6)")
    parser.add_argument("--multiturn-steps", type=int, default=4, help="RL steps of the multi-turn run (default 4)")
    parser.add_argument("--model", default=None, help="initial policy folder for both arms (default: the tiny model)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="extra job setting for both arms, e.g. --set policy.replicas=2 (repeatable)")
    parser.add_argument("--runs-dir", default=None, help="run folders and job logs; kept (default: a temp folder, "
                        "deleted afterwards)")
    parser.add_argument("--timeout", type=float, default=900, help="seconds each job may run (default 900)")
    from bench.common import add_out_argument

    add_out_argument(parser)
    args = parser.parse_args()
    if min(args.steps, args.multiturn_steps) < 2:
        parser.error("--steps and --multiturn-steps need at least 2: the first step is warm-up")
    result, path = measure_and_write(args, _measure, "vigorl-bench-grpo-", "grpo_step", "cpu")
    for name in ARMS:
        arm = result[name]
        split = " ".join(f"{k} {arm['seconds'][k]:.2f}s ({arm['share_of_step'][k]:.0%})" for k in TIMES if k != "step")
        print(f"{name}: step {arm['seconds']['step']:.2f}s over {arm['steady_steps']} steady steps (first "
              f"{arm['first_step']['step']:.1f}s): {split}; {arm['rollouts_per_step']} rollouts/step, "
              f"{arm['turns_per_conversation']:.2f} turns, {arm['zooms_per_conversation']:.2f} zooms, "
              f"{arm['generated_tokens_per_rollout']:.0f} generated tokens per rollout")
    print(f"sync share {result['sync_share']['both']:.1%} of the step (goal < 5%), "
          f"ratio {result['ratio']:.3f} -> {path}")


if __name__ == "__main__":
    main()
