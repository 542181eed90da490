"""Gateway: the HTTP ingress (FastAPI on Ray Serve). Limits, auth and request validation live here.

Endpoints (README "HTTP endpoint" has curl and Python examples):
- `POST /v1/chat/completions`: OpenAI-compatible; images as `image_url` data URLs (or allow-listed
  http(s) URLs); `stream: true` answers with server-sent events. The `openai` client works against it.
- `POST /v1/grounded`: image + query; runs the grounded loop server-side (single turn, or the multi-turn
  zoom loop) and returns the answer, the steps with their points in the model AND the original frame,
  the zooms (optionally their crops) and, on request, an annotated PNG.
- `POST /v1/score`: the reward of a response against a ground truth (the Critic).
- `GET /`: a web page to ask about an image and see the answer drawn; `GET /browse`: a trace-file browser.
- `GET /healthz` (200 while a PolicyServer replica is running, else 503), `GET /v1/models`. Serve's own
  metrics plus `vigorl_requests` / `vigorl_latency_ms` / `vigorl_replica_retries` reach Ray's Prometheus endpoint.

A policy replica that dies (preemption, OOM, a drained node) costs no request: one in flight on it runs once more,
from its start, as soon as a replica can serve again (another one, or Serve's replacement); a request that finds
none within `replica_wait_s`, or loses a replica twice, gets 503 with `Retry-After`. Nothing waits unbounded.

Every bad request gets a 4xx JSON `{"error": {"message", "type", "param", "code"}}` that names the field.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import httpx
from fastapi import Depends, FastAPI, Response
from fastapi.responses import StreamingResponse
from ray import serve

from services.grounded import grounded_response, run_grounded
from services.http import add_http_handling, guard
from services.pages import add_pages
from services.policy import PolicyClient, is_replica_loss
from services.schemas import ApiError, ChatRequest, GatewaySettings, GroundedRequest, ScoreRequest, server_timing
from vigorl_core.rollout.chat_tokens import ChatTokens
from vigorl_core.rollout.engine import Sampling, TimedPolicy
from vigorl_core.images import ImageError, image_bytes
from vigorl_core.rewards import Truth, reward_for

app = FastAPI(title="vigorl", description="grounded visual reasoning: chat completions and the grounded loop")
add_pages(app)  # GET / (demo page), /browse (trace files), /web/* (services/pages.py)
add_http_handling(app)  # errors, body limits, bearer token, metrics (services/http.py)
_SPECIAL_TAIL = ("<|im_end|>", "<|endoftext|>")
T = TypeVar("T")


def _visible(text: str) -> str:
    for special in _SPECIAL_TAIL:
        text = text.replace(special, "")
    return text


@serve.deployment(name="Gateway", max_ongoing_requests=256, ray_actor_options={"num_cpus": 0.5})
@serve.ingress(app)
class Gateway:
    """HTTP ingress over the PolicyServer, ZoomServer and Critic handles."""

    def __init__(self, model_dir: str, settings: dict[str, Any], policy: Any, zoom: Any, critic: Any,
                 planned_zooms: int = 0):
        self.settings = GatewaySettings(**settings)
        self.planned_zooms = planned_zooms  # VIGORL_PLANNED_ZOOMS: random-weight test and demo models zoom N times
        self.limits = self.settings.limits
        self.token = self.settings.api_token or os.environ.get("VIGORL_API_TOKEN") or None
        self.chat = ChatTokens.from_pretrained(model_dir)
        self.policy = PolicyClient(policy)
        self.zoom, self.critic = zoom, critic
        tok = self.chat.tokenizer
        self.stop_ids = tuple(tok.convert_tokens_to_ids(t) for t in _SPECIAL_TAIL if t in tok.get_vocab())
        self._max_model_len: int | None = None
        self.app_name = serve.get_replica_context().app_name
        self._replicas: tuple[float, dict[str, int] | None] = (0.0, None)  # (when read, PolicyServer replica states)
        self._states_read: asyncio.Future | None = None
        self._http: httpx.AsyncClient | None = None  # remote images (allow-listed), made on first use
        app.state.gateway = self  # for services/http.py's guard and body checks (one Gateway per replica process)
        from ray.serve.metrics import Counter

        self._retries = Counter("vigorl_replica_retries", "requests run again after their policy replica died",
                                tag_keys=("path",))

    # ---- plumbing shared by the endpoints ----

    async def _max_len(self) -> int:
        if self._max_model_len is None:
            self._max_model_len = (await self.policy.info())["max_model_len"]
        return self._max_model_len

    async def _replica_states(self, fresh: bool = True) -> dict[str, int] | None:
        """PolicyServer replicas by state ({"RUNNING": 1, "STARTING": 1}), read from the Serve controller at most once
        a second, by one read that concurrent requests share; None when the controller cannot say (then requests
        are not held back). With fresh=False a reading that had a running replica is returned at once and a stale
        one is refreshed in the background: the controller's answer (tens of ms) stays off the request's path."""
        read_at, states = self._replicas
        if time.monotonic() - read_at < 1.0:
            return states
        if self._states_read is None or self._states_read.done():
            self._states_read = asyncio.ensure_future(self._read_replica_states())
        if not fresh and read_at and (states is None or states.get("RUNNING")):
            return states
        return await asyncio.shield(self._states_read)

    async def _read_replica_states(self) -> dict[str, int] | None:
        try:
            status = await asyncio.wait_for(asyncio.to_thread(serve.status), timeout=5)
            replicas = status.applications[self.app_name].deployments["PolicyServer"].replica_states
            states = {getattr(state, "value", str(state)): n for state, n in replicas.items() if n}
        except Exception:
            states = None
        self._replicas = (time.monotonic(), states)
        return states

    def _unavailable(self, why: str) -> ApiError:
        after = self.settings.retry_after_s
        return ApiError(503, f"{why}; retry after {after} s", code="unavailable", headers={"Retry-After": str(after)})

    async def _await_replica(self) -> None:
        """Return once the Serve controller counts a running PolicyServer replica; 503 after `replica_wait_s`."""
        deadline = time.monotonic() + self.settings.replica_wait_s
        while (states := await self._replica_states(fresh=False)) is not None and not states.get("RUNNING"):
            if time.monotonic() >= deadline:
                raise self._unavailable(f"no policy replica can serve (replicas: {states or 'none'}) after waiting "
                                        f"{self.settings.replica_wait_s:g} s")
            await asyncio.sleep(0.5)

    async def _probe_replica(self) -> None:
        """Return once a live PolicyServer replica answers through the router (the controller may still count a
        replica that just died); 503 after `replica_wait_s`."""
        deadline = time.monotonic() + self.settings.replica_wait_s
        while (left := deadline - time.monotonic()) > 0:
            try:
                await asyncio.wait_for(self.policy.info(), timeout=left)
                return
            except Exception as err:
                if not (is_replica_loss(err) or isinstance(err, asyncio.TimeoutError)):
                    raise
            await asyncio.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
        raise self._unavailable(f"no policy replica answered within {self.settings.replica_wait_s:g} s")

    async def _on_policy(self, call: Callable[[], Awaitable[T]], response: Response, path: str) -> T:
        """`await call()` (a generation or a whole grounded conversation, which carries everything it needs); if its
        replica is lost, once more from the start when a replica answers (header `X-Replica-Retries: 1`); a second
        loss is a 503."""
        await self._await_replica()
        try:
            return await call()
        except Exception as err:
            if not is_replica_loss(err):
                raise
        self._retries.inc(tags={"path": path})
        await self._probe_replica()
        try:
            result = await call()
        except Exception as err:
            if is_replica_loss(err):
                raise self._unavailable("the policy replica serving this request died, twice") from None
            raise
        response.headers["X-Replica-Retries"] = "1"
        return result

    def _check(self, value: int, limit: int, param: str) -> None:
        if value > limit:
            raise ApiError(400, f"{param}: {value} is over this server's limit of {limit}", param=param,
                           code="over_limit")

    async def _fetch(self, url: str, field: str) -> bytes:
        """An allow-listed remote image, streamed with the fetch timeout and stopped past the image size limit."""
        if not any(url.startswith(prefix) for prefix in self.settings.allowed_image_urls):
            raise ImageError(field, "remote image URLs are not fetched unless allow-listed (allowed_image_urls); "
                                    "send a data URL")
        if self._http is None:
            self._http = httpx.AsyncClient(timeout=self.settings.fetch_timeout_s, follow_redirects=False)
        limit = self.limits.max_image_bytes
        try:
            async with asyncio.timeout(self.settings.fetch_timeout_s):
                async with self._http.stream("GET", url) as response:
                    response.raise_for_status()
                    data = bytearray()
                    async for chunk in response.aiter_bytes():
                        data += chunk
                        if len(data) > limit:
                            raise ImageError(field, f"more than the limit of {limit} bytes")
        except ImageError:
            raise
        except Exception as err:
            raise ImageError(field, f"could not fetch {url}: {type(err).__name__} {err}".strip()) from None
        return bytes(data)

    async def _image(self, url: str, field: str):
        """(raw bytes, DecodedImage) of one image reference; ApiError 400 naming `field` if it is bad."""
        try:
            data = await self._fetch(url, field) if url.startswith(("http://", "https://")) else image_bytes(url, field)
            if len(data) > self.limits.max_image_bytes:
                raise ImageError(field, f"{len(data)} bytes, more than the limit of {self.limits.max_image_bytes}")
            decoded = await self.zoom.decode.remote(data, field)
        except ImageError as err:
            decoded = err
        if isinstance(decoded, ImageError):
            raise ApiError(400, str(decoded), param=decoded.field, code="invalid_image")
        return data, decoded

    # ---- endpoints ----

    @app.get("/healthz")
    async def healthz(self) -> dict[str, Any]:
        states = await self._replica_states()
        if states is not None and not states.get("RUNNING"):
            raise self._unavailable(f"no policy replica is running (replicas: {states or 'none'})")
        try:
            info = await asyncio.wait_for(self.policy.info(), timeout=10)
        except Exception as err:
            raise self._unavailable(f"policy unavailable: {type(err).__name__}") from None
        return {"status": "ok", "model": self.settings.model_name, "policy_version": info["version"],
                "replicas": states}

    @app.get("/v1/models", dependencies=[Depends(guard)])
    async def models(self) -> dict[str, Any]:
        return {"object": "list", "data": [{"id": self.settings.model_name, "object": "model", "created": 0,
                                            "owned_by": "vigorl", "max_model_len": await self._max_len()}]}

    @app.post("/v1/chat/completions", dependencies=[Depends(guard)])
    async def chat_completions(self, body: ChatRequest, response: Response):
        start = time.perf_counter()
        if body.model not in (None, self.settings.model_name):
            raise ApiError(404, f"model {body.model!r} is not served here; this server serves "
                                f"{self.settings.model_name!r}", param="model", code="model_not_found")
        self._check(body.n, self.limits.max_n, "n")
        if body.stream and body.n != 1:
            raise ApiError(400, "n: streaming supports n=1", param="n")
        messages, refs = [], []
        for i, message in enumerate(body.messages):
            if isinstance(message.content, str):
                messages.append({"role": message.role, "content": message.content})
                continue
            parts = []
            for j, part in enumerate(message.content):
                if part.type == "text":
                    parts.append({"type": "text", "text": part.text})
                else:
                    refs.append((part.image_url.url, f"messages.{i}.content.{j}.image_url.url"))
                    parts.append({"type": "image"})
            messages.append({"role": message.role, "content": parts})
        self._check(len(refs), self.limits.max_images, "messages (images)")
        decoding = time.perf_counter()
        images = [decoded.image for _, decoded in await asyncio.gather(*(self._image(u, f) for u, f in refs))]
        image_seconds = time.perf_counter() - decoding
        prompt_ids = self.chat.encode(self.chat.chat_prompt_text(messages))
        prompt_len = len(self.chat.expand(prompt_ids, images))
        room = await self._max_len() - prompt_len
        requested = body.max_completion_tokens or body.max_tokens
        if requested is not None:
            self._check(requested, self.limits.max_tokens, "max_tokens")
        max_tokens = requested or min(self.limits.max_tokens, room)
        if max_tokens > room:
            raise ApiError(400, f"prompt ({prompt_len} tokens, images included) + max_tokens ({max_tokens}) "
                                f"exceed the context of {await self._max_len()}", param="max_tokens",
                           code="context_length_exceeded")
        stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
        sampling = Sampling(n=body.n, temperature=body.temperature, top_p=body.top_p, max_tokens=max_tokens,
                            stop=stop, stop_token_ids=self.stop_ids, seed=body.seed, logprobs=False)
        request_id = f"chatcmpl-{uuid.uuid4().hex[:20]}"
        if body.stream:  # a stream cannot start over once sent: a replica lost mid-stream is reported in-band
            await self._await_replica()
            return StreamingResponse(self._sse(request_id, prompt_ids, images, sampling),
                                     media_type="text/event-stream")
        policy = TimedPolicy(self.policy)
        generations = await self._on_policy(lambda: policy.generate(prompt_ids, images, sampling, request_id),
                                            response, "/v1/chat/completions")
        response.headers["Server-Timing"] = server_timing(image_seconds, policy, time.perf_counter() - start)
        completion_tokens = sum(len(g.token_ids) for g in generations)
        return {
            "id": request_id, "object": "chat.completion", "created": int(time.time()),
            "model": self.settings.model_name,
            "choices": [{"index": k, "message": {"role": "assistant", "content": _visible(g.text)},
                         "finish_reason": g.finish_reason} for k, g in enumerate(generations)],
            "usage": {"prompt_tokens": prompt_len, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_len + completion_tokens},
        }

    async def _sse(self, request_id: str, prompt_ids: list[int], images: list, sampling: Sampling):
        created = int(time.time())

        def event(delta: dict[str, Any], finish: str | None = None) -> str:
            chunk = {"id": request_id, "object": "chat.completion.chunk", "created": created,
                     "model": self.settings.model_name,
                     "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
            return f"data: {json.dumps(chunk)}\n\n"

        yield event({"role": "assistant", "content": ""})
        finish = "stop"
        try:
            async for delta in self.policy.stream(prompt_ids, images, sampling, request_id):
                if text := _visible(delta.text):
                    yield event({"content": text})
                finish = delta.finish_reason or finish
        except Exception as err:  # the status line is already sent: report the error in-band
            error = (self._unavailable("the policy replica serving this stream died") if is_replica_loss(err)
                     else ApiError(500, f"generation failed: {err}", code="internal"))
            yield f"data: {json.dumps(error.body())}\n\n"
        yield event({}, finish)
        yield "data: [DONE]\n\n"

    @app.post("/v1/grounded", dependencies=[Depends(guard)])
    async def grounded(self, body: GroundedRequest, response: Response) -> dict[str, Any]:
        start = time.perf_counter()
        # Unset budgets take the usual value capped by this server's limits; explicit ones must fit.
        for holder, name, usual, limit in ((body, "max_turns", 5, self.limits.max_turns),
                                           (body, "max_images", 5, self.limits.max_images),
                                           (body.sampling, "max_tokens", 512, self.limits.max_tokens)):
            if getattr(holder, name) is None:
                setattr(holder, name, min(usual, limit))
            self._check(getattr(holder, name), limit, name if holder is body else f"sampling.{name}")
        decoding = time.perf_counter()
        data, decoded = await self._image(body.image, "image")
        image_seconds = time.perf_counter() - decoding
        request_id = f"grd-{uuid.uuid4().hex[:20]}"
        max_len = await self._max_len()
        policy = TimedPolicy(self.policy)
        rollout = await self._on_policy(lambda: run_grounded(body, decoded.image, decoded.frame, policy, self.chat,
                                                             max_len, request_id, self.planned_zooms),
                                        response, "/v1/grounded")
        answer = grounded_response(rollout, decoded.frame, body, request_id=request_id,
                                   model=self.settings.model_name)
        if body.annotate:
            points = [(p["original"]["x"], p["original"]["y"]) for s in answer["steps"] for p in s["points"]]
            points += [(z["point"]["original"]["x"], z["point"]["original"]["y"]) for z in answer["zooms"]]
            png = await self.zoom.annotate.remote(data, points)
            answer["annotated_png"] = base64.b64encode(png).decode()
        answer["latency_ms"] = round((time.perf_counter() - start) * 1000, 1)
        response.headers["Server-Timing"] = server_timing(image_seconds, policy, answer["latency_ms"] / 1000)
        return answer

    @app.post("/v1/score", dependencies=[Depends(guard)])
    async def score(self, body: ScoreRequest) -> dict[str, Any]:
        try:
            reward_for(body.task, body.mode)
        except ValueError as err:
            raise ApiError(400, f"mode: {err}", param="mode") from None
        return await self.critic.score.remote(body.task, body.mode, body.text, Truth(body.answer, body.bbox))
