"""The Serve application: Gateway (HTTP ingress) over PolicyServer, ZoomServer and Critic.

`build_app(args)` is an application builder, so the same app runs three ways:

    vigorl serve --model runs/models/tiny --port 8000          # local Ray (jobs/serve.py)
    serve deploy configs/serve.yaml                              # a running cluster (import_path below)
    serve.run(build_app({"model": "runs/models/tiny"}))          # tests, notebooks

`args` are the fields of `ServeConfig`; configs/serve.yaml shows them with the autoscaling of the policy.
The policy autoscales with `policy_autoscaling` (any way the app runs) or, in a Serve config file, with the
PolicyServer entry of `deployments` (which overrides it).
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

from pydantic import Field, model_validator

from services.critic import Critic
from services.gateway import Gateway
from services.policy import PolicyServer
from services.schemas import GatewaySettings
from services.zoom import ZoomServer
from vigorl_core.config import RoleResources, StageConfig
from vigorl_core.rollout.planned import requested_planned_zooms


class EngineSettings(StageConfig):
    """The policy engine of each PolicyServer replica (vigorl_core.rollout.engine.EngineConfig)."""

    max_model_len: int = Field(4096, description="context length (prompt + images + response)")
    dtype: str | None = Field(None, description="null: bfloat16 on GPUs, float32 on CPU")
    enforce_eager: bool | None = Field(None, description="skip CUDA graphs / torch.compile; null: eager on CPU "
                                       "(fast start), compiled on GPUs (4x faster decode steps, ~45 s more start)")
    gpu_memory_utilization: float = Field(0.85, description="fraction of GPU memory vLLM may take")
    tensor_parallel_size: int = Field(1, description="GPUs per replica")
    max_num_seqs: int | None = Field(None, description="sequences the engine batches at once; null: 1024 on GPUs, "
                                     "256 on CPU")
    max_num_batched_tokens: int | None = Field(None, description="tokens per engine step (prefill chunk + decodes); "
                                               "null: 16384 on GPUs (vllm.LLM's offline default), vLLM's on CPU")
    enable_prefix_caching: bool = Field(True, description="reuse the KV cache of a conversation's earlier turns")
    mm_processor_cache_gb: float = Field(4.0, description="cache of processed images by content hash (GiB; 0: off)")
    max_images_per_prompt: int = Field(8, description="images one prompt may carry (original + crops)")


class PolicyAppSettings(StageConfig):
    """The PolicyServer app a job starts for itself (MCTS teachers keep their own fields)."""

    replicas: int = Field(1, ge=1, description="PolicyServer replicas (one vLLM engine each) of the app the job starts")
    gpus: float = Field(0.0, ge=0, description="GPUs per replica (0 on CPU machines)")
    resources: RoleResources = Field(default_factory=dict, description="custom resources per replica, e.g. "
                                     "{policy_node: 0.01}: lands replicas on cluster.yaml's policy nodes")
    engine: EngineSettings = Field(default_factory=EngineSettings)


class PolicyAutoscaling(StageConfig):
    """Serve autoscaling of the PolicyServer replicas on ongoing requests (Serve's `autoscaling_config`)."""

    min_replicas: int = Field(1, ge=0, description="replicas kept when idle (0: none until a request comes)")
    max_replicas: int = Field(ge=1, description="replicas at most (one vLLM engine each: GPUs / policy_gpus)")
    target_ongoing_requests: float = Field(64, gt=0, description="ongoing requests per replica Serve aims for: "
                                           "above it replicas are added, below it removed (the engine batches "
                                           "hundreds; at most max_ongoing_requests, 256)")
    upscale_delay_s: float = Field(30, ge=0, description="how long the load must ask for more replicas before "
                                   "one is added (a 7B engine takes about a minute to start)")
    downscale_delay_s: float = Field(600, ge=0, description="how long the load must ask for fewer replicas "
                                     "before one is removed")
    metrics_interval_s: float = Field(10, gt=0, description="how often the ongoing requests are reported")
    look_back_period_s: float = Field(30, gt=0, description="the ongoing requests are averaged over this window")

    @model_validator(mode="after")
    def _ordered(self) -> PolicyAutoscaling:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"policy_autoscaling: min_replicas ({self.min_replicas}) > max_replicas "
                             f"({self.max_replicas})")
        return self


