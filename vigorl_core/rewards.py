"""Rule rewards for GRPO and judges for MCTS/evaluation: the original ViGoRL rules with their bugs fixed.

docs/rewards.md states every rule and tabulates the differences from the original.

- `REWARDS[(task, mode)](text, truth, zoom_points=None) -> Reward`: `text` is the decoded response; for
  mode `multiturn` it is the WHOLE conversation (assistant turns and `<observation>...</observation>` user
  turns joined, tags present), because the grammar automaton checks the order of turns. `zoom_points` are
  the crop centres the rollout actually executed (clamped into the image, model frame); multi-turn
  rewards count diversity on them (the text's raw tool-call points when None), the others ignore them.
- `JUDGES[name](answer, truth) -> float`: `answer` is the already extracted prediction (Trace.answer).
  Evaluation reports `score` (strict judge) and `score_original` (the original lenient judge), see
  `judge_for`.
- `Truth.box` / `Truth.point` are in the MODEL frame (Truth.in_model_frame maps them; the original RL code never
  did when it downsized an image, its evaluation did). Rewards never parse a ground-truth box. Grounding rewards
  judge point-in-box when the truth has a box, else point-match (< 50 px) on its point.
"""

from __future__ import annotations

import json
import math
import re
import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from vigorl_core.protocol import find_answer, parse_int_pair

TAGS_RE = re.compile(r"<think>.*?</think>\s*<answer>.*?</answer>", re.DOTALL)
GROUNDED_POINT_RE = re.compile(r"\((\d+)\s*,\s*(\d+)\)")
OPTION_LETTER_RE = re.compile(r"^[A-Za-z][\.\)]\s*")
_EOS_RE = re.compile(r"(?:<\|im_end\|>|<\|endoftext\|>)\s*\Z")
_GRAMMAR_TAG_RE = re.compile(r"<(/?)(tool_call|observation|think|answer)>", re.IGNORECASE)
_TOOL_BLOCK_RE = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL | re.IGNORECASE)
_MT_POINT_ANSWER_RE = re.compile(r"<answer>\s*\(([^)]*)\)\s*</answer>")
_MT_ANSWER_RE = re.compile(r"<answer>\s*(.*?)\s*</answer>", re.DOTALL | re.IGNORECASE)
_DROP = set(string.punctuation)
DIVERSITY_MIN_DISTANCE = 10.0  # px: a tool-call point closer than this to a counted one earns no bonus
DIVERSITY_BONUS = 0.2
Z95 = 1.959964  # two-sided 95% normal quantile
POINT_MATCH_THRESHOLD = 50.0  # px, the original --point_matching_threshold


@dataclass
class Reward:
    """`overall` is what GRPO optimises; `format` (may exceed 1 in multi-turn) and `accuracy` are logged."""

    overall: float
    format: float
    accuracy: float
    details: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Truth:
    """Ground truth for one sample. `box`/`point` are in the MODEL frame (needed by point tasks only)."""

    answer: str
    box: tuple[float, float, float, float] | None = None
    point: tuple[float, float] | None = None

    @classmethod
    def in_model_frame(cls, target, frame) -> Truth:
        """`target`'s truth (Sample or Prediction) with its original-frame box and point mapped by `frame`."""
        return cls(answer=target.answer, box=frame.box_to_model(target.bbox) if target.bbox else None,
                   point=frame.to_model(*target.point) if target.point else None)


class RewardFn(Protocol):
    """Every registered reward takes `zoom_points` so callers pass it uniformly; single-turn ones ignore it."""

    def __call__(self, text: str, truth: Truth, *,
                 zoom_points: Sequence[tuple[int, int]] | None = None) -> Reward: ...


# ---- shared pieces ----

def _strip_eos(text: str) -> str:
    # The original decodes with skip_special_tokens; accept a caller that kept the final EOS token.
    return _EOS_RE.sub("", text)


def tags_ok(text: str) -> bool:
    """F_tags: the whole response is exactly one think block then one answer block."""
    return TAGS_RE.fullmatch(_strip_eos(text)) is not None


def grounded(text: str) -> float:
    """C_grounded: 1 if the FIRST think block names at least one `(x, y)` integer point."""
    m = re.search(r"<think>(.*?)</think>", text, re.DOTALL)
    return 1.0 if m and GROUNDED_POINT_RE.search(m.group(1)) else 0.0


def normalize_answer(s: str) -> str:
    """Strict string-match key: strip, drop a leading option letter ("A." / "b)"), lower-case, and remove
    all punctuation and whitespace. Applied to BOTH prediction and ground truth."""
    s = OPTION_LETTER_RE.sub("", s.strip())
    return "".join(c for c in s.lower() if c not in _DROP and not c.isspace())


