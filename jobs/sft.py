"""Supervised fine-tuning (the ViGoRL warm start) as one Ray Train job with DeepSpeed ZeRO.

    vigorl sft --config configs/sft_tiny.yaml                      # or: python -m jobs.sft --config ...
    vigorl sft --config configs/sft_tiny.yaml --data synthetic     # demo chains instead of runs/chains/tiny
    ray job submit --working-dir . -- python -m jobs.sft --config configs/sft_qwen2.5-vl-7b.yaml

Full fine-tune of Qwen2.5-VL on reasoning chains (sharegpt messages + images: a jobs.chains run folder, by
default the one of the same run name, runs/chains/<run_name>/; the original's released chain files;
`synthetic` for the tiny demo), vision tower frozen by default, loss on
assistant tokens only (vigorl_core.train.sft_data), length-grouped global batches split over `num_workers`
Ray Train workers x gradient accumulation, cosine schedule with warmup, validation loss. What happens:

1. the driver reads and tokenizes the data once (bad records stop here with file, line and field) and
   puts the examples in the object store;
2. a `TorchTrainer` starts the workers; each loads the model, wraps it in a DeepSpeed engine (ZeRO stage
   from the config, a torch AdamW: DeepSpeed's own Adam would JIT-compile ops) and trains its share of
   every step;
3. every `save_every` steps each rank writes its DeepSpeed shard and rank 0 a Hugging Face folder
   (weights, processor, tokenizer, chat template whose default system message is the task's prompt) into
   runs/sft/<run_name>/checkpoints/step-N/, which `ray.train.report` registers; `latest` links to it;
4. a worker that dies restarts the group from the last checkpoint (FailureConfig.max_failures); rerunning
   with the same run name resumes from it too (Ray Train restores the run from the same storage path and
   name). The examples of step s are a function of (seed, s) and the checkpoint holds the optimizer
   state, so a resumed run continues exactly where the checkpoint was taken (the steps after it that a
   failure interrupted are redone; finished ones are not);
5. every `eval_every` steps: the validation loss and exact-match share (teacher-forced: would greedy decoding
   write the example's labelled text exactly?); with `keep_best`, the best model so far is also kept in
   runs/sft/<run_name>/best/ (a skill such as naming the right point can peak before the last step).

Run folder: runs/sft/<run_name>/{config.yaml, log.jsonl, tensorboard/, checkpoints/step-N/, latest, best/,
metrics.json}; log.superseded.jsonl keeps steps logged before a failure and redone after it. Every
checkpoint folder loads directly: AutoModelForImageTextToText.from_pretrained("runs/sft/<run_name>/latest")
or vLLM with model=that path. Its deepspeed/ subfolder is the optimizer state for resuming; delete it to
ship the model. On a multi-node cluster runs_dir must be shared storage (NFS), as Ray Train requires.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Literal

import yaml
from pydantic import Field

from jobs.common import (REPO_ROOT, check_resume, init_ray, log_to_run_folder, model_folder, previous_output, run_main,
                         settings_named)
from jobs.faults import Faults, requested_faults
from jobs.training import Kernels, TrackerSettings
from vigorl_core.config import ConfigError, RoleResources, StageConfig, parse_config


class SFTConfig(StageConfig):
    """Supervised fine-tuning of Qwen2.5-VL on reasoning chains (Ray Train + DeepSpeed)."""

    run_name: str = Field("default", description="runs/sft/<run_name>; rerunning a name resumes it")
    runs_dir: str = Field(str(REPO_ROOT / "runs"), description="root of run folders (shared storage on a cluster)")
    model: str = Field(description="Hugging Face model folder to fine-tune, or 'tiny' (built into "
                                   "<runs_dir>/models/tiny if missing)")
    data: str | None = Field(None, description="training chains: a `vigorl chains` run folder (its train.json and "
                             "train_multiturn.json), a sharegpt JSON/JSONL/parquet file (messages + images), or "
                             "'synthetic' (tiny-model demo chains written under <runs_dir>/data); default: "
                             "<runs_dir>/chains/<run_name>, the chains run of the same name")
    val_data: str | None = Field(None, description="validation chains: a file (same formats) or a chains run folder "
                                 "(its val files); default: the val files of a chains folder in `data`, else none "
                                 "(see val_fraction)")
    val_fraction: float = Field(0.0, ge=0, lt=1, description="hold out this last fraction of `data` for "
                                                             "validation when val_data is not given")
    data_root: str | None = Field(None, description="folder relative image paths resolve against (default: "
                                                    "each data file's folder)")
    synthetic_n: int = Field(64, ge=1, description="data=synthetic: chains per task (grounding, visual_search)")
    task: Literal["spatial", "visual_search", "grounding", "web_action"] | None = Field(
        None, description="task of records without a `task` key (default: inferred from the data path)")
    mode: Literal["auto", "grounded", "multiturn", "vanilla"] = Field(
        "auto", description="prompt mode; auto: multiturn for chains with a zoom tool call, else grounded")
    system_prompt: Literal["task", "record"] = Field(
        "task", description="task: every record gets the project's prompt for its task and mode (one prompt "
                            "convention across SFT, RL and eval); record: keep the record's own, ours if none")
    max_length: int = Field(8192, ge=16, description="longest sequence in tokens (image tokens included); "
                                                     "longer examples are dropped and counted in metrics.json")
    epochs: float = Field(3.0, gt=0, description="passes over the training data (paper Table A1: 3)")
    max_steps: int | None = Field(None, ge=1, description="optimizer steps; overrides epochs")
    global_batch_size: int = Field(32, ge=1, description="examples per optimizer step, over all workers")
    micro_batch_size: int = Field(1, ge=1, description="examples per worker per forward pass; gradient "
                                                       "accumulation = global / (micro x workers)")
    lr: float = Field(1e-6, gt=0, description="peak learning rate")
    warmup_ratio: float = Field(0.03, ge=0, le=1, description="fraction of steps of linear warmup")
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="cosine decays towards lr x this")
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay")
    adam_betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas")
    max_grad_norm: float = Field(1.0, gt=0, description="gradient clipping norm")
    seed: int = Field(0, description="data order and initialisation seed")
    freeze_vision_tower: bool = Field(True, description="freeze the ViT (patch embedding and blocks)")
    freeze_projector: bool = Field(False, description="also freeze the vision-language merger (projector)")
    gradient_checkpointing: bool = Field(False, description="recompute activations in backward (long sequences)")
    kernels: Kernels = "auto"
    num_workers: int = Field(2, ge=1, description="Ray Train workers (one per GPU on GPU clusters)")
    use_gpu: bool = Field(False, description="one GPU per worker, NCCL, bf16")
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs Ray reserves per worker")
    resources_per_worker: RoleResources = Field(default_factory=dict, description="custom resources per worker, "
                                                "e.g. {trainer_node: 0.01} (cluster.yaml's trainer nodes)")
    zero_stage: Literal[0, 1, 2, 3] = Field(2, description="DeepSpeed ZeRO stage (3 for 7B)")
    offload_optimizer: bool = Field(False, description="ZeRO optimizer state in CPU memory")
    precision: Literal["auto", "bf16", "fp32"] = Field("auto", description="auto: bf16 on GPU, fp32 on CPU")
    attn_implementation: Literal["auto", "sdpa", "flash_attention_2", "eager"] = Field(
        "auto", description="auto: flash_attention_2 on GPU when flash-attn is installed, else sdpa")
    dataloader_workers: int = Field(0, ge=0, description="image-loading processes per worker")
    save_every: int = Field(100, ge=1, description="checkpoint every N steps (and at the end)")
    save_at: list[int] = Field(default_factory=list, description="also checkpoint after these steps (e.g. a partly "
                                                                 "trained model to start RL from)")
    save_at_end: bool = Field(True, description="checkpoint after the last step (benchmarks turn it off)")
    keep_checkpoints: int | None = Field(2, ge=1, description="checkpoints kept (oldest deleted); null: all")
    eval_every: int = Field(250, ge=1, description="validation loss every N steps (and at the end)")
    keep_best: Literal["none", "val_loss", "val_exact_match"] = Field(
        "none", description="also keep the model of the best validation so far as <run folder>/best (a Hugging "
                            "Face folder, best.json says its step): the lowest val_loss, or the highest "
                            "val_exact_match (the share of validation examples greedy decoding writes exactly)")
    log_every: int = Field(1, ge=1, description="print a progress line every N steps")
    logging: TrackerSettings = Field(default_factory=TrackerSettings)  # --logging.wandb / --logging.mlflow
    max_failures: int = Field(3, ge=0, description="worker-group restarts from the last checkpoint before "
                                                   "the run fails")
    profile_steps: tuple[int, int] | None = Field(
        None, description="trace optimizer steps [first, last] (1-based) with torch.profiler, CPU and CUDA: one "
                          "Chrome trace per rank in <run folder>/profile/ (Perfetto opens it; bench/trace_gaps.py "
                          "says where the GPU idles)")


# Worker output goes through logging: Ray Train prints a worker's print() twice (stdout and its logger).
logger = logging.getLogger("vigorl.sft")

# Settings that define which example each step sees: a resumed run must keep them.
RESUME_FIXED = ("model", "data", "val_data", "val_fraction", "data_root", "synthetic_n", "task", "mode",
                "system_prompt", "max_length", "global_batch_size", "seed")


def _prepare_data(cfg: SFTConfig, model_dir: Path) -> dict:
    """Read, check and tokenize the chains once, in the driver: {train, val, system, dropped, ...}."""
    from vigorl_core.rollout.chat_tokens import ChatTokens
    from vigorl_core.data import DataError, infer_task_source
    from vigorl_core.prompts import system_prompt
    from vigorl_core.train.sft_data import conversation_mode, encode_conversation, read_conversations
    from vigorl_core.synthetic.chains import write_synthetic_chains

    chat = ChatTokens.from_pretrained(model_dir)
    data = cfg.data
    if data == "synthetic":
        folder = Path(cfg.runs_dir) / "data" / f"sft-synthetic-n{cfg.synthetic_n}-s{cfg.seed}-{chat.profile.max_pixels}"
        data = str(write_synthetic_chains(folder, cfg.synthetic_n, cfg.seed, chat.profile))
    train = [c for file in _chain_files(data, "train") for c in read_conversations(file, data_root=cfg.data_root)]
    val_data = cfg.val_data or (data if Path(data).is_dir() else None)
    val = [c for file in _chain_files(val_data, "val") for c in read_conversations(file, data_root=cfg.data_root)]
    if not val and cfg.val_fraction:  # the original's chain builder holds out the last 5% of files
        cut = len(train) - max(1, round(cfg.val_fraction * len(train)))
        train, val = train[:cut], train[cut:]
    default_task = cfg.task or infer_task_source(data)[0]
    prompts: Counter = Counter()

    def encode(conv):
        task = conv.task or default_task
        if task is None:
            raise DataError(conv.file, conv.line, "task", "missing, and the path names no task: pass --task")
        mode = conversation_mode(conv) if cfg.mode == "auto" else cfg.mode
        prompts[(task, mode)] += 1
        return encode_conversation(conv, chat, system_prompt(task, mode), replace_system=cfg.system_prompt == "task")

    out: dict = {"train": [], "val": [], "dropped": [], "data": data}
    for split, convs in (("train", train), ("val", val)):
        for conv in convs:
            example = encode(conv)
            (out[split] if example.length <= cfg.max_length else out["dropped"]).append(example)
    if out["dropped"]:
        ids = ", ".join(e.id for e in out["dropped"][:5])
        print(f"dropped {len(out['dropped'])} examples longer than max_length={cfg.max_length} tokens (e.g. {ids})")
    # The checkpoint's chat template carries the prompt of the data's most common task and mode.
    (task, mode), _ = prompts.most_common(1)[0]
    out.update(system=system_prompt(task, mode), task=task, mode=mode)
    return out


def _chain_files(path: str | None, split: str) -> list[str]:
    """The files of `path`: itself, or for a `vigorl chains` folder its single-turn and multi-turn files of
    `split` that hold records (a split with no chains is written as [])."""
    if path is None:
        return []
    if not Path(path).is_dir():
        return [path]
    files = [Path(path) / f"{split}{kind}.json" for kind in ("", "_multiturn")]
    found = [str(f) for f in files if f.is_file() and f.read_text().strip() not in ("", "[]")]
    if split == "train" and not found:
        raise ConfigError(f"data: {path} holds no training chains ({' and '.join(f.name for f in files)} missing or "
                          f"empty): MCTS found no correct rollout for any sample (see {path}/stats.json)")
    return found


# ------------------------------------------------------------------------------------ per-worker training

LOGGED = ("loss", "val_loss", "val_exact_match", "lr", "grad_norm", "tokens_per_s", "samples_per_s")


def _progress(record: dict) -> str:
    val = (f" val_loss {record['val_loss']:.4f} val_exact_match {record['val_exact_match']:.3f}"
           if "val_loss" in record else "")
    return (f"loss {record['loss']:.4f}{val} lr {record['lr']:.2e} {record['tokens_per_s']:.0f} tok/s "
            f"{record['samples_per_s']:.2f} samples/s")


def train_worker(config: dict) -> None:
    """Ray Train worker: DeepSpeed engine, resume, the step loop, validation, checkpoints, logs."""
    from functools import partial

    import ray
    import ray.train
    import torch
    from transformers import AutoProcessor

    from jobs.training import RunLog, deepspeed_engine, first_fault, grad_norm, load_checkpoint, save_checkpoint
    from vigorl_core.rollout.chat_tokens import ChatTokens
    from vigorl_core.train.device_batch import to_device
    from vigorl_core.train.sft_data import BatchPlan, SFTDataset, collate
    from vigorl_core.train.sft_train import set_system_template

    cfg, faults = SFTConfig.model_validate(config["cfg"]), Faults.model_validate(config["faults"])
    data = ray.get(config["data"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    run_dir, model_dir = Path(config["run_dir"]), config["model_dir"]
    torch.manual_seed(cfg.seed)
    plan = BatchPlan([e.length for e in data["train"]], cfg.global_batch_size, cfg.micro_batch_size, world, cfg.seed)
    total = cfg.max_steps or math.ceil(cfg.epochs * plan.steps_per_epoch)
    engine, optimizer = deepspeed_engine(cfg, model_dir, plan.accumulation, world)
    client = load_checkpoint(engine)
    start = client["step"] if client else 0
    chat = ChatTokens.from_pretrained(model_dir)
    processor = set_system_template(AutoProcessor.from_pretrained(model_dir), data["system"])
    collate_fn = partial(collate, pad_id=chat.tokenizer.pad_token_id, image_pad_id=chat.image_pad_id,
                         merge_size=chat.profile.merge_size)
    train_set = SFTDataset(data["train"], processor.image_processor, chat.profile)
    val_set = SFTDataset(data["val"], processor.image_processor, chat.profile)
    loader = torch.utils.data.DataLoader(train_set, batch_sampler=plan.rank_batches(rank, start, total),
                                         collate_fn=collate_fn, num_workers=cfg.dataloader_workers,
                                         pin_memory=cfg.use_gpu)  # pinned: the copy below does not block
    batches = iter(loader)
    label_tokens = [e.label_tokens for e in data["train"]]
    device = engine.device
    log = RunLog(run_dir / "log.jsonl", start, total, world, logger, LOGGED, _progress,
                 trackers=cfg.logging) if rank == 0 else None
    trace = _Trace(cfg.profile_steps, run_dir / "profile", rank)
    for step in range(start, total):
        if faults.trainer_exit_at_step == step + 1 and rank == world - 1 and first_fault(run_dir):
            os._exit(1)  # a dying worker process: no cleanup, no exception
        trace.before(step + 1)
        started = time.perf_counter()
        lr = _set_lr(optimizer, cfg, step, total)
        step_labels = sum(label_tokens[i] for i in plan.step_batch(step))
        # No host wait inside the step (vigorl_core.train.device_batch): the loss sums on the device, tokens and
        # examples are counted on the host batch, and the GPU waits only on its own work.
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        tokens = examples = 0
        engine.train()
        for _ in range(plan.accumulation):
            with trace.region("data"):
                host = next(batches)
                batch = to_device(host, device)
                tokens += int(host["attention_mask"].sum())
                examples += len(host["input_ids"])
            with trace.region("forward"):
                nll, _ = _forward(engine, batch)
            with trace.region("backward"):
                # DeepSpeed divides by the accumulation steps and averages over ranks: scaled so, the update
                # follows the mean loss per labelled token of the whole global batch, however lengths fall.
                engine.backward(nll * (world * plan.accumulation / step_labels))
            with trace.region("step"):
                engine.step()
            loss_sum += nll.detach().double()
        sums = torch.stack([loss_sum, loss_sum.new_tensor(tokens), loss_sum.new_tensor(examples)])  # NCCL: on GPU
        torch.distributed.all_reduce(sums)
        loss, tokens, examples = sums.tolist()  # waits for the device: the step time is complete
        seconds = time.perf_counter() - started
        trace.after(step + 1, last=step + 1 == total)
        done = step + 1
        record = {"step": done, "loss": loss / step_labels, "lr": lr, "grad_norm": grad_norm(engine),
                  "tokens": int(tokens), "examples": int(examples), "step_seconds": seconds,
                  "tokens_per_s": tokens / seconds, "samples_per_s": examples / seconds,
                  "epoch": done / plan.steps_per_epoch}
        if data["val"] and (done % cfg.eval_every == 0 or done == total):
            record.update(_validate(engine, cfg, val_set, collate_fn, rank, world, device))
            if cfg.keep_best != "none":
                _keep_best(engine, cfg, processor, model_dir, run_dir, record, rank)
        if log:
            log.step(record, show=done % cfg.log_every == 0 or done == total)
        if done % cfg.save_every == 0 or done in cfg.save_at or (done == total and cfg.save_at_end):
            save_checkpoint(engine, cfg.zero_stage, processor, model_dir, run_dir, done, record, rank,
                            client_state={"step": done})
    if log:
        log.close()


class _Trace:
    """torch.profiler over optimizer steps [first, last] (`profile_steps`), written as one Chrome trace per rank;
    `region` names the loop's phases in it (data, forward, backward, step). Costs nothing when off."""

    def __init__(self, steps: tuple[int, int] | None, out_dir: Path, rank: int):
        self.steps, self.out_dir, self.rank, self.profiler = steps, out_dir, rank, None

    def before(self, step: int) -> None:
        if self.steps and step == self.steps[0]:
            import torch

            activities = [torch.profiler.ProfilerActivity.CPU]
            if torch.cuda.is_available():
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self.profiler = torch.profiler.profile(activities=activities)
            self.profiler.__enter__()

    def after(self, step: int, last: bool) -> None:
        if self.profiler is not None and (step >= self.steps[1] or last):
            self.profiler.__exit__(None, None, None)
            self.out_dir.mkdir(parents=True, exist_ok=True)
            self.profiler.export_chrome_trace(str(self.out_dir / f"rank{self.rank}-steps{self.steps[0]}-{step}.json"))
            self.profiler = None

    def region(self, name: str):
        if self.profiler is None:
            return contextlib.nullcontext()
        import torch

        return torch.profiler.record_function(f"vigorl.{name}")


