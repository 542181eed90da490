"""PlannedTurnsEngine: a real engine whose output follows a per-conversation zoom plan.

A random-weight model never emits a tool call, yet tests and benchmarks need real multi-turn
conversations with varying turn counts on real vLLM. This wrapper constrains each turn with a regular
expression (vLLM structured outputs): a prompt whose plan says k zooms gets k turns of
`<think> ... (x, y). </think>` + a `search_coordinate` tool call, then a turn with an `<answer>`.
The text inside the think block, the points and the answer are sampled by the model; k is
`min_zooms + crc32(first user turn) % (max_zooms - min_zooms + 1)`, so it varies across prompts and is
reproducible (min_zooms = max_zooms fixes it).

Jobs and the gateway use it only when VIGORL_PLANNED_ZOOMS=N is set (`requested_planned_zooms`): tests and demos of
a random-weight model (`vigorl tiny`) set it; it is no config field, so nobody trains or evaluates a real model
under a grammar by mistake. Evaluation, the demo and `/v1/grounded` then zoom exactly N times in multi-turn mode;
GRPO's rollouts zoom 0 to N times (the plan varies by prompt, so a group's rewards can differ).

A random-weight model fills its think block up to the limit, so every turn has about the same length. Benchmarks
of turn scheduling need the long tail a trained model shows (most turns short, a few near the budget):
`think_lengths` gives each turn a thought of exactly one of those lengths in TOKENS, picked by crc32 of the first
user turn and the turn's index. Such a turn is two engine calls, so that no grammar runs over the long part: the
thought is sampled freely among letter-and-space tokens (`Sampling.allowed_token_ids`, a logits mask; a grammar
over a 1,000-token thought made every decode step wait on the structured-output matcher and hid what scheduling
does), then the point, `</think>` and the tool call or answer under a short grammar, prompted with everything
before it (a prefix-cache hit). The forced `<think> ` opening is part of the returned tokens with log-prob 0, as
under a grammar that allows one token.

`grammar_tail=False` takes the grammar off the tail as well: the second call samples only the point's 6 digits
(under a logits mask of digit tokens), and the tail's fixed text (the point, `</think>`, the zoom call at that point
or an answer word spelled from the digits, `<|im_end|>`) is appended as forced tokens with log-prob 0, like the
`<think> ` opening. A turn then runs no grammar at all, as a trained model's (the driver's forced-final answer still
does). Under vLLM a grammar request in a batch is a structured-output step for the whole batch; with turn-
asynchronous rollouts some conversation is always in its tail, so the grammar tail taxes that schedule on nearly
every step and lockstep only during each turn's tail.
"""

from __future__ import annotations

import asyncio
import os
import re
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

from vigorl_core.config import ConfigError
from vigorl_core.rollout.engine import Generation, PolicyEngine, Sampling
from vigorl_core.protocol import FORCED_FINAL_PREFIX

_COORD = r"(?:0|[1-9]\d{0,2})"  # JSON ints: no leading zeros
_THINK = r"<think> [a-z ]{8,MAX} \(C, C\)\. </think>\n".replace("C", _COORD)
_TOOL = r'<tool_call>\n\{"name": "search_coordinate", "arguments": \{"coordinate": \[C, C\]\}\}\n</tool_call>'
_ANSWER = r"<answer> [a-z]{1,12} </answer>"


def _think(max_think_chars: int, exact: bool = False) -> str:
    return _THINK.replace("{8,MAX}", f"{{{max_think_chars}}}" if exact else f"{{8,{max_think_chars}}}")


def zoom_turn(max_think_chars: int = 48, exact: bool = False) -> str:
    return _think(max_think_chars, exact) + _TOOL.replace("C", _COORD)


def answer_turn(max_think_chars: int = 48, exact: bool = False) -> str:
    return _think(max_think_chars, exact) + _ANSWER


ANSWER_TURN = answer_turn()
PLANNED_ZOOMS_ENV = "VIGORL_PLANNED_ZOOMS"


def requested_planned_zooms() -> int | None:
    """N of VIGORL_PLANNED_ZOOMS=N (None when unset or empty); a ConfigError naming it when N is no integer >= 0."""
    value = os.environ.get(PLANNED_ZOOMS_ENV, "").strip()
    if not value:
        return None
    if not value.isdigit():
        raise ConfigError(f"{PLANNED_ZOOMS_ENV}={value!r}: give a number of zooms (an integer >= 0)")
    return int(value)

