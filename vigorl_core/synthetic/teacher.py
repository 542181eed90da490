"""The quickstart teacher's written data: grounded chains of its two tasks, in two formats.

MCTS asks its teacher for ONE reasoning step (or the final answer) per response, under the `mcts` system
prompt, with the previous steps in the user turn as "Previous thought i: ..." (vigorl_core.search.mcts). A tiny
model trained only on whole chains under the grounded prompt writes garbage there (measured: 3% of MCTS
rollouts correct at temperature 1). So each written chain is given twice: whole, as sft_synthetic writes it
(grounded single-turn for `colour`, a zoom conversation for `zoom_colour`), and as the MCTS teacher turns of
the same steps, one record per step and one for the answer.

Steps: `colour` names a point in the square (chains.token_point: the vision-token centre nearest its centre)
once and leaves its colour to the answer (chains.colour_steps);
`zoom_colour` names the centre of the quadrant the question names (the zoom point the multi-turn chains of its
trees turn it into), then answers.

    path = write_teacher_chains("runs/data/teacher", n=256, seed=2000, profile=get_profile("tiny"))
"""

from __future__ import annotations

import json
from pathlib import Path

from vigorl_core.data import IMAGE_TOKEN
from vigorl_core.frames import ModelProfile, resize_to_model
from vigorl_core.prompts import system_prompt, user_text
from vigorl_core.protocol import format_point
from vigorl_core.synthetic.chains import colour_steps, quadrant_point, write_synthetic_chains
from vigorl_core.synthetic.tasks import QUICKSTART_TASKS, generate


def teacher_steps(sample, image, profile: ModelProfile) -> list[str]:
    """The written reasoning steps of a quickstart sample (model-frame points)."""
    _, frame = resize_to_model(image, profile)
    if sample.metadata.get("quadrant"):
        point = format_point(*quadrant_point(sample, image.size, frame))
        return [f"The small square in the {sample.metadata['quadrant']} quadrant is near {point}."]
    return colour_steps(frame.box_to_model(sample.bbox), profile)


def mcts_turns(sample, steps: list[str]) -> list[dict]:
    """One record per teacher response of the search: the prompt MCTS builds before step k, and step k (or,
    after the last step, the answer) as the response."""
    system = system_prompt(sample.task, "mcts")
    records = []
    for k in range(len(steps) + 1):
        previous = "".join(f"\n\nPrevious thought {i}: {step}" for i, step in enumerate(steps[:k], 1))
        response = f"<think> {steps[k]} </think>" if k < len(steps) else f"<answer> {sample.answer} </answer>"
        records.append({"messages": [
            {"role": "system", "content": system},
            {"role": "user", "content": IMAGE_TOKEN + user_text(sample.question, sample.options) + previous},
            {"role": "assistant", "content": response}]})
    return records


def write_teacher_chains(out_dir: str | Path, n: int, seed: int, profile: ModelProfile) -> Path:
    """n samples of each quickstart task as whole chains and as MCTS teacher turns, in one JSONL file
    (out_dir/chains.jsonl, images under out_dir/images); returns its path."""
    out = Path(out_dir)
    whole = write_synthetic_chains(out, n, seed, profile, tasks=QUICKSTART_TASKS)
    lines = whole.read_text().splitlines()
    for task in QUICKSTART_TASKS:
        for sample, image in generate(task, n, seed):
            name = f"images/{sample.id}_0.png"  # the full view sft_synthetic saved
            for k, record in enumerate(mcts_turns(sample, teacher_steps(sample, image, profile))):
                lines.append(json.dumps({"id": f"{sample.id}-mcts{k}", "task": sample.task, **record,
                                         "images": [name]}))
    whole.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return whole
