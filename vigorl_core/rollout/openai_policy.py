"""OpenAIPolicy: the PolicyEngine over any OpenAI-compatible /v1/chat/completions endpoint.

Evaluation runs the same rollout driver against it as against the in-cluster PolicyServer (same prompts,
sampling, zoom protocol, parsing and scoring), so a `vllm serve` a user already runs, or our own
`vigorl serve`, can be evaluated:

    async with OpenAIPolicy("http://localhost:8000/v1", chat, api_key="...") as policy:
        driver = RolloutDriver(policy, chat, RolloutConfig(mode="multiturn"))
        [rollout] = await driver.rollout_group(driver.prepare(sample))

The driver works on token ids; HTTP carries messages. Each request decodes the conversation's ids back
into chat-template text and splits it at `<|im_start|>` into messages; every image placeholder becomes an
`image_url` part holding that image (the original resized to the model frame, or a zoom crop made here) as a
PNG data URL. The server's chat template (Qwen2.5-VL's) renders those messages into the same prompt. A
forced final answer (the driver opens the assistant turn with `<think> Based on all ... <answer>`) is sent as
a trailing assistant message with vLLM's `continue_final_message` extension; a server without it (our own
gateway today) ignores the flag and sees that message as a finished turn. Stop strings the server drops from
the text (vLLM does) are put back from the choice's `stop_reason`, or from an open `<answer>`/`<tool_call>`
tag when the server gives none. The returned text is tokenized locally for the driver's budgets.

Errors: 5xx, 429 and connection errors are retried with backoff (1 s doubling to 10 s, honouring
Retry-After) for up to `retry_s`, a 500 at most 3 times; a timeout is not retried. `EndpointError.fatal`
says whether the job should stop (the endpoint is unreachable, unauthorised or does not serve the model)
or only this request failed (a 4xx for this input, a repeated 500, a timeout).
"""

from __future__ import annotations

import asyncio
import base64
import io
import time
import weakref
from collections.abc import Sequence
from typing import Any

from vigorl_core.rollout.chat_tokens import IMAGE_PLACEHOLDER, ChatTokens
from vigorl_core.rollout.engine import Generation, Sampling

FATAL_STATUS = (401, 403, 404)  # the job cannot go on: wrong key, or the model is not there
ROLES = ("system", "user", "assistant")


class EndpointError(RuntimeError):
    """A request the endpoint did not answer. `fatal`: stop the job (rerunning resumes); else the sample fails."""

    def __init__(self, message: str, status: int | None = None, fatal: bool = False):
        super().__init__(message)
        self.status, self.fatal = status, fatal


def chat_messages(text: str, image_urls: Sequence[str]) -> tuple[list[dict], bool]:
    """(OpenAI messages, whether the last is an assistant message to continue) of chat-template `text` that
    ends in an assistant header, optionally followed by a forced prefix; the k-th image placeholder becomes an
    image part with image_urls[k]. Raises ValueError when the text does not have that shape."""
    chunks = text.split("<|im_start|>")
    if chunks[0] or len(chunks) < 2:
        raise ValueError(f"prompt does not start with <|im_start|>: {text[:60]!r}")
    messages, k = [], 0
    for i, chunk in enumerate(chunks[1:]):
        role, newline, body = chunk.partition("\n")
        last = i == len(chunks) - 2
        if role not in ROLES or not newline:
            raise ValueError(f"prompt message {i} has no role of {ROLES}: {chunk[:60]!r}")
        if not last:  # a finished message: content, <|im_end|>, newline
            if not body.endswith("<|im_end|>\n"):
                raise ValueError(f"prompt message {i} ({role}) does not end with <|im_end|>")
            body = body[:-len("<|im_end|>\n")]
        elif role != "assistant":
            raise ValueError(f"prompt ends in a {role} message, not an assistant header")
        pieces = body.split(IMAGE_PLACEHOLDER)
        if len(pieces) == 1:
            content: str | list[dict] = body
        else:
            content = []
            for j, piece in enumerate(pieces):
                if j:
                    if k >= len(image_urls):
                        raise ValueError(f"prompt has more image placeholders than its {len(image_urls)} images")
                    content.append({"type": "image_url", "image_url": {"url": image_urls[k]}})
                    k += 1
                if piece:
                    content.append({"type": "text", "text": piece})
        if not last or body:
            messages.append({"role": role, "content": content})
    if k != len(image_urls):
        raise ValueError(f"{len(image_urls)} images but {k} image placeholders in the prompt")
    return messages, bool(body)


