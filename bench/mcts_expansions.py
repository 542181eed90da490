"""MCTS expansions per second: our search (many trees at once, n-sample requests) vs the original's loop.

    .venv/bin/python -m bench.mcts_expansions [--model DIR] [--samples 20] [--workers 10] [--repeats 2]

Both arms run the same search code (vigorl_core.search.mcts.MCTS: same settings, same samples, same prompts)
against ONE PolicyServer replica (Ray Serve over vLLM AsyncLLM, prefix caching on, the same engine
settings), from Ray actors that reach it through PolicyClient:
- ours (what jobs.mcts runs in each actor): one actor searches every tree concurrently (asyncio); an
  expansion is one request with n = children, a child's first rollout step one with n = rollouts, so the
  engine batches the requests of all trees and shares each prompt's prefill among its samples;
- reference (the original's vlmsearch loop): `workers` processes (Ray actors, the original's
  multiprocessing.Pool(10)), each with a contiguous shard of the samples, searching one tree at a time
  and keeping one request in flight with n = 1 (k samples = k requests in a row), as the original's
  workers made serial OpenAI calls to one `vllm serve`.
Why one shared server for the baseline: the original's workers shared one server too, and `workers`
in-process engines would split the same cores and memory `workers` ways (an unfair, memory-bound
baseline here). The baseline keeps our token-in prompts and model-frame images (the original re-sent
base64 PNGs at file resolution on every call), so the ratio measures the request pattern only.

The teacher is the tiny random-weight model, unconstrained: its responses run to `max_tokens` and hardly
ever answer, so every simulation does the same work in both arms (one expansion of `children` nodes,
`rollouts` rollouts of `rollout_max_steps` steps each). Expansions = tree-node expansions (engine calls
that grow the tree). Arms alternate `repeats` times after a warm-up; the median wall time per arm is
reported. Writes runs/bench/mcts_expansions.json (--out).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from dataclasses import replace

from jobs.common import init_ray, set_runtime_env


class SerialTeacher:
    """The original's request pattern over `engine`: one request in flight per worker, n = 1 each."""

    def __init__(self, engine):
        self.engine, self.lock, self.version = engine, asyncio.Lock(), 0

    async def generate(self, prompt_ids, images, sampling, request_id=None):
        out = []
        for _ in range(sampling.n):
            async with self.lock:
                out += await self.engine.generate(prompt_ids, images, replace(sampling, n=1))
        return out


class Worker:
    """A search process: the teacher's tokenizer and a PolicyClient; runs a shard of trees."""

    def __init__(self, model: str, app: str, mcts: dict):
        from ray import serve

        from services.policy import PolicyClient
        from vigorl_core.rollout.chat_tokens import ChatTokens
        from vigorl_core.search.mcts import MCTSConfig

        self.chat = ChatTokens.from_pretrained(model)
        self.client = PolicyClient(serve.get_deployment_handle("PolicyServer", app))
        self.config = MCTSConfig.model_validate(mcts)

    async def run(self, samples: list[str], reference: bool) -> list[dict]:
        from vigorl_core.search.mcts import MCTS
        from vigorl_core.records import Sample

        mcts = MCTS(SerialTeacher(self.client) if reference else self.client, self.chat, config=self.config)
        items = [mcts.prepare(Sample.model_validate_json(s)) for s in samples]
        if reference:
            records = [await mcts.search(item) for item in items]  # one tree at a time
        else:
            records = await asyncio.gather(*(mcts.search(item) for item in items))
        return [{"status": r.status, "error": r.error, **r.stats} for r in records]


def _run_arm(workers, shards: list[list[str]], reference: bool) -> tuple[float, list[dict]]:
    import ray

    started = time.perf_counter()
    out = ray.get([w.run.remote(shard, reference) for w, shard in zip(workers, shards, strict=True)])
    seconds = time.perf_counter() - started
    trees = [t for shard in out for t in shard]
    bad = [t for t in trees if t["status"] != "ok"]
    if bad:
        raise RuntimeError(f"{len(bad)} searches failed, e.g. {bad[0]['error']}")
    return seconds, trees


