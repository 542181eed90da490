"""vigorl_core.rewards: the original rules with the fixes listed in docs/rewards.md."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vigorl_core import rewards as R
from vigorl_core.prompts import observation_text
from vigorl_core.protocol import FORCED_FINAL_PREFIX, render_single_turn, render_turn

BOX = (100.0, 200.0, 300.0, 400.0)


def single(answer: str, think: str = "The cup is at (150, 250).") -> str:
    return f"<think>{think}</think>\n<answer>{answer}</answer>"


@pytest.mark.parametrize("text, ok", [
    ("<think>a</think><answer>b</answer>", True),
    ("<think>a\nb</think>\n\n<answer>c\nd</answer>", True),
    ("<think>a</think><answer>b</answer><|im_end|>", True),  # a kept EOS token is ignored
    (" <think>a</think><answer>b</answer>", False),  # fullmatch: nothing before
    ("<think>a</think><answer>b</answer> extra", False),
    ("<think>a</think>text<answer>b</answer>", False),
    ("<answer>b</answer>", False),
    ("<think>a</think><think>b</think><answer>c</answer>", True),  # .*? may span: the original regex too
])
def test_tags_fullmatch(text, ok):
    assert R.tags_ok(text) is ok


@pytest.mark.parametrize("text, g", [
    ("<think>at (1, 2)</think><answer>x</answer>", 1.0),
    ("<think>at (1,2)</think><answer>x</answer>", 1.0),
    ("<think>none here</think><think>(1, 2)</think><answer>x</answer>", 0.0),  # only the FIRST think
    ("<think>float (1.5, 2)</think><answer>x</answer>", 0.0),
    ("<answer>(1, 2)</answer>", 0.0),
])
def test_grounded_needs_point_in_first_think(text, g):
    assert R.grounded(text) == g


@pytest.mark.parametrize("answer, acc", [
    ("(100, 200)", 1.0), ("(300, 400)", 1.0), ("(200, 300)", 1.0),  # edges inclusive
    ("(99, 300)", 0.0), ("(200, 401)", 0.0),
    ("(150.0, 250)", 0.0), ("[150, 250]", 0.0), ("", 0.0),
    ("150, 250", 1.0),  # literal_eval makes a tuple, as in the original; the format reward refuses it
])
def test_point_in_bbox_accuracy(answer, acc):
    assert R.point_in_bbox(single(answer), R.Truth("ignored", box=BOX)).accuracy == acc


@pytest.mark.parametrize("text, fmt", [
    (single("(150, 250)"), 1.0),
    (single(" (150, 250) "), 1.0),
    (single("(150.5, 250)"), 0.0),  # floats rejected
    (single("150, 250"), 0.0),  # must start "(" and end ")"
    ("<think>x</think><answer>(150, 250)</answer>trailing", 0.0),
])
def test_point_in_bbox_format(text, fmt):
    assert R.point_in_bbox(text, R.Truth("", box=BOX)).format == fmt


def test_point_rewards_need_model_frame_box():
    with pytest.raises(ValueError, match="Truth.box"):
        R.point_in_bbox(single("(1, 2)"), R.Truth("(0, 0, 5, 5)"))


def test_point_in_bbox_grounded_and_weights():
    truth = R.Truth("", box=BOX)
    r = R.point_in_bbox_grounded(single("(150, 250)"), truth)
    assert (r.overall, r.format, r.accuracy, r.details["grounded"]) == (1.0, 1.0, 1.0, 1.0)
    r = R.point_in_bbox_grounded(single("(150, 250)", think="no points"), truth)
    assert (r.overall, r.format, r.accuracy) == (0.5, 0.0, 1.0)
    r = R.point_in_bbox(single("(150, 250)", think="no points"), truth)
    assert (r.overall, r.format) == (1.0, 1.0)  # vanilla has no grounding requirement
    r = R.point_in_bbox_grounded(single("(0, 0)"), truth)
    assert (r.overall, r.format, r.accuracy) == (0.5, 1.0, 0.0)


@pytest.mark.parametrize("answer, gt, acc", [
    ("right", "right", 1.0),
    ("Right", "right", 1.0),
    ("right", "Right", 1.0),  # bug fix: the original never lower-cased the GT
    ("A. right", "right", 1.0),  # leading option letter stripped
    ("b) The Red Cup", "the red cup", 1.0),
    ("right.", "right", 1.0),  # punctuation ignored
    ("to the left", "to the left", 1.0),
    ("right or left", "right", 0.0),  # no substring credit
    ("left, right", "right", 0.0),
    ("", "right", 0.0),
    ("A", "right", 0.0),
])
def test_string_match_strict(answer, gt, acc):
    truth = R.Truth(gt)
    assert R.string_match(single(answer), truth).accuracy == acc
    assert R.JUDGES["string_match"](answer, truth) == acc


@pytest.mark.parametrize("answer, gt, score", [
    ("right or left", "right", 1.0),  # substring credit in the original judge only
    ("Right!", "right", 1.0),
    ("left", "right", 0.0),
    (None, "right", 0.0),
])
def test_string_match_original_judge(answer, gt, score):
    assert R.JUDGES["string_match_original"](answer, R.Truth(gt)) == score


def test_string_match_format_and_grounding():
    truth = R.Truth("right")
    r = R.string_match(single("right", think="no points"), truth)
    assert (r.overall, r.format, r.accuracy) == (1.0, 1.0, 1.0)
    r = R.string_match_grounded(single("right", think="no points"), truth)
    assert (r.overall, r.format, r.accuracy) == (0.5, 0.0, 1.0)
    assert R.string_match(single("  "), truth).format == 0.0  # empty answer
    r = R.string_match_grounded(render_single_turn(["Look at (5, 6)."], "Right"), truth)
    assert (r.overall, r.format, r.accuracy) == (1.0, 1.0, 1.0)


def conversation(points, answer: str, *, dot: bool = False) -> str:
    """A multi-turn conversation string as the reward sees it: assistant turns and observation turns."""
    parts = []
    for x, y in points:
        parts.append(render_turn(f"look at ({x}, {y})", tool_call=(x, y)) + "<|im_end|>")
        parts.append("user\n" + observation_text(dot) + "<|image_pad|>\n</observation><|im_end|>\nassistant\n")
    parts.append(render_turn("done", answer=answer) + "<|im_end|>")
    return "".join(parts)


@pytest.mark.parametrize("points, fmt", [
    ([], 1.0),
    ([(10, 10)], 1.0),
    ([(10, 10), (15, 15)], 1.0),  # 7.07 px apart: not distinct
    ([(10, 10), (20, 10)], 1.2),  # exactly 10 px counts
    ([(10, 10), (100, 100), (10, 12), (300, 300)], 1.4),  # 3 distinct -> 1 + 0.2 * 2
    ([(0, 0), (100, 0), (200, 0), (300, 0)], 1.6),
])
def test_multiturn_diversity_bonus(points, fmt):
    r = R.point_in_bbox_multicrop(conversation(points, "(150, 250)"), R.Truth("", box=BOX))
    assert r.format == pytest.approx(fmt)
    assert r.accuracy == 1.0
    assert r.overall == pytest.approx(0.6 * 1.0 + 0.4 * fmt)


def test_diversity_counts_executed_zoom_points():
    """Raw tool-call points beyond a small image are clamped to one corner by the driver: one crop, no bonus.
    Without `zoom_points` (plain text, e.g. /v1/score) the text's points are counted."""
    text = conversation([(500, 500), (900, 900), (1300, 1300)], "(150, 250)")
    truth = R.Truth("", box=BOX)
    r = R.point_in_bbox_multicrop(text, truth, zoom_points=[(223, 223)] * 3)
    assert (r.format, r.details["unique_points"]) == (1.0, 1)
    r = R.string_match_multiturn(conversation([(500, 500), (900, 900)], "red"), R.Truth("red"),
                                 zoom_points=[(223, 223), (223, 223)])
    assert (r.format, r.details["unique_points"]) == (1.0, 1)
    assert R.point_in_bbox_multicrop(text, truth).details["unique_points"] == 3
    # The grammar and JSON checks still read the text: a broken tool call zeroes the format whatever ran.
    broken = text.replace('"coordinate": [900, 900]', '"coordinate": [900]')
    assert R.point_in_bbox_multicrop(broken, truth, zoom_points=[(10, 10), (100, 100)]).format == 0.0


