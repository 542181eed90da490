"""`vigorl demo` on the session's vLLM engine (tiny model): the printed trace, the annotated PNG with every
step's point at the answer's original-frame coordinates, the self-contained HTML and the JSON answer; and the
command's one-line errors for a missing or bad image (before any engine starts)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from jobs import demo
from vigorl_core.evals import trace_image as T

pytestmark = pytest.mark.slow


def test_demo_writes_png_html_and_json(vllm_engine, tiny_model_dir, tmp_path: Path, monkeypatch):
    from vigorl_core.rollout.chat_tokens import ChatTokens

    image = tmp_path / "scene.png"
    scene = Image.new("RGB", (500, 375), (235, 240, 250))
    scene.paste((200, 30, 30), (160, 120, 200, 160))
    scene.save(image)
    cfg = demo.DemoConfig(model=str(tiny_model_dir), image=str(image), question="What colour is the square?",
                          options=["red", "blue"], multiturn=True, out=str(tmp_path / "out" / "trace.png"),
                          max_tokens=96, max_model_len=4096)
    monkeypatch.setenv("VIGORL_PLANNED_ZOOMS", "2")  # the random-weight model zooms twice (a test's switch)
    data = image.read_bytes()
    answer = vllm_engine.run(demo.grounded_answer(cfg, vllm_engine.engine, ChatTokens.from_pretrained(cfg.model), data))
    assert answer["turns"] == 3 and len(answer["zooms"]) == 2 and answer["image"]["original_size"] == [500, 375]
    png, html, saved = demo.write_outputs(cfg, answer, data)
    assert json.loads(saved.read_text()) == answer

    drawn = Image.open(png).convert("RGB")
    k = T.scale_for((500, 375))
    assert drawn.width == round(500 * k) and drawn.height > round(375 * k)  # the crop strip is below the image
    # every step's point at its original-frame coordinates x k: a filled dot, or (a random model often names
    # points outside the image) a hollow ring on the nearest edge
    size, r = (drawn.width, round(375 * k)), T.mark_radius((drawn.width, round(375 * k)))
    marks = [m for m in T.trace_marks(answer, k) if m.kind == "point"]
    assert len(marks) == sum(len(s["points"]) for s in answer["steps"]) > 0
    for mark in marks:
        x, y, on_image = T.place(mark, size)
        if on_image:
            assert drawn.getpixel((round(x), round(y))) == T.POINT, mark
        else:
            assert T.POINT in [drawn.getpixel((round(x), round(y) - r + d)) for d in (-2, -1, 0, 1)], mark
    for zoom in answer["zooms"]:  # zoom points lie inside the image: orange squares unless a dot covers them
        x, y = zoom["point"]["original"]["x"] * k, zoom["point"]["original"]["y"] * k
        if all((m.x - x) ** 2 + (m.y - y) ** 2 > (2 * r + 2) ** 2 for m in marks):
            assert drawn.getpixel((round(x), round(y))) == T.ZOOM
    for zoom in answer["zooms"]:  # each window's bottom edge is drawn in the zoom colour (marks may cross it)
        x1, _, x2, y2 = (round(v * k) for v in zoom["window"]["original"])
        edge = [drawn.getpixel((x, y2 - 1)) for x in range(x1, x2)]
        assert edge.count(T.WINDOW) > len(edge) / 2

    page = html.read_text()
    assert "Vigorl.renderTrace" in page and json.dumps(answer["answer"]) in page and "data:image/png;base64," in page
    printed = demo.format_trace(answer)
    assert printed.count("turn ") >= 3 and "Z2: zoom at" in printed and f"answer: {answer['answer']}" in printed


def test_demo_says_what_is_wrong_with_the_image(tmp_path: Path, capsys):
    assert demo.main(["--model", "m", "--image", str(tmp_path / "missing.png"), "--question", "q"]) == 2
    assert "no such file" in capsys.readouterr().err
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    assert demo.main(["--model", "m", "--image", str(bad), "--question", "q"]) == 2
    assert "--image" in capsys.readouterr().err
