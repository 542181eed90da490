"""The original ViGoRL project's eval output files (`rollouts_*.jsonl`), read as our Predictions.

`vigorl score` uses this to rescore them, so numbers can be compared with published ones; the format and
the judges are in docs/evaluation.md. A record is {question, image, true_answer (already in the resized
frame), thoughts[], final_answer, system_prompt, judge_score, scale_factor, id}; the original's metric is the
mean judge_score, which is 0 when an intermediate step fails its format check.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from vigorl_core.evals.benchmarks import Benchmark, category_of, get_benchmark
from vigorl_core.data import DataError
from vigorl_core.evals.evaluation import Prediction, scan_jsonl, score_prediction, scored_fields
from vigorl_core.protocol import parse_conversation
from vigorl_core.records import Sample
from vigorl_core.rewards import Truth
from vigorl_core.sample_fields import path_category

# --judge of the original harness -> our JUDGES entry that reproduces it.
ORIGINAL_JUDGES = {"string_match": "string_match_original", "point_in_bbox": "point_in_bbox",
                   "point_match": "point_match", "web_action": "web_action_original"}
_NUMS_RE = re.compile(r"-?\d+(?:\.\d+)?")


def detect_format(path: str | os.PathLike) -> Literal["vigorl", "vlmsearch"]:
    """`vigorl` (our predictions.jsonl, or a run folder holding one) or `vlmsearch` (the original's eval
    rollouts: a rollouts_*.jsonl file or their folder), from the first record."""
    path = Path(path)
    if path.is_dir():
        if (path / "predictions.jsonl").is_file():
            return "vigorl"
        if any(path.glob("rollouts_*.jsonl")):
            return "vlmsearch"
        raise DataError(path, None, None, "no predictions.jsonl and no rollouts_*.jsonl in this folder")
    if not path.is_file():
        raise DataError(path, None, None, "file not found")
    records, _, _ = scan_jsonl(path)
    if not records:
        raise DataError(path, None, None, "no records")
    line, first = records[0]
    if "true_answer" in first:
        return "vlmsearch"
    if "schema_version" in first and "benchmark" in first:
        return "vigorl"
    raise DataError(path, line, None, f"unknown predictions format with keys {sorted(first)}; expected ours "
                    "(schema_version, benchmark, ...) or the original eval's (id, true_answer, final_answer, thoughts)")


def _get(obj: dict, key: str, types: tuple[type, ...], path: Path, line: int, default: Any = ...) -> Any:
    if key not in obj:
        if default is not ...:
            return default
        raise DataError(path, line, key, "missing")
    value = obj[key]
    if not isinstance(value, types) or isinstance(value, bool):
        names = " or ".join("null" if t is type(None) else t.__name__ for t in types)
        raise DataError(path, line, key, f"expected {names}, got {'null' if value is None else type(value).__name__}")
    return value


def read_original_rollouts(path: str | os.PathLike, benchmark: str, *,
                           samples: Mapping[str, Sample] | None = None) -> tuple[list[Prediction], list[str]]:
    """The original harness's eval records {id, question, image, true_answer, thoughts, final_answer,
    judge_score, scale_factor} as Predictions (first record per id), and notes on what was dropped.

    `path` is one rollouts_*.jsonl or the run folder (every rollouts_*.jsonl); its args.json, when present,
    gives the judge and whether zoom was on. `true_answer` boxes are already in the original run's resized
    frame, which the record does not describe: original-frame points stay empty. The stored judge_score is
    kept in metadata; `score_original` is recomputed (jobs/score.py compares the two)."""
    spec, path = get_benchmark(benchmark), Path(path)
    if path.is_dir():
        files, args_file = sorted(path.glob("rollouts_*.jsonl")), path / "args.json"
        if not files:
            raise DataError(path, None, None, "no rollouts_*.jsonl files in this folder")
    elif path.is_file():
        files, args_file = [path], path.parent / "args.json"
    else:
        raise DataError(path, None, None, "file not found")
    args = json.loads(args_file.read_text()) if args_file.is_file() else {}
    if args and args.get("judge") not in ORIGINAL_JUDGES:
        raise DataError(args_file, None, "judge", f"expected one of {', '.join(ORIGINAL_JUDGES)} (an LLM judge "
                        f"cannot be rescored without it), got {args.get('judge')!r}")
    judge = ORIGINAL_JUDGES[args["judge"]] if args else None
    mode = ("multiturn" if args.get("check_for_crop") or args.get("multicrop") else "grounded") if args else spec.mode
    policy = str(args.get("pretrained") or args.get("model") or "")
    preds, notes, seen = [], [], {}
    for file in files:
        records, _, note = scan_jsonl(file)
        notes += [note] if note else []
        for line, rec in records:
            pred = _original_prediction(rec, file, line, benchmark, spec, mode, judge, policy, samples)
            if pred.id in seen:
                notes.append(f"{file.name}:{line}: id {pred.id!r} again (first at {seen[pred.id]}); kept the first")
                continue
            seen[pred.id] = f"{file.name}:{line}"
            preds.append(pred)
    return preds, notes


def _original_prediction(rec: dict, file: Path, line: int, benchmark: str, spec: Benchmark, mode: str,
                         judge: str | None, policy: str, samples: Mapping[str, Sample] | None) -> Prediction:
    id_ = str(_get(rec, "id", (str, int), file, line))
    true_answer = _get(rec, "true_answer", (str,), file, line)
    final = _get(rec, "final_answer", (str, type(None)), file, line, None)
    thoughts = _get(rec, "thoughts", (list,), file, line, [])
    if not all(isinstance(t, str) for t in thoughts):
        raise DataError(file, line, "thoughts", "expected a list of strings")
    stored = _get(rec, "judge_score", (int, float, type(None)), file, line, None)
    image = _get(rec, "image", (str,), file, line, "")
    box = point = None
    if spec.task == "grounding":
        nums = [float(v) for v in _NUMS_RE.findall(true_answer)]
        box, point = (tuple(nums), None) if len(nums) == 4 else (None, tuple(nums) if len(nums) == 2 else None)
        if box is None and point is None:
            raise DataError(file, line, "true_answer", f"expected a box '(x1, y1, x2, y2)', got {true_answer!r}")
    turns = thoughts + ([f"<answer> {final} </answer>"] if final is not None else [])
    trace = parse_conversation(turns)
    trace.answer = final  # exactly what the original judged
    truth = Truth(true_answer, box=box, point=point)
    s = score_prediction(truth, "\n".join(turns), None, mode, task=spec.task, trace=trace, turns=thoughts,
                         judge_original=judge, with_reward=False)
    sample = (samples or {}).get(id_)
    return Prediction(
        id=id_, benchmark=benchmark, source=spec.source, task=spec.task, mode=mode,
        category=category_of(sample) if sample else path_category([image]),
        question=str(rec.get("question") or "").replace("<image>", "").strip(), answer=true_answer,
        bbox=sample.bbox if sample else None, point=sample.point if sample else None, images=[image] if image else [],
        text="\n".join(turns), finish="answer" if final is not None else "no_answer",
        num_turns=len(turns) if mode == "multiturn" else 1, policy=policy, origin="vlmsearch",
        metadata={"judge_score": stored, "scale_factor": rec.get("scale_factor"), "thoughts": thoughts,
                  "file": f"{file.name}:{line}"},
        **scored_fields(s, None, spec.task))
