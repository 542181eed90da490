"""Grounding-behaviour counts of reasoning traces, one column per file (model), as the paper's table.

    vigorl behaviour --files [runs/eval/sft/predictions.jsonl, runs/eval/grpo/predictions.jsonl]
    vigorl behaviour --files [runs/grpo/demo/rollouts.jsonl] --radius 28 --out runs/behaviour/grpo
    vigorl behaviour --files [a.jsonl, b.jsonl] --labels [SFT, RL] --correct_only true --benchmark vstar

Reads predictions.jsonl (eval, `vigorl score`), GRPO rollouts.jsonl or saved /v1/grounded answers, counts
per trace with the rules of vigorl_core.behaviour (points, regions explored at `--radius` model-frame pixels,
revisits, zooms, points inside the ground-truth box, backtracking and verification phrases), and prints the
mean of each per file. `--correct_only` keeps the traces known to be correct (the paper's section 5.3 counts
only those). `--out FOLDER` writes behaviour.json and behaviour.md there.

Not here yet: the LLM judge (vigorl_core.behaviour has its prompts and `<count>N` parser; running it through
the Critic deployment is future work).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from pydantic import Field

from jobs.common import run_main
from vigorl_core.config import ConfigError, StageConfig, parse_config


class BehaviourConfig(StageConfig):
    """Rule-based grounding-behaviour counts per file of traces, side by side."""

    files: list[str] = Field(min_length=1, description="predictions.jsonl / rollouts.jsonl files or run folders")
    labels: list[str] | None = Field(None, description="column label per file (default: the run folder's name)")
    radius: float = Field(56.0, gt=0, description="model-frame pixels within which two points are one region")
    correct_only: bool = Field(False, description="count only traces known to be correct")
    benchmark: str | None = Field(None, description="only traces of this benchmark (predictions files)")
    out: str | None = Field(None, description="folder for behaviour.json and behaviour.md")


def default_label(path: Path) -> str:
    """The run's folder name for a file inside a run folder (runs/eval/<name>/predictions.jsonl), else its stem."""
    if path.is_dir():
        return path.name
    return path.parent.name if path.name in ("predictions.jsonl", "rollouts.jsonl") and path.parent.name else path.stem


def _run(argv: list[str]) -> int:
    cfg = parse_config(BehaviourConfig, argv, prog="vigorl behaviour")
    from vigorl_core.behaviour import behaviour_table, format_table, load_traces, markdown_table

    paths = [Path(f) for f in cfg.files]
    labels = cfg.labels or [default_label(p) for p in paths]
    if len(labels) != len(paths):
        raise ConfigError(f"--labels: {len(labels)} labels for {len(paths)} files")
    if len(set(labels)) != len(labels):
        labels = [f"{label} ({i + 1})" for i, label in enumerate(labels)]
    columns = {}
    for label, path in zip(labels, paths):
        traces = load_traces(path)
        if cfg.benchmark:
            traces = [t for t in traces if t.benchmark == cfg.benchmark]
        if cfg.correct_only and all(t.correct is None for t in traces):
            raise ConfigError(f"--correct_only: {path} does not say which traces are correct (no score or accuracy)")
        columns[label] = traces
    table = behaviour_table(columns, cfg.radius, cfg.correct_only)
    scope = (f"{'correct traces' if cfg.correct_only else 'all traces'}"
             f"{f' of {cfg.benchmark}' if cfg.benchmark else ''}; regions at radius {cfg.radius:g} model-frame px")
    print(f"grounding behaviour ({scope})\n{format_table(table)}")
    if cfg.out:
        out = Path(cfg.out)
        out.mkdir(parents=True, exist_ok=True)
        record = {"files": dict(zip(labels, cfg.files)), "radius": cfg.radius, "correct_only": cfg.correct_only,
                  "benchmark": cfg.benchmark, "table": table}
        (out / "behaviour.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        (out / "behaviour.md").write_text(f"# Grounding behaviour\n\n{scope}.\n\n{markdown_table(table)}\n",
                                          encoding="utf-8")
        print(f"wrote {out / 'behaviour.json'}, {out / 'behaviour.md'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_main(_run, argv)


if __name__ == "__main__":
    sys.exit(main())
