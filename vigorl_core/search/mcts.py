"""Monte Carlo tree search over grounded reasoning steps with a teacher policy (ViGoRL's warm-start data).

A node is one teacher response: a `<think>` step naming a point, or a final answer (terminal). One
simulation (docs/mcts.md has the full account and the differences from the original):
1. selection: from the root, move to the child with the highest UCT = value + c*sqrt(ln(N_parent+1) /
   (N_child+1)) (c = 2.0, plain UCT, no prior) while the node has children and is not terminal;
2. a selected terminal node backs up its reward (judged once, when it was created) again;
3. expansion: ONE engine call with n = `children` (3) samples; a response with `<answer>` is a terminal
   child; a non-terminal child naming a point already used on its path is discarded (repeated-coordinate
   avoidance); a node at depth >= max_depth (10) is expanded with the forced-final prompt;
4. evaluation: a terminal child is judged once; every other new child gets `rollouts_per_child` (2)
   rollouts (their first step is one n=2 call) that continue step by step, outside the tree, until an
   answer; the last allowed step (rollout_max_steps, or max_depth) is forced to answer;
5. backup: per rollout, every node root..child: visits += 1, value += (r - value) / visits.

Teacher prompt, token-in: system (prompts mode "mcts") + ONE user turn = images + question + per previous
thought `"\\n\\nPrevious thought i: "` + the ids the engine generated for it, verbatim; then the assistant
header (or the original's forced-final user turn). Each prompt extends its parent's, so prefix caching
reuses the path's prefill.

Deliberate differences from the reference (table in docs/mcts.md): a strict judge by default (the
original's credits a ground truth that is a substring of the prediction); points compared as int pairs,
not strings; no "stop at a node with an unvisited child" rule (each new child is evaluated in the
simulation that creates it, so it never fires); a terminal child is judged and backed up once, not rolled
out; an error or the time limit gives a record with the partial tree instead of losing the sample.

    mcts = MCTS(engine, ChatTokens.from_pretrained(model_dir), config=MCTSConfig(simulations=8))
    records = await asyncio.gather(*(mcts.search(s) for s in samples))   # many trees at once; never raises
"""

from __future__ import annotations

import asyncio
import inspect
import math
import re
import time
import zlib
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from PIL import Image
from pydantic import Field

from vigorl_core.rollout.chat_tokens import ChatTokens
from vigorl_core.config import StageConfig
from vigorl_core.rollout.engine import Generation, PolicyEngine, Sampling
from vigorl_core.frames import FrameMap
from vigorl_core.images import model_frame_images
from vigorl_core.prompts import system_prompt, user_text
from vigorl_core.protocol import POINT_RE, format_point, parse_response
from vigorl_core.records import Sample
from vigorl_core.rewards import JUDGES, Truth, judge_for
from vigorl_core.search.trees import TreeNode, TreeRecord, TreeRollout

ASSISTANT_TAIL = "<|im_end|>\n<|im_start|>assistant\n"
FORCED_FINAL_USER = ("Your turn! Max thoughts reached. You should now provide the final answer in the format "
                     "<answer> ... </answer>")
_OPTION_PREFIX_RE = re.compile(r"^[A-Z]\. ")  # the original strips "A. " from terminal answers
_EOS_RE = re.compile(r"<\|im_end\|>|<\|endoftext\|>")
_THINK_TAG_RE = re.compile(r"</?think>")

RewardFn = Callable[[str, str, Truth], "float | Awaitable[float]"]


class MCTSConfig(StageConfig):
    """Search settings. Defaults: the paper (Table A4) where paper and original script disagree."""

    simulations: int = Field(20, ge=1, description="simulations per sample (paper 20, original script 8)")
    c: float = Field(2.0, ge=0, description="UCT exploration constant (the original's --c_puct; no prior)")
    children: int = Field(3, ge=1, description="teacher samples per expansion (one engine call, n = children)")
    rollouts_per_child: int = Field(2, ge=1, description="rollouts from each new non-terminal child")
    max_depth: int = Field(10, ge=1, description="thoughts on a path; deeper nodes are expanded to a forced answer")
    rollout_max_steps: int = Field(5, ge=1, description="responses per rollout; the last is forced to answer")
    temperature: float = Field(1.0, ge=0, description="teacher sampling temperature")
    top_p: float = Field(1.0, gt=0, le=1, description="teacher nucleus sampling")
    max_tokens: int = Field(512, ge=1, description="max tokens per teacher response")
    avoid_repeat_coords: bool = Field(True, description="discard a non-terminal child that reuses a path point")
    min_thoughts: tuple[int, int] | None = Field(
        (3, 7), description="append 'at least N thoughts' to the system prompt, N in [lo, hi] picked by "
                            "sample id (the script's --add_thought_number_system_prompt); null: omit")
    time_limit_s: float | None = Field(3600.0, gt=0, description="per-sample wall-clock limit; the tree so "
                                       "far is kept with status 'timeout'")


