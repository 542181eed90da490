"""Quickstart: the whole ViGoRL pipeline on one machine, with the tiny model and synthetic data, no network.

    vigorl quickstart                 # the full run (see README for its time on 2 cores)
    vigorl quickstart --fast          # every stage on a few samples: checks the plumbing, not the learning
    vigorl quickstart --verbose       # also show the jobs' output on the terminal (engine, Ray and library logs)

Stages; each is the real job (`python -m jobs.<stage>`), run as its own process against ONE local Ray that the
quickstart starts, with its config written to runs/quickstart/<run>/configs/<stage>.yaml, so any stage can be
rerun by hand with the same command (the stage's log names it). A stage starts once the stages it reads are done;
two run at once where neither reads the other and the Ray has room for both (`--parallel`): each job runs one
thread, so on 2 cores the two GRPO arms, or an evaluation beside a training stage, take about the time of one:
1. data        the two quickstart tasks (vigorl_core.synthetic.tasks.QUICKSTART_TASKS), a train and a held-out split:
               `colour` (the colour of a square that spans several vision tokens; single-turn, grounded) and
               `zoom_colour` (the colour of a small square in a named quadrant: near chance in the full view,
               readable after one zoom into the quadrant; multi-turn);
2. base        the random tiny model after a short SFT that teaches it to point at the square and name its
               colour (vigorl_core.synthetic.base): what Qwen2.5-VL's pretraining gave the paper's models;
3. teacher     the base model after a short SFT on programmatically written grounded chains of other images
               (vigorl_core.synthetic.chains): a weak, noisy stand-in for the paper's Qwen2.5-VL-72B;
4. mcts        tree search over the teacher's reasoning steps on the train split; the rule reward keeps the
               branches that reach the right answer;
5. chains      the trees linearized into SFT chains (single-turn and multi-turn zoom);
6. sft         the base model fine-tuned on those chains (the warm start); it also keeps its checkpoint after
               `grpo_start_step` steps (sft_partial);
7. grpo        single-turn grounded GRPO on `colour` from sft_partial: the whole SFT run answers `colour` right
               nearly every time, which leaves RL nothing to show;
8. grpo_zoom   multi-turn GRPO with the zoom tool on `zoom_colour`, from the SFT checkpoint;
9. eval_*      every model (random, teacher, sft_partial, sft, grpo, grpo_zoom) on the held-out split;
10. report      runs/quickstart/<run>/report.md with the table, reward curves and annotated examples.

The terminal shows one line per stage and a progress bar; what each job would show on a terminal (its stage
lines, progress, results, errors) goes to runs/quickstart/<run>/logs/<stage>.log, and its engine, Ray and
library logs to job.log in its run folder (e.g. runs/sft/quickstart-default/job.log); the local Ray's own
warnings go to logs/ray.log. Each stage reads the previous stage's output of the same run name where the jobs
default to it (chains <- mcts, grpo <- sft).
Rerunning the same command resumes: finished stages (their marker in stages/) are skipped, and an interrupted
job resumes from its own run folder.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field

from jobs.common import REPO_ROOT, is_verbose, run_main
from jobs.progress import Progress
from vigorl_core.config import StageConfig, parse_config

# Evaluated (the base answers in its own format). sft_partial: the SFT run after `grpo_start_step` steps, where
# single-turn GRPO starts (the whole SFT run answers `colour` right about every time: nothing left for RL).
MODELS = ("random", "teacher", "sft_partial", "sft", "grpo", "grpo_zoom")
MADE_BY = {"random": "data", "teacher": "teacher", "sft_partial": "sft", "sft": "sft", "grpo": "grpo",
           "grpo_zoom": "grpo_zoom"}  # the stage that writes each model
SINGLE, SEARCH = "colour", "zoom_colour"  # the single-turn and the multi-turn (zoom) task


class QuickstartConfig(StageConfig):
    """Run the whole pipeline on the tiny model and synthetic data."""

    run_name: str = Field("default", description="runs/quickstart/<run_name>; stage runs are named after it")
    runs_dir: str = Field(str(REPO_ROOT / "runs"), description="root of models, data and run folders")
    fast: bool = Field(False, description="a few samples and steps per stage: the plumbing, not the learning")
    seed: int = Field(0, description="data and training seed")
    num_cpus: int = Field(8, ge=1, description="logical CPUs of the local Ray it starts (stages schedule "
                                               "fractions); with RAY_ADDRESS set, the stages join that Ray instead")
    parallel: int = Field(2, ge=1, description="stages run at once where one does not need the other's output "
                                               "(e.g. the two GRPO arms, the evaluations) and the Ray has room for "
                                               "both: each job runs one thread, so on 2 cores two go about twice "
                                               "as fast")


# What each stage does at each size. The full sizes are chosen for learning on 2 cores (docs/tiny_learning.md);
# teacher_steps 1,000: after 500 the teacher zoomed right but then answered the zoom question "<answer>\n<answer>"
# (its base's "<think>\n" and "<think> The" openings outweighed its 512 answer turns: s16b, 5 zoom chains).
# --fast keeps every kind of stage with a few samples, steps and tokens, and evaluates the two models that search
# with zooms (grounded on colour and multi-turn on zoom_colour, so both evaluation modes run), side by side.
SIZES: dict[str, dict[str, Any]] = {
    "full": {"train_n": 1024, "heldout_n": 64, "base_images": 3072, "base_val": 128, "base_steps": 2000,
             "base_eval_every": 200,
             "teacher_chains": 512, "teacher_steps": 1000, "mcts_n": 256,
             "sft_steps": 400, "grpo_start_step": 25,
             "grpo_steps": 40, "grpo_zoom_steps": 24, "rollout_batch": 8, "group": 8, "mcts_simulations": 4,
             "turn_tokens": 96, "response_tokens": 384, "eval_models": MODELS,
             "mcts": {"children": 3, "rollouts_per_child": 2, "max_depth": 4, "time_limit_s": 120}},
    "fast": {"train_n": 8, "heldout_n": 4, "base_images": 24, "base_val": 4, "base_steps": 2, "base_eval_every": 1,
             "teacher_chains": 8, "teacher_steps": 4, "mcts_n": 2, "sft_steps": 4, "grpo_start_step": 2,
             "grpo_steps": 2, "grpo_zoom_steps": 2, "rollout_batch": 2, "group": 2, "mcts_simulations": 1,
             "turn_tokens": 48, "response_tokens": 144, "eval_models": ("sft", "grpo_zoom"),
             "mcts": {"children": 2, "rollouts_per_child": 1, "max_depth": 2, "time_limit_s": 10}},
}


@dataclass
class Stage:
    """One step of the pipeline: a job module and its config, or a function run in this process."""

    name: str
    title: str
    done_when: Path  # the job's own output that says it finished
    module: str | None = None
    config: dict[str, Any] | None = None
    call: Callable[[], None] | None = None
    progress: Callable[[], tuple[int, int]] | None = None  # (done, total) from the job's files
    after: tuple[str, ...] = ()  # the stages whose output it reads: it may start once they are done
    cpus: float = 1.0  # Ray CPUs its job reserves (its actors and replicas), so stages run side by side only
    # where the Ray has room for both


class Paths:
    """Where every stage reads and writes (all under runs_dir, named after the quickstart run)."""

    def __init__(self, cfg: QuickstartConfig):
        self.sizes = SIZES["fast" if cfg.fast else "full"]  # what each stage does at this run's size
        self.runs = Path(cfg.runs_dir).resolve()
        self.name = f"quickstart-{cfg.run_name}" + ("-fast" if cfg.fast else "")
        self.out = self.runs / "quickstart" / cfg.run_name
        self.data = self.runs / "data" / self.name
        self.random_model = self.runs / "models" / "tiny"

    def split(self, task: str, split: str) -> Path:
        return self.data / f"{task}-{split}" / "samples.jsonl"

    def run(self, job: str, suffix: str = "") -> Path:
        return self.runs / job / (self.name + suffix)

    def model(self, name: str) -> Path:
        return {"random": self.random_model, "base": self.run("sft", "-base") / "best",
                "teacher": self.run("sft", "-teacher") / "latest",
                "sft": self.run("sft") / "latest",
                "sft_partial": self.run("sft") / "checkpoints" / f"step-{self.sizes['grpo_start_step']}",
                "grpo": self.run("grpo") / "latest",
                "grpo_zoom": self.run("grpo", "-zoom") / "latest"}[name]


def _lines(path: Path, key: str | None = None) -> int:
    """Lines of a JSONL file (with `key` in them, when given); 0 when it does not exist yet."""
    if not path.is_file():
        return 0
    lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    return sum(f'"{key}"' in line for line in lines) if key else len(lines)


def _steps_progress(log: Path, total: int) -> Callable[[], tuple[int, int]]:
    """Steps logged so far in a training job's step log (SFT: log.jsonl, GRPO: metrics.jsonl)."""
    def progress() -> tuple[int, int]:
        return min(total, _lines(log, "loss")), total
    return progress


