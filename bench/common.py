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
