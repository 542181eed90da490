"""SFT job end to end on the tiny model (subprocess runs of `python -m jobs.sft` on the session's Ray, joined
through RAY_ADDRESS as on a cluster; real Ray Train + DeepSpeed ZeRO-2 on 2 CPU workers): training loss falls on
synthetic chains (the best validation's model kept in best/), a worker killed mid-run is replaced and the run
resumes from its checkpoint exactly, rerunning the run name continues without repeating steps, and the checkpoint
loads with the transformers Auto classes and in vLLM."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from vigorl_core.rollout.chat_tokens import ChatTokens
from vigorl_core.synthetic.chains import write_synthetic_chains

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
RUN = ["--config", str(REPO / "configs" / "sft_tiny.yaml"), "--run_name", "t", "--save_every", "6",
       "--eval_every", "8", "--log_every", "4", "--keep_best", "val_loss"]


def _sft(args: list[str], env: dict, runs: Path, model: Path, data: Path) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "jobs.sft", *RUN, "--runs_dir", str(runs), "--model", str(model),
                             "--data", str(data), *args], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=400, check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result


def _log(run_dir: Path, name: str = "log.jsonl") -> list[dict]:
    return [json.loads(line) for line in (run_dir / name).read_text().splitlines()]


@pytest.fixture(scope="module")
def chains(tmp_path_factory, tiny_model_dir) -> Path:
    """24 single-turn grounding chains and 24 multi-turn zoom chains with real crops."""
    profile = ChatTokens.from_pretrained(tiny_model_dir).profile
    return write_synthetic_chains(tmp_path_factory.mktemp("chains"), n=24, seed=0, profile=profile)


@pytest.fixture(scope="module")
def faulted_run(tmp_path_factory, joined_env, tiny_model_dir, chains) -> Path:
    """16 steps, checkpoints every 6; the last rank dies abruptly before step 10, once."""
    runs = tmp_path_factory.mktemp("runs")
    faults = {**joined_env, "VIGORL_FAULTS": json.dumps({"trainer_exit_at_step": 10})}  # jobs/faults.py
    result = _sft(["--max_steps", "16"], faults, runs, tiny_model_dir, chains)
    (runs / "terminal.txt").write_text(result.stdout + result.stderr)
    return runs / "sft" / "t"


def test_killed_worker_restarts_from_its_checkpoint_exactly(faulted_run):
    assert (faulted_run / "fault_injected").is_file()
    log = _log(faulted_run)
    assert [r["step"] for r in log if r.get("event") == "start"] == [0, 6]  # restarted from checkpoint 6
    steps = [r for r in log if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 17))  # each step logged once
    # Steps 7-9 ran before the failure and again after it, from the restored model, optimizer and data order.
    first_try = {r["step"]: r["loss"] for r in _log(faulted_run, "log.superseded.jsonl")}
    assert sorted(first_try) == [7, 8, 9]
    for r in steps[6:9]:
        assert r["loss"] == pytest.approx(first_try[r["step"]], rel=1e-5)
    metrics = json.loads((faulted_run / "metrics.json").read_text())
    assert metrics["starts"] == 2 and metrics["steps"] == 16


def test_the_terminal_shows_the_job_and_the_run_folder_keeps_the_logs(faulted_run):
    """At default verbosity (stdout not a terminal here) the terminal holds the job's lines and rank 0's
    progress, with no Ray, DeepSpeed or library log line and no colour code; those are in job.log. Ray Train's
    placement-group cleaner (it cannot query actor states on a Ray without a dashboard) stays quiet."""
    terminal = (faulted_run.parents[1] / "terminal.txt").read_text()
    assert "step 16/16 loss" in terminal and "done: 16 steps" in terminal  # the job's own lines are there
    noise = [line for line in terminal.splitlines() if re.search(r"INFO|WARNING|core_worker|\(pid=|\x1b\[", line)]
    assert not noise, noise[:5]
    assert "Failed to query Ray Train Controller" not in terminal
    log = (faulted_run / "job.log").read_text()
    assert terminal.splitlines()[0] == f"logs: {faulted_run / 'job.log'} (engine, Ray and library output; " \
                                       "--verbose shows it here)"
    assert "(RayTrainWorker pid=" in log and "step 16/16 loss" in log


def test_training_loss_falls_clearly(faulted_run):
    steps = [r for r in _log(faulted_run) if "loss" in r]
    first, last = sum(r["loss"] for r in steps[:3]) / 3, sum(r["loss"] for r in steps[-3:]) / 3
    assert last < 0.7 * first, (first, last)
    vals = [r["val_loss"] for r in steps if "val_loss" in r]
    assert len(vals) == 2 and vals[1] < vals[0]
    assert all(0 <= r["val_exact_match"] <= 1 for r in steps if "val_loss" in r)
    # keep_best: the lower validation loss (step 16) is the model in best/, loadable like any checkpoint.
    best = json.loads((faulted_run / "best" / "best.json").read_text())
    assert best == {"step": 16, "val_loss": pytest.approx(vals[1])}
    assert json.loads((faulted_run / "metrics.json").read_text())["best"]["step"] == 16
    assert (faulted_run / "best" / "model.safetensors").is_file() and (faulted_run / "best" / "config.json").is_file()
    assert all(r["tokens_per_s"] > 0 and r["lr"] > 0 for r in steps)
    assert list((faulted_run / "tensorboard").glob("events.out.tfevents.*"))


def test_checkpoint_loads_with_transformers_auto_classes(faulted_run, chains):
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from vigorl_core.frames import resize_to_model
    from vigorl_core.prompts import system_prompt

    latest = faulted_run / "latest"
    assert latest.resolve() == (faulted_run / "checkpoints" / "step-16").resolve()
    assert sorted(p.name for p in (faulted_run / "checkpoints").glob("step-*")) == ["step-12", "step-16"]
    model = AutoModelForImageTextToText.from_pretrained(latest)
    processor = AutoProcessor.from_pretrained(latest)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Point to the red circle."}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    # No system message given: the template supplies the task's prompt (the released models' convention).
    assert text.startswith(f"<|im_start|>system\n{system_prompt('grounding', 'grounded')}<|im_end|>")
    image = resize_to_model(Image.open(chains.parent / "images" / "grounding-0-00000_0.png"),
                            ChatTokens.from_pretrained(latest).profile)[0]
    inputs = processor(text=[text], images=[image], return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    generated = processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:])
    assert generated.startswith("<think>"), generated  # learned the chain format


VLLM_SCRIPT = """
import json, sys
from PIL import Image
from vllm import LLM, SamplingParams
from vigorl_core.rollout.chat_tokens import ChatTokens
from vigorl_core.frames import resize_to_model

