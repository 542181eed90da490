"""Records that cross stage boundaries: samples, points, traces.

A JSONL line is `record.model_dump_json()`; every record carries `schema_version` so later stages can
add optional fields without breaking old files. Coordinates always say which frame they are in
(see vigorl_core.frames): `original` = pixels of the file as given, `model` = the smart-resized image
the model sees, `crop` = pixels of a zoom crop.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

SCHEMA_VERSION = 1

Task = Literal["spatial", "visual_search", "grounding", "web_action"]
TASKS: tuple[str, ...] = ("spatial", "visual_search", "grounding", "web_action")
SOURCES: tuple[str, ...] = (
    "sat2", "blink", "robospatial", "vstar", "screenspot_v2", "screenspot_pro", "osatlas", "vwa", "synthetic",
)
Frame = Literal["original", "model", "crop"]
Box = tuple[float, float, float, float]


class Record(BaseModel):
    """Base of every persisted record: strict keys, a schema version on every line."""

    model_config = ConfigDict(extra="forbid")
    schema_version: int = SCHEMA_VERSION


class Sample(Record):
    """One benchmark or training question over one or more images."""

    id: str
    task: Task = Field(description="family that selects prompts, rewards and zoom settings")
    source: str = Field(description="benchmark name, e.g. sat2, vstar, screenspot_v2, synthetic")
    images: list[str] = Field(description="image paths; relative paths resolve against the data root")
    question: str = Field(description="user text without image placeholders")
    options: list[str] = Field(default_factory=list, description="answer options (option text, no letters)")
    answer: str = Field(
        description="ground truth as the original data writes it: option text, '(x1, y1, x2, y2)', action")
    bbox: Box | None = Field(default=None, description="target box (x1, y1, x2, y2) in the original frame of images[0]")
    point: tuple[float, float] | None = Field(default=None, description="target point in the original frame")
    category: str | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)


class Point(BaseModel):
    """A point named by the model. `x`, `y` are pixels in `frame`."""

    x: float
    y: float
    frame: Frame = "model"


class Step(BaseModel):
    """One reasoning step: its text and the point(s) it names; `turn` is the assistant turn it came from."""

    text: str
    points: list[Point] = Field(default_factory=list)
    turn: int = 0


class ToolCall(BaseModel):
    """A `<tool_call>` request. `coordinate` is None when it did not parse; `error` says why."""

    name: str | None = None
    coordinate: tuple[int, int] | None = None
    raw: str = ""
    turn: int = 0
    error: str | None = None


class Trace(BaseModel):
    """What a model response (or a whole multi-turn conversation) says, parsed; see vigorl_core.protocol."""

    steps: list[Step] = Field(default_factory=list)
    tool_calls: list[ToolCall] = Field(default_factory=list)
    answer: str | None = None
    errors: list[str] = Field(default_factory=list, description="malformed parts, reported rather than dropped")

    @property
    def points(self) -> list[Point]:
        return [p for s in self.steps for p in s.points]


class RolloutRecord(Record):
    """One finished conversation, ready for training (the token contract: docs/method.md,
    vigorl_core/rollout/chat_tokens.py).

    `engine_ids` hold ONE `<|image_pad|>` per image (what the engine takes); `train_ids` expand each to
    the processor's count; `loss_mask` and `logprobs` align with `train_ids` (1 / the engine's log-prob
    on model-generated tokens, 0 / 0.0 elsewhere). `images` name the images in order (content hashes;
    the pixels travel separately, by reference)."""

    sample_id: str
    group_index: int = 0
    task: str
    mode: str
    engine_ids: list[int]
    train_ids: list[int]
    loss_mask: list[int]
    logprobs: list[float]
    prompt_len: int = Field(description="number of train_ids before the first generated token")
    images: list[str] = Field(description="sha256 of each image's RGB bytes and size, in order")
    image_tokens: list[int] = Field(description="expanded <|image_pad|> count of each image")
    text: str = Field(description="the response as one string (turns and observations, tags present)")
    trace: Trace
    finish: str = Field(description="answer | no_answer (single-turn: stopped without </answer>) | no_tool_call "
                        "(multi-turn: a turn stopped with neither a tool call nor an answer) | max_turns | max_images "
                        "(a tool call with the image budget full) | response_budget | length")
    num_turns: int
    reward: float | None = None
    reward_details: dict[str, Any] = Field(default_factory=dict)
    policy_versions: list[int] = Field(description="policy version that generated each turn")
    timings: dict[str, float] = Field(default_factory=dict)
    constrained_logprobs: bool = Field(False, description="the log-probs came from a grammar-constrained engine "
                                       "(PlannedTurnsEngine): they are the constrained distribution's, not the "
                                       "policy's; train with recomputed log-probs only")
    has_logprobs: bool = Field(True, description="`logprobs` holds the engine's log-probs; False: the rollout did "
                               "not ask for them (RolloutConfig.logprobs) and they are zeros")
