"""bench.trace_gaps on a hand-written Chrome trace: busy and idle time, gaps charged to the phase and operation that
launched the work ending them, host waits with the operation around them."""

from __future__ import annotations

import json

from bench.trace_gaps import load, report, summarize


def _x(name, cat, ts, dur, tid=1, **args):
    return {"ph": "X", "name": name, "cat": cat, "ts": ts, "dur": dur, "pid": 1, "tid": tid, "args": args}


def test_gaps_are_charged_to_the_launching_phase_and_op(tmp_path):
    events = [
        _x("vigorl.forward", "user_annotation", 0, 100),
        _x("aten::mm", "cpu_op", 5, 10),
        _x("cudaLaunchKernel", "cuda_runtime", 6, 2, correlation=1),
        _x("aten::item", "cpu_op", 20, 40),
        _x("cudaStreamSynchronize", "cuda_runtime", 21, 38),
        _x("aten::mm", "cpu_op", 70, 10),
        _x("cudaLaunchKernel", "cuda_runtime", 71, 2, correlation=2),
        _x("autograd::engine::evaluate_function: MmBackward0", "cpu_op", 110, 20, tid=2),
        _x("aten::mm", "cpu_op", 111, 10, tid=2),
        _x("cuLaunchKernel", "cuda_driver", 112, 2, tid=2, correlation=3),
        _x("gemm", "kernel", 10, 50, tid=7, correlation=1),     # busy 10-60
        _x("gemm", "kernel", 90, 20, tid=7, correlation=2),     # gap 60-90, launched in forward by aten::mm
        _x("triton_k", "kernel", 150, 10, tid=7, correlation=3),  # gap 110-150, from the autograd thread
    ]
    path = tmp_path / "trace.json"
    path.write_text(json.dumps({"traceEvents": events + [{"ph": "i", "name": "marker"}]}))
    summary = summarize(load(path))
    assert summary["wall_ms"] == 0.16 and summary["gpu_busy_ms"] == 0.08
    idle = {(r["phase"], r["op"]): r["ms"] for r in summary["idle_by_launcher"]}
    assert idle == {("vigorl.forward", "aten::mm"): 0.03, ("autograd thread", "aten::mm"): 0.04}
    [wait] = summary["host_waits"]
    assert (wait["call"], wait["phase"], wait["op"], wait["ms"]) == ("cudaStreamSynchronize", "vigorl.forward",
                                                                      "aten::item", 0.038)
    assert summary["host_phases_ms"] == {"vigorl.forward": 0.1}
    assert summary["top_gpu_work"][0] == {"name": "gemm", "ms": 0.07, "count": 2}
    assert "GPU busy 0.1 ms" in report(summary)