if __name__ == "__main__":
    model, image = sys.argv[1], sys.argv[2]
    llm = LLM(model=model, dtype="float32", enforce_eager=True, max_model_len=2048, seed=0,
              limit_mm_per_prompt={"image": 1, "video": 0})
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Point to the red circle."}]}]
    prompt = llm.get_tokenizer().apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    picture = resize_to_model(Image.open(image), ChatTokens.from_pretrained(model).profile)[0]
    [out] = llm.generate({"prompt": prompt, "multi_modal_data": {"image": picture}},
                         SamplingParams(max_tokens=12, temperature=0.0, skip_special_tokens=False))
    print("RESULT " + json.dumps({"prompt": prompt, "ids": list(out.outputs[0].token_ids),
                                  "text": out.outputs[0].text}))
"""


def test_checkpoint_loads_and_generates_in_vllm(faulted_run, chains, subprocess_env, tmp_path):
    import torch
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from vigorl_core.frames import resize_to_model

    image = chains.parent / "images" / "grounding-0-00001_0.png"
    script = tmp_path / "vllm_check.py"
    script.write_text(VLLM_SCRIPT)
    # vllm.LLM's engine in this process (no EngineCore and worker processes to start: about 15 s less on CPU).
    env = {**subprocess_env, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    result = subprocess.run([sys.executable, str(script), str(faulted_run / "latest"), str(image)], cwd=REPO,
                            env=env, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-5000:]
    line = next(x for x in result.stdout.splitlines() if x.startswith("RESULT "))
    got = json.loads(line[len("RESULT "):])
    assert "You locate elements on a screenshot." in got["prompt"]  # vLLM applied the checkpoint's template
    assert got["text"].startswith("<think>"), got["text"]
    # Greedy fp32 generation in vLLM equals transformers' on the same checkpoint, prompt and image.
    model = AutoModelForImageTextToText.from_pretrained(faulted_run / "latest")
    processor = AutoProcessor.from_pretrained(faulted_run / "latest")
    picture = resize_to_model(Image.open(image), ChatTokens.from_pretrained(faulted_run / "latest").profile)[0]
    inputs = processor(text=[got["prompt"]], images=[picture], return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    assert out[0, inputs["input_ids"].shape[1]:].tolist()[:len(got["ids"])] == got["ids"]


def test_rerun_with_the_same_name_continues_without_repeating_steps(faulted_run, subprocess_env, joined_env,
                                                                     tiny_model_dir, chains):
    result = _sft(["--max_steps", "22"], joined_env, faulted_run.parent.parent, tiny_model_dir, chains)
    log = _log(faulted_run)
    assert [r["step"] for r in log if r.get("event") == "start"] == [0, 6, 16]
    assert [r["step"] for r in log if "loss" in r] == list(range(1, 23))
    assert (faulted_run / "latest").resolve().name == "step-22"
    assert "done: 22 steps" in result.stdout
    changed = subprocess.run([sys.executable, "-m", "jobs.sft", *RUN, "--runs_dir", str(faulted_run.parent.parent),
                              "--model", str(tiny_model_dir), "--data", str(chains), "--global_batch_size", "4"],
                             cwd=REPO, env=subprocess_env, capture_output=True, text=True, timeout=120, check=False)
    assert changed.returncode == 2 and "global_batch_size: 8 -> 4" in changed.stderr