def stop_strings(sampling: Sampling, chat: ChatTokens) -> list[str]:
    """The stop strings of `sampling` plus its stop tokens spelled out (`</tool_call>`), except special tokens
    such as `<|im_end|>`, which end a turn on the server anyway: the OpenAI API takes only strings."""
    special = set(chat.tokenizer.all_special_ids)
    return list(sampling.stop) + [chat.decode([t]) for t in sampling.stop_token_ids if t not in special]


def request_body(messages: list[dict], continue_final: bool, sampling: Sampling, stops: Sequence[str],
                 model: str | None) -> dict:
    """The JSON body of one chat completion for `sampling`, stopping at `stops`."""
    body: dict[str, Any] = {"messages": messages, "max_tokens": sampling.max_tokens, "n": sampling.n,
                            "temperature": sampling.temperature, "top_p": sampling.top_p, "stream": False}
    if model:
        body["model"] = model
    if stops:
        body["stop"] = list(stops)
    if sampling.seed is not None:
        body["seed"] = sampling.seed
    if continue_final:  # vLLM's extension: generate on from the last assistant message
        body.update(continue_final_message=True, add_generation_prompt=False)
    return body


def restore_stop(text: str, finish_reason: str | None, stop_reason: Any, stops: Sequence[str]) -> str:
    """`text` with the stop string it ended at, which vLLM leaves out (ours keeps it): the choice's
    `stop_reason` when given, else the closing tag of an `<answer>`/`<tool_call>` left open."""
    if finish_reason != "stop" or any(text.endswith(s) for s in stops):
        return text
    if isinstance(stop_reason, str):
        return text + stop_reason if stop_reason in stops else text
    if stop_reason is None:
        for stop in stops:
            opener = stop.replace("</", "<", 1)
            if stop.startswith("</") and text.rfind(opener) > text.rfind(stop):
                return text + stop
    return text


def generations(response: dict, chat: ChatTokens, stops: Sequence[str]) -> list[Generation]:
    """The Generations of a chat completion response, in choice order; ids are the text tokenized here."""
    out = []
    for choice in sorted(response.get("choices") or [], key=lambda c: c.get("index", 0)):
        finish = choice.get("finish_reason") or "stop"
        text = restore_stop((choice.get("message") or {}).get("content") or "", finish, choice.get("stop_reason"),
                            stops)
        out.append(Generation(chat.encode(text), text, None, "length" if finish == "length" else "stop",
                              choice.get("stop_reason")))
    if not out:
        raise EndpointError(f"the response has no choices: {str(response)[:200]}")
    return out