def _stages(cfg: QuickstartConfig, p: Paths) -> list[Stage]:
    s = p.sizes
    common = {"runs_dir": str(p.runs), "seed": cfg.seed}
    engine = {"max_model_len": 4096, "dtype": "float32", "enforce_eager": True}
    stages = [Stage("data", "synthetic data: train and held-out splits", p.split(SEARCH, "heldout"),
                    call=lambda: _write_data(p, s, cfg.seed))]
    # lr 1e-3 for the three SFT stages: at 2e-3 the base's pointing ranged 62-67% over three seeds (1,200 steps)
    # and SFT lost most of the base's pointing; 1e-3 and 2,000 base steps point 95-98% (two seeds).
    sft = {"global_batch_size": 8, "micro_batch_size": 4, "num_workers": 1, "lr": 1e-3, "warmup_ratio": 0.05,
           "precision": "fp32", "freeze_vision_tower": False, "log_every": 10, "keep_checkpoints": 1,
           "max_length": 2048}
    # Their own seeds: the base data and the written chains are of other images than the train and held-out splits.
    base_data = p.data / "base" / "chains.jsonl"
    stages.append(Stage("base_data", "base data: point at the square, name its colour", base_data,
                        call=lambda: _write_base_data(base_data.parent, s["base_images"], cfg.seed + 3000,
                                                      s["base_val"])))
    teacher_data = p.data / "teacher-chains" / "chains.jsonl"
    stages.append(Stage("teacher_data", "teacher data: written grounded chains", teacher_data,
                        call=lambda: _write_teacher_chains(teacher_data.parent, s["teacher_chains"], cfg.seed + 2000)))
    sft_job = {"module": "jobs.sft", "cpus": 1.5}  # a trainer worker and Ray Train's controller
    stages.append(Stage(
        "base", "base: the random model, short SFT to point and see", p.model("base"), **sft_job,
        after=("data", "base_data"),
        # Qwen's default chat (the records' own system prompt), 16 a step: short sequences, many images. The
        # pointing of one seed ranges from 44% to 98% and can peak before the last step: the stage keeps the
        # model that names the exact point most often on the validation images (docs/tiny_learning.md).
        config={**common, **sft, "run_name": p.name + "-base", "model": str(p.random_model), "data": str(base_data),
                "val_data": str(base_data.parent / "val.jsonl"), "keep_best": "val_exact_match",
                "system_prompt": "record", "max_steps": s["base_steps"], "global_batch_size": 16,
                "micro_batch_size": 16, "warmup_ratio": 0.03, "max_length": 512,
                "save_every": s["base_steps"], "eval_every": s["base_eval_every"]},
        progress=_steps_progress(p.run("sft", "-base") / "log.jsonl", s["base_steps"])))
    stages.append(Stage(
        "teacher", "teacher: the base model, short SFT on written grounded chains", p.model("teacher"),
        **sft_job, after=("base", "teacher_data"),
        config={**common, **sft, "run_name": p.name + "-teacher", "model": str(p.model("base")),
                "data": str(teacher_data), "val_fraction": 0.05, "max_steps": s["teacher_steps"],
                "save_every": s["teacher_steps"], "eval_every": s["teacher_steps"]},
        progress=_steps_progress(p.run("sft", "-teacher") / "log.jsonl", s["teacher_steps"])))
    mcts_data = [{"path": str(p.split(task, "train")), "limit": s["mcts_n"]} for task in (SINGLE, SEARCH)]
    stages.append(Stage(
        "mcts", "MCTS with the teacher on the train split", p.run("mcts") / "stats.json", module="jobs.mcts",
        after=("data", "teacher"), cpus=2.0,
        config={"runs_dir": str(p.runs), "run_name": p.name, "data": mcts_data,
                "teacher": {"model": str(p.model("teacher")), "replicas": 1, "engine": engine},
                # No "at least N thoughts" line: the teacher learned the mcts prompt without it.
                "mcts": {"simulations": s["mcts_simulations"], **s["mcts"], "rollout_max_steps": 3,
                         # 0.5: at 0.8 the teacher's sampled points were in the square 45% of the time (greedy 70%).
                         "max_tokens": s["turn_tokens"], "temperature": 0.5, "min_thoughts": None},
                "actors": 1, "trees_per_actor": 8},
        progress=lambda: (_lines(p.run("mcts") / "trees.jsonl"), 2 * s["mcts_n"])))
    stages.append(Stage(
        "chains", "chains: trees linearized into SFT data", p.run("chains") / "train.json", module="jobs.chains",
        after=("mcts",),
        config={"runs_dir": str(p.runs), "run_name": p.name, "student": "tiny",  # trees: runs/mcts/<run_name>
                "formats": ["single_turn", "multi_turn"], "statuses": ["ok", "timeout"],
                # At most 2 backtracking chains per sample (default 10): each one is a long, unique text that
                # a tiny student memorizes as a key to its answer instead of reading the image.
                "linearize": {"val_fraction": 0.1, "seed": cfg.seed, "max_images": 5, "max_backtrack": 2}}))
    sft_data = p.out / "sft_data.jsonl"
    stages.append(Stage("sft_data", "SFT data: the single-turn and zoom chains in one file", sft_data,
                        call=lambda: _merge_chains(p, sft_data, s["train_n"], cfg.seed, cfg.fast), after=("chains",)))
    stages.append(Stage(
        "sft", "SFT: the base model on the MCTS chains", p.model("sft"), **sft_job, after=("base", "sft_data"),
        config={**common, **sft, "run_name": p.name, "model": str(p.model("base")), "data": str(sft_data),
                "val_fraction": 0.1, "max_steps": s["sft_steps"], "keep_checkpoints": None,
                "save_every": s["sft_steps"], "save_at": [s["grpo_start_step"]], "eval_every": s["sft_steps"]},
        progress=_steps_progress(p.run("sft") / "log.jsonl", s["sft_steps"])))
    train_batch = s["rollout_batch"] * s["group"] // 2  # two optimizer steps per RL step, as the original
    grpo = {**common, "rollout_batch_size": s["rollout_batch"], "group_size": s["group"],
            "train_batch_size": train_batch, "micro_batch_size": min(8, train_batch), "lr": 3e-4,
            "warmup_ratio": 0.0, "kl_coef": 0.01, "freeze_vision_tower": True, "freeze_projector": False,
            # At temperature 1 the tiny policy garbles most tool calls (8% well-formed at the zoom arm's first
            # step), so answering without a zoom wins the format reward and the arm unlearns zooming.
            "temperature": 0.7,
            "num_workers": 1, "precision": "fp32", "keep_checkpoints": 1, "log_every": 1,
            "policy": {"engine": engine}}
    # The two arms start from SFT's checkpoints and run side by side. Each reserves a trainer worker, a policy
    # replica, a rollout worker and a zoom server.
    grpo_job = {"module": "jobs.grpo", "after": ("sft",), "cpus": 3.5}
    stages.append(Stage(
        "grpo", "GRPO single-turn (grounded, colour) from the partly trained SFT checkpoint", p.model("grpo"),
        **grpo_job,
        # Temperature 0.3: sampled at 0.7, sft_partial wrote 17% well-formed answers (greedy: 100%) and GRPO traded the
        # format for accuracy (greedy 77% -> 5%); at 0.3 its rollouts start 89% well-formed and greedy goes 77% -> 98%
        # (s16c, docs/tiny_learning.md, ninth round).
        config={**grpo, "run_name": p.name, "model": str(p.model("sft_partial")), "data": str(p.split(SINGLE, "train")),
                "temperature": 0.3,
                "task": "visual_search", "mode": "grounded", "max_steps": s["grpo_steps"],
                "save_every": s["grpo_steps"],
                "max_tokens_per_turn": s["turn_tokens"], "max_response_tokens": s["turn_tokens"]},
        progress=_steps_progress(p.run("grpo") / "metrics.jsonl", s["grpo_steps"])))
    stages.append(Stage(
        "grpo_zoom", "GRPO multi-turn with zoom (zoom_colour) from the SFT checkpoint", p.model("grpo_zoom"),
        **grpo_job,
        # From SFT, as the paper's multi-turn model: single-turn GRPO on `colour` never sees a tool call and
        # garbles them (measured: 92% of this stage's first rollouts malformed when it started from GRPO).
        # lr 1e-4: SFT's rollouts start 98-100% right, and at 3e-4 the few failing ones carried every advantage
        # and collapsed the arm to 12% at step 21 (s16c); at 1e-4 it holds (docs/tiny_learning.md, tenth round).
        config={**grpo, "run_name": p.name + "-zoom", "model": str(p.model("sft")), "lr": 1e-4,
                "data": str(p.split(SEARCH, "train")), "task": "visual_search", "mode": "multiturn",
                "max_steps": s["grpo_zoom_steps"], "save_every": s["grpo_zoom_steps"],
                "max_tokens_per_turn": s["turn_tokens"], "max_response_tokens": s["response_tokens"]},
        progress=_steps_progress(p.run("grpo", "-zoom") / "metrics.jsonl", s["grpo_zoom_steps"])))
    for model in s["eval_models"]:
        # The zoom arm and the SFT model it starts from search with zooms; the others answer from the full view.
        zoom = "multiturn" if model in ("sft", "grpo_zoom") else "grounded"
        benchmarks = [{"name": f"synthetic_{SINGLE}", "path": str(p.split(SINGLE, "heldout")), "mode": "grounded"},
                      {"name": f"synthetic_{SEARCH}", "path": str(p.split(SEARCH, "heldout")), "mode": zoom}]
        run_dir = p.run("eval", f"-{model}")
        stages.append(Stage(
            f"eval_{model}", f"evaluation of {model} on the held-out split", run_dir / "metrics.json",
            module="jobs.evaluate", after=(MADE_BY[model],), cpus=2.5,  # a policy replica, an eval actor, zooms
            config={"runs_dir": str(p.runs), "run_name": f"{p.name}-{model}", "model": str(p.model(model)),
                    "benchmarks": benchmarks, "policy": {"replicas": 1, "engine": engine},
                    "sampling": {"temperature": 0.0, "max_tokens_per_turn": s["turn_tokens"],
                                 "max_response_tokens": s["response_tokens"]},
                    "actors": 1, "batch_size": 8, "concurrency": 8, "examples": 0},
            progress=lambda run_dir=run_dir: (_lines(run_dir / "predictions.jsonl"), 2 * s["heldout_n"])))
    stages.append(Stage("report", "report", p.out / "report.md", call=lambda: _report(cfg, p),
                        after=tuple(stage.name for stage in stages)))
    return stages


