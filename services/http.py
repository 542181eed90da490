"""The gateway's HTTP handling around every endpoint: errors in one JSON shape, body limits, the bearer token,
request metrics. `add_http_handling(app)` installs it on a FastAPI app; `guard` is the dependency of every /v1
route. The Gateway puts itself on `app.state.gateway` (its token and limits).
"""

from __future__ import annotations

import hmac
import time
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from services.schemas import ApiError, body_error

_metrics: dict[str, Any] = {}


def add_http_handling(app: FastAPI) -> None:
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(RequestValidationError, _bad_body)
    app.add_exception_handler(Exception, _server_error)
    app.middleware("http")(_body_is_json)
    app.middleware("http")(_count)


async def _api_error(_: Request, err: ApiError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


async def _bad_body(request: Request, err: RequestValidationError) -> JSONResponse:
    """FastAPI's validation of a typed body, in the OpenAI-style error shape (400 naming the field)."""
    return await _api_error(request, body_error(err.errors()))


async def _server_error(_: Request, err: Exception) -> JSONResponse:
    return JSONResponse(ApiError(500, f"internal error: {type(err).__name__}: {err}", code="internal").body(),
                        status_code=500)


async def _body_is_json(request: Request, call_next):
    """413 before a body is read when its declared length is over the limit (`guard` checks what arrived), and
    every body read as JSON whatever its Content-Type says (FastAPI parses JSON only when it says JSON; curl's
    `-d` says form-urlencoded), so a client that forgets the header gets its JSON parsed or a JSON error."""
    gateway = getattr(request.app.state, "gateway", None)
    declared = request.headers.get("content-length")
    if gateway is not None and declared and declared.isdigit() and int(declared) > gateway.limits.max_body_bytes:
        return await _api_error(request, too_large(int(declared), gateway.limits.max_body_bytes))
    if request.method == "POST" and request.url.path.startswith("/v1/"):
        request.scope["headers"] = [(k, v) for k, v in request.scope["headers"] if k != b"content-type"] + [
            (b"content-type", b"application/json")]
    return await call_next(request)


def too_large(size: int, limit: int) -> ApiError:
    return ApiError(413, f"request body of {size} bytes is over the limit of {limit}", code="too_large")


_bearer = HTTPBearer(auto_error=False)  # a missing token is our 401 below, not FastAPI's 403


async def guard(request: Request, credentials: HTTPAuthorizationCredentials | None = Depends(_bearer)) -> None:
    """Every /v1 call: the bearer token (when the server has one) and the size of the body that arrived."""
    gateway = request.app.state.gateway
    if gateway.token is not None:
        given = credentials.credentials if credentials is not None else ""
        if not hmac.compare_digest(given.encode(), gateway.token.encode()):
            raise ApiError(401, "missing or wrong bearer token (Authorization: Bearer <token>)", code="invalid_api_key")
    size = len(await request.body())
    if size > gateway.limits.max_body_bytes:
        raise too_large(size, gateway.limits.max_body_bytes)


async def _count(request: Request, call_next):
    from ray.serve.metrics import Counter, Histogram

    if not _metrics:
        _metrics["requests"] = Counter("vigorl_requests", "HTTP requests by path and status",
                                       tag_keys=("path", "status"))
        _metrics["latency"] = Histogram("vigorl_latency_ms", "request latency (ms)",
                                        boundaries=[10, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000],
                                        tag_keys=("path",))
    start = time.perf_counter()
    response = await call_next(request)
    _metrics["requests"].inc(tags={"path": request.url.path, "status": str(response.status_code)})
    _metrics["latency"].observe((time.perf_counter() - start) * 1000, tags={"path": request.url.path})
    return response
