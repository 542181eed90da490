"""Subprocess smoke runs of the `vigorl` command."""

import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from vigorl_core.data import load_samples

pytestmark = pytest.mark.slow


def _vigorl(args, env):
    return subprocess.run([sys.executable, "-m", "jobs.cli", *args], env=env, capture_output=True, text=True)


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("task", ["visual_search", "grounding", "spatial"])
def test_synth_twice_with_one_seed_gives_identical_files(tmp_path, subprocess_env, task):
    for name in ("a", "b"):
        result = _vigorl(["synth", "--task", task, "--n", "6", "--seed", "3", "--out", str(tmp_path / name)],
                         subprocess_env)
        assert result.returncode == 0, result.stderr
    first, second = _digest(tmp_path / "a"), _digest(tmp_path / "b")
    assert first == second and len(first) == 7  # 6 PNGs + samples.jsonl
    samples = load_samples(tmp_path / "a" / "samples.jsonl")
    assert [s.task for s in samples] == [task] * 6


def test_bad_arguments_give_one_clear_line(tmp_path, subprocess_env):
    result = _vigorl(["synth", "--task", "nope", "--out", str(tmp_path)], subprocess_env)
    assert result.returncode == 2
    assert "task: Input should be 'visual_search', 'grounding' or 'spatial'" in result.stderr
    assert "Traceback" not in result.stderr
    assert _vigorl(["frobnicate"], subprocess_env).returncode == 2


def test_quickstart_fast_runs_every_stage_and_a_rerun_skips_them(tmp_path, subprocess_env, ray_local):
    """`vigorl quickstart --fast`: every stage as its real job on the session's Ray (RAY_ADDRESS, as on a
    cluster), a report with a row per model; the terminal shows stage lines only (the jobs' output is in
    logs/); a rerun skips every finished stage."""
    env = {**subprocess_env, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address}
    result = _vigorl(["quickstart", "--fast", "--runs_dir", str(tmp_path)], env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = tmp_path / "quickstart" / "default"
    # --fast evaluates the two models that search with zooms, in both modes, side by side
    stages = sorted(f.stem for f in (out / "stages").glob("*.json"))
    assert stages == sorted(["data", "base_data", "base", "teacher_data", "teacher", "mcts", "chains", "sft_data",
                             "sft", "grpo", "grpo_zoom", "eval_sft", "eval_grpo_zoom", "report"])
    evals = [json.loads((out / "stages" / f"eval_{m}.json").read_text()) for m in ("sft", "grpo_zoom")]
    assert max(e["started"] for e in evals) < min(e["ended"] for e in evals), evals  # they overlapped
    lines = result.stdout.strip().splitlines()
    assert all(line.startswith(("vigorl quickstart", "[", "quickstart finished")) for line in lines), lines
    assert "INFO" not in result.stdout + result.stderr  # engine and Ray logs stay in the log files
    # Each job's terminal (logs/<stage>.log) shows its own lines only; its engine, Ray and library logs are in
    # job.log in its run folder (real vLLM in mcts, grpo and eval; Ray Train in sft and grpo).
    root = tmp_path.resolve()
    runs = {"base": "sft/quickstart-default-fast-base", "teacher": "sft/quickstart-default-fast-teacher",
            "mcts": "mcts/quickstart-default-fast",
            "chains": "chains/quickstart-default-fast", "sft": "sft/quickstart-default-fast",
            "grpo": "grpo/quickstart-default-fast", "grpo_zoom": "grpo/quickstart-default-fast-zoom",
            "eval_grpo_zoom": "eval/quickstart-default-fast-grpo_zoom"}
    for stage, run in runs.items():
        terminal = (out / "logs" / f"{stage}.log").read_text().splitlines()
        noise = [line for line in terminal if re.search(r"INFO|WARNING|core_worker|\(pid=|\x1b\[", line)]
        assert not noise, (stage, noise[:5])
        assert terminal[1].startswith(f"logs: {root / run / 'job.log'}"), (stage, terminal[:2])
    assert "(ServeReplica:" in (root / runs["eval_grpo_zoom"] / "job.log").read_text()  # the engine's logs
    # chains reads the trees by run name; single-turn GRPO starts from SFT's checkpoint after grpo_start_step
    # steps (2 of 4 here), which the SFT run keeps beside its last one.
    assert "trees" not in yaml.safe_load((out / "configs" / "chains.yaml").read_text())
    grpo = yaml.safe_load((root / runs["grpo"] / "config.yaml").read_text())
    partial = root / runs["sft"] / "checkpoints" / "step-2"
    assert Path(grpo["model"]).resolve() == partial.resolve() and (partial / "model.safetensors").is_file()
    # The teacher and SFT start from the base's best validation model, not from random.
    base = (root / runs["base"] / "best").resolve()
    assert (base / "best.json").is_file()
    assert all(Path(yaml.safe_load((out / "configs" / f"{stage}.yaml").read_text())["model"]).resolve() == base
               for stage in ("teacher", "sft"))
    zoom = yaml.safe_load((out / "configs" / "grpo_zoom.yaml").read_text())  # the multi-turn arm starts from SFT
    assert Path(zoom["model"]).resolve() == (root / runs["sft"] / "latest").resolve()
    results = json.loads((out / "results.json").read_text())
    assert set(results["models"]) == {"sft", "grpo_zoom"}
    assert results["models"]["grpo_zoom"]["synthetic_colour"]["n"] == 4
    assert results["models"]["grpo_zoom"]["synthetic_colour"]["mode"] == "grounded"
    assert results["models"]["grpo_zoom"]["synthetic_zoom_colour"]["mode"] == "multiturn"
    assert [r["step"] for r in results["grpo"]["grpo"]] == [1, 2]
    assert "| grpo_zoom |" in (out / "report.md").read_text()
    rerun = _vigorl(["quickstart", "--fast", "--runs_dir", str(tmp_path)], env)
    assert rerun.returncode == 0 and rerun.stdout.count("done before, skipped") == 14


def test_every_command_has_help(subprocess_env):
    """Each registered command imports and lists its options (catches a job that fails to import)."""
    from jobs.cli import COMMANDS

    for name in COMMANDS:
        result = _vigorl([name, "--help"], subprocess_env)
        assert result.returncode == 0 and "--" in result.stdout, (name, result.stderr[-2000:])


def test_serve_rejects_bad_configuration(subprocess_env):
    result = _vigorl(["serve", "--model", "m", "--gateway.limits.max_turns", "many"], subprocess_env)
    assert result.returncode == 2 and "gateway.limits.max_turns" in result.stderr


def test_a_job_drops_the_lines_of_another_jobs_workers_but_keeps_serves(ray_local):
    """Serve turns off Ray's per-job filter of worker lines: a job keeps its own workers' lines and Serve's
    actors' (the engine logs), and drops another job's (e.g. the other GRPO arm's training progress)."""
    from jobs.common import _from_another_job

    ours = ray_local.get_runtime_context().get_job_id()
    other = "7f" + ours[2:] if not ours.startswith("7f") else "01" + ours[2:]
    assert not _from_another_job({"job": ours, "actor_name": "RayTrainWorker", "lines": ["step 1/2"]})
    assert _from_another_job({"job": other, "actor_name": "RayTrainWorker", "lines": ["step 1/2"]})
    assert not _from_another_job({"job": other, "actor_name": "ServeReplica:app:PolicyServer", "lines": ["INFO"]})
    assert not _from_another_job({"job": "", "pid": "raylet", "lines": ["a raylet warning"]})
