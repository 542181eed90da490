"""Asynchronous GRPO (max_staleness k = 1) against the synchronous schedule (k = 0): trajectories trained per second.

    .venv/bin/python -m bench.grpo_async                  # CPU, tiny multi-turn -> runs/bench/grpo_async_cpu.json
    .venv/bin/python -m bench.grpo_async --config configs/grpo_tiny.yaml --steps 8 --runs-dir /tmp/grpo-async

Runs the GRPO job (`python -m jobs.grpo`) twice as a subprocess, one arm after the other, with the same
config, seed, model and --max_steps (so the same prompts and number of trajectories), each in a fresh run
folder with checkpoints only at the end (outside every step's time):
- sync: --max_staleness 0, each step waits for rollouts of its own weights;
- async: --max_staleness K (default 1), the rollout workers roll out the next K steps while the trainer
  trains; the trainer weights those older rollouts by the truncated importance ratio.
The default config is configs/grpo_tiny_multiturn.yaml (the zoom loop with planned zooms on the tiny
random model); --config configs/grpo_tiny.yaml measures single-turn grounding instead.

ratio = async / sync of sum(rollouts) / sum(time/step) over the steps after the first (warm-up): the
trajectories trained per second of the trainer's wall time, > 1 = asynchronous is faster. Each arm also
records the mean times per step (wait = trainer idle, generation_idle = rollout workers idle, train, sync),
the staleness histogram summed over steps, groups dropped as too old, importance weights and rewards per
step, and the whole run: trajectories per second of the job's wall time, Ray start and step 1 included.

On a CPU machine the policy engine and the trainer share the same cores: overlapping them only helps as far
as one leaves cores idle, so a CPU result shows that the mechanism works, not the speed-up it buys when
each has its own GPU.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
from collections import Counter
from pathlib import Path

from bench.grpo_step import job_overrides, measure_and_write, run_arm
from jobs.common import REPO_ROOT

TIMES = ("wait", "generation_idle", "train", "sync", "step")
NOTE = ("2 CPU cores: the policy engine and the trainer compete for the same cores, so overlap has little spare "
        "capacity to use; this shows the mechanism works, not the speed-up (that needs a GPU for each)")


def summarize_arm(run: dict) -> dict:
    records = run["records"]
    steady = [r for r in records if r["step"] > 1]
    if not steady:
        raise RuntimeError("need at least 2 steps per arm: the first one is warm-up")
    histogram = sum((Counter(r["staleness_histogram"]) for r in records), Counter())
    trajectories = sum(r["rollouts"] for r in records)
    return {
        "trajectories_per_second": sum(r["rollouts"] for r in steady) / sum(r["time/step"] for r in steady),
        "steady_steps": len(steady),
        "seconds": {k: statistics.fmean(r[f"time/{k}"] for r in steady) for k in TIMES},
        "first_step_seconds": records[0]["time/step"],
        "step_seconds": [round(r["time/step"], 3) for r in records],
        "staleness_histogram": {k: histogram[k] for k in sorted(histogram, key=int)},
        "stale_dropped": sum(r["stale_dropped"] for r in records),
        "importance_weight_mean": [r["importance_weight_mean"] for r in records],
        "reward_mean": [round(r["reward_mean"], 4) for r in records],
        "policy_version": records[-1]["policy_version"],
        "trajectories": trajectories,
        "job_seconds": run["job_seconds"],
        # Ray start, model loads and step 1 included: what a user waits for.
        "trajectories_per_second_whole_run": trajectories / run["job_seconds"],
        "load_average_1m_before_after": run["load"],
    }


def _measure(args, runs_dir: Path) -> dict:
    from jobs.common import model_folder

    # The tiny model is built once, before both arms, so neither job's wall time carries the build.
    model_folder(args.model or "tiny", str(runs_dir))
    extra = job_overrides(args.set, args.model)
    arms, configs = {}, {}
    for name, k in (("sync", 0), ("async", args.staleness)):
        shutil.rmtree(runs_dir / "grpo" / f"bench-{name}", ignore_errors=True)  # a kept run would be continued
        run, configs[name] = run_arm(name, args.config, args.steps, runs_dir, [*extra, "--max_staleness", str(k)],
                                      args.timeout)
        arms[name] = summarize_arm(run)
    keep = ("mode", "task", "seed", "rollout_batch_size", "group_size", "train_batch_size", "micro_batch_size",
            "max_tokens_per_turn", "max_response_tokens", "max_turns", "importance_cap",
            "num_workers", "rollout_workers", "rollout_concurrency", "replay_capacity", "precision", "max_steps")
    result = {
        "ratio": arms["async"]["trajectories_per_second"] / arms["sync"]["trajectories_per_second"],
        "metric": "trajectories trained per second of wall time: sum(rollouts) / sum(time/step) over the steps after "
                  "the first (warm-up), async / sync",
        "what": f"baseline = synchronous GRPO (max_staleness 0); new = asynchronous GRPO (max_staleness "
                f"{args.staleness}); same config, seed, model and steps",
        "note": NOTE,
        **arms,
        "config": {
            "config": args.config,
            "model": args.model or "tiny (random weights)",
            "max_staleness": {name: configs[name]["max_staleness"] for name in arms},
            **{k: configs["sync"].get(k) for k in keep},
            "policy": configs["sync"].get("policy"),
            "save_every": "end of run only (outside the step times)",
            "overrides": args.set,
            "warmup_steps": 1,
        },
    }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/grpo_tiny_multiturn.yaml",
                        help="job config of both arms, relative to the repository (default "
                             "configs/grpo_tiny_multiturn.yaml; or configs/grpo_tiny.yaml)")
    parser.add_argument("--steps", type=int, default=6, help="RL steps of each arm (default 6; the first is warm-up)")
    parser.add_argument("--staleness", type=int, default=1, help="max_staleness k of the async arm (default 1)")
    parser.add_argument("--model", default=None, help="initial policy folder for both arms (default: the tiny model)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="extra job setting for both arms, e.g. --set rollout_workers=2 (repeatable)")
    parser.add_argument("--runs-dir", default=None, help="run folders and job logs; kept (default: a temp folder, "
                        "deleted afterwards)")
    parser.add_argument("--timeout", type=float, default=600, help="seconds each job may run (default 600)")
    from bench.common import add_out_argument

    add_out_argument(parser)
    args = parser.parse_args()
    if args.steps < 2:
        parser.error("--steps needs at least 2: the first step is warm-up")
    if args.staleness < 1:
        parser.error("--staleness needs at least 1: 0 is the synchronous arm")
    if not (REPO_ROOT / args.config).is_file():
        parser.error(f"--config: no such file {REPO_ROOT / args.config}")
    result, path = measure_and_write(args, _measure, "vigorl-bench-grpo-async-", "grpo_async", "cpu")
    for name in ("sync", "async"):
        arm = result[name]
        times = " ".join(f"{k} {arm['seconds'][k]:.2f}s" for k in TIMES)
        print(f"{name} (k={result['config']['max_staleness'][name]}): {arm['trajectories_per_second']:.2f} "
              f"trajectories/s over {arm['steady_steps']} steady steps ({times}); staleness "
              f"{arm['staleness_histogram']}, {arm['stale_dropped']} dropped; whole run "
              f"{arm['trajectories_per_second_whole_run']:.2f}/s in {arm['job_seconds']:.0f}s")
    print(f"ratio async/sync {result['ratio']:.3f} -> {path}")


if __name__ == "__main__":
    main()