def _summary(seconds: list[float], trees: list[dict]) -> dict:
    wall = statistics.median(seconds)
    total = {k: sum(t[k] for t in trees) for k in ("expansions", "generate_calls", "samples", "generated_tokens",
                                                   "nodes", "rollouts")}
    return {"expansions_per_s": total["expansions"] / wall, "tokens_per_s": total["generated_tokens"] / wall,
            "trees_per_s": len(trees) / wall, "seconds": seconds, "trees": len(trees),
            **{f"{k}_last_repeat": v for k, v in total.items()}}


def _main(args) -> dict:
    import ray
    from ray import serve

    from services.app import EngineSettings, policy_app
    from vigorl_core.search.mcts import MCTSConfig
    from vigorl_core.synthetic.tasks import write_dataset
    from vigorl_core.synthetic.tiny import build_tiny_model

    model = args.model or str(build_tiny_model(tempfile.mkdtemp(prefix="vigorl-bench-") + "/tiny"))
    data = write_dataset("visual_search", args.samples, 0, tempfile.mkdtemp(prefix="vigorl-bench-data-"))
    from vigorl_core.data import load_samples

    samples = [s.model_dump_json() for s in load_samples(data)]
    mcts = MCTSConfig(simulations=args.simulations, children=3, rollouts_per_child=2, max_depth=args.max_depth,
                      rollout_max_steps=args.rollout_max_steps, max_tokens=args.max_tokens, time_limit_s=None)
    engine = EngineSettings()
    init_ray(8)
    serve.start(proxy_location="Disabled", logging_config={"enable_access_log": False})
    serve.run(policy_app(model, engine), name="bench-mcts", route_prefix=None,
              logging_config={"enable_access_log": False})
    try:
        actor = ray.remote(num_cpus=0.1)(Worker)
        ours = [actor.remote(model, "bench-mcts", mcts.model_dump())]
        reference = [actor.remote(model, "bench-mcts", mcts.model_dump()) for _ in range(args.workers)]
        k = args.samples / args.workers
        shards = [samples[round(i * k):round((i + 1) * k)] for i in range(args.workers)]  # contiguous, as the original
        ray.get([w.__ray_ready__.remote() for w in ours + reference])
        _run_arm(ours, [samples[:4]], reference=False)  # warm-up: engine, encoder cache, handles
        _run_arm(reference[:2], [samples[:1], samples[1:2]], reference=True)
        seconds: dict[str, list[float]] = {"ours": [], "reference": []}
        trees: dict[str, list[dict]] = {}
        for _ in range(args.repeats):
            for name in ("ours", "reference"):
                wall, trees[name] = _run_arm(*((ours, [samples]) if name == "ours" else (reference, shards)),
                                             reference=name == "reference")
                seconds[name].append(wall)
                print(f"{name}: {wall:.1f} s, {sum(t['expansions'] for t in trees[name])} expansions", flush=True)
    finally:
        serve.delete("bench-mcts")
        ray.shutdown()
    result = {name: _summary(seconds[name], trees[name]) for name in ("ours", "reference")}
    return {
        "ratio": result["ours"]["expansions_per_s"] / result["reference"]["expansions_per_s"],
        "metric": "MCTS expansions per second (median wall time of repeats), ours / reference-style loop",
        **result,
        "config": {"model": args.model or "tiny (random weights)", "samples": args.samples,
                   "reference_workers": args.workers, "ours": "1 actor, all trees concurrent",
                   "repeats": args.repeats, "mcts": mcts.model_dump(mode="json"), "task": "visual_search (synthetic)",
                   "engine": {"server": "1 PolicyServer replica (Ray Serve), vLLM AsyncLLM in-process, prefix caching "
                                        "on", **engine.model_dump()}},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="teacher model folder (default: build the tiny model)")
    parser.add_argument("--samples", type=int, default=20)
    parser.add_argument("--workers", type=int, default=10, help="reference processes (the original used 10)")
    parser.add_argument("--simulations", type=int, default=3)
    parser.add_argument("--max-depth", type=int, default=3)
    parser.add_argument("--rollout-max-steps", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    from bench.common import add_out_argument

    add_out_argument(parser)
    args = parser.parse_args()
    set_runtime_env()
    from bench.common import write_result

    result = _main(args)
    path = write_result("mcts", "expansions", result, args.out)
    print(f"ours {result['ours']['expansions_per_s']:.2f} expansions/s, reference "
          f"{result['reference']['expansions_per_s']:.2f} expansions/s, ratio {result['ratio']:.2f} -> {path}")


if __name__ == "__main__":
    main()