def _write_data(p: Paths, sizes: dict[str, int], seed: int) -> None:
    from vigorl_core.synthetic.tasks import write_dataset
    from vigorl_core.synthetic.tiny import build_tiny_model

    if not (p.random_model / "vigorl_model.json").is_file():
        build_tiny_model(p.random_model)
    for task in (SINGLE, SEARCH):
        write_dataset(task, sizes["train_n"], seed, p.split(task, "train").parent)
        # Held-out samples come from another seed: no image of the train split repeats.
        write_dataset(task, sizes["heldout_n"], seed + 1000, p.split(task, "heldout").parent)


def _write_base_data(folder: Path, n: int, seed: int, val_n: int) -> None:
    from vigorl_core.frames import get_profile
    from vigorl_core.synthetic.base import write_base_data

    write_base_data(folder, n, seed, get_profile("tiny"), val_n=val_n)


def _write_teacher_chains(folder: Path, n: int, seed: int) -> None:
    from vigorl_core.frames import get_profile
    from vigorl_core.synthetic.teacher import write_teacher_chains

    write_teacher_chains(folder, n, seed, get_profile("tiny"))


def _merge_chains(p: Paths, out: Path, n: int, seed: int, fast: bool) -> None:
    """The chains stage's single-turn chains of the colour trees and multi-turn (zoom) chains of the zoom_colour
    trees in one JSONL file (absolute image paths): each task's chains in the format its arm trains and is
    evaluated in. --fast adds the teacher's written chains: a teacher trained for a few steps rarely answers
    right, and the SFT stage needs some data to run."""
    from vigorl_core.frames import get_profile
    from vigorl_core.train.sft_data import read_conversations
    from vigorl_core.synthetic.chains import write_synthetic_chains

    files = {p.run("chains") / "train.json": f"{SINGLE}-", p.run("chains") / "train_multiturn.json": f"{SEARCH}-"}
    if fast:
        files[write_synthetic_chains(p.data / "fast-filler", n, seed + 2000, get_profile("tiny"),
                                     tasks=(SINGLE, SEARCH))] = ""
    records = []
    for path, prefix in files.items():
        if path.is_file() and path.read_text().strip() not in ("", "[]"):
            records += [{"id": c.id, "task": c.task, "images": c.images,
                         "messages": [{"role": role, "content": content} for role, content in c.messages]}
                        for c in read_conversations(path) if c.id.startswith(prefix)]
    if not records:
        raise RuntimeError(f"MCTS found no correct chain ({p.run('mcts') / 'stats.json'}): the teacher is too weak; "
                           "train it longer (teacher_steps)")
    out.write_text("".join(json.dumps(r) + "\n" for r in records))
    print(f"{len(records)} chains from {', '.join(str(f) for f in files)}")


