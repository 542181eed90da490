"""The Serve app on real Ray and real vLLM (tiny model): OpenAI client, /v1/grounded, bad input, concurrency."""

from __future__ import annotations

import base64
import http.server
import io
import json
import threading
from concurrent.futures import ThreadPoolExecutor
from functools import partial

import httpx
import pytest
from PIL import Image

from services.schemas import parse_server_timing
from tests.conftest import REPO_ROOT
from tests.unit.test_images import png_declaring

pytestmark = pytest.mark.slow


def png(width: int, height: int, colour="white") -> bytes:
    image = Image.new("RGB", (width, height), colour)
    image.paste((200, 30, 30), (width // 3, height // 3, width // 3 + 20, height // 3 + 20))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def noisy_png(side: int) -> bytes:
    buffer = io.BytesIO()
    Image.effect_noise((side, side), 64).convert("RGB").save(buffer, format="PNG")
    return buffer.getvalue()


def data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


@pytest.fixture(scope="module")
def api(serve_app):
    with httpx.Client(base_url=serve_app.url, headers=serve_app.headers, timeout=300) as client:
        yield client


def test_health_and_models(serve_app, api):
    assert httpx.get(serve_app.url + "/healthz").json()["status"] == "ok"  # no token needed
    models = api.get("/v1/models").json()
    assert models["data"][0]["id"] == serve_app.model and models["data"][0]["max_model_len"] == 4096


def test_openai_client_plain_and_streaming(serve_app):
    from openai import OpenAI

    client = OpenAI(base_url=serve_app.url + "/v1", api_key=serve_app.token)
    messages = [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_url(png(300, 200))}},
        {"type": "text", "text": "What is in the image?"}]}]
    plain = client.chat.completions.create(model=serve_app.model, messages=messages, max_tokens=12, temperature=0)
    assert plain.choices[0].finish_reason in ("stop", "length")
    assert plain.usage.completion_tokens >= 1 and plain.usage.prompt_tokens > 20  # image tokens counted
    stream = client.chat.completions.create(model=serve_app.model, messages=messages, max_tokens=12, temperature=0,
                                            stream=True)
    chunks = list(stream)
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert streamed == plain.choices[0].message.content  # greedy: the same text, delivered in pieces
    assert len(chunks) > 3 and chunks[-1].choices[0].finish_reason == plain.choices[0].finish_reason
    several = client.chat.completions.create(model=serve_app.model, messages=messages, max_tokens=4, n=3)
    assert len(several.choices) == 3


