"""Weight sync to every PolicyServer replica (services/weight_sync.py) on real Serve + vLLM (tiny model):
a published version reaches every replica, a replica added later loads it before serving, and
publishing the original weights restores the original greedy output."""

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
    serve.start(proxy_location="Disabled", logging_config={"enable_access_log": False})
    serve.run(policy_app(model, replicas=1, weights=app), name=app, route_prefix=None)
    try:
        handle = serve.get_deployment_handle("PolicyServer", app)
        client = PolicyClient(handle)
        chat = ChatTokens.from_pretrained(tiny_model_dir)
        ids = chat.encode(chat.prompt_text("You look.", "Which colour?", 1))
        image = Image.new("RGB", (112, 84), (250, 200, 0))
        greedy = Sampling(max_tokens=8, temperature=0.0)

        def outputs(n: int):
            return [asyncio.run(client.generate(ids, [image], greedy))[0] for _ in range(n)]

        def replicas(n: int = 12) -> dict[str, int]:
            infos = [handle.info.remote().result() for _ in range(n)]
            return {info["replica"]: info["version"] for info in infos}

        [before] = outputs(1)
        assert before.policy_version == 0
        original = AutoModelForImageTextToText.from_pretrained(tiny_model_dir).state_dict()
        torch.manual_seed(7)
        perturbed = {k: v + 0.05 * torch.randn_like(v) for k, v in original.items()}

        publisher = WeightPublisher(app, app)
        assert publisher.publish(perturbed) == 1  # returns once the running replica serves version 1
        serve.run(policy_app(model, replicas=2, weights=app), name=app, route_prefix=None)
        assert publisher.running_replicas() == 2
        seen = replicas()
        assert len(seen) == 2 and set(seen.values()) == {1}  # the new replica loaded version 1 before serving
        after = outputs(6)
        assert {g.policy_version for g in after} == {1}
        assert len({tuple(g.token_ids) for g in after}) == 1 and after[0].token_ids != before.token_ids

        assert publisher.publish(original) == 2  # both replicas, then return
        assert set(replicas().values()) == {2}
        assert {tuple(g.token_ids) for g in outputs(6)} == {tuple(before.token_ids)}
    finally:
        serve.delete(app)
        ray.kill(weight_store(app))
