"""Synthetic SFT chains for the tiny-model pipeline, tests and benchmarks (until MCTS chains exist).

Grounding samples become single-turn grounded chains (`<think>` steps naming the target's point, then
`<answer> (x, y) </answer>`); visual-search samples become multi-turn zoom chains: a turn that zooms on
the target with a `search_coordinate` tool call, the observation turn with the real crop (zoom.point_crop,
the task's zoom settings), and a final turn that answers the colour. The quickstart's `colour` samples
become single-turn chains whose steps name a point in the square (`token_point`), and its `zoom_colour`
samples zoom chains that zoom into the quadrant the question names. Points are in the model frame of
`profile` (frames.resize_to_model), as MCTS chains are. Records are sharegpt lines with a `task` key,
readable by sft_data.read_conversations and by LLaMA-Factory.

    path = write_synthetic_chains("runs/data/sft-synthetic", n=64, seed=0, profile=PROFILES["tiny"])
"""

from __future__ import annotations

import json
from pathlib import Path

from vigorl_core.data import IMAGE_TOKEN
from vigorl_core.frames import ModelProfile, resize_to_model
from vigorl_core.prompts import observation_text, system_prompt, user_text
from vigorl_core.protocol import format_point, render_single_turn, render_turn
from vigorl_core.synthetic.tasks import generate, quadrant_box
from vigorl_core.zoom import OBSERVATION_TAIL, point_crop, zoom_settings


def _grounding(sample, image, profile: ModelProfile) -> tuple[dict, list]:
    _, frame = resize_to_model(image, profile)
    x, y = (round(v) for v in frame.to_model(*sample.point))
    colour, shape = sample.metadata["colour"], sample.metadata["shape"]
    chain = render_single_turn([f"I look for the {colour} {shape} among the elements at {format_point(x, y)}.",
                                f"The centre of the {colour} {shape} is at {format_point(x, y)}."],
                               format_point(x, y))
    messages = [{"role": "system", "content": system_prompt("grounding", "grounded")},
                {"role": "user", "content": IMAGE_TOKEN + user_text(sample.question)},
                {"role": "assistant", "content": chain}]
    return {"messages": messages}, [image]


def _visual_search(sample, image, profile: ModelProfile) -> tuple[dict, list]:
    model_image, frame = resize_to_model(image, profile)
    x, y = (round(v) for v in frame.to_model(*sample.point))
    shape, colour = sample.metadata["shape"], sample.answer
    settings = zoom_settings("visual_search", "tiny" if profile.max_pixels <= 200_704 else "qwen2.5-vl")
    crop = point_crop(model_image, x, y, settings)
    messages = [
        {"role": "system", "content": system_prompt("visual_search", "multiturn")},
        {"role": "user", "content": IMAGE_TOKEN + user_text(sample.question, sample.options)},
        {"role": "assistant", "content": render_turn(
            f"The small {shape} is too small to see its colour; I zoom in on it at {format_point(x, y)}.",
            tool_call=(x, y))},
        {"role": "user", "content": observation_text(settings.draw_dot) + IMAGE_TOKEN + OBSERVATION_TAIL},
        {"role": "assistant", "content": render_turn(f"The crop shows the small {shape}: it is {colour}.",
                                                     answer=colour)},
    ]
    return {"messages": messages}, [image, crop.image]


