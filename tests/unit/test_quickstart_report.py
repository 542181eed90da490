"""The quickstart report (vigorl_core.synthetic.quickstart_report) on predictions scored by the real judges."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from vigorl_core.data import load_samples
from vigorl_core.evals.evaluation import make_prediction
from vigorl_core.frames import get_profile, resize_to_model
from vigorl_core.synthetic.quickstart_report import model_results, write_quickstart_report
from vigorl_core.synthetic.tasks import write_dataset


def _samples_with_frames(folder, task: str):
    samples = load_samples(write_dataset(task, 4, seed=3, out_dir=folder))
    frames = []
    for sample in samples:
        with Image.open(sample.images[0]) as im:
            frames.append(resize_to_model(im, get_profile("tiny"))[1])
    return samples, frames


@pytest.fixture(scope="module")
def pointing(tmp_path_factory):
    """Four synthetic pointing samples with their model frames."""
    return _samples_with_frames(tmp_path_factory.mktemp("pointing"), "grounding")


def _answer(sample, frame, inside: bool) -> str:
    """A grounded response whose one step and answer point at the target's centre, or at a far corner."""
    x1, y1, x2, y2 = sample.bbox
    x, y = ((x1 + x2) / 2, (y1 + y2) / 2) if inside else (x2 + 30 if x2 + 30 < frame.original_size[0] else 1, 1)
    mx, my = (round(v) for v in frame.to_model(x, y))
    return f"<think> The target is at ({mx}, {my}). </think> <answer> ({mx}, {my}) </answer>"


def _predictions(pointing, correct: int):
    samples, frames = pointing
    return [make_prediction(s, _answer(s, f, i < correct), mode="grounded", frame=f)
            for i, (s, f) in enumerate(zip(samples, frames))]


def test_results_count_accuracy_format_and_points_inside_the_target(pointing):
    result = model_results(_predictions(pointing, correct=3))["synthetic_grounding"]
    assert result["n"] == 4 and result["accuracy"] == 0.75 and result["format_rate"] == 1.0
    assert result["grounding"] == 0.75  # one reasoning point per answer, three inside the box
    assert result["ci95"] == pytest.approx([0.3006, 0.9544], abs=1e-4)  # Wilson 3/4


@pytest.fixture(scope="module")
def colour(tmp_path_factory):
    """Four samples of the quickstart's single-turn colour task with their model frames."""
    return _samples_with_frames(tmp_path_factory.mktemp("colour"), "colour")


def _colour_predictions(colour, correct: int):
    """Answers right for the first `correct` samples, each with one step at the square's centre (inside)."""
    samples, frames = colour
    out = []
    for i, (s, f) in enumerate(zip(samples, frames)):
        mx, my = (round(v) for v in f.to_model(*s.point))
        answer = s.answer if i < correct else next(o for o in s.options if o != s.answer)
        text = f"<think> The square is at ({mx}, {my}). </think> <answer> {answer} </answer>"
        out.append(make_prediction(s, text, mode="grounded", frame=f))
    return out


def test_report_has_a_row_per_model_the_curves_and_before_after_examples(pointing, colour, tmp_path):
    evals = {}
    for model, correct in (("sft_partial", 1), ("grpo", 4)):
        run = tmp_path / "eval" / model
        run.mkdir(parents=True)
        predictions = _predictions(pointing, correct) + _colour_predictions(colour, correct)
        (run / "predictions.jsonl").write_text("".join(p.model_dump_json() + "\n" for p in predictions))
        evals[model] = run
    grpo = tmp_path / "grpo"
    grpo.mkdir()
    (grpo / "metrics.jsonl").write_text("".join(
        json.dumps({"step": s, "reward_mean": 0.1 * s, "accuracy": 0.05 * s, "format_rate": 0.9}) + "\n"
        for s in (1, 2, 3)))
    report = write_quickstart_report(tmp_path / "out", evals, {"grpo": grpo, "grpo_zoom": tmp_path / "none"},
                                     rl_start="sft_partial")
    text = report.read_text()
    # colour columns: accuracy with its interval, format, grounding (every step inside the square); no zoom rows
    assert "| sft_partial | 25% [5%, 70%] | 100% | 100% | - |" in text, text
    assert "| grpo | 100% [51%, 100%] | 100% | 100% | - |" in text
    assert "grpo: 3 steps; reward 0.10 -> 0.30, accuracy 5% -> 15%" in text
    assert (tmp_path / "out" / "curves.png").is_file() and (tmp_path / "out" / "curves.svg").is_file()
    examples = sorted((tmp_path / "out" / "examples").glob("*.png"))
    assert len(examples) == 3 and text.count("![colour-") == 3  # RL's fixes first: three of the four
    assert "## Examples: before (sft partial) and after (GRPO) RL" in text  # from the model GRPO started from
    (tmp_path / "out" / "examples" / "colour-old.png").write_bytes(b"")  # an earlier report's example
    write_quickstart_report(tmp_path / "out", evals, {"grpo": grpo}, rl_start="sft_partial")
    assert sorted((tmp_path / "out" / "examples").glob("*.png")) == examples  # rewritten, nothing stale left
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["models"]["grpo"]["synthetic_grounding"]["accuracy"] == 1.0


def test_format_is_a_rate_even_when_the_multiturn_format_reward_exceeds_1(pointing):
    rewards = [{"overall": 1.0, "format": f, "accuracy": 1.0} for f in (1.4, 1.2, 0.0, 1.0)]
    preds = [p.model_copy(update={"reward": r}) for p, r in zip(_predictions(pointing, correct=4), rewards)]
    assert model_results(preds)["synthetic_grounding"]["format_rate"] == 0.75


def test_curve_change_averages_the_first_and_last_steps_of_a_long_run():
    from vigorl_core.synthetic.quickstart_report import curve_change

    records = [{"reward_mean": 0.5, "accuracy": 0.4}] * 5 + [{"reward_mean": 1.0, "accuracy": 1.0}] * 30 \
        + [{"reward_mean": 0.9, "accuracy": 0.9}] * 4 + [{"reward_mean": 0.5, "accuracy": 0.5}]  # a bad last step
    assert curve_change(records) == ("40 steps; reward 0.50 -> 0.82, accuracy 40% -> 82% "
                                     "(means of the first and last 5 steps)")
