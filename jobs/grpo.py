"""GRPO (the ViGoRL RL stage): single-turn grounded or multi-turn zoom, on Ray Train pulling from a replay actor.

    vigorl grpo --config configs/grpo_tiny.yaml                    # or: python -m jobs.grpo --config ...
    vigorl grpo --config configs/grpo_tiny.yaml --model tiny       # from the random tiny model instead
    ray job submit --working-dir . -- python -m jobs.grpo --config configs/grpo_qwen2.5-vl-7b.yaml

What runs (synchronous schedule: every step trains on rollouts of the weights it starts with, staleness 0):
1. the driver starts the run's pieces: a WeightStore (the one version authority), a Serve app of
   PolicyServer replicas (vLLM) that follow it, the ReplayBuffer actor and `rollout_workers` RolloutWorker
   actors (services/): CPU actors running the core rollout driver against the replicas;
2. a `TorchTrainer` starts `num_workers` trainer workers (DeepSpeed, the SFT model preparation: vision
   tower frozen) and a frozen reference model (the initial weights) when kl_coef > 0;
3. each step: rank 0 requests the step's prompts from the buffer (a pure function of seed and step; with
   max_staleness k >= 1 also the next k steps' prompts, each with the oldest policy version it may use);
   the rollout workers claim them, roll out groups of `group_size`, score them with the reward registry and
   put them in the buffer; every rank gets the groups, computes group-normalised advantages, old log-probs
   with its own forward and the reference log-probs, then takes rollouts / train_batch_size optimizer steps
   on the GRPO loss (vigorl_core.train.grpo: clipped ratio with clip-higher and dual clip, low-variance KL,
   token-mean loss); a rollout of an older policy (k >= 1) is weighted by the truncated importance ratio
   trainer / engine log-probs (decoupled PPO), so k = 0 is exactly the synchronous loss;
4. rank 0 publishes the new weights; with k = 0 `publish` returns once every replica serves them and the
   next step's rollouts come from them; with k >= 1 it returns at once and the replicas switch between
   requests (a multi-turn conversation may span versions: each turn records its own);
5. every `save_every` steps: a Hugging Face folder that transformers and vLLM load directly (no merge
   step) plus the DeepSpeed optimizer state, in runs/grpo/<run_name>/checkpoints/step-N; `latest` points to
   it. A killed trainer worker restarts from it (republishing its weights, so replicas and trainer agree
   again); rerunning the run name continues from it without repeating steps.

The initial policy (`model`) is by default the SFT checkpoint of the same run name, runs/sft/<run_name>/latest.
Run folder: runs/grpo/<run_name>/{config.yaml, metrics.jsonl, rollouts.jsonl (a few rollouts per step:
text, points, reward), tensorboard/, checkpoints/step-N/, latest, summary.json, job.log (engine and Ray logs
unless --verbose)}.

Faults: the replay buffer restarts when it dies (the trainer requests the step again; the groups it held,
at most `replay_capacity`, are rolled out again); a rollout whose replica dies is rolled out again from the
start on another replica; a trainer worker that dies restarts from the last checkpoint.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Literal

import yaml
from pydantic import Field, model_validator

from jobs.common import (REPO_ROOT, check_resume, init_ray, log_to_run_folder, model_folder, previous_output, run_main,
                         settings_named)
from jobs.faults import requested_faults
from jobs.training import Kernels, TrackerSettings
from services.app import PolicyAppSettings
from vigorl_core.config import ConfigError, RoleResources, StageConfig, parse_config
from vigorl_core.train.grpo import AGGREGATIONS
from vigorl_core.rollout.planned import requested_planned_zooms


class GRPOConfig(StageConfig):
    """GRPO on Qwen2.5-VL (single-turn grounded or multi-turn zoom) with Ray Train, vLLM replicas and a replay actor."""

    run_name: str = Field("default", description="runs/grpo/<run_name>; rerunning a name continues it")
    runs_dir: str = Field(str(REPO_ROOT / "runs"), description="root of run folders (shared storage on a cluster)")
    model: str | None = Field(None, description="Hugging Face folder of the initial policy (usually the SFT "
                              "checkpoint), or 'tiny' (built into <runs_dir>/models/tiny if missing); also the "
                              "reference; default: <runs_dir>/sft/<run_name>/latest, the SFT run of the same name")
    data: str = Field(description="training samples (any format vigorl_core.data.load_samples reads), or "
                                  "'synthetic' (the synthetic `task`, written under <runs_dir>/data)")
    data_root: str | None = Field(None, description="folder relative image paths resolve against")
    task: Literal["spatial", "visual_search", "grounding", "web_action"] = Field(
        "grounding", description="data=synthetic: which synthetic task")
    synthetic_n: int = Field(64, ge=1, description="data=synthetic: samples")
    mode: Literal["grounded", "multiturn", "vanilla"] = Field(
        "grounded", description="grounded: single-turn with points; multiturn: the zoom loop; vanilla: no points")
    max_steps: int = Field(500, ge=1, description="RL steps (one rollout batch each; paper: 500)")
    rollout_batch_size: int = Field(128, ge=1, description="prompts per step (paper: 128)")
    group_size: int = Field(5, ge=2, description="samples per prompt (paper: 5 single-turn, 8 multi-turn)")
    train_batch_size: int | None = Field(None, ge=1, description="rollouts per optimizer step (null: all of a "
                                         "step, one optimizer step); the original: 320 single-turn, 64 multi-turn")
    micro_batch_size: int = Field(1, ge=1, description="rollouts per worker per forward pass")
    lr: float = Field(1e-6, gt=0, description="learning rate (paper: 1e-6), constant after warmup")
    warmup_ratio: float = Field(0.05, ge=0, le=1, description="linear warmup over this fraction of the RL steps "
                                "(paper: 0.05; the original single-turn script: 0)")
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay")
    adam_betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas")
    max_grad_norm: float = Field(1.0, gt=0, description="gradient clipping (paper: 1.0 single-turn, 0.2 multi-turn)")
    kl_coef: float = Field(0.01, ge=0, description="low-variance KL to the reference model, as a loss term")
    clip_low: float = Field(0.2, ge=0, description="ratio clipped below at 1 - clip_low")
    clip_high: float = Field(0.28, ge=0, description="ratio clipped above at 1 + clip_high (clip-higher)")
    dual_clip: float = Field(3.0, gt=1, description="dual-clip constant for negative advantages")
    loss_aggregation: Literal["token_mean", "seq_mean_token_mean", "constant"] = Field(
        "token_mean", description=f"how token losses add up: {', '.join(AGGREGATIONS)} (constant = Dr. GRPO: "
                                  "divided by rollouts x max_response_tokens)")
    temperature: float = Field(1.0, gt=0, description="sampling temperature of the rollouts")
    top_p: float = Field(0.99, gt=0, le=1, description="top-p of the rollouts (paper: 0.99)")
    max_tokens_per_turn: int = Field(1024, ge=1, description="tokens one assistant turn may generate")
    max_response_tokens: int = Field(2048, ge=1, description="response budget incl. observation and image tokens "
                                     "(paper: 2048 single-turn, 4096 multi-turn)")
    max_turns: int = Field(5, ge=1, description="assistant turns per conversation (multiturn)")
    max_images: int = Field(5, ge=1, description="original + crops per conversation (multiturn)")
    freeze_vision_tower: bool = Field(True, description="freeze the ViT (the original freezes it)")
    freeze_projector: bool = Field(True, description="also freeze the merger (the original's freeze_vision_tower "
                                   "freezes all of model.visual)")
    gradient_checkpointing: bool = Field(False, description="recompute activations in backward (long sequences)")
    kernels: Kernels = "auto"
    num_workers: int = Field(1, ge=1, description="Ray Train trainer workers (one per GPU on GPU clusters)")
    use_gpu: bool = Field(False, description="one GPU per trainer worker, NCCL, bf16")
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs Ray reserves per trainer worker")
    gpus_per_worker: float = Field(1.0, gt=0, le=1, description="with use_gpu: GPU share per trainer worker; below "
                                   "1 the trainer shares its GPU with a policy replica (policy.gpus, and "
                                   "policy.engine.gpu_memory_utilization low enough for both)")
    resources_per_worker: RoleResources = Field(default_factory=dict, description="custom resources per trainer "
                                                "worker, e.g. {trainer_node: 0.01} (cluster.yaml's trainer nodes)")
    zero_stage: Literal[0, 1, 2, 3] = Field(2, description="DeepSpeed ZeRO stage (3 for 7B)")
    offload_optimizer: bool = Field(False, description="ZeRO optimizer state in CPU memory")
    offload_reference: bool = Field(False, description="keep the reference model in CPU memory between uses")
    precision: Literal["auto", "bf16", "fp32"] = Field("auto", description="auto: bf16 on GPU, fp32 on CPU")
    attn_implementation: Literal["auto", "sdpa", "flash_attention_2", "eager"] = Field(
        "auto", description="auto: flash_attention_2 on GPU when flash-attn is installed, else sdpa")
    policy: PolicyAppSettings = Field(default_factory=PolicyAppSettings)
    rollout_workers: int = Field(1, ge=1, description="RolloutWorker actors")
    rollout_concurrency: int = Field(64, ge=1, description="groups each rollout worker rolls out at once")
    rollout_resources: RoleResources = Field(default_factory=dict, description="custom resources of each rollout "
                                             "worker and of the replay buffer, e.g. {env_node: 0.01}")
    replay_capacity: int | None = Field(None, ge=1, description="groups the replay buffer holds (null: "
                                        "(max_staleness + 2) x rollout_batch_size); rollout workers wait when it is "
                                        "full")
    rollout_timeout_s: float = Field(3600.0, gt=0, description="fail a step whose rollouts take longer")
    save_every: int = Field(25, ge=1, description="checkpoint every N steps (and at the end)")
    keep_checkpoints: int | None = Field(2, ge=1, description="checkpoints kept (oldest deleted); null: all")
    log_rollouts: int = Field(4, ge=0, description="rollouts per step written to rollouts.jsonl")
    log_every: int = Field(1, ge=1, description="print a progress line every N steps")
    logging: TrackerSettings = Field(default_factory=TrackerSettings)  # --logging.wandb / --logging.mlflow
    seed: int = Field(0, description="prompt order and initialisation seed")
    max_staleness: int = Field(0, ge=0, description="k: train on rollouts generated at most k policy versions "
                               "ago. 0 = synchronous (each step waits for rollouts of its own weights); k >= 1 "
                               "rolls out the next k steps while the trainer trains (asynchronous GRPO)")
    engine_logprobs: bool | None = Field(None, description="rollouts ask the engine for each sampled token's "
                                         "log-prob: needed for k >= 1 importance weights and the logprob_mismatch "
                                         "metric; they halve engine throughput at 256 requests on an H200. null: "
                                         "on iff max_staleness >= 1")
    importance_cap: float = Field(2.0, gt=0, description="k >= 1: truncation of the importance weight "
                                  "pi_old / mu of a rollout sampled by an older policy (decoupled PPO)")
    max_failures: int = Field(3, ge=0, description="trainer restarts from the last checkpoint before the run fails")

    @model_validator(mode="after")
    def _batches_divide(self) -> GRPOConfig:
        rollouts = self.rollout_batch_size * self.group_size
        train = self.train_batch_size or rollouts
        if rollouts % train or train % (self.micro_batch_size * self.num_workers):
            raise ValueError(f"rollout_batch_size x group_size = {rollouts} rollouts per step must be a multiple "
                             f"of train_batch_size {train}, itself a multiple of micro_batch_size x num_workers = "
                             f"{self.micro_batch_size} x {self.num_workers}")
        if self.engine_logprobs is False and self.max_staleness >= 1:
            raise ValueError(f"engine_logprobs: false with max_staleness {self.max_staleness}: the importance weights "
                             "of off-policy rollouts need the engine's log-probs (set true or null)")
        steps_held = self.max_staleness + 1  # the step being trained and the k rolled out ahead
        if self.replay_capacity is not None and self.replay_capacity < steps_held * self.rollout_batch_size:
            raise ValueError(f"replay_capacity {self.replay_capacity} is smaller than the {steps_held} steps of "
                             f"{self.rollout_batch_size} groups the buffer must hold at once (max_staleness + 1)")
        return self


logger = logging.getLogger("vigorl.grpo")

# Settings that define what each step trains on: a continued run must keep them.
RESUME_FIXED = ("model", "data", "data_root", "task", "synthetic_n", "mode", "rollout_batch_size", "group_size",
                "train_batch_size", "seed")


# ------------------------------------------------------------------------------------ per-worker training

LOGGED = ("reward_mean", "reward_std", "accuracy", "format_rate", "format_reward", "kl", "entropy", "clip_fraction",
          "grad_norm", "pg_loss", "loss", "response_tokens", "turns", "zooms", "zero_variance_groups",
          "logprob_mismatch", "staleness_mean", "stale_dropped", "importance_weight_mean", "importance_weight_max",
          "policy_version",
          "lr", "time/generate", "time/score", "time/wait", "time/train", "time/sync", "time/step",
          "time/generation_idle", "time/trainer_idle")


def _progress(r: dict) -> str:
    return (f"reward {r['reward_mean']:.3f} acc {r['accuracy']:.2f} fmt {r['format_rate']:.2f} kl {r['kl']:.4f} "
            f"clip {r['clip_fraction']:.3f} len {r['response_tokens']:.0f} v{r['policy_version']} | "
            f"gen {r['time/generate']:.1f}s train {r['time/train']:.1f}s sync {r['time/sync']:.1f}s")


def train_worker(config: dict) -> None:
    """Ray Train worker: resume, then per step get rollouts, update, publish, checkpoint, log."""
    import ray
    import ray.train
    import torch
    from transformers import AutoProcessor

    from jobs.faults import Faults, kill_during_rollouts
    from jobs.training import (
        RunLog, deepspeed_engine, first_fault, grad_norm, load_checkpoint, save_checkpoint, set_lr,
    )
    from services.app import wait_for_app
    from services.replay import NAMESPACE, replay_name
    from services.weight_sync import WeightPublisher
    from vigorl_core.rollout.chat_tokens import ChatTokens
    from vigorl_core.train.grpo import group_advantages
    from vigorl_core.train.grpo_batch import minibatch_plan, step_samples
    from vigorl_core.train.grpo_metrics import buffer_metrics, rollout_metrics, train_metrics
    from vigorl_core.prompts import system_prompt
    from vigorl_core.train.sft_train import DEFAULT_SYSTEM, set_system_template

    cfg, faults = GRPOConfig.model_validate(config["cfg"]), Faults.model_validate(config["faults"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    run_dir, model_dir = Path(config["run_dir"]), config["model_dir"]
    torch.manual_seed(cfg.seed)
    train_batch = cfg.train_batch_size or cfg.rollout_batch_size * cfg.group_size
    engine, optimizer = deepspeed_engine(cfg, model_dir, train_batch // (cfg.micro_batch_size * world), world)
    client = load_checkpoint(engine)
    start, version = (client["step"], client["version"]) if client else (0, config["initial_version"])
    reference = _reference(cfg, model_dir, engine.device) if cfg.kl_coef > 0 else None
    chat = ChatTokens.from_pretrained(model_dir)
    processor = AutoProcessor.from_pretrained(model_dir)
    if DEFAULT_SYSTEM in (processor.chat_template or ""):  # an SFT checkpoint already carries the task's prompt
        processor = set_system_template(processor, system_prompt(cfg.task, cfg.mode))
    buffer = ray.get_actor(replay_name(cfg.run_name), namespace=NAMESPACE)
    wait_for_app(config["app"])  # the driver started it without waiting, to overlap its engines' start with ours
    publisher = WeightPublisher(cfg.run_name, config["app"]) if rank == 0 else None
    if publisher and publisher.version() != version:
        # A restarted worker group: the replicas serve weights newer than this checkpoint; make them agree.
        version = publisher.publish(_policy_state(engine, cfg), wait=True)
    version = _broadcast(version)
    total = cfg.max_steps
    log = RunLog(run_dir / "metrics.jsonl", start, total, world, logger, LOGGED, _progress,
                 trackers=cfg.logging) if rank == 0 else None
    before = ray.get(buffer.status.remote()) if rank == 0 else {}
    for step in range(start, total):
        if faults.trainer_exit_at_step == step + 1 and rank == world - 1 and first_fault(run_dir):
            os._exit(1)  # a dying worker process: no cleanup, no exception
        started = time.perf_counter()
        lr = set_lr(optimizer, cfg.lr * min(1.0, (step + 1) / max(1, math.ceil(cfg.warmup_ratio * total))))

        def request(step=step, version=version) -> None:
            """This step's prompts and, asynchronous, the next k steps' (idempotent: asked again each step)."""
            for ahead in range(min(cfg.max_staleness, total - 1 - step) + 1):
                indices = step_samples(config["num_samples"], cfg.rollout_batch_size, cfg.seed, step + ahead)
                ray.get(buffer.request.remote(step + ahead, version + ahead - cfg.max_staleness, indices))

        if rank == 0:
            kill_during_rollouts(faults, run_dir, step, buffer, config["app"], request)
        groups, image_refs = _fetch_groups(cfg, buffer, step, rank, request, engine.device)
        waited = time.perf_counter() - started
        records = [r for g in groups for r in g.records]
        rewards = torch.tensor([r.reward for r in records], dtype=torch.float32)
        advantages = group_advantages(rewards, [g.item.group_id for g in groups for _ in g.records])
        plan = minibatch_plan([len(r.train_ids) for r in records], train_batch, cfg.micro_batch_size, world,
                              cfg.seed, step)
        train_started = time.perf_counter()
        sums = _train_step(cfg, engine, reference, records, advantages, plan, rank, image_refs, chat, processor,
                           version)
        _all_reduce_stats(sums)
        trained = time.perf_counter()
        done, trained_version = step + 1, version
        if publisher:  # asynchronous: written and announced in the background; replicas switch between requests
            version = publisher.publish(_policy_state(engine, cfg), wait=cfg.max_staleness == 0)
        else:
            _policy_state(engine, cfg)  # ZeRO-3 gathers collectively
        version = _broadcast(version)
        synced = time.perf_counter()
        record = {"step": done, "policy_version": version, "lr": lr, "grad_norm": grad_norm(engine),
                  **train_metrics(sums), **rollout_metrics(groups, records, trained_version),
                  "time/wait": waited, "time/trainer_idle": waited,
                  "time/train": trained - train_started, "time/sync": synced - trained, "time/step": synced - started}
        if rank == 0:
            now = ray.get(buffer.status.remote())
            record.update(buffer_metrics(before, now))
            before = now
        if log:
            log.step(record, show=done % cfg.log_every == 0 or done == total)
            _log_rollouts(run_dir, done, records, cfg.log_rollouts)
            ray.get(buffer.release.remote(step))
        if done % cfg.save_every == 0 or done == total:
            save_checkpoint(engine, cfg.zero_stage, processor, model_dir, run_dir, done, record, rank,
                            client_state={"step": done, "version": version})
    if publisher:
        publisher.flush()  # the last version is announced before the job ends
    if log:
        log.close()


def _fetch_groups(cfg: GRPOConfig, buffer, step: int, rank: int, request, device):
    """(groups, image refs) of `step`, the same on every rank. A buffer that restarted empty answers None for
    the step (and its image objects are gone with it): rank 0 requests the step again and every rank
    retries, until `rollout_timeout_s`."""
    import ray
    import torch

    deadline = time.monotonic() + cfg.rollout_timeout_s
    while True:
        if rank == 0:
            request()
        got = ray.get(buffer.get.remote(step, 10.0))
        if got is not None and got[1]:
            try:  # the images' owner is the buffer: if it died after answering, they are gone too
                ray.get(next(iter(got[1].values()))[0], timeout=60)
            except (ray.exceptions.OwnerDiedError, ray.exceptions.ObjectLostError):
                got = None
        ok = torch.tensor([got is not None], dtype=torch.int64, device=device)  # NCCL reduces GPU tensors only
        torch.distributed.all_reduce(ok, op=torch.distributed.ReduceOp.MIN)
        if ok.item():
            return got
        if time.monotonic() > deadline:
            raise TimeoutError(f"step {step}: rollouts not complete after {cfg.rollout_timeout_s:.0f} s "
                               f"(replay buffer: {ray.get(buffer.status.remote())})")


def _train_step(cfg: GRPOConfig, engine, reference, records, advantages, plan, rank, image_refs, chat, processor,
                version: int):
    """Old and reference log-probs, then one optimizer step per mini-batch of `plan`. Returns the summed stats
    (each weighted by its micro-batch's loss tokens), token counts, the engine/trainer log-prob gap and the
    importance weights of rollouts older than `version` (the trainer's)."""
    import ray
    import torch
    from PIL import Image

    from vigorl_core.train.grpo import behaviour_weights, grpo_loss
    from vigorl_core.train.grpo_batch import collate_rollouts, rollout_item, sequence_logprobs
    from vigorl_core.train.grpo_metrics import EXTRA_SUMS, STAT_KEYS, add_micro_batch, loss_normalizer

    device = engine.device
    mine = [i for minibatch in plan for micro in minibatch[rank] for i in micro]
    hashes = list(dict.fromkeys(h for i in mine for h in records[i].images))
    pixels = dict(zip(hashes, ray.get([image_refs[h][0] for h in hashes])))
    images = {h: Image.fromarray(p) for h, p in pixels.items()}

    def batch_of(micro):
        items = [rollout_item(records[i], [images[h] for h in records[i].images], float(advantages[i]),
                              processor.image_processor) for i in micro]
        batch = collate_rollouts(items, chat.tokenizer.pad_token_id, chat.image_pad_id)
        # A rollout with a turn of an older policy gets the off-policy correction (unless its engine
        # log-probs are untrusted: a grammar's, or zeros when the rollout did not ask for them).
        batch["behind"] = torch.tensor([min(records[i].policy_versions) < version for i in micro]) & ~batch["untrusted"]
        return {k: v.to(device) for k, v in batch.items()}

    micro_batches = [[batch_of(micro) for micro in minibatch[rank]] for minibatch in plan]
    # With one optimizer step per rollout batch the policy has not moved when the loss is computed, so the
    # training forward's own (detached) log-probs ARE the old log-probs; otherwise a no-grad pass first.
    separate_old = len(plan) > 1 or any(bool(b["behind"].any()) for mini in micro_batches for b in mini)
    with torch.no_grad():
        engine.eval()
        for batch in (b for mini in micro_batches for b in mini):
            if separate_old:
                batch["old"] = sequence_logprobs(engine, batch)[0]
            if reference is not None:
                batch["ref"] = _reference_logprobs(cfg, reference, batch, device)
    engine.train()
    accumulation = len(micro_batches[0])
    world = torch.distributed.get_world_size()
    sums = torch.zeros(len(STAT_KEYS) + EXTRA_SUMS, dtype=torch.float64, device=device)
    for mini_index, minibatch in enumerate(plan):
        members = [i for ranks in minibatch for micro in ranks for i in micro]
        normalizer = loss_normalizer(cfg.loss_aggregation, [records[i] for i in members],
                                     cfg.max_response_tokens)
        for batch in micro_batches[mini_index]:
            logprobs, mask, positions = sequence_logprobs(engine, batch)
            old = batch.get("old", logprobs.detach())
            engine_lp = batch["engine_logprobs"][:, positions + 1]  # aligned with logprobs [B, K]
            weights, stale_tokens = None, mask & batch["behind"][:, None]
            if stale_tokens.any():
                weights = torch.where(stale_tokens, behaviour_weights(old, engine_lp, mask, cfg.importance_cap), 1.0)
            loss, stats = grpo_loss(logprobs, old, batch.get("ref"), batch["advantages"], mask,
                                    clip_low=cfg.clip_low, clip_high=cfg.clip_high, dual_clip=cfg.dual_clip,
                                    kl_coef=cfg.kl_coef, aggregation=cfg.loss_aggregation, normalizer=normalizer,
                                    token_weights=weights)
            # DeepSpeed divides by the accumulation steps and averages over ranks: scaled so, the update
            # follows the loss aggregated over the whole mini-batch (normalizer is global).
            engine.backward(loss * world * accumulation)
            engine.step()
            tokens = float(mask.sum())
            trusted = mask & ~batch["untrusted"][:, None]
            gap = ((old.detach() - engine_lp).abs() * trusted).sum()
            stat_values = [stats[k] * tokens for k in STAT_KEYS]
            w_sum = float(weights[stale_tokens].sum()) if weights is not None else 0.0
            w_max = float(weights[stale_tokens].max()) if weights is not None else 0.0
            capped = float((weights[stale_tokens] >= cfg.importance_cap).sum()) if weights is not None else 0.0
            add_micro_batch(sums, [*stat_values, tokens, float(trusted.sum()), float(gap), float(stale_tokens.sum()),
                                   w_sum, capped], w_max)
    return sums


def _log_rollouts(run_dir: Path, step: int, records, n: int) -> None:
    lines = [json.dumps({"step": step, "sample_id": r.sample_id, "group_index": r.group_index, "reward": r.reward,
                         "details": r.reward_details, "finish": r.finish, "versions": r.policy_versions,
                         "text": r.text, "points": [[p.x, p.y] for p in r.trace.points]}) + "\n" for r in records[:n]]
    with open(run_dir / "rollouts.jsonl", "a", encoding="utf-8") as f:
        f.writelines(lines)


def _all_reduce_stats(sums) -> None:
    """Sum the step's statistics over ranks, except the last one (the importance-weight maximum): MAX."""
    import torch

    highest = sums[-1:].clone()
    torch.distributed.all_reduce(highest, op=torch.distributed.ReduceOp.MAX)
    torch.distributed.all_reduce(sums)
    sums[-1:] = highest


def _broadcast(value: int) -> int:
    import torch

    box = [value]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def _policy_state(engine, cfg: GRPOConfig) -> dict:
    """The policy's weights under Hugging Face names (ZeRO-3: gathered, a collective on every rank)."""
    if cfg.zero_stage == 3:
        return engine._zero3_consolidated_16bit_state_dict()
    return engine.module.state_dict()


def _reference(cfg: GRPOConfig, model_dir: str, device):
    """The frozen reference policy: the initial weights, never updated (CPU-resident with offload_reference)."""
    import torch
    from transformers import AutoModelForImageTextToText

    from jobs.training import attention, uses_bf16
    from vigorl_core.train.vision_attention import batch_window_attention

    model = AutoModelForImageTextToText.from_pretrained(
        model_dir, dtype=torch.bfloat16 if uses_bf16(cfg) else torch.float32, attn_implementation=attention(cfg))
    model.requires_grad_(False).eval()
    batch_window_attention(model)
    return model if cfg.offload_reference else model.to(device)


def _reference_logprobs(cfg: GRPOConfig, reference, batch, device):
    from vigorl_core.train.grpo_batch import sequence_logprobs

    if cfg.offload_reference:
        reference.to(device)
    try:
        return sequence_logprobs(reference, batch)[0]
    finally:
        if cfg.offload_reference:
            reference.to("cpu")


# ------------------------------------------------------------------------------------------------ driver

def _samples(cfg: GRPOConfig) -> list:
    from vigorl_core.data import load_samples
    from vigorl_core.synthetic.tasks import write_dataset

    if cfg.data == "synthetic":
        folder = Path(cfg.runs_dir) / "data" / f"{cfg.task}-n{cfg.synthetic_n}-s{cfg.seed}"
        path = write_dataset(cfg.task, cfg.synthetic_n, cfg.seed, folder)
    else:
        path = Path(cfg.data)
    samples = load_samples(path, data_root=cfg.data_root)
    if not samples:
        raise ConfigError(f"data: {path} holds no samples")
    return samples


def _check_resume(cfg: GRPOConfig, run_dir: Path) -> tuple[int, int, Path | None]:
    """(step, policy version, checkpoint folder) a rerun continues from; (0, 0, None) for a new run."""
    check_resume(run_dir, cfg.model_dump(mode="json"), settings_named(RESUME_FIXED), made="trained", save=False)
    latest = run_dir / "latest"
    if not (latest / "trainer_state.json").is_file():
        return 0, 0, None
    state = json.loads((latest / "trainer_state.json").read_text())
    return state["step"], state["version"], latest.resolve()


def _rollout_settings(cfg: GRPOConfig) -> dict:
    return {"mode": cfg.mode, "group_size": cfg.group_size, "temperature": cfg.temperature, "top_p": cfg.top_p,
            "max_turns": cfg.max_turns, "max_images": cfg.max_images, "max_tokens_per_turn": cfg.max_tokens_per_turn,
            "max_response_tokens": cfg.max_response_tokens,
            "logprobs": cfg.max_staleness >= 1 if cfg.engine_logprobs is None else cfg.engine_logprobs}


def _run(argv: list[str]) -> int:
    import ray
    from ray import serve

    from jobs.training import cpus_needed, fit
    from services.app import start_policy_app
    from services.replay import NAMESPACE, ReplayBuffer, replay_name
    from services.rollouts import RolloutWorker
    from services.weight_sync import WeightPublisher

    cfg, faults = parse_config(GRPOConfig, argv, prog="vigorl grpo"), requested_faults()
    if cfg.model is None:
        cfg = cfg.model_copy(update={"model": str(previous_output("grpo", cfg.runs_dir, cfg.run_name).resolve())})
    run_dir = (Path(cfg.runs_dir) / "grpo" / cfg.run_name).resolve()
    start, version, checkpoint = _check_resume(cfg, run_dir)
    log_to_run_folder(run_dir)
    if start >= cfg.max_steps:
        print(f"run {run_dir} already has {start} of {cfg.max_steps} steps; nothing to do")
        return 0
    model_dir = model_folder(cfg.model, cfg.runs_dir)
    samples = _samples(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    print(f"grpo {cfg.run_name}: {cfg.mode} on {len(samples)} samples, steps {start}..{cfg.max_steps}, "
          f"{cfg.rollout_batch_size} prompts x {cfg.group_size} per step; run folder {run_dir}", flush=True)
    started = time.perf_counter()
    owned = not ray.is_initialized()
    init_ray(num_cpus=cpus_needed(cfg, extra=2 + cfg.policy.replicas))
    app = f"grpo-{cfg.run_name}"
    publisher = WeightPublisher.create(cfg.run_name, app, initial_version=version)
    # A buffer that dies comes back empty (its calls in flight are retried on it); the trainer requests the
    # lost steps again.
    buffer = ReplayBuffer.options(name=replay_name(cfg.run_name), namespace=NAMESPACE, max_restarts=-1,
                                  max_task_retries=-1, resources=cfg.rollout_resources).remote(cfg.replay_capacity or
                                                              (cfg.max_staleness + 2) * cfg.rollout_batch_size)
    workers, started_app = [], False
    try:
        # The replicas load the weights the trainer starts from: the checkpoint a rerun continues, else the model.
        # Not waited for here: the trainer workers load their model while the engines start (train_worker waits).
        _, _, started_app = start_policy_app(app, str(checkpoint or model_dir), engine=cfg.policy.engine,
                                             replicas=cfg.policy.replicas, gpus=cfg.policy.gpus, weights=cfg.run_name,
                                             resources=cfg.policy.resources, wait=False)
        samples_ref = ray.put(samples)
        # A worker that dies restarts, and its `run` call with it; it hands its unfinished claims back first.
        workers = [RolloutWorker.options(max_restarts=-1, max_task_retries=-1, resources=cfg.rollout_resources).remote(
                       f"rollout-{i}", cfg.run_name, app, str(model_dir), samples_ref, _rollout_settings(cfg),
                       requested_planned_zooms())
                   for i in range(cfg.rollout_workers)]
        for worker in workers:
            worker.run.remote(cfg.rollout_concurrency)
        from jobs.grpo import train_worker  # by module name, so workers import it instead of unpickling __main__

        result = fit(train_worker, {"cfg": cfg.model_dump(mode="json"), "run_dir": str(run_dir),
                                    "model_dir": str(model_dir), "app": app, "initial_version": version,
                                    "num_samples": len(samples), "faults": faults.model_dump()},
                     cfg, run_dir)
    finally:
        for worker in workers:
            ray.kill(worker)
        if started_app:
            serve.delete(app)
        ray.kill(buffer)
        publisher.close()
        if owned:
            ray.shutdown()
    summary = _summary(run_dir, result, time.perf_counter() - started)
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"done: {summary['steps']} steps, reward {summary['first_reward']:.3f} -> {summary['last_reward']:.3f}; "
          f"model: {run_dir / 'latest'}", flush=True)
    return 0


def _summary(run_dir: Path, result, seconds: float) -> dict:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = [r for r in records if "reward_mean" in r]
    tail = steps[-max(1, len(steps) // 4):]
    return {
        "steps": steps[-1]["step"] if steps else 0,
        "first_reward": steps[0]["reward_mean"] if steps else 0.0,
        "last_reward": steps[-1]["reward_mean"] if steps else 0.0,
        "last_quarter_reward": sum(r["reward_mean"] for r in tail) / len(tail) if tail else 0.0,
        "policy_version": steps[-1]["policy_version"] if steps else 0,
        "starts": sum(r.get("event") == "start" for r in records),
        "checkpoint": result.checkpoint.path if result.checkpoint else None,
        "seconds": round(seconds, 1),
    }


def main(argv: list[str] | None = None) -> int:
    return run_main(_run, argv)


if __name__ == "__main__":
    sys.exit(main())
