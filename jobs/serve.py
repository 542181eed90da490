"""Serve a grounded model over HTTP on a local Ray (or the cluster in RAY_ADDRESS) until interrupted.

    vigorl serve --model runs/models/tiny --port 8000
    python -m jobs.serve --config configs/serve_local.yaml --gateway.api_token secret

Starts Ray Serve with the app of services/app.py (Gateway, PolicyServer, ZoomServer, Critic), waits until
every deployment is up, prints the endpoint, and keeps serving until Ctrl-C / SIGTERM; then it shuts
down the Serve app and the local Ray it started. On a running cluster, prefer `serve deploy
configs/serve.yaml` (same application builder).
"""

from __future__ import annotations

import signal
import sys
import threading
import time

from jobs.common import init_ray, local_model, run_main
from services.app import ServeConfig, build_app
from vigorl_core.config import ConfigError, parse_config

APP_NAME = "vigorl"


def start(cfg: ServeConfig, *, num_cpus: int = 8) -> str:
    """Start Ray (if needed) and the Serve app; returns the base URL once every deployment is up."""
    from ray import serve

    init_ray(num_cpus)
    _restart_serve_without_proxy()
    serve.start(http_options={"host": cfg.host, "port": cfg.port}, logging_config={"enable_access_log": False})
    app = build_app({**cfg.model_dump(), "model": local_model(cfg.model)})
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
    cfg = parse_config(ServeConfig, argv, prog="vigorl serve")
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