FORCED_ANSWER = r" [a-z]{1,12} </answer>"
THINK_OPEN = "<think> "
_LONGEST_TAIL = ' (999, 999). </think>\n<tool_call>\n{"name": "search_coordinate", "arguments": {"coordinate": ' \
                '[999, 999]}}\n</tool_call><|im_end|>'


def think_tail(zoom: bool) -> str:
    """The grammar after a free thought: its point, `</think>`, then a zoom call or an answer."""
    return r" \(C, C\)\. </think>\n".replace("C", _COORD) + (_TOOL.replace("C", _COORD) if zoom else _ANSWER)


POINT_DIGITS = 6  # a free tail's point: 3 sampled digits per coordinate (0-999, as the grammar's)


def digit_token_ids(tokenizer: Any) -> tuple[int, ...]:
    """Ids of the one-character tokens 0-9."""
    return tuple(sorted(i for token, i in tokenizer.get_vocab().items() if len(token) == 1 and token in "0123456789"))


def free_tail_text(digits: str, zoom: bool) -> str:
    """The tail after a free thought, from `POINT_DIGITS` sampled digits: the point, `</think>`, then the zoom call
    at that point or an answer word spelled from the digits (a-j). Matches `think_tail(zoom)`."""
    x, y = int(digits[:3]), int(digits[3:6])
    end = (f'<tool_call>\n{{"name": "search_coordinate", "arguments": {{"coordinate": [{x}, {y}]}}}}\n</tool_call>'
           if zoom else f"<answer> {''.join('abcdefghij'[int(d)] for d in digits)} </answer>")
    return f" ({x}, {y}). </think>\n{end}"


def letter_token_ids(tokenizer: Any) -> tuple[int, ...]:
    """Ids of the byte-level tokens that decode to lowercase letters and spaces only (Ġ is the space byte)."""
    plain = re.compile("[a-z\u0120]+")
    return tuple(sorted(i for token, i in tokenizer.get_vocab().items() if plain.fullmatch(token)))


