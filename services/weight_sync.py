"""Weight sync from a trainer to EVERY PolicyServer replica of a Serve app (GRPO's `policy_version`).

A Serve handle call reaches one replica, so a weight update cannot go through the handle. Instead the
replicas pull: the trainer publishes a state dict through the run's `WeightStore` actor; every replica of
the app watches the store, loads each new version (VLLMEngine.update_weights: new requests wait, admitted
ones finish, vLLM loads, clears its caches, resumes) and acknowledges it. A replica that starts later
(autoscaling, a restart) loads the latest version before it serves.

    publisher = WeightPublisher.create("grpo-run", app="policy-grpo-run")   # before the app starts
    serve.run(policy_app(model, weights="grpo-run"), name="policy-grpo-run", route_prefix=None)
    version = publisher.publish(model.state_dict())          # every replica now generates with it

Rules that keep versions honest:
- the store is the one version authority: it numbers versions; engines take the number they are given;
- the store is scoped to a run: `create` replaces any store of that name (a rerun never starts on the last
  run's weights) and starts at `initial_version` (the version of the weights the replicas load from disk);
  it is owned by the process that created it (the job) and ends with it;
- the published weights are owned by the store (it puts them in the object store itself): a trainer worker
  that dies does not take the object with it (replicas would get `OwnerDiedError`);
- `publish(wait=True)` returns once every running replica serves the new version (synchronous GRPO);
  `wait=False` returns at once (asynchronous GRPO).

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

    def __init__(self, initial_version: int = 0):
        self.initial_version = initial_version
        self.version = initial_version
        self.weights: list[Any] = []  # [ObjectRef]: boxed, so Ray passes the ref along instead of resolving it
        self.acks: dict[str, int] = {}
        self._changed = asyncio.Condition()

    async def publish(self, state_dict: dict) -> int:
        """Own a copy of the weights in the object store (put by this actor, so it outlives the trainer
        process that sent them) and make it the next version."""
        ref = ray.put(state_dict)
        async with self._changed:
            self.version += 1
            self.weights = [ref]
            self._changed.notify_all()
        return self.version

    def current(self) -> int:
        return self.version

    def initial(self) -> int:
        return self.initial_version

    async def newer_than(self, version: int, timeout_s: float) -> tuple[int, list] | None:
        """(version, [ref]) as soon as a published version newer than `version` exists; None after `timeout_s`
        (also when the newest version is the initial one, which replicas load from disk)."""
        async with self._changed:
            if self.version > version and self.weights:
                return self.version, self.weights
            try:
                await asyncio.wait_for(self._changed.wait_for(lambda: self.version > version and self.weights),
                                       timeout_s)
            except TimeoutError:
                return None
            return self.version, self.weights

    async def ack(self, replica: str, version: int) -> None:
        async with self._changed:
            self.acks[replica] = version
            self._changed.notify_all()

    async def wait_serving(self, version: int, replicas: int, timeout_s: float) -> int:
        """Wait until `replicas` replicas serve `version` or newer (or `timeout_s` passes); returns how many do."""
        async with self._changed:
            try:
                await asyncio.wait_for(self._changed.wait_for(lambda: self.serving(version) >= replicas), timeout_s)
            except TimeoutError:
                pass
            return self.serving(version)

    def forget(self, replica: str) -> None:
        self.acks.pop(replica, None)

    def serving(self, version: int) -> int:
        """How many replicas serve `version` or newer."""
        return sum(v >= version for v in self.acks.values())


def find_store(weights: str):
    """The run's store; a clear error when the job did not create one."""
    try:
        return ray.get_actor(store_name(weights), namespace=NAMESPACE)
    except ValueError:
        raise RuntimeError(f"weight store {store_name(weights)!r} not found: create it with "
                           f"WeightPublisher.create({weights!r}, ...) before starting the app") from None


class ReplicaWeights:
    """A PolicyServer replica's side: load the latest version now, then follow the store in the background."""

    POLL_S = 30.0  # long-poll period; a new version wakes the poll at once

    def __init__(self, weights: str, engine: Any, replica: str):
        self.store, self.engine, self.replica = find_store(weights), engine, replica
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        # The weights the engine loaded from disk are the store's initial version (a fresh run's model, a
        # resumed run's checkpoint); anything published since is loaded before the replica serves.
        self.engine.version = await self.store.initial.remote()
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

    def __init__(self, weights: str, app: str, store=None):
        self.store, self.app = store or find_store(weights), app

    @classmethod
    def create(cls, weights: str, app: str, initial_version: int = 0) -> WeightPublisher:
        """A fresh store for this run (any store of that name is replaced), owned by the calling process;
        `initial_version` numbers the weights the replicas load from disk (a resumed run's checkpoint)."""
        try:
            ray.kill(ray.get_actor(store_name(weights), namespace=NAMESPACE))
        except ValueError:
            pass
        store = WeightStore.options(name=store_name(weights), namespace=NAMESPACE).remote(initial_version)
        ray.get(store.current.remote())  # registered before any replica looks it up
        return cls(weights, app, store)  # this handle keeps the store alive: the caller keeps the publisher

    def version(self) -> int:
        return ray.get(self.store.current.remote())

    def running_replicas(self) -> int:
        from ray import serve

        status = serve.status().applications[self.app].deployments["PolicyServer"]
        return status.replica_states.get("RUNNING", 0)

    def publish(self, state_dict: Mapping[str, Any], wait: bool = True, timeout_s: float = 600.0) -> int:
        """Hand the weights (HF parameter names) to the store, which owns them, and bump the version;
        with `wait`, return once every running replica serves it. Returns the new version."""
        version = ray.get(self.store.publish.remote({name: t.detach().cpu() for name, t in state_dict.items()}))
        if wait:
            self.wait_serving(version, timeout_s)
        return version

    def wait_serving(self, version: int, timeout_s: float = 600.0) -> None:
        """Return once every running replica serves `version` (the store wakes this on each ack; the replica
        count is asked again every few seconds, as autoscaling may change it)."""
        deadline = time.monotonic() + timeout_s
        while True:
            replicas = self.running_replicas()
            left = deadline - time.monotonic()
            if ray.get(self.store.wait_serving.remote(version, replicas, min(5.0, max(0.0, left)))) >= replicas:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"weights version {version}: not every replica of {self.app!r} loaded them "
                                   f"within {timeout_s:.0f} s")

    def close(self) -> None:
        """End the store (and the weights it owns)."""
        ray.kill(self.store)