def _report(cfg: QuickstartConfig, p: Paths) -> None:
    from vigorl_core.synthetic.quickstart_report import write_quickstart_report

    write_quickstart_report(p.out, {m: p.run("eval", f"-{m}") for m in MODELS},
                            {"grpo": p.run("grpo"), "grpo_zoom": p.run("grpo", "-zoom")},
                            fast=cfg.fast, header=_provenance(p), rl_start="sft_partial")


def _provenance(p: Paths) -> str:
    """When and from which commit the run was made, and the stages' wall time (from their markers)."""
    markers = sorted((p.out / "stages").glob("*.json"), key=lambda f: f.stat().st_mtime)
    stages = [json.loads(f.read_text()) for f in markers]
    seconds = _wall_seconds(stages)
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                                text=True, timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.TimeoutExpired):
        commit = "unknown"
    times = ", ".join(f"{stage['stage']} {stage['seconds']:.0f} s" for stage in stages)
    return (f"Made {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} at commit {commit}, "
            f"{os.cpu_count()} CPUs; the stages took {seconds / 60:.1f} min ({times}; stages that ran side by "
            f"side count once).")


def _wall_seconds(stages: list[dict[str, Any]]) -> float:
    """Time the stages took together: the union of their [started, ended] intervals, so stages that ran side
    by side count once, plus the seconds of markers without times (written before they were recorded)."""
    timed = sorted((stage["started"], stage["ended"]) for stage in stages if "started" in stage)
    total = sum(stage["seconds"] for stage in stages if "started" not in stage)
    end = float("-inf")
    for start, stop in timed:
        total += max(0.0, stop - max(start, end))
        end = max(end, stop)
    return total