@pytest.mark.parametrize("key", sorted(R.REWARDS), ids="/".join)
def test_every_reward_accepts_zoom_points(key):
    """Callers pass the executed zoom points to whatever reward the task and mode select."""
    truth, text = R.Truth("right", box=BOX), single("right")
    r = R.REWARDS[key](text, truth, zoom_points=[(1, 2)])
    if key[1] != "multiturn":  # single-turn rewards ignore them
        assert r == R.REWARDS[key](text, truth)


POINT_TRUTH = R.Truth("", point=(150.0, 250.0))


@pytest.mark.parametrize("mode", ["vanilla", "grounded", "multiturn"])
@pytest.mark.parametrize("answer, acc", [("(150, 250)", 1.0), ("(180, 270)", 1.0), ("(200, 250)", 0.0),
                                         ("(300, 300)", 0.0), ("left", 0.0)])
def test_grounding_rewards_score_a_point_only_truth_with_point_match(mode, answer, acc):
    """A truth with a point and no box (point-only grounding data) is judged as evaluation does: within
    POINT_MATCH_THRESHOLD px (the original --judge point_match)."""
    text = conversation([(150, 250)], answer) if mode == "multiturn" else single(answer)
    assert R.reward_for("grounding", mode)(text, POINT_TRUTH).accuracy == acc


