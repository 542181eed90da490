"""The ViGoRL text protocol: parse model output into a `records.Trace` and render chains back to text.

Grammar (the original's single-turn and multi-turn formats, docs/method.md):
- single turn: `<think>\\n step (x, y). step (x, y). \\n</think>\\n<answer> answer </answer>`;
- multi-turn, one assistant turn: `<think> ... </think>\\n` followed by either
  `<tool_call>\\n{"name": "search_coordinate", "arguments": {"coordinate": [x, y]}}\\n</tool_call>`
  or `<answer> ... </answer>`.
Points are integer pixels of the model frame (the smart-resized first image).

`parse_response` never raises on any str: malformed parts become short messages in `Trace.errors` or
`ToolCall.error`. The strict helpers at the bottom (`find_answer`, `parse_int_pair`, `parse_int_box`)
reproduce the original reward functions' parsing and are shared with vigorl_core.rewards.
"""

from __future__ import annotations

import ast
import json
import math
import re

from vigorl_core.records import Point, Step, ToolCall, Trace

TOOL_NAME = "search_coordinate"
# Appended after the observation of the crop that fills the image budget: the model must answer now.
FORCED_FINAL_PREFIX = (
    "<think> Based on all the information I've gathered, I'll now provide my final answer. </think>\n<answer>"
)

# Tolerant point regex of the original linearizer (floats and negatives are kept as the model wrote them).
POINT_RE = re.compile(r"\(\s*(-?\d+(?:\.\d+)?)\s*,\s*(-?\d+(?:\.\d+)?)\s*\)")
_TAG_RE = re.compile(r"<(/?)(think|answer|tool_call)>")
# A step ends at a line break, or after .!? followed by whitespace.
_STEP_SPLIT_RE = re.compile(r"\n|(?<=[.!?])\s+")
# Chat-template tokens that may surround a turn; they are not "text outside tags".
_TEMPLATE_TOKEN_RE = re.compile(r"<\|im_start\|>(?:system|user|assistant)?|<\|im_end\|>|<\|endoftext\|>")
_SNIPPET = 40


def _snippet(s: str) -> str:
    s = s.strip()
    return repr(s if len(s) <= _SNIPPET else s[:_SNIPPET] + "...")


def _steps(think: str, turn: int) -> list[Step]:
    steps = []
    for piece in _STEP_SPLIT_RE.split(think):
        text = piece.strip()
        if text:
            points = [Point(x=float(m.group(1)), y=float(m.group(2)), frame="model")
                      for m in POINT_RE.finditer(text)]
            steps.append(Step(text=text, points=points, turn=turn))
    return steps


def _coordinate(value: object) -> tuple[tuple[int, int] | None, str | None]:
    """Tool-call coordinate -> ((x, y), None) or (None, why). Floats are rounded: the model means a pixel."""
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        return None, "coordinate is not a list of 2 numbers"
    out = []
    for v in value:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            return None, "coordinate is not a list of 2 numbers"
        out.append(round(v))
    if out[0] < 0 or out[1] < 0:
        return None, f"negative coordinate {out}"
    return (out[0], out[1]), None


def parse_tool_call(raw: str, turn: int = 0) -> ToolCall:
    """Parse the text between `<tool_call>` and `</tool_call>`. `coordinate` is set only when no error."""
    try:
        obj = json.loads(raw)
    except (ValueError, RecursionError) as e:
        return ToolCall(raw=raw, turn=turn, error=f"tool call is not valid JSON: {str(e)[:_SNIPPET]}")
    if not isinstance(obj, dict):
        return ToolCall(raw=raw, turn=turn, error="tool call JSON is not an object")
    name = obj.get("name")
    if not isinstance(name, str):
        return ToolCall(raw=raw, turn=turn, error="tool call has no name")
    if name != TOOL_NAME:
        return ToolCall(name=name, raw=raw, turn=turn, error=f"unknown tool {_snippet(name)}, expected {TOOL_NAME!r}")
    args = obj.get("arguments")
    if not isinstance(args, dict) or "coordinate" not in args:
        return ToolCall(name=name, raw=raw, turn=turn, error="tool call has no arguments.coordinate")
    coord, error = _coordinate(args["coordinate"])
    return ToolCall(name=name, coordinate=coord, raw=raw, turn=turn, error=error)