def _set_lr(optimizer, cfg: SFTConfig, step: int, total: int) -> float:
    from jobs.training import set_lr
    from vigorl_core.train.sft_train import cosine_lr

    return set_lr(optimizer, cosine_lr(step, total, cfg.lr, cfg.warmup_ratio, cfg.min_lr_ratio))


def _logits(engine, batch: dict):
    """Logits [B, K, V] only where a label follows (batch["loss_positions"], from sft_data.collate)."""
    from vigorl_core.train.device_batch import model_inputs

    return engine(**model_inputs(batch), logits_to_keep=batch["loss_positions"], use_cache=False).logits


def _forward(engine, batch: dict):
    """(summed NLL of the labelled tokens, their count)."""
    from vigorl_core.train.sft_train import token_nll

    return token_nll(_logits(engine, batch), batch["labels"], batch["loss_positions"])


def _validate(engine, cfg: SFTConfig, val_set, collate_fn, rank: int, world: int, device) -> dict:
    """{val_loss: mean loss per labelled token, val_exact_match: share of examples whose every labelled token is
    the most likely one} over the whole validation set (each rank a share, then summed)."""
    import torch

    from vigorl_core.train.device_batch import to_device
    from vigorl_core.train.sft_data import eval_batches
    from vigorl_core.train.sft_train import exact_matches, token_nll

    sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss, tokens, exact matches, examples
    engine.eval()
    with torch.no_grad():
        for indices, counted in eval_batches([e.length for e in val_set.examples], cfg.micro_batch_size, world, rank):
            batch = to_device(collate_fn([val_set[i] for i in indices]), device)
            logits = _logits(engine, batch)
            nll, count = token_nll(logits, batch["labels"], batch["loss_positions"])
            matches = exact_matches(logits, batch["labels"], batch["loss_positions"])
            if counted:
                sums += torch.stack([nll.double(), count.double(), (matches == 1).sum().double(),
                                     (matches >= 0).sum().double()])
    torch.distributed.all_reduce(sums)
    loss, count, exact, examples = sums.tolist()
    return {"val_loss": loss / max(1.0, count), "val_exact_match": exact / max(1.0, examples)}


