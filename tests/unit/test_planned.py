"""PlannedTurnsEngine's turn plans (pure: no engine runs): the zoom plan and its grammars, and `think_lengths`, the
long tail of turn lengths that scheduling benchmarks need, sampled without a grammar."""

from __future__ import annotations

import re

import pytest

from vigorl_core.rollout.chat_tokens import ChatTokens
from vigorl_core.rollout.engine import Generation, Sampling
from vigorl_core.rollout.planned import PlannedTurnsEngine, digit_token_ids, letter_token_ids, think_tail


@pytest.fixture(scope="module")
def chat(tiny_model_dir):
    return ChatTokens.from_pretrained(tiny_model_dir)


def _prompt(chat, question: str, turns: int) -> list[int]:
    """A conversation's next prompt after `turns` assistant turns (each ends in a zoom and its observation)."""
    text = chat.chat_prompt_text([{"role": "user", "content": question}])
    for _ in range(turns):
        text += "<think> x (1, 2). </think><|im_end|>\n<|im_start|>user\nobservation<|im_end|>\n<|im_start|>assistant\n"
    return chat.encode(text)


def test_think_lengths_give_each_turn_one_length(chat):
    lengths = (16, 64, 256, 1024)
    engine = PlannedTurnsEngine(None, chat.tokenizer, min_zooms=4, max_zooms=4, think_lengths=lengths)
    chosen = []
    for question in [f"where is object {i}?" for i in range(12)]:
        for turn in range(5):
            zoom, length = engine.think_plan(_prompt(chat, question, turn))
            assert (zoom, length) == engine.think_plan(_prompt(chat, question, turn))  # the same plan in every arm
            assert zoom == (turn < 4)  # 4 zooms, then the answer
            chosen.append(length)
    assert set(chosen) == set(lengths)  # the tail is there: short and long turns in one batch


def test_free_thoughts_are_letters_and_the_tail_grammar_closes_the_turn(chat):
    letters = letter_token_ids(chat.tokenizer)
    decoded = [chat.tokenizer.decode([i]) for i in letters]
    assert len(letters) > 100 and all(re.fullmatch("[a-z ]+", text) for text in decoded)
    assert " the" in decoded and chat.tokenizer.convert_tokens_to_ids("<|im_end|>") not in letters
    zoom = ' (12, 3). </think>\n<tool_call>\n{"name": "search_coordinate", "arguments": {"coordinate": [40, 7]}}\n' \
           '</tool_call>'
    assert re.fullmatch(think_tail(True), zoom) and not re.fullmatch(think_tail(False), zoom)
    assert re.fullmatch(think_tail(False), " (0, 99). </think>\n<answer> red </answer>")


class _Recorder:
    """Records generate calls and answers each with `max_tokens` ids (pure logic: how a turn is put together)."""

    version = 3

    def __init__(self):
        self.calls = []

    async def generate(self, prompt_ids, images, sampling, request_id=None):
        self.calls.append((list(prompt_ids), sampling))
        ids = [7] * min(sampling.max_tokens, 5 if sampling.regex else sampling.max_tokens)
        return [Generation(ids, "x" * len(ids), [-0.5] * len(ids), "stop", policy_version=self.version)]


def test_a_free_thought_turn_is_two_calls_joined_as_one_generation(chat):
    import asyncio

    recorder = _Recorder()
    engine = PlannedTurnsEngine(recorder, chat.tokenizer, min_zooms=1, max_zooms=1, think_lengths=(20,))
    prompt = _prompt(chat, "where?", 0)
    [gen] = asyncio.run(engine.generate(prompt, [], Sampling(max_tokens=200, seed=5)))
    (think_prompt, think), (tail_prompt, tail) = recorder.calls
    opening = chat.tokenizer.encode("<think> ", add_special_tokens=False)
    assert think_prompt == prompt + opening and think.regex is None and think.allowed_token_ids == engine.letters
    assert think.max_tokens == 20 and not think.stop_token_ids  # exactly its length: no stop among the letters
    assert tail_prompt == think_prompt + [7] * 20 and tail.regex == think_tail(True)
    assert tail.max_tokens == 200 - len(opening) - 20 and tail.stop_token_ids == (engine.eos_id,)
    assert gen.token_ids == opening + [7] * 25 and gen.text == "<think> " + "x" * 25
    assert gen.logprobs == [0.0] * len(opening) + [-0.5] * 25 and gen.policy_version == 3
    recorder.calls.clear()
    assert len(asyncio.run(engine.generate(prompt, [], Sampling(n=3, max_tokens=200, seed=5)))) == 3
    assert [s.seed for _, s in recorder.calls[::2]] == [5, 6, 7]  # a group's samples differ


