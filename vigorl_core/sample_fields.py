"""What a record's own text and paths say about its sample: the lettered options in a question, a box or
point answer, the task and source a file path names, the V*Bench category an image path names. Used when
loading data (vigorl_core.data) and evaluating it (vigorl_core.evals.benchmarks, vigorl_core.evals.original_eval).

    parse_options("Which is closer?\n(A) chair\n(B) table")       # ["chair", "table"]
    infer_task_source("data/spatial_reasoning/sat2_test/sat2_test.jsonl")  # ("spatial", "sat2")
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path

_OPTION_LINE = re.compile(r"^\s*\(?([A-Z])[.)]\s+(.+?)\s*$")
_OPTION_INLINE = re.compile(r"\(([A-Z])\)\s*")
_NUM = r"\s*(-?\d+(?:\.\d+)?)\s*"
BOX_RE = re.compile(rf"^\s*[(\[]?{_NUM},{_NUM},{_NUM},{_NUM}[)\]]?\s*$")
POINT_RE = re.compile(rf"^\s*[(\[]?{_NUM},{_NUM}[)\]]?\s*$")


def parse_options(question: str) -> list[str]:
    """Lettered options ("A. left", "(A) left", "A) left" lines, or "(A) x (B) y" on one line) as option
    text; [] unless at least two options lettered A, B, ... in order."""
    lines = question.splitlines()
    run: list[str] = []
    for text in lines:
        m = _OPTION_LINE.match(text)
        if m and ord(m[1]) - ord("A") == len(run):
            run.append(m[2])
        elif len(run) >= 2:
            return run
        else:
            run = [m[2]] if m and m[1] == "A" else []
    if len(run) >= 2:
        return run
    for text in lines:
        parts = _OPTION_INLINE.split(text)  # [before, "A", text, "B", text, ...]
        letters, texts = parts[1::2], [p.strip().rstrip(",;").strip() for p in parts[2::2]]
        if len(letters) >= 2 and letters == [chr(ord("A") + i) for i in range(len(letters))]:
            return texts
    return []


def path_category(images: Sequence[str]) -> str | None:
    """The V*Bench category its image paths name: it keeps its two categories as folder names."""
    return next((c for c in ("direct_attributes", "relative_position") if any(c in p for p in images)), None)


# (pattern on a lower-cased path part with "-" as "_", task, source); the first part that matches wins,
# starting at the file name, so vstar/vigorl_SA_MCTS.jsonl is SA training data, not V*.
_PATH_RULES: list[tuple[re.Pattern, str, str | None]] = [
    (re.compile(r"screenspot_pro"), "grounding", "screenspot_pro"),
    (re.compile(r"screenspot_v2"), "grounding", "screenspot_v2"),
    (re.compile(r"osatlas"), "grounding", "osatlas"),
    (re.compile(r"sat2"), "spatial", "sat2"),
    (re.compile(r"blink"), "spatial", "blink"),
    (re.compile(r"robospatial"), "spatial", "robospatial"),
    (re.compile(r"vstar"), "visual_search", "vstar"),
    (re.compile(r"web_action|(?<![a-z])(vwa|ical)(?![a-z])"), "web_action", "vwa"),
    (re.compile(r"(?<![a-z])sa_"), "visual_search", None),
]


def infer_task_source(path: str | os.PathLike) -> tuple[str | None, str | None]:
    """(task, source) named by the file name or its two parent folders, else None for what is unknown."""
    for part in list(reversed(Path(path).parts))[:3]:
        part = part.lower().replace("-", "_")
        for pattern, task, source in _PATH_RULES:
            if pattern.search(part):
                return task, source
    return None, None
