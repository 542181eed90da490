"""Weight sync to every PolicyServer replica (services/weight_sync.py) on real Serve + vLLM (tiny model):
replicas that start after a version was published load it before serving (as autoscaled ones do), and a
new version reaches every running replica before publish() returns."""

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
    from services.weight_sync import WeightPublisher, weight_store
    from vigorl_core.chat_tokens import ChatTokens
    from vigorl_core.engine import Sampling

    app, model = "weights-test", str(tiny_model_dir)
    original = AutoModelForImageTextToText.from_pretrained(tiny_model_dir).state_dict()
    torch.manual_seed(7)
    perturbed = {k: v + 0.05 * torch.randn_like(v) for k, v in original.items()}
    publisher = WeightPublisher(app, app)
    # Published before any replica exists (wait=False: nobody to wait for): both replicas, started
    # together, must load version 1 before they serve, as a replica added by autoscaling would.
    assert publisher.publish(perturbed, wait=False) == 1
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
        ray.kill(weight_store(app))