# ----------------------------------------------------------------------------------------------- running

def _start_job(stage: Stage, p: Paths, env: dict[str, str], verbose: bool) -> subprocess.Popen:
    """The stage's job as a process, its output appended to logs/<stage>.log (the terminal with --verbose)."""
    config_path = p.out / "configs" / f"{stage.name}.yaml"
    config_path.parent.mkdir(parents=True, exist_ok=True)
    config_path.write_text(yaml.safe_dump(stage.config, sort_keys=False))
    command = [sys.executable, "-m", stage.module, "--config", str(config_path), *(["--verbose"] if verbose else [])]
    log_path = p.out / "logs" / f"{stage.name}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a") as log:  # the child keeps its own copy of the descriptor
        log.write(f"$ {' '.join(command)}\n")
        log.flush()
        return subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=None if verbose else log,
                                stderr=subprocess.STDOUT,
                                preexec_fn=_die_with_parent)  # noqa: PLW1509 - one system call, no locks


def _die_with_parent() -> None:
    """In the job's process, before exec: SIGTERM it when the quickstart process dies, even by SIGKILL (Linux).
    libc is loaded in the parent, so the forked child only makes one system call (no allocation, no locks)."""
    if _LIBC is not None:
        _LIBC.prctl(1, 15)  # PR_SET_PDEATHSIG, SIGTERM