def _check_frames(body: dict, original: tuple[int, int], tiny_model_dir) -> None:
    """Model size = the HF processor's grid; every original point = model point scaled by original/model."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(str(tiny_model_dir))
    grid = processor.image_processor(images=[Image.new("RGB", original)], return_tensors="pt")["image_grid_thw"][0]
    model_size = [int(grid[2]) * 14, int(grid[1]) * 14]
    assert body["image"] == {"original_size": list(original), "model_size": model_size}
    assert model_size != list(original)  # the test needs an image the processor resizes
    sx, sy = original[0] / model_size[0], original[1] / model_size[1]
    points = [p for s in body["steps"] for p in s["points"]] + [z["point"] for z in body["zooms"]]
    assert points
    for p in points:
        assert p["original"]["x"] == pytest.approx(p["model"]["x"] * sx, abs=0.01)
        assert p["original"]["y"] == pytest.approx(p["model"]["y"] * sy, abs=0.01)


def test_grounded_single_turn(api, tiny_model_dir):
    body = api.post("/v1/grounded", json={"image": data_url(png(640, 480)), "query": "Where is the red square?",
                                          "task": "grounding", "annotate": True}).json()
    assert body.get("turns") == 1 and body["zooms"] == [] and body["answer"] is not None, body
    _check_frames(body, (640, 480), tiny_model_dir)
    annotated = Image.open(io.BytesIO(base64.b64decode(body["annotated_png"])))
    assert annotated.size == (640, 480)  # drawn on the user's image, not the model frame
    assert body["usage"]["prompt_tokens"] > body["usage"]["image_tokens"] > 0 and body["latency_ms"] > 0


def test_grounded_multi_turn_zooms(api, tiny_model_dir):
    response = api.post("/v1/grounded", json={
        "image": data_url(png(500, 375)), "query": "What colour is the small square?", "mode": "multi",
        "options": ["red", "blue"], "return_crops": True, "sampling": {"max_tokens": 96}})
    body = response.json()
    assert body["turns"] == 3 and len(body["zooms"]) == 2  # the planned 2 zooms, then the answer
    # Where the time went, by hop: the 3 turns' engine time lies inside the policy calls, inside the handler.
    timing = parse_server_timing(response.headers["Server-Timing"])
    assert set(timing) == {"image", "policy", "engine", "total"} and timing["total"] == body["latency_ms"]
    assert 0 < timing["engine"] <= timing["policy"] <= timing["total"] and 0 < timing["image"] < timing["total"]
    _check_frames(body, (500, 375), tiny_model_dir)
    sx = 500 / body["image"]["model_size"][0]
    for zoom in body["zooms"]:
        crop = Image.open(io.BytesIO(base64.b64decode(zoom["crop_png"])))
        assert list(crop.size) == zoom["crop_size"] == [112, 112]  # the tiny profile's table entry
        x1, _, x2, _ = zoom["window"]["model"]
        assert zoom["window"]["original"][0] == pytest.approx(x1 * sx, abs=0.01)
        assert x1 <= zoom["point"]["model"]["x"] <= x2
    assert "<observation>" in body["text"] and body["finish"] in ("answer", "max_turns")


def test_grounded_crop_settings_and_remote_url(serve_app, api, tmp_path):
    (tmp_path / "allowed").mkdir()
    (tmp_path / "allowed" / "a.png").write_bytes(png(320, 240))
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/allowed/a.png"
        body = api.post("/v1/grounded", json={"image": url, "query": "Look closer.", "mode": "multi",
                                              "crop": {"offset": 20, "crop_size": 56}, "return_crops": True}).json()
        assert body["image"]["original_size"] == [320, 240]
        assert all(z["crop_size"] == [56, 56] for z in body["zooms"]) and body["zooms"]
    finally:
        server.shutdown()


def _error(response: httpx.Response, status: int, param: str | None = None) -> str:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    if param is not None:
        assert error["param"] == param, error
    return error["message"]


GOOD = {"image": data_url(png(64, 48)), "query": "Where?"}


@pytest.mark.parametrize("case, request_kwargs, status, param, says", [
    ("not JSON", {"content": b"{not json"}, 400, None, "not valid JSON"),
    ("JSON but not an object", {"json": [1, 2]}, 400, None, "JSON object"),
    ("wrong type", {"json": {**GOOD, "max_turns": "many"}}, 400, "max_turns", "integer"),
    ("missing image", {"json": {"query": "Where?"}}, 400, "image", "Field required"),
    ("base64 that is not an image", {"json": {**GOOD, "image": base64.b64encode(b"hello world").decode()}},
     400, "image", "not an image"),
    ("not base64", {"json": {**GOOD, "image": "data:image/png;base64,@@@"}}, 400, "image", "base64"),
    ("truncated PNG", {"json": {**GOOD, "image": data_url(noisy_png(300)[:-2000])}}, 400, "image", "truncated"),
    ("enormous declared image", {"json": {**GOOD, "image": data_url(png_declaring(100_000, 100_000))}}, 400,
     "image", "more pixels than the limit"),
    ("large declared image", {"json": {**GOOD, "image": data_url(png_declaring(8000, 6000))}}, 400, "image",
     "8000x6000"),
    ("unknown task", {"json": {**GOOD, "task": "nope"}}, 400, "task", "visual_search"),
    ("negative max_tokens", {"json": {**GOOD, "sampling": {"max_tokens": -5}}}, 400, "sampling.max_tokens",
     "greater than or equal to 1"),
    ("huge max_tokens", {"json": {**GOOD, "sampling": {"max_tokens": 10**9}}}, 400, "sampling.max_tokens",
     "limit of 256"),
    ("too many turns", {"json": {**GOOD, "max_turns": 50}}, 400, "max_turns", "limit of 6"),
    ("unknown field", {"json": {**GOOD, "temprature": 0.5}}, 400, "temprature", "Extra inputs"),
    ("remote URL not allowed", {"json": {**GOOD, "image": "https://example.com/cat.png"}}, 400, "image",
     "allow-listed"),
    ("oversized body", {"json": {**GOOD, "query": "x" * (3 * 1024 * 1024)}}, 413, None, "over the limit"),
])
def test_grounded_bad_input(api, case, request_kwargs, status, param, says):
    assert says in _error(api.post("/v1/grounded", **request_kwargs), status, param)


def test_chat_bad_input(serve_app, api):
    def chat(**fields):
        return api.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], **fields})

    image = {"type": "image_url", "image_url": {"url": data_url(png(32, 32))}}
    too_many = [{"role": "user", "content": [image] * 5 + [{"type": "text", "text": "compare"}]}]
    assert "limit of 4" in _error(chat(messages=too_many), 400, "messages (images)")
    assert "greater than or equal to 1" in _error(chat(max_tokens=-1), 400, "max_tokens")
    assert "limit of 256" in _error(chat(max_tokens=100_000), 400, "max_tokens")
    assert "role" in _error(chat(messages=[{"role": "robot", "content": "hi"}]), 400)
    assert "not served" in _error(chat(model="gpt-4o"), 404, "model")
    broken = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}]
    assert "not an image" in _error(chat(messages=broken), 400, "messages.0.content.0.image_url.url")
    assert "at least 1" in _error(chat(messages=[]), 400, "messages")
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        response = httpx.post(serve_app.url + "/v1/chat/completions", headers=headers,
                              json={"messages": [{"role": "user", "content": "hi"}]})
        assert "bearer token" in _error(response, 401)
    assert _error(api.post("/v1/score", json={"task": "grounding", "mode": "nope", "text": "", "answer": ""}),
                  400, "mode")
    # after all of that the server is healthy and answers, also to JSON sent as curl -d sends it (form content type)
    assert httpx.get(serve_app.url + "/healthz").status_code == 200
    assert chat(max_tokens=2).status_code == 200
    form = api.post("/v1/chat/completions", headers={"Content-Type": "application/x-www-form-urlencoded"},
                    content=json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}))
    assert form.status_code == 200, form.text


def test_score_endpoint(api):
    text = "<think> The button is at (30, 40). </think>\n<answer> (30, 40) </answer>"
    good = api.post("/v1/score", json={"task": "grounding", "mode": "grounded", "text": text,
                                        "answer": "(20, 30, 40, 50)", "bbox": [20, 30, 40, 50]}).json()
    miss = api.post("/v1/score", json={"task": "grounding", "mode": "grounded", "text": text,
                                        "answer": "(0, 0, 5, 5)", "bbox": [0, 0, 5, 5]}).json()
    assert good["accuracy"] == 1.0 and miss["accuracy"] == 0.0


def test_concurrent_requests(serve_app, api):
    """16 requests at once (grounded, multi-turn and chat mixed) all succeed with their own answers."""
    def one(i: int) -> tuple[int, dict]:
        if i % 2:
            r = api.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": f"q{i}"}],
                                                        "max_tokens": 8})
        else:
            r = api.post("/v1/grounded", json={"image": data_url(png(200 + 8 * i, 150)), "query": f"where {i}?",
                                                "mode": "multi" if i % 4 == 0 else "single"})
        timing = parse_server_timing(r.headers["Server-Timing"])
        assert 0 < timing["engine"] <= timing["policy"] <= timing["total"], timing  # chat and grounded alike
        return r.status_code, r.json()

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(one, range(16)))
    assert [status for status, _ in results] == [200] * 16
    assert len({body["id"] for _, body in results}) == 16
    sizes = [body["image"]["original_size"][0] for i, (_, body) in enumerate(results) if i % 2 == 0]
    assert sizes == [200 + 8 * i for i in range(0, 16, 2)]  # each answer belongs to its own request


def test_serve_config_yaml_is_accepted_by_serve(tiny_model_dir):
    import yaml
    from ray.serve.schema import ServeDeploySchema

    from services.app import ServeConfig

    config = yaml.safe_load((REPO_ROOT / "configs" / "serve.yaml").read_text())
    ServeDeploySchema.model_validate(config)
    [app] = config["applications"]
    assert app["import_path"] == "services.app:build_app"
    ServeConfig.model_validate(app["args"])
    assert {d["name"] for d in app["deployments"]} == {"PolicyServer", "ZoomServer", "Gateway"}
    assert json.dumps(app["deployments"][0]["autoscaling_config"])


def test_policy_client_sends_each_image_once(serve_app, tiny_model_dir):
    """An image travels in full once; later calls carry its hash; a replica lacking a hash gets it re-sent."""
    import asyncio

    from ray import serve

    from services.policy import PolicyClient
    from vigorl_core.rollout.chat_tokens import ChatTokens
    from vigorl_core.rollout.engine import Sampling
    from vigorl_core.images import image_hash

    client = PolicyClient(serve.get_deployment_handle("PolicyServer", "vigorl"))
    chat = ChatTokens.from_pretrained(tiny_model_dir)
    red, blue = Image.new("RGB", (112, 84), "red"), Image.new("RGB", (56, 56), "blue")
    ids = chat.encode(chat.prompt_text("You look.", "Which colours?", 2))
    greedy = Sampling(max_tokens=3, temperature=0.0)

    first = asyncio.run(client.generate(ids, [red, blue], greedy))
    assert [image for _, image in client._wire([red, blue])] == [None, None]  # known: hashes only
    second = asyncio.run(client.generate(ids, [red, blue], greedy))
    assert first[0].token_ids == second[0].token_ids and first[0].token_ids

    # A client that believes the replica holds an image it never received (as after another replica got
    # it): the replica answers MissingImages and the client re-sends it in full.
    green = Image.new("RGB", (84, 84), "green")
    stale = PolicyClient(serve.get_deployment_handle("PolicyServer", "vigorl"))
    stale._sent.add(image_hash(green))
    ids1 = chat.encode(chat.prompt_text("You look.", "Which colour?", 1))
    assert asyncio.run(stale.generate(ids1, [green], greedy))[0].token_ids

    yellow = Image.new("RGB", (70, 70), "yellow")
    stale_stream = PolicyClient(client.handle)
    stale_stream._sent.add(image_hash(yellow))

    async def streamed():
        return [d async for d in stale_stream.stream(ids1, [yellow], greedy)]

    deltas = asyncio.run(streamed())
    assert sum(len(d.token_ids) for d in deltas) == 3 and deltas[-1].finish_reason == "length"


def test_replica_death_costs_no_request(serve_app, api):
    """The app's only PolicyServer replica is killed while requests generate: every request ends within the client's
    timeout in 200 (run again on Serve's replacement) or 503 with Retry-After, never a 500; /healthz answers 503
    while no replica runs and 200 again once Serve has replaced it, and the endpoint serves again. Runs last in
    this module: the replacement takes an engine start."""
    import time

    from services.app import kill_one_replica

    def chat(i: int) -> httpx.Response:
        return api.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": f"count {i}"}],
                                                       "max_tokens": 256, "temperature": 1.0})

    def grounded(i: int) -> httpx.Response:
        return api.post("/v1/grounded", json={"image": data_url(png(180 + 4 * i, 140)), "query": f"where {i}?",
                                               "mode": "multi"})

    with ThreadPoolExecutor(8) as pool:
        with api.stream("POST", "/v1/chat/completions", json={  # generating for sure once its first token is back
                "messages": [{"role": "user", "content": "stream"}], "max_tokens": 256, "stream": True}) as stream:
            lines = stream.iter_lines()
            while '"content"' not in next(lines):
                pass
            pending = [pool.submit(chat, i) for i in range(4)] + [pool.submit(grounded, i) for i in range(3)]
            time.sleep(0.5)
            kill_one_replica("vigorl")
            streamed = "\n".join(lines)
        health = []
        while not pending[0].done() or not health or health[-1] != 200:
            health.append(httpx.get(serve_app.url + "/healthz", timeout=30).status_code)
            assert len(health) < 400, f"no replica serves 200 s after the kill: /healthz said {health[-5:]}"
            time.sleep(0.5)
        answers = [future.result() for future in pending]

    assert '"code": "unavailable"' in streamed or "[DONE]" in streamed  # a lost stream says why, in-band
    statuses = [r.status_code for r in answers]
    retried = [r.headers.get("x-replica-retries") for r in answers]
    print(f"statuses {statuses}, retried {retried}; /healthz every 0.5 s after the kill: {health}")
    assert any(retried) or 503 in statuses, "no request was in flight on the killed replica"
    assert set(statuses) <= {200, 503}, [(r.status_code, r.text[:200]) for r in answers]
    for r in answers:
        if r.status_code == 503:
            assert r.headers["retry-after"] and r.json()["error"]["code"] == "unavailable"
    assert 503 in health, f"/healthz never said the replica was gone: {health}"
    again = api.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "back?"}],
                                                    "max_tokens": 4})
    assert again.status_code == 200 and httpx.get(serve_app.url + "/healthz").json()["replicas"]["RUNNING"] == 1


def test_wait_for_app_names_an_app_that_cannot_start(serve_app):
    """GRPO starts its policy app without waiting (its trainer loads meanwhile), then waits with wait_for_app:
    an app whose engine cannot start is an error that names it and Serve's reason, not an endless wait."""
    from ray import serve

    from services.app import wait_for_app

    @serve.deployment(max_constructor_retry_count=1, ray_actor_options={"num_cpus": 0})
    class NoEngine:
        def __init__(self):
            raise ValueError("no engine here")

    serve.run_many([serve.RunTarget(NoEngine.bind(), name="no-engine", route_prefix=None)],
                   wait_for_applications_running=False)
    try:
        with pytest.raises(RuntimeError, match=r"Serve app 'no-engine' did not start \(.*DEPLOY_FAILED.*no engine"):
            wait_for_app("no-engine", timeout_s=120)
    finally:
        serve.delete("no-engine")
