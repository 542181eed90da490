"""Where the GPU idles in a torch.profiler Chrome trace, and what the host was doing then.

    python -m bench.trace_gaps runs/sft/<run>/profile/rank0-steps5-5.json [--top 12] [--json summary.json]

The SFT job writes such a trace with `--profile_steps A B` (its loop's phases are annotated vigorl.data, .forward,
.backward, .step); `python -m bench.sft_throughput --gpu --trace-step N` runs the job with it and summarizes it.
A GPU idles between two of its events (kernels, copies, memsets) when the host had not launched the next one yet.
Each gap is charged to the host code that launched the event ending it: the job's annotated phase (or the autograd
thread, for backward kernels) and the outermost operation there. Host waits (stream, device and event
synchronisations, blocking copies) are listed with the operation they sit in: after each, the GPU has nothing
queued, so the gap that follows is the host's time to launch again.
"""

from __future__ import annotations

import argparse
import gzip
import json
from collections import defaultdict
from pathlib import Path

GPU_CATS = ("kernel", "gpu_memcpy", "gpu_memset")
HOST_CATS = ("cpu_op", "user_annotation", "python_function")
LAUNCH_CATS = ("cuda_runtime", "cuda_driver")  # Triton launches through the driver API
WAITS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy", "cudaMemcpyAsync")


