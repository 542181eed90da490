"""The quickstart's synthetic tasks (`colour`, `zoom_colour`): determinism, sizes in vision tokens, and that a
zoom into the named quadrant shows the target large while the full view holds it below one vision token."""

import hashlib

import pytest

from vigorl_core.evals.evaluation import benchmark_of
from vigorl_core.frames import get_profile
from vigorl_core.data import IMAGE_TOKEN
from vigorl_core.prompts import observation_text, system_prompt
from vigorl_core.train.sft_data import read_conversations
from vigorl_core.synthetic.chains import write_synthetic_chains
from vigorl_core.synthetic.tasks import PALETTE, QUADRANTS, QUICKSTART_TASKS, generate, quadrant_box, write_dataset
from vigorl_core.zoom import OBSERVATION_TAIL, point_crop, zoom_settings


def _pixels(img, colour, box=None, tolerance=0) -> int:
    """Pixels of `colour` (each channel within `tolerance`: a resized crop blends the edges)."""
    x1, y1, x2, y2 = box or (0, 0, img.width, img.height)
    return sum(max(abs(a - b) for a, b in zip(img.getpixel((x, y)), colour)) <= tolerance
               for x in range(x1, x2) for y in range(y1, y2))


@pytest.mark.parametrize("task", QUICKSTART_TASKS)
def test_same_seed_same_bytes_and_own_benchmark(task, tmp_path):
    a = write_dataset(task, 4, seed=3, out_dir=tmp_path / "a").read_bytes()
    assert a == write_dataset(task, 4, seed=3, out_dir=tmp_path / "b").read_bytes()
    assert a != write_dataset(task, 4, seed=4, out_dir=tmp_path / "c").read_bytes()
    digest = [hashlib.sha256((tmp_path / d / "images" / f"{task}-3-00001.png").read_bytes()).hexdigest() for d in "ab"]
    assert digest[0] == digest[1]
    for sample, img in generate(task, 5, 0):
        assert sample.task == "visual_search" and img.size == (112, 112)
        assert benchmark_of(sample) == f"synthetic_{task}"
        assert sample.answer in sample.options and len(set(sample.options)) == 4


def test_colour_square_spans_several_vision_tokens():
    for sample, img in generate("colour", 30, 1):
        x1, y1, x2, y2 = (int(v) for v in sample.bbox)
        assert 37 <= x2 - x1 <= 56 and x2 - x1 == y2 - y1
        assert _pixels(img, PALETTE[sample.answer], (x1, y1, x2, y2)) == (x2 - x1) ** 2
        assert _pixels(img, PALETTE[sample.answer]) == (x2 - x1) ** 2  # nothing else has its colour


