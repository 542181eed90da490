"""The evaluation job on real Ray Data, Ray Serve and vLLM (tiny model): outputs, resume, exactly-once.

Runs in-process against the session's Serve app (`policy.app = "vigorl"`), so no second engine starts.
Benchmark files are written here in the original project's schemas (A: vlmsearch JSONL, B: RL JSONL,
C: sharegpt JSON) and ours (synthetic), one small file per benchmark.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from PIL import Image

from jobs import evaluate as job
from vigorl_core.evals import evaluation as E
from vigorl_core.evals.benchmarks import get_benchmark
from vigorl_core.data import load_samples, to_rl_record, to_vlmsearch_record, write_jsonl
from vigorl_core.records import Sample
from vigorl_core.synthetic.tasks import write_dataset

pytestmark = pytest.mark.slow

MULTITURN = {"vstar", "synthetic_visual_search"}


def _image(path: Path, size=(320, 240), colour=(90, 140, 200)) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.new("RGB", size, (235, 235, 235))
    image.paste(colour, (size[0] // 2, size[1] // 3, size[0] // 2 + 30, size[1] // 3 + 24))
    image.save(path)
    return str(path)


def _samples(root: Path, source: str, task: str, answers: list[str], folder: str = "img", **kw) -> list[Sample]:
    return [Sample(id=f"{source}-{i}", task=task, source=source, images=[_image(root / folder / f"{source}-{i}.png")],
                   question=f"Question {i} about the {source} image?", answer=a, **kw) for i, a in enumerate(answers)]


def _write_benchmarks(root: Path) -> dict[str, Path]:
    """One small file per benchmark, each in a schema the original release (or ours) uses."""
    files = {}
    spatial = {"options": ["left", "right"], "metadata": {"question_type": "left_right"}}
    sat2 = _samples(root, "sat2", "spatial", ["left", "right", "left"], **spatial)
    (root / "img" / "sat2-2.png").write_bytes(b"not a png")  # unreadable image: a finish="error" prediction
    for name, samples in {
        "sat2": sat2,
        "blink": _samples(root, "blink", "spatial", ["right", "left"], **spatial),
        "vstar": _samples(root, "vstar", "visual_search", ["red", "blue"], folder="vstar/direct_attributes",
                          options=["red", "blue"]),
        "screenspot_v2": _samples(root, "screenspot_v2", "grounding", ["(160, 80, 190, 104)"] * 2,
                                  metadata={"data_type": "icon"}),
    }.items():  # schema A
        files[name] = root / name / "test.jsonl"
        write_jsonl([to_vlmsearch_record(s, root) for s in samples], files[name])
    for name, task, answer in (("screenspot_pro", "grounding", "(160, 80, 190, 104)"), ("osatlas", "grounding",
                               "(10, 10, 50, 40)"), ("vwa", "web_action", "click [12]")):  # schema B
        files[name] = root / name / "val_RL.jsonl"
        write_jsonl([to_rl_record(s, root) for s in _samples(root, name, task, [answer] * 2)], files[name])
    files["robospatial"] = root / "robospatial" / "sharegpt.json"  # schema C: a JSON array
    files["robospatial"].parent.mkdir(parents=True)
    files["robospatial"].write_text(json.dumps([
        {"id": s.id, "messages": [{"role": "user", "content": f"<image>{s.question}"}], "images": s.images,
         "gt_answer": s.answer} for s in _samples(root, "robospatial", "spatial", ["yes", "no"])], indent=1))
    for task, n in (("grounding", 3), ("spatial", 3), ("visual_search", 3)):  # ours
        files[f"synthetic_{task}"] = write_dataset(task, n, 0, root / task)
    return files


def _config(runs: Path, model: Path, files: dict[str, Path], root: Path, **kw) -> job.EvalConfig:
    return job.EvalConfig.model_validate({
        "run_name": "tiny", "runs_dir": str(runs), "model": str(model),
        "benchmarks": [{"name": n, "path": str(p)}
                       | ({} if n.startswith("synthetic") else {"data_root": str(root)})
                       | ({"sampling": {"max_tokens_per_turn": 128}} if n in MULTITURN else {})  # zoom turns
                       for n, p in files.items()],
        "sampling": {"max_tokens_per_turn": 24, "max_response_tokens": 1024},
        "policy": {"app": "vigorl"}, "actors": 1, "actor_cpus": 0.25, "batch_size": 8, "concurrency": 8,
        "examples": 1, **kw})


@pytest.fixture(scope="module", autouse=True)
def planned_zooms():
    """The random-weight model never zooms by itself: its multi-turn conversations zoom twice under a grammar."""
    with pytest.MonkeyPatch.context() as env:
        env.setenv("VIGORL_PLANNED_ZOOMS", "2")
        yield


def test_planned_zooms_cannot_reach_an_endpoint(tiny_model_dir, tmp_path):
    cfg = job.EvalConfig(runs_dir=str(tmp_path), model=str(tiny_model_dir), policy={"endpoint": "http://h:1/v1"},
                         benchmarks=[{"name": "synthetic_grounding"}])
    with pytest.raises(job.ConfigError, match="VIGORL_PLANNED_ZOOMS constrains the in-cluster engine"):
        job.evaluate(cfg)


@pytest.fixture(scope="module")
def first_run(tmp_path_factory, serve_app, tiny_model_dir):
    root = tmp_path_factory.mktemp("bench-data")
    files = _write_benchmarks(root)
    runs = tmp_path_factory.mktemp("runs")
    cfg = _config(runs, tiny_model_dir, files, root)
    stats = job.evaluate(cfg)
    expected = {E.sample_key(s) for n, p in files.items() for s in load_samples(p, check_images=False,
                **({} if n.startswith("synthetic") else {"task": get_benchmark(n).task, "source": n}))}
    return cfg, stats, runs / "eval" / "tiny", expected


def test_outputs_one_line_per_sample_and_rescoring_equals_stored(first_run, tmp_path):
    cfg, stats, run_dir, expected = first_run
    lines = (run_dir / "predictions.jsonl").read_text().splitlines()
    preds = [E.Prediction.model_validate_json(line) for line in lines]
    assert len(lines) == len(expected) == 26 and {p.key for p in preds} == expected
    assert stats["evaluated"] == 26 and stats["skipped"] == 0 and stats["errors"] == 1
    [failed] = [p for p in preds if p.finish == "error"]
    assert failed.key == ("sat2", "sat2-2") and "UnidentifiedImageError" in failed.metadata["error"]
    assert failed.score == 0 and failed.original_size is None
    for p in preds:
        if p.finish != "error":
            assert p.policy == cfg.model and p.timing["seconds"] > 0 and p.model_size and p.original_size
            assert p.mode == ("multiturn" if p.benchmark in MULTITURN else "grounded")
    assert {p.category for p in preds if p.benchmark == "sat2"} == {"left_right"}

    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert set(metrics["benchmarks"]) == {b for b, _ in expected} and metrics["n"] == 26
    sat2 = metrics["benchmarks"]["sat2"]
    assert sat2["n"] == 3 and set(sat2["score"]) == {"mean", "ci95", "n"} and sat2["finish"]["error"] == 1
    assert "left_right" in sat2["categories"] and metrics["run"]["evaluated"] == 26
    report = (run_dir / "report.md").read_text()
    assert "## screenspot_v2" in report and "| **all** |" in report and "plots/vstar.svg" in report
    assert (run_dir / "plots" / "synthetic_grounding.svg").is_file() and list((run_dir / "examples").glob("*.png"))

    from jobs import score

    assert score.main(["--predictions", str(run_dir), "--out", str(tmp_path / "rescored"), "--report", "false"]) == 0
    checks = json.loads((tmp_path / "rescored" / "metrics.json").read_text())["rescoring"]["stored_vs_rescored"]
    assert checks["score"] == {"equal": 26, "n": 26, "differ": []} == checks["score_original"]


def test_multiturn_with_planned_zooms_has_zoom_points_in_both_frames(first_run):
    _, _, run_dir, _ = first_run
    preds = [p for p in E.read_predictions(run_dir / "predictions.jsonl").predictions if p.benchmark in MULTITURN]
    assert len(preds) == 5
    for p in preds:
        assert p.num_turns == 3 and p.finish == "answer", (p.id, p.finish, p.text)
        zooms = [c.coordinate for c in p.trace.tool_calls]
        assert len(zooms) == 2 and all(z is not None for z in zooms)
        assert len(p.points) >= 3 and len(p.points_original) == len(p.points)  # one point per planned thought
        (w, h), (mw, mh) = p.original_size, p.model_size
        for m, o in zip(p.points, p.points_original):
            assert (m.frame, o.frame) == ("model", "original")
            assert o.x == pytest.approx(m.x * w / mw) and o.y == pytest.approx(m.y * h / mh)
        assert "<observation>" in p.text


def test_rerun_resumes_without_evaluating_anything(first_run, capsys):
    cfg, _, run_dir, expected = first_run
    before = (run_dir / "predictions.jsonl").read_bytes()
    stats = job.evaluate(cfg)
    assert stats["evaluated"] == 0 and stats["skipped"] == len(expected)
    assert (run_dir / "predictions.jsonl").read_bytes() == before
    assert "26 samples in 11 benchmark(s): 26 already evaluated, 0 to go" in capsys.readouterr().out
    changed = cfg.model_copy(update={"sampling": cfg.sampling.model_copy(update={"temperature": 0.1})})
    with pytest.raises(job.ConfigError, match="evaluated with different sampling"):
        job.evaluate(changed)


def test_killed_job_and_killed_actor_lose_nothing_and_count_nothing_twice(first_run, tmp_path, monkeypatch):
    """The file a killed job leaves (6 samples missing, a partial last line), resumed by a run whose first
    EvalActor dies (os._exit) after 2 samples of its first batch: Ray restarts it and re-runs the batch."""
    cfg, _, run_dir, expected = first_run
    fault_dir = Path(cfg.runs_dir) / "eval" / "fault"
    fault_dir.mkdir()
    lines = (run_dir / "predictions.jsonl").read_text().splitlines(keepends=True)
    (fault_dir / "predictions.jsonl").write_text("".join(lines[:-6]) + lines[-6][:40])
    cfg = cfg.model_copy(update={"run_name": "fault", "batch_size": 3, "concurrency": 3})
    monkeypatch.setenv("VIGORL_FAULTS", '{"actor_exit_after": 2}')  # a test's fault (jobs/faults.py)
    stats = job.evaluate(cfg)
    assert (fault_dir / "fault_injected").is_file()  # the actor did die
    assert stats["evaluated"] == 6 and stats["skipped"] == len(expected) - 6
    keys = [E.Prediction.model_validate_json(line).key for line in (fault_dir / "predictions.jsonl").open()]
    assert len(keys) == len(set(keys)) == len(expected) and set(keys) == expected


def test_a_killed_policy_replica_is_replaced_and_its_conversations_rerun(first_run, tmp_path, tiny_model_dir,
                                                                          monkeypatch):
    """The session app's only PolicyServer replica (no second engine start: the replacement's is the one this test
    pays); when the first prediction is done, that replica is killed while the other conversations are
    mid-generation (200-token turns, all 8 at once). They are rolled out again once Serve has replaced it: every
    sample is predicted once, none as an error, the retries are in metrics.json."""
    cfg, _, _, _ = first_run
    data = write_dataset("grounding", 8, 1, tmp_path / "data")
    cfg = job.EvalConfig.model_validate({
        "run_name": "replica-fault", "runs_dir": cfg.runs_dir, "model": str(tiny_model_dir),
        "benchmarks": [{"name": "synthetic_grounding", "path": str(data)}], "policy": {"app": "vigorl"},
        "sampling": {"max_tokens_per_turn": 200, "max_response_tokens": 1024}, "actors": 1, "actor_cpus": 0.25,
        "batch_size": 8, "concurrency": 8, "examples": 0})
    monkeypatch.setenv("VIGORL_FAULTS", '{"kill_policy_after": 1}')  # a test's fault (jobs/faults.py)
    stats = job.evaluate(cfg)
    run_dir = Path(cfg.runs_dir) / "eval" / "replica-fault"
    assert (run_dir / "fault_injected_policy").is_file()  # the replica did die
    keys = [E.Prediction.model_validate_json(line).key for line in (run_dir / "predictions.jsonl").open()]
    assert len(keys) == len(set(keys)) == 8
    assert stats["evaluated"] == 8 and stats["errors"] == 0 and stats["replica_retries"] >= 1
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["run"]["replica_retries"] == stats["replica_retries"]


def test_clear_errors(tmp_path, tiny_model_dir):
    missing = tmp_path / "sat2.jsonl"
    write_jsonl([{"id": 1, "image": "nowhere.png", "conversations": [{"from": "human", "value": "<image>Q?"},
                                                                    {"from": "gpt", "value": "left"}]}], missing)
    cfg = job.EvalConfig(runs_dir=str(tmp_path / "runs"), model=str(tiny_model_dir),
                         benchmarks=[{"name": "sat2", "path": str(missing)}])
    with pytest.raises(ValueError, match=r"1 image file\(s\) not found(.|\n)*sat2.jsonl:1: .*nowhere.png"):
        job.evaluate(cfg)
    assert job.main(["--model", str(tiny_model_dir), "--benchmarks", "[{name: sat2, path: /no/such.jsonl}]",
                     "--runs_dir", str(tmp_path / "runs")]) == 2
    shutil.rmtree(tmp_path / "runs", ignore_errors=True)


def test_a_job_given_an_app_name_joins_the_running_local_ray(serve_app, subprocess_env, tmp_path, tiny_model_dir):
    """Without RAY_ADDRESS, `vigorl eval --policy.app NAME` joins the Ray already running on this machine (the
    session's, which runs the `vigorl` app) instead of starting its own: the error lists that Ray's apps."""
    import subprocess
    import sys

    write_dataset("grounding", 1, seed=0, out_dir=tmp_path / "data")
    env = {k: v for k, v in subprocess_env.items() if k != "RAY_ADDRESS"}
    result = subprocess.run(
        [sys.executable, "-m", "jobs.evaluate", "--runs_dir", str(tmp_path / "runs"), "--model", str(tiny_model_dir),
         "--benchmarks", f"[{{name: synthetic_grounding, path: {tmp_path / 'data' / 'samples.jsonl'}}}]",
         "--policy.app", "no-such-app"], env=env, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    assert "no Serve app named 'no-such-app' is running" in result.stderr and "'vigorl'" in result.stderr
