"""vigorl_core.rollout.openai_policy without a model server: prompts split into chat messages that render back to the
same prompt, stop strings restored, and whole zoom conversations, retries and errors against a stub HTTP server
that answers from a script (the tiny model's tokenizer; no engine)."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from PIL import Image

from vigorl_core.rollout.chat_tokens import ChatTokens
from vigorl_core.rollout.engine import Generation
from vigorl_core.rollout.openai_policy import (EndpointError, OpenAIPolicy, chat_messages, request_body, restore_stop,
                                       stop_strings)
from vigorl_core.protocol import FORCED_FINAL_PREFIX, render_turn
from vigorl_core.rollout.driver import RolloutConfig, RolloutDriver
from vigorl_core.synthetic.tasks import generate


@pytest.fixture(scope="module")
def chat(tiny_model_dir):
    return ChatTokens.from_pretrained(tiny_model_dir)


def _zoomed_conversation(chat, **config):
    """A multi-turn conversation after one zoom turn: its next request carries the image and the crop."""
    sample, image = generate("visual_search", 1, seed=3)[0]
    driver = RolloutDriver(None, chat, RolloutConfig(mode="multiturn", **config))
    [conv] = driver.conversations(driver.prepare(sample, [image]))
    text = render_turn("look at (50, 60)", tool_call=(50, 60))
    conv.advance(Generation(chat.encode(text), text, None, "stop"))
    return conv


def _render(chat, messages, continue_final: bool) -> str:
    """What a server's chat template makes of the messages (Qwen2.5-VL's, as vLLM and our gateway apply it)."""
    return chat.tokenizer.apply_chat_template(messages, chat_template=chat.chat_template, tokenize=False,
                                              add_generation_prompt=not continue_final,
                                              continue_final_message=continue_final)


def test_messages_render_back_to_the_drivers_prompt(chat):
    conv = _zoomed_conversation(chat)
    ids, images, sampling = conv.request()
    text = chat.decode(ids)
    messages, continue_final = chat_messages(text, ["url-image", "url-crop"])
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user"] and not continue_final
    assert messages[1]["content"][0] == {"type": "image_url", "image_url": {"url": "url-image"}}
    assert messages[2]["content"].endswith("</tool_call>")  # the turn as generated, stop string included
    assert [p["type"] for p in messages[3]["content"]] == ["text", "image_url", "text"]
    assert messages[3]["content"][1]["image_url"]["url"] == "url-crop"
    assert _render(chat, messages, False) == text
    assert stop_strings(sampling, chat) == ["</answer>", "</tool_call>"]  # <|im_end|> is the server's EOS


def test_a_forced_answer_is_continued(chat):
    """With the image budget full after the zoom the driver opens the answer itself: continue that message."""
    conv = _zoomed_conversation(chat, max_images=2)
    ids, _, sampling = conv.request()
    messages, continue_final = chat_messages(chat.decode(ids), ["a", "b"])
    assert continue_final and messages[-1] == {"role": "assistant", "content": FORCED_FINAL_PREFIX}
    assert _render(chat, messages, True) == chat.decode(ids)
    body = request_body(messages, True, sampling, ["</answer>"], "m")
    assert body["continue_final_message"] and body["add_generation_prompt"] is False and body["model"] == "m"


def test_bad_prompts_are_named(chat):
    with pytest.raises(ValueError, match="2 images but 1 image placeholders"):
        chat_messages(chat.prompt_text("s", "q", 1), ["a", "b"])
    with pytest.raises(ValueError, match="no role"):
        chat_messages("<|im_start|>tool\nx<|im_end|>\n<|im_start|>assistant\n", [])


@pytest.mark.parametrize("text, finish, stop_reason, expected", [
    ("<think> a </think>\n<answer> red", "stop", "</answer>", "<think> a </think>\n<answer> red</answer>"),  # vLLM
    ("<answer> red </answer>", "stop", None, "<answer> red </answer>"),  # kept by the server (ours)
    ("<tool_call>\n{}\n", "stop", None, "<tool_call>\n{}\n</tool_call>"),  # no stop_reason: the open tag says
    ("<think> a </think>", "stop", None, "<think> a </think>"),  # EOS
    ("<answer> red", "length", None, "<answer> red"),  # cut by max_tokens: nothing to restore
    ("<answer> red", "stop", 151645, "<answer> red"),  # a stop token id: not a string we sent
])
def test_restore_stop(text, finish, stop_reason, expected):
    assert restore_stop(text, finish, stop_reason, ["</answer>", "</tool_call>"]) == expected


class StubServer:
    """An OpenAI-shaped HTTP server answering from `script` (status, body, headers) in order; `requests` holds
    (method, path, headers, JSON body) of each request."""

    def __init__(self, script):
        self.script, self.requests = list(script), []
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self, body):
                stub.requests.append((self.command, self.path, dict(self.headers), body))
                status, reply, headers = stub.script.pop(0)
                data = json.dumps(reply).encode()
                self.send_response(status)
                for key, value in {"Content-Type": "application/json", **headers}.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                self._answer(None)

            def do_POST(self):
                self._answer(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def stub():
    servers = []

    def start(*script):
        servers.append(StubServer(script))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def completion(text: str, finish: str = "stop", stop_reason=None) -> tuple[int, dict, dict]:
    return 200, {"choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                              "finish_reason": finish, "stop_reason": stop_reason}]}, {}


def _image_size(url: str) -> tuple[int, int]:
    assert url.startswith("data:image/png;base64,")
    return Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).size


def test_a_zoom_conversation_over_http(chat, stub):
    """vLLM drops the stop string `</tool_call>` (stop_reason names it); the crop goes back as a PNG part."""
    server = stub((200, {"data": [{"id": "served"}]}, {}),
                  completion(render_turn("look", tool_call=(40, 30)).removesuffix("</tool_call>"),
                             stop_reason="</tool_call>"),
                  completion(render_turn("it is red", answer="red")))
    sample, image = generate("visual_search", 1, seed=3)[0]

    async def run():
        async with OpenAIPolicy(server.url, chat, api_key="k", backoff_s=0.01) as policy:
            assert await policy.served_model() == "served"
            driver = RolloutDriver(policy, chat, RolloutConfig(mode="multiturn", temperature=0.0, seed=None))
            prepared = driver.prepare(sample, [image])
            [rollout] = await driver.rollout_group(prepared)
            return prepared, rollout

    prepared, rollout = asyncio.run(run())
    record = rollout.record
    assert record.finish == "answer" and record.num_turns == 2 and len(rollout.crops) == 1
    assert record.trace.answer == "red" and "</tool_call>" in record.text
    (_, models_path, headers, _), (_, path, _, first), (_, _, _, second) = server.requests
    assert models_path == "/v1/models" and path == "/v1/chat/completions"
    assert headers["Authorization"] == "Bearer k"
    assert first["model"] == "served" and first["temperature"] == 0.0 and first["stop"] == ["</answer>",
                                                                                            "</tool_call>"]
    assert second["messages"][2]["content"].endswith("</tool_call>")
    [original] = [p for p in second["messages"][1]["content"] if p["type"] == "image_url"]
    [crop] = [p for p in second["messages"][3]["content"] if p["type"] == "image_url"]
    assert _image_size(original["image_url"]["url"]) == prepared.images[0].size  # the model-frame image
    assert _image_size(crop["image_url"]["url"]) == rollout.crops[0].image.size


def test_retries_then_errors(chat, stub):
    unavailable = (503, {"error": {"message": "warming up"}}, {"Retry-After": "0"})
    server = stub(unavailable, (200, {"data": [{"id": "m"}]}, {}),
                  (400, {"error": {"message": "messages.1: too many images"}}, {}),
                  (401, {"error": {"message": "wrong token"}}, {}),
                  (404, {"error": {"message": "no such model"}}, {}))

    async def run():
        async with OpenAIPolicy(server.url, chat, backoff_s=0.01) as policy:
            assert await policy.served_model() == "m" and policy.retries == 1  # the 503 was sent again
            errors = []
            for _ in range(3):
                with pytest.raises(EndpointError) as err:
                    await policy._send("POST", "/chat/completions", {})
                errors.append(err.value)
            return errors

    bad_input, unauthorised, unknown = asyncio.run(run())
    assert not bad_input.fatal and bad_input.status == 400 and "too many images" in str(bad_input)
    assert unauthorised.fatal and "wrong token" in str(unauthorised) and "--policy.api_key" in str(unauthorised)
    assert unknown.fatal and unknown.status == 404


def test_an_unreachable_endpoint_is_fatal_after_retry_s(chat, stub):
    server = stub()
    url = server.url
    server.close()  # nothing listens there now

    async def run():
        async with OpenAIPolicy(url, chat, retry_s=0.05, backoff_s=0.01) as policy:
            await policy.served_model()

    with pytest.raises(EndpointError, match="cannot reach") as err:
        asyncio.run(run())
    assert err.value.fatal


def test_eval_config_takes_one_policy():
    from jobs.evaluate import EvalConfig
    from vigorl_core.config import ConfigError, parse_config

    base = ["--model", "tiny", "--benchmarks", "[{name: synthetic_grounding}]"]
    cfg = parse_config(EvalConfig, base + ["--policy.endpoint", "http://h:8000/v1", "--policy.api_key", "secret"])
    assert cfg.policy.api_key == "secret" and "api_key" not in cfg.model_dump()["policy"]  # not in config.yaml
    for extra, problem in ((["--policy.app", "vigorl"], "two policies"), ([], "http")):
        url = "h:8000" if not extra else "http://h:8000/v1"
        with pytest.raises(ConfigError, match=problem):
            parse_config(EvalConfig, base + ["--policy.endpoint", url] + extra)
