"""Synthetic tasks: determinism, ground truth, legibility under the tiny profile's zoom."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest
from PIL import Image

from vigorl_core.frames import PROFILES, resize_to_model
from vigorl_core.records import Sample
from vigorl_core.synthetic.tasks import PALETTE, SYNTHETIC_TASKS, generate, write_dataset
from vigorl_core.zoom import ZoomEnv, zoom_settings


def digests(out_dir: Path) -> dict[str, str]:
    return {p.relative_to(out_dir).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(out_dir.rglob("*")) if p.is_file()}


def near(pixel, colour, tol: int = 60) -> bool:
    return max(abs(a - b) for a, b in zip(pixel, colour)) <= tol


def count_near(img: Image.Image, colour, box) -> int:
    """Pixels within `box` (float x1, y1, x2, y2, widened by 2 px and clipped) close to `colour`."""
    x1, y1, x2, y2 = box
    xs = range(max(0, int(x1) - 2), min(img.width, int(x2) + 3))
    ys = range(max(0, int(y1) - 2), min(img.height, int(y2) + 3))
    return sum(near(img.getpixel((x, y)), colour) for x in xs for y in ys)


@pytest.mark.parametrize("task", SYNTHETIC_TASKS)
def test_same_seed_same_bytes(task, tmp_path):
    a = write_dataset(task, 6, seed=3, out_dir=tmp_path / "a")
    b = write_dataset(task, 6, seed=3, out_dir=tmp_path / "b")
    assert a == tmp_path / "a" / "samples.jsonl" and b == tmp_path / "b" / "samples.jsonl"
    da, db = digests(tmp_path / "a"), digests(tmp_path / "b")
    assert da == db and len(da) == 7  # 6 PNGs + samples.jsonl
    write_dataset(task, 6, seed=4, out_dir=tmp_path / "c")
    dc = digests(tmp_path / "c")
    assert dc["samples.jsonl"] != da["samples.jsonl"]
    assert not set(dc.values()) & set(da.values())


@pytest.mark.parametrize("task", SYNTHETIC_TASKS)
def test_jsonl_round_trips_and_paths_resolve(task, tmp_path):
    path = write_dataset(task, 3, seed=0, out_dir=tmp_path)
    lines = path.read_text().splitlines()
    assert len(lines) == 3
    for i, line in enumerate(lines):
        s = Sample.model_validate_json(line)
        assert s.id == f"{task}-0-{i:05d}" and s.task == task and s.source == "synthetic"
        assert s.images == [f"images/{s.id}.png"] and s.category
        assert Image.open(tmp_path / s.images[0]).size == tuple(s.metadata["image_size"])
        assert json.loads(line)["schema_version"] == 1


def test_prefix_independent_of_n():
    short = generate("spatial", 2, 9)
    long = generate("spatial", 5, 9)
    assert [s for s, _ in short] == [s for s, _ in long[:2]]
    assert short[1][1].tobytes() == long[1][1].tobytes()


@pytest.mark.parametrize("task", ["visual_search", "grounding"])
def test_box_contains_the_target(task):
    for s, img in generate(task, 20, 1):
        colour = PALETTE[s.metadata["colour"]]
        x1, y1, x2, y2 = (int(v) for v in s.bbox)
        inside = sum(img.getpixel((x, y)) == colour for x in range(x1, x2) for y in range(y1, y2))
        assert inside >= 0.3 * (x2 - x1) * (y2 - y1), s.id
        # the target lies wholly inside the box: no target-coloured pixel on a 2 px ring around it
        ring = [(x, y) for x in range(x1 - 2, x2 + 2) for y in range(y1 - 2, y2 + 2)
                if not (x1 <= x < x2 and y1 <= y < y2)]
        assert all(img.getpixel(p) != colour for p in ring), s.id
        assert s.point == ((x1 + x2) / 2, (y1 + y2) / 2)


def test_grounding_answer_is_box_string():
    for s, img in generate("grounding", 10, 2):
        m = re.fullmatch(r"\((\d+), (\d+), (\d+), (\d+)\)", s.answer)
        assert m and tuple(float(v) for v in m.groups()) == s.bbox
        assert s.options == [] and s.question == f"Point to the {s.metadata['colour']} {s.metadata['shape']}."
        assert img.size == (400, 300)  # non-square: the tiny profile resizes it to 252x168


def test_answers_among_options_and_positions_vary():
    positions = set()
    for s, _ in generate("visual_search", 40, 0):
        assert s.answer in s.options and len(s.options) == len(set(s.options)) == 4
        positions.add(s.options.index(s.answer))
    assert positions == {0, 1, 2, 3}
    answers = set()
    for s, _ in generate("spatial", 40, 0):
        assert s.options in (["left", "right"], ["above", "below"]) and s.answer in s.options
        assert s.bbox is None and s.category == ("left_right" if s.options[0] == "left" else "above_below")
        answers.add(s.answer)
    assert answers == {"left", "right", "above", "below"}


def test_spatial_answer_matches_geometry():
    for s, _ in generate("spatial", 30, 5):
        a, b = s.metadata["a_bbox"], s.metadata["b_bbox"]
        k = 0 if s.category == "left_right" else 1
        a_first = a[k] + a[k + 2] < b[k] + b[k + 2]
        assert s.answer == s.options[0 if a_first else 1]


def test_visual_search_target_legible_only_in_the_tiny_crop():
    profile = PROFILES["tiny"]
    settings = zoom_settings("visual_search", "tiny")
    for s, img in generate("visual_search", 30, 7):
        model, frame = resize_to_model(img, profile)
        assert model.size == (224, 224)
        colour = PALETTE[s.answer]
        box = frame.box_to_model(s.bbox)
        in_model = count_near(model, colour, box)
        crop = ZoomEnv(model, settings).crop(*frame.to_model(*s.point))
        (cx1, cy1), (cx2, cy2) = crop.frame.from_model(box[0], box[1]), crop.frame.from_model(box[2], box[3])
        in_crop = count_near(crop.image, colour, (cx1, cy1, cx2, cy2))
        assert in_crop >= 40, (s.id, in_crop)
        assert in_model < in_crop / 2, (s.id, in_model, in_crop)
        assert max(box[2] - box[0], box[3] - box[1]) <= 8  # a few pixels in the model frame


def test_bad_arguments():
    with pytest.raises(ValueError, match="visual_search"):
        generate("web_action", 1, 0)
    with pytest.raises(ValueError, match="n must be"):
        generate("spatial", 0, 0)
    with pytest.raises(ValueError, match="image_size"):
        generate("spatial", 1, 0, image_size=(100, 100))


def test_custom_image_size():
    s, img = generate("grounding", 1, 0, image_size=(320, 240))[0]
    assert img.size == (320, 240) and s.metadata["image_size"] == [320, 240]
    assert 0 <= s.bbox[0] < s.bbox[2] <= 320 and 0 <= s.bbox[1] < s.bbox[3] <= 240
