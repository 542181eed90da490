"""The annotated PNG of one grounded trace (the JSON of a `/v1/grounded` answer); `vigorl demo` writes it.

    image = draw_trace(original, response, crops)      # PIL image: the trace on the image, crops below
    marks = trace_marks(response, scale)               # the same marks as data (tests, other renderers)

Layout: the ORIGINAL image scaled by k so its longer side is `max_side`, then a strip of the zoom crops
below it, each labelled Z1, Z2, ... as its window. Marks, at original-frame coordinates times k: zoom windows
as orange rectangles, zoom points as orange squares, and every step's points as red dots labelled with the
step's number (1-based over all steps, as the web page numbers them), drawn last so they stay on top; every
label is drawn before the dots, so no label hides a dot's centre. A point outside the image is drawn hollow
on the nearest edge. The web page (services/web/view.js) draws the same marks in SVG.
"""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass
from typing import Any

from PIL import Image, ImageDraw, ImageFont

POINT, ZOOM, WINDOW = (220, 30, 30), (240, 140, 0), (240, 140, 0)
MAX_SIDE = 768
STRIP_HEIGHT = 160


@dataclass(frozen=True)
class Mark:
    """One thing drawn: `kind` point | zoom | window; (x, y) the centre, `box` the window (drawing pixels)."""

    kind: str
    label: str
    x: float
    y: float
    box: tuple[float, float, float, float] | None = None


def trace_marks(response: dict[str, Any], scale: float = 1.0) -> list[Mark]:
    """Marks of a /v1/grounded answer in drawing pixels (original frame x `scale`), in drawing order."""
    marks = []
    for i, zoom in enumerate(response["zooms"], start=1):
        x1, y1, x2, y2 = (v * scale for v in zoom["window"]["original"])
        marks.append(Mark("window", f"Z{i}", (x1 + x2) / 2, (y1 + y2) / 2, (x1, y1, x2, y2)))
        marks.append(Mark("zoom", f"Z{i}", zoom["point"]["original"]["x"] * scale,
                          zoom["point"]["original"]["y"] * scale))
    for i, step in enumerate(response["steps"], start=1):
        marks += [Mark("point", str(i), p["original"]["x"] * scale, p["original"]["y"] * scale) for p in step["points"]]
    return marks


def decode_crops(response: dict[str, Any]) -> list[Image.Image]:
    """The crops carried by an answer asked with return_crops (empty otherwise)."""
    return [Image.open(io.BytesIO(base64.b64decode(z["crop_png"]))).convert("RGB")
            for z in response["zooms"] if "crop_png" in z]


def scale_for(size: tuple[int, int], max_side: int = MAX_SIDE) -> float:
    return max_side / max(size)


def mark_radius(size: tuple[int, int]) -> int:
    """Radius of a dot on a drawing of `size` (width, height)."""
    return max(4, round(max(size) / 90))


def place(mark: Mark, size: tuple[int, int]) -> tuple[float, float, bool]:
    """Where a point mark is drawn on a drawing of `size`: (x, y, on the image); a point outside the image is
    moved to the nearest edge (and drawn hollow there)."""
    (w, h), r = size, mark_radius(size)
    if 0 <= mark.x < w and 0 <= mark.y < h:
        return mark.x, mark.y, True
    return min(max(mark.x, r + 1), w - r - 2), min(max(mark.y, r + 1), h - r - 2), False


def draw_trace(original: Image.Image, response: dict[str, Any], crops: list[Image.Image] | None = None,
               max_side: int = MAX_SIDE) -> Image.Image:
    """The original image with the trace drawn on it (scaled by scale_for(original.size)) and the crops
    (default: those in the answer) as a strip below."""
    k = scale_for(original.size, max_side)
    w, h = max(1, round(original.width * k)), max(1, round(original.height * k))
    crops = decode_crops(response) if crops is None else crops
    thumbs = [c.resize((max(1, round(c.width * STRIP_HEIGHT / c.height)), STRIP_HEIGHT)) for c in crops]
    label_h = 22
    strip_w = sum(t.width + 8 for t in thumbs)
    canvas = Image.new("RGB", (max(w, strip_w), h + (STRIP_HEIGHT + label_h + 8 if thumbs else 0)), "white")
    canvas.paste(original.convert("RGB").resize((w, h), Image.Resampling.BILINEAR), (0, 0))
    draw = ImageDraw.Draw(canvas)
    r = mark_radius((w, h))
    font = ImageFont.load_default(size=2 * r + 2)

    def label(x: float, y: float, text: str, colour) -> None:
        at = (min(x + r + 2, w - 3 * r - 8), min(max(y - r - 2, 0), h - 2 * r - 6))
        draw.text(at, text, fill=colour, font=font, stroke_width=2, stroke_fill="white")

    marks = trace_marks(response, k)
    for mark in marks:  # windows first; labels before dots, so no label hides a dot's centre
        if mark.kind == "window":
            draw.rectangle(mark.box, outline=WINDOW, width=2)
            draw.text((mark.box[0] + 3, mark.box[1] + 2), mark.label, fill=WINDOW, font=font, stroke_width=2,
                      stroke_fill="white")
    placed = []
    for mark in marks:
        if mark.kind != "window":
            x, y, on_image = place(mark, (w, h))
            colour = POINT if mark.kind == "point" else ZOOM
            label(x, y, mark.label, colour)
            placed.append((mark.kind, x, y, on_image, colour))
    for kind, x, y, on_image, colour in placed:
        shape = draw.ellipse if kind == "point" else draw.rectangle
        shape([x - r, y - r, x + r, y + r], fill=colour if on_image else None,
              outline="white" if on_image else colour, width=2)
    x = 0
    for i, thumb in enumerate(thumbs, start=1):
        draw.text((x + 2, h + 4), f"Z{i}", fill=ZOOM, font=ImageFont.load_default(size=16))
        canvas.paste(thumb, (x, h + label_h))
        x += thumb.width + 8
    return canvas
