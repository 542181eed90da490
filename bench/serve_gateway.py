"""Gateway overhead: `POST /v1/grounded` through Ray Serve vs calling the engine directly, same prompts.

    .venv/bin/python -m bench.serve_gateway [--model DIR] [--requests 32] [--repeats 2]

Both arms do the same work per request: decode a PNG (distinct per request, so no cache helps), resize
it to the model frame, run one single-turn grounded conversation greedily (temperature 0, so both arms
generate the same tokens) and shape the answer.
- direct (baseline): an in-process vLLM engine + the rollout driver, in this process, no HTTP;
- gateway (ours): HTTP -> Serve proxy -> Gateway -> ZoomServer (decode) -> PolicyServer (vLLM), the
  same engine settings in its own replica.
Concurrency 1 and 16; arms alternate per round, `repeats` rounds after a warm-up. Latency p50/p99 and
requests/s per arm and concurrency. `ratio` = direct p50 / gateway p50 at concurrency 1 (> 1 would mean
the gateway is faster; overhead = 1/ratio - 1). Writes runs/bench/serve_gateway_overhead.json (--out).

`hops_ms` splits the median request at concurrency 1 by hop: for the gateway from its `Server-Timing` header
(image decode in the ZoomServer, PolicyServer calls, the time the engine reported, the handler's total; the rest of
the client's latency is HTTP and the Serve proxy), for the direct arm from the same timing wrapper around its
engine (`vigorl_core.rollout.engine.TimedPolicy`).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import socket
import statistics
import time

from bench.common import percentile
from jobs.common import REPO_ROOT, set_runtime_env


def _hops(requests: list[dict[str, float]]) -> dict[str, float]:
    """Median milliseconds per hop over requests; `client_minus_total` is HTTP, the Serve proxy and (direct arm)
    nothing but the bench's own bookkeeping, `total_minus_policy` the handler's own work (prompt, response)
    plus the image hop, `policy_minus_engine` what reaching the engine costs (Serve handle, image protocol)."""
    split = {name: statistics.median(r[name] for r in requests) for name in requests[0]}
    split.update(client_minus_total=statistics.median(r["client"] - r["total"] for r in requests),
                 total_minus_policy=statistics.median(r["total"] - r["policy"] for r in requests),
                 policy_minus_engine=statistics.median(r["policy"] - r["engine"] for r in requests))
    return {k: round(v, 2) for k, v in split.items()}


async def _main(args) -> dict:
    import httpx

    from jobs.serve import start
    from services.schemas import parse_server_timing
    from services.app import ServeConfig
    from vigorl_core.rollout.chat_tokens import ChatTokens
    from vigorl_core.rollout.engine import EngineConfig, TimedPolicy, VLLMEngine
    from vigorl_core.images import ImageLimits, decode_image
    from vigorl_core.records import Sample
    from vigorl_core.rollout.driver import RolloutConfig, RolloutDriver
    from vigorl_core.synthetic.tasks import generate
    from vigorl_core.synthetic.tiny import build_tiny_model

    model = args.model or str(REPO_ROOT / "runs" / "models" / "tiny")
    if args.model is None and not (REPO_ROOT / "runs/models/tiny/vigorl_model.json").is_file():
        build_tiny_model(model)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # Both arms' engines share the machine (and the GPU on a GPU host: each takes a share of its memory).
    engine_settings = {"dtype": args.dtype, "enforce_eager": True if args.eager else None,
                       "gpu_memory_utilization": args.gpu_memory_utilization}
    url = start(ServeConfig(model=model, port=port, engine=engine_settings, policy_gpus=args.policy_gpus,
                            gateway_replicas=args.gateway_replicas, zoom_replicas=args.zoom_replicas))
    engine = await VLLMEngine.create(EngineConfig(model=model, **engine_settings))
    chat = ChatTokens.from_pretrained(model)
    config = RolloutConfig(mode="grounded", temperature=0.0, max_turns=1, max_tokens_per_turn=args.max_tokens,
                           score=False)

    requests = []
    for sample, image in generate("grounding", args.requests, seed=1):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        requests.append((sample.question, buffer.getvalue()))

    async def direct(query: str, png: bytes) -> tuple[int, dict[str, float]]:
        started = time.perf_counter()
        image = decode_image(png, ImageLimits(), "image")
        decoded = time.perf_counter()
        timed = TimedPolicy(engine)
        driver = RolloutDriver(timed, chat, config)
        sample = Sample(id="b", task="grounding", source="bench", images=[], question=query, answer="")
        [rollout] = await driver.rollout_group(driver.prepare(sample, [image]))
        hops = {"image": decoded - started, "policy": timed.seconds, "engine": timed.engine_seconds,
                "total": time.perf_counter() - started}
        return sum(rollout.record.loss_mask), {k: 1000 * v for k, v in hops.items()}

    client = httpx.AsyncClient(base_url=url, timeout=600)

    async def gateway(query: str, png: bytes) -> tuple[int, dict[str, float]]:
        body = {"image": "data:image/png;base64," + base64.b64encode(png).decode(), "query": query,
                "task": "grounding", "sampling": {"temperature": 0.0, "max_tokens": args.max_tokens}}
        response = await client.post("/v1/grounded", json=body)
        response.raise_for_status()
        return response.json()["usage"]["completion_tokens"], parse_server_timing(response.headers["Server-Timing"])

    async def measure(arm, concurrency: int) -> dict:
        gate = asyncio.Semaphore(concurrency)
        latencies: list[float] = []
        tokens: list[int] = []
        hops: list[dict[str, float]] = []

        async def one(query, png):
            async with gate:
                t0 = time.perf_counter()
                generated, request_hops = await arm(query, png)
                latencies.append(time.perf_counter() - t0)
                tokens.append(generated)
                hops.append({**request_hops, "client": 1000 * latencies[-1]})

        t0 = time.perf_counter()
        await asyncio.gather(*(one(q, p) for q, p in requests))
        return {"seconds": time.perf_counter() - t0, "latencies": latencies, "tokens": sum(tokens), "hops": hops}

    arms = {"direct": direct, "gateway": gateway}
    for arm in arms.values():  # warm-up
        await measure(arm, 4)
    runs: dict[tuple[str, int], list[dict]] = {}
    for _ in range(args.repeats):
        for concurrency in (1, 16):
            for name, arm in arms.items():
                runs.setdefault((name, concurrency), []).append(await measure(arm, concurrency))
    await client.aclose()
    engine.shutdown()

    summary: dict[str, dict] = {}
    for (name, concurrency), rounds in runs.items():
        latencies = [x for r in rounds for x in r["latencies"]]
        summary.setdefault(name, {})[f"concurrency_{concurrency}"] = {
            "p50_ms": 1000 * statistics.median(latencies), "p99_ms": 1000 * percentile(latencies, 0.99),
            "requests_per_s": statistics.median(len(r["latencies"]) / r["seconds"] for r in rounds),
            "generated_tokens_per_round": [r["tokens"] for r in rounds],
            "hops_ms": _hops([h for r in rounds for h in r["hops"]]),
        }
    d1, g1 = summary["direct"]["concurrency_1"], summary["gateway"]["concurrency_1"]
    d16, g16 = summary["direct"]["concurrency_16"], summary["gateway"]["concurrency_16"]
    return {
        "ratio": d1["p50_ms"] / g1["p50_ms"],
        "metric": "direct-engine p50 latency / gateway p50 latency, /v1/grounded single-turn, concurrency 1",
        "overhead_p50_c1": g1["p50_ms"] / d1["p50_ms"] - 1,
        "overhead_p50_c16": g16["p50_ms"] / d16["p50_ms"] - 1,
        "throughput_ratio_c16": g16["requests_per_s"] / d16["requests_per_s"],
        "direct": summary["direct"], "gateway": summary["gateway"],
        "config": {"model": "tiny (random weights)" if args.model is None else args.model,
                   "requests_per_round": args.requests, "repeats": args.repeats, "max_tokens": args.max_tokens,
                   "task": "grounding (400x300 synthetic PNGs, distinct per request)", "temperature": 0.0,
                   "engine": "vLLM AsyncLLM, " + args.dtype + (", eager" if args.eager else ", EngineConfig's "
                             "defaults (compiled on a GPU, eager on CPU)") + "; gateway arm in a Serve replica, "
                             "direct arm in-process",
                   "gpu_memory_utilization": args.gpu_memory_utilization, "policy_gpus": args.policy_gpus,
                   "gateway_replicas": args.gateway_replicas, "zoom_replicas": args.zoom_replicas},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model folder (default: runs/models/tiny, built if missing)")
    parser.add_argument("--requests", type=int, default=32, help="requests per round and arm")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--dtype", default="float32", help="bfloat16 on GPUs")
    parser.add_argument("--eager", action="store_true", help="no CUDA graphs on a GPU (the default compiles there)")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.4, help="per engine (two share a GPU)")
    parser.add_argument("--policy-gpus", type=float, default=0.0, help="GPUs of the Serve replica (1 on a GPU host)")
    parser.add_argument("--gateway-replicas", type=int, default=1, help="Gateway replicas (ServeConfig)")
    parser.add_argument("--zoom-replicas", type=int, default=1, help="ZoomServer replicas (ServeConfig)")
    parser.add_argument("--name", default="gateway_overhead", help="result file serve_<name>.json in --out")
    from bench.common import add_out_argument

    add_out_argument(parser)
    args = parser.parse_args()
    set_runtime_env()
    from bench.common import write_result

    result = asyncio.run(_main(args))
    path = write_result("serve", args.name, result, args.out)
    for c in (1, 16):
        d, g = result["direct"][f"concurrency_{c}"], result["gateway"][f"concurrency_{c}"]
        print(f"concurrency {c:>2}: direct p50 {d['p50_ms']:.0f} ms p99 {d['p99_ms']:.0f} ms {d['requests_per_s']:.1f} "
              f"req/s | gateway p50 {g['p50_ms']:.0f} ms p99 {g['p99_ms']:.0f} ms {g['requests_per_s']:.1f} req/s")
    for name in ("direct", "gateway"):
        print(f"{name} hops at c=1 (median ms): {result[name]['concurrency_1']['hops_ms']}")
    print(f"gateway overhead at p50: {100 * result['overhead_p50_c1']:.1f}% (c=1), "
          f"{100 * result['overhead_p50_c16']:.1f}% (c=16); ratio {result['ratio']:.3f} -> {path}")


if __name__ == "__main__":
    main()
