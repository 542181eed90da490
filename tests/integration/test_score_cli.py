"""Subprocess smoke runs of `python -m jobs.score` on the original's eval files and on our predictions.

No model, no Ray: rescoring must reproduce the stored scores (the original's judge_score, our score and
score_original) and write metrics.json, the rescored predictions and the report.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from vigorl_core.evals import evaluation as E
from vigorl_core.data import load_samples
from vigorl_core.frames import FrameMap, get_profile
from vigorl_core.synthetic.tasks import write_dataset


def score(args: list[str], env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "jobs.score", *args], env=env, capture_output=True, text=True,
                          timeout=120)


def original_run(folder: Path) -> list[dict]:
    """An eval run folder of the original harness: args.json, two workers' files, an error log, and a
    partial last line from a killed worker."""
    folder.mkdir(parents=True)
    (folder / "args.json").write_text(json.dumps({"judge": "string_match", "pretrained": "gsarch/ViGoRL-7b-Spatial"}))
    think = ["<think> The chair is at (120, 340). The table is at (400, 310). </think>"]
    rows = [("chair", "chair", 1.0), ("chair", "the chair", 1.0), ("Table", "table.", 1.0), ("chair", "table", 0.0),
            ("left", None, None), ("right", "B. right", 1.0)]
    records = [{"question": "<image>\nWhich object is closer?", "image": f"/data/sat2/{i}.png", "true_answer": gt,
                "thoughts": think, "final_answer": final, "system_prompt": "...", "judge_score": js,
                "scale_factor": 1.0, "id": i} for i, (gt, final, js) in enumerate(rows)]
    lines = [json.dumps(r) for r in records]
    (folder / "rollouts_sat2_20250601_worker0_ckpt10.jsonl").write_text("\n".join(lines[:3]) + "\n")
    (folder / "rollouts_sat2_20250601_worker1_final.jsonl").write_text("\n".join(lines[3:]) + "\n" + lines[0][:30])
    (folder / "errors_sat2_20250601_worker1_final.jsonl").write_text('{"id": 9, "error": "timeout"}\n')
    return records


def test_rescoring_the_original_eval_files(tmp_path: Path, subprocess_env):
    run = tmp_path / "rollouts" / "ViGoRL-7b_sat2_20250601_120000"
    records = original_run(run)
    result = score(["--benchmark", "sat2", "--predictions", str(run), "--out", str(tmp_path / "out")], subprocess_env)
    assert result.returncode == 0, result.stderr
    stored = [float(r["judge_score"] or 0) for r in records]
    assert "score_original vs the stored judge_score: rescored equals stored on 6/6" in result.stdout
    assert "dropped an incomplete last line" in result.stdout and "sat2 " in result.stdout
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    sat2 = metrics["benchmarks"]["sat2"]
    # metrics.json rounds floats to 6 significant digits
    assert sat2["score_original"]["mean"] == pytest.approx(sum(stored) / 6, rel=1e-5)
    assert sat2["score_original"]["n"] == 6
    assert sat2["score"]["mean"] == 3 / 6  # strict: no credit for "the chair"
    assert metrics["rescoring"]["stored_vs_rescored"]["score_original"] == {"equal": 6, "n": 6, "differ": []}
    rescored = E.read_predictions(tmp_path / "out" / "predictions.jsonl").predictions
    assert [p.origin for p in rescored] == ["vlmsearch"] * 6 and rescored[0].policy == "gsarch/ViGoRL-7b-Spatial"
    assert "No annotated examples" in (tmp_path / "out" / "report.md").read_text()


def test_rescoring_our_predictions_equals_the_stored_scores(tmp_path: Path, subprocess_env):
    profile = get_profile("tiny")
    preds = []
    for task, answer in (("grounding", None), ("spatial", "left")):
        for i, s in enumerate(load_samples(write_dataset(task, 4, 0, tmp_path / "data" / task))):
            frame = FrameMap.for_image(*s.metadata["image_size"], profile)
            if task == "grounding":
                x1, y1, x2, y2 = frame.box_to_model(s.bbox)
                answer = f"({round((x1 + x2) / 2) + 60 * (i % 2)}, {round((y1 + y2) / 2)})"
            text = f"<think> It is at (12, 34). </think>\n<answer> {answer} </answer>"
            preds.append(E.make_prediction(s, text, mode="grounded", frame=frame, timing={"seconds": 0.5},
                                           policy="tiny"))
    path = tmp_path / "runs" / "evaluate" / "demo" / "predictions.jsonl"
    with E.PredictionWriter(path) as w:
        w.write(preds)
    result = score(["--predictions", str(path.parent)], subprocess_env)
    assert result.returncode == 0, result.stderr
    assert "score: rescored equals stored on 8/8" in result.stdout
    assert "score_original: rescored equals stored on 8/8" in result.stdout
    out = path.parent / "rescored-all"
    rescored = E.read_predictions(out / "predictions.jsonl").predictions
    assert [(p.key, p.score, p.score_original) for p in rescored] == [(p.key, p.score, p.score_original) for p in preds]
    metrics = json.loads((out / "metrics.json").read_text())
    expected = json.loads(json.dumps(E.compute_metrics(preds)))
    assert metrics["benchmarks"] == expected["benchmarks"]
    assert set(metrics["benchmarks"]) == {"synthetic_grounding", "synthetic_spatial"}
    report = (out / "report.md").read_text()
    assert "examples/synthetic_grounding-grounding-0-00000.png" in report
    assert (out / "plots" / "synthetic_spatial.svg").is_file()

    # one benchmark, ground truth from --samples: the grounding boxes move, so the scores change
    moved = tmp_path / "moved.jsonl"
    samples = load_samples(tmp_path / "data" / "grounding" / "samples.jsonl")
    moved.write_text("".join(s.model_copy(update={"bbox": (0.0, 0.0, 5.0, 5.0)}).model_dump_json() + "\n"
                             for s in samples))
    result = score(["--predictions", str(path), "--benchmark", "synthetic_grounding", "--samples", str(moved),
                    "--out", str(tmp_path / "moved-out"), "--report", "false"], subprocess_env)
    assert result.returncode == 0, result.stderr
    assert "score: rescored equals stored on 2/4 (differ: ['synthetic_grounding/grounding-0-00000', " \
        "'synthetic_grounding/grounding-0-00002'])" in result.stdout  # the 2 misses stay misses
    metrics = json.loads((tmp_path / "moved-out" / "metrics.json").read_text())
    assert metrics["benchmarks"]["synthetic_grounding"]["score"]["mean"] == 0.0
    assert not (tmp_path / "moved-out" / "report.md").exists()


def test_clear_errors(tmp_path: Path, subprocess_env):
    result = score(["--predictions", str(tmp_path / "missing.jsonl")], subprocess_env)
    assert result.returncode == 2 and result.stderr.strip() == f"error: {tmp_path / 'missing.jsonl'}: file not found"
    run = tmp_path / "orig"
    original_run(run)
    result = score(["--predictions", str(run)], subprocess_env)
    assert result.returncode == 2 and "--benchmark is required for the original project's files" in result.stderr
    bad = tmp_path / "predictions.jsonl"
    pred = E.make_prediction(load_samples(write_dataset("spatial", 1, 0, tmp_path / "d"))[0],
                             "<answer> left </answer>", mode="answer_only", frame=None)
    bad.write_text(f"{pred.model_dump_json()}\nnot json\n{pred.model_dump_json()}\n")
    result = score(["--predictions", str(bad)], subprocess_env)
    assert result.returncode == 2 and f"{bad}:2: invalid JSON" in result.stderr and "Traceback" not in result.stderr
    result = score(["--predictions", str(bad), "--benchmark", "nope"], subprocess_env)
    assert result.returncode == 2 and "unknown benchmark 'nope'" in result.stderr
