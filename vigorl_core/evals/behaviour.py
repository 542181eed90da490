"""Grounding behaviour of reasoning traces: rule-based counts per trace, a side-by-side table per model, and
the prompts and parser of the optional LLM judge (jobs/behaviour.py runs them; the eval report shows the table).

    from vigorl_core.evals.behaviour import load_traces, behaviour_table, markdown_table
    table = behaviour_table({"ours": load_traces("runs/eval/a/predictions.jsonl")}, radius=56)
    print(markdown_table(table))

Counts per trace (what each rule really measures, no more):
- points: points named in the reasoning steps (model frame);
- regions: distinct regions explored: points taken in order, a point within `radius` model-frame pixels of an
  earlier region's first point belongs to that region, else it opens a new one;
- revisits: points that go back to an earlier region after the trace has been in another one;
- zooms: zoom tool calls that ran (the first parsed call with a coordinate in each turn, as the rollout runs);
- in_box: the share of the trace's points inside the ground-truth box (model frame); traces without a box
  are left out of its mean;
- backtracking / verification: phrases in the reasoning steps that revise an earlier step ("wait",
  "let's try something else", ...) or check a result ("verify", "double-check", ...). A phrase list is a
  crude proxy: it shows trends between models, and the LLM judge is the finer (and slower) count.

Files read (the format is told apart per line): our predictions.jsonl (eval and `vigorl score`), GRPO's
rollouts.jsonl (text, points, reward; no image, no box), and `/v1/grounded` answers (one JSON per line).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from vigorl_core.data import DataError
from vigorl_core.protocol import parse_conversation, parse_response
from vigorl_core.records import Box, Point, Step, ToolCall, Trace

DEFAULT_RADIUS = 56.0  # model-frame pixels: two merged 28-px patches of Qwen2.5-VL
BACKTRACKING = ("wait", "actually", "on second thought", "let me reconsider", "let's reconsider", "reconsider",
                "re-examine", "try something else", "this seems off", "i was wrong", "that's not right",
                "that is not right", "my mistake", "i made a mistake", "let me look again", "let's look again")
VERIFICATION = ("verify", "verifies", "verified", "verifying", "confirm", "confirms", "confirmed", "confirming",
                "double-check", "double check", "check again", "re-check", "recheck", "cross-check", "make sure",
                "to be sure", "consistent with")
COUNTS = ("points", "regions", "revisits", "zooms", "in_box", "backtracking", "verification")
_OBSERVATION_RE = re.compile(r"<observation>.*?</observation>", re.DOTALL)


def _phrase_re(phrases: Sequence[str]) -> re.Pattern:
    return re.compile(r"(?<![\w-])(?:" + "|".join(re.escape(p) for p in phrases) + r")(?![\w-])", re.IGNORECASE)


_BACKTRACKING_RE, _VERIFICATION_RE = _phrase_re(BACKTRACKING), _phrase_re(VERIFICATION)


@dataclass
class TraceInfo:
    """One trace as the counts need it, whatever file it came from."""

    id: str
    trace: Trace
    correct: bool | None = None  # None: the file does not say
    box: Box | None = None  # ground truth, model frame
    benchmark: str | None = None
    category: str | None = None
    question: str = ""


# ------------------------------------------------------------------------------------------------- counts

def regions(points: Sequence[tuple[float, float]], radius: float) -> tuple[int, int]:
    """(distinct regions, revisits) of points in order; see the module docstring for the rule."""
    centres: list[tuple[float, float]] = []
    current, revisits = None, 0
    for x, y in points:
        region = next((i for i, (cx, cy) in enumerate(centres) if (x - cx) ** 2 + (y - cy) ** 2 <= radius ** 2), None)
        if region is None:
            centres.append((x, y))
            region = len(centres) - 1
        elif region != current:
            revisits += 1
        current = region
    return len(centres), revisits


def executed_zooms(trace: Trace) -> int:
    return len({c.turn for c in trace.tool_calls if c.coordinate is not None})


def inside(point: Point, box: Box) -> bool:
    x1, y1, x2, y2 = box
    return x1 <= point.x <= x2 and y1 <= point.y <= y2


def trace_counts(info: TraceInfo, radius: float = DEFAULT_RADIUS) -> dict[str, float | None]:
    """The counts of one trace (keys: COUNTS); in_box is None without a ground-truth box or without points."""
    points = info.trace.points
    n_regions, revisits = regions([(p.x, p.y) for p in points], radius)
    reasoning = " ".join(s.text for s in info.trace.steps)
    in_box = sum(inside(p, info.box) for p in points) / len(points) if info.box and points else None
    return {"points": len(points), "regions": n_regions, "revisits": revisits, "zooms": executed_zooms(info.trace),
            "in_box": in_box, "backtracking": len(_BACKTRACKING_RE.findall(reasoning)),
            "verification": len(_VERIFICATION_RE.findall(reasoning))}


# ------------------------------------------------------------------------------------------------- tables

def summarize_counts(counts: Sequence[Mapping[str, float | None]]) -> dict[str, float | None]:
    """Mean of each count over the traces that have it (None where none does); `traces` is their number."""
    out: dict[str, float | None] = {"traces": len(counts)}
    for key in COUNTS:
        values = [c[key] for c in counts if c.get(key) is not None]
        out[key] = sum(values) / len(values) if values else None
    return out


def behaviour_table(columns: Mapping[str, Iterable[TraceInfo]], radius: float = DEFAULT_RADIUS,
                    correct_only: bool = False) -> dict[str, dict[str, float | None]]:
    """column label -> mean counts, e.g. one column per model (the paper's table) or per benchmark.
    `correct_only`: only traces known to be correct (the paper's section 5.3 counts those)."""
    table = {}
    for label, traces in columns.items():
        chosen = [t for t in traces if t.correct or not correct_only]
        table[label] = summarize_counts([trace_counts(t, radius) for t in chosen])
    return table


LABELS = {"traces": "traces", "points": "points per trace", "regions": "regions explored",
          "revisits": "revisits", "zooms": "zooms", "in_box": "points in the truth box (%)",
          "backtracking": "backtracking phrases", "verification": "verification phrases"}


def _cell(key: str, value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.0f}" if key == "traces" else f"{100 * value:.1f}" if key == "in_box" else f"{value:.2f}"


def markdown_table(table: Mapping[str, Mapping[str, float | None]],
                   extra: Mapping[str, Mapping[str, float]] | None = None) -> str:
    """Rows: the counts (plus `extra` rows, e.g. LLM-judge means by name); columns: the table's labels."""
    labels = list(table)
    rows = ["| | " + " | ".join(labels) + " |", "|---|" + "---:|" * len(labels)]
    for key, name in LABELS.items():
        rows.append(f"| {name} | " + " | ".join(_cell(key, table[c].get(key)) for c in labels) + " |")
    for name, values in (extra or {}).items():
        rows.append(f"| {name} | " + " | ".join(_cell(name, values.get(c)) for c in labels) + " |")
    return "\n".join(rows)


def format_table(table: Mapping[str, Mapping[str, float | None]],
                 extra: Mapping[str, Mapping[str, float]] | None = None) -> str:
    """The same table as plain text for a terminal."""
    width = max(10, *(len(c) for c in table))
    lines = [f"{'':<30}" + "".join(f"{c:>{width + 2}}" for c in table)]
    rows = [(name, {c: table[c].get(key) for c in table}, key) for key, name in LABELS.items()]
    rows += [(name, values, name) for name, values in (extra or {}).items()]
    for name, values, key in rows:
        lines.append(f"{name:<30}" + "".join(f"{_cell(key, values.get(c)):>{width + 2}}" for c in table))
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------- files

def _from_prediction(obj: dict) -> TraceInfo:
    from vigorl_core.evals.evaluation import Prediction

    p = Prediction.model_validate(obj)
    return TraceInfo(p.id, p.trace, p.score >= 1, p.truth_box, p.benchmark, p.category, p.question)


def _from_rollout(obj: dict) -> TraceInfo:
    text = obj["text"]
    trace = parse_conversation([t for t in _OBSERVATION_RE.split(text) if t.strip()]) if "<observation>" in text \
        else parse_response(text)
    accuracy = (obj.get("details") or {}).get("accuracy")
    return TraceInfo(f"{obj['sample_id']}#{obj.get('group_index', 0)}@{obj.get('step', 0)}", trace,
                     None if accuracy is None else accuracy >= 1)


def _from_grounded(obj: dict) -> TraceInfo:
    steps = [Step(text=s["text"], turn=s["turn"], points=[Point(**p["model"]) for p in s["points"]])
             for s in obj["steps"]]
    calls = [ToolCall(coordinate=tuple(z["requested"]), turn=z["turn"]) for z in obj["zooms"]]
    return TraceInfo(obj["id"], Trace(steps=steps, tool_calls=calls, answer=obj.get("answer")))


def trace_info(obj: dict) -> TraceInfo:
    """A TraceInfo from one line of any of the files read here (ValueError when it is none of them)."""
    if "benchmark" in obj and "trace" in obj:
        return _from_prediction(obj)
    if "sample_id" in obj and "text" in obj:
        return _from_rollout(obj)
    if obj.get("object") == "grounded.result":
        return _from_grounded(obj)
    raise ValueError("not a prediction (benchmark, trace), a GRPO rollout (sample_id, text) or a /v1/grounded "
                     f"answer (object: grounded.result); keys: {sorted(obj)[:8]}")


def load_traces(path: str | Path) -> list[TraceInfo]:
    """Every trace of a predictions.jsonl (or its run folder), rollouts.jsonl or file of /v1/grounded answers.
    A partial last line (a killed writer) is dropped; any other bad line is an error naming file:line."""
    from vigorl_core.evals.evaluation import scan_jsonl

    path = Path(path)
    if path.is_dir():
        path = next((path / n for n in ("predictions.jsonl", "rollouts.jsonl") if (path / n).is_file()), path)
    if not path.is_file():
        raise DataError(path, None, None, "file not found (a predictions.jsonl, rollouts.jsonl or run folder)")
    records, _, _ = scan_jsonl(path)
    out = []
    for lineno, obj in records:
        try:
            out.append(trace_info(obj))
        except (ValueError, KeyError, TypeError) as err:
            raise DataError(path, lineno, None, str(err)) from None
    return out


# ------------------------------------------------------------------------------------------------- LLM judge

JUDGE_QUESTIONS = {
    "verification": "How many times does the reasoning check a claim or an intermediate result against the image "
                    "(visual verification)?",
    "backtracking": "How many times does the reasoning notice that an earlier step or region was wrong and go back "
                    "to try another (backtracking)?",
    "subgoals": "How many times does the reasoning set an explicit intermediate goal, such as first finding one "
                "object and then another (subgoal setting)?",
    "regions": "How many distinct regions of the image does the reasoning look at (regions explored)?",
}


def judge_prompt(kind: str, question: str, reasoning: str) -> str:
    """Chat-template prompt asking the judge for one count; the answer is constrained to `<count>N</count>`."""
    return ("<|im_start|>system\nYou analyse the reasoning of a vision-language model that names image points "
            "(x, y) while it thinks. Reply only with <count>N</count>.<|im_end|>\n<|im_start|>user\n"
            f"Task question: {question}\n\nModel reasoning:\n{reasoning}\n\n{JUDGE_QUESTIONS[kind]}<|im_end|>\n"
            "<|im_start|>assistant\n")


_COUNT_RE = re.compile(r"<count>\s*(\d+)")


def parse_count(text: str) -> int | None:
    """N of the first `<count>N` in a judge reply, None when there is none."""
    match = _COUNT_RE.search(text)
    return int(match.group(1)) if match else None


def reasoning_text(trace: Trace) -> str:
    """The reasoning the judge reads: the steps, one per line (tool calls and crops left out)."""
    return "\n".join(s.text for s in trace.steps)