@pytest.mark.parametrize("mode", ["vanilla", "grounded", "multiturn"])
def test_grounding_rewards_without_box_or_point_name_the_missing_fields(mode):
    with pytest.raises(ValueError, match=r"Truth.box.*Sample.bbox.*Truth.point.*Sample.point"):
        R.reward_for("grounding", mode)(single("(1, 2)"), R.Truth("(0, 0, 5, 5)"))


TC = '<tool_call>\n{"name": "search_coordinate", "arguments": {"coordinate": [1, 2]}}\n</tool_call>'
OBS = "<observation>\nimg\n</observation>"


@pytest.mark.parametrize("text, ok", [
    ("<think>a</think><answer>(1, 2)</answer>", True),
    (f"<think>a</think>{TC}{OBS}<think>b</think><answer>(1, 2)</answer>", True),
    (f"<think>a</think>{TC}{OBS}<think>b</think><answer>(1, 2)</answer><|im_end|>\n", True),
    (f"<think>a</think>{TC}{OBS}{FORCED_FINAL_PREFIX} (1, 2) </answer>", True),
    ("<THINK>a</THINK><answer>(1, 2)</answer>", True),  # tags are case-insensitive in the automaton
    (f"<think>a</think>{TC}<think>b</think><answer>(1, 2)</answer>", False),  # observation missing
    (f"<think>a</think>{TC}{OBS}<answer>(1, 2)</answer>", False),  # think missing after observation
    (f"{TC}{OBS}<think>b</think><answer>(1, 2)</answer>", False),  # must start with think
    ("<think>a</think><answer>(1, 2)</answer><think>c</think>", False),  # tags after answer
    ("<think>a</think><answer>(1, 2)</answer> trailing", False),
    ("<think>a</think><think>b</think><answer>(1, 2)</answer>", False),
    ("<think>a</think>", False),
])
def test_multiturn_grammar(text, ok):
    assert R.tag_grammar_ok(text) is ok
    assert (R.point_in_bbox_multicrop(text, R.Truth("", box=(0, 0, 5, 5))).format > 0) is ok


