"""Weight sync to every PolicyServer replica (services/weight_sync.py) on real Serve + vLLM (tiny model):
replicas that start after a version was published load it before serving (as autoscaled ones do), even
when the process that published it is gone; a new version reaches every running replica before publish()
returns; a store is scoped to its run; weight files are pruned to the newest two and removed with the store."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow


def test_every_replica_serves_published_weights_and_new_replicas_catch_up(ray_local, tiny_model_dir):
    import ray
    from PIL import Image
    from ray import serve
    from transformers import AutoModelForImageTextToText

    from services.app import policy_app
    from services.policy import PolicyClient
    from services.weight_sync import WeightPublisher
    from vigorl_core.rollout.chat_tokens import ChatTokens
    from vigorl_core.rollout.engine import Sampling

    app, model = "weights-test", str(tiny_model_dir)
    original = AutoModelForImageTextToText.from_pretrained(tiny_model_dir).state_dict()
    torch.manual_seed(7)
    perturbed = {k: v + 0.05 * torch.randn_like(v) for k, v in original.items()}
    publisher = WeightPublisher.create(app, app)

    @ray.remote(num_cpus=0)
    class Trainer:
        def publish(self, state):
            publisher = WeightPublisher(app, app)
            version = publisher.publish(state, wait=False)  # announced in the background ...
            publisher.flush()  # ... and done before this process dies
            return version

    # Published by a trainer process that then dies, before any replica exists: the weights are owned by
    # the store, so both replicas, started together, load version 1 before they serve, as a replica added
    # by autoscaling after a trainer restart would.
    trainer = Trainer.remote()
    assert ray.get(trainer.publish.remote(perturbed)) == 1
    ray.kill(trainer)
    serve.start(proxy_location="Disabled", logging_config={"enable_access_log": False})
    serve.run(policy_app(model, replicas=2, weights=app), name=app, route_prefix=None)
    try:
        handle = serve.get_deployment_handle("PolicyServer", app)
        client = PolicyClient(handle)
        chat = ChatTokens.from_pretrained(tiny_model_dir)
        ids = chat.encode(chat.prompt_text("You look.", "Which colour?", 1))
        image = Image.new("RGB", (112, 84), (250, 200, 0))
        greedy = Sampling(max_tokens=8, temperature=0.0)

        def outputs(n: int = 6) -> set[tuple[int, tuple[int, ...]]]:
            gens = [asyncio.run(client.generate(ids, [image], greedy))[0] for _ in range(n)]
            return {(g.policy_version, tuple(g.token_ids)) for g in gens}

        def replicas(n: int = 12) -> dict[str, int]:
            infos = [handle.info.remote().result() for _ in range(n)]
            return {info["replica"]: info["version"] for info in infos}

        assert publisher.running_replicas() == 2
        seen = replicas()
        assert len(seen) == 2 and set(seen.values()) == {1}
        [(version, tuned)] = outputs()  # one answer across replicas
        assert version == 1

        assert publisher.publish(original) == 2  # returns once both replicas serve version 2
        assert set(replicas().values()) == {2}
        [(version, restored)] = outputs()
        assert version == 2 and restored != tuned
    finally:
        serve.delete(app)
        publisher.close()


def test_a_store_is_scoped_to_its_run(ray_local):
    """A rerun replaces the previous run's store: it starts at its initial version, with nothing published."""
    import ray

    from services.weight_sync import WeightPublisher

    first = WeightPublisher.create("scoped", "unused")
    assert first.publish({"w": torch.ones(2)}, wait=False) == 1
    first.flush()
    rerun = WeightPublisher.create("scoped", "unused", initial_version=7)
    try:
        assert rerun.version() == 7
        assert ray.get(rerun.store.newer_than.remote(0, 0.0)) is None
    finally:
        rerun.close()


def test_weight_files_keep_the_newest_two_are_readable_from_any_node_and_go_with_the_store(ray_local):
    """Each version is one file on the publisher's node; older files are pruned (a replica may still be
    loading the previous one); a replica elsewhere reads a file through a task pinned to its node; `close`
    removes the folder."""
    import ray

    from services.weight_sync import KEEP_VERSIONS, WeightPublisher, read_weights

    publisher = WeightPublisher.create("files", "unused")
    try:
        for step in range(1, 5):
            assert publisher.publish({"w": torch.full((3,), float(step))}, wait=False) == step
        publisher.flush()
        version, where = ray.get(publisher.store.newer_than.remote(0, 0.0))
        folder = Path(where["path"]).parent
        assert version == 4 and where["node"] == ray.get_runtime_context().get_node_id()
        assert len(list(folder.glob("*.safetensors"))) == KEEP_VERSIONS
        assert not list(folder.glob("*.partial"))
        assert torch.equal(ray.get(read_weights.remote(where["path"]))["w"], torch.full((3,), 4.0))
        # A replica on another node (its node id differs from the file's) gets the tensors, not the path.
        loads = asyncio.run(_replica_loads("files", node="another-node"))
        assert loads[0][0] == "tensors" and torch.equal(loads[0][1]["w"], torch.full((3,), 4.0))
        assert asyncio.run(_replica_loads("files", node=where["node"])) == [("file", where["path"])]
    finally:
        publisher.close()
    assert not folder.exists()


async def _replica_loads(weights: str, node: str) -> list[tuple[str, object]]:
    """What a replica on `node` hands its engine for the newest version (the engine records the call)."""
    from services.weight_sync import ReplicaWeights

    class RecordingEngine:
        def __init__(self):
            self.version, self.loads = 0, []

        async def update_weights(self, state_dict, version):
            self.loads.append(("tensors", state_dict))

        async def update_weights_from_file(self, path, version):
            self.loads.append(("file", path))

    engine = RecordingEngine()
    replica = ReplicaWeights(weights, engine, replica="test")
    replica.node = node
    await replica._load_newer(timeout_s=0.0)
    replica.store.forget.remote("test")
    return engine.loads
