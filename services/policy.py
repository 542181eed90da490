"""PolicyServer: the vLLM policy as a Ray Serve deployment; PolicyClient: the PolicyEngine over its handle.

Every stage that needs the policy (the HTTP gateway, MCTS, evaluation, GRPO rollouts) runs the core
rollout driver against a `PolicyClient`, so scaling the policy = PolicyServer replicas (autoscaled by
ongoing requests).

Images cross process boundaries once per replica, keyed by content hash: a multi-turn conversation
re-sends its whole image list every turn, so the client sends an image in full only the first time and
its hash afterwards; a replica that lacks a hash (another replica got the image, or it was evicted)
answers `MissingImages` and the client re-sends those in full. (Nested Ray object refs were the first
design; they hung when passed through Serve handles on the GPU host, so images travel by value once.)

    policy = PolicyServer.bind({"model": "runs/models/tiny"})          # in an app builder
    client = PolicyClient(serve.get_deployment_handle("PolicyServer", "vigorl"))
    [gen] = await client.generate(prompt_ids, [image], Sampling(max_tokens=64))
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ray import serve

from vigorl_core.rollout.engine import EngineConfig, Generation, Sampling, VLLMEngine
from vigorl_core.images import image_hash

IMAGE_CACHE_ENTRIES = 512  # images kept per replica and per client, by content hash


@dataclass(frozen=True)
class MissingImages:
    """The replica's answer when it does not hold some hashed images: send them in full."""

    hashes: tuple[str, ...]


class _LRU(OrderedDict):
    def __init__(self, capacity: int):
        super().__init__()
        self.capacity = capacity

    def put(self, key, value):
        self[key] = value
        self.move_to_end(key)
        while len(self) > self.capacity:
            self.popitem(last=False)


# Serve's default of 5 ongoing requests silently throttles rollouts; the engine batches hundreds.
@serve.deployment(name="PolicyServer", max_ongoing_requests=256, ray_actor_options={"num_cpus": 1},
                  health_check_period_s=10, health_check_timeout_s=60)
class PolicyServer:
    """One vLLM engine (AsyncLLM) per replica: generate, stream, weight update, version. With `weights` (a
    weight store name) the replica loads the latest published weights before serving and follows the store
    (services.weight_sync)."""

    async def __init__(self, engine: dict[str, Any], weights: str | None = None):
        self.engine = await VLLMEngine.create(EngineConfig(**engine))
        self._images = _LRU(IMAGE_CACHE_ENTRIES)
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        self._weights = None
        if weights:
            from services.weight_sync import ReplicaWeights

            self._weights = ReplicaWeights(weights, self.engine, self.replica_id)
            await self._weights.start()

    def _resolve(self, images: Sequence[tuple[str, Any]]) -> list[Any] | MissingImages:
        """(hash, image or None) pairs -> images; an image sent in full is kept under its hash."""
        for digest, image in images:
            if image is not None:
                self._images.put(digest, image)
        missing = tuple(d for d, _ in images if d not in self._images)
        if missing:
            return MissingImages(missing)
        return [self._images[d] for d, _ in images]

    async def generate(self, prompt_ids: list[int], images: list[tuple[str, Any]], sampling: Sampling,
                       request_id: str | None = None) -> list[Generation] | MissingImages:
        resolved = self._resolve(images)
        if isinstance(resolved, MissingImages):
            return resolved
        return await self.engine.generate(prompt_ids, resolved, sampling, request_id)

    async def stream(self, prompt_ids: list[int], images: list[tuple[str, Any]], sampling: Sampling,
                     request_id: str | None = None) -> AsyncIterator[Generation | MissingImages]:
        resolved = self._resolve(images)
        if isinstance(resolved, MissingImages):
            yield resolved
            return
        async for delta in self.engine.stream(prompt_ids, resolved, sampling, request_id):
            yield delta

    def version(self) -> int:
        return self.engine.version

    def info(self) -> dict[str, Any]:
        cfg = self.engine.config
        return {"model": cfg.model, "max_model_len": cfg.max_model_len, "version": self.engine.version,
                "replica": self.replica_id}

    def __del__(self):
        if getattr(self, "_weights", None) is not None:
            self._weights.stop()
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown()


