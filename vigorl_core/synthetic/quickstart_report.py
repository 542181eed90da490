"""The quickstart's report: held-out results of every model, GRPO curves and annotated examples (pure: it reads
the run folders the jobs wrote; jobs/quickstart.py calls it).

    write_quickstart_report(out_dir, {"sft": runs/eval/<run>-sft, ...}, {"grpo": runs/grpo/<run>, ...})
    -> out_dir/report.md, out_dir/curves.{png,svg}, out_dir/examples/*.png, out_dir/results.json

Per model and benchmark: accuracy (the strict judge) with its 95% Wilson score interval, the format rate (the
share of answers whose reward format term is not 0, i.e. that pass the format gate) and the grounding rate: the
share of reasoning points inside the target's box. The benchmarks are the quickstart's two tasks
(vigorl_core.synthetic.tasks.QUICKSTART_TASKS): `synthetic_colour` (single-turn) and `synthetic_zoom_colour`
(answered from the full view, or with zooms in multi-turn mode).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from vigorl_core.charts import line_panels
from vigorl_core.evals.evaluation import Prediction, read_predictions, round_floats
from vigorl_core.images import annotate_points
from vigorl_core.rewards import ci95

SINGLE, SEARCH = "synthetic_colour", "synthetic_zoom_colour"
CURVE_KEYS = (("reward_mean", "reward", "#c82828"), ("accuracy", "accuracy", "#285ac8"),
              ("format_rate", "format rate", "#28963c"))


def model_results(predictions: Sequence[Prediction]) -> dict[str, dict[str, Any]]:
    """Per benchmark: n, accuracy and its 95% interval [low, high], format rate, grounding rate (None without
    boxes), mean turns."""
    out: dict[str, dict[str, Any]] = {}
    for name in sorted({p.benchmark for p in predictions}):
        preds = [p for p in predictions if p.benchmark == name]
        accuracy, low, high = ci95([p.score for p in preds])
        # A rate: the multi-turn format term is 1 + 0.2 per extra distinct zoom, so its mean is no share.
        formatted = [p.reward["format"] > 0 if p.reward and "format" in p.reward else p.pred_answer is not None
                     for p in preds]
        inside = [_inside(point.x, point.y, p.truth_box) for p in preds if p.truth_box for point in p.points]
        out[name] = {"n": len(preds), "accuracy": accuracy, "ci95": [low, high], "mode": preds[0].mode,
                     "format_rate": sum(formatted) / len(preds),
                     "grounding": sum(inside) / len(inside) if inside else None,
                     "turns": sum(p.num_turns for p in preds) / len(preds)}
    return out


def _inside(x: float, y: float, box: Sequence[float]) -> bool:
    return box[0] <= x <= box[2] and box[1] <= y <= box[3]


def grpo_curves(metrics_path: Path) -> list[dict[str, Any]]:
    """The step records of a GRPO run (the last record of each step: a rerun step supersedes)."""
    if not metrics_path.is_file():
        return []
    steps: dict[int, dict[str, Any]] = {}
    for line in metrics_path.read_text().splitlines():
        if '"reward_mean"' in line:
            record = json.loads(line)
            steps[record["step"]] = record
    return [steps[s] for s in sorted(steps)]


def curve_change(records: Sequence[dict[str, Any]]) -> str:
    """"N steps; reward a -> b, accuracy c -> d": the means of the first and last few steps (up to 5, a quarter of
    the run at most), since one step's 64 rollouts swing by 10-30 points."""
    k = max(1, min(5, len(records) // 4))

    def mean(part: Sequence[dict[str, Any]], key: str) -> float:
        return sum(r[key] for r in part) / len(part)

    first, last = records[:k], records[-k:]
    over = f" (means of the first and last {k} steps)" if k > 1 else ""
    return (f"{len(records)} steps; reward {mean(first, 'reward_mean'):.2f} -> {mean(last, 'reward_mean'):.2f}, "
            f"accuracy {mean(first, 'accuracy'):.0%} -> {mean(last, 'accuracy'):.0%}{over}")


def example_png(path: Path, before: Prediction, after: Prediction, labels: tuple[str, str]) -> bool:
    """The same held-out image twice, each with the model's reasoning points (numbered) and the target box."""
    panels = []
    for pred, label in zip((before, after), labels):
        if not pred.images or not Path(pred.images[0]).is_file():
            return False
        with Image.open(pred.images[0]) as im:
            image = im.convert("RGB")
        points = [(pt.x, pt.y) for pt in pred.points_original]
        if pred.answer_point_original is not None:
            points.append((pred.answer_point_original.x, pred.answer_point_original.y))
        panel = annotate_points(image, points)
        draw = ImageDraw.Draw(panel)
        if pred.bbox:
            draw.rectangle(list(pred.bbox), outline=(40, 150, 60), width=2)
        draw.text((4, 4), f"{label}: {'correct' if pred.score else 'wrong'}", fill="black",
                  stroke_width=2, stroke_fill="white")
        panels.append(panel)
    out = Image.new("RGB", (sum(p.width for p in panels) + 8, max(p.height for p in panels)), "white")
    out.paste(panels[0], (0, 0))
    out.paste(panels[1], (panels[0].width + 8, 0))
    path.parent.mkdir(parents=True, exist_ok=True)
    out.save(path)
    return True


def _cell(result: dict[str, Any] | None, key: str) -> str:
    if result is None or result.get(key) is None:
        return "-"
    if key == "accuracy":
        low, high = result["ci95"]
        return f"{result['accuracy']:.0%} [{low:.0%}, {high:.0%}]"
    return f"{result[key]:.0%}"


def write_quickstart_report(out_dir: str | Path, eval_runs: Mapping[str, Path], grpo_runs: Mapping[str, Path], *,
                            fast: bool = False, examples: int = 3, header: str = "", rl_start: str = "sft") -> Path:
    """report.md, curves.png and .svg, examples/ and results.json in `out_dir`; returns the report's path.
    `rl_start`: the evaluated model single-turn GRPO started from (the examples' "before")."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    predictions = {model: read_predictions(run / "predictions.jsonl").predictions
                   for model, run in eval_runs.items() if (run / "predictions.jsonl").is_file()}
    results = {model: model_results(preds) for model, preds in predictions.items()}
    curves = {name: grpo_curves(run / "metrics.jsonl") for name, run in grpo_runs.items()}
    (out / "results.json").write_text(json.dumps(round_floats({"models": results, "grpo": curves}), indent=1) + "\n")
    lines = ["# vigorl quickstart report", ""]
    if header:
        lines += [header, ""]
    if fast:
        lines += ["**--fast run**: a few samples and steps per stage; it checks the plumbing, not the learning.", ""]
    lines += [("Held-out synthetic samples, greedy decoding. Accuracy is the strict judge with its 95% Wilson score "
               "interval in brackets; format is the share of answers that pass the reward's format gate; "
               "grounding is the share of reasoning points inside the target's box. colour: the colour of a "
               "square 37-56 px wide in a 112-px image (4 options). zoom: the colour of an 18-24 px square in "
               "a named quadrant (4 options, one per quadrant), from the full view (grounded) or with zooms "
               "(multiturn)."), "",
              ("| model | colour accuracy | format | grounding | zoom accuracy | format | grounding "
               "| zoom mode (turns) |"),
              "|---|---|---|---|---|---|---|---|"]
    for model, result in results.items():
        single, search = result.get(SINGLE), result.get(SEARCH)
        mode = f"{search['mode']} ({search['turns']:.1f})" if search else "-"
        lines.append(f"| {model} | {_cell(single, 'accuracy')} | {_cell(single, 'format_rate')} "
                     f"| {_cell(single, 'grounding')} | {_cell(search, 'accuracy')} "
                     f"| {_cell(search, 'format_rate')} | {_cell(search, 'grounding')} | {mode} |")
    if any(curves.values()):
        line_panels(out / "curves", "GRPO: mean reward, accuracy and format rate of each step's rollouts", curves,
                    CURVE_KEYS)
        lines += ["", "## GRPO curves", "", "![GRPO curves](curves.png)", ""]
        for name, records in curves.items():
            if records:
                lines.append(f"- {name}: {curve_change(records)}")
    lines += _examples(out, predictions, examples, rl_start)
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def _examples(out: Path, predictions: Mapping[str, list[Prediction]], k: int, rl_start: str) -> list[str]:
    """Before and after RL on the same held-out colour images: the model GRPO started from against the GRPO model."""
    if rl_start not in predictions or "grpo" not in predictions:
        return []
    after = {p.id: p for p in predictions["grpo"] if p.benchmark == SINGLE}
    pairs = [(p, after[p.id]) for p in predictions[rl_start] if p.benchmark == SINGLE and p.id in after]
    pairs.sort(key=lambda pair: (pair[1].score - pair[0].score), reverse=True)  # RL's fixes first
    for stale in (out / "examples").glob("*.png"):  # a resumed run's earlier report picked other images
        stale.unlink()
    label = "SFT" if rl_start == "sft" else rl_start.replace("_", " ")
    lines = ["", f"## Examples: before ({label}) and after (GRPO) RL", ""]
    for before, later in pairs[:k]:
        name = f"examples/{before.id}.png"
        if example_png(out / name, before, later, (label, "GRPO")):
            lines += [f"**{before.question}** (target box in green; points numbered in order)", "",
                      f"![{before.id}]({name})", ""]
    return lines