def token_point(box_model: tuple[float, float, float, float], profile: ModelProfile) -> tuple[int, int]:
    """The point a written `colour` chain names for a target box (model frame): the centre of the merged vision
    token nearest the box's centre among those inside the box (the box's centre when none is). A tiny model names
    one of a few token centres (16 at 112 px) more reliably than any pixel: a teacher trained on these points
    grounds 44% of its held-out answers against 33% with the box centre, and reads the colour in 34% against 28%
    (300 SFT steps on 256 images; docs/tiny_learning.md)."""
    x1, y1, x2, y2 = box_model
    cx, cy, f = (x1 + x2) / 2, (y1 + y2) / 2, profile.factor
    inside = [(f * i + f // 2, f * j + f // 2) for i in range(int(x2 // f) + 1) for j in range(int(y2 // f) + 1)
              if x1 <= f * i + f // 2 < x2 and y1 <= f * j + f // 2 < y2]
    if not inside:
        return round(cx), round(cy)
    return min(inside, key=lambda p: (p[0] - cx) ** 2 + (p[1] - cy) ** 2)


def quadrant_point(sample, image_size: tuple[int, int], frame) -> tuple[int, int]:
    """The centre of the quadrant a `zoom_colour` question names, in the model frame: where its chains zoom (the
    zoom window is the quadrant, so the crop shows the small square wherever it lies in it)."""
    x1, y1, x2, y2 = quadrant_box(sample.metadata["quadrant"], image_size)
    x, y = frame.to_model((x1 + x2) / 2, (y1 + y2) / 2)
    return round(x), round(y)


def colour_steps(box_model: tuple[float, float, float, float], profile: ModelProfile) -> list[str]:
    """The `colour` task's reasoning step for the square's box (model frame): where the square is (its
    `token_point`), never its colour. A step that names a colour lets a model copy its own words into the answer
    (a text shortcut the quickstart's first runs learned); with the colour only in the answer, it must come from
    the image. One step: the tiny model names a point only at the distance from the image it learned it at, so
    a second point, after the first step's text, was a guess in the teacher's MCTS turns (85% of its MCTS chains
    had an ungrounded point; docs/tiny_learning.md, seventh round)."""
    return [f"The square is at {format_point(*token_point(box_model, profile))}."]


def _colour(sample, image, profile: ModelProfile) -> tuple[dict, list]:
    _, frame = resize_to_model(image, profile)
    chain = render_single_turn(colour_steps(frame.box_to_model(sample.bbox), profile), sample.answer)
    messages = [{"role": "system", "content": system_prompt("visual_search", "grounded")},
                {"role": "user", "content": IMAGE_TOKEN + user_text(sample.question, sample.options)},
                {"role": "assistant", "content": chain}]
    return {"messages": messages}, [image]


def _zoom_colour(sample, image, profile: ModelProfile) -> tuple[dict, list]:
    """Zoom at the centre of the quadrant the question names: its window is the quadrant, so the crop shows
    the small square several vision tokens wide wherever it lies in the quadrant."""
    model_image, frame = resize_to_model(image, profile)
    x, y = quadrant_point(sample, image.size, frame)
    quadrant, colour = sample.metadata["quadrant"], sample.answer
    crop = point_crop(model_image, x, y, zoom_settings("visual_search", profile.name))
    messages = [
        {"role": "system", "content": system_prompt("visual_search", "multiturn")},
        {"role": "user", "content": IMAGE_TOKEN + user_text(sample.question, sample.options)},
        {"role": "assistant", "content": render_turn(
            f"The small square in the {quadrant} quadrant is too small to see; I zoom into the quadrant at "
            f"{format_point(x, y)}.", tool_call=(x, y))},
        {"role": "user", "content": observation_text(False) + IMAGE_TOKEN + OBSERVATION_TAIL},
        {"role": "assistant", "content": render_turn(f"The crop shows the small square: it is {colour}.",
                                                     answer=colour)},
    ]
    return {"messages": messages}, [image, crop.image]


_BUILDERS = {"grounding": _grounding, "visual_search": _visual_search, "colour": _colour,
             "zoom_colour": _zoom_colour}


def write_synthetic_chains(out_dir: str | Path, n: int, seed: int, profile: ModelProfile,
                           tasks: tuple[str, ...] = ("grounding", "visual_search"),
                           image_size: tuple[int, int] | None = None) -> Path:
    """Write n chains per task (images/ and chains.jsonl, image paths relative to out_dir); returns the
    JSONL path. `image_size` (width, height) overrides the synthetic tasks' sizes (longer sequences for
    benchmarks). Same arguments give the same files."""
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for task in tasks:
        for sample, image in generate(task, n, seed, image_size=image_size):
            record, images = _BUILDERS[task](sample, image, profile)
            names = [f"images/{sample.id}_{i}.png" for i in range(len(images))]
            for name, im in zip(names, images):
                im.save(out / name, format="PNG", optimize=False, compress_level=6)
            lines.append(json.dumps({"id": sample.id, "task": sample.task, **record, "images": names}))
    path = out / "chains.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path
