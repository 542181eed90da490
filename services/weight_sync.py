"""Weight sync from a trainer to EVERY PolicyServer replica of a Serve app (GRPO's `policy_version`).

A Serve handle call reaches one replica, so a weight update cannot go through the handle. Instead the
replicas pull: the trainer publishes a state dict into the Ray object store through the app's named
`WeightStore` actor; every replica of that app watches the store, loads each new version (vLLM pauses,
loads, clears its caches, resumes: VLLMEngine.update_weights) and acknowledges it. A replica that starts
later (autoscaling, a restart) loads the latest version before it serves. `publish(..., wait=True)`
returns once every running replica serves the new version (synchronous GRPO, staleness 0); `wait=False`
returns at once (asynchronous GRPO, staleness k >= 1).

    # app side: services.app.policy_app(model, weights="grpo-run") passes the store name to the replicas
    publisher = WeightPublisher("grpo-run", app="policy-grpo-run")
    version = publisher.publish(model.state_dict())          # every replica now generates with it

Transport: the Ray object store (CPU clusters, tests). NCCL broadcast for GPU clusters is to come behind
the same `publish`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from typing import Any

import ray

NAMESPACE = "vigorl"


def store_name(weights: str) -> str:
    return f"vigorl-weights-{weights}"


@ray.remote(num_cpus=0)
class WeightStore:
    """The latest published weights (version, object ref) and which replicas serve which version."""

    def __init__(self):
        self.version = 0
        self.weights: list[Any] = []  # [ObjectRef]: boxed, so Ray passes the ref along instead of resolving it
        self.acks: dict[str, int] = {}
        self._changed = asyncio.Condition()

    async def publish(self, boxed_ref: list) -> int:
        async with self._changed:
            self.version += 1
            self.weights = boxed_ref
            self._changed.notify_all()
        return self.version

    async def newer_than(self, version: int, timeout_s: float) -> tuple[int, list] | None:
        """(version, [ref]) as soon as a version newer than `version` exists; None after `timeout_s`."""
        async with self._changed:
            if self.version > version:
                return self.version, self.weights
            try:
                await asyncio.wait_for(self._changed.wait_for(lambda: self.version > version), timeout_s)
            except TimeoutError:
                return None
            return self.version, self.weights

    def ack(self, replica: str, version: int) -> None:
        self.acks[replica] = version

    def forget(self, replica: str) -> None:
        self.acks.pop(replica, None)

    def serving(self, version: int) -> int:
        """How many replicas serve `version` or newer."""
        return sum(v >= version for v in self.acks.values())


def weight_store(weights: str):
    """The named store (created on first use; detached, so it outlives the process that created it)."""
    return WeightStore.options(name=store_name(weights), namespace=NAMESPACE, lifetime="detached",
                               get_if_exists=True).remote()


class ReplicaWeights:
    """A PolicyServer replica's side: load the latest version now, then follow the store in the background."""

    POLL_S = 30.0  # long-poll period; a new version wakes the poll at once

    def __init__(self, weights: str, engine: Any, replica: str):
        self.store, self.engine, self.replica = weight_store(weights), engine, replica
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        await self._load_newer(timeout_s=0.0)
        self._task = asyncio.create_task(self._follow())

    async def _load_newer(self, timeout_s: float) -> None:
        found = await self.store.newer_than.remote(self.engine.version, timeout_s)
        if found is not None:
            version, [ref] = found
            await self.engine.update_weights(await ref, version=version)
        await self.store.ack.remote(self.replica, self.engine.version)

    async def _follow(self) -> None:
        while True:
            try:
                await self._load_newer(self.POLL_S)
            except asyncio.CancelledError:
                raise
            except Exception as err:  # noqa: BLE001 - a failed load is retried; serving goes on meanwhile
                print(f"weight sync on replica {self.replica}: {err!r}; retrying", flush=True)
                await asyncio.sleep(1.0)

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
        self.store.forget.remote(self.replica)


class WeightPublisher:
    """The trainer's side: publish a state dict to every replica of the Serve app `app`."""

    def __init__(self, weights: str, app: str):
        self.store, self.app = weight_store(weights), app

    def running_replicas(self) -> int:
        from ray import serve

        status = serve.status().applications[self.app].deployments["PolicyServer"]
        return status.replica_states.get("RUNNING", 0)

    def publish(self, state_dict: Mapping[str, Any], wait: bool = True, timeout_s: float = 600.0) -> int:
        """Put the weights (HF parameter names) in the object store and bump the version; with `wait`,
        return once every running replica serves it. Returns the new version."""
        ref = ray.put({name: tensor.detach().cpu() for name, tensor in state_dict.items()})
        version = ray.get(self.store.publish.remote([ref]))
        deadline = time.monotonic() + timeout_s
        while wait and ray.get(self.store.serving.remote(version)) < self.running_replicas():
            if time.monotonic() > deadline:
                raise TimeoutError(f"weights version {version}: not every replica of {self.app!r} loaded them "
                                   f"within {timeout_s:.0f} s")
            time.sleep(0.1)
        return version
