"""vigorl_core.protocol: parsing never raises, errors are reported, rendering round-trips."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vigorl_core import protocol as P
from vigorl_core.records import Trace

FRAGMENTS = ["<think>", "</think>", "<answer>", "</answer>", "<tool_call>", "</tool_call>", "{", "}", "(", ")",
             "[", "]", ",", " ", "\n", ".", "-", "0", "7", "42", "3.5", '"name"', '"coordinate"', ":",
             '"search_coordinate"', '"arguments"', "<|im_end|>", "x"]


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_parse_never_raises_on_any_text(text):
    assert isinstance(P.parse_response(text), Trace)


@settings(max_examples=500, deadline=None)
@given(st.lists(st.sampled_from(FRAGMENTS), max_size=40).map("".join))
def test_parse_never_raises_on_tag_soup(text):
    trace = P.parse_response(text, turn=3)
    assert all(s.turn == 3 for s in trace.steps)
    for call in trace.tool_calls:
        assert (call.coordinate is None) == (call.error is not None)
    trace.model_dump_json()  # records stay serialisable


@settings(max_examples=200, deadline=None)
@given(st.lists(st.lists(st.sampled_from(FRAGMENTS), max_size=20).map("".join), max_size=4))
def test_parse_conversation_never_raises(turns):
    assert isinstance(P.parse_conversation(turns), Trace)


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_strict_helpers_never_raise(text):
    P.find_answer(text, dotall=True)
    P.parse_int_pair(text)
    P.parse_int_box(text)


def test_single_turn_steps_points_answer():
    text = ("<think>\nThe spoon is at (70, 650). The bowl sits at ( 12 , 34 )!\nNext line (1.5, -2)\n</think>\n"
            "<answer> left </answer><|im_end|>")
    t = P.parse_response(text)
    assert [s.text for s in t.steps] == ["The spoon is at (70, 650).", "The bowl sits at ( 12 , 34 )!",
                                         "Next line (1.5, -2)"]
    assert [(p.x, p.y, p.frame) for p in t.points] == [(70, 650, "model"), (12, 34, "model"), (1.5, -2, "model")]
    assert t.answer == "left"
    assert t.errors == []


def test_decimal_inside_sentence_does_not_split():
    t = P.parse_response("<think>Value 3.5 is at (1, 2). Done.</think>")
    assert [s.text for s in t.steps] == ["Value 3.5 is at (1, 2).", "Done."]


@pytest.mark.parametrize("text, answer, error", [
    ("<think>a</think><answer> x </answer>", "x", None),
    ("<think>a</think><answer> x", "x", "unclosed <answer>"),
    ("<think>a (1, 2)", None, "unclosed <think>"),
    ("<answer>a</answer><answer>b</answer>", "b", "2 <answer> blocks; kept the last"),
    ("hello <answer>a</answer>", "a", "text outside tags: 'hello'"),
    ("</think><answer>a</answer>", "a", "stray </think>"),
    ("<think> x <answer>y</answer> </think>", None, "tag <answer> inside <think>"),
])
def test_malformed_parts_are_reported(text, answer, error):
    t = P.parse_response(text)
    assert t.answer == answer
    if error is None:
        assert t.errors == []
    else:
        assert error in t.errors


def test_unclosed_think_counts_to_end():
    t = P.parse_response("<think>first (1, 2). second (3, 4)")
    assert [(p.x, p.y) for p in t.points] == [(1, 2), (3, 4)]


@pytest.mark.parametrize("body, coord, error", [
    ('{"name": "search_coordinate", "arguments": {"coordinate": [10, 20]}}', (10, 20), None),
    ('\n{"name": "search_coordinate", "arguments": {"coordinate": [10.4, 19.6]}}\n', (10, 20), None),
    ('{"name": "search_coordinate", "arguments": {"coordinate": [10, -1]}}', None, "negative coordinate"),
    ('{"name": "search_coordinate", "arguments": {"coordinate": [10]}}', None, "not a list of 2 numbers"),
    ('{"name": "search_coordinate", "arguments": {"coordinate": ["1", 2]}}', None, "not a list of 2 numbers"),
    ('{"name": "search_coordinate", "arguments": {"coordinate": [true, 2]}}', None, "not a list of 2 numbers"),
    ('{"name": "search_coordinate", "arguments": {}}', None, "no arguments.coordinate"),
    ('{"arguments": {"coordinate": [1, 2]}}', None, "no name"),
    ('{"name": "crop", "arguments": {"coordinate": [1, 2]}}', None, "unknown tool"),
    ('{"name": "search_coordinate", ', None, "not valid JSON"),
    ("[1, 2]", None, "not an object"),
])
def test_tool_call_parsing(body, coord, error):
    t = P.parse_response(f"<think>t</think>\n<tool_call>{body}</tool_call>", turn=2)
    (call,) = t.tool_calls
    assert call.coordinate == coord
    assert call.turn == 2 and call.raw == body
    if error is None:
        assert call.error is None
    else:
        assert error in call.error


def test_unclosed_tool_call_is_not_executable():
    t = P.parse_response('<think>t</think><tool_call>{"name": "search_coordinate", '
                         '"arguments": {"coordinate": [1, 2]}}')
    (call,) = t.tool_calls
    assert call.coordinate is None and call.error == "unclosed <tool_call>"


def test_parse_conversation_merges_turns():
    turns = [P.render_turn("look (5, 6).", tool_call=(5, 6)),
             P.render_turn("closer (7, 8).", tool_call=(7, 8)) + "<|im_end|>",
             P.FORCED_FINAL_PREFIX + " (7, 8) </answer>"]
    t = P.parse_conversation(turns)
    assert [c.coordinate for c in t.tool_calls] == [(5, 6), (7, 8)]
    assert [c.turn for c in t.tool_calls] == [0, 1]
    assert [s.turn for s in t.steps] == [0, 1, 2]
    assert t.answer == "(7, 8)"
    assert t.errors == []


def test_parse_conversation_prefixes_errors_with_turn():
    t = P.parse_conversation(["<answer>a</answer>", "junk"])
    assert t.answer == "a"
    assert t.errors == ["turn 1: text outside tags: 'junk'"]


def test_render_exact_strings():
    assert P.format_point(3, 4) == "(3, 4)"
    assert P.format_point(3.6, 4.2) == "(4, 4)"
    assert P.render_tool_call(12, 34) == (
        '<tool_call>\n{"name": "search_coordinate", "arguments": {"coordinate": [12, 34]}}\n</tool_call>')
    assert P.render_single_turn(["a (1, 2).", "b (3, 4)."], "left") == (
        "<think>\na (1, 2). b (3, 4).\n</think>\n<answer> left </answer>")
    assert P.render_turn("t", answer="x") == "<think> t </think>\n<answer> x </answer>"
    assert P.render_turn("t", tool_call=(1, 2)) == "<think> t </think>\n" + P.render_tool_call(1, 2)
    with pytest.raises(ValueError, match="exactly one"):
        P.render_turn("t")
    with pytest.raises(ValueError, match="exactly one"):
        P.render_turn("t", tool_call=(1, 2), answer="x")


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 5000), st.integers(0, 5000)), min_size=1, max_size=6),
       st.sampled_from(["left", "(10, 20)", "click [12]", "a red cup"]))
def test_single_turn_round_trip(points, answer):
    steps = [f"Step {i} looks at {P.format_point(x, y)}." for i, (x, y) in enumerate(points)]
    t = P.parse_response(P.render_single_turn(steps, answer))
    assert [(p.x, p.y) for p in t.points] == points
    assert [s.text for s in t.steps] == steps
    assert t.answer == answer and t.errors == []


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 5000), st.integers(0, 5000)), max_size=4), st.text(min_size=1).filter(
    lambda s: "<" not in s and ">" not in s and s.strip() == s))
def test_multiturn_round_trip(calls, answer):
    turns = [P.render_turn(f"zoom {P.format_point(x, y)}", tool_call=(x, y)) for x, y in calls]
    turns.append(P.render_turn("done", answer=answer))
    t = P.parse_conversation(turns)
    assert [c.coordinate for c in t.tool_calls] == calls
    assert [(p.x, p.y) for p in t.points] == calls
    assert t.answer == answer and t.errors == []


@pytest.mark.parametrize("text, dotall, expected", [
    ("<answer> a </answer><answer>b</answer>", False, "a"),
    ("<answer>\na\n</answer>", False, None),
    ("<answer>\na\n</answer>", True, "a"),
    ("no answer", True, None),
])
def test_find_answer(text, dotall, expected):
    assert P.find_answer(text, dotall) == expected


@pytest.mark.parametrize("s, expected", [
    ("(1, 2)", (1, 2)), (" (1,2) ", (1, 2)), ("(1.0, 2)", None), ("(1, 2, 3)", None), ("[1, 2]", None),
    ("(True, 2)", None), ("(a, b)", None), ("", None), ("(1, 2", None),
])
def test_parse_int_pair(s, expected):
    assert P.parse_int_pair(s) == expected


@pytest.mark.parametrize("s, expected", [
    ("(1, 2, 3, 4)", (1, 2, 3, 4)), ("[1, 2, 3, 4]", (1, 2, 3, 4)), ("(1, 2, 3.5, 4)", None), ("(1, 2)", None),
])
def test_parse_int_box(s, expected):
    assert P.parse_int_box(s) == expected