def _keep_best(engine, cfg: SFTConfig, processor, model_dir: str, run_dir: Path, record: dict, rank: int) -> None:
    """Write the model to run_dir/best when this validation beats best.json's (every rank decides the same from
    the all-reduced measures; ZeRO-3 gathers the weights, a collective). A resumed run keeps the best it had."""
    import torch

    from jobs.training import write_hf_model

    measure, best, staging = cfg.keep_best, run_dir / "best", run_dir / ".best.tmp"
    sign = -1 if measure == "val_loss" else 1
    previous = json.loads((best / "best.json").read_text()) if (best / "best.json").is_file() else None
    if previous is not None and sign * record[measure] <= sign * previous[measure]:
        return
    if rank == 0:
        shutil.rmtree(staging, ignore_errors=True)
    write_hf_model(engine, cfg.zero_stage, processor, model_dir, staging, rank)
    if rank == 0:
        (staging / "best.json").write_text(json.dumps({"step": record["step"], measure: record[measure]}) + "\n")
        shutil.rmtree(best, ignore_errors=True)
        os.replace(staging, best)
    torch.distributed.barrier()  # the next validation reads best.json on every rank


# ------------------------------------------------------------------------------------------------ driver

def _fit(cfg: SFTConfig, run_dir: Path, model_dir: Path, data: dict, faults: Faults):
    import ray

    from jobs.sft import train_worker  # by module name, so workers import it instead of unpickling __main__
    from jobs.training import cpus_needed, fit

    owned = not ray.is_initialized()
    init_ray(num_cpus=cpus_needed(cfg))
    try:
        return fit(train_worker, {"cfg": cfg.model_dump(mode="json"), "data": ray.put(data), "run_dir": str(run_dir),
                                  "model_dir": str(model_dir), "faults": faults.model_dump()}, cfg, run_dir)
    finally:
        if owned:
            ray.shutdown()