def string_match_judge(answer: str | None, truth: Truth) -> float:
    """Strict: normalized equality, no substring credit (listing every option would otherwise win)."""
    if answer is None:
        return 0.0
    pred, gt = normalize_answer(answer), normalize_answer(truth.answer)
    return 1.0 if pred and pred == gt else 0.0


def string_match_original_judge(answer: str | None, truth: Truth) -> float:
    """The original eval/MCTS judge: punctuation/space-insensitive equality OR GT substring of prediction."""
    if answer is None:
        return 0.0

    def norm(s: str) -> str:
        return "".join(c for c in s.lower() if c not in _DROP and not c.isspace())

    pred, gt = norm(answer), norm(truth.answer)
    return 1.0 if pred == gt or gt in pred else 0.0


def _need_box(truth: Truth) -> tuple[float, float, float, float]:
    if truth.box is None:
        raise ValueError("point-in-box scoring needs Truth.box (model-frame x1, y1, x2, y2); got None")
    return truth.box


def point_in_bbox_judge(answer: str | None, truth: Truth) -> float:
    """1 iff the answer is exactly 2 ints `(x, y)` inside the box, edges inclusive."""
    x1, y1, x2, y2 = _need_box(truth)
    p = parse_int_pair(answer) if answer is not None else None
    return 1.0 if p is not None and x1 <= p[0] <= x2 and y1 <= p[1] <= y2 else 0.0


def point_match_judge(answer: str | None, truth: Truth) -> float:
    """1 iff the answer is 2 ints closer than 50 px (Euclidean) to `Truth.point`."""
    if truth.point is None:
        raise ValueError("point_match needs Truth.point (model-frame x, y); got None")
    p = parse_int_pair(answer) if answer is not None else None
    return 1.0 if p is not None and math.dist(p, truth.point) < POINT_MATCH_THRESHOLD else 0.0


def grounding_accuracy(answer: str | None, truth: Truth) -> float:
    """Point-in-box when the truth has a box, else point-match on its point (point-only grounding data,
    scored as evaluation scores it); a truth with neither cannot be judged."""
    if truth.box is not None:
        return point_in_bbox_judge(answer, truth)
    if truth.point is not None:
        return point_match_judge(answer, truth)
    raise ValueError("grounding rewards need Truth.box (from Sample.bbox) or Truth.point (from Sample.point), "
                     "model frame; the sample has neither")


def web_action_accuracy(answer: str | None, gt: str) -> float:
    """The original RL action rule, checked in this order: go_back, stop, scroll direction, click id
    (0.5 type + 0.5 id), type (0.5 type + 0.5 first bracket, i.e. the element id; typed text ignored)."""
    if answer is None:
        return 0.0
    pred = answer.strip()
    if "go_back" in pred:
        return float("go_back" in gt)
    if "stop" in pred:
        return float("stop" in gt)
    if "scroll" in pred:
        return float(("[down]" in pred and "[down]" in gt) or ("[up]" in pred and "[up]" in gt))
    for action, arg_re in (("click", r"\[(\d+)\]"), ("type", r"\[(.*?)\]")):
        if action in pred:
            p, g = re.search(arg_re, pred), re.search(arg_re, gt)
            if not p or not g:
                return 0.0
            return 0.5 * (action in gt) + 0.5 * (p.group(1).strip() == g.group(1).strip())
    return 0.0


def web_action_judge(answer: str | None, truth: Truth) -> float:
    """Strict eval judge: 1 only when the RL rule gives full credit (right action and argument)."""
    return 1.0 if web_action_accuracy(answer, truth.answer) == 1.0 else 0.0


def web_action_original_judge(answer: str | None, truth: Truth) -> float:
    """The original MCTS/eval web-action judge (lower-cased; action-type containment; click/type by tokens)."""
    if answer is None:
        return 0.0
    pred, gt = answer.strip().lower(), truth.answer.strip().lower()
    for action in ("go_back", "stop", "scroll"):
        if action in pred:
            return float(action in gt)
    tokens = pred.split(" ")
    if "click" in pred:
        return float(len(tokens) == 2 and "click" in gt and tokens[1] in gt)
    if "type" in pred:
        return float(len(tokens) == 3 and "type" in gt and tokens[1] in gt)
    return 0.0


# ---- single-turn rewards (0.5 accuracy + 0.5 format) ----

def _combine(acc: float, fmt: float, w_acc: float, **details) -> Reward:
    return Reward(overall=w_acc * acc + (1 - w_acc) * fmt, format=fmt, accuracy=acc, details=details)


def string_match(text: str, truth: Truth, *, zoom_points: Sequence[tuple[int, int]] | None = None) -> Reward:
    """Vanilla spatial / V*: format = F_tags and a non-empty answer; accuracy = strict string match."""
    fmt = float(tags_ok(text) and bool(find_answer(text, dotall=True)))
    answer = find_answer(text, dotall=False)
    return _combine(string_match_judge(answer, truth), fmt, 0.5, answer=answer)


