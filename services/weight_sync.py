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
- the published weights outlive the trainer worker that wrote them (a file, not an object that worker owns:
  replicas would get `OwnerDiedError`);
- `publish(wait=True)` returns once every running replica serves the new version (synchronous GRPO);
  `wait=False` returns at once (asynchronous GRPO).

Transport: one safetensors file per version, written once by the publisher into a per-run folder on its
node (/dev/shm when it has room: memory, no disk). A replica on that node hands the path straight to its
engine (no copy through the object store: for a 3B model in bf16 that copy, 7.5 GB three times over, was
most of a GRPO step on one GPU); a replica on another node reads the file through a task pinned to the
publisher's node, which moves the tensors through the object store. Files live on after the trainer
process that wrote them; the publisher keeps the newest two versions and `close` removes the folders.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import time
import uuid
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import ray

NAMESPACE = "vigorl"
KEEP_VERSIONS = 2  # the newest file and the one before it, which a replica may still be loading


def store_name(weights: str) -> str:
    return f"vigorl-weights-{weights}"


def run_weights_folder(weights: str, tensors: Mapping[str, Any]) -> Path:
    """This node's folder for the run's weight files (vigorl_core.rollout.engine.weights_folder picks the root)."""
    from vigorl_core.rollout.engine import weights_folder

    return Path(weights_folder(tensors)) / "vigorl-weights" / weights


def _node_id() -> str:
    return ray.get_runtime_context().get_node_id()


def _on_node(node: str):
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return NodeAffinitySchedulingStrategy(node, soft=False)


@ray.remote(num_cpus=0)
def read_weights(path: str) -> dict:
    """The tensors of a weight file, read on the node that holds it (for a replica on another node)."""
    from safetensors.torch import load_file

    return load_file(path)


@ray.remote(num_cpus=0)
def _remove_folders(folders: list[str]) -> None:
    for folder in folders:
        shutil.rmtree(folder, ignore_errors=True)


@ray.remote(num_cpus=0)
class WeightStore:
    """The latest published weights (version, where its file is) and which replicas serve which version."""

    def __init__(self, initial_version: int = 0):
        self.initial_version = initial_version
        self.version = initial_version
        self.latest: dict[str, str] | None = None  # {"path", "node"} of the newest version's file
        self.folders: dict[str, set[str]] = {}  # node -> folders written there (removed by `remove_files`)
        self.acks: dict[str, int] = {}
        self._changed = asyncio.Condition()

    async def publish(self, path: str, node: str) -> int:
        """Make the file `path` on `node` the next version; returns its number."""
        async with self._changed:
            self.version += 1
            self.latest = {"path": path, "node": node}
            self.folders.setdefault(node, set()).add(str(Path(path).parent))
            self._changed.notify_all()
        return self.version

    def current(self) -> int:
        return self.version

    def initial(self) -> int:
        return self.initial_version

    async def newer_than(self, version: int, timeout_s: float) -> tuple[int, dict[str, str]] | None:
        """(version, {"path", "node"}) as soon as a published version newer than `version` exists; None after
        `timeout_s` (also when the newest version is the initial one, which replicas load from disk)."""
        def found() -> bool:
            return self.version > version and self.latest is not None

        async with self._changed:
            if not found():
                try:
                    await asyncio.wait_for(self._changed.wait_for(found), timeout_s)
                except TimeoutError:
                    return None
            return self.version, self.latest

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

    def remove_files(self) -> None:
        """Remove every folder of weight files, on each node that has one (the run is over)."""
        ray.get([_remove_folders.options(scheduling_strategy=_on_node(node)).remote(sorted(folders))
                 for node, folders in self.folders.items()])
        self.folders.clear()


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
        self.node = _node_id()
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
            version, where = found
            if where["node"] == self.node:
                await self.engine.update_weights_from_file(where["path"], version=version)
            else:
                tensors = await read_weights.options(scheduling_strategy=_on_node(where["node"])).remote(where["path"])
                await self.engine.update_weights(tensors, version=version)
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
        self.weights, self.store, self.app = weights, store or find_store(weights), app
        self._writer: ThreadPoolExecutor | None = None
        self._pending: Future | None = None

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
        """Make the weights (HF parameter names) the store's next version and return its number.

        The tensors are copied to host memory here (the caller may change them right after); writing the file
        to this node's weight folder and announcing it to the store follow. With `wait` they run now and this
        returns once every running replica serves the version (synchronous GRPO); without, they run in the
        background while the trainer goes on (asynchronous GRPO) and the next `publish` or `flush` waits for
        them and raises their error."""
        self.flush()
        tensors = {name: t.detach().cpu().contiguous() for name, t in state_dict.items()}
        if wait:
            version = self._announce(tensors)
            self.wait_serving(version, timeout_s)
            return version
        version = self.version() + 1  # a run has one publisher at a time: the next number is this one's
        if self._writer is None:
            self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="weight-publish")
        self._pending = self._writer.submit(self._announce, tensors, version)
        return version

    def flush(self) -> None:
        """Wait until a background publish is announced; its error, if any, is raised here."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def _announce(self, tensors: dict[str, Any], expected: int | None = None) -> int:
        """Write one file (atomically: a replica never sees half of it), make it the store's next version,
        drop files older than the newest `KEEP_VERSIONS`."""
        from safetensors.torch import save_file

        folder = run_weights_folder(self.weights, tensors)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{uuid.uuid4().hex}.safetensors"
        partial = path.with_suffix(".partial")
        save_file(tensors, str(partial))
        os.replace(partial, path)
        version = ray.get(self.store.publish.remote(str(path), _node_id()))
        _keep_newest(folder, KEEP_VERSIONS)
        if expected is not None and version != expected:
            raise RuntimeError(f"weights published as version {version}, expected {expected}: another publisher "
                               f"of run {self.weights!r} is running")
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
        """End the store and remove the run's weight files."""
        try:
            self.flush()
            ray.get(self.store.remove_files.remote())
        finally:
            ray.kill(self.store)


def _keep_newest(folder: Path, keep: int) -> None:
    """Delete all but the `keep` newest weight files in `folder` (older ones, a killed run's leftovers)."""
    files = sorted(folder.glob("*.safetensors"), key=lambda f: f.stat().st_mtime_ns, reverse=True)
    for old in files[keep:]:
        old.unlink(missing_ok=True)
