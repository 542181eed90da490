"""Evaluation throughput with 1 vs 2 PolicyServer replicas: same samples, same settings, same job code.

    .venv/bin/python -m bench.eval_replicas [--model DIR] [--grounding 96] [--visual-search 32]

Each arm runs the evaluation job (jobs/evaluate.py) in-process on one local Ray: it starts its own Serve
app of `replicas` PolicyServers (one vLLM engine each), evaluates synthetic grounding (single turn) and
visual search (multi-turn, 2 planned zooms: the tiny model has random weights) through the Ray Data pool
of EvalActors, and deletes the app. Engine start-up is not timed. The metric is samples/s from the first
written batch to the last (EvalActor start-up and the first batch excluded; the whole-run rate, which
includes them, is reported too). Writes runs/bench/eval_replicas.json (--out) with ratio = 2-replica / 1-replica
samples/s.

On a 2-core machine two CPU engines share the same two cores, so a second replica cannot add compute;
on a GPU cluster each replica is its own GPU and throughput scales until the EvalActors saturate.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

from jobs.common import set_runtime_env


def _config(args, model: str, runs: Path, replicas: int):
    from jobs.evaluate import EvalConfig

    return EvalConfig.model_validate({
        "run_name": f"replicas-{replicas}", "runs_dir": str(runs), "model": model,
        "benchmarks": [{"name": "synthetic_grounding", "limit": args.grounding},
                       {"name": "synthetic_visual_search", "limit": args.visual_search,
                        "sampling": {"max_tokens_per_turn": 128}}],
        "sampling": {"max_tokens_per_turn": args.max_tokens_per_turn, "max_response_tokens": 1024},
        "policy": {"replicas": replicas}, "actors": args.actors, "actor_cpus": 0.5,
        "batch_size": args.batch_size, "concurrency": args.concurrency, "examples": 0})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model folder (default: build the tiny model)")
    parser.add_argument("--grounding", type=int, default=256, help="single-turn synthetic grounding samples")
    parser.add_argument("--visual-search", type=int, default=64, help="multi-turn synthetic visual search samples")
    parser.add_argument("--max-tokens-per-turn", type=int, default=64)
    parser.add_argument("--actors", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--concurrency", type=int, default=16)
    from bench.common import add_out_argument

    add_out_argument(parser)
    args = parser.parse_args()
    set_runtime_env()
    os.environ.setdefault("VIGORL_PLANNED_ZOOMS", "2")  # the random-weight model zooms twice under a grammar
    import ray

    from bench.common import write_result
    from jobs.common import init_ray
    from jobs.evaluate import evaluate
    from vigorl_core.synthetic.tiny import build_tiny_model

    runs = Path(tempfile.mkdtemp(prefix="vigorl-bench-eval-"))
    model = args.model or str(build_tiny_model(runs / "models" / "tiny"))
    init_ray()
    arms = {}
    for replicas in (1, 2):
        stats = evaluate(_config(args, model, runs, replicas))
        arms[replicas] = {"samples_per_s": stats["steady_samples_per_s"], "whole_run_samples_per_s":
                          stats["samples_per_s"], "samples": stats["evaluated"], "seconds": stats["seconds"],
                          "errors": stats["errors"]}
    ray.shutdown()
    result = {
        "ratio": arms[2]["samples_per_s"] / arms[1]["samples_per_s"],
        "metric": "evaluated samples per second after the first written batch, 2 replicas / 1 replica",
        "replicas_1": arms[1], "replicas_2": arms[2],
        "config": {"model": "tiny (random weights)" if not args.model else args.model,
                   "grounding_samples": args.grounding, "visual_search_samples": args.visual_search,
                   "planned_zooms": 2, "max_tokens_per_turn": args.max_tokens_per_turn, "actors": args.actors,
                   "batch_size": args.batch_size, "concurrency": args.concurrency,
                   "engine": "vLLM AsyncLLM per PolicyServer replica, CPU build, eager, fp32"},
    }
    path = write_result("eval", "replicas", result, args.out)
    print(f"1 replica {arms[1]['samples_per_s']:.2f} samples/s, 2 replicas {arms[2]['samples_per_s']:.2f} "
          f"samples/s, ratio {result['ratio']:.2f} -> {path}")


if __name__ == "__main__":
    main()