def _summary(run_dir: Path, data: dict, result, seconds: float) -> dict:
    records = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines() if line.strip()]
    steps = [r for r in records if "loss" in r]
    vals = [r["val_loss"] for r in steps if "val_loss" in r]
    step_seconds = sum(r["step_seconds"] for r in steps)
    return {
        "steps": steps[-1]["step"] if steps else 0,
        "first_loss": steps[0]["loss"] if steps else None,
        "final_loss": steps[-1]["loss"] if steps else None,
        "final_val_loss": vals[-1] if vals else None,
        "best_val_loss": min(vals) if vals else None,
        "final_val_exact_match": next((r["val_exact_match"] for r in reversed(steps) if "val_exact_match" in r), None),
        "best": json.loads((run_dir / "best" / "best.json").read_text()) if (run_dir / "best").is_dir() else None,
        "tokens_per_s": sum(r["tokens"] for r in steps) / step_seconds if steps else None,
        "samples_per_s": sum(r["examples"] for r in steps) / step_seconds if steps else None,
        "starts": sum(r.get("event") == "start" for r in records),
        "train_examples": len(data["train"]), "val_examples": len(data["val"]),
        "dropped_examples": len(data["dropped"]),
        "chat_template_prompt": {"task": data["task"], "mode": data["mode"]},
        "checkpoint": result.checkpoint.path if result.checkpoint else None,
        "seconds": round(seconds, 1),
    }