# --------------------------------------------------------------------------------------------- search

def judge_reward(task: str, text: str, truth: Truth) -> float:
    """Default reward: the task's strict judge (rewards.judge_for) on the response's answer; a response
    without `<answer>` is judged on its text without tags, as the original judged the last text."""
    answer = parse_response(text).answer
    if answer is None:
        answer = _THINK_TAG_RE.sub("", text).strip()
    return JUDGES[judge_for(task)[0]](answer, truth)


@dataclass
class TreeInput:
    """A sample ready to search: model-frame images (or whatever the engine takes for them), the ground
    truth in the model frame, and the prompt ids up to the end of the user text."""

    sample: Sample
    images: list[Any]
    frame: FrameMap
    truth: Truth
    system: str
    head_ids: list[int]


@dataclass(eq=False)
class Node:
    """In-memory node. `context` = prompt ids through this node's thought (parent's + its own)."""

    text: str
    depth: int
    context: list[int]
    parent: Node | None = None
    answer: str | None = None
    terminal: bool = False
    forced: bool = False
    finish: str | None = None
    points: list[tuple[int, int]] = field(default_factory=list)
    used: set[tuple[int, int]] = field(default_factory=set)
    children: list[Node] = field(default_factory=list)
    visits: int = 0
    value: float = 0.0
    reward: float | None = None
    rollouts: list[TreeRollout] = field(default_factory=list)

    def path(self) -> list[Node]:
        node, out = self, []
        while node is not None:
            out.append(node)
            node = node.parent
        return out[::-1]

    def to_tree(self) -> TreeNode:
        return TreeNode(
            thought_text=self.answer if self.terminal and self.answer is not None else self.text,
            is_terminal=self.terminal, value=self.value, visit_count=self.visits, rollouts=self.rollouts,
            children=[c.to_tree() for c in self.children], used_coords=[format_point(*p) for p in sorted(self.used)],
            text=self.text if self.depth else None, answer=self.answer, reward=self.reward, depth=self.depth,
            points=self.points, forced=self.forced, finish_reason=self.finish)


@dataclass
class _Search:
    input: TreeInput
    root: Node
    stats: dict[str, float] = field(default_factory=lambda: dict.fromkeys(
        ("simulations", "expansions", "generate_calls", "samples", "generated_tokens", "discarded_repeats",
         "rollouts"), 0))


def _points(text: str) -> list[tuple[int, int]]:
    return [(round(float(x)), round(float(y))) for x, y in POINT_RE.findall(text)]


def _answer(text: str) -> str | None:
    answer = parse_response(text).answer
    return None if answer is None else _OPTION_PREFIX_RE.sub("", answer)