def _libc():
    import ctypes

    try:
        return ctypes.CDLL("libc.so.6", use_errno=True) if sys.platform.startswith("linux") else None
    except OSError:
        return None


_LIBC = _libc()


def _ray_address(cfg: QuickstartConfig, log_path: Path) -> tuple[str, float]:
    """The Ray every stage runs on and its CPUs free now (what the stages may
    reserve together). With RAY_ADDRESS set (a running cluster, as under `ray job submit`) the stages join it;
    otherwise one local Ray is started for them all. What Ray reports to this driver (the raylet's warnings)
    goes to `log_path`, not the terminal."""
    import ray
    import ray._private.worker as ray_worker

    joined = os.environ.get("RAY_ADDRESS")
    if joined:
        ray.init(address=joined, log_to_driver=False, logging_level="ERROR")
    else:
        ray.init(address="local", num_cpus=cfg.num_cpus, include_dashboard=False, log_to_driver=False,
                 _node_ip_address="127.0.0.1", logging_level="ERROR")

    # log_to_driver=False silences the workers, not the raylet's messages to every driver (e.g. "8 PYTHON worker
    # processes have been started"), which Ray's listener thread prints through this module function.
    def to_log(data: dict, ignore_prefix: bool) -> None:
        with open(log_path, "a") as log:
            log.writelines(f"({data.get('pid')}) {line}\n" for line in data.get("lines", []))
    ray_worker.print_to_stdstream = to_log
    return joined or ray.get_runtime_context().gcs_address, ray.available_resources().get("CPU", 0.0)


