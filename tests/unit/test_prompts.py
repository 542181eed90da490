"""vigorl_core.prompts: every task x mode prompt exists, uses real newlines and the protocol's formats."""

from __future__ import annotations

import pytest

from vigorl_core import prompts
from vigorl_core.protocol import render_tool_call
from vigorl_core.records import TASKS

ALL = [(t, m) for t in TASKS for m in prompts.MODES]


@pytest.mark.parametrize("task, mode", ALL)
def test_every_prompt_is_nonempty_with_real_newlines(task, mode):
    text = prompts.system_prompt(task, mode)
    assert text.strip() and "\n" in text
    assert "\\n" not in text and '\\"' not in text
    assert "<answer>" in text


@pytest.mark.parametrize("task", TASKS)
def test_multiturn_prompts_show_the_exact_tool_call(task):
    text = prompts.system_prompt(task, "multiturn")
    assert render_tool_call(120, 85) in text
    assert '<tool_call>\n{"name": "search_coordinate", "arguments": {"coordinate": [x, y]}}\n</tool_call>' in text


@pytest.mark.parametrize("task, expected", [
    ("spatial", "option"), ("visual_search", "option"), ("grounding", "<answer> (x, y) </answer>"),
    ("web_action", "click [12]"),
])
def test_answer_format_per_task(task, expected):
    for mode in prompts.MODES:
        assert expected in prompts.system_prompt(task, mode)


def test_visual_search_multiturn_asks_for_option_text():
    # The original trained V* multi-turn with the "(x, y)" grounding prompt but evaluated with the V* one.
    text = prompts.system_prompt("visual_search", "multiturn")
    assert "<answer> [option text] </answer>" in text and "<answer> (x, y) </answer>" not in text


def test_grounded_prompts_require_points_and_one_think():
    for task in TASKS:
        text = prompts.system_prompt(task, "grounded")
        assert "(x, y)" in text and "ONE <think>" in text
    assert "(x, y)" not in prompts.system_prompt("spatial", "vanilla")


def test_mcts_prompt_and_thought_suffix():
    base = prompts.system_prompt("spatial", "mcts")
    assert "exactly one point" in base and "Never repeat a coordinate" in base
    text = prompts.system_prompt("spatial", "mcts", min_thoughts=4)
    assert text == base + "\n- There should be at least 4 thoughts before providing the final answer."


@pytest.mark.parametrize("kwargs, match", [
    (dict(task="math", mode="grounded"), "spatial.*visual_search.*grounding.*web_action"),
    (dict(task="spatial", mode="cot"), "grounded.*multiturn.*vanilla.*answer_only.*mcts"),
    (dict(task="spatial", mode="grounded", min_thoughts=3), "only applies to mode 'mcts'"),
    (dict(task="spatial", mode="mcts", min_thoughts=0), "positive"),
])
def test_errors_name_valid_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        prompts.system_prompt(kwargs.pop("task"), kwargs.pop("mode"), **kwargs)


def test_user_text():
    assert prompts.user_text("  Which side? ", ["left", "right "]) == "Which side?\nOptions:\nA. left\nB. right"
    assert prompts.user_text("Click the OK button.") == "Click the OK button."
    with pytest.raises(ValueError, match="26"):
        prompts.user_text("q", [str(i) for i in range(27)])


def test_observation_text():
    assert prompts.observation_text(True) == (
        "<observation>\nHere is the crop of the image centered on the coordinate, "
        "with a red dot at the coordinate location:\n")
    assert prompts.observation_text(False) == (
        "<observation>\nHere is the crop of the image centered on the coordinate:\n")
    assert prompts.observation_text(False).startswith("<observation>\n" + prompts.OBSERVATION_TEXT)