class PolicyClient:
    """PolicyEngine over a PolicyServer deployment handle (see the module docstring).

    It has no `update_weights`: a handle call reaches ONE replica. Weights reach every replica through
    the app's weight store (services.weight_sync.WeightPublisher), the one version authority."""

    def __init__(self, handle: Any):
        self.handle = handle
        self.version = 0
        self._hashes = _LRU(IMAGE_CACHE_ENTRIES)  # id(image) -> (image, hash); the image keeps its id unique
        self._sent: set[str] = set()
        self._inflight: dict[str, Any] = {}
        self._ids = itertools.count()

    def _wire(self, images: Sequence[Any], resend: Sequence[str] = ()) -> list[tuple[str, Any]]:
        """(hash, image) for images not sent before (or named in `resend`), (hash, None) for the rest."""
        wire = []
        for image in images:
            entry = self._hashes.get(id(image))
            if entry is None or entry[0] is not image:
                entry = (image, image_hash(image))
                self._hashes.put(id(image), entry)
            digest = entry[1]
            wire.append((digest, None if digest in self._sent and digest not in resend else image))
            self._sent.add(digest)
        return wire

    async def generate(self, prompt_ids: Sequence[int], images: Sequence[Any], sampling: Sampling,
                       request_id: str | None = None) -> list[Generation]:
        request_id = request_id or f"client-{next(self._ids)}"
        resend: Sequence[str] = ()
        for _ in range(2):  # at most one retry: the second call carries every missing image
            response = self.handle.generate.remote(list(prompt_ids), self._wire(images, resend), sampling,
                                                   request_id)
            self._inflight[request_id] = response
            try:
                result = await response
            finally:
                self._inflight.pop(request_id, None)
            if not isinstance(result, MissingImages):
                break
            resend = result.hashes
        else:
            raise RuntimeError(f"PolicyServer still lacks images {resend} after re-sending them")
        for gen in result:
            self.version = max(self.version, gen.policy_version)
        return result

    async def stream(self, prompt_ids: Sequence[int], images: Sequence[Any], sampling: Sampling,
                     request_id: str | None = None) -> AsyncIterator[Generation]:
        """Deltas of one sample; closing the iteration early cancels the request on the replica."""
        resend: Sequence[str] = ()
        for _ in range(2):
            deltas = self.handle.options(stream=True).stream.remote(list(prompt_ids), self._wire(images, resend),
                                                                    sampling, request_id)
            first = True
            async for delta in deltas:
                if first and isinstance(delta, MissingImages):
                    resend = delta.hashes
                    break
                first = False
                yield delta
            else:
                return
        raise RuntimeError(f"PolicyServer still lacks images {resend} after re-sending them")

    async def abort(self, request_id: str) -> None:
        response = self._inflight.pop(request_id, None)
        if response is not None:
            response.cancel()

    async def info(self) -> dict[str, Any]:
        return await self.handle.info.remote()


def is_replica_loss(err: BaseException) -> bool:
    """The replica serving a request died or could not be reached: a Ray or Serve system error, not an exception
    raised by the replica's own code (RayTaskError). The request can run again on another replica."""
    import ray.exceptions
    from ray.serve.exceptions import RayServeException

    return isinstance(err, (ray.exceptions.RayError, RayServeException)) and not isinstance(
        err, ray.exceptions.RayTaskError)


class ReplicaRetry:
    """PolicyEngine over another one whose requests are sent again when their replica is lost (`is_replica_loss`),
    backing off 1 s, 2 s, 4 s ... up to 10 s while Serve routes around the dead replica or replaces it, for up to
    `retry_s` per request. A request carries the whole conversation (token ids and images), so resending it
    loses nothing. `retries` counts the resends. `run` retries any other call the same way (evaluation reruns a
    whole conversation with it; then `engine` may be None)."""

    def __init__(self, engine: Any = None, retry_s: float = 120.0):
        self.engine, self.retry_s, self.retries = engine, retry_s, 0

    @property
    def version(self) -> int:
        return self.engine.version

    async def run(self, call: Callable[[], Awaitable[Any]]) -> Any:
        """`await call()`, called again after a lost replica until it succeeds or `retry_s` has passed."""
        started, attempt = time.perf_counter(), 0
        while True:
            try:
                return await call()
            except Exception as err:
                if not is_replica_loss(err) or time.perf_counter() - started >= self.retry_s:
                    raise
                attempt += 1
                self.retries += 1
                await asyncio.sleep(min(10.0, 2.0 ** (attempt - 1)))

    async def generate(self, prompt_ids, images, sampling, request_id=None):
        return await self.run(lambda: self.engine.generate(prompt_ids, images, sampling, request_id))

    async def abort(self, request_id: str) -> None:
        await self.engine.abort(request_id)

    async def update_weights(self, state_dict, version: int) -> int:
        return await self.engine.update_weights(state_dict, version)