@pytest.mark.parametrize("tool_body", [
    '{"name": "search_coordinate", "arguments": {"coordinate": [1.5, 2]}}',  # floats rejected
    '{"name": "search_coordinate", "arguments": {"coordinate": [1, 2, 3]}}',
    '{"name": "search_coordinate", "arguments": {}}',
    "not json",
])
def test_multiturn_bad_tool_call_zeroes_format(tool_body):
    text = f"<think>a</think><tool_call>{tool_body}</tool_call>{OBS}<think>b</think><answer>(1, 2)</answer>"
    assert R.point_in_bbox_multicrop(text, R.Truth("", box=(0, 0, 5, 5))).format == 0.0


@pytest.mark.parametrize("answer, fmt, acc", [
    ("(150, 250)", 1.0, 1.0), ("(150.0, 250)", 0.0, 0.0), ("left", 0.0, 0.0),
])
def test_multicrop_answer_must_be_int_point(answer, fmt, acc):
    r = R.point_in_bbox_multicrop(conversation([], answer), R.Truth("", box=BOX))
    assert (r.format, r.accuracy) == (fmt, acc)


@pytest.mark.parametrize("answer, gt, fmt, acc", [
    ("The Red Cup", "the red cup", 1.2, 1.0),
    ("A. red", "Red", 1.2, 1.0),
    ("red or blue", "red", 1.2, 0.0),
    ("", "red", 0.0, 0.0),  # answer must be non-empty
])
def test_string_match_multiturn(answer, gt, fmt, acc):
    r = R.string_match_multiturn(conversation([(10, 10), (500, 500)], answer), R.Truth(gt))
    assert (r.format, r.accuracy) == (pytest.approx(fmt), acc)
    assert r.overall == pytest.approx(0.6 * acc + 0.4 * fmt)
    assert r.details["unique_points"] == (2 if fmt else 0)


@pytest.mark.parametrize("pred, gt, acc", [
    ("go_back", "go_back", 1.0), ("go_back", "click [3]", 0.0),
    ("stop [42]", "stop [N/A]", 1.0), ("stop", "scroll [down]", 0.0),
    ("scroll [down]", "scroll [down]", 1.0), ("scroll [up]", "scroll [down]", 0.0), ("scroll [up]", "scroll [up]", 1.0),
    ("click [12]", "click [12]", 1.0), ("click [12]", "click [13]", 0.5), ("click [12]", "type [12] [hi]", 0.5),
    ("click", "click [12]", 0.0),
    ("type [5] [hello]", "type [5] [bye]", 1.0),  # typed text ignored, as the original
    ("type [5] [hello]", "type [6] [hello]", 0.5),
    ("hover [1]", "click [1]", 0.0),
])
def test_web_action_accuracy(pred, gt, acc):
    r = R.web_action(single(pred), R.Truth(gt))
    assert r.accuracy == acc and r.format == 1.0
    assert r.overall == pytest.approx(0.5 * acc + 0.5)
    assert R.JUDGES["web_action"](pred, R.Truth(gt)) == float(acc == 1.0)


def test_web_action_grounded_multiplies_format():
    r = R.web_action_grounded(single("click [1]", think="no point"), R.Truth("click [1]"))
    assert (r.format, r.overall) == (0.0, 0.5)


@pytest.mark.parametrize("pred, gt, score", [
    ("click [12]", "click [12]", 1.0), ("Click [12]", "click [12]", 1.0), ("click [12] now", "click [12]", 0.0),
    ("type [5] [hi]", "type [5] [hi]", 1.0), ("type [5] [hi there]", "type [5] [hi there]", 0.0),
    ("scroll [up]", "scroll [down]", 1.0),  # original: action type only
])
def test_web_action_original_judge(pred, gt, score):
    assert R.JUDGES["web_action_original"](pred, R.Truth(gt)) == score