def test_zoom_colour_target_small_in_the_full_view_large_in_the_quadrant_zoom():
    settings = zoom_settings("visual_search", "tiny")
    for sample, img in generate("zoom_colour", 30, 2):
        quadrant = sample.metadata["quadrant"]
        assert quadrant in QUADRANTS and quadrant in sample.question
        x1, y1, x2, y2 = (int(v) for v in sample.bbox)
        qx1, qy1, qx2, qy2 = quadrant_box(quadrant, img.size)
        assert 18 <= x2 - x1 <= 24 < 28  # below one 28-px vision token
        assert qx1 < x1 and x2 < qx2 and qy1 < y1 and y2 < qy2
        for option in sample.options:  # one square of each option's colour, in its own quadrant
            assert _pixels(img, PALETTE[option]) >= 18 * 18
        crop = point_crop(img, (qx1 + qx2) // 2, (qy1 + qy2) // 2, settings).image
        assert _pixels(crop, PALETTE[sample.answer], tolerance=24) >= 32 * 32  # 2x: 36-48 px, several tokens
        assert all(_pixels(crop, PALETTE[o], tolerance=24) == 0 for o in sample.options if o != sample.answer)


def test_written_chains_zoom_into_the_named_quadrant(tmp_path):
    path = write_synthetic_chains(tmp_path, 1, 0, get_profile("tiny"), tasks=QUICKSTART_TASKS)
    chains = {c.id.rsplit("-", 2)[0]: c for c in read_conversations(path)}
    assert set(chains) == set(QUICKSTART_TASKS) and {c.task for c in chains.values()} == {"visual_search"}
    zoom = chains["zoom_colour"]
    sample = generate("zoom_colour", 1, 0)[0][0]
    x1, y1, x2, y2 = quadrant_box(sample.metadata["quadrant"], (112, 112))
    assert f'"coordinate": [{(x1 + x2) // 2}, {(y1 + y2) // 2}]' in zoom.messages[2][1]
    assert len(zoom.images) == 2 and f"<answer> {sample.answer} </answer>" in zoom.messages[-1][1]


def test_teacher_chains_hold_the_mcts_turns_of_each_written_chain(tmp_path):
    from vigorl_core.synthetic.teacher import write_teacher_chains

    chains = read_conversations(write_teacher_chains(tmp_path, 2, 0, get_profile("tiny")))
    turns = [c for c in chains if "-mcts" in c.id]
    assert len(chains) == 4 + len(turns) and len(turns) == 2 * 2 + 2 * 2  # colour and zoom: 1 step + answer
    sample = generate("colour", 1, 0)[0][0]
    last = next(c for c in turns if c.id == f"{sample.id}-mcts1")
    assert last.messages[0][1].startswith(system_prompt("visual_search", "mcts").split("\n")[0])
    assert "Previous thought 1: The square is at" in last.messages[1][1]
    assert sample.answer not in last.messages[1][1].split("Previous thought 1")[1]  # no step names the colour
    assert last.messages[2][1] == f"<answer> {sample.answer} </answer>" and len(last.images) == 1


def test_token_point_is_the_nearest_vision_token_centre_inside_the_box():
    from vigorl_core.synthetic.chains import token_point

    tiny = get_profile("tiny")  # 28-px merged tokens: centres at 14, 42, 70, 98
    assert token_point((41, 31, 97, 87), tiny) == (70, 70)  # centre (69, 59): (70, 70) is nearer than (70, 42)
    assert token_point((26, 14, 76, 64), tiny) == (42, 42)
    assert token_point((0, 0, 10, 10), tiny) == (5, 5)  # no token centre inside: the box's centre


def test_written_colour_chains_point_inside_the_square(tmp_path):
    import re

    path = write_synthetic_chains(tmp_path, 8, 3, get_profile("tiny"), tasks=("colour",))
    samples = {s.id: s for s, _ in generate("colour", 8, 3)}
    for chain in read_conversations(path):
        sample = samples[chain.id]
        points = [(int(x), int(y)) for x, y in re.findall(r"\((\d+), (\d+)\)", chain.messages[-1][1])]
        x1, y1, x2, y2 = sample.bbox
        assert points and all(x1 <= x < x2 and y1 <= y < y2 and x % 28 == 14 and y % 28 == 14 for x, y in points)


def test_colour_background_tells_each_vision_token_where_it_is():
    from vigorl_core.synthetic.tasks import CELL

    sample, img = generate("colour", 1, 5)[0]
    x1, y1, x2, y2 = (int(v) for v in sample.bbox)
    tints = {}
    for j in range(4):
        for i in range(4):
            cell = [(x, y) for x in range(CELL * i, CELL * (i + 1)) for y in range(CELL * j, CELL * (j + 1))
                    if not (x1 <= x < x2 and y1 <= y < y2)]
            seen = {img.getpixel(xy) for xy in cell}
            if seen:  # the square hides some cells whole
                assert len(seen) == 1, (i, j, seen)
                tints[(i, j)] = seen.pop()
    assert len(set(tints.values())) == len(tints) >= 12  # one tint per cell
    assert all(tint not in PALETTE.values() for tint in tints.values())


def test_base_data_points_at_the_square_and_names_its_colour(tmp_path):
    from vigorl_core.prompts import user_text
    from vigorl_core.protocol import FORCED_FINAL_PREFIX
    from vigorl_core.synthetic.base import BASE_SYSTEM, COLOUR_QUESTION, write_base_data
    from vigorl_core.synthetic.chains import token_point
    from vigorl_core.synthetic.teacher import teacher_steps

    profile = get_profile("tiny")
    chains = read_conversations(write_base_data(tmp_path, 6, 0, profile, val_n=3))
    kinds = [c.id.rsplit("-", 1)[1] for c in chains]
    assert kinds.count("point") == 6 + 2 and kinds.count("colour") == 2 and kinds.count("crop") == 2
    samples = dict((s.id, s) for s, _ in generate("colour", 6, 0))
    for conv in chains:
        (_, system), (_, question), (_, answer) = conv.messages
        assert system == BASE_SYSTEM and conv.task == "visual_search" and len(conv.images) == 1
        sample_id, kind = conv.id.rsplit("-", 1)
        if kind == "point" and sample_id.startswith("zoom_colour"):  # where a zoom turn opens
            sample, image = next((s, im) for s, im in generate("zoom_colour", 2, 0) if s.id == sample_id)
            assert question.endswith(user_text(sample.question, sample.options))
            assert answer == "<think> " + teacher_steps(sample, image, profile)[0]
            assert f"the {sample.metadata['quadrant']} quadrant is near" in answer
        elif kind == "point":  # the chains' first sentence, after the task's question and options
            sample = samples[sample_id]
            assert question.endswith(user_text(sample.question, sample.options))
            assert answer == "<think>\nThe square is at ({}, {}).".format(*token_point(sample.bbox, profile))
        elif kind == "colour":
            assert question.endswith(COLOUR_QUESTION) and answer in PALETTE
    # A crop is read as in a zoom conversation: the observation turn, then the answer turn after a one-step zoom.
    crop = next(c for c in chains if c.id.endswith("-crop"))
    zoom = generate("zoom_colour", 1, 0)[0][0]
    settings = zoom_settings("visual_search", "tiny")
    assert crop.messages[1][1] == observation_text(settings.draw_dot) + IMAGE_TOKEN + OBSERVATION_TAIL
    assert crop.messages[2][1] == f"{FORCED_FINAL_PREFIX} {zoom.answer} </answer>"
    assert crop.id.startswith(zoom.id)
    # Validation: pointing records of other images, the skill the quickstart keeps the best base model by.
    val = read_conversations(tmp_path / "val.jsonl")
    assert [c.id.rsplit("-", 1)[1] for c in val] == ["point"] * 3
    assert not {c.images[0] for c in val} & {c.images[0] for c in chains}
