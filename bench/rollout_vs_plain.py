"""The rollout driver against plain vLLM on the same model, prompts, sampling and token counts, in one run.

    python -m bench.rollout_vs_plain --model /tmp/vigorl-3b --name gpu     # a GPU host: bench/rollout_vs_plain_gpu.sh
    .venv/bin/python -m bench.rollout_vs_plain --prompts 2 --group-size 2 --max-tokens 16 --mt-prompts 2 \\
        --mt-group-size 2 --max-think-chars 40 --name cpu                   # CPU, tiny model: the mechanism only

Arms (every request of an arm submitted at once; generated tokens per second of wall time):
- driver single-turn: `RolloutDriver(mode="grounded")` over the project's `VLLMEngine` with its defaults
  (EngineConfig: compiled, bf16, 16,384 batched tokens, 1,024 sequences on a GPU), `--prompts` prompts x
  `--group-size` samples (one n-sample call per group), up to `--max-tokens` each, scored as in GRPO;
- driver multi-turn, the paper's multi-turn workload: at most 5 turns, 1,024 tokens a turn, 4,096 response
  tokens counting observation and crop tokens. A random-weight model never calls the zoom tool, so turns follow
  a zoom plan of 0-4 zooms (PlannedTurnsEngine: a regex per turn, the one structured-output constraint);
  the text, points and lengths are sampled. `--mt-prompts` x `--mt-group-size` conversations;
- plain single-turn: `vllm.LLM.generate` with vLLM's own offline defaults, the same prompts and images,
  n = group size, the same temperature / top_p, exactly `--max-tokens` each (ignore_eos);
- plain multi-turn: every engine request the multi-turn driver made (each turn's whole conversation with its
  images), all at once, each sample exactly as many tokens as the driver's turn generated, no grammar. It
  is an upper bound: no turn waits for the turn before it;
- raw-engine arms (`engine_raw_*`): the same requests straight into the driver's own AsyncLLM, no driver:
  separates what the engine settings cost from what the driver costs; `engine_raw_multi_turn_grammar` sends
  the driver's multi-turn requests verbatim (grammar included), all at once.
ratio = driver multi-turn / plain multi-turn tokens/s (> 1 = better); `single_turn_vs_plain` is the same
for the single-turn arms. Cache counters (prefix cache, multimodal processor cache) are vLLM's Prometheus
counters, per arm. The plain arms run in a subprocess after the driver's engine is shut down (one engine on
the GPU at a time). Writes runs/bench/rollout_vs_plain_<name>.json (--out).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import pickle
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

from jobs.common import set_runtime_env

CACHE_COUNTERS = ("prefix_cache_queries", "prefix_cache_hits", "mm_cache_queries", "mm_cache_hits", "prompt_tokens",
                  "generation_tokens", "num_preemptions")


def cache_counters() -> dict[str, float]:
    """vLLM's Prometheus counters of this process (summed over engines and labels)."""
    from vllm.v1.metrics.reader import Counter as PromCounter
    from vllm.v1.metrics.reader import get_metrics_snapshot

    out = dict.fromkeys(CACHE_COUNTERS, 0.0)
    for metric in get_metrics_snapshot():
        name = metric.name.removeprefix("vllm:").removesuffix("_total")
        if name in out and isinstance(metric, PromCounter):
            out[name] += metric.value
    return out


def counter_delta(before: dict, after: dict) -> dict:
    delta = {k: after[k] - before[k] for k in CACHE_COUNTERS}
    for kind in ("prefix_cache", "mm_cache"):
        queries = delta[f"{kind}_queries"]
        delta[f"{kind}_hit_rate"] = delta[f"{kind}_hits"] / queries if queries else None
    return delta