@pytest.mark.parametrize("pred, score", [("(10, 10)", 1.0), ("(49, 10)", 1.0), ("(60, 10)", 0.0), ("(10.0, 10)", 0.0)])
def test_point_match_judge(pred, score):
    assert R.JUDGES["point_match"](pred, R.Truth("", point=(10.0, 10.0))) == score


def test_point_in_bbox_judge():
    assert R.JUDGES["point_in_bbox"]("(100, 400)", R.Truth("", box=BOX)) == 1.0
    assert R.JUDGES["point_in_bbox"](None, R.Truth("", box=BOX)) == 0.0


def test_registry_mapping_and_errors():
    assert R.reward_for("spatial", "grounded") is R.string_match_grounded
    assert R.reward_for("visual_search", "vanilla") is R.string_match
    assert R.reward_for("visual_search", "multiturn") is R.string_match_multiturn
    assert R.reward_for("grounding", "multiturn") is R.point_in_bbox_multicrop
    assert R.reward_for("web_action", "grounded") is R.web_action_grounded
    with pytest.raises(ValueError, match="web_action/vanilla"):
        R.reward_for("web_action", "multiturn")
    with pytest.raises(ValueError, match="spatial"):
        R.judge_for("math")
    assert R.judge_for("spatial") == ("string_match", "string_match_original")
    for task in ("spatial", "visual_search", "grounding", "web_action"):
        assert all(name in R.JUDGES for name in R.judge_for(task))


@settings(max_examples=200, deadline=None)
@given(st.text(), st.sampled_from(sorted(R.REWARDS)))
def test_rewards_never_raise_on_any_text(text, key):
    r = R.REWARDS[key](text, R.Truth("right", box=BOX))
    assert 0.0 <= r.overall <= 2.0 and math.isfinite(r.overall)


@pytest.mark.parametrize("scores, mean, low, high", [
    ([1, 0, 1, 1], 0.75, 0.3006, 0.9544),  # Wilson 3/4: the textbook [30.1%, 95.4%]
    ([0] * 10, 0.0, 0.0, 0.2775),  # p = 0 keeps a width (Wald: 0 +- 0)
    ([1] * 10, 1.0, 0.7225, 1.0),
    ([1], 1.0, 0.2065, 1.0),  # n = 1: 1 / (1 + z^2)
    ([0.5], 0.5, 0.5, 0.5),
    ([0.5, 1.5], 1.0, 1.0 - 1.96 * math.sqrt(0.5 / 2), 1.0 + 1.96 * math.sqrt(0.5 / 2)),  # not 0/1: normal
])
def test_ci95_is_wilson_for_rates(scores, mean, low, high):
    m, lo, hi = R.ci95(scores)
    assert (m, lo, hi) == pytest.approx((mean, low, high), abs=1e-3)


def test_ci95_wilson_at_large_n_matches_the_papers_wald():
    # 0.5 accuracy on 4,000 SAT-2 questions -> +/- 1.55 points either way, as the paper's Wald interval
    m, lo, hi = R.ci95([1, 0] * 2000)
    assert (m - lo) * 100 == pytest.approx(1.5495, abs=1e-3) and (hi - m) * 100 == pytest.approx(1.5495, abs=1e-3)
    with pytest.raises(ValueError):
        R.ci95([])


def test_truth_in_model_frame_maps_box_and_point_of_a_sample():
    from vigorl_core.frames import FrameMap
    from vigorl_core.records import Sample

    frame = FrameMap((400, 300), (200, 150))  # the model sees the image at half size
    sample = Sample(id="s", source="synthetic", task="grounding", question="q", images=["a.png"],
                    answer="(40, 30, 80, 60)",
                    bbox=(40, 30, 80, 60), point=(100, 50))
    truth = R.Truth.in_model_frame(sample, frame)
    assert truth == R.Truth(answer="(40, 30, 80, 60)", box=(20, 15, 40, 30), point=(50, 25))
    plain = R.Truth.in_model_frame(sample.model_copy(update={"bbox": None, "point": None}), frame)
    assert plain.box is None and plain.point is None