def _run(argv: list[str]) -> int:
    cfg, faults = parse_config(SFTConfig, argv, prog="vigorl sft"), requested_faults()
    if cfg.data is None:
        cfg = cfg.model_copy(update={"data": str(previous_output("sft", cfg.runs_dir, cfg.run_name).resolve())})
    run_dir = (Path(cfg.runs_dir) / "sft" / cfg.run_name).resolve()
    check_resume(run_dir, cfg.model_dump(mode="json"), settings_named(RESUME_FIXED), made="trained", save=False)
    log_to_run_folder(run_dir)
    started = time.perf_counter()
    model_dir = model_folder(cfg.model, cfg.runs_dir)
    data = _prepare_data(cfg, model_dir)
    if len(data["train"]) < cfg.global_batch_size:
        raise ConfigError(f"{len(data['train'])} training examples, fewer than global_batch_size "
                          f"{cfg.global_batch_size}")
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    print(f"sft {cfg.run_name}: {len(data['train'])} train / {len(data['val'])} val examples from {data['data']}, "
          f"{cfg.num_workers} workers, ZeRO-{cfg.zero_stage}; run folder {run_dir}", flush=True)
    result = _fit(cfg, run_dir, model_dir, data, faults)
    metrics = _summary(run_dir, data, result, time.perf_counter() - started)
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    print(f"done: {metrics['steps']} steps, loss {metrics['first_loss']:.4f} -> {metrics['final_loss']:.4f}"
          + (f", val loss {metrics['final_val_loss']:.4f}" if metrics["final_val_loss"] is not None else "")
          + f"; model: {run_dir / 'latest'}"
          + (f", best ({cfg.keep_best}) at step {metrics['best']['step']}: {run_dir / 'best'}"
             if metrics["best"] else ""),
          flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_main(_run, argv)


if __name__ == "__main__":
    sys.exit(main())
