"""vigorl_core.evals.trace_image on a hand-written /v1/grounded answer: marks at original-frame coordinates x the
drawing scale, drawn where they say, crops as a strip; and the standalone HTML of services.pages."""

from __future__ import annotations

import base64
import io
import json

import pytest
from PIL import Image

from vigorl_core.evals import trace_image as T


def _both(x, y, s=2.0):
    return {"model": {"x": x / s, "y": y / s}, "original": {"x": x, "y": y}}


def response(with_crop: bool = True) -> dict:
    crop = Image.new("RGB", (56, 56), (0, 0, 255))
    buffer = io.BytesIO()
    crop.save(buffer, format="PNG")
    zoom = {"turn": 0, "requested": [50, 40], "point": _both(100, 80), "window": {"model": [30, 20, 70, 60],
            "original": [60, 40, 140, 120]}, "clamped": False, "crop_size": [56, 56]}
    if with_crop:
        zoom["crop_png"] = base64.b64encode(buffer.getvalue()).decode()
    return {"object": "grounded.result", "answer": "blue", "finish": "answer", "turns": 2,
            "image": {"original_size": [400, 300], "model_size": [200, 150]},
            "steps": [{"turn": 0, "text": "The box is at (50, 40).", "points": [_both(100, 80)]},
                      {"turn": 1, "text": "No point here.", "points": []},
                      {"turn": 1, "text": "It is blue (150, 100) and (-10, 20).", "points": [_both(300, 200),
                                                                                        _both(-20, 40)]}],
            "zooms": [zoom], "usage": {"prompt_tokens": 1, "completion_tokens": 1, "image_tokens": 1,
                                       "total_tokens": 2}}


def test_marks_scale_original_coordinates_and_number_by_step():
    marks = T.trace_marks(response(), scale=0.5)
    assert [(m.kind, m.label) for m in marks] == [("window", "Z1"), ("zoom", "Z1"), ("point", "1"), ("point", "3"),
                                                  ("point", "3")]
    assert marks[0].box == (30, 20, 70, 60) and (marks[1].x, marks[1].y) == (50, 40)
    assert (marks[3].x, marks[3].y) == (150, 100) and (marks[4].x, marks[4].y) == (-10, 20)


def test_drawn_png_has_the_marks_where_they_say_and_the_crop_strip():
    original = Image.new("RGB", (400, 300), (255, 255, 255))
    k = T.scale_for(original.size)
    assert k == pytest.approx(768 / 400)
    image = T.draw_trace(original, response())
    assert image.size == (768, 576 + T.STRIP_HEIGHT + 30)
    r = T.mark_radius((768, 576))
    for mark in T.trace_marks(response(), k):
        if mark.kind == "point":
            x, y, on_image = T.place(mark, (768, 576))
            assert on_image == (mark.x >= 0)
            # a dot inside is filled; one outside is a hollow ring on the nearest edge (x = -20 * k -> r + 1)
            centre = image.getpixel((round(x), round(y)))
            ring = [image.getpixel((round(x), round(y) - r + d)) for d in (-2, -1, 0, 1)]  # the dot's top edge
            assert (centre == T.POINT) if on_image else (centre == (255, 255, 255) and T.POINT in ring)
            assert on_image or (x, y) == (r + 1, mark.y)
    x1, y1, x2, y2 = T.trace_marks(response(), k)[0].box
    assert image.getpixel((round((x1 + x2) / 2), round(y1))) == T.WINDOW  # the window's top edge
    assert image.getpixel((round(x1 + 20), round(y1 + 20))) == (255, 255, 255)  # a window is not filled
    assert image.getpixel((20, 576 + 22 + 80)) == (0, 0, 255)  # the crop, below the image
    assert T.draw_trace(original, response(with_crop=False)).size == (768, 576)  # no crops: no strip


def test_standalone_html_carries_view_and_data_inline():
    from services.pages import standalone_html

    answer = response()
    answer["steps"][0]["text"] = "</script><b>tag</b>"
    html = standalone_html(answer, "data:image/png;base64,AAAA", "t <1>", {"question": "q"})
    assert html.count("</script>") == 2 and "<\\/script><b>tag<\\/b>" in html  # model text cannot end the script
    assert "Vigorl.renderTrace" in html and ".stage svg.overlay" in html and "t &lt;1&gt;" in html
    assert "http://" not in html.replace("http://www.w3.org/2000/svg", "")  # nothing fetched: works offline
    start = html.index("Vigorl.renderTrace(document.getElementById('view'), ") + 52
    assert json.JSONDecoder().raw_decode(html[start:].replace("<\\/", "</"))[0]["answer"] == "blue"