def point_in_bbox(text: str, truth: Truth, *, zoom_points: Sequence[tuple[int, int]] | None = None) -> Reward:
    """Vanilla grounding: format = F_tags and the answer is `(x, y)` with 2 ints; accuracy = inside box
    (or within 50 px of a point-only truth)."""
    answer = find_answer(text, dotall=False)
    point_ok = answer is not None and answer.startswith("(") and answer.endswith(")") \
        and parse_int_pair(answer) is not None
    fmt = float(tags_ok(text) and point_ok)
    return _combine(grounding_accuracy(answer, truth), fmt, 0.5, answer=answer)


def web_action(text: str, truth: Truth, *, zoom_points: Sequence[tuple[int, int]] | None = None) -> Reward:
    answer = find_answer(text, dotall=False)
    return _combine(web_action_accuracy(answer, truth.answer), float(tags_ok(text)), 0.5, answer=answer)


def _with_grounding(base: RewardFn) -> RewardFn:
    """The ViGoRL single-turn variant of a reward: its format multiplied by C_grounded (>= 1 point)."""

    def reward(text: str, truth: Truth, *, zoom_points: Sequence[tuple[int, int]] | None = None) -> Reward:
        r = base(text, truth)
        g = grounded(text)
        return _combine(r.accuracy, r.format * g, 0.5, answer=r.details["answer"], grounded=g)

    reward.__name__ = f"{base.__name__}_grounded"
    reward.__doc__ = f"ViGoRL single-turn {base.__name__}: format multiplied by C_grounded."
    return reward


string_match_grounded = _with_grounding(string_match)
point_in_bbox_grounded = _with_grounding(point_in_bbox)
web_action_grounded = _with_grounding(web_action)


# ---- multi-turn rewards (0.6 accuracy + 0.4 format, format with diversity bonus) ----

_NEXT = {  # grammar state -> allowed tag -> next state
    "think_open": {"<think>": "think_close"},
    "think_close": {"</think>": "post_think"},
    "post_think": {"<tool_call>": "tool_close", "<answer>": "answer_close"},
    "tool_close": {"</tool_call>": "obs_open"},
    "obs_open": {"<observation>": "obs_close"},
    "obs_close": {"</observation>": "think_open"},
    "answer_close": {"</answer>": "end"},
    "end": {},  # no structural tag after </answer>
}


def tag_grammar_ok(text: str) -> bool:
    """think -> /think -> (tool_call -> /tool_call -> observation -> /observation -> think -> /think)*
    -> answer -> /answer, ending the text (a trailing `<|im_end|>` allowed). Text between tags is free."""
    if not re.search(r"</answer>\s*(<\|im_end\|>)?\s*$", text.strip()):
        return False
    state = "think_open"
    for m in _GRAMMAR_TAG_RE.finditer(text):
        state = _NEXT[state].get(m.group(0).lower(), "")
        if not state:
            return False
    return state == "end"


def tool_call_points(text: str) -> list[tuple[int, int]] | None:
    """Coordinates of every `<tool_call>` block, or None if any block is not JSON with
    `arguments.coordinate` = a list of exactly 2 ints (the tool name is not checked, as in the original)."""
    points = []
    for m in _TOOL_BLOCK_RE.finditer(text):
        try:
            obj = json.loads(m.group(1))
        except (ValueError, RecursionError):
            return None
        args = obj.get("arguments") if isinstance(obj, dict) else None
        coord = args.get("coordinate") if isinstance(args, dict) else None
        if not (isinstance(coord, list) and len(coord) == 2
                and all(isinstance(v, int) and not isinstance(v, bool) for v in coord)):
            return None
        points.append((coord[0], coord[1]))
    return points


def distinct_points(points: Sequence[tuple[float, float]], min_distance: float = DIVERSITY_MIN_DISTANCE) -> int:
    """U: points counted in order, each only if >= min_distance px from every point counted before."""
    counted: list[tuple[float, float]] = []
    for p in points:
        if all(math.dist(p, q) >= min_distance for q in counted):
            counted.append(p)
    return len(counted)


def multiturn_format(text: str, answer_ok: Callable[[str], bool],
                     zoom_points: Sequence[tuple[int, int]] | None = None) -> tuple[float, int]:
    """(format, U): 0 unless the grammar, every tool call and the answer are valid; else 1 + 0.2*(U-1)
    for U > 1 distinct zoom points (no explicit cap: the image budget bounds it). U counts `zoom_points`,
    the crops that ran, when given: the driver clamps a point outside the image, so raw points far past
    the border would each earn the bonus for the same corner crop. Without them, the text's points."""
    points = tool_call_points(text)
    if not tag_grammar_ok(text) or points is None or not answer_ok(text):
        return 0.0, 0
    u = distinct_points(points if zoom_points is None else zoom_points)
    return 1.0 + DIVERSITY_BONUS * max(0, u - 1), u


