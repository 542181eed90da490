"""What the rollout driver's per-request sampling settings cost the engine, one setting at a time.

    python -m bench.engine_sampling --model /tmp/vigorl-3b --dtype bfloat16 --compile     # a GPU host
    .venv/bin/python -m bench.engine_sampling --requests 8 --max-tokens 32                 # CPU: the mechanism

One VLLMEngine, the same single-turn grounding prompts (one image each), all requests submitted at once,
temperature 1, up to `--max-tokens` each (a random-weight model rarely ends early; the JSON records the tokens each
arm generated). Arms, in order, each adding one setting that the
rollout driver sends with every request:
- plain: no log-probs, no seed, no stop strings, no logit bias (what `vllm.LLM.generate` users send);
- +bias: the logit bias that keeps vision special tokens out of samples;
- +logprobs: the sampled token's log-prob (the GRPO trainer needs it);
- +seed: a per-request seed (reproducible rollouts);
- +stop: the `</answer>` stop string (detokenizing every step to find it);
- rollout: all of them together, as the driver sends them.
Each arm runs `--repeats` times after one warm-up pass; tokens/s is the median. ratio = rollout / plain
(> 1 = better; below 1 says what the driver's settings cost). Writes runs/bench/engine_sampling_<name>.json
(--out).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from dataclasses import replace

from bench.common import write_result


async def _main(args) -> dict:
    from vigorl_core.rollout.chat_tokens import ChatTokens
    from vigorl_core.rollout.engine import EngineConfig, Sampling, VLLMEngine
    from vigorl_core.frames import get_profile, resize_to_model
    from vigorl_core.prompts import system_prompt, user_text
    from vigorl_core.synthetic.tasks import generate
    from vigorl_core.synthetic.tiny import build_tiny_model, model_profile_name

    model = args.model or str(build_tiny_model(tempfile.mkdtemp(prefix="vigorl-bench-") + "/tiny"))
    engine = await VLLMEngine.create(EngineConfig(model=model, dtype=args.dtype, enforce_eager=not args.compile,
                                                  gpu_memory_utilization=args.gpu_memory_utilization))
    chat = ChatTokens.from_pretrained(model)
    profile = get_profile(model_profile_name(model))
    system = system_prompt("grounding", "grounded")
    prompts = []
    for sample, image in generate("grounding", args.requests, seed=0):
        model_image, _ = resize_to_model(image, profile)
        prompts.append((chat.encode(chat.prompt_text(system, user_text(sample.question), 1)), model_image))
    bias = dict(engine._suppress)
    plain = Sampling(max_tokens=args.max_tokens, temperature=1.0, logprobs=False)
    rollout = replace(plain, logprobs=True, seed=0, stop=("</answer>",))
    arms = {
        "plain": (plain, False), "+bias": (plain, True), "+logprobs": (replace(plain, logprobs=True), False),
        "+seed": (replace(plain, seed=0), False), "+stop": (replace(plain, stop=("</answer>",)), False),
        "rollout": (rollout, True),
    }

    async def run(sampling: Sampling, with_bias: bool) -> tuple[float, int]:
        engine._suppress = bias if with_bias else {}
        started = time.perf_counter()
        outs = await asyncio.gather(*(
            engine.generate(ids, [image], replace(sampling, seed=None if sampling.seed is None else i))
            for i, (ids, image) in enumerate(prompts)))
        return time.perf_counter() - started, sum(len(g.token_ids) for gens in outs for g in gens)

    await run(rollout, True)  # warm-up: compilation paths, encoder cache shapes
    results = {}
    for name, (sampling, with_bias) in arms.items():
        runs = [await run(sampling, with_bias) for _ in range(args.repeats)]
        rates = [tokens / seconds for seconds, tokens in runs]
        results[name] = {"tokens_per_second": statistics.median(rates), "runs": [
            {"seconds": round(s, 3), "tokens": t} for s, t in runs]}
        print(f"{name:10s} {results[name]['tokens_per_second']:9.1f} tokens/s", flush=True)
    engine.shutdown()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="model folder (default: build the tiny model)")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--compile", action="store_true", help="CUDA graphs + torch.compile (GPU)")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.85)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--name", default="cpu")
    from bench.common import add_out_argument

    add_out_argument(parser)
    args = parser.parse_args()
    arms = asyncio.run(_main(args))
    result = {
        "ratio": arms["rollout"]["tokens_per_second"] / arms["plain"]["tokens_per_second"],
        "metric": "generated tokens per second, all requests at once, median of repeats; rollout / plain",
        "what": "baseline = plain sampling settings; new = the rollout driver's (logit bias, log-probs, seed, stop "
                "string); the arms between add one setting each",
        "arms": arms,
        "config": {k: getattr(args, k) for k in ("model", "dtype", "compile", "gpu_memory_utilization", "requests",
                                                 "max_tokens", "repeats")},
    }
    path = write_result("engine_sampling", args.name, result, args.out)
    print(f"ratio rollout/plain {result['ratio']:.3f} -> {path}")


if __name__ == "__main__":
    main()
