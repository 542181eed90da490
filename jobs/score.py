"""Rescore predictions without the model: ours, or the original ViGoRL project's eval rollouts.

    python -m jobs.score --predictions runs/eval/demo/predictions.jsonl            # or: vigorl score ...
    python -m jobs.score --benchmark sat2 --predictions data/rollouts/ViGoRL-7b_sat2_20250601_120000/

Inputs: our predictions.jsonl (or a run folder holding one), or the original harness's outputs (one
rollouts_*.jsonl or the folder with all of them and args.json). `--samples FILE` (any schema that
vigorl_core.data.load_samples reads) supplies ground truth and categories by id.
Outputs, in `--out` (default: <predictions folder>/rescored-<benchmark|all>/): predictions.jsonl
(rescored, our format), metrics.json, report.md with plots/ and examples/; the run's own files are left
alone. It prints a summary table and whether the rescored scores equal the stored ones (for the original's
files: `score_original` against the stored `judge_score`). A partial last line from a killed job is
dropped and reported; any other bad line is an error naming file:line.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from pydantic import Field

from jobs.common import run_main
from vigorl_core.evals.benchmarks import BENCHMARKS, get_benchmark
from vigorl_core.config import ConfigError, StageConfig, parse_config


class ScoreConfig(StageConfig):
    """Rescore predictions (ours or the original project's eval rollouts) and write metrics and a report."""

    predictions: str = Field(description="predictions.jsonl or its run folder; or the original's rollouts_*.jsonl "
                                         "file or folder")
    benchmark: str | None = Field(None, description="benchmark name (docs/evaluation.md); required for the original's "
                                                    "files; for ours it selects one (default: every one in the file)")
    samples: str | None = Field(None, description="benchmark data file giving ground truth and categories by id")
    data_root: str | None = Field(None, description="root of relative image paths in --samples (default: its folder)")
    out: str | None = Field(None, description="output folder (default: <predictions folder>/rescored-<benchmark|all>)")
    report: bool = Field(True, description="write report.md with plots and annotated examples")
    examples: int = Field(3, ge=0, description="annotated examples per benchmark, of correct and of wrong answers")


def _samples(cfg: ScoreConfig, ev) -> dict[tuple[str, str], object]:
    from vigorl_core.data import load_samples

    spec = get_benchmark(cfg.benchmark) if cfg.benchmark else None
    samples = load_samples(cfg.samples, data_root=cfg.data_root, task=spec.task if spec else None,
                           source=spec.source if spec else None, check_images=False)
    return {ev.sample_key(s): s for s in samples}


def _compare(label: str, ids: list[str], stored: list[float], rescored: list[float]) -> tuple[dict, str]:
    differ = [i for i, a, b in zip(ids, stored, rescored) if a != b]
    same = len(ids) - len(differ)
    line = f"{label}: rescored equals stored on {same}/{len(ids)}"
    return {"equal": same, "n": len(ids), "differ": differ[:20]}, line + (f" (differ: {differ[:5]})" if differ else "")


def _run(argv: list[str]) -> int:
    cfg = parse_config(ScoreConfig, argv, prog="vigorl score")
    from vigorl_core.evals import evaluation as ev
    from vigorl_core.evals import original_eval
    from vigorl_core.data import write_jsonl
    from vigorl_core.evals.report import format_summary, write_report

    if cfg.benchmark is not None:
        get_benchmark(cfg.benchmark)
    path = Path(cfg.predictions)
    fmt = original_eval.detect_format(path)
    samples = _samples(cfg, ev) if cfg.samples else {}
    notes: list[str] = []
    checks: dict[str, dict] = {}
    if fmt == "vlmsearch":
        if cfg.benchmark is None:
            raise ConfigError("--benchmark is required for the original project's files; one of "
                              + ", ".join(BENCHMARKS))
        by_id = {sid: s for (bench, sid), s in samples.items() if bench == cfg.benchmark}
        rescored, notes = original_eval.read_original_rollouts(path, cfg.benchmark, samples=by_id)
        stored = [float(p.metadata["judge_score"] or 0.0) for p in rescored]
        checks["score_original"], line = _compare("score_original vs the stored judge_score", [p.id for p in rescored],
                                                  stored, [p.score_original for p in rescored])
        lines = [line]
    else:
        file = ev.read_predictions(path / "predictions.jsonl" if path.is_dir() else path)
        notes += ([file.truncated] if file.truncated else []) + [f"duplicate ignored: {d}" for d in file.duplicates]
        preds = [p for p in file.predictions if cfg.benchmark in (None, p.benchmark)]
        if not preds:
            found = sorted({p.benchmark for p in file.predictions})
            raise ValueError(f"{path}: no predictions of benchmark {cfg.benchmark!r}; the file has {found or 'none'}")
        missing = [p.id for p in preds if samples and p.key not in samples]
        if missing:
            notes.append(f"{len(missing)} predictions have no sample in {cfg.samples} (e.g. {missing[0]!r}); "
                         "their stored ground truth is used")
        rescored = [ev.rescore(p, samples.get(p.key)) for p in preds]
        lines = []
        for key in ("score", "score_original"):
            checks[key], line = _compare(key, [f"{p.benchmark}/{p.id}" for p in preds],
                                         [getattr(p, key) for p in preds], [getattr(p, key) for p in rescored])
            lines.append(line)

    out = Path(cfg.out) if cfg.out else (path if path.is_dir() else path.parent) / f"rescored-{cfg.benchmark or 'all'}"
    metrics = ev.compute_metrics(rescored)
    metrics["rescoring"] = {"input": str(path), "format": fmt, "samples": cfg.samples, "stored_vs_rescored": checks,
                            "notes": notes}
    write_jsonl(rescored, out / "predictions.jsonl")
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    if cfg.report:
        write_report(out, rescored, metrics, examples=cfg.examples, title=f"Rescored predictions: {path.name}")
    for note in notes:
        print(f"note: {note}")
    print(format_summary(metrics))
    for line in lines:
        print(line)
    print(f"wrote {out / 'metrics.json'}" + (f", {out / 'report.md'}" if cfg.report else ""))
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_main(_run, argv)


if __name__ == "__main__":
    sys.exit(main())
