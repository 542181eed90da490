"""Ask a model about one image on a local engine and look at the grounded trace.

    vigorl demo --model runs/models/tiny --image photo.jpg --question "What colour is the car?" [--multiturn]
    vigorl demo --model runs/models/tiny --image ui.png --question "Where is the search box?" --task grounding \
        --out runs/demo/search.png

Runs the grounded loop of `POST /v1/grounded` (services.grounded: the core rollout driver, zoom crops by the
core ZoomEnv) on a vLLM engine inside this process: no Ray, no Serve. Prints the trace (steps with their
points in the original image's pixels, zooms, answer, finish, tokens) and writes, next to each other:
- `--out` (PNG): the trace drawn on the original image (vigorl_core.evals.trace_image), zoom crops as a strip;
- the same name with `.html`: the web page's view of the trace, self-contained (open it in any browser);
- the same name with `.json`: the answer exactly as `/v1/grounded` would return it (crops included).

A random-weight model (`vigorl tiny`) never zooms on its own: VIGORL_PLANNED_ZOOMS=N constrains its turns to
zoom N times first (demos and tests only; the gateway reads it too).
"""

from __future__ import annotations

import asyncio
import base64
import json
import sys
from pathlib import Path
from typing import Any

from pydantic import Field

from jobs.common import local_model, run_main
from vigorl_core.config import StageConfig, parse_config
from vigorl_core.records import Task
from vigorl_core.rollout.planned import requested_planned_zooms


class DemoConfig(StageConfig):
    """One grounded question about one image on a local engine; prints the trace, writes PNG, HTML and JSON."""

    model: str = Field(description="Hugging Face folder of a Qwen2.5-VL model (e.g. runs/models/tiny)")
    image: str = Field(description="image file to ask about")
    question: str = Field(description="the question")
    options: list[str] = Field(default_factory=list, description="answer options, e.g. '[red, blue]'")
    task: Task = Field("visual_search", description="task family: prompts and zoom crop settings")
    multiturn: bool = Field(False, description="the multi-turn zoom loop (crops fed back) instead of one turn")
    out: str = Field("trace.png", description="annotated PNG; .html and .json are written beside it")
    max_tokens: int = Field(512, ge=1, description="tokens per assistant turn")
    max_turns: int = Field(5, ge=1, description="assistant turns (multi-turn)")
    max_images: int = Field(5, ge=1, description="images of a multi-turn conversation: the original + crops")
    temperature: float = Field(0.0, ge=0.0, description="sampling temperature (0: greedy)")
    seed: int | None = Field(None, description="sampling seed")
    max_model_len: int = Field(8192, description="engine context (prompt + images + response)")


def request_for(cfg: DemoConfig, image_url: str):
    from services.schemas import GroundedRequest

    return GroundedRequest(image=image_url, query=cfg.question, options=cfg.options, task=cfg.task,
                           mode="multi" if cfg.multiturn else "single", max_turns=cfg.max_turns,
                           max_images=cfg.max_images,
                           sampling={"max_tokens": cfg.max_tokens, "temperature": cfg.temperature, "seed": cfg.seed},
                           return_crops=True)


async def grounded_answer(cfg: DemoConfig, engine: Any, chat: Any, data: bytes) -> dict[str, Any]:
    """The /v1/grounded answer for the image bytes `data` from `engine` (any PolicyEngine)."""
    from services.grounded import grounded_response, run_grounded
    from vigorl_core.frames import resize_to_model
    from vigorl_core.images import ImageLimits, decode_image

    original = decode_image(data, ImageLimits(), "image")
    image, frame = resize_to_model(original, chat.profile)
    request = request_for(cfg, "file")
    rollout = await run_grounded(request, image, frame, engine, chat, cfg.max_model_len, "demo",
                                 requested_planned_zooms() or 0)
    return grounded_response(rollout, frame, request, request_id="demo", model=Path(cfg.model).name)


def format_trace(response: dict[str, Any]) -> str:
    """The trace as text: steps numbered as the PNG and the page number them, points in original pixels."""
    def at(p: dict) -> str:
        return f"({p['original']['x']:g}, {p['original']['y']:g})"

    lines = []
    zooms = {z["turn"]: (i, z) for i, z in enumerate(response["zooms"], start=1)}
    for turn in range(response["turns"]):
        lines.append(f"turn {turn + 1}")
        for i, step in enumerate(response["steps"], start=1):
            if step["turn"] == turn:
                points = " ".join(at(p) for p in step["points"])
                lines.append(f"  {i:>2}. {step['text']}" + (f"  -> {points}" if points else ""))
        if turn in zooms:
            i, z = zooms[turn]
            lines.append(f"  Z{i}: zoom at {at(z['point'])}, window {z['window']['original']}")
    usage = response["usage"]
    lines += [f"answer: {response['answer']}", f"finish: {response['finish']}, turns {response['turns']}, "
              f"tokens: prompt {usage['prompt_tokens']} (image {usage['image_tokens']}), "
              f"completion {usage['completion_tokens']}"]
    return "\n".join(lines)


def write_outputs(cfg: DemoConfig, response: dict[str, Any], data: bytes) -> list[Path]:
    """PNG, HTML and JSON of the answer beside `cfg.out`; returns their paths."""
    import io

    from PIL import Image

    from services.pages import standalone_html
    from vigorl_core.evals.trace_image import draw_trace

    png = Path(cfg.out)
    png.parent.mkdir(parents=True, exist_ok=True)
    with Image.open(io.BytesIO(data)) as im:
        mime = im.get_format_mimetype() or "image/png"
        draw_trace(im.convert("RGB"), response).save(png, format="PNG")
    image_url = f"data:{mime};base64," + base64.b64encode(data).decode()
    meta = {"question": cfg.question, "model": cfg.model, "image file": cfg.image}
    if cfg.options:
        meta["options"] = " | ".join(cfg.options)
    html, answer = png.with_suffix(".html"), png.with_suffix(".json")
    html.write_text(standalone_html(response, image_url, f"vigorl demo: {cfg.question[:60]}", meta), encoding="utf-8")
    answer.write_text(json.dumps(response, indent=1) + "\n", encoding="utf-8")
    return [png, html, answer]


async def _demo(cfg: DemoConfig, data: bytes) -> dict[str, Any]:
    from vigorl_core.rollout.chat_tokens import ChatTokens
    from vigorl_core.rollout.engine import EngineConfig, VLLMEngine

    chat = ChatTokens.from_pretrained(cfg.model)
    engine = await VLLMEngine.create(EngineConfig(model=cfg.model, max_model_len=cfg.max_model_len))
    try:
        return await grounded_answer(cfg, engine, chat, data)
    finally:
        engine.shutdown()


def _run(argv: list[str]) -> int:
    cfg = parse_config(DemoConfig, argv, prog="vigorl demo")
    cfg.model = local_model(cfg.model)
    path = Path(cfg.image)
    if not path.is_file():
        raise FileNotFoundError(f"--image: no such file: {path}")
    data = path.read_bytes()
    from vigorl_core.images import ImageLimits, decode_image

    decode_image(data, ImageLimits(), "--image")  # a bad image fails before the engine starts (ImageError)
    response = asyncio.run(_demo(cfg, data))
    print(format_trace(response))
    for written in write_outputs(cfg, response, data):
        print(f"wrote {written}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_main(_run, argv)


if __name__ == "__main__":
    sys.exit(main())
