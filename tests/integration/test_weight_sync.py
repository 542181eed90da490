"""Weight sync to every PolicyServer replica (services/weight_sync.py) on real Serve + vLLM (tiny model):
replicas that start after a version was published load it before serving (as autoscaled ones do), even
when the process that published it is gone; a new version reaches every running replica before publish()
returns; a store is scoped to its run."""

from __future__ import annotations

import asyncio

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
    from vigorl_core.chat_tokens import ChatTokens
    from vigorl_core.engine import Sampling

    app, model = "weights-test", str(tiny_model_dir)
    original = AutoModelForImageTextToText.from_pretrained(tiny_model_dir).state_dict()
    torch.manual_seed(7)
    perturbed = {k: v + 0.05 * torch.randn_like(v) for k, v in original.items()}
    publisher = WeightPublisher.create(app, app)

    @ray.remote(num_cpus=0)
    class Trainer:
        def publish(self, state):
            return WeightPublisher(app, app).publish(state, wait=False)

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
    rerun = WeightPublisher.create("scoped", "unused", initial_version=7)
    try:
        assert rerun.version() == 7
        assert ray.get(rerun.store.newer_than.remote(0, 0.0)) is None
    finally:
        rerun.close()