def test_a_grammar_free_tail_samples_the_point_digits_and_forces_the_rest(chat):
    import asyncio

    class Digits(_Recorder):
        async def generate(self, prompt_ids, images, sampling, request_id=None):
            self.calls.append((list(prompt_ids), sampling))
            n = sampling.max_tokens
            text = "904017"[:n] if sampling.allowed_token_ids == digits else "x" * n
            return [Generation([7] * n, text, [-0.5] * n, "length", policy_version=self.version)]

    digits = digit_token_ids(chat.tokenizer)
    assert sorted(chat.tokenizer.decode([i]) for i in digits) == list("0123456789")
    recorder = Digits()
    for zoom, end in ((1, '[904, 17]}}\n</tool_call><|im_end|>'), (0, "<answer> jaeabh </answer><|im_end|>")):
        recorder.calls.clear()
        engine = PlannedTurnsEngine(recorder, chat.tokenizer, min_zooms=zoom, max_zooms=zoom, think_lengths=(20,),
                                    grammar_tail=False)
        [gen] = asyncio.run(engine.generate(_prompt(chat, "where?", 0), [], Sampling(max_tokens=200)))
        (_, think), (_, tail) = recorder.calls
        assert think.allowed_token_ids == engine.letters and tail.regex is None and think.regex is None
        assert tail.allowed_token_ids == digits and tail.max_tokens == 6 and not tail.stop_token_ids
        assert gen.text.startswith("<think> " + "x" * 20 + " (904, 17). </think>\n") and gen.text.endswith(end)
        assert re.fullmatch(think_tail(bool(zoom)), gen.text[len("<think> ") + 20:-len("<|im_end|>")])
        forced = len(gen.token_ids) - len(engine.think_open) - 20
        assert chat.tokenizer.decode(gen.token_ids[-forced:]) == gen.text[len("<think> ") + 20:]
        assert gen.token_ids[-1] == engine.eos_id
        assert gen.logprobs == [0.0] * len(engine.think_open) + [-0.5] * 20 + [0.0] * forced
        assert gen.finish_reason == "stop" and gen.policy_version == 3


def test_without_think_lengths_the_think_block_is_bounded_not_exact(chat):
    engine = PlannedTurnsEngine(None, chat.tokenizer, max_think_chars=48)
    regex = engine.regex_for(_prompt(chat, "where?", 0)).split(" \\(")[0]
    assert re.fullmatch(regex, "<think> " + "a" * 8) and re.fullmatch(regex, "<think> " + "a" * 48)
    assert not re.fullmatch(regex, "<think> " + "a" * 49)
    with pytest.raises(ValueError, match="think_lengths"):
        PlannedTurnsEngine(None, chat.tokenizer, think_lengths=(0,))


def test_planned_zooms_come_from_the_environment_only(monkeypatch):
    from vigorl_core.config import ConfigError
    from vigorl_core.rollout.planned import requested_planned_zooms

    monkeypatch.delenv("VIGORL_PLANNED_ZOOMS", raising=False)
    assert requested_planned_zooms() is None
    monkeypatch.setenv("VIGORL_PLANNED_ZOOMS", "2")
    assert requested_planned_zooms() == 2
    monkeypatch.setenv("VIGORL_PLANNED_ZOOMS", "two")
    with pytest.raises(ConfigError, match="VIGORL_PLANNED_ZOOMS='two': give a number of zooms"):
        requested_planned_zooms()