class ServeConfig(StageConfig):
    """Serve a grounded model over HTTP (chat completions, the grounded loop, scoring)."""

    model: str = Field(description="Hugging Face folder (or hub id) of a Qwen2.5-VL model")
    model_name: str | None = Field(None, description="id in /v1/models and responses (default: folder name)")
    host: str = Field("127.0.0.1", description="HTTP host (vigorl serve; clusters set it in the Serve config)")
    port: int = Field(8000, description="HTTP port (vigorl serve)")
    engine: EngineSettings = Field(default_factory=EngineSettings)
    policy_gpus: float = Field(0.0, description="GPUs per PolicyServer replica (0 on CPU machines)")
    policy_replicas: int = Field(1, ge=1, description="PolicyServer replicas (fixed; see policy_autoscaling)")
    policy_autoscaling: PolicyAutoscaling | None = Field(None, description="autoscale the PolicyServer replicas "
                                                         "on ongoing requests instead of policy_replicas")
    policy_resources: RoleResources = Field(default_factory=dict, description="custom resources per PolicyServer "
                                            "replica, e.g. {policy_node: 0.01} on cluster.yaml's policy nodes")
    gateway: GatewaySettings = Field(default_factory=GatewaySettings)
    gateway_replicas: int = Field(1, ge=1, description="Gateway replicas: HTTP parsing, prompts and answers run on "
                                  "one event loop each (raise on many-core hosts for many concurrent requests)")
    zoom_replicas: int = Field(1, ge=1, description="ZoomServer replicas (image decoding; CPU)")
    judge_model: str | None = Field(None, description="model folder of an LLM judge hosted by the Critic")

    @model_validator(mode="after")
    def _one_replica_setting(self) -> ServeConfig:
        if self.policy_autoscaling is not None and self.policy_replicas > 1:
            raise ValueError("set policy_replicas or policy_autoscaling, not both")
        return self


def policy_app(model: str, engine: EngineSettings | None = None, replicas: int = 1, gpus: float = 0.0,
               weights: str | None = None, resources: dict[str, float] | None = None):
    """A Serve app of PolicyServer replicas only, for batch stages (MCTS, evaluation, GRPO rollouts):
    `handle = serve.run(policy_app(model), name="policy-<run>", route_prefix=None)`, then
    `PolicyClient(handle)` in each worker (or `serve.get_deployment_handle("PolicyServer", name)`).
    `weights` names a weight store every replica follows (services.weight_sync: GRPO's weight sync);
    `resources` are custom resources each replica requests (a node role: {"policy_node": 0.01})."""
    engine = engine or EngineSettings()
    options = {"num_cpus": 1, "num_gpus": gpus, "resources": resources or {}}
    return PolicyServer.options(num_replicas=replicas, ray_actor_options=options).bind(
        {"model": model, **engine.model_dump()}, weights)


def start_policy_app(name: str, model: str | None, *, engine: EngineSettings | None = None, replicas: int = 1,
                     gpus: float = 0.0, reuse: str | None = None, weights: str | None = None,
                     resources: dict[str, float] | None = None, wait: bool = True) -> tuple[str, str, bool]:
    """Start the Serve app `name` of PolicyServer replicas of `model` for a batch stage (MCTS, evaluation,
    GRPO), or reuse the running app `reuse` (then `model` may be None: asked from the server; if given, it
    must be what the app serves). Returns (app name, model it serves, whether this call started it: the
    caller deletes only what it started). Handles only, no HTTP proxy. `wait=False` returns once the app is
    deployed, while its engines still start (the caller overlaps its own start-up, then calls wait_for_app)."""
    import os

    from ray import serve

    if reuse:
        running = serve.status().applications
        if reuse not in running:
            raise ValueError(f"no Serve app named {reuse!r} is running (running: {sorted(running) or 'none'})")
        served = serve.get_deployment_handle("PolicyServer", reuse).info.remote().result()["model"]
        if model is not None and os.path.realpath(served) != os.path.realpath(model):
            raise ValueError(f"Serve app {reuse!r} serves {served!r}, not {model!r}")
        return reuse, served, False
    if not model:
        raise ValueError("a model is required unless a running Serve app is reused")
    serve.start(proxy_location="Disabled", logging_config={"enable_access_log": False})
    print(f"starting {replicas} PolicyServer replica(s) of {model} (Serve app {name})", flush=True)
    target = serve.RunTarget(policy_app(model, engine, replicas, gpus, weights, resources), name=name,
                             route_prefix=None, logging_config={"enable_access_log": False})
    serve.run_many([target], wait_for_applications_running=wait)
    return name, model, True