def parse_response(text: str, turn: int = 0) -> Trace:
    """Parse one assistant response (or turn) into steps, tool calls and the answer.

    A block runs from `<X>` to the next `</X>` (non-greedy, across lines, as the original regexes do);
    an unclosed block runs to the end of the text and is reported. Several answers: the last one wins.
    """
    steps: list[Step] = []
    calls: list[ToolCall] = []
    answers: list[str] = []
    errors: list[str] = []
    pos = 0

    def outside(chunk: str) -> None:
        rest = _TEMPLATE_TOKEN_RE.sub("", chunk)
        if rest.strip():
            errors.append(f"text outside tags: {_snippet(rest)}")

    while True:
        m = _TAG_RE.search(text, pos)
        if m is None:
            outside(text[pos:])
            break
        closing, tag = m.group(1), m.group(2)
        outside(text[pos:m.start()])
        if closing:
            errors.append(f"stray </{tag}>")
            pos = m.end()
            continue
        end = text.find(f"</{tag}>", m.end())
        closed = end >= 0
        content = text[m.end():end] if closed else text[m.end():]
        pos = end + len(tag) + 3 if closed else len(text)
        if not closed:
            errors.append(f"unclosed <{tag}>")
        nested = _TAG_RE.search(content)
        if nested:
            errors.append(f"tag {nested.group(0)} inside <{tag}>")
        if tag == "think":
            steps.extend(_steps(content, turn))
        elif tag == "answer":
            answers.append(content.strip())
        else:
            call = parse_tool_call(content, turn)
            if not closed:
                call = ToolCall(name=call.name, raw=content, turn=turn, error="unclosed <tool_call>")
            calls.append(call)
        if not closed:
            break

    if len(answers) > 1:
        errors.append(f"{len(answers)} <answer> blocks; kept the last")
    return Trace(steps=steps, tool_calls=calls, answer=answers[-1] if answers else None, errors=errors)


def parse_conversation(assistant_turns: list[str]) -> Trace:
    """Parse each assistant turn with its index and merge; the answer comes from the last turn having one."""
    merged = Trace()
    for i, text in enumerate(assistant_turns):
        t = parse_response(text, turn=i)
        merged.steps.extend(t.steps)
        merged.tool_calls.extend(t.tool_calls)
        merged.errors.extend(f"turn {i}: {e}" for e in t.errors)
        if t.answer is not None:
            merged.answer = t.answer
    return merged


# ---- rendering (one newline convention: real newlines) ----

def format_point(x: float, y: float) -> str:
    """`(x, y)` with integer pixels, the way every prompt and chain writes a point."""
    return f"({round(x)}, {round(y)})"


def render_tool_call(x: int, y: int) -> str:
    # json.dumps' default separators give exactly the original `{"name": ..., "arguments": {...}}` spacing.
    body = json.dumps({"name": TOOL_NAME, "arguments": {"coordinate": [round(x), round(y)]}})
    return f"<tool_call>\n{body}\n</tool_call>"


def render_single_turn(steps: list[str], answer: str) -> str:
    """The original single-turn SFT chain: steps joined by one space inside one think block."""
    return "<think>\n" + " ".join(steps) + "\n</think>\n<answer> " + answer + " </answer>"


def render_turn(think: str, *, tool_call: tuple[int, int] | None = None, answer: str | None = None) -> str:
    """One multi-turn assistant turn: a think block then exactly one of a tool call or the answer."""
    if (tool_call is None) == (answer is None):
        raise ValueError("render_turn needs exactly one of tool_call=(x, y) or answer=str")
    tail = render_tool_call(*tool_call) if tool_call is not None else f"<answer> {answer} </answer>"
    return f"<think> {think} </think>\n{tail}"


# ---- strict helpers shared with rewards (the original reward functions' parsing) ----

def find_answer(text: str, dotall: bool) -> str | None:
    """Stripped content of the FIRST `<answer>(.*?)</answer>`, or None. Most original accuracy functions
    search without DOTALL, so a multi-line answer is not found there; `dotall` selects the behaviour."""
    m = re.search(r"<answer>(.*?)</answer>", text, re.DOTALL if dotall else 0)
    return m.group(1).strip() if m else None


def _literal_ints(s: str, n: int, types: tuple[type, ...]) -> tuple[int, ...] | None:
    try:
        value = ast.literal_eval(s.strip())
    except Exception:  # literal_eval raises ValueError, SyntaxError, TypeError, MemoryError, RecursionError
        return None
    if not isinstance(value, types) or len(value) != n:
        return None
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        return None
    return tuple(value)


def parse_int_pair(s: str) -> tuple[int, int] | None:
    """`"(x, y)"` -> (x, y); None unless it is a tuple of exactly 2 ints (floats rejected, as the original)."""
    return _literal_ints(s, 2, (tuple,))  # type: ignore[return-value]


def parse_int_box(s: str) -> tuple[int, int, int, int] | None:
    """`"(x1, y1, x2, y2)"` (or a list) -> 4 ints; None otherwise."""
    return _literal_ints(s, 4, (tuple, list))  # type: ignore[return-value]