def load(path: str | Path) -> list[dict]:
    """The complete ("X") events of a Chrome trace file (.json or .json.gz)."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt") as f:
        data = json.load(f)
    events = data["traceEvents"] if isinstance(data, dict) else data
    return [e for e in events if e.get("ph") == "X" and "dur" in e]


def _enclosing(events: list[tuple], queries: list[tuple[float, int]]) -> dict[int, list[tuple]]:
    """For each (time, id) query, the events (start, end, name, cat) of one thread that contain that time,
    outermost first (one thread's events nest)."""
    events = sorted(events, key=lambda e: (e[0], -e[1]))
    out, stack, i = {}, [], 0
    for t, qid in sorted(queries):
        while i < len(events) and events[i][0] <= t:
            while stack and stack[-1][1] < events[i][0]:
                stack.pop()
            stack.append(events[i])
            i += 1
        out[qid] = [e for e in stack if e[1] >= t]
    return out


def _where(stack: list[tuple]) -> tuple[str, str]:
    """(phase, outermost operation) of a host stack from _enclosing."""
    phases = [e[2] for e in stack if e[2].startswith("vigorl.")]
    ops = [e[2] for e in stack if e[3] == "cpu_op" and not e[2].startswith("vigorl.")]
    if phases:
        phase = phases[-1]
    elif any(op.startswith("autograd::engine") for op in ops):
        phase = "autograd thread"
    else:
        phase = "other"
    inside = [op for op in ops if not op.startswith("autograd::engine")] or ops
    return phase, (inside[0] if inside else "-")


def summarize(events: list[dict], top: int = 12, min_gap_us: float = 20.0) -> dict:
    """Busy and idle time of the GPU over the trace, the idle time by host phase and operation, host waits and
    the kernels that take the most time (times in ms)."""
    gpu = sorted((e["ts"], e["ts"] + e["dur"], e) for e in events if e.get("cat") in GPU_CATS)
    host = [e for e in events if e.get("cat") in HOST_CATS + LAUNCH_CATS]
    start = min(e["ts"] for e in events)
    end = max(e["ts"] + e["dur"] for e in events)
    busy, gaps, cursor = 0.0, [], None
    for s, t, e in gpu:
        if cursor is None or s > cursor:
            if cursor is not None and s - cursor >= min_gap_us:
                gaps.append((cursor, s, e))
            busy += t - s
            cursor = t
        elif t > cursor:
            busy += t - cursor
            cursor = t
    runtime = {e.get("args", {}).get("correlation"): e for e in host if e.get("cat") in LAUNCH_CATS}
    by_thread: dict[tuple, list[tuple]] = defaultdict(list)
    for e in host:
        if e.get("cat") in HOST_CATS:
            by_thread[(e["pid"], e["tid"])].append((e["ts"], e["ts"] + e["dur"], e["name"], e["cat"]))
    queries: dict[tuple, list[tuple[float, int]]] = defaultdict(list)
    for i, (_, _, e) in enumerate(gaps):
        launch = runtime.get(e.get("args", {}).get("correlation"))
        if launch is not None:
            queries[(launch["pid"], launch["tid"])].append((launch["ts"], i))
    waits = [e for e in host if e.get("cat") in LAUNCH_CATS and e["name"] in WAITS and e["dur"] >= min_gap_us]
    for i, e in enumerate(waits):
        queries[(e["pid"], e["tid"])].append((e["ts"], len(gaps) + i))
    stacks: dict[int, list[tuple]] = {}
    for thread, qs in queries.items():
        stacks.update(_enclosing(by_thread.get(thread, []), qs))
    idle_by: dict[tuple, list[float]] = defaultdict(lambda: [0.0, 0])
    for i, (s, t, _) in enumerate(gaps):
        key = _where(stacks.get(i, []))
        idle_by[key][0] += (t - s) / 1e3
        idle_by[key][1] += 1
    wait_by: dict[tuple, list[float]] = defaultdict(lambda: [0.0, 0])
    for i, e in enumerate(waits):
        key = (e["name"], *_where(stacks.get(len(gaps) + i, [])))
        wait_by[key][0] += e["dur"] / 1e3
        wait_by[key][1] += 1
    kernels: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for s, t, e in gpu:
        kernels[e["name"][:90]][0] += (t - s) / 1e3
        kernels[e["name"][:90]][1] += 1
    phases = defaultdict(float)
    for e in host:
        if e.get("cat") == "user_annotation" and e["name"].startswith("vigorl."):
            phases[e["name"]] += e["dur"] / 1e3

    def ranked(table, names):
        rows = sorted(table.items(), key=lambda kv: -kv[1][0])[:top]
        return [{**dict(zip(names, k if isinstance(k, tuple) else (k,))), "ms": round(v[0], 3), "count": v[1]}
                for k, v in rows]

    return {
        "wall_ms": round((end - start) / 1e3, 3),
        "gpu_busy_ms": round(busy / 1e3, 3),
        "gpu_idle_ms": round((end - start - busy) / 1e3, 3),
        "gpu_busy_share": busy / (end - start) if end > start else 0.0,
        "gaps_counted": len(gaps), "min_gap_ms": min_gap_us / 1e3,
        "idle_by_launcher": ranked(idle_by, ("phase", "op")),
        "host_waits": ranked(wait_by, ("call", "phase", "op")),
        "host_phases_ms": {k: round(v, 3) for k, v in sorted(phases.items())},
        "top_gpu_work": ranked(kernels, ("name",)),
    }


def report(summary: dict) -> str:
    lines = [f"wall {summary['wall_ms']:.1f} ms, GPU busy {summary['gpu_busy_ms']:.1f} ms "
             f"({100 * summary['gpu_busy_share']:.1f}%), idle {summary['gpu_idle_ms']:.1f} ms",
             "GPU idle (gaps >= %.3f ms) by the host code that launched the next GPU work:" % summary["min_gap_ms"]]
    lines += [f"  {r['ms']:9.2f} ms {r['count']:6d}x  {r['phase']:18s} {r['op']}" for r in summary["idle_by_launcher"]]
    lines.append("host waits on the GPU:")
    lines += [f"  {r['ms']:9.2f} ms {r['count']:6d}x  {r['call']:22s} {r['phase']:18s} {r['op']}"
              for r in summary["host_waits"]]
    lines.append("host time per phase: " + ", ".join(f"{k} {v:.1f} ms" for k, v in summary["host_phases_ms"].items()))
    lines.append("GPU work:")
    lines += [f"  {r['ms']:9.2f} ms {r['count']:6d}x  {r['name']}" for r in summary["top_gpu_work"]]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trace", help="a torch.profiler Chrome trace (.json or .json.gz)")
    parser.add_argument("--top", type=int, default=12, help="rows per table")
    parser.add_argument("--json", default=None, help="also write the summary here")
    args = parser.parse_args()
    summary = summarize(load(args.trace), top=args.top)
    print(report(summary))
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1) + "\n")


if __name__ == "__main__":
    main()