def wait_for_app(name: str, timeout_s: float = 1800.0) -> None:
    """Block until the Serve app `name` runs. RuntimeError with Serve's message when it fails to deploy (an
    engine that cannot start), or when it is not running within `timeout_s` (a large engine takes minutes)."""
    import time

    from ray import serve
    from ray.serve.schema import ApplicationStatus

    deadline = time.monotonic() + timeout_s
    while True:
        app = serve.status().applications.get(name)
        if app is not None and app.status == ApplicationStatus.RUNNING:
            return
        if app is None or app.status == ApplicationStatus.DEPLOY_FAILED or time.monotonic() > deadline:
            status = "not deployed"
            if app is not None:  # the app's message is generic; its deployments' name the failing constructor
                reasons = [app.message] + [f"{d}: {_first_and_last_line(s.message)}"
                                           for d, s in app.deployments.items() if s.message]
                status = f"{app.status.value}: {' '.join(reasons)}"
            raise RuntimeError(f"Serve app {name!r} did not start ({status})")
        time.sleep(1.0)


def _first_and_last_line(message: str) -> str:
    """Serve's message about a failed replica holds the constructor's whole traceback: what failed (its first
    line) and why (the exception, its last line)."""
    lines = [line for line in message.strip().splitlines() if line.strip()]
    return lines[0] if len(lines) < 2 else f"{lines[0]} ... {lines[-1].strip()}"


def build_app(args: dict[str, Any]):
    """Application builder for Serve (`import_path: services.app:build_app`)."""
    from vigorl_core.rollout.chat_tokens import ChatTokens

    cfg = ServeConfig.model_validate(args)
    gateway = cfg.gateway.model_copy()
    if gateway.model_name == "vigorl":
        gateway.model_name = cfg.model_name or Path(cfg.model).name
    engine = {"model": cfg.model, **cfg.engine.model_dump()}
    if cfg.policy_gpus == 0 and cfg.engine.tensor_parallel_size > 1:
        raise ValueError("engine.tensor_parallel_size > 1 needs policy_gpus")
    options: dict[str, Any] = {"ray_actor_options": {"num_cpus": 1, "num_gpus": cfg.policy_gpus,
                                                     "resources": cfg.policy_resources}}
    if cfg.policy_autoscaling is not None:
        options["autoscaling_config"] = cfg.policy_autoscaling.model_dump()
    else:
        options.update(_replicas(cfg.policy_replicas))
    policy = PolicyServer.options(**options).bind(engine)
    limits = gateway.limits
    # Replica counts are left unset at 1, so a Serve config's own num_replicas / autoscaling_config applies.
    profile = asdict(ChatTokens.from_pretrained(cfg.model).profile)
    zoom = ZoomServer.options(**_replicas(cfg.zoom_replicas)).bind(
        profile, {"max_pixels": limits.max_image_pixels, "max_bytes": limits.max_image_bytes,
                  "formats": tuple(limits.image_formats)})
    judge = {"model": cfg.judge_model, **cfg.engine.model_dump()} if cfg.judge_model else None
    critic = Critic.bind(judge)
    # VIGORL_PLANNED_ZOOMS (tests and demos of random-weight models) is read where the app is built.
    return Gateway.options(**_replicas(cfg.gateway_replicas)).bind(cfg.model, gateway.model_dump(), policy, zoom,
                                                                    critic, requested_planned_zooms() or 0)


def _replicas(count: int) -> dict[str, int]:
    return {"num_replicas": count} if count > 1 else {}


def kill_one_replica(app: str) -> None:
    """Fault tests: kill one PolicyServer replica of `app` abruptly (Serve replaces it)."""
    import ray
    from ray import serve

    replica = serve.get_deployment_handle("PolicyServer", app).info.remote().result()["replica"]
    ray.kill(ray.get_actor(f"SERVE_REPLICA::{app}#PolicyServer#{replica}", namespace="serve"), no_restart=True)
