"""The Gateway's reading of PolicyServer replica states (pure logic, no Serve running): a request does not wait
for the Serve controller while the last reading had a running replica; it waits when none ran, and /healthz
always reads afresh."""

from __future__ import annotations

import asyncio
import time

from services.gateway import Gateway


class _States:
    """The Gateway's state logic on a stand-in (no Serve replica context here); the controller is a list of
    answers, each read takes 50 ms."""

    _replica_states = Gateway.func_or_class._replica_states

    def __init__(self, answers):
        self.answers, self.reads = list(answers), 0
        self._replicas, self._states_read = (0.0, None), None

    async def _read_replica_states(self):
        await asyncio.sleep(0.05)
        self.reads += 1
        states = self.answers.pop(0)
        self._replicas = (time.monotonic(), states)
        return states


def test_a_running_reading_is_used_at_once_and_refreshed_behind_the_request():
    async def scenario():
        gateway = _States([{"RUNNING": 1}, {"RUNNING": 1, "STARTING": 1}])
        assert await gateway._replica_states(fresh=False) == {"RUNNING": 1}  # the first request reads
        gateway._replicas = (time.monotonic() - 2, {"RUNNING": 1})  # a stale reading
        assert await gateway._replica_states(fresh=False) == {"RUNNING": 1}
        assert gateway.reads == 1  # answered before the controller did
        await asyncio.sleep(0.1)
        assert gateway.reads == 2 and gateway._replicas[1] == {"RUNNING": 1, "STARTING": 1}  # refreshed meanwhile

    asyncio.run(scenario())


def test_without_a_running_replica_the_request_waits_for_a_fresh_reading():
    async def scenario():
        gateway = _States([{"RUNNING": 1}])
        gateway._replicas = (time.monotonic() - 2, {"STARTING": 1})
        assert await gateway._replica_states(fresh=False) == {"RUNNING": 1} and gateway.reads == 1
        gateway = _States([{"RUNNING": 1}])
        gateway._replicas = (time.monotonic() - 2, {"RUNNING": 1})
        assert await gateway._replica_states() == {"RUNNING": 1} and gateway.reads == 1  # /healthz: fresh

    asyncio.run(scenario())
