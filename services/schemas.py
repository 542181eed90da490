"""Request bodies and settings of the HTTP gateway (pydantic), the error every bad request gets, and the
Server-Timing header every answer carries.

Chat completions follow the OpenAI schema (unknown fields are ignored, as OpenAI clients send extras);
`/v1/grounded` and `/v1/score` are ours and strict (an unknown field is an error naming it).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from vigorl_core.images import DEFAULT_FORMATS
from vigorl_core.records import Task

if TYPE_CHECKING:
    from vigorl_core.rollout.engine import TimedPolicy


class ApiError(Exception):
    """An error answered as `{"error": {"message", "type", "param", "code"}}` with HTTP `status`."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str = "invalid_request",
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        if self.status == 401:
            kind = "authentication_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


def body_error(errors: Sequence[Mapping[str, Any]]) -> ApiError:
    """400 for a request body that failed validation (FastAPI's RequestValidationError errors, or pydantic's),
    naming the first bad field by its path in the body (e.g. `messages.0.content.1.image_url`)."""
    def path(error: Mapping[str, Any]) -> str:  # FastAPI's locations start with "body"
        loc = error["loc"][1:] if error["loc"][:1] == ("body",) else error["loc"]
        return ".".join(str(part) for part in loc)

    first = errors[0]
    if first["type"] == "json_invalid":
        return ApiError(400, f"body is not valid JSON: {first.get('ctx', {}).get('error', first['msg'])}",
                        code="invalid_json")
    if not path(first) and first["type"] in ("missing", "model_attributes_type", "dict_type", "model_type"):
        got = "nothing" if first["type"] == "missing" else type(first.get("input")).__name__
        return ApiError(400, f"body must be a JSON object, got {got}", code="invalid_json")
    problems = []
    for e in errors:
        got = f" (got {e['input']!r:.60})" if e["type"] not in ("missing", "extra_forbidden") and "input" in e else ""
        problems.append(f"{path(e) or '<body>'}: {e['msg']}{got}")
    return ApiError(400, "; ".join(problems[:5]), param=path(first) or None, code="invalid_field")


class Limits(BaseModel):
    """What one request may ask for; enforced by the gateway before any work is done."""

    model_config = ConfigDict(extra="forbid")
    max_body_bytes: int = Field(32 * 1024 * 1024, description="largest accepted request body")
    max_image_bytes: int = Field(20 * 1024 * 1024, description="largest encoded image")
    max_image_pixels: int = Field(40_000_000, description="largest declared width x height (decompression bombs)")
    max_images: int = Field(8, description="images per request (chat: all messages together)")
    image_formats: tuple[str, ...] = Field(DEFAULT_FORMATS, description="accepted image formats (PIL names)")
    max_tokens: int = Field(2048, description="largest max_tokens of a request (per turn for /v1/grounded)")
    max_turns: int = Field(10, description="largest max_turns of a /v1/grounded request")
    max_n: int = Field(8, description="largest n (samples) of a chat completion")


class GatewaySettings(BaseModel):
    """Gateway behaviour: limits, auth, remote images, the served model's name."""

    model_config = ConfigDict(extra="forbid")
    model_name: str = Field("vigorl", description="the id /v1/models lists and responses carry")
    limits: Limits = Field(default_factory=Limits)
    api_token: str | None = Field(None, description="bearer token required on /v1/*; default: $VIGORL_API_TOKEN")
    allowed_image_urls: list[str] = Field(default_factory=list,
                                          description="URL prefixes the gateway may fetch images from (none: "
                                                      "only data URLs)")
    fetch_timeout_s: float = Field(10.0, description="timeout of one remote image fetch")
    replica_wait_s: float = Field(30.0, gt=0, description="how long a request waits for a policy replica that can "
                                  "serve (while Serve replaces a dead one) before it gets 503")
    retry_after_s: int = Field(10, ge=1, description="the Retry-After of a 503: about a replica's start-up time")


# ---- OpenAI chat completions ----

class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ImageURL(BaseModel):
    url: str
    detail: str | None = None


class ImagePart(BaseModel):
    type: Literal["image_url"]
    image_url: ImageURL


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str | list[Annotated[TextPart | ImagePart, Field(discriminator="type")]]


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1)
    stream: bool = False
    stop: str | list[str] | None = None
    seed: int | None = None


# ---- /v1/grounded ----

class CropSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    offset: int = Field(ge=1, description="half-side of the crop window, model-frame pixels")
    crop_size: int = Field(ge=28, le=1344, description="side the crop is resized to")
    draw_dot: bool = False


class GroundedSampling(BaseModel):
    model_config = ConfigDict(extra="forbid")
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    max_tokens: int | None = Field(None, ge=1,
                                   description="tokens per assistant turn; default: 512 or the server limit")
    seed: int | None = None


class GroundedRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    image: str = Field(min_length=1, description="data URL, bare base64, or an allow-listed http(s) URL")
    query: str = Field(min_length=1)
    options: list[str] = Field(default_factory=list)
    task: Task = "visual_search"
    mode: Literal["single", "multi"] = "single"
    max_turns: int | None = Field(None, ge=1, description="assistant turns (multi); default: 5 or the server limit")
    max_images: int | None = Field(None, ge=1, description="original + crops; default: 5 or the server limit")
    crop: CropSettings | None = None
    sampling: GroundedSampling = Field(default_factory=GroundedSampling)
    return_crops: bool = False
    annotate: bool = False


class ScoreRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    task: Task = "visual_search"
    mode: str = "grounded"
    text: str
    answer: str
    bbox: tuple[float, float, float, float] | None = Field(None, description="model-frame box, point tasks")


def server_timing(image_seconds: float, policy: TimedPolicy, total_seconds: float) -> str:
    """A `Server-Timing` header value (W3C), milliseconds of where a request's time went on the server, e.g.
    `image;dur=3.1, policy;dur=850.2, engine;dur=842.0, total;dur=856.4` (image = fetch + decode in the ZoomServer,
    policy = the calls to PolicyServer replicas, engine = the time their engines reported, total = the whole
    handler). Browsers' developer tools show it; `parse_server_timing` reads it back."""
    spans = {"image": image_seconds, "policy": policy.seconds, "engine": policy.engine_seconds,
             "total": total_seconds}
    return ", ".join(f"{name};dur={1000 * seconds:.1f}" for name, seconds in spans.items())


def parse_server_timing(header: str) -> dict[str, float]:
    """`server_timing`'s header back to {name: milliseconds} (bench/serve_gateway.py splits overhead by hop)."""
    return {name: float(dur.split("=")[1]) for name, dur in (part.strip().split(";") for part in header.split(","))}
