"""RolloutWorker: a CPU Ray actor that turns the replay buffer's work items into scored GRPO groups.

Each worker runs `concurrency` loops on one event loop: claim a work item (a sample of a step), roll out
its group with the core RolloutDriver against the PolicyServer replicas (the same PolicyClient that
evaluation and MCTS use), score it in process with the reward registry, and put the group (records and
image pixels) into the ReplayBuffer. Scale = more workers and more PolicyServer replicas.

A group whose rollout fails because of the system (a replica died mid-conversation, an actor was lost) is
handed back with `retry` and rolled out again from the start, so no conversation is ever half on one
replica and half on another; a failure of the sample itself (a bug, bad data) is reported with `fail`.

    worker = RolloutWorker.remote("w0", run="demo", app="policy-demo", model_dir=..., samples=ref,
                                  rollout={"mode": "grounded", "group_size": 5})
    done = worker.run.remote(concurrency=64)      # until stop()
"""

from __future__ import annotations

import asyncio
import time
import traceback
from collections import OrderedDict
from typing import Any

import numpy as np
import ray
from ray.serve.exceptions import RayServeException

from services.replay import NAMESPACE, replay_name

# Failures of the system around a rollout (a replica or actor died, Serve had no replica): worth rolling the
# group out again. An exception raised inside a replica's own code arrives as RayTaskError (also a RayError)
# and is a real failure.
SYSTEM_ERRORS = (ray.exceptions.RayError, RayServeException)


@ray.remote(num_cpus=0.5)
class RolloutWorker:
    def __init__(self, worker_id: str, run: str, app: str, model_dir: str, samples: list, rollout: dict,
                 planned_zooms: int | None = None):
        from ray import serve

        from services.policy import PolicyClient
        from vigorl_core.rollout.chat_tokens import ChatTokens
        from vigorl_core.rollout.planned import PlannedTurnsEngine
        from vigorl_core.rollout.driver import RolloutConfig, RolloutDriver

        self.id, self.samples = worker_id, samples
        self.buffer = ray.get_actor(replay_name(run), namespace=NAMESPACE)
        chat = ChatTokens.from_pretrained(model_dir)
        engine: Any = PolicyClient(serve.get_deployment_handle("PolicyServer", app))
        if planned_zooms is not None:  # random-weight demo models never zoom on their own
            engine = PlannedTurnsEngine(engine, chat.tokenizer, max_zooms=planned_zooms)
        self.driver = RolloutDriver(engine, chat, RolloutConfig(**rollout))
        self._prepared: OrderedDict[int, Any] = OrderedDict()  # decoded, resized samples (recent ones)
        self._stopped = False
        self.groups = 0

    def _prepare(self, index: int):
        prepared = self._prepared.get(index)
        if prepared is None:
            prepared = self._prepared[index] = self.driver.prepare(self.samples[index])
            while len(self._prepared) > 512:
                self._prepared.popitem(last=False)
        self._prepared.move_to_end(index)
        return prepared

    async def run(self, concurrency: int = 64) -> int:
        """Work until stop(); returns the number of groups put. A worker restarted after dying (the job starts
        workers with max_restarts, and this call is retried) first hands back what it had claimed."""
        await self.buffer.release_claims.remote(self.id)
        await asyncio.gather(*(self._loop() for _ in range(concurrency)))
        return self.groups

    async def _loop(self) -> None:
        while not self._stopped:
            item = await self.buffer.claim.remote(self.id, 10.0)  # a long poll: work wakes it at once
            if item is None:
                continue
            started = time.perf_counter()
            try:
                rollouts = await self.driver.rollout_group(self._prepare(item.sample_index))
            except SYSTEM_ERRORS as err:
                if not isinstance(err, ray.exceptions.RayTaskError):  # the replica's own code raised: a real error
                    await self.buffer.retry.remote(item, f"{type(err).__name__}: {err}"[:500])
                    await asyncio.sleep(1.0)  # Serve needs a moment to route around (or replace) a dead replica
                    continue
                await self.buffer.fail.remote(item, f"rollout worker {self.id}, sample {item.sample_index}: {err}")
                continue
            except Exception as err:  # noqa: BLE001 - reported to the trainer, which fails the step loudly
                await self.buffer.fail.remote(item, f"rollout worker {self.id}, sample {item.sample_index}: "
                                              f"{type(err).__name__}: {err}\n{traceback.format_exc(limit=5)}")
                continue
            images = {h: np.asarray(im) for r in rollouts for h, im in zip(r.record.images, r.images)}
            await self.buffer.put.remote(item, [r.record for r in rollouts], images, self.id,
                                         time.perf_counter() - started)
            self.groups += 1

    def stop(self) -> None:
        self._stopped = True
