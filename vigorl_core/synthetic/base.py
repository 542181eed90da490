"""The quickstart's base-model data: the seeing and pointing a real base model learned in pretraining.

The paper starts SFT (and its 72B teacher) from Qwen2.5-VL, whose pretraining already taught it to name what it
sees and to point at it. The random tiny model has seen nothing, and learning to point from the MCTS chains alone
takes it more samples than the quickstart's SFT has (docs/tiny_learning.md). So the quickstart first gives it
those two skills with a short SFT under Qwen's default system prompt, without the reasoning that reaches an
answer or the zoom tool (SFT and GRPO teach those):
- where the square is, as the first sentence of an answer to the task's question: the `colour` question with its
  options -> "<think>\nThe square is at (x, y)." (chains.token_point: the vision-token centre in the square);
- "What is the colour of the square?" -> the colour, on a third of those images and on zoom crops of `zoom_colour`
  images (the named quadrant magnified, as the zoom tool returns it).
Why the pointing is asked in the chains' own words: the tiny model finds a position through its rotary phases,
which turn fast with distance (rope_theta 10), so it points only at the distance from the image it learned at.
Asked "Point to the square." it learns to point (83%) but not in the chains, where the point sits further from the
image (0-44%); asked as here, it points 95% of the time, under any system prompt (docs/tiny_learning.md).
Records are sharegpt lines with a `task` key, as sft_data.read_conversations reads them.

    path = write_base_data("runs/data/base", n=1024, seed=3000, profile=get_profile("tiny"))
"""

from __future__ import annotations

import json
from pathlib import Path

from vigorl_core.data import IMAGE_TOKEN
from vigorl_core.frames import ModelProfile, resize_to_model
from vigorl_core.prompts import user_text
from vigorl_core.synthetic.chains import colour_steps, quadrant_point
from vigorl_core.synthetic.tasks import COLOUR_QUESTION, generate
from vigorl_core.train.sft_train import DEFAULT_SYSTEM
from vigorl_core.zoom import point_crop, zoom_settings

BASE_SYSTEM = DEFAULT_SYSTEM  # Qwen's own fallback system message: the base knows no task prompt


def _record(rid: str, question: str, answer: str, image_name: str) -> str:
    return json.dumps({"id": rid, "task": "visual_search", "images": [image_name], "messages": [
        {"role": "system", "content": BASE_SYSTEM},
        {"role": "user", "content": IMAGE_TOKEN + question},
        {"role": "assistant", "content": answer}]})


def write_base_data(out_dir: str | Path, n: int, seed: int, profile: ModelProfile) -> Path:
    """n `colour` images with a pointing record each, a colour record for the first n // 3 of them, and n // 3
    zoom crops with a colour record each (pointing takes the tiny model several times the samples that colour
    does), under out_dir/images, the records in out_dir/chains.jsonl; returns its path. Same arguments give the
    same files."""
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for i, (sample, image) in enumerate(generate("colour", n, seed)):
        model_image, frame = resize_to_model(image, profile)
        name = f"images/{sample.id}.png"
        model_image.save(out / name, format="PNG", optimize=False, compress_level=6)
        where = colour_steps(frame.box_to_model(sample.bbox), profile)[0]
        lines.append(_record(f"{sample.id}-point", user_text(sample.question, sample.options),
                             f"<think>\n{where}", name))
        if i < n // 3:
            lines.append(_record(f"{sample.id}-colour", COLOUR_QUESTION, sample.answer, name))
    settings = zoom_settings("visual_search", profile.name)
    for sample, image in generate("zoom_colour", max(1, n // 3), seed):
        model_image, frame = resize_to_model(image, profile)
        name = f"images/{sample.id}-crop.png"
        crop = point_crop(model_image, *quadrant_point(sample, image.size, frame), settings)
        crop.image.save(out / name, format="PNG", optimize=False, compress_level=6)
        lines.append(_record(f"{sample.id}-crop", COLOUR_QUESTION, sample.answer, name))
    path = out / "chains.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path
