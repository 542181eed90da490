"""Shared plumbing of bench scripts: provenance for result files, the JSON writer and its `--out` option, and
the percentile that latency and turn-length figures are reported with.

A bench writes its result to `--out` (default runs/bench/, git-ignored), so a trial run never touches the
committed results; `--out bench/results` updates them, for a run meant to be committed."""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"  # committed results: written only when --out names it
DEFAULT_OUT = Path(__file__).resolve().parent.parent / "runs" / "bench"


def percentile(values: list[float], q: float) -> float:
    """The q-quantile (0 <= q <= 1) of `values` by nearest rank: one of the values, never an interpolation."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


class StackSampler:
    """Where a thread spends its time, sampled: every `interval` s another thread reads that thread's stack
    (`sys._current_frames`). Each sample stands for the time since the previous one (a thread running Python holds
    the GIL, so the sampler wakes late then: counting samples would under-weight busy time). A sample whose innermost
    frame waits in `selectors` (an event loop with nothing to do) is idle time. `report()` gives, over the busy
    time, the functions most often innermost (`self`) and anywhere on the stack (`inclusive`), as fractions of all
    the time sampled. Costs one stack walk per sample.

        with StackSampler() as sampler:   # samples the thread that entered it
            ...
        sampler.report()
    """

    def __init__(self, interval: float = 0.002, top: int = 25):
        self.interval, self.top = interval, top
        self.samples, self.total, self.idle = 0, 0.0, 0.0
        self.own: dict[str, float] = {}
        self.anywhere: dict[str, float] = {}

    @staticmethod
    def _name(code) -> str:
        path = code.co_filename.replace("\\", "/")
        for root in ("site-packages/", "/vigorl_core/", "/bench/", "/jobs/", "/lib/python"):
            if root in path:
                path = path.split(root, 1)[1]
                break
        return f"{path}:{code.co_name}"

    def _run(self, ident: int) -> None:
        import sys
        import time

        last = time.perf_counter()
        while not self._stop.wait(self.interval):
            frame = sys._current_frames().get(ident)
            now = time.perf_counter()
            weight, last = now - last, now
            if frame is None:
                continue
            self.samples += 1
            self.total += weight
            if frame.f_code.co_filename.endswith("selectors.py"):
                self.idle += weight
                continue
            leaf = self._name(frame.f_code)
            self.own[leaf] = self.own.get(leaf, 0.0) + weight
            seen = set()
            while frame is not None:
                seen.add(self._name(frame.f_code))
                frame = frame.f_back
            for name in seen:
                self.anywhere[name] = self.anywhere.get(name, 0.0) + weight

    def __enter__(self):
        import threading

        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(threading.get_ident(),), daemon=True,
                                        name="stack-sampler")
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def report(self) -> dict:
        total = self.total or 1.0

        def top(times: dict[str, float]) -> dict[str, float]:
            return {k: round(v / total, 4) for k, v in sorted(times.items(), key=lambda kv: -kv[1])[:self.top]}

        return {"samples": self.samples, "seconds": round(self.total, 3), "interval_s": self.interval,
                "busy": round(1 - self.idle / total, 4), "self": top(self.own), "inclusive": top(self.anywhere)}


class GcPauses:
    """Time the garbage collector stopped the process (every generation's collections, via `gc.callbacks`)."""

    def __enter__(self):
        import gc

        self.seconds, self.worst, self.collections, self._start = 0.0, 0.0, 0, 0.0
        gc.callbacks.append(self._on)
        return self

    def _on(self, phase: str, info: dict) -> None:
        import time

        if phase == "start":
            self._start = time.perf_counter()
        else:
            pause = time.perf_counter() - self._start
            self.seconds += pause
            self.worst = max(self.worst, pause)
            self.collections += 1

    def __exit__(self, *exc):
        import gc

        gc.callbacks.remove(self._on)

    def report(self) -> dict:
        return {"gc_seconds": round(self.seconds, 4), "gc_max_seconds": round(self.worst, 4),
                "gc_collections": self.collections}


def provenance() -> dict:
    """Commit, machine and date of a result. $VIGORL_COMMIT overrides the commit: a device host's copy of the
    working tree may carry a stale .git."""
    commit = os.environ.get("VIGORL_COMMIT")
    try:
        commit = commit or subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                          cwd=Path(__file__).parent).stdout.strip()
    except OSError:
        commit = "unknown"
    machine = {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
               "processor": platform.processor() or platform.machine()}
    gpu = _gpu_name()
    if gpu:
        machine["gpu"] = gpu
    return {
        "commit": commit or "unknown",
        "machine": machine,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def add_out_argument(parser) -> None:
    """The `--out` option every bench takes (argparse)."""
    parser.add_argument("--out", default=str(DEFAULT_OUT),
                        help="folder of the result file <area>_<name>.json, or a path ending in .json (default "
                             "runs/bench/, git-ignored; --out bench/results updates the committed results)")


def write_result(area: str, name: str, result: dict, out: str | os.PathLike | None = None) -> Path:
    """<out>/<area>_<name>.json (`out`: a folder, default runs/bench/, or a .json file) with the result and its
    provenance; a result holds exactly one `ratio` (new / baseline, > 1 = better)."""
    out = Path(out or DEFAULT_OUT)
    path = out if out.suffix == ".json" else out / f"{area}_{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**result, **provenance()}, indent=2) + "\n")
    return path


def _gpu_name() -> str | None:
    """"NVIDIA H200, 143771 MiB, driver 580.159.04" on a GPU host (nvidia-smi), else None."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return None
    if not out:
        return None
    name, memory, driver = (part.strip() for part in out.splitlines()[0].split(","))
    return f"{name}, {memory}, driver {driver}"
