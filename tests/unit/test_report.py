"""vigorl_core.evals.report: summary table, charts, annotated examples, report.md."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from PIL import Image

from vigorl_core.evals import evaluation as E
from vigorl_core.evals import original_eval
from vigorl_core.frames import FrameMap
from vigorl_core.records import Sample
from vigorl_core.evals.report import (
    EXAMPLE_MAX_SIDE,
    annotate_example,
    format_summary,
    pick_examples,
    write_report,
)

FRAME = FrameMap((800, 600), (252, 168))


@pytest.fixture
def image(tmp_path: Path) -> str:
    path = tmp_path / "data" / "screen.png"
    path.parent.mkdir()
    Image.new("RGB", (800, 600), (255, 255, 255)).save(path)
    return str(path)


def predict(image: str, id_: str, answer: str, category: str = "icon") -> E.Prediction:
    sample = Sample(id=id_, task="grounding", source="screenspot_v2", images=[image], question="Click <OK> | now.",
                    answer="(400, 300, 480, 360)", bbox=(400.0, 300.0, 480.0, 360.0), category=category)
    text = (f"<think> The OK button is at (130, 90). </think>\n<tool_call>\n"
            f'{{"name": "search_coordinate", "arguments": {{"coordinate": [60, 40]}}}}\n</tool_call>'
            f"\n<observation>\ncrop\n</observation>\n<think> confirmed </think>\n<answer> {answer} </answer>")
    return E.make_prediction(sample, text, mode="multiturn", frame=FRAME, policy="tiny")


def test_format_summary_lists_benchmarks_and_categories(image):
    preds = [predict(image, "a", "(130, 90)"), predict(image, "b", "(10, 10)", "text")]
    text = format_summary(E.compute_metrics(preds))
    lines = text.splitlines()
    assert lines[0].split() == ["benchmark", "n", "score", "score_original"]
    assert re.match(r"screenspot_v2\s+2\s+50\.0 \[9\.5, 90\.5\]\s+50\.0 \[9\.5, 90\.5\]$", lines[2])  # Wilson 1/2
    assert re.match(r"  icon\s+1\s+100\.0 \[20\.7, 100\.0\]", lines[3]) and lines[4].startswith("  text")


def test_annotated_example_draws_in_the_original_frame(image, tmp_path: Path):
    pred = predict(image, "a", "(130, 90)")
    out = tmp_path / "ex.png"
    assert annotate_example(pred, out)
    drawn = Image.open(out).convert("RGB")
    k = EXAMPLE_MAX_SIDE / 800
    assert drawn.size == (768, 576)
    x, y = pred.points_original[0].x * k, pred.points_original[0].y * k  # (130, 90) model -> (412.7, 321.4)
    assert drawn.getpixel((round(x), round(y))) == (220, 30, 30)  # reasoning point 1, red
    assert drawn.getpixel((round(400 * k), round(340 * k))) == (0, 170, 0)  # ground-truth box edge, green
    zx, zy = FRAME.to_original(60, 40)
    assert drawn.getpixel((round(zx * k), round(zy * k))) == (240, 140, 0)  # zoom centre, orange
    assert drawn.getpixel((10, 10)) == (255, 255, 255)


def test_no_example_without_image_or_frame(image, tmp_path: Path):
    moved = predict(image, "a", "(1, 1)").model_copy(update={"images": ["/gone.png"]})
    assert not annotate_example(moved, tmp_path / "x.png")
    no_frame = predict(image, "a", "(1, 1)").model_copy(update={"original_size": None})
    assert not annotate_example(no_frame, tmp_path / "x.png") and not (tmp_path / "x.png").exists()


def test_pick_examples_first_correct_and_wrong_by_id(image):
    preds = [predict(image, i, "(130, 90)" if i in "bdf" else "(1, 1)") for i in "fedcba"]
    assert [p.id for p in pick_examples(preds, 2)] == ["b", "d", "a", "c"]


def test_write_report_links_resolve(image, tmp_path: Path):
    preds = [predict(image, f"s{i}", "(130, 90)" if i % 2 else "(1, 1)", "icon" if i < 3 else "text") for i in range(5)]
    preds.append(predict(image, "v", "(1, 1)").model_copy(update={"benchmark": "vwa"}))
    metrics = E.compute_metrics(preds)
    path = write_report(tmp_path / "run", preds, metrics, examples=1)
    md = path.read_text()
    assert "## screenspot_v2" in md and "## vwa" in md and "| icon | 3 |" in md and "| text | 2 |" in md
    assert "ViGoRL-7B 91.0 ± 1.6" in md and "Wilson score interval" in md
    assert "4 predictions" not in md and "6 predictions of tiny" in md
    assert "Click &lt;OK&gt; \\| now." in md  # model and data text cannot break the markdown
    links = re.findall(r"\]\(([^)]+)\)", md)
    assert {"plots/screenspot_v2.svg", "plots/vwa.svg", "examples/screenspot_v2-s1.png",
            "examples/screenspot_v2-s0.png"} <= set(links)
    assert all((path.parent / link).is_file() for link in links)
    assert "## Grounding behaviour" in md
    assert "| | screenspot_v2 | screenspot_v2 (correct) | vwa | vwa (correct) |" in md
    assert "| traces | 5 | 2 | 1 | 0 |" in md and "| zooms | 1.00 | 1.00 | 1.00 | - |" in md
    assert {p.name for p in (path.parent / "plots").iterdir()} == {
        "screenspot_v2.svg", "screenspot_v2.png", "vwa.svg", "vwa.png"}
    for svg in (path.parent / "plots").glob("*.svg"):
        ET.fromstring(svg.read_text())


def test_report_without_images_says_so(tmp_path: Path):
    f = tmp_path / "rollouts_x.jsonl"
    f.write_text('{"id": 1, "question": "q", "image": "/gone.png", "true_answer": "left", "thoughts": [], '
                 '"final_answer": "left", "judge_score": 1.0}\n')
    preds, _ = original_eval.read_original_rollouts(f, "sat2")
    md = write_report(tmp_path / "out", preds, E.compute_metrics(preds)).read_text()
    assert "No annotated examples" in md and "| **all** | 1 | **100.0 [20.7, 100.0]** |" in md
