"""Deterministic synthetic tasks: small images + questions for the tiny-model pipeline and tests.

Three task families mirror the real benchmarks at toy scale:
- `visual_search` (V*-like): a cluttered 448x448 image with distractor shapes and one SMALL target of a
  unique shape; "What is the colour of the small <shape>?" with 4 colour options. At the tiny profile's
  224x224 model frame the target is ~5 px wide; a tiny-profile zoom crop magnifies it 2x.
- `grounding` (ScreenSpot-like): a UI-like 400x300 panel with coloured shapes; "Point to the <colour>
  <shape>." with the answer as an "(x1, y1, x2, y2)" box string (reward: point in box).
- `spatial` (SAT-like): two objects; left/right or above/below with options ["left", "right"] or
  ["above", "below"].

Two more, sized for what the tiny model learns on 2 CPU cores (docs/tiny_learning.md), for the quickstart.
Both are multiple-choice colour questions (Sample.task `visual_search`: its prompts, string-match reward and
zoom settings) with their own source, so they are benchmarks of their own (`synthetic_colour`,
`synthetic_zoom_colour`):
- `colour`: one square 37-56 px wide on a 112x112 image (it spans several of the tiny model's 28-px vision
  tokens) over a background tinted cell by cell (`cell_tinted`: a token's pixels say where it is); "What is the
  colour of the square?" with 4 options. The box is the square, so the points of the
  reasoning can be scored as a grounding rate, but the answer needs only what is seen in a large region.
- `zoom_colour`: four small squares (18-24 px, below one vision token), one per quadrant, in four colours;
  "What is the colour of the small square in the top-left quadrant?" with the four colours as options. The
  full view is near chance; a zoom at the quadrant's centre (the tiny profile's 56-px window, magnified 2x)
  shows the square 36-48 px wide, which the tiny model reads.

Same (task, n, seed, image_size) gives byte-identical PNGs and JSONL: every sample draws from its own
`random.Random` seeded with a string (seeded via sha512, independent of PYTHONHASHSEED), PIL draws without
anti-aliasing, and PNGs are saved with fixed parameters and no metadata. Sample i does not depend on n.

    from vigorl_core.synthetic.tasks import write_dataset
    jsonl = write_dataset("visual_search", 100, seed=0, out_dir=Path("data/synth_vs"))
"""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path

from PIL import Image, ImageDraw

from vigorl_core.records import Sample

Rgb = tuple[int, int, int]
IntBox = tuple[int, int, int, int]  # x1, y1, x2, y2 with x2/y2 exclusive (continuous pixel edges)