def timed(seconds: list[float], tokens: list[int], caches: list[dict]) -> dict:
    """An arm's figures: the median repeat's tokens/s, every repeat's raw numbers."""
    rates = [t / s for s, t in zip(seconds, tokens)]
    mid = sorted(range(len(rates)), key=rates.__getitem__)[len(rates) // 2]
    return {"tokens_per_second": rates[mid], "seconds": [round(s, 3) for s in seconds], "tokens": tokens,
            "cache": caches[mid]}


class LoopLag:
    """Host work on the driver's critical path: how late a 5 ms ticker on the driver's event loop (which also runs
    AsyncLLM's input processing and output handling) wakes up."""

    def __enter__(self):
        self.blocked, self.worst = 0.0, 0.0
        self._task = asyncio.get_running_loop().create_task(self._tick())
        return self

    async def _tick(self):
        while True:
            t0 = time.perf_counter()
            await asyncio.sleep(0.005)
            late = time.perf_counter() - t0 - 0.005
            self.blocked += late
            self.worst = max(self.worst, late)

    def __exit__(self, *exc):
        self._task.cancel()

    def report(self) -> dict:
        return {"loop_late_seconds": round(self.blocked, 3), "loop_late_max_seconds": round(self.worst, 4)}


class Recorder:
    """PolicyEngine wrapper that keeps every request (ids, images, sampling) and the lengths it generated."""

    def __init__(self, engine):
        self.engine, self.calls = engine, []

    @property
    def version(self) -> int:
        return self.engine.version

    async def generate(self, prompt_ids, images, sampling, request_id=None):
        gens = await self.engine.generate(prompt_ids, images, sampling, request_id)
        self.calls.append((list(prompt_ids), list(images), sampling, [len(g.token_ids) for g in gens]))
        return gens

    async def abort(self, request_id):
        await self.engine.abort(request_id)


# ------------------------------------------------------------------------------------ the driver's arms


async def driver_arms(args) -> tuple[dict, dict]:
    """Driver (and raw-engine) arms on one VLLMEngine; returns (results, what the plain subprocess replays)."""
    from vigorl_core.rollout.chat_tokens import ChatTokens
    from vigorl_core.rollout.engine import EngineConfig, VLLMEngine
    from vigorl_core.rollout.planned import PlannedTurnsEngine
    from vigorl_core.rollout.driver import RolloutConfig, RolloutDriver
    from vigorl_core.synthetic.tasks import generate
    from vllm.platforms import current_platform

    config = EngineConfig(model=args.model, max_model_len=args.max_model_len, dtype=args.dtype,
                          enforce_eager=True if args.eager else None,
                          gpu_memory_utilization=args.gpu_memory_utilization)
    started = time.perf_counter()
    engine = await VLLMEngine.create(config)
    start_seconds = time.perf_counter() - started
    chat = ChatTokens.from_pretrained(args.model)
    single = RolloutConfig(mode="grounded", group_size=args.group_size, temperature=1.0, top_p=args.top_p,
                           max_tokens_per_turn=args.max_tokens, max_response_tokens=args.max_tokens)
    multi = RolloutConfig(mode="multiturn", group_size=args.mt_group_size, temperature=1.0, top_p=args.top_p,
                          max_turns=5, max_images=5, max_tokens_per_turn=1024, max_response_tokens=4096)
    st_driver = RolloutDriver(engine, chat, single)
    st = [st_driver.prepare(s, [im]) for s, im in generate("grounding", args.prompts, seed=0)]
    recorder = Recorder(engine)
    planned = PlannedTurnsEngine(recorder, chat.tokenizer, max_zooms=4, max_think_chars=args.max_think_chars)
    mt_driver = RolloutDriver(planned, chat, multi)
    mt = [mt_driver.prepare(s, [im]) for s, im in generate("visual_search", args.mt_prompts, seed=0)]

    async def run_driver(driver, prepared):
        before, t0 = cache_counters(), time.perf_counter()
        with LoopLag() as lag:
            groups = [g async for g in driver.run(prepared, concurrency=len(prepared))]
        seconds = time.perf_counter() - t0
        records = [r.record for g in groups for r in g]
        cache = {**counter_delta(before, cache_counters()), **lag.report()}
        return seconds, sum(sum(r.loss_mask) for r in records), cache, records

    # Warm-up: compiled shapes, the grammar compiler, the encoder at these image sizes.
    for logprobs in (False, True):
        await run_driver(RolloutDriver(engine, chat, replace(single, max_tokens_per_turn=16, max_response_tokens=16,
                                                             logprobs=logprobs)), st[:4])
    await run_driver(mt_driver, mt[:2])
    results: dict = {}
    logprob_arms = {"driver_single_turn": single}
    if args.logprob_arm:
        logprob_arms["driver_single_turn_logprobs"] = replace(single, logprobs=True)
    for name, cfg in logprob_arms.items():
        runs = [await run_driver(RolloutDriver(engine, chat, cfg), st) for _ in range(args.repeats)]
        results[name] = timed(*[[r[i] for r in runs] for i in range(3)])
        results[name]["finish"] = dict(Counter(r.finish for r in runs[0][3]))
        print(f"{name}: {results[name]['tokens_per_second']:.0f} tokens/s", flush=True)
    recorder.calls.clear()
    seconds, tokens, cache, records = await run_driver(mt_driver, mt)
    mt_calls = list(recorder.calls)
    results["driver_multi_turn"] = {
        **timed([seconds], [tokens], [cache]), "conversations": len(records),
        "turn_histogram": {str(t): sum(r.num_turns == t for r in records) for t in range(1, 6)},
        "finish": dict(Counter(r.finish for r in records)),
        "engine_calls": len(mt_calls), "prompt_tokens_sent": sum(len(c[0]) for c in mt_calls),
        "response_tokens_mean": statistics.fmean(len(r.train_ids) - r.prompt_len for r in records),
        "turn_tokens_mean": tokens / max(1, sum(r.num_turns for r in records)),
        "longest_conversation": _longest(records),
    }
    print(f"driver_multi_turn: {results['driver_multi_turn']['tokens_per_second']:.0f} tokens/s, turns "
          f"{results['driver_multi_turn']['turn_histogram']}", flush=True)

    # The same requests straight into the engine's AsyncLLM (no driver, no grammar, all at once).
    st_requests = [(p.prompt_ids, p.images, args.group_size, [args.max_tokens] * args.group_size) for p in st]
    mt_requests = [(ids, images, 1, [n]) for ids, images, _, lengths in mt_calls for n in lengths if n]
    if args.raw_arms:
        for name, requests in (("engine_raw_single_turn", st_requests), ("engine_raw_multi_turn", mt_requests)):
            before, t0 = cache_counters(), time.perf_counter()
            outs = await asyncio.gather(*(_raw(engine, i, req, args.top_p) for i, req in enumerate(requests)))
            results[name] = timed([time.perf_counter() - t0], [sum(outs)], [counter_delta(before, cache_counters())])
            print(f"{name}: {results[name]['tokens_per_second']:.0f} tokens/s", flush=True)
        # The driver's multi-turn requests verbatim (the zoom plan's grammar, stops, n-sample first turns), all
        # at once: what the grammar costs without the turns waiting on each other. Lengths are sampled again.
        before, t0 = cache_counters(), time.perf_counter()
        outs = await asyncio.gather(*(engine.generate(ids, images, replace(sampling, n=len(lengths)))
                                      for ids, images, sampling, lengths in mt_calls))
        results["engine_raw_multi_turn_grammar"] = timed(
            [time.perf_counter() - t0], [sum(len(g.token_ids) for gens in outs for g in gens)],
            [counter_delta(before, cache_counters())])
        print(f"engine_raw_multi_turn_grammar: {results['engine_raw_multi_turn_grammar']['tokens_per_second']:.0f} "
              "tokens/s", flush=True)
    scheduler = engine._llm.vllm_config.scheduler_config
    compilation = engine._llm.vllm_config.compilation_config
    results["driver_engine"] = {
        "start_seconds": round(start_seconds, 1), "engine_args": {
            k: v for k, v in config.engine_args(gpu=current_platform.is_cuda_alike()).items()
            if k not in ("model", "tokenizer")},
        "max_num_batched_tokens": scheduler.max_num_batched_tokens, "max_num_seqs": scheduler.max_num_seqs,
        "enforce_eager": engine._llm.vllm_config.model_config.enforce_eager,
        "cudagraph_mode": str(getattr(compilation, "cudagraph_mode", None)),
        "dtype": str(engine._llm.vllm_config.model_config.dtype)}
    engine.shutdown()
    replay = {"single": st_requests, "multi": mt_requests, "top_p": args.top_p, "model": args.model,
              "dtype": str(results["driver_engine"]["dtype"]).removeprefix("torch."),
              "eager": results["driver_engine"]["enforce_eager"], "max_model_len": args.max_model_len,
              "gpu_memory_utilization": args.gpu_memory_utilization}
    return results, replay


def _longest(records) -> dict:
    """The conversation that took longest: the critical path of an arm whose turns wait on each other."""
    r = max(records, key=lambda rec: rec.timings["seconds"])
    return {"seconds": round(r.timings["seconds"], 2), "engine_seconds": round(r.timings["engine_seconds"], 2),
            "turns": r.num_turns, "generated_tokens": sum(r.loss_mask)}


async def _raw(engine, index, request, top_p) -> int:
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    ids, images, n, lengths = request
    params = SamplingParams(n=n, temperature=1.0, top_p=top_p, max_tokens=max(lengths), min_tokens=min(lengths),
                            ignore_eos=True, skip_special_tokens=False, output_kind=RequestOutputKind.FINAL_ONLY)
    final = None
    async for out in engine._outputs(ids, images, params, f"raw-{index}"):
        final = out
    return sum(len(c.token_ids) for c in final.outputs)


# ------------------------------------------------------------------------------------ the plain arms


def plain_arms(replay_path: str) -> None:
    """Subprocess: `vllm.LLM` with vLLM's own defaults; the single-turn prompts, then the multi-turn replay."""
    from vllm import LLM, SamplingParams

    replay = pickle.loads(Path(replay_path).read_bytes())
    started = time.perf_counter()
    llm = LLM(model=replay["model"], dtype=replay["dtype"], max_model_len=replay["max_model_len"], seed=0,
              enforce_eager=replay["eager"], gpu_memory_utilization=replay["gpu_memory_utilization"],
              limit_mm_per_prompt={"image": 8, "video": 0}, disable_log_stats=False)
    start_seconds = time.perf_counter() - started

    def run(requests):
        prompts, params = [], []
        for ids, images, n, lengths in requests:
            prompts.append({"prompt_token_ids": list(ids), "multi_modal_data": {"image": list(images)}})
            params.append(SamplingParams(n=n, temperature=1.0, top_p=replay["top_p"], max_tokens=max(lengths),
                                         min_tokens=min(lengths), ignore_eos=True, skip_special_tokens=False))
        before, t0 = cache_counters(), time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        seconds = time.perf_counter() - t0
        tokens = sum(len(c.token_ids) for o in outs for c in o.outputs)
        return seconds, tokens, counter_delta(before, cache_counters())

    run(replay["single"][:4])  # warm-up
    results = {}
    for name in ("single", "multi"):
        seconds, tokens, cache = run(replay[name])
        results[f"plain_{name}_turn"] = timed([seconds], [tokens], [cache])
        print(f"plain_{name}_turn: {tokens / seconds:.0f} tokens/s", flush=True)
    cfg = llm.llm_engine.vllm_config
    results["plain_engine"] = {"start_seconds": round(start_seconds, 1),
                               "max_num_batched_tokens": cfg.scheduler_config.max_num_batched_tokens,
                               "max_num_seqs": cfg.scheduler_config.max_num_seqs,
                               "enforce_eager": cfg.model_config.enforce_eager,
                               "enable_prefix_caching": cfg.cache_config.enable_prefix_caching,
                               "dtype": str(cfg.model_config.dtype)}
    Path(replay_path + ".json").write_text(json.dumps(results))


# ------------------------------------------------------------------------------------ main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="model folder (default: build the tiny model)")
    parser.add_argument("--dtype", default=None, help="default: EngineConfig's (bfloat16 on GPU, float32 on CPU)")
    parser.add_argument("--eager", action="store_true", help="force eager (default: EngineConfig's, compiled on GPU)")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.85)
    parser.add_argument("--max-model-len", type=int, default=8192, help="prompt + 4096 response tokens must fit")
    parser.add_argument("--prompts", type=int, default=64, help="single-turn prompts")
    parser.add_argument("--group-size", type=int, default=5, help="single-turn samples per prompt (paper: 5)")
    parser.add_argument("--max-tokens", type=int, default=1024, help="single-turn tokens per sample")
    parser.add_argument("--mt-prompts", type=int, default=32, help="multi-turn prompts")
    parser.add_argument("--mt-group-size", type=int, default=8, help="multi-turn samples per prompt (paper: 8)")
    parser.add_argument("--max-think-chars", type=int, default=600, help="longest sampled thought per planned turn")
    parser.add_argument("--top-p", type=float, default=0.99)
    parser.add_argument("--repeats", type=int, default=1, help="repeats of the single-turn driver arms")
    parser.add_argument("--logprob-arm", action=argparse.BooleanOptionalAction, default=True,
                        help="also a single-turn driver arm that asks for log-probs")
    parser.add_argument("--raw-arms", action=argparse.BooleanOptionalAction, default=True,
                        help="also the requests straight into the driver's AsyncLLM")
    parser.add_argument("--name", default="cpu", help="result file rollout_vs_plain_<name>.json in --out")
    parser.add_argument("--plain-worker", default=None, help=argparse.SUPPRESS)
    from bench.common import add_out_argument

    add_out_argument(parser)
    args = parser.parse_args()
    set_runtime_env()
    if args.plain_worker:
        return plain_arms(args.plain_worker)
    from bench.common import write_result
    from vigorl_core.synthetic.tiny import build_tiny_model

    args.model = args.model or str(build_tiny_model(tempfile.mkdtemp(prefix="vigorl-bench-") + "/tiny"))
    results, replay = asyncio.run(driver_arms(args))
    # kept if the plain arms fail
    partial = write_result("rollout_vs_plain", f"{args.name}.partial", {"arms": results}, args.out)
    with tempfile.TemporaryDirectory(prefix="vigorl-plain-") as tmp:
        path = f"{tmp}/replay.pkl"
        Path(path).write_bytes(pickle.dumps(replay))
        subprocess.run([sys.executable, "-m", "bench.rollout_vs_plain", "--plain-worker", path], check=True)
        results.update(json.loads(Path(path + ".json").read_text()))
    rate = {name: arm["tokens_per_second"] for name, arm in results.items() if "tokens_per_second" in arm}
    result = {
        "ratio": rate["driver_multi_turn"] / rate["plain_multi_turn"],
        "metric": "generated tokens per second of wall time; driver multi-turn / plain vLLM (vllm.LLM.generate) on "
                  "the driver's own requests, all at once, same token counts",
        "single_turn_vs_plain": rate["driver_single_turn"] / rate["plain_single_turn"],
        "goals": {"single_turn_vs_plain >= 0.9": rate["driver_single_turn"] / rate["plain_single_turn"] >= 0.9,
                  "multi_turn_vs_plain >= 0.8": rate["driver_multi_turn"] / rate["plain_multi_turn"] >= 0.8},
        "what": "baseline = plain vLLM (vllm.LLM.generate, vLLM's offline defaults), new = the project's rollout "
                "driver on its VLLMEngine with EngineConfig defaults; engine_raw_* = the same requests straight into "
                "the driver's AsyncLLM",
        "arms": results,
        "config": {k: getattr(args, k) for k in ("model", "dtype", "eager", "gpu_memory_utilization", "max_model_len",
                                                 "prompts", "group_size", "max_tokens", "mt_prompts", "mt_group_size",
                                                 "max_think_chars", "top_p", "repeats")}
                  | {"multi_turn": "max_turns 5, max_images 5, 1024 tokens/turn, 4096 response tokens incl. "
                                   "observation and crop tokens; PlannedTurnsEngine 0-4 zooms; task visual_search",
                     "single_turn": "grounded, task grounding, one image", "temperature": 1.0,
                     "engine_logprobs": "off in the driver arms except driver_single_turn_logprobs"},
    }
    out = write_result("rollout_vs_plain", args.name, result, args.out)
    partial.unlink()
    print(f"ratio multi-turn driver/plain {result['ratio']:.3f}, single-turn {result['single_turn_vs_plain']:.3f} "
          f"-> {out}")


if __name__ == "__main__":
    main()
