"""PlannedTurnsEngine's grammar choice (pure: no engine runs): the zoom plan, and `think_lengths`, the long tail
of turn lengths that scheduling benchmarks need."""

from __future__ import annotations

import re

import pytest

from vigorl_core.rollout.chat_tokens import ChatTokens
from vigorl_core.rollout.planned import PlannedTurnsEngine


@pytest.fixture(scope="module")
def chat(tiny_model_dir):
    return ChatTokens.from_pretrained(tiny_model_dir)


def _prompt(chat, question: str, turns: int) -> list[int]:
    """A conversation's next prompt after `turns` assistant turns (each ends in a zoom and its observation)."""
    text = chat.chat_prompt_text([{"role": "user", "content": question}])
    for _ in range(turns):
        text += "<think> x (1, 2). </think><|im_end|>\n<|im_start|>user\nobservation<|im_end|>\n<|im_start|>assistant\n"
    return chat.encode(text)


def test_think_lengths_give_each_turn_one_exact_length(chat):
    lengths = (16, 64, 256, 1024)
    engine = PlannedTurnsEngine(None, chat.tokenizer, min_zooms=4, max_zooms=4, think_lengths=lengths)
    chosen = []
    for question in [f"where is object {i}?" for i in range(12)]:
        for turn in range(5):
            regex = engine.regex_for(_prompt(chat, question, turn))
            assert regex == engine.regex_for(_prompt(chat, question, turn))  # the same plan in every arm
            [length] = [n for n in lengths if re.fullmatch(regex.split(" \\(")[0], "<think> " + "a" * n)]
            assert ("search_coordinate" in regex) == (turn < 4)  # 4 zooms, then the answer
            chosen.append(length)
    assert set(chosen) == set(lengths)  # the tail is there: short and long turns in one batch


def test_without_think_lengths_the_think_block_is_bounded_not_exact(chat):
    engine = PlannedTurnsEngine(None, chat.tokenizer, max_think_chars=48)
    regex = engine.regex_for(_prompt(chat, "where?", 0)).split(" \\(")[0]
    assert re.fullmatch(regex, "<think> " + "a" * 8) and re.fullmatch(regex, "<think> " + "a" * 48)
    assert not re.fullmatch(regex, "<think> " + "a" * 49)
    with pytest.raises(ValueError, match="think_lengths"):
        PlannedTurnsEngine(None, chat.tokenizer, think_lengths=(4,))
