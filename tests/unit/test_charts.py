"""vigorl_core.charts: matplotlib bar and line charts, each saved as PNG and SVG."""

from __future__ import annotations

import xml.etree.ElementTree as ET

from PIL import Image

from vigorl_core.charts import bar_chart, line_panels

RED, BLUE = (255, 0, 0), (0, 0, 255)


def _colours(png) -> set[tuple[int, int, int]]:
    with Image.open(png) as im:
        return {colour for _, colour in im.convert("RGB").getcolors(1 << 20)}


def test_bar_chart_writes_png_and_svg_with_every_series_and_label(tmp_path):
    png, svg = bar_chart(tmp_path / "plots" / "vstar", "vstar <all> & more",
                         [("all", [(67.5, 66.0, 69.0), (70.0, 68.6, 71.4)]),
                          ("x<y", [(100.0, 72.2, 100.0), (0, 0, 28)])],
                         [("score", "#ff0000"), ("score_original", "#0000ff")])
    assert (png.name, svg.name) == ("vstar.png", "vstar.svg")
    assert {RED, BLUE} <= _colours(png)
    root = ET.fromstring(svg.read_text())  # valid XML: the title's < and & are escaped
    texts = {"".join(t.itertext()) for t in root.iter("{http://www.w3.org/2000/svg}text")}
    assert {"vstar <all> & more", "all", "x<y", "score", "score_original"} <= texts


def test_line_panels_draw_one_panel_per_run_with_records(tmp_path):
    records = [{"step": s, "reward_mean": 0.2 * s, "accuracy": 0.1 * s} for s in (1, 2, 3)]
    curves = (("reward_mean", "reward", "#ff0000"), ("accuracy", "accuracy", "#0000ff"))
    one, _ = line_panels(tmp_path / "one", "GRPO", {"grpo": records, "zoom": []}, curves)
    two, svg = line_panels(tmp_path / "two", "GRPO", {"grpo": records, "zoom": records[:1]}, curves)
    assert {RED, BLUE} <= _colours(one)
    with Image.open(one) as a, Image.open(two) as b:
        assert b.height > 1.5 * a.height  # the run without records gets no panel
    texts = {"".join(t.itertext()) for t in ET.fromstring(svg.read_text()).iter("{http://www.w3.org/2000/svg}text")}
    assert {"grpo: GRPO step", "zoom: GRPO step", "reward", "accuracy"} <= texts
