"""The server-side grounded loop behind `POST /v1/grounded`, and the shape of its answer.

One conversation runs through the core rollout driver (the same code as GRPO rollouts and evaluation)
against the PolicyServer; single mode is one grounded turn, multi mode is the zoom loop with crops cut
by the core ZoomEnv (the task x profile table unless the request gives crop settings). Every point is
reported in the model frame (what the model saw) AND the original frame (the user's pixels).
"""

from __future__ import annotations

import base64
from dataclasses import replace
from typing import Any

from services.schemas import ApiError, GroundedRequest
from vigorl_core.rollout.chat_tokens import ChatTokens
from vigorl_core.rollout.engine import PolicyEngine
from vigorl_core.frames import FrameMap
from vigorl_core.images import png_bytes
from vigorl_core.rollout.planned import PlannedTurnsEngine
from vigorl_core.records import Sample
from vigorl_core.rollout.driver import Rollout, RolloutConfig, RolloutDriver
from vigorl_core.zoom import ZoomSettings


async def run_grounded(request: GroundedRequest, image: Any, frame: FrameMap, policy: PolicyEngine,
                       chat: ChatTokens, max_model_len: int, request_id: str, planned_zooms: int = 0) -> Rollout:
    """Run one grounded conversation over the model-frame `image`; ApiError if the prompt cannot fit."""
    multi = request.mode == "multi"
    config = RolloutConfig(
        mode="multiturn" if multi else "grounded", temperature=request.sampling.temperature,
        top_p=request.sampling.top_p, seed=request.sampling.seed, max_turns=request.max_turns if multi else 1,
        max_images=request.max_images, max_tokens_per_turn=request.sampling.max_tokens,
        zoom=ZoomSettings(**request.crop.model_dump()) if request.crop else None, score=False,
    )
    if planned_zooms:
        zooms = planned_zooms if multi else 0
        policy = PlannedTurnsEngine(policy, chat.tokenizer, max_zooms=zooms, min_zooms=zooms)
    driver = RolloutDriver(policy, chat, config)
    sample = Sample(id=request_id, task=request.task, source="http", images=[], question=request.query,
                    options=request.options, answer="")
    prepared = driver.prepare(sample, [image], frame)
    prompt_len = len(chat.expand(prepared.prompt_ids, prepared.images))
    if prompt_len >= max_model_len:
        raise ApiError(400, f"prompt is {prompt_len} tokens (image included); the model's context is "
                            f"{max_model_len}", param="query", code="context_length_exceeded")
    driver.config = replace(config, max_response_tokens=max_model_len - prompt_len)
    [rollout] = await driver.rollout_group(prepared)
    return rollout


def _both(frame: FrameMap, x: float, y: float) -> dict[str, dict[str, float]]:
    ox, oy = frame.to_original(x, y)
    return {"model": {"x": round(x, 2), "y": round(y, 2)}, "original": {"x": round(ox, 2), "y": round(oy, 2)}}


def _box_both(frame: FrameMap, box: tuple[float, float, float, float]) -> dict[str, list[float]]:
    return {"model": [round(v, 2) for v in box], "original": [round(v, 2) for v in frame.box_to_original(box)]}


def grounded_response(rollout: Rollout, frame: FrameMap, request: GroundedRequest, *, request_id: str,
                      model: str) -> dict[str, Any]:
    """The JSON body of a /v1/grounded answer (see README "HTTP endpoint"); the caller adds latency_ms."""
    record, trace = rollout.record, rollout.record.trace
    steps = [{"turn": s.turn, "text": s.text, "points": [_both(frame, p.x, p.y) for p in s.points]}
             for s in trace.steps]
    executed = []  # the first parsed tool call of each turn is the one that ran (rollout.py)
    for call in trace.tool_calls:
        if call.coordinate is not None and all(c.turn != call.turn for c in executed):
            executed.append(call)
    zooms = []
    for call, crop in zip(executed, rollout.crops):
        entry = {"turn": call.turn, "requested": list(call.coordinate), "point": _both(frame, *crop.point),
                 "window": _box_both(frame, crop.frame.window), "clamped": crop.clamped,
                 "crop_size": list(crop.image.size)}
        if request.return_crops:
            entry["crop_png"] = base64.b64encode(png_bytes(crop.image)).decode()
        zooms.append(entry)
    generated = sum(record.loss_mask)
    return {
        "id": request_id, "object": "grounded.result", "model": model,
        "policy_version": max(record.policy_versions, default=0),
        "answer": trace.answer, "text": record.text, "finish": record.finish, "turns": record.num_turns,
        "image": {"original_size": list(frame.original_size), "model_size": list(frame.model_size)},
        "steps": steps, "zooms": zooms, "errors": trace.errors,
        "usage": {"prompt_tokens": record.prompt_len, "completion_tokens": generated,
                  "image_tokens": sum(record.image_tokens), "total_tokens": len(record.train_ids)},
    }
