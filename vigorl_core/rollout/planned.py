"""PlannedTurnsEngine: a real engine whose output follows a per-conversation zoom plan.

A random-weight model never emits a tool call, yet tests and benchmarks need real multi-turn
conversations with varying turn counts on real vLLM. This wrapper constrains each turn with a regular
expression (vLLM structured outputs): a prompt whose plan says k zooms gets k turns of
`<think> ... (x, y). </think>` + a `search_coordinate` tool call, then a turn with an `<answer>`.
The text inside the think block, the points and the answer are sampled by the model; k is
`min_zooms + crc32(first user turn) % (max_zooms - min_zooms + 1)`, so it varies across prompts and is
reproducible (min_zooms = max_zooms fixes it).

A random-weight model fills its think block up to the limit, so every turn has about the same length. Benchmarks
of turn scheduling need the long tail a trained model shows (most turns short, a few near the budget):
`think_lengths` gives each turn a think block of exactly one of those lengths, picked by crc32 of the first user
turn and the turn's index (a few lengths, so vLLM compiles a few grammars, not one per turn).
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

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
FORCED_ANSWER = r" [a-z]{1,12} </answer>"


class PlannedTurnsEngine:
    """PolicyEngine over `engine` that makes prompt p zoom `plan(p)` times before answering."""

    # Its log-probs are those of the grammar-masked distribution, not the policy's: the rollout driver
    # marks its records (RolloutRecord.constrained_logprobs) so nobody trains on them as sampled.
    constrained = True

    def __init__(self, engine: PolicyEngine, tokenizer: Any, max_zooms: int = 4, max_think_chars: int = 48,
                 min_zooms: int = 0, think_lengths: Sequence[int] = ()):
        if not 0 <= min_zooms <= max_zooms:
            raise ValueError(f"need 0 <= min_zooms <= max_zooms, got {min_zooms}, {max_zooms}")
        if any(n < 8 for n in think_lengths):
            raise ValueError(f"think_lengths must be >= 8 characters, got {list(think_lengths)}")
        self.engine = engine
        self.think_lengths = tuple(think_lengths)
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

    def regex_for(self, prompt_ids: Sequence[int]) -> str:
        if list(prompt_ids[-len(self.forced_tail):]) == self.forced_tail:
            return FORCED_ANSWER
        turn, plan, digest = self._turn_and_plan(prompt_ids)
        if self.think_lengths:
            length = self.think_lengths[zlib.crc32(f"{digest}/{turn}".encode()) % len(self.think_lengths)]
            return (zoom_turn if turn < plan else answer_turn)(length, exact=True)
        return self.zoom_regex if turn < plan else self.answer_regex

    async def generate(self, prompt_ids: Sequence[int], images: Sequence[Any], sampling: Sampling,
                       request_id: str | None = None) -> list[Generation]:
        # The grammar spells `</tool_call>` with sub-word tokens; were the single `</tool_call>` token still a
        # stop token, the model could append it after the grammar completes. Only EOS ends a planned turn.
        constrained = replace(sampling, regex=self.regex_for(prompt_ids), stop_token_ids=(self.eos_id,))
        return await self.engine.generate(prompt_ids, images, constrained, request_id)

    async def abort(self, request_id: str) -> None:
        await self.engine.abort(request_id)

    async def update_weights(self, state_dict: Mapping[str, Any], version: int) -> int:
        return await self.engine.update_weights(state_dict, version)

