"""Human-readable evaluation outputs: the summary table, report.md, bar charts, annotated examples, and
the grounding-behaviour table (vigorl_core.evals.behaviour).

    from vigorl_core.evals.report import format_summary, write_report
    print(format_summary(metrics))                      # metrics = evaluation.compute_metrics(predictions)
    write_report(run_dir, predictions, metrics)         # run_dir/report.md, plots/*.{svg,png}, examples/*.png

Charts (vigorl_core.charts, matplotlib, PNG + SVG): per benchmark one bar per category and score, with the
95% interval as an error bar. Examples draw on the ORIGINAL image: the ground-truth box, the reasoning
points numbered in order, zoom centres and the answer point.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from html import escape
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from vigorl_core.evals.behaviour import DEFAULT_RADIUS, TraceInfo, behaviour_table, markdown_table
from vigorl_core.charts import bar_chart
from vigorl_core.evals.evaluation import Prediction

SERIES = (("score", "score (strict)", "#4c72b0"), ("score_original", "score_original", "#dd8452"))
EXAMPLE_MAX_SIDE = 768
_SAFE = re.compile(r"[^A-Za-z0-9._-]+")


def pct(stat: dict[str, Any]) -> str:
    """'67.5 [66.0, 69.0]' (percent: the mean and its 95% interval) from {"mean", "ci95": [low, high]}."""
    low, high = stat["ci95"]
    return f"{100 * stat['mean']:.1f} [{100 * low:.1f}, {100 * high:.1f}]"


def _rows(metrics: dict[str, Any]) -> list[tuple[str, str, dict]]:
    """(benchmark, category or '', stats) for each benchmark, then its categories."""
    rows = []
    for name, entry in metrics["benchmarks"].items():
        rows.append((name, "", entry))
        rows += [(name, cat, stats) for cat, stats in entry["categories"].items()]
    return rows


def format_summary(metrics: dict[str, Any]) -> str:
    """Plain-text table: benchmark / category, n, score and score_original as percent [95% Wilson interval]."""
    lines = [f"{'benchmark':<26}{'n':>7}  {'score':>19}  {'score_original':>19}", "-" * 73]
    for name, cat, stats in _rows(metrics):
        label = f"  {cat}" if cat else name
        lines.append(f"{label[:26]:<26}{stats['n']:>7}  {pct(stats['score']):>19}  {pct(stats['score_original']):>19}")
    return "\n".join(lines)


# -------------------------------------------------------------------------------------------------- charts

def benchmark_chart(stem: str | os.PathLike, name: str, entry: dict[str, Any]) -> tuple[Path, Path]:
    """The chart of one metrics.json benchmark entry, stem.png and stem.svg: 'all' then each category, both
    scores in percent with their 95% intervals as error bars."""
    groups = [("all", entry)] + list(entry["categories"].items())
    bars = [(label, [(100 * s[key]["mean"], 100 * s[key]["ci95"][0], 100 * s[key]["ci95"][1])
                     for key, _, _ in SERIES])
            for label, s in groups]
    return bar_chart(stem, f"{name}: mean with 95% interval (percent)", bars, [(lab, col) for _, lab, col in SERIES])


# ------------------------------------------------------------------------------------- annotated examples

def annotate_example(pred: Prediction, out_path: str | os.PathLike, max_side: int = EXAMPLE_MAX_SIDE) -> bool:
    """Draw the prediction on its original image and save a PNG; False when the image file or the frame is
    unknown (nothing written). Green: ground truth; red numbered: reasoning points in order; orange Z1..:
    zoom centres; blue ring A: the answer point; hollow marks on the edge: points outside the image."""
    frame = pred.frame()
    if frame is None or not pred.images or not os.path.isfile(pred.images[0]):
        return False
    with Image.open(pred.images[0]) as im:
        image = im.convert("RGB")
    if image.size != frame.original_size:
        return False  # not the image this prediction was made on
    k = max_side / max(image.size)  # up- or downscale: tiny images get legible marks, 4K ones a small file
    if k != 1.0:
        size = (max(1, round(image.width * k)), max(1, round(image.height * k)))
        image = image.resize(size, Image.Resampling.BILINEAR)
    draw = ImageDraw.Draw(image)
    r = max(4, round(max(image.size) / 90))
    font = ImageFont.load_default(size=2 * r + 2)
    w, h = image.size

    def mark(x: float, y: float, colour: tuple[int, int, int], label: str, square: bool = False) -> None:
        # A point outside the image is drawn hollow on the nearest edge (random or wrong-frame models write those).
        x, y = x * k, y * k
        inside = 0 <= x < w and 0 <= y < h
        x, y = (x, y) if inside else (min(max(x, r + 1), w - r - 2), min(max(y, r + 1), h - r - 2))
        (draw.rectangle if square else draw.ellipse)([x - r, y - r, x + r, y + r], fill=colour if inside else None,
                                                     outline=colour if not inside else "white", width=2)
        at = (min(x + r + 2, w - 3 * r - 8), min(max(y - r - 2, 0), h - 2 * r - 6))  # the label stays visible
        draw.text(at, label, fill=colour, font=font, stroke_width=2, stroke_fill="white")

    if pred.bbox:
        draw.rectangle([v * k for v in pred.bbox], outline=(0, 170, 0), width=max(2, r // 2))
    elif pred.point:
        mark(*pred.point, (0, 170, 0), "GT")
    for i, p in enumerate(pred.points_original, start=1):
        mark(p.x, p.y, (220, 30, 30), str(i))
    zooms = [frame.to_original(*c.coordinate) for c in pred.trace.tool_calls if c.coordinate is not None]
    for i, (x, y) in enumerate(zooms, start=1):
        mark(x, y, (240, 140, 0), f"Z{i}", square=True)
    if pred.answer_point_original:  # a ring, so a reasoning point under it stays visible
        x, y, ring = pred.answer_point_original.x * k, pred.answer_point_original.y * k, r + 4
        draw.ellipse([x - ring, y - ring, x + ring, y + ring], outline=(30, 70, 230), width=3)
        draw.text((x + ring + 2, y + 2), "A", fill=(30, 70, 230), font=font, stroke_width=2, stroke_fill="white")
    Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    image.save(out_path, format="PNG")
    return True


def pick_examples(preds: Sequence[Prediction], k: int) -> list[Prediction]:
    """The first k correct and first k wrong predictions by id (deterministic across distributed runs)."""
    ordered = sorted(preds, key=lambda p: p.id)
    return [p for p in ordered if p.score >= 1][:k] + [p for p in ordered if p.score < 1][:k]


def _clip(text: str | None, n: int = 160) -> str:
    text = " ".join((text or "").split())
    text = text if len(text) <= n else text[: n - 1] + "…"
    return escape(text, quote=False).replace("|", "\\|")  # model text holds tags markdown would swallow


# ---------------------------------------------------------------------------------------------- report.md

def write_report(out_dir: str | os.PathLike, predictions: Sequence[Prediction], metrics: dict[str, Any], *,
                 examples: int = 3, title: str = "Evaluation report") -> Path:
    """Write out_dir/report.md with a table per benchmark (overall and per category), a chart per benchmark
    (plots/<benchmark>.svg and .png) and up to `examples` correct and wrong annotated examples (examples/*.png)."""
    out = Path(out_dir)
    (out / "plots").mkdir(parents=True, exist_ok=True)
    policies = sorted({p.policy for p in predictions if p.policy})
    md = [f"# {title}", "",
          f"{metrics['n']} predictions" + (f" of {', '.join(policies)}" if policies else "") + ". Scores in percent, "
          "with the 95% Wilson score interval in brackets (see docs/evaluation.md). `score` is the strict judge, "
          "`score_original` the original project's eval judge (comparable with published numbers).", ""]
    for name, entry in metrics["benchmarks"].items():
        md += [f"## {name}", "",
               (f"Task `{entry['task']}`, mode {', '.join(f'`{m}`' for m in entry['modes'])}; judges "
                f"`{entry['judge']}` / `{entry['judge_original']}`."), "",
               "| category | n | score | score_original |", "|---|---:|---:|---:|",
               f"| **all** | {entry['n']} | **{pct(entry['score'])}** | **{pct(entry['score_original'])}** |"]
        md += [f"| {_clip(c, 60)} | {s['n']} | {pct(s['score'])} | {pct(s['score_original'])} |"
               for c, s in entry["categories"].items()]
        md.append("")
        if entry["published"]:
            md.append("Published (paper, ± its Wald 95% half-width): " + "; ".join(
                f"{who} {m:.1f}" + (f" ± {ci:.1f}" if ci is not None else "")
                for who, (m, ci) in entry["published"].items()))
        md += ["Finish: " + ", ".join(f"{k} {v}" for k, v in sorted(entry["finish"].items())), ""]
        _, svg = benchmark_chart(out / "plots" / _SAFE.sub("_", name), name, entry)
        md += [f"![{name} by category](plots/{svg.name})", ""]
        if examples > 0:
            md += _examples_section(out, name, [p for p in predictions if p.benchmark == name], examples)
    md += behaviour_section(predictions)
    path = out / "report.md"
    path.write_text("\n".join(md) + "\n", encoding="utf-8")
    return path


def behaviour_section(predictions: Sequence[Prediction], radius: float = DEFAULT_RADIUS) -> list[str]:
    """Markdown of the grounding-behaviour table (vigorl_core.evals.behaviour): per benchmark, all traces and the
    correct ones (the paper counts correct traces only)."""
    columns: dict[str, list] = {}
    for p in predictions:
        trace = TraceInfo(p.id, p.trace, p.score >= 1, p.truth_box, p.benchmark, p.category)
        columns.setdefault(p.benchmark, []).append(trace)
        columns.setdefault(f"{p.benchmark} (correct)", [])
        if trace.correct:
            columns[f"{p.benchmark} (correct)"].append(trace)
    if not columns:
        return []
    return ["## Grounding behaviour", "",
            (f"Mean per trace, rule-based (vigorl_core/evals/behaviour.py): regions explored groups points "
             f"within {radius:g} "
             "model-frame pixels; revisits return to an earlier region; phrases are counted from word lists, a "
             "crude proxy. `vigorl behaviour` compares runs side by side."), "",
            markdown_table(behaviour_table(columns, radius)), ""]


def _examples_section(out: Path, name: str, preds: Sequence[Prediction], k: int) -> list[str]:
    md = ["### Examples", "",
          ("Green: ground truth; red numbered: reasoning points in order; orange Z: zoom centres; "
           "blue ring A: answer; hollow marks on the edge: points outside the image."), ""]
    shown = 0
    for p in pick_examples(preds, k):
        png = out / "examples" / f"{_SAFE.sub('_', name)}-{_SAFE.sub('_', p.id)[:80]}.png"
        if not annotate_example(p, png):
            continue
        shown += 1
        verdict = "correct" if p.score >= 1 else "wrong"
        md += [f"#### `{p.id}` ({verdict}{', ' + p.category if p.category else ''})", "",
               f"![{p.id}](examples/{png.name})", "",
               f"- question: {_clip(p.question)}", f"- ground truth: {_clip(p.answer, 80)}",
               (f"- answer: {_clip(p.pred_answer, 80)} (score {p.score:g}, score_original {p.score_original:g}, "
                f"finish {p.finish})"), f"- response: {_clip(p.text, 400)}", ""]
    if not shown:
        md += [("No annotated examples: the images are not available here or the predictions do not say "
                "their frame (files of the original project)."), ""]
    return md
