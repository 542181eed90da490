"""Shared plumbing of bench scripts: provenance for result files and the JSON writer."""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


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


def write_result(area: str, name: str, result: dict, path: Path | None = None) -> Path:
    """bench/results/<area>_<name>.json (or `path`) with exactly one `ratio` (new / baseline, > 1 = better)."""
    path = path or RESULTS / f"{area}_{name}.json"
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
