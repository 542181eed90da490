"""Serve a grounded model over HTTP on a local Ray (or the cluster in RAY_ADDRESS) until interrupted.

    vigorl serve --model runs/models/tiny --port 8000
    vigorl serve --run_name tiny                     # the checkpoint of run tiny: runs/grpo/tiny/latest, else sft
    python -m jobs.serve --config configs/serve_local.yaml --gateway.api_token secret

Starts Ray Serve with the app of services/app.py (Gateway, PolicyServer, ZoomServer, Critic), waits until
every deployment is up, prints the endpoint, and keeps serving until Ctrl-C / SIGTERM; then it shuts
down the Serve app and the local Ray it started. Engine, Ray and Serve logs go to runs/serve/<run_name>/job.log
(`--verbose` shows them). On a running cluster, prefer `serve deploy
configs/serve.yaml` (same application builder).
"""

from __future__ import annotations

import signal
import sys
import threading
import time
from pathlib import Path

from pydantic import Field

from jobs.common import REPO_ROOT, init_ray, local_model, log_to_run_folder, previous_output, run_main
from services.app import ServeConfig, build_app
from vigorl_core.config import ConfigError, parse_config

APP_NAME = "vigorl"


class ServeJobConfig(ServeConfig):
    """Serve a grounded model over HTTP (chat completions, the grounded loop, scoring) until interrupted."""

    model: str | None = Field(None, description="Hugging Face folder (or hub id) of a Qwen2.5-VL model; default: "
                              "the checkpoint of run `run_name`, <runs_dir>/grpo/<run_name>/latest, else "
                              "<runs_dir>/sft/<run_name>/latest")
    run_name: str = Field("default", description="runs/serve/<run_name> holds job.log; names the run whose "
                                                 "checkpoint is served when `model` is not given")
    runs_dir: str = Field(str(REPO_ROOT / "runs"), description="root of run folders")


def start(cfg: ServeConfig, *, num_cpus: int = 8) -> str:
    """Start Ray (if needed) and the Serve app; returns the base URL once every deployment is up."""
    from ray import serve

    init_ray(num_cpus)
    _restart_serve_without_proxy()
    serve.start(http_options={"host": cfg.host, "port": cfg.port}, logging_config={"enable_access_log": False})
    app = build_app({**cfg.model_dump(include=set(ServeConfig.model_fields)), "model": local_model(cfg.model)})
    serve.run(app, name=APP_NAME, route_prefix="/", blocking=False, logging_config={"enable_access_log": False})
    return f"http://{cfg.host}:{cfg.port}"


def _restart_serve_without_proxy() -> None:
    """Batch stages (eval, MCTS, GRPO) start Serve with no HTTP proxy, and a running Serve keeps its HTTP
    settings: on a Ray where one ran before, `serve.start` would leave this app unreachable. With no app left
    on such a Serve it is restarted here (shutting down a Serve that does not run does nothing); with apps
    still running that is the user's call, said in one line."""
    from ray import serve

    status = serve.status()
    if status.proxies:
        return
    if status.applications:
        raise ConfigError(f"Ray Serve already runs on this Ray without an HTTP proxy (started by a batch job), and "
                          f"its apps {sorted(status.applications)} are still running: wait for them or delete them "
                          "(`serve shutdown` stops all of Serve), then start `vigorl serve` again")
    serve.shutdown()


def _run(argv: list[str]) -> int:
    cfg = parse_config(ServeJobConfig, argv, prog="vigorl serve")
    if cfg.model is None:
        cfg = cfg.model_copy(update={"model": str(previous_output("serve", cfg.runs_dir, cfg.run_name).resolve())})
    log_to_run_folder(Path(cfg.runs_dir) / "serve" / cfg.run_name)
    import ray
    from ray import serve

    started = time.perf_counter()
    url = start(cfg)
    print(f"serving {cfg.model} at {url} ({time.perf_counter() - started:.0f} s to start)")
    print(f"  POST {url}/v1/chat/completions   POST {url}/v1/grounded   GET {url}/healthz   (Ctrl-C stops)")
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    print("stopping")
    serve.delete(APP_NAME)
    serve.shutdown()
    ray.shutdown()
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_main(_run, argv)


if __name__ == "__main__":
    sys.exit(main())