# Saturated, well separated colours (the background uses only low-saturation greys, so a colour test
# never confuses clutter with an object).
PALETTE: dict[str, Rgb] = {
    "red": (220, 30, 30),
    "green": (30, 150, 50),
    "blue": (30, 70, 220),
    "yellow": (235, 200, 20),
    "purple": (130, 40, 170),
    "orange": (240, 120, 20),
    "cyan": (20, 180, 200),
}
COLOURS: tuple[str, ...] = tuple(PALETTE)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "cross")
SYNTHETIC_TASKS: tuple[str, ...] = ("visual_search", "grounding", "spatial")
QUICKSTART_TASKS: tuple[str, ...] = ("colour", "zoom_colour")  # Sample.task visual_search, source synthetic_<name>
DEFAULT_SIZES: dict[str, tuple[int, int]] = {
    "visual_search": (448, 448), "grounding": (400, 300), "spatial": (336, 336),
    "colour": (112, 112), "zoom_colour": (112, 112),
}
QUADRANTS: tuple[str, ...] = ("top-left", "top-right", "bottom-left", "bottom-right")
COLOUR_QUESTION = "What is the colour of the square?"  # the `colour` task's question


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: IntBox, fill: Rgb) -> None:
    """Fill `shape` inscribed in `box` (x2/y2 exclusive)."""
    x1, y1, x2, y2 = box[0], box[1], box[2] - 1, box[3] - 1
    cx, cy = (x1 + x2) // 2, (y1 + y2) // 2
    if shape == "circle":
        draw.ellipse([x1, y1, x2, y2], fill=fill)
    elif shape == "square":
        draw.rectangle([x1, y1, x2, y2], fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, y1), (x2, y2), (x1, y2)], fill=fill)
    elif shape == "diamond":
        draw.polygon([(cx, y1), (x2, cy), (cx, y2), (x1, cy)], fill=fill)
    elif shape == "cross":
        t = max(1, (x2 - x1 + 1) // 3)  # bar thickness
        draw.rectangle([cx - t // 2, y1, cx - t // 2 + t - 1, y2], fill=fill)
        draw.rectangle([x1, cy - t // 2, x2, cy - t // 2 + t - 1], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def _grey(rng: random.Random, lo: int, hi: int) -> Rgb:
    """A low-saturation grey with a slight tint (channels within 12 of each other)."""
    v = rng.randint(lo, hi)
    return tuple(min(255, max(0, v + rng.randint(-6, 6))) for _ in range(3))  # type: ignore[return-value]


def _clutter(draw: ImageDraw.ImageDraw, rng: random.Random, size: tuple[int, int], count: int) -> None:
    """Low-contrast grey rectangles, ellipses and lines (no palette colours)."""
    w, h = size
    for _ in range(count):
        kind = rng.choice(("rect", "ellipse", "line"))
        x, y = rng.randrange(w), rng.randrange(h)
        bw, bh = rng.randint(6, w // 4), rng.randint(6, h // 4)
        colour = _grey(rng, 150, 235)
        if kind == "rect":
            draw.rectangle([x, y, x + bw, y + bh], fill=colour)
        elif kind == "ellipse":
            draw.ellipse([x, y, x + bw, y + bh], fill=colour)
        else:
            draw.line([x, y, x + rng.randint(-bw, bw), y + rng.randint(-bh, bh)], fill=colour,
                      width=rng.randint(1, 3))


def _overlaps(a: IntBox, b: IntBox, margin: int) -> bool:
    return not (a[2] + margin <= b[0] or b[2] + margin <= a[0] or a[3] + margin <= b[1] or b[3] + margin <= a[1])


def _place(rng: random.Random, size: tuple[int, int], side: int, taken: list[IntBox], margin: int,
           border: int = 4, tries: int = 200) -> IntBox | None:
    """A random side x side box inside the image (`border` px from its edges) clear of `taken`."""
    w, h = size
    for _ in range(tries):
        x, y = rng.randint(border, w - border - side), rng.randint(border, h - border - side)
        box = (x, y, x + side, y + side)
        if not any(_overlaps(box, t, margin) for t in taken):
            return box
    return None


def _centre(box: IntBox) -> tuple[float, float]:
    return (box[0] + box[2]) / 2, (box[1] + box[3]) / 2


def _visual_search(rng: random.Random, size: tuple[int, int]) -> tuple[Image.Image, dict]:
    img = Image.new("RGB", size, _grey(rng, 200, 225))
    draw = ImageDraw.Draw(img)
    _clutter(draw, rng, size, count=90)
    shape, colour = rng.choice(SHAPES), rng.choice(COLOURS)
    side = rng.randint(12, 14)  # ~6 px in the 224 model frame, ~12 px in a tiny crop
    target = _place(rng, size, side, [], 0, border=16)
    assert target is not None
    taken = [target]
    # distractors of every other shape and every colour (the target colour too), bigger than the target
    for _ in range(rng.randint(12, 20)):
        box = _place(rng, size, rng.randint(16, 40), taken[:1], margin=6)
        if box is not None:
            taken.append(box)
            draw_shape(draw, rng.choice([s for s in SHAPES if s != shape]), box, PALETTE[rng.choice(COLOURS)])
    draw_shape(draw, shape, target, PALETTE[colour])
    options = [colour, *rng.sample([c for c in COLOURS if c != colour], 3)]
    rng.shuffle(options)
    return img, dict(question=f"What is the colour of the small {shape}?", options=options, answer=colour,
                     bbox=target, category="direct_attributes", metadata={"shape": shape, "colour": colour})


def _grounding(rng: random.Random, size: tuple[int, int]) -> tuple[Image.Image, dict]:
    w, h = size
    img = Image.new("RGB", size, _grey(rng, 238, 250))
    draw = ImageDraw.Draw(img)
    bar = max(16, h // 12)  # a title bar and some "text" lines make it UI-like
    draw.rectangle([0, 0, w - 1, bar - 1], fill=_grey(rng, 170, 200))
    for _ in range(rng.randint(6, 12)):
        x, y = rng.randrange(w // 2), rng.randint(bar + 2, h - 6)
        draw.rectangle([x, y, x + rng.randint(20, w // 2), y + 2], fill=_grey(rng, 90, 140))
    combos = [(c, s) for c in COLOURS for s in SHAPES]
    taken: list[IntBox] = []
    elements: list[tuple[str, str, IntBox]] = []
    for colour, shape in rng.sample(combos, rng.randint(5, 8)):  # unique (colour, shape) per image
        box = _place(rng, (w, h - bar), rng.randint(28, 56), taken, margin=6)
        if box is None:
            continue
        box = (box[0], box[1] + bar, box[2], box[3] + bar)
        taken.append((box[0], box[1] - bar, box[2], box[3] - bar))
        draw_shape(draw, shape, box, PALETTE[colour])
        elements.append((colour, shape, box))
    colour, shape, box = rng.choice(elements)
    return img, dict(question=f"Point to the {colour} {shape}.", options=[],
                     answer="({}, {}, {}, {})".format(*box), bbox=box, category="icon",
                     metadata={"shape": shape, "colour": colour})


def _spatial(rng: random.Random, size: tuple[int, int]) -> tuple[Image.Image, dict]:
    img = Image.new("RGB", size, _grey(rng, 215, 240))
    draw = ImageDraw.Draw(img)
    _clutter(draw, rng, size, count=12)
    (ca, sa), (cb, sb) = rng.sample([(c, s) for c in COLOURS for s in SHAPES], 2)
    axis = rng.choice((0, 1))  # 0: left/right, 1: above/below
    while True:  # the asked axis separates the centres by more than the other axis does
        a = _place(rng, size, rng.randint(36, 64), [], 0)
        b = _place(rng, size, rng.randint(36, 64), [a], margin=8)
        if b is None:
            continue
        d = [_centre(a)[k] - _centre(b)[k] for k in (0, 1)]
        if abs(d[axis]) >= 48 and abs(d[axis]) > 1.5 * abs(d[1 - axis]):
            break
    draw_shape(draw, sa, a, PALETTE[ca])
    draw_shape(draw, sb, b, PALETTE[cb])
    if axis == 0:
        question = f"Is the {ca} {sa} to the left of or to the right of the {cb} {sb}?"
        options, answer, category = ["left", "right"], "left" if d[0] < 0 else "right", "left_right"
    else:
        question = f"Is the {ca} {sa} above or below the {cb} {sb}?"
        options, answer, category = ["above", "below"], "above" if d[1] < 0 else "below", "above_below"
    return img, dict(question=question, options=options, answer=answer, bbox=None, category=category,
                     metadata={"a_bbox": list(a), "b_bbox": list(b)})


def _options(rng: random.Random, colour: str, others: list[str]) -> list[str]:
    options = [colour, *others]
    rng.shuffle(options)
    return options


CELL = 28  # the tiny model's merged vision token at 112 px (two 14-px patches a side)


def cell_tinted(size: tuple[int, int]) -> Image.Image:
    """A background whose every CELL-px cell has its own pale tint: red rises with the column, green with the
    row (130-235), blue 200. The tiny model's vision tower has no absolute position embedding; with the tint a
    vision token's pixels say where it is, as the grid letters of a map do. Pointing at the square's token then
    reaches 94-100% in 700-1,000 plain SFT steps, against 66% on grey (docs/tiny_learning.md, seventh round)."""
    w, h = size
    columns, rows = max(1, (w - 1) // CELL), max(1, (h - 1) // CELL)
    img = Image.new("RGB", size)
    draw = ImageDraw.Draw(img)
    for j in range(0, h, CELL):
        for i in range(0, w, CELL):
            tint = (130 + 105 * (i // CELL) // columns, 130 + 105 * (j // CELL) // rows, 200)
            draw.rectangle([i, j, i + CELL - 1, j + CELL - 1], fill=tint)
    return img


def _colour(rng: random.Random, size: tuple[int, int]) -> tuple[Image.Image, dict]:
    img = cell_tinted(size)
    colour = rng.choice(COLOURS)
    side = rng.randint(size[0] // 3, size[0] // 2)  # 37-56 px at 112: several 28-px vision tokens
    box = _place(rng, size, side, [], 0, border=2)
    assert box is not None
    draw_shape(ImageDraw.Draw(img), "square", box, PALETTE[colour])
    options = _options(rng, colour, rng.sample([c for c in COLOURS if c != colour], 3))
    return img, dict(question=COLOUR_QUESTION, options=options, answer=colour, bbox=box,
                     category="colour", metadata={"shape": "square", "colour": colour})


def quadrant_box(quadrant: str, size: tuple[int, int]) -> IntBox:
    """The quadrant's box (x2/y2 exclusive) in an image of `size`."""
    w, h = size
    right, bottom = quadrant.endswith("right"), quadrant.startswith("bottom")
    return (w // 2 if right else 0, h // 2 if bottom else 0, w if right else w // 2, h if bottom else h // 2)


def _zoom_colour(rng: random.Random, size: tuple[int, int]) -> tuple[Image.Image, dict]:
    img = Image.new("RGB", size, _grey(rng, 200, 240))
    draw = ImageDraw.Draw(img)
    colours = rng.sample(COLOURS, 4)
    boxes = []
    for quadrant, colour in zip(QUADRANTS, colours):
        qx, qy, qx2, qy2 = quadrant_box(quadrant, size)
        side = rng.randint(size[0] * 9 // 56, size[0] * 12 // 56)  # 18-24 px at 112: below one vision token
        x, y = rng.randint(qx + 3, qx2 - 3 - side), rng.randint(qy + 3, qy2 - 3 - side)
        boxes.append((x, y, x + side, y + side))
        draw_shape(draw, "square", boxes[-1], PALETTE[colour])
    k = rng.randrange(4)
    return img, dict(question=f"What is the colour of the small square in the {QUADRANTS[k]} quadrant?",
                     options=_options(rng, colours[k], [c for i, c in enumerate(colours) if i != k]),
                     answer=colours[k], bbox=boxes[k], category="zoom_colour",
                     metadata={"shape": "square", "colour": colours[k], "quadrant": QUADRANTS[k]})


_GENERATORS: dict[str, Callable[[random.Random, tuple[int, int]], tuple[Image.Image, dict]]] = {
    "visual_search": _visual_search, "grounding": _grounding, "spatial": _spatial,
    "colour": _colour, "zoom_colour": _zoom_colour,
}


def generate(task: str, n: int, seed: int, *, image_size: tuple[int, int] | None = None
             ) -> list[tuple[Sample, Image.Image]]:
    """n samples of `task` with their images (original frame). `image_size` = (width, height)."""
    if task not in _GENERATORS:
        raise ValueError(f"unknown synthetic task {task!r}; expected one of {[*SYNTHETIC_TASKS, *QUICKSTART_TASKS]}")
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be an int >= 1, got {n!r}")
    size = tuple(image_size) if image_size is not None else DEFAULT_SIZES[task]
    smallest = 112 if task in QUICKSTART_TASKS else 160
    if len(size) != 2 or min(size) < smallest:
        raise ValueError(f"image_size must be (width, height) with both sides >= {smallest}, got {image_size!r}")
    out = []
    for i in range(n):
        rng = random.Random(f"vigorl-synthetic/{task}/{seed}/{i}")
        img, fields = _GENERATORS[task](rng, size)
        sid = f"{task}-{seed}-{i:05d}"
        box = fields.pop("bbox")
        if box is not None:
            fields["bbox"] = tuple(float(v) for v in box)
            fields["point"] = _centre(box)
        fields["metadata"] = {"image_size": list(size), **fields["metadata"]}
        family, source = ("visual_search", f"synthetic_{task}") if task in QUICKSTART_TASKS else (task, "synthetic")
        sample = Sample(id=sid, task=family, source=source, images=[f"images/{sid}.png"], **fields)
        out.append((sample, img))
    return out


def write_dataset(task: str, n: int, seed: int, out_dir: str | Path, *,
                  image_size: tuple[int, int] | None = None) -> Path:
    """Write out_dir/images/<id>.png and out_dir/samples.jsonl (image paths relative to out_dir)."""
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for sample, img in generate(task, n, seed, image_size=image_size):
        img.save(out_dir / sample.images[0], format="PNG", optimize=False, compress_level=6)
        lines.append(sample.model_dump_json())
    path = out_dir / "samples.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path
