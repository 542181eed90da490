"""What every job needs before it starts: the process environment and the error style.

The environment defaults are the ones measured to work for vLLM on CPU and Ray on small machines; a variable
the user already set is left alone.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

from vigorl_core.config import ConfigError

REPO_ROOT = Path(__file__).resolve().parent.parent


def set_runtime_env() -> None:
    """Default environment for local runs: offline hub, one OMP thread, vLLM CPU cache, Ray auth off (for a
    Ray this job starts; a job on a cluster, RAY_ADDRESS set, keeps the cluster's authentication mode)."""
    defaults = {
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "VLLM_HOST_IP": "127.0.0.1",
        "VLLM_CACHE_ROOT": str(REPO_ROOT / ".vllm-cache"),
        "TORCH_EXTENSIONS_DIR": str(REPO_ROOT / ".torch_ext"),
    }
    if not os.environ.get("RAY_ADDRESS"):
        defaults["RAY_AUTH_MODE"] = "disabled"
    if not Path("/dev/nvidiactl").exists():  # DeepSpeed would otherwise look for CUDA
        defaults["DS_ACCELERATOR"] = "cpu"
    for key, value in defaults.items():
        os.environ.setdefault(key, value)


def local_model(model: str) -> str:
    """`model` as an absolute path when it names a local folder, else unchanged (a hub id). Ray Train
    workers run in their own working directory, so a relative path from the command line would not resolve
    there."""
    return str(Path(model).resolve()) if Path(model).exists() else model


def run_main(body: Callable[[list[str]], int | None], argv: list[str] | None) -> int:
    """Run a job body; configuration and input errors print one clear line instead of a traceback."""
    set_runtime_env()
    try:
        return body(sys.argv[1:] if argv is None else argv) or 0
    except (ConfigError, ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def init_ray(num_cpus: int = 8) -> None:
    """Connect to the cluster in RAY_ADDRESS (how `ray job submit` runs jobs), else start a local Ray with
    logical CPUs (Serve apps and trainers schedule fractional CPUs on a small machine)."""
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init()
    else:
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, _node_ip_address="127.0.0.1")
