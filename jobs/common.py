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


def init_ray(num_cpus: int = 8, *, reuses: str | None = None) -> None:
    """Connect to the cluster in RAY_ADDRESS (how `ray job submit` runs jobs), else start a local Ray with
    logical CPUs (Serve apps and trainers schedule fractional CPUs on a small machine). `reuses` names what the
    job takes from a running Ray (e.g. "policy.app 'vigorl'"): then, without RAY_ADDRESS, it joins the Ray
    already running on this machine (the one `vigorl serve` started) instead of starting another."""
    import ray

    if ray.is_initialized():
        return
    # Every worker of the job runs this hook (merged with a `ray job submit` runtime environment): it quiets Ray
    # Train's placement-group cleaner, which warns every few seconds where Ray runs without a dashboard (our
    # local Ray, to save memory and start-up time) because it cannot query the controller's state there.
    quiet = {"worker_process_setup_hook": "jobs.common.quiet_worker_logs"}
    if os.environ.get("RAY_ADDRESS"):
        ray.init(runtime_env=quiet)
    elif reuses:
        try:
            ray.init(address="auto", runtime_env=quiet)
        except ConnectionError:
            raise ConfigError(f"{reuses} names a Serve app of a running Ray, but no Ray is running on this "
                              "machine: start the app first (e.g. `vigorl serve`), or set RAY_ADDRESS to the "
                              "cluster that runs it") from None
    else:
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, _node_ip_address="127.0.0.1",
                 runtime_env=quiet)


def quiet_worker_logs() -> None:
    """Runs in every worker process of a job (see init_ray): Ray Train's cleaner logs errors only."""
    import logging

    logging.getLogger("ray.train.v2._internal.execution.controller.placement_group_cleaner").setLevel(logging.ERROR)
