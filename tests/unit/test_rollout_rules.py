"""Rollout driver rules without an engine: a Conversation advanced by hand-made Generations on the tiny
model's tokenizer (finish reasons in every mode, the response budget, executed zoom points, point-only truths)."""

from __future__ import annotations

import pytest

from vigorl_core.rollout.chat_tokens import ChatTokens
from vigorl_core.rollout.engine import Generation
from vigorl_core.protocol import render_turn
from vigorl_core.rollout.driver import Conversation, RolloutConfig, RolloutDriver
from vigorl_core.synthetic.tasks import generate


@pytest.fixture(scope="module")
def chat(tiny_model_dir):
    return ChatTokens.from_pretrained(tiny_model_dir)


def _conversation(chat, task: str = "visual_search", sample_changes: dict | None = None, mode: str = "multiturn",
                  **config) -> Conversation:
    sample, image = generate(task, 1, seed=3)[0]
    sample = sample.model_copy(update=sample_changes or {})
    driver = RolloutDriver(None, chat, RolloutConfig(mode=mode, **config))
    [conv] = driver.conversations(driver.prepare(sample, [image]))
    return conv


def _gen(chat, text: str, *, eos: bool = False, finish: str = "stop") -> Generation:
    """What the engine returns for `text`: a tool-call turn ends at the `</tool_call>` stop token, an answer
    at the `</answer>` stop string; `eos` adds the `<|im_end|>` a model may emit itself."""
    ids = chat.encode(text) + ([chat.im_end_id] if eos else [])
    return Generation(ids, text + ("<|im_end|>" if eos else ""), [-1.0] * len(ids), finish)


def _zoom(chat, x: int, y: int) -> Generation:
    return _gen(chat, render_turn(f"look at ({x}, {y})", tool_call=(x, y)))


def _answer(chat, answer: str = "red") -> Generation:
    return _gen(chat, render_turn("done", answer=answer))


def _run(conv: Conversation, gens: list[Generation]) -> Conversation:
    for gen in gens:
        assert not conv.done, "the conversation ended before its scripted turns ran out"
        conv.advance(gen)
    assert conv.done
    return conv


def _response_tokens(conv: Conversation) -> int:
    rec = conv.to_rollout().record
    return len(rec.train_ids) - rec.prompt_len


def test_diversity_counts_the_executed_clamped_points(chat):
    """Three tool calls beyond the 224x224 model image all crop its corner: one distinct zoom, no bonus."""
    conv = _run(_conversation(chat, max_response_tokens=4096),
                [_zoom(chat, 500, 500), _zoom(chat, 900, 900), _zoom(chat, 1300, 1300), _answer(chat)])
    assert [c.point for c in conv.env.crops] == [(223, 223)] * 3
    rec = conv.to_rollout().record
    assert rec.finish == "answer"
    assert rec.reward_details["unique_points"] == 1 and rec.reward_details["format"] == 1.0


def test_point_only_truth_is_scored_by_point_match(chat):
    """A grounding sample with a point and no bbox: the rollout reward uses the point judge, not a crash."""
    conv = _conversation(chat, task="grounding", sample_changes={"bbox": None}, max_response_tokens=4096)
    assert conv.prepared.truth.box is None
    x, y = (round(v) for v in conv.prepared.truth.point)
    rec = _run(conv, [_answer(chat, f"({x}, {y})")]).to_rollout().record
    assert rec.reward_details["accuracy"] == 1.0


def _exact(chat, gen: Generation, **config) -> Conversation:
    """A conversation whose first turn is `gen` and whose budget is exactly that turn's length."""
    return _run(_conversation(chat, max_response_tokens=len(gen.token_ids), **config), [gen])


@pytest.mark.parametrize("case", ["answer", "no_tool_call", "max_turns", "tool_call_fills_budget"])
def test_a_turn_that_fills_the_budget_gets_no_eos_past_it(chat, case):
    """The driver's `<|im_end|>` after a turn that stopped on `</tool_call>` or `</answer>` is masked
    anyway; when the turn used the whole budget it is left out so the response never exceeds it."""
    gens = {"answer": _answer(chat), "no_tool_call": _gen(chat, "<think> nothing to do </think>"),
            "max_turns": _zoom(chat, 30, 40), "tool_call_fills_budget": _zoom(chat, 30, 40)}
    conv = _exact(chat, gens[case], max_turns=1 if case == "max_turns" else 5)
    assert conv.finish == {"tool_call_fills_budget": "response_budget"}.get(case, case)
    assert _response_tokens(conv) == conv.config.max_response_tokens


@pytest.mark.parametrize("mode, finish", [("grounded", "no_answer"), ("vanilla", "no_answer"),
                                          ("multiturn", "no_tool_call")])
def test_a_response_that_just_stops(chat, mode, finish):
    """Single-turn has no tool to call: stopping without `</answer>` is `no_answer`; in multi-turn a turn with
    neither a tool call nor an answer is `no_tool_call`. An answer is `answer` in every mode."""
    conv = _run(_conversation(chat, mode=mode, max_response_tokens=4096),
                [_gen(chat, "<think> hmm </think>", eos=True)])
    assert conv.finish == finish and conv.to_rollout().record.finish == finish
    assert _run(_conversation(chat, mode=mode, max_response_tokens=4096), [_answer(chat)]).finish == "answer"


def test_response_budget_keeps_the_eos_when_it_fits(chat):
    gen = _zoom(chat, 30, 40)
    conv = _run(_conversation(chat, max_response_tokens=len(gen.token_ids) + 5), [gen])
    assert conv.finish == "response_budget"
    assert conv.segments[-1].kind == "eos" and _response_tokens(conv) == len(gen.token_ids) + 1


@pytest.mark.parametrize("budget", [60, 100, 200, 400, 800])
def test_response_never_exceeds_the_budget(chat, budget):
    gens = [_zoom(chat, 30, 40), _zoom(chat, 100, 120), _zoom(chat, 200, 10), _answer(chat)]
    conv = _conversation(chat, max_response_tokens=budget)
    for gen in gens:
        if conv.done:
            break
        _, _, sampling = conv.request()
        if len(gen.token_ids) > sampling.max_tokens:  # the engine stops at max_tokens
            gen = Generation(gen.token_ids[:sampling.max_tokens], "", gen.logprobs[:sampling.max_tokens], "length")
        conv.advance(gen)
    assert conv.done and _response_tokens(conv) <= budget, conv.finish


def test_image_budget_ends_with_max_images(chat):
    """max_images=1 leaves no room for a crop: the tool call ends the conversation as `max_images`."""
    conv = _run(_conversation(chat, max_images=1, max_response_tokens=4096), [_zoom(chat, 30, 40)])
    assert conv.finish == "max_images" and not conv.env.crops
    assert conv.to_rollout().record.finish == "max_images"
