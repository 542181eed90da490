"""Evaluation without the model: predictions, scoring, metrics, exactly-once bookkeeping.

jobs/evaluate.py runs the policy and writes what this module builds; jobs/score.py rescores files with it.
Pure: no Ray, no engine. Formats and rules are documented in docs/evaluation.md.

- `Prediction`: one line of predictions.jsonl per (benchmark, sample id).
- `make_prediction` / `prediction_from_rollout`: score one response with the reward registry. `score` is the
  strict judge (rewards.judge_for), `score_original` the original eval judge behind the original harness's
  format gate, so it reproduces the published-style number. Ground-truth boxes are rescaled into the model
  frame with the sample's FrameMap, as rollout.py does.
- The benchmarks (task family, mode, sampling, data file, published numbers) are vigorl_core.evals.benchmarks.
- `compute_metrics`: per benchmark and per category, mean and 95% interval (Wilson for 0/1 scores) of both
  scores; floats rounded to 6 significant digits (`round_floats`).
- `PredictionWriter` / `read_predictions`: append-only JSONL, one line per key; a partial last line left by a
  killed job is dropped and reported, never an error.
- The original project's eval files are read by vigorl_core.evals.original_eval.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Self

from pydantic import Field, ValidationError

from vigorl_core.evals.benchmarks import BENCHMARKS, benchmark_of, category_of
from vigorl_core.data import DataError
from vigorl_core.frames import FrameMap
from vigorl_core.protocol import parse_conversation, parse_int_pair, parse_response
from vigorl_core.records import Box, Point, Record, RolloutRecord, Sample, Task, Trace
from vigorl_core.rewards import JUDGES, REWARDS, Truth, ci95, judge_for

CI_RULE = ("ci95 is [low, high], a 95% interval of the mean: Wilson score interval for 0/1 scores, "
           "mean +- 1.96*s/sqrt(n) otherwise; means are fractions in [0, 1]")


# ------------------------------------------------------------------------------------------- the record

class Prediction(Record):
    """One evaluated sample. Points say their frame: `points`/`answer_point` in the model frame (what the
    model wrote), `*_original` mapped to the original image (empty when the frame is unknown)."""

    id: str
    benchmark: str = Field(description="key of BENCHMARKS")
    source: str
    task: Task
    mode: str = Field(description="grounded | multiturn | vanilla | answer_only")
    category: str | None = None
    question: str = ""
    options: list[str] = Field(default_factory=list)
    answer: str = Field(description="ground truth as the data writes it")
    bbox: Box | None = Field(default=None, description="ground-truth box, original frame")
    point: tuple[float, float] | None = Field(default=None, description="ground-truth point, original frame")
    truth_box: Box | None = Field(default=None, description="the box the judges used, model frame")
    truth_point: tuple[float, float] | None = Field(default=None, description="the point the judges used, model frame")
    images: list[str] = Field(default_factory=list)
    original_size: tuple[int, int] | None = Field(default=None, description="(width, height) of images[0]")
    model_size: tuple[int, int] | None = Field(default=None, description="(width, height) the model saw")
    text: str = Field(description="the response; the whole conversation for multiturn")
    pred_answer: str | None = Field(description="the parsed answer the judges saw")
    trace: Trace
    points: list[Point] = Field(default_factory=list, description="reasoning points in order, model frame")
    points_original: list[Point] = Field(default_factory=list)
    answer_point: Point | None = None
    answer_point_original: Point | None = None
    score: float = Field(description="strict judge (the rule RL optimises)")
    score_original: float = Field(description="the original eval judge, behind the original format gate")
    judge: str
    judge_original: str
    reward: dict[str, float] = Field(default_factory=dict, description="RL reward of (task, mode): overall, format, "
                                                                       "accuracy")
    finish: str = "answer"
    num_turns: int = 1
    timing: dict[str, float] = Field(default_factory=dict)
    policy: str = Field("", description="model name or path")
    policy_version: int | None = None
    origin: Literal["vigorl", "vlmsearch"] = Field("vigorl", description="vlmsearch: read from the original's files")
    metadata: dict[str, Any] = Field(default_factory=dict)

    @property
    def key(self) -> tuple[str, str]:
        return self.benchmark, self.id

    def frame(self) -> FrameMap | None:
        return FrameMap(self.original_size, self.model_size) if self.original_size and self.model_size else None


def sample_key(sample: Sample) -> tuple[str, str]:
    """The key a Prediction of this sample will have: (benchmark, id)."""
    return benchmark_of(sample), sample.id


# ------------------------------------------------------------------------------------------------ scoring

@dataclass
class Scores:
    trace: Trace
    truth: Truth
    score: float
    score_original: float
    judges: tuple[str, str]
    reward: dict[str, float]


_OBSERVATION_RE = re.compile(r"<observation>.*?</observation>", re.DOTALL)


def split_turns(conversation: str) -> list[str]:
    """Assistant turns of a multi-turn conversation text (the observation turns removed)."""
    return [t.strip() for t in _OBSERVATION_RE.split(conversation) if t.strip()]


def original_format_ok(turns: Sequence[str]) -> bool:
    """The original harness (`single_path_rollouts.py`) sets judge_score to 0 when a reasoning node before the
    answer lacks `<think>` or `</think>` (`Judge.format_check`). A turn holding the answer contributes its
    text before `<answer>` only if it has a `<think>`."""
    nodes = []
    for turn in turns:
        if "<answer>" in turn:
            if "<think>" in turn:
                nodes.append(turn.split("<answer>")[0])
            break
        nodes.append(turn)
    return all("<think>" in n and "</think>" in n for n in nodes)


def truth_for(target: Sample | Prediction, frame: FrameMap | None, task: str) -> Truth:
    """Ground truth in the model frame (rewards.Truth.in_model_frame, as rollouts and MCTS build it), also
    without a frame: grounding needs the frame; other tasks drop a box they cannot map (their judges never read it)."""
    if frame is None:
        if task == "grounding" and (target.bbox or target.point):
            raise ValueError(f"sample {target.id!r}: grounding needs the model frame (FrameMap) to rescale its box")
        return Truth(answer=target.answer)
    return Truth.in_model_frame(target, frame)


def _judges(task: str, truth: Truth) -> tuple[str, str]:
    if task == "grounding" and truth.box is None and truth.point is not None:
        return "point_match", "point_match"  # a point ground truth (no box): the original --judge point_match
    return judge_for(task)


def score_prediction(target: Sample | Truth, text: str, frame: FrameMap | None, mode: str, *,
                     task: str | None = None, trace: Trace | None = None, turns: Sequence[str] | None = None,
                     judge_original: str | None = None, with_reward: bool = True) -> Scores:
    """Score one response. `target` is a Sample (its box rescaled with `frame`) or a model-frame Truth (then
    `task=` is needed). `trace` defaults to parsing `text` (per turn for multiturn); `turns` are the assistant
    turns for the original format gate (default: split from `text` for multiturn, none for single turn: the
    original split single responses by regex, so its gate never fired there)."""
    if isinstance(target, Truth):
        if task is None:
            raise ValueError("score_prediction with a Truth needs task=")
        truth = target
    else:
        task = task or target.task
        truth = truth_for(target, frame, task)
    if turns is None and mode == "multiturn":
        turns = split_turns(text)
    if trace is None:
        trace = parse_conversation(list(turns)) if mode == "multiturn" else parse_response(text)
    strict, original = _judges(task, truth)
    original = judge_original or original
    score = JUDGES[strict](trace.answer, truth)
    score_original = JUDGES[original](trace.answer, truth) if original_format_ok(turns or []) else 0.0
    reward = {}
    if with_reward and (task, mode) in REWARDS and strict != "point_match":  # RL point rewards need a box
        r = REWARDS[(task, mode)](text, truth)
        reward = {"overall": r.overall, "format": r.format, "accuracy": r.accuracy}
    return Scores(trace, truth, score, score_original, (strict, original), reward)


def scored_fields(s: Scores, frame: FrameMap | None, task: str) -> dict[str, Any]:
    """The Prediction fields that follow from scores: answer, points in both frames, scores."""
    def original(p: Point) -> Point:
        x, y = frame.to_original(p.x, p.y)
        return Point(x=x, y=y, frame="original")

    pair = parse_int_pair(s.trace.answer) if task == "grounding" and s.trace.answer else None
    answer_point = Point(x=pair[0], y=pair[1], frame="model") if pair else None
    return dict(pred_answer=s.trace.answer, trace=s.trace, truth_box=s.truth.box, truth_point=s.truth.point,
                points=s.trace.points, points_original=[original(p) for p in s.trace.points] if frame else [],
                answer_point=answer_point, answer_point_original=original(answer_point) if frame and pair else None,
                score=s.score, score_original=s.score_original, judge=s.judges[0], judge_original=s.judges[1],
                reward=s.reward)


def make_prediction(sample: Sample, text: str, *, mode: str, frame: FrameMap | None, trace: Trace | None = None,
                    finish: str = "answer", num_turns: int = 1, timing: Mapping[str, float] | None = None,
                    policy: str = "", policy_version: int | None = None, benchmark: str | None = None) -> Prediction:
    """Score a response to `sample` and build its Prediction. `frame` maps images[0] to the model frame."""
    s = score_prediction(sample, text, frame, mode, trace=trace)
    return Prediction(
        id=sample.id, benchmark=benchmark or benchmark_of(sample), source=sample.source, task=sample.task, mode=mode,
        category=category_of(sample), question=sample.question, options=sample.options, answer=sample.answer,
        bbox=sample.bbox, point=sample.point, images=sample.images,
        original_size=frame.original_size if frame else None, model_size=frame.model_size if frame else None,
        text=text, finish=finish, num_turns=num_turns, timing=dict(timing or {}), policy=policy,
        policy_version=policy_version, **scored_fields(s, frame, sample.task))


def prediction_from_rollout(sample: Sample, record: RolloutRecord, frame: FrameMap, *, policy: str = "") -> Prediction:
    """The Prediction of one finished rollout (PreparedSample.frame is the frame to pass)."""
    return make_prediction(sample, record.text, mode=record.mode, frame=frame, trace=record.trace,
                           finish=record.finish, num_turns=record.num_turns, timing=record.timings, policy=policy,
                           policy_version=max(record.policy_versions, default=None))


def rescore(pred: Prediction, sample: Sample | None = None) -> Prediction:
    """Score a stored prediction again with today's judges; `sample` overrides its ground truth. Records
    read from the original's files keep their model-frame truth and the judge their run used."""
    frame = pred.frame()
    ours = pred.origin == "vigorl"
    if pred.finish == "error" and frame is None:
        return pred  # the eval job's failed sample with an unreadable image: no response, no frame, scores 0
    if ours and frame is not None:
        truth = truth_for(sample or pred, frame, pred.task)
    else:
        truth = Truth(sample.answer if sample and ours else pred.answer, box=pred.truth_box, point=pred.truth_point)
    s = score_prediction(truth, pred.text, frame, pred.mode, task=pred.task, trace=pred.trace,
                         turns=None if ours else pred.metadata.get("thoughts", []),
                         judge_original=None if ours else pred.judge_original, with_reward=ours)
    update = scored_fields(s, frame, pred.task)
    if sample is not None:
        update.update(category=category_of(sample), bbox=sample.bbox, point=sample.point)
        if ours:
            update.update(answer=sample.answer, question=sample.question, options=sample.options)
    return pred.model_copy(update=update)


