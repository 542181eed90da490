"""Grounding-behaviour counts of reasoning traces, one column per file (model), as the paper's table.

    vigorl behaviour --files [runs/eval/sft/predictions.jsonl, runs/eval/grpo/predictions.jsonl]
    vigorl behaviour --files [runs/grpo/demo/rollouts.jsonl] --radius 28 --out runs/behaviour/grpo
    vigorl behaviour --files [a.jsonl, b.jsonl] --labels [SFT, RL] --correct_only true --benchmark vstar

Reads predictions.jsonl (eval, `vigorl score`), GRPO rollouts.jsonl or saved /v1/grounded answers, counts
per trace with the rules of vigorl_core.evals.behaviour (points, regions explored at `--radius` model-frame pixels,
revisits, zooms, points inside the ground-truth box, backtracking and verification phrases), and prints the
mean of each per file. `--correct_only` keeps the traces known to be correct (the paper's section 5.3 counts
only those). `--out FOLDER` writes behaviour.json and behaviour.md there.

LLM judge (optional, slower): `--judge_model PATH` serves any local vLLM model in the project's Critic
deployment (a Serve app on a local Ray, or the cluster in RAY_ADDRESS) and asks it, per trace, the four
counts of the original analysis (visual verification, backtracking, subgoal setting, regions explored), each
reply constrained to `<count>N</count>`; their means are added as `judge: ...` rows. `--judge_limit` caps the
traces per file it reads.

    vigorl behaviour --files [a.jsonl, b.jsonl] --judge_model /models/Qwen2.5-7B-Instruct --judge_gpus 1
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
    judge_model: str | None = Field(None, description="model folder of an LLM judge served by the Critic deployment "
                                                      "(adds its four counts per trace; default: rules only)")
    judge_gpus: float = Field(0.0, ge=0, description="GPUs of the judge's Critic replica")
    judge_max_model_len: int = Field(8192, description="the judge engine's context")
    judge_limit: int = Field(200, ge=1, description="traces per file the judge reads (the first ones)")


def judge_rows(critic, columns: dict[str, list], limit: int) -> dict[str, dict[str, float]]:
    """`judge: <kind>` -> column label -> mean count, from a Critic handle (every request sent before any wait)."""
    from vigorl_core.evals.behaviour import JUDGE_QUESTIONS, judge_prompt, reasoning_text

    pending = {(kind, label): [critic.count.remote(judge_prompt(kind, t.question, reasoning_text(t.trace)))
                               for t in traces[:limit]]
               for kind in JUDGE_QUESTIONS for label, traces in columns.items()}
    rows: dict[str, dict[str, float]] = {f"judge: {kind}": {} for kind in JUDGE_QUESTIONS}
    for (kind, label), responses in pending.items():
        counts = [n for n in (r.result() for r in responses) if n is not None]
        if counts:
            rows[f"judge: {kind}"][label] = sum(counts) / len(counts)
    return rows


def start_judge(cfg: BehaviourConfig):
    """A Critic hosting the judge model, as Serve app 'behaviour-judge' (handles only, no HTTP)."""
    from ray import serve

    from jobs.common import init_ray, local_model
    from services.critic import Critic

    init_ray()
    serve.start(proxy_location="Disabled", logging_config={"enable_access_log": False})
    engine = {"model": local_model(cfg.judge_model), "max_model_len": cfg.judge_max_model_len}
    critic = Critic.options(ray_actor_options={"num_cpus": 1, "num_gpus": cfg.judge_gpus}).bind(engine)
    print(f"starting the judge {cfg.judge_model} in a Critic replica", flush=True)
    return serve.run(critic, name="behaviour-judge", route_prefix=None)


def default_label(path: Path) -> str:
    """The run's folder name for a file inside a run folder (runs/eval/<name>/predictions.jsonl), else its stem."""
    if path.is_dir():
        return path.name
    return path.parent.name if path.name in ("predictions.jsonl", "rollouts.jsonl") and path.parent.name else path.stem


def _run(argv: list[str]) -> int:
    cfg = parse_config(BehaviourConfig, argv, prog="vigorl behaviour")
    from vigorl_core.evals.behaviour import behaviour_table, format_table, load_traces, markdown_table

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
        columns[label] = [t for t in traces if t.correct or not cfg.correct_only]
    table = behaviour_table(columns, cfg.radius)
    judged = {}
    if cfg.judge_model:
        from ray import serve

        try:
            judged = judge_rows(start_judge(cfg), columns, cfg.judge_limit)
        finally:
            serve.delete("behaviour-judge")
    scope = (f"{'correct traces' if cfg.correct_only else 'all traces'}"
             f"{f' of {cfg.benchmark}' if cfg.benchmark else ''}; regions at radius {cfg.radius:g} model-frame px"
             f"{f'; judge {cfg.judge_model} on up to {cfg.judge_limit} traces per file' if judged else ''}")
    print(f"grounding behaviour ({scope})\n{format_table(table, judged)}")
    if cfg.out:
        out = Path(cfg.out)
        out.mkdir(parents=True, exist_ok=True)
        record = {"files": dict(zip(labels, cfg.files)), "radius": cfg.radius, "correct_only": cfg.correct_only,
                  "benchmark": cfg.benchmark, "table": table, "judge_model": cfg.judge_model, "judge": judged}
        (out / "behaviour.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        (out / "behaviour.md").write_text(f"# Grounding behaviour\n\n{scope}.\n\n{markdown_table(table, judged)}\n",
                                          encoding="utf-8")
        print(f"wrote {out / 'behaviour.json'}, {out / 'behaviour.md'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_main(_run, argv)


if __name__ == "__main__":
    sys.exit(main())