class MCTS:
    """Tree search against `teacher` (any PolicyEngine); `search()` one sample, await many concurrently."""

    def __init__(self, teacher: PolicyEngine, chat: ChatTokens, reward: RewardFn = judge_reward,
                 config: MCTSConfig | None = None, teacher_name: str | None = None):
        self.teacher, self.chat, self.reward = teacher, chat, reward
        self.config = config or MCTSConfig()
        self.teacher_name = teacher_name
        self._tail = chat.encode(ASSISTANT_TAIL)
        self._forced_tail = chat.encode(f"<|im_end|>\n<|im_start|>user\n{FORCED_FINAL_USER}{ASSISTANT_TAIL}")
        self._eos = {chat.im_end_id, chat.tokenizer.convert_tokens_to_ids("<|endoftext|>")}

    def prepare(self, sample: Sample, images: Sequence[Image.Image] | None = None) -> TreeInput:
        """Decode (unless given) and resize the images to the model frame; build the prompt head."""
        resized, frame = model_frame_images(sample.images if images is None else images, self.chat.profile)
        truth = Truth.in_model_frame(sample, frame)
        min_thoughts = None
        if self.config.min_thoughts is not None:
            lo, hi = self.config.min_thoughts
            min_thoughts = lo + zlib.crc32(sample.id.encode()) % (max(hi - lo, 0) + 1)
        system = system_prompt(sample.task, "mcts", min_thoughts=min_thoughts)
        text = self.chat.prompt_text(system, user_text(sample.question, sample.options), len(resized))
        head_ids = self.chat.encode(text.removesuffix(ASSISTANT_TAIL))
        return TreeInput(sample, list(resized), frame, truth, system, head_ids)

    async def search(self, item: Sample | TreeInput) -> TreeRecord:
        """Search one sample. Never raises for the sample's own failures: an exception (images, engine,
        reward) gives status 'error' and the time limit status 'timeout', each with the tree so far."""
        started = time.perf_counter()
        if isinstance(item, Sample):
            try:
                item = self.prepare(item)
            except Exception as e:  # noqa: BLE001 - e.g. a missing or unreadable image
                sample = item
                return TreeRecord(id=sample.id, question=sample.question, true_answer=sample.answer,
                                  tree=TreeNode(thought_text=user_text(sample.question, sample.options)),
                                  task=sample.task, source=sample.source, images=list(sample.images),
                                  image=sample.images[0] if sample.images else "", options=list(sample.options),
                                  status="error", error=f"{type(e).__name__}: {e}"[:2000])
        s = _Search(item, Node(text=user_text(item.sample.question, item.sample.options), depth=0,
                               context=list(item.head_ids)))
        status, error = "ok", None
        limit = asyncio.timeout(self.config.time_limit_s)
        try:
            async with limit:
                for _ in range(self.config.simulations):
                    await self._simulate(s)
                    s.stats["simulations"] += 1
        except Exception as e:  # noqa: BLE001 - recorded per sample, as the original's errors file
            if isinstance(e, TimeoutError) and limit.expired():
                status, error = "timeout", (f"time limit {self.config.time_limit_s} s reached after "
                                            f"{s.stats['simulations']:.0f} simulations")
            else:
                while isinstance(e, BaseExceptionGroup):  # a TaskGroup wraps the failure
                    e = e.exceptions[0]
                status, error = "error", f"{type(e).__name__}: {e}"[:2000]
        return self._record(s, status, error, time.perf_counter() - started)

    # ---- one simulation ----

    async def _simulate(self, s: _Search) -> None:
        node = s.root
        while node.children and not node.terminal:
            parent = node
            node = max(parent.children, key=lambda ch: self._uct(parent, ch))  # ties: the first created
        if node.terminal:
            self._backup(node, node.reward)
            return
        children = await self._expand(s, node)
        async with asyncio.TaskGroup() as tg:
            for child in children:
                tg.create_task(self._evaluate(s, child))

    def _uct(self, parent: Node, child: Node) -> float:
        return child.value + self.config.c * math.sqrt(math.log(parent.visits + 1) / (child.visits + 1))

    @staticmethod
    def _backup(node: Node, reward: float) -> None:
        for n in node.path():
            n.visits += 1
            n.value += (reward - n.value) / n.visits

    async def _expand(self, s: _Search, node: Node) -> list[Node]:
        forced = node.depth >= self.config.max_depth
        gens = await self._generate(s, node.context, forced, self.config.children)
        s.stats["expansions"] += 1
        new = []
        for gen in gens:
            text = _EOS_RE.sub("", gen.text).strip()
            points = _points(text)
            terminal = forced or "<answer>" in text
            if not terminal and self.config.avoid_repeat_coords and node.used.intersection(points):
                s.stats["discarded_repeats"] += 1
                continue
            child = Node(text=text, depth=node.depth + 1, context=[], parent=node, terminal=terminal,
                         forced=forced, finish=gen.finish_reason, points=points, used=node.used | set(points),
                         answer=_answer(text) if terminal else None)
            if not terminal:
                child.context = self._extend(node.context, child.depth, gen.token_ids)
            node.children.append(child)
            new.append(child)
        return new

    def _extend(self, context: list[int], depth: int, generated: Sequence[int]) -> list[int]:
        """context + "\\n\\nPrevious thought {depth}: " + the step's generated ids (EOS and, where they sit
        on token boundaries, the `<think>` tags cut off)."""
        ids = list(generated)
        while ids and ids[-1] in self._eos:
            ids.pop()
        for k in range(1, min(len(ids), 8) + 1):
            if self.chat.decode(ids[:k]).strip() == "<think>":
                ids = ids[k:]
                break
        for k in range(1, min(len(ids), 8) + 1):
            if self.chat.decode(ids[-k:]).strip() == "</think>":
                ids = ids[:-k]
                break
        return context + self.chat.encode(f"\n\nPrevious thought {depth}: ") + ids

    def _rollout_forced(self, depth: int, steps: int) -> bool:
        return steps + 1 >= self.config.rollout_max_steps or depth >= self.config.max_depth

    async def _evaluate(self, s: _Search, child: Node) -> None:
        if child.terminal:
            child.reward = await self._reward(s, child.text)
            texts = [n.text for n in child.path()]
            child.rollouts.append(TreeRollout(final_answer=child.answer, reward=child.reward, ephemeral_texts=texts,
                                              ephemeral_depth=child.depth, depth=child.depth))
            self._backup(child, child.reward)
            return
        forced = self._rollout_forced(child.depth, 0)
        first = await self._generate(s, child.context, forced, self.config.rollouts_per_child)
        async with asyncio.TaskGroup() as tg:
            for gen in first:
                tg.create_task(self._rollout(s, child, gen, forced))

    async def _rollout(self, s: _Search, child: Node, gen: Generation, forced: bool) -> None:
        texts, context, used, depth, same, different = [], child.context, set(child.used), child.depth, 0, 0
        while True:
            text = _EOS_RE.sub("", gen.text).strip()
            texts.append(text)
            for p in _points(text):
                same, different = (same + 1, different) if p in used else (same, different + 1)
                used.add(p)
            if forced or "<answer>" in text:
                break
            depth += 1
            context = self._extend(context, depth, gen.token_ids)
            forced = self._rollout_forced(depth, len(texts))
            [gen] = await self._generate(s, context, forced, 1)
        reward = await self._reward(s, text)
        s.stats["rollouts"] += 1
        child.rollouts.append(TreeRollout(
            final_answer=_answer(text), reward=reward, ephemeral_texts=[n.text for n in child.path()] + texts,
            ephemeral_depth=child.depth + len(texts), depth=child.depth, num_same_points=same,
            num_different_points=different))
        self._backup(child, reward)

    async def _generate(self, s: _Search, context: list[int], forced: bool, n: int) -> list[Generation]:
        cfg = self.config
        sampling = Sampling(n=n, temperature=cfg.temperature, top_p=cfg.top_p, max_tokens=cfg.max_tokens,
                            stop=("</answer>",), stop_token_ids=(self.chat.im_end_id,), logprobs=False)
        ids = context + (self._forced_tail if forced else self._tail)
        gens = await self.teacher.generate(ids, s.input.images, sampling)
        s.stats["generate_calls"] += 1
        s.stats["samples"] += len(gens)
        s.stats["generated_tokens"] += sum(len(g.token_ids) for g in gens)
        if len(gens) != n:
            raise RuntimeError(f"teacher returned {len(gens)} samples for n={n} (aborted?)")
        return gens

    async def _reward(self, s: _Search, text: str) -> float:
        r = self.reward(s.input.sample.task, text, s.input.truth)
        return float(await r if inspect.isawaitable(r) else r)

    def _record(self, s: _Search, status: str, error: str | None, seconds: float) -> TreeRecord:
        sample, frame = s.input.sample, s.input.frame
        record = TreeRecord(
            id=sample.id, question=sample.question, image=sample.images[0] if sample.images else "",
            true_answer=sample.answer, tree=s.root.to_tree(), system_prompt=s.input.system,
            global_search_time=seconds, task=sample.task, source=sample.source, images=list(sample.images),
            options=list(sample.options), original_size=frame.original_size, model_size=frame.model_size,
            teacher=self.teacher_name, status=status, error=error, config=self.config.model_dump(mode="json"))
        record.stats = {**s.stats, "nodes": sum(1 for _ in record.nodes()), "seconds": seconds}
        return record