class _Runner:
    """Runs the stages in order of their dependencies: up to `parallel` jobs at once, each as soon as the stages
    it reads are done and the Ray has room for its CPUs (one job always may start); in-process stages (data
    writers, the report) run as soon as they are ready, in this process. A stage line as each job starts and
    ends; one progress bar on a terminal (only: the stage lines are all a log or a test reads) for the running
    jobs' work."""

    def __init__(self, cfg: QuickstartConfig, p: Paths, stages: list[Stage]):
        self.cfg, self.p, self.stages = cfg, p, stages
        self.heads = {stage.name: f"[{n}/{len(stages)}] {stage.title}" for n, stage in enumerate(stages, 1)}
        self.env: dict[str, str] | None = None
        self.room = 0.0  # Ray CPUs free when the first job started
        self.running: dict[str, tuple[Stage, subprocess.Popen, float]] = {}
        self.bar: Progress | None = None
        self.bar_label = ""

    def marker(self, stage: Stage) -> Path:
        return self.p.out / "stages" / f"{stage.name}.json"

    def run(self) -> bool:
        """True when every stage is done; False when one failed (the jobs running then are let finish)."""
        todo = []
        for stage in self.stages:
            if self.marker(stage).is_file() and stage.done_when.exists():
                print(f"{self.heads[stage.name]}: done before, skipped")
            else:
                todo.append(stage)
        done = {stage.name for stage in self.stages} - {stage.name for stage in todo}
        failed = False
        try:
            while (todo and not failed) or self.running:
                for stage in [] if failed else [s for s in todo if set(s.after) <= done]:
                    if stage.call is not None:
                        failed = not self._call(stage)
                    elif self._fits(stage):
                        self._start(stage)
                    else:
                        continue
                    todo.remove(stage)
                    if failed:
                        break
                    if stage.call is not None:
                        done.add(stage.name)
                if not self.running:
                    if todo and not failed and not any(set(s.after) <= done for s in todo):
                        raise RuntimeError(f"stages wait on stages that never run: {[s.name for s in todo]}")
                    continue
                time.sleep(1.0)
                for name, (stage, proc, since) in list(self.running.items()):
                    if proc.poll() is None:
                        continue
                    del self.running[name]
                    if proc.returncode != 0 or not stage.done_when.exists():
                        failed = True
                        print(f"{self.heads[name]}: FAILED (exit {proc.returncode}); see "
                              f"{self.p.out / 'logs' / (name + '.log')}", flush=True)
                    else:
                        done.add(name)
                        self._done(stage, time.perf_counter() - since)
                self._show()
        except KeyboardInterrupt:
            for _, proc, _ in self.running.values():
                proc.terminate()
                proc.wait()
            raise
        finally:
            if self.bar:
                self.bar.close()
            if self.env is not None:
                import ray

                ray.shutdown()  # stops the local Ray it started; only disconnects from one it joined
        return not failed

    def _fits(self, stage: Stage) -> bool:
        if not self.running:
            return True
        reserved = sum(job.cpus for job, _, _ in self.running.values())
        return len(self.running) < self.cfg.parallel and reserved + stage.cpus <= self.room

    def _call(self, stage: Stage) -> bool:
        started = time.perf_counter()
        try:
            with open(self.p.out / "logs" / f"{stage.name}.log", "a") as log, \
                    contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
                stage.call()
        except (RuntimeError, ValueError, OSError) as err:
            print(f"{self.heads[stage.name]}: FAILED: {err}", flush=True)
            return False
        self._done(stage, time.perf_counter() - started)
        return True

    def _start(self, stage: Stage) -> None:
        """Start the stage's job (with the Ray it runs on, started or joined before the first job)."""
        if self.env is None:
            address, self.room = _ray_address(self.cfg, self.p.out / "logs" / "ray.log")
            self.env = {**os.environ, "RAY_ADDRESS": address, "PYTHONUNBUFFERED": "1"}
        print(f"{self.heads[stage.name]} ...", flush=True)
        proc = _start_job(stage, self.p, self.env, is_verbose())
        self.running[stage.name] = (stage, proc, time.perf_counter())

    def _done(self, stage: Stage, seconds: float) -> None:
        # started/ended: the run's wall time counts stages that ran side by side once (see _provenance)
        now = time.time()
        self.marker(stage).write_text(json.dumps(
            {"stage": stage.name, "seconds": round(seconds, 1), "started": round(now - seconds, 1),
             "ended": round(now, 1), "output": str(stage.done_when)}) + "\n")
        print(f"{self.heads[stage.name]}: done in {seconds:.0f} s ({_summary(stage)})", flush=True)

    def _show(self) -> None:
        jobs = [job for job, _, _ in self.running.values() if job.progress]
        if is_verbose() or not sys.stderr.isatty() or not jobs:
            if self.bar:
                self.bar.close()
                self.bar = None
            return
        label = "  " + ", ".join(job.name for job in jobs)
        if self.bar is None or self.bar_label != label:
            if self.bar:
                self.bar.close()
            self.bar, self.bar_label = Progress(1, label, leave=False), label
        counts = [job.progress() for job in jobs]
        self.bar.show(sum(done for done, _ in counts), sum(total for _, total in counts))