def png_data_url(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")  # lossless: the server sees the pixels the in-cluster engine would
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def error_message(response) -> str:
    """The server's own message of an error response (OpenAI's {"error": {"message"}} or vLLM's older shape)."""
    try:
        body = response.json()
    except ValueError:
        return response.text[:300]
    error = body.get("error", body) if isinstance(body, dict) else body
    return str(error.get("message", error) if isinstance(error, dict) else error)[:500]


class OpenAIPolicy:
    """PolicyEngine over an OpenAI-compatible endpoint; see the module docstring. `retries` counts resends."""

    version = 0  # an endpoint has no weight versions the rollout can see

    def __init__(self, endpoint: str, chat: ChatTokens, *, api_key: str | None = None, model: str | None = None,
                 timeout_s: float = 600.0, retry_s: float = 120.0, max_connections: int = 64, backoff_s: float = 1.0):
        import httpx

        self.endpoint, self.chat, self.model = endpoint.rstrip("/"), chat, model
        self.retry_s, self.backoff_s, self.retries = retry_s, backoff_s, 0
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.AsyncClient(headers=headers, timeout=httpx.Timeout(timeout_s, connect=30.0),
                                      limits=httpx.Limits(max_connections=max_connections))
        self._urls: dict[int, str] = {}  # id(image) -> data URL, dropped when the image is collected

    async def __aenter__(self) -> OpenAIPolicy:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.http.aclose()

    def _url(self, image) -> str:
        url = self._urls.get(id(image))
        if url is None:
            url = self._urls[id(image)] = png_data_url(image)
            weakref.finalize(image, self._urls.pop, id(image), None)
        return url

    async def served_model(self) -> str:
        """The model name requests carry: `model` if the endpoint serves it, else the one it lists first.
        Checks reachability and the key before any work starts (errors are fatal)."""
        try:
            body = await self._send("GET", "/models", None)
        except EndpointError as err:
            if err.status == 404 and self.model is not None:  # a server without /models: trust the name given
                return self.model
            raise
        names = [m.get("id") for m in body.get("data", [])]
        if self.model is None and not names:
            raise EndpointError(f"{self.endpoint}/models lists no model; pass --policy.model", fatal=True)
        if self.model is not None and names and self.model not in names:
            raise EndpointError(f"policy.model {self.model!r} is not served at {self.endpoint} (it serves {names})",
                                fatal=True)
        self.model = self.model or names[0]
        return self.model

    async def _send(self, method: str, path: str, body: dict | None) -> dict:
        """One request, resent after 5xx/429/connection errors with backoff; see the module docstring."""
        import httpx

        url, started, attempt = self.endpoint + path, time.monotonic(), 0
        while True:
            attempt += 1
            wait = None
            try:
                response = await self.http.request(method, url, json=body)
            except httpx.TimeoutException as err:
                raise EndpointError(f"{method} {url}: no answer within the timeout ({type(err).__name__}); "
                                    "raise policy.timeout_s for long generations") from None
            except httpx.TransportError as err:
                problem, status = f"cannot reach {url}: {type(err).__name__}: {err}", None
            else:
                status = response.status_code
                if status < 400:
                    return response.json()
                problem = f"{method} {url} answered {status}: {error_message(response)}"
                if status < 500 and status != 429:
                    hint = "; check --policy.api_key" if status in (401, 403) else ""
                    raise EndpointError(problem + hint, status, fatal=status in FATAL_STATUS)
                if status == 500 and attempt >= 3:  # the server fails on this input, it is not down
                    raise EndpointError(problem, status)
                after = response.headers.get("retry-after", "")
                wait = min(float(after), 30.0) if after.replace(".", "", 1).isdigit() else None
            elapsed = time.monotonic() - started
            if elapsed >= self.retry_s:
                raise EndpointError(f"{problem} (gave up after {attempt} attempts in {elapsed:.0f} s)", status,
                                    fatal=True)
            self.retries += 1
            delay = wait if wait is not None else min(10.0 * self.backoff_s, self.backoff_s * 2 ** (attempt - 1))
            await asyncio.sleep(min(delay, max(0.0, self.retry_s - elapsed)))

    async def generate(self, prompt_ids: Sequence[int], images: Sequence[Any], sampling: Sampling,
                       request_id: str | None = None) -> list[Generation]:
        urls = [self._url(im) for im in images]
        messages, continue_final = chat_messages(self.chat.decode(list(prompt_ids)), urls)
        stops = stop_strings(sampling, self.chat)
        body = request_body(messages, continue_final, sampling, stops, self.model)
        return generations(await self._send("POST", "/chat/completions", body), self.chat, stops)

    async def abort(self, request_id: str) -> None:
        pass  # an HTTP request is cancelled by cancelling the task awaiting it