def _point_answer_ok(text: str) -> bool:
    m = _MT_POINT_ANSWER_RE.search(text)
    return m is not None and parse_int_pair("(" + m.group(1).strip() + ")") is not None


def _mt_answer(text: str) -> str | None:
    m = _MT_ANSWER_RE.search(text)
    return m.group(1).strip() if m else None


def point_in_bbox_multicrop(text: str, truth: Truth, *,
                            zoom_points: Sequence[tuple[int, int]] | None = None) -> Reward:
    """Multi-turn grounding: grammar + diversity format, accuracy = first answer inside the box (or within
    50 px of a point-only truth)."""
    fmt, u = multiturn_format(text, _point_answer_ok, zoom_points)
    answer = find_answer(text, dotall=False)
    return _combine(grounding_accuracy(answer, truth), fmt, 0.6, answer=answer, unique_points=u)


def string_match_multiturn(text: str, truth: Truth, *,
                           zoom_points: Sequence[tuple[int, int]] | None = None) -> Reward:
    """Multi-turn V* / spatial: grammar + diversity format with a non-empty answer; strict string match."""
    fmt, u = multiturn_format(text, lambda s: bool(_mt_answer(s)), zoom_points)
    answer = _mt_answer(text)
    return _combine(string_match_judge(answer, truth), fmt, 0.6, answer=answer, unique_points=u)


# ---- registries ----

REWARDS: dict[tuple[str, str], RewardFn] = {
    ("spatial", "grounded"): string_match_grounded,
    ("spatial", "vanilla"): string_match,
    ("spatial", "multiturn"): string_match_multiturn,
    ("visual_search", "grounded"): string_match_grounded,
    ("visual_search", "vanilla"): string_match,
    ("visual_search", "multiturn"): string_match_multiturn,
    ("grounding", "grounded"): point_in_bbox_grounded,
    ("grounding", "vanilla"): point_in_bbox,
    ("grounding", "multiturn"): point_in_bbox_multicrop,
    ("web_action", "grounded"): web_action_grounded,
    ("web_action", "vanilla"): web_action,
}


def reward_for(task: str, mode: str) -> RewardFn:
    try:
        return REWARDS[(task, mode)]
    except KeyError:
        valid = ", ".join(f"{t}/{m}" for t, m in REWARDS)
        raise ValueError(f"no reward for task={task!r} mode={mode!r}; valid task/mode: {valid}") from None


JudgeFn = Callable[[str | None, Truth], float]
JUDGES: dict[str, JudgeFn] = {
    "string_match": string_match_judge,
    "string_match_original": string_match_original_judge,
    "point_in_bbox": point_in_bbox_judge,
    "point_match": point_match_judge,
    "web_action": web_action_judge,
    "web_action_original": web_action_original_judge,
}
_TASK_JUDGES = {
    "spatial": ("string_match", "string_match_original"),
    "visual_search": ("string_match", "string_match_original"),
    "grounding": ("point_in_bbox", "point_in_bbox"),  # the original judge is already strict here
    "web_action": ("web_action", "web_action_original"),
}


def judge_for(task: str) -> tuple[str, str]:
    """(strict judge name for `score`, original judge name for `score_original`)."""
    try:
        return _TASK_JUDGES[task]
    except KeyError:
        raise ValueError(f"no judge for task {task!r}; expected one of {sorted(_TASK_JUDGES)}") from None


def ci95(scores: Sequence[float]) -> tuple[float, float, float]:
    """(mean, low, high): a 95% interval of the mean. 0/1 scores: the Wilson score interval, which stays
    inside [0, 1] and keeps a width at p = 0 or 1 and at small n (the paper's Wald interval
    1.96*sqrt(p(1-p)/n) is zero-width there). Other scores: mean +- 1.96*s/sqrt(n) (sample std)."""
    n = len(scores)
    if n == 0:
        raise ValueError("ci95 needs at least one score")
    mean = sum(scores) / n
    if all(s in (0, 1) for s in scores):
        z2 = Z95 * Z95
        centre = (mean + z2 / (2 * n)) / (1 + z2 / n)
        half = Z95 * math.sqrt(mean * (1 - mean) / n + z2 / (4 * n * n)) / (1 + z2 / n)
        return mean, 0.0 if mean == 0 else centre - half, 1.0 if mean == 1 else centre + half  # exact at the edges
    half = Z95 * math.sqrt(sum((s - mean) ** 2 for s in scores) / (n - 1) / n) if n > 1 else 0.0
    return mean, mean - half, mean + half