def _run(argv: list[str]) -> int:
    cfg = parse_config(QuickstartConfig, argv, prog="vigorl quickstart")
    p = Paths(cfg)
    (p.out / "stages").mkdir(parents=True, exist_ok=True)
    (p.out / "logs").mkdir(parents=True, exist_ok=True)
    (p.out / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump(), sort_keys=False))
    stages = _stages(cfg, p)
    started = time.perf_counter()
    print(f"vigorl quickstart{' --fast' if cfg.fast else ''}: {len(stages)} stages; logs in {p.out / 'logs'}")
    if not _Runner(cfg, p, stages).run():
        return 1
    print(f"quickstart finished in {time.perf_counter() - started:.0f} s: {p.out / 'report.md'}")
    return 0


def _summary(stage: Stage) -> str:
    """One line of what the stage produced, read from its output."""
    out = stage.done_when
    if stage.name.startswith("eval_"):
        metrics = json.loads(out.read_text())["benchmarks"]
        return ", ".join(f"{name.removeprefix('synthetic_')} {m['score']['mean']:.0%}" for name, m in metrics.items())
    if stage.module == "jobs.sft":
        summary = json.loads((out.parent / "metrics.json").read_text())
        best = summary.get("best")
        kept = f", kept step {best['step']} (val exact match {best['val_exact_match']:.0%})" if best else ""
        return f"{summary['steps']} steps, loss {summary['first_loss']:.3f} -> {summary['final_loss']:.3f}{kept}"
    if stage.module == "jobs.grpo":
        from vigorl_core.synthetic.quickstart_report import curve_change, grpo_curves

        return curve_change(grpo_curves(out.parent / "metrics.jsonl"))
    return str(out.parent if out.name in ("samples.jsonl", "stats.json", "train.json") else out)


def main(argv: list[str] | None = None) -> int:
    return run_main(_run, argv)


if __name__ == "__main__":
    sys.exit(main())
