"""The quickstart's base-model data: the seeing and pointing a real base model learned in pretraining.

The paper starts SFT (and its 72B teacher) from Qwen2.5-VL, whose pretraining already taught it to name what it
sees and to point at it. The random tiny model has seen nothing, and learning to point from the MCTS chains alone
takes it more samples than the quickstart's SFT has (docs/tiny_learning.md). So the quickstart first gives it
those two skills with a short SFT under Qwen's default system prompt, without the reasoning that reaches an
answer or the zoom tool (SFT and GRPO teach those):
- where the square is, as the first sentence of an answer to the task's question: the `colour` question with its
  options -> "<think>\nThe square is at (x, y)." (chains.token_point: the vision-token centre in the square);
- "What is the colour of the square?" -> the colour, on a third of those images;
- where the quadrant a `zoom_colour` question names is, as a zoom turn's first sentence: the question with its
  options -> "<think> The small square in the <quadrant> quadrant is near (x, y)." (the quadrant's centre, where
  the written zoom chains zoom), on a third as many images;
- the colour of the small square in zoom crops of those images (the named quadrant magnified, as the zoom tool
  returns it), shown as the zoom tool's observation turn and answered as the chains of a one-step zoom answer
  (linearize.to_multiturn: protocol.FORCED_FINAL_PREFIX, then the colour).
Why both are asked in the chains' own words: the tiny model finds a position through its rotary phases, which
turn fast with distance (rope_theta 10), so it points only at the distance from the image it learned at, and it
reads an image best from where it learned to read it. Asked "Point to the square." it learns to point (83%) but
not in the chains, where the point sits further from the image (0-44%); asked as here, it points 95% of the time,
under any system prompt (docs/tiny_learning.md).
Records are sharegpt lines with a `task` key, as sft_data.read_conversations reads them.

    path = write_base_data("runs/data/base", n=1024, seed=3000, profile=get_profile("tiny"), val_n=128)
"""

from __future__ import annotations

import json
from pathlib import Path

from vigorl_core.data import IMAGE_TOKEN
from vigorl_core.frames import ModelProfile, resize_to_model
from vigorl_core.prompts import observation_text, user_text
from vigorl_core.protocol import FORCED_FINAL_PREFIX
from vigorl_core.synthetic.chains import quadrant_point
from vigorl_core.synthetic.tasks import COLOUR_QUESTION, generate
from vigorl_core.synthetic.teacher import teacher_steps
from vigorl_core.train.sft_train import DEFAULT_SYSTEM
from vigorl_core.zoom import OBSERVATION_TAIL, point_crop, zoom_settings

BASE_SYSTEM = DEFAULT_SYSTEM  # Qwen's own fallback system message: the base knows no task prompt


def _record(rid: str, question: str, answer: str, image_name: str, after_image: str = "") -> str:
    """One sharegpt line: `question` then the image when `after_image` is given (an observation turn), else the
    image then the question."""
    user = question + IMAGE_TOKEN + after_image if after_image else IMAGE_TOKEN + question
    return json.dumps({"id": rid, "task": "visual_search", "images": [image_name], "messages": [
        {"role": "system", "content": BASE_SYSTEM},
        {"role": "user", "content": user},
        {"role": "assistant", "content": answer}]})


def _pointing(sample, image, out: Path, profile: ModelProfile, opening: str = "<think>\n") -> tuple[str, str]:
    """Save the model-frame image under out/images; (its name, the pointing record: the question with its options
    -> `opening` and the written chains' first step)."""
    model_image, _ = resize_to_model(image, profile)
    name = f"images/{sample.id}.png"
    model_image.save(out / name, format="PNG", optimize=False, compress_level=6)
    where = teacher_steps(sample, image, profile)[0]
    return name, _record(f"{sample.id}-point", user_text(sample.question, sample.options), opening + where, name)


def write_base_data(out_dir: str | Path, n: int, seed: int, profile: ModelProfile, val_n: int = 0) -> Path:
    """n `colour` images with a pointing record each, a colour record for the first n // 3 of them, and n // 3
    `zoom_colour` images with a pointing record and a record of their zoom crop each (pointing takes the tiny
    model several times the samples that colour does), under out_dir/images, the records in
    out_dir/chains.jsonl; returns its path. With val_n, also out_dir/val.jsonl: `colour` pointing records of val_n
    other images (seed + 500), the skill worth validating (its exact-match share is the greedy first point's
    accuracy). Same arguments give the same files."""
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for i, (sample, image) in enumerate(generate("colour", n, seed)):
        name, pointing = _pointing(sample, image, out, profile)
        lines.append(pointing)
        if i < n // 3:
            lines.append(_record(f"{sample.id}-colour", COLOUR_QUESTION, sample.answer, name))
    settings = zoom_settings("visual_search", profile.name)
    for sample, image in generate("zoom_colour", max(1, n // 3), seed):
        lines.append(_pointing(sample, image, out, profile, opening="<think> ")[1])  # a zoom turn opens so
        model_image, frame = resize_to_model(image, profile)
        name = f"images/{sample.id}-crop.png"
        crop = point_crop(model_image, *quadrant_point(sample, image.size, frame), settings)
        crop.image.save(out / name, format="PNG", optimize=False, compress_level=6)
        # What follows the crop is what follows it in the chains of a one-step zoom (linearize.to_multiturn):
        # the observation's tail, then the answer turn.
        lines.append(_record(f"{sample.id}-crop", observation_text(settings.draw_dot),
                             f"{FORCED_FINAL_PREFIX} {sample.answer} </answer>", name, after_image=OBSERVATION_TAIL))
    if val_n:
        val = [_pointing(sample, image, out, profile)[1] for sample, image in generate("colour", val_n, seed + 500)]
        (out / "val.jsonl").write_text("\n".join(val) + "\n", encoding="utf-8")
    path = out / "chains.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path
