"""Shared test fixtures: the runtime environment, one tiny model per session.

Environment variables (jobs.common.set_runtime_env) are set before anything imports vLLM, Ray or torch.
Markers: `slow` (needs vLLM or Ray; integration), `gpu` (needs CUDA; skipped in CI).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from jobs.common import set_runtime_env  # noqa: E402

set_runtime_env()


def pytest_collection_modifyitems(config, items):
    try:
        import torch
        has_gpu = torch.cuda.is_available()
    except ImportError:
        has_gpu = False
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and not has_gpu:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny random-weight Qwen2.5-VL folder, built once per test session."""
    from vigorl_core.synthetic.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(scope="session")
def subprocess_env() -> dict[str, str]:
    """Environment for subprocess runs of jobs: the repo on the path, the test runtime settings."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    # A job that joins the session's Ray (RAY_ADDRESS) keeps Ray Train's cluster default, a 2 s poll of its
    # workers; the 0.2 s a job's own local Ray gets (jobs.training.fit) ends each training job sooner.
    env.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
    return env


class EngineHarness:
    """One vLLM engine on an event loop in its own thread; tests call `run(coroutine)` from sync code.
    AsyncLLM binds its output handler to the loop that created it, so every call goes through that loop."""

    def __init__(self, model_dir: Path):
        import asyncio
        import threading

        from vigorl_core.rollout.engine import EngineConfig, VLLMEngine

        self.model_dir = model_dir
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="vllm-test-loop", daemon=True)
        self._thread.start()
        self.engine = self.run(VLLMEngine.create(EngineConfig(model=str(model_dir), max_model_len=4096)))

    def run(self, coroutine, timeout: float = 300):
        import asyncio

        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def close(self):
        """Shut the engine down and let its background tasks finish cancelling on the loop; left pending, they
        are reported ("Task was destroyed but it is pending!") at interpreter exit, after pytest's summary."""
        import asyncio

        self.engine.shutdown()

        async def cancel_the_rest():
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        self.run(cancel_the_rest(), timeout=30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)
        self.loop.close()


@pytest.fixture(scope="session")
def vllm_engine(tiny_model_dir) -> EngineHarness:
    """The session's one vLLM engine (CPU build, eager) on the tiny model."""
    harness = EngineHarness(tiny_model_dir)
    yield harness
    harness.close()


@pytest.fixture(scope="session")
def ray_local():
    """The session's one local Ray instance (logical CPUs so Serve apps and trainers can schedule)."""
    import ray

    ray.init(address="local", num_cpus=8, include_dashboard=False, _node_ip_address="127.0.0.1",
             log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def joined_env(subprocess_env, ray_local) -> dict[str, str]:
    """subprocess_env with RAY_ADDRESS: a job run with it joins the session's Ray, as on a cluster, instead of
    paying a Ray start of its own (it deletes its own Serve app and actors when it ends)."""
    return {**subprocess_env, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address}


API_TOKEN = "test-token"


class ServeApp:
    """The vigorl Serve app on the tiny model: base `url`, the bearer `token`, `headers` with it."""

    def __init__(self, url: str, model: str):
        self.url, self.model, self.token = url, model, API_TOKEN
        self.headers = {"Authorization": f"Bearer {API_TOKEN}"}


@pytest.fixture(scope="session")
def serve_app(ray_local, tiny_model_dir) -> ServeApp:
    """The session's one Serve app (Gateway, PolicyServer, ZoomServer, Critic) on the tiny model, with a
    bearer token, small body limit (2 MiB) and planned zooms so the random-weight model zooms."""
    import socket

    from ray import serve

    from jobs.serve import APP_NAME, start
    from services.app import ServeConfig

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = ServeConfig(model=str(tiny_model_dir), port=port, gateway={
        "api_token": API_TOKEN, "allowed_image_urls": ["http://127.0.0.1:"],
        "limits": {"max_body_bytes": 2 * 1024 * 1024, "max_images": 4, "max_tokens": 256, "max_turns": 6}})
    with pytest.MonkeyPatch.context() as env:
        env.setenv("VIGORL_PLANNED_ZOOMS", "2")  # read once, where the app is built (vigorl_core.rollout.planned)
        url = start(cfg)
    yield ServeApp(url, "tiny")
    serve.delete(APP_NAME)
    serve.shutdown()
