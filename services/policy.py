"""PolicyServer: the vLLM policy as a Ray Serve deployment; PolicyClient: the PolicyEngine over its handle.

Every stage that needs the policy (the HTTP gateway, MCTS, evaluation, GRPO rollouts) runs the core
rollout driver against a `PolicyClient`, so scaling the policy = PolicyServer replicas (autoscaled by
ongoing requests). Images cross process boundaries once: the client puts each image into the Ray object
store the first time it is used and sends only the reference afterwards (every later turn of a
multi-turn conversation re-sends the whole image list); the server keeps recently resolved images.
Small images (the tiny model's frames) travel inline, which is cheaper than a reference for them.

    policy = PolicyServer.bind({"model": "runs/models/tiny"})          # in an app builder
    client = PolicyClient(serve.get_deployment_handle("PolicyServer", "vigorl"))
    [gen] = await client.generate(prompt_ids, [image], Sampling(max_tokens=64))
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

import ray
from ray import serve

from vigorl_core.engine import EngineConfig, Generation, Sampling, VLLMEngine

IMAGE_CACHE_ENTRIES = 512  # resolved images kept per replica (a multi-turn conversation re-sends its images)
# Images up to this many RGB bytes travel inside the call: Ray inlines small arguments, while a small put()
# object lives in the owner's memory and costs the replica an extra round trip to fetch.
INLINE_IMAGE_BYTES = 256 * 1024


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
    """One vLLM engine (AsyncLLM) per replica: generate, stream, weight update, version."""

    async def __init__(self, engine: dict[str, Any]):
        self.engine = await VLLMEngine.create(EngineConfig(**engine))
        self._images = _LRU(IMAGE_CACHE_ENTRIES)

    async def _resolve(self, images: Sequence[Any]) -> list[Any]:
        resolved = []
        for image in images:
            if isinstance(image, ray.ObjectRef):
                key = image.hex()
                if key not in self._images:
                    self._images.put(key, await image)
                image = self._images[key]
            resolved.append(image)
        return resolved

    async def generate(self, prompt_ids: list[int], images: list[Any], sampling: Sampling,
                       request_id: str | None = None) -> list[Generation]:
        return await self.engine.generate(prompt_ids, await self._resolve(images), sampling, request_id)

    async def stream(self, prompt_ids: list[int], images: list[Any], sampling: Sampling,
                     request_id: str | None = None) -> AsyncIterator[Generation]:
        async for delta in self.engine.stream(prompt_ids, await self._resolve(images), sampling, request_id):
            yield delta

    async def update_weights(self, state_dict: Mapping[str, Any]) -> int:
        return await self.engine.update_weights(state_dict)

    def version(self) -> int:
        return self.engine.version

    def info(self) -> dict[str, Any]:
        cfg = self.engine.config
        return {"model": cfg.model, "max_model_len": cfg.max_model_len, "version": self.engine.version}

    def __del__(self):
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown()


class PolicyClient:
    """PolicyEngine over a PolicyServer deployment handle (see the module docstring).

    `update_weights` reaches ONE replica (Serve routes a call to a single replica); syncing every
    replica is the weight-sync layer's job (GRPO)."""

    def __init__(self, handle: Any, image_refs: int = 256):
        self.handle = handle
        self.version = 0
        self._refs = _LRU(image_refs)  # id(image) -> (image, ref); the image is kept so its id stays unique
        self._inflight: dict[str, Any] = {}
        self._ids = itertools.count()

    def _wire(self, images: Sequence[Any]) -> list[Any]:
        refs = []
        for image in images:
            if image.width * image.height * 3 <= INLINE_IMAGE_BYTES:
                refs.append(image)
                continue
            entry = self._refs.get(id(image))
            if entry is None or entry[0] is not image:
                entry = (image, ray.put(image))
                self._refs.put(id(image), entry)
            refs.append(entry[1])
        return refs

    async def generate(self, prompt_ids: Sequence[int], images: Sequence[Any], sampling: Sampling,
                       request_id: str | None = None) -> list[Generation]:
        request_id = request_id or f"client-{next(self._ids)}"
        response = self.handle.generate.remote(list(prompt_ids), self._wire(images), sampling, request_id)
        self._inflight[request_id] = response
        try:
            generations = await response
        finally:
            self._inflight.pop(request_id, None)
        for gen in generations:
            self.version = max(self.version, gen.policy_version)
        return generations

    def stream(self, prompt_ids: Sequence[int], images: Sequence[Any], sampling: Sampling,
               request_id: str | None = None) -> AsyncIterator[Generation]:
        """Deltas of one sample; cancelling the iteration cancels the request on the replica."""
        return self.handle.options(stream=True).stream.remote(list(prompt_ids), self._wire(images), sampling,
                                                              request_id)

    async def abort(self, request_id: str) -> None:
        response = self._inflight.pop(request_id, None)
        if response is not None:
            response.cancel()

    async def update_weights(self, state_dict: Mapping[str, Any]) -> int:
        self.version = await self.handle.update_weights.remote(state_dict)
        return self.version

    async def info(self) -> dict[str, Any]:
        return await self.handle.info.remote()