# ------------------------------------------------------------------------------------------------ metrics

def summarize(scores: Sequence[float]) -> dict[str, Any]:
    mean, low, high = ci95(scores)
    return {"mean": mean, "ci95": [low, high], "n": len(scores)}


def round_floats(obj: Any, digits: int = 6) -> Any:
    """`obj` with every float rounded to `digits` significant digits (for JSON files people read)."""
    if isinstance(obj, float):
        return float(f"{obj:.{digits}g}")
    if isinstance(obj, dict):
        return {k: round_floats(v, digits) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(round_floats(v, digits) for v in obj)
    return obj


def _group_summary(preds: Sequence[Prediction]) -> dict[str, Any]:
    out: dict[str, Any] = {"n": len(preds), "score": summarize([p.score for p in preds]),
                           "score_original": summarize([p.score_original for p in preds])}
    rewarded = [p.reward for p in preds if p.reward]
    if rewarded:
        # The reward's format term is a score, not a rate: the multi-turn one is 1 + 0.2*(U-1) for U distinct
        # zooms. format_rate is the share of responses whose format term is not 0 (the format gate passed).
        out["reward"] = sum(r["overall"] for r in rewarded) / len(rewarded)
        out["format_reward"] = sum(r["format"] for r in rewarded) / len(rewarded)
        out["format_rate"] = sum(r["format"] > 0 for r in rewarded) / len(rewarded)
    return out


def compute_metrics(predictions: Iterable[Prediction]) -> dict[str, Any]:
    """metrics.json: per benchmark the overall and per-category mean, 95% interval and n of `score` and
    `score_original` (+ mean RL reward, mean format reward and format rate where computed), finish counts,
    seconds per sample; floats rounded."""
    groups: dict[str, list[Prediction]] = defaultdict(list)
    for p in predictions:
        groups[p.benchmark].append(p)
    out: dict[str, Any] = {"schema_version": 2, "ci95": CI_RULE, "n": sum(map(len, groups.values())), "benchmarks": {}}
    for name in sorted(groups):
        preds = groups[name]
        entry = {"task": preds[0].task, "modes": dict(Counter(p.mode for p in preds)),
                 "judge": preds[0].judge, "judge_original": preds[0].judge_original, **_group_summary(preds),
                 "finish": dict(Counter(p.finish for p in preds))}
        seconds = [p.timing["seconds"] for p in preds if "seconds" in p.timing]
        if seconds:
            entry["seconds_mean"] = sum(seconds) / len(seconds)
        by_category: dict[str, list[Prediction]] = defaultdict(list)
        for p in preds:
            by_category[p.category or "(none)"].append(p)
        entry["categories"] = ({c: _group_summary(ps) for c, ps in sorted(by_category.items())}
                               if any(p.category for p in preds) else {})
        entry["published"] = BENCHMARKS[name].paper if name in BENCHMARKS else {}
        out["benchmarks"][name] = entry
    return round_floats(out)


# --------------------------------------------------------------------------------- exactly-once bookkeeping

def scan_jsonl(path: str | os.PathLike) -> tuple[list[tuple[int, dict]], int, str | None]:
    """(line, object) of each complete record, the byte length of the good prefix, and a note when a partial
    last line (a killed writer) was dropped. Any other bad line raises DataError(file, line)."""
    data = Path(path).read_bytes()
    records, pos, lineno, note = [], 0, 0, None
    while pos < len(data):
        end = data.find(b"\n", pos)
        nxt = len(data) if end < 0 else end + 1
        raw, lineno = data[pos:nxt], lineno + 1
        try:
            obj = json.loads(raw.decode("utf-8")) if raw.strip() else None
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            if nxt == len(data):
                note = f"{path}:{lineno}: dropped an incomplete last line ({len(raw)} bytes; a killed writer)"
                break
            raise DataError(path, lineno, None, f"invalid JSON: {e}") from None
        if obj is not None and not isinstance(obj, dict):
            raise DataError(path, lineno, None, f"expected a JSON object, got {type(obj).__name__}")
        if obj is not None:
            records.append((lineno, obj))
        pos = nxt
    return records, pos, note


@dataclass
class PredictionsFile:
    predictions: list[Prediction]  # the first line of each key, in file order
    duplicates: list[str]  # later lines of a key already seen (ignored)
    truncated: str | None  # note about a dropped partial last line
    good_bytes: int

    @property
    def keys(self) -> set[tuple[str, str]]:
        return {p.key for p in self.predictions}


def read_predictions(path: str | os.PathLike) -> PredictionsFile:
    """Read predictions.jsonl: first line per (benchmark, id) wins; a partial last line is dropped and reported."""
    if not Path(path).is_file():
        raise DataError(path, None, None, "file not found")
    records, good, note = scan_jsonl(path)
    seen: dict[tuple[str, str], int] = {}
    preds, duplicates = [], []
    for line, obj in records:
        try:
            p = Prediction.model_validate(obj)
        except ValidationError as e:
            err = e.errors()[0]
            raise DataError(path, line, ".".join(map(str, err["loc"])) or None, err["msg"]) from None
        if p.key in seen:
            duplicates.append(f"{p.benchmark}/{p.id} on line {line} (first on line {seen[p.key]})")
            continue
        seen[p.key] = line
        preds.append(p)
    return PredictionsFile(preds, duplicates, note, good)


class PredictionWriter:
    """Append-only predictions.jsonl, one line per (benchmark, id), for ONE writer process (the driver).

    Opening locks the file (a second job on the same run fails instead of interleaving lines), cuts a
    partial last line left by a killed job (`repaired` says so) and loads the finished `keys`. `write`
    skips keys already written, then flushes and fsyncs: a kill loses at most the lines being written,
    and those samples run again on resume."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "ab")  # noqa: SIM115 (held open: the lock lives as long as the writer)
        try:
            fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._file.close()
            raise DataError(self.path, None, None, "another process is writing these predictions") from None
        existing = read_predictions(self.path)
        self.keys, self.duplicates, self.repaired = existing.keys, existing.duplicates, existing.truncated
        if existing.good_bytes < self.path.stat().st_size:
            self._file.truncate(existing.good_bytes)
        if existing.good_bytes:
            with open(self.path, "rb") as f:
                f.seek(existing.good_bytes - 1)
                if f.read(1) != b"\n":
                    self._file.write(b"\n")  # a complete last record without its newline

    def write(self, predictions: Iterable[Prediction]) -> int:
        """Append the predictions whose key is new; returns how many were written."""
        n = 0
        for p in predictions:
            if p.key not in self.keys:
                self._file.write(p.model_dump_json().encode("utf-8") + b"\n")
                self.keys.add(p.key)
                n += 1
        self._file.flush()
        os.fsync(self._file.fileno())
        return n

    def close(self) -> None:
        self._file.close()  # closing releases the lock

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