class PlannedTurnsEngine:
    """PolicyEngine over `engine` that makes prompt p zoom `plan(p)` times before answering."""

    # Its log-probs are those of the grammar-masked distribution, not the policy's: the rollout driver
    # marks its records (RolloutRecord.constrained_logprobs) so nobody trains on them as sampled.
    constrained = True

    def __init__(self, engine: PolicyEngine, tokenizer: Any, max_zooms: int = 4, max_think_chars: int = 48,
                 min_zooms: int = 0, think_lengths: Sequence[int] = (), grammar_tail: bool = True):
        if not 0 <= min_zooms <= max_zooms:
            raise ValueError(f"need 0 <= min_zooms <= max_zooms, got {min_zooms}, {max_zooms}")
        if any(n < 1 for n in think_lengths):
            raise ValueError(f"think_lengths must be >= 1 token, got {list(think_lengths)}")
        self.engine = engine
        self.think_lengths = tuple(think_lengths)
        self.letters = letter_token_ids(tokenizer) if think_lengths else ()
        self.grammar_tail = grammar_tail
        self.digits = digit_token_ids(tokenizer) if think_lengths and not grammar_tail else ()
        self.tokenizer = tokenizer
        self.think_open = tokenizer.encode(THINK_OPEN, add_special_tokens=False)
        # Room kept after a free thought for its point, `</think>` and the call: the longest tail's tokens, spelled
        # letter by letter as a grammar may (the tiny model's small vocabulary does).
        self.tail_room = len(_LONGEST_TAIL) + 4
        self.min_zooms, self.max_zooms = min_zooms, max_zooms
        self.zoom_regex, self.answer_regex = zoom_turn(max_think_chars), answer_turn(max_think_chars)
        self.eos_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
        self.assistant_header = tokenizer.encode("<|im_start|>assistant\n", add_special_tokens=False)
        # The rollout driver appends exactly encode(FORCED_FINAL_PREFIX) when it forces the answer.
        self.forced_tail = tokenizer.encode(FORCED_FINAL_PREFIX, add_special_tokens=False)

    @property
    def version(self) -> int:
        return self.engine.version

    def _turn_and_plan(self, prompt_ids: Sequence[int]) -> tuple[int, int, int]:
        """(this turn's index, the conversation's zoom plan, crc32 of its first user turn)."""
        ids = list(prompt_ids)
        header = self.assistant_header
        starts = [i for i in range(len(ids) - len(header) + 1) if ids[i:i + len(header)] == header]
        first = starts[0] if starts else len(ids)
        digest = zlib.crc32(bytes(str(ids[:first]), "ascii"))
        return len(starts) - 1, self.min_zooms + digest % (self.max_zooms - self.min_zooms + 1), digest

    def _forced(self, prompt_ids: Sequence[int]) -> bool:
        return list(prompt_ids[-len(self.forced_tail):]) == self.forced_tail

    def regex_for(self, prompt_ids: Sequence[int]) -> str:
        """The grammar of a one-call turn (without think_lengths, and for the driver's forced answer)."""
        if self._forced(prompt_ids):
            return FORCED_ANSWER
        turn, plan, _ = self._turn_and_plan(prompt_ids)
        return self.zoom_regex if turn < plan else self.answer_regex

    def think_plan(self, prompt_ids: Sequence[int]) -> tuple[bool, int]:
        """(does this turn zoom, its thought's length in tokens) under think_lengths."""
        turn, plan, digest = self._turn_and_plan(prompt_ids)
        return turn < plan, self.think_lengths[zlib.crc32(f"{digest}/{turn}".encode()) % len(self.think_lengths)]

    async def generate(self, prompt_ids: Sequence[int], images: Sequence[Any], sampling: Sampling,
                       request_id: str | None = None) -> list[Generation]:
        # The grammar spells `</tool_call>` with sub-word tokens; were the single `</tool_call>` token still a
        # stop token, the model could append it after the grammar completes. Only EOS ends a planned turn.
        room = sampling.max_tokens - len(self.think_open) - self.tail_room
        if not self.think_lengths or self._forced(prompt_ids) or room < 1:
            constrained = replace(sampling, regex=self.regex_for(prompt_ids), stop_token_ids=(self.eos_id,))
            return await self.engine.generate(prompt_ids, images, constrained, request_id)
        samples = [replace(sampling, n=1, seed=None if sampling.seed is None else sampling.seed + k)
                   for k in range(sampling.n)]
        return list(await asyncio.gather(*(self._free_thought_turn(prompt_ids, images, one, room, f"{request_id}-{k}")
                                           for k, one in enumerate(samples))))

    async def _free_thought_turn(self, prompt_ids: Sequence[int], images: Sequence[Any], sampling: Sampling,
                                 room: int, request_id: str) -> Generation:
        zoom, length = self.think_plan(prompt_ids)
        head = list(prompt_ids) + self.think_open
        [thought] = await self.engine.generate(head, images, replace(
            sampling, max_tokens=min(length, room), stop=(), stop_token_ids=(), allowed_token_ids=self.letters),
            f"{request_id}-think")
        if self.grammar_tail:
            [tail] = await self.engine.generate(head + thought.token_ids, images, replace(
                sampling, max_tokens=sampling.max_tokens - len(self.think_open) - len(thought.token_ids),
                regex=think_tail(zoom), stop_token_ids=(self.eos_id,)), f"{request_id}-tail")
        else:
            [digits] = await self.engine.generate(head + thought.token_ids, images, replace(
                sampling, max_tokens=POINT_DIGITS, stop=(), stop_token_ids=(), allowed_token_ids=self.digits),
                f"{request_id}-tail")
            text = free_tail_text(digits.text.ljust(POINT_DIGITS, "0"), zoom) + "<|im_end|>"
            ids = self.tokenizer.encode(text, add_special_tokens=False)
            tail = replace(digits, token_ids=ids, text=text, finish_reason="stop", stop_reason=self.eos_id,
                           logprobs=None if digits.logprobs is None else [0.0] * len(ids))
        logprobs = None
        if thought.logprobs is not None and tail.logprobs is not None:
            logprobs = [0.0] * len(self.think_open) + thought.logprobs + tail.logprobs
        return replace(tail, token_ids=self.think_open + thought.token_ids + tail.token_ids,
                       text=THINK_OPEN + thought.text + tail.text, logprobs=logprobs,
                       policy_version=min(thought.policy_version, tail.policy_version),
                       engine_seconds=thought.engine_seconds + tail.engine_seconds)

    async def abort(self, request_id: str) -> None:
        await self.engine.abort(request_id)

    async def update_weights(self, state_dict: Mapping[str, Any], version: int) -> int:
        return await self.engine.update_weights(state_dict, version)
