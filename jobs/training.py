"""What the SFT and GRPO Ray Train workers share: the DeepSpeed engine, checkpoints, the run log (with the
optional W&B / MLflow trackers), the fault-injection switch of the fault tests, and the Ray Train launch.

Imported by jobs/sft.py and jobs/grpo.py (and their workers); not a stage of its own.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import time
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator

from vigorl_core.config import StageConfig
from vigorl_core.evals.evaluation import round_floats

# The `kernels` field of the trainer configs (vigorl_core.train.kernels).
Kernels = Annotated[Literal["auto", "liger", "compile", "none"], Field(
    description="fused kernels for the language model: liger (Liger's Triton RMSNorm, SwiGLU, rotary; GPU, pip "
    "install liger-kernel), compile (torch.compile per decoder layer), none; auto = liger on a GPU when "
    "liger-kernel is installed, else none")]


def skip_cpu_shm_op() -> None:
    """Before a CPU DeepSpeed engine starts: DeepSpeed's shared-memory all-reduce is a C++ op compiled at the first
    engine on a machine (about a minute on 2 cores, again for each new venv or extensions folder), and
    torch.distributed's gloo does that job for CPU runs, so it is not built."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def deepspeed_engine(cfg: Any, model_dir: str, accumulation: int, world: int):
    """The model (vision tower frozen as configured) in a DeepSpeed engine with a torch AdamW; `cfg` is a
    stage config with the trainer fields (SFTConfig, GRPOConfig): precision, zero_stage, micro_batch_size,
    max_grad_norm, offload_optimizer, use_gpu, attn_implementation, freeze_*, gradient_checkpointing, kernels, lr,
    adam_betas, weight_decay. A single bf16 rank's gradient sums run in one pass (grad_sums). Returns (engine,
    optimizer)."""
    import deepspeed
    import torch
    from transformers import AutoModelForImageTextToText

    from vigorl_core.train.grad_sums import fuse_bf16_grad_sums
    from vigorl_core.train.sft_train import deepspeed_config, prepare_for_training

    if not cfg.use_gpu:
        skip_cpu_shm_op()
    bf16 = uses_bf16(cfg)
    ds_config = deepspeed_config(cfg.zero_stage, cfg.micro_batch_size, accumulation, world, bf16,
                                 cfg.max_grad_norm, cfg.offload_optimizer, gpu=cfg.use_gpu)
    # Every rank loads the whole model into host memory; ZeRO-3 partitions it in deepspeed.initialize
    # (transformers' load-time partitioning, HfDeepSpeedConfig, would add the accelerate package).
    model = AutoModelForImageTextToText.from_pretrained(
        model_dir, dtype=torch.bfloat16 if bf16 else torch.float32, attn_implementation=attention(cfg))
    trainable = prepare_for_training(model, freeze_vision_tower=cfg.freeze_vision_tower,
                                     freeze_projector=cfg.freeze_projector,
                                     gradient_checkpointing=cfg.gradient_checkpointing, kernels=cfg.kernels,
                                     gpu=cfg.use_gpu)
    # fused: one kernel for all of AdamW's tensors on a GPU (the default foreach path launches several per group).
    fused = cfg.use_gpu and not cfg.offload_optimizer
    optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, betas=cfg.adam_betas, weight_decay=cfg.weight_decay,
                                  fused=fused or None)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    fuse_bf16_grad_sums(engine.optimizer)  # one bf16 rank: its fp32 gradient sums in one pass per micro-step
    return engine, optimizer


def uses_bf16(cfg: Any) -> bool:
    return cfg.precision == "bf16" or (cfg.precision == "auto" and cfg.use_gpu)


def attention(cfg: Any) -> str:
    """auto: flash_attention_2 on GPU when flash-attn is installed, else sdpa."""
    if cfg.attn_implementation != "auto":
        return cfg.attn_implementation
    try:
        import flash_attn  # noqa: F401

        return "flash_attention_2" if cfg.use_gpu else "sdpa"
    except ImportError:
        return "sdpa"


def set_lr(optimizer, lr: float) -> float:
    for group in optimizer.param_groups:  # the groups ZeRO steps: it wraps this optimizer
        group["lr"] = lr
    return lr


def grad_norm(engine) -> float | None:
    norm = engine.get_global_grad_norm()
    return None if norm is None else float(norm)


def save_checkpoint(engine, zero_stage: int, processor, model_dir: str, run_dir: Path, done: int, record: dict,
                    rank: int, client_state: dict) -> None:
    """Write checkpoints/step-<done>/ in place (run_dir is shared storage): every rank its DeepSpeed shard
    (with `client_state`), rank 0 the Hugging Face folder; then register it with Ray Train without a copy
    (NO_UPLOAD). Ray Train registers it once every rank has reported, and deletes checkpoints beyond
    keep_checkpoints. `latest` points at it."""
    import ray.train
    from ray.train import CheckpointUploadMode

    from vigorl_core.train.sft_train import point_latest

    folder = run_dir / "checkpoints" / f"step-{done}"
    (folder / "deepspeed").mkdir(parents=True, exist_ok=True)
    engine.save_checkpoint(str(folder / "deepspeed"), tag="state", client_state=client_state,
                           exclude_frozen_parameters=True)
    write_hf_model(engine, zero_stage, processor, model_dir, folder, rank)
    if rank == 0:
        (folder / "trainer_state.json").write_text(json.dumps(client_state) + "\n")
    ray.train.report(record, checkpoint=ray.train.Checkpoint.from_directory(str(folder)),
                     checkpoint_upload_mode=CheckpointUploadMode.NO_UPLOAD)
    if rank == 0:
        point_latest(run_dir, folder)


def write_hf_model(engine, zero_stage: int, processor, model_dir: str, folder: Path, rank: int) -> None:
    """Rank 0 writes the engine's model as a Hugging Face folder at `folder` (sft_train.save_hf_checkpoint). Call it
    on every rank: ZeRO-3 first gathers the 16-bit weights, a collective."""
    from vigorl_core.train.sft_train import save_hf_checkpoint

    state = engine._zero3_consolidated_16bit_state_dict() if zero_stage == 3 else None
    if rank == 0:
        save_hf_checkpoint(folder, engine.module, processor, state_dict=state, source_dir=model_dir)


def load_checkpoint(engine) -> dict | None:
    """The client state of the checkpoint Ray Train restores (a restarted worker group, a rerun), after
    loading its DeepSpeed state into `engine`; None for a fresh run."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as folder:
        _, client = engine.load_checkpoint(f"{folder}/deepspeed", tag="state", load_module_strict=False)
    return client


def first_fault(run_dir: Path, what: str = "") -> bool:
    """True once per run folder (and kind of fault): the fault tests kill something once."""
    marker = run_dir / (f"fault_injected_{what}" if what else "fault_injected")
    try:  # O_EXCL: one winner even among concurrent actors
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        f.write(f"{time.time()}\n")
    return True


class TrackerSettings(StageConfig):
    """Experiment trackers that get the TensorBoard scalars too (from rank 0); all off by default."""

    wandb: str | None = Field(None, description="Weights & Biases project to log to (pip install wandb; "
                              "WANDB_MODE=offline keeps the run in <run folder>/wandb)")
    mlflow: str | None = Field(None, description="MLflow tracking URI: http(s)://server, databricks, or a local "
                               "folder (pip install mlflow-skinny)")
    experiment: str | None = Field(None, description="MLflow experiment and W&B group (default: vigorl-<stage>)")

    @field_validator("wandb", "mlflow")
    @classmethod
    def _installed(cls, value: str | None, info) -> str | None:
        package = info.field_name  # the field is named after its package
        if value is not None and importlib.util.find_spec(package) is None:
            raise ValueError(f"needs the {package} package, which is not installed: pip install "
                             f"'vigorl[trackers]' (or {'mlflow-skinny' if package == 'mlflow' else package})")
        if package == "mlflow" and value is not None and _is_folder(value):
            return str(Path(value).resolve())  # rank 0 runs in Ray Train's working directory, not the caller's
        return value


class Trackers:
    """The W&B and MLflow runs of a training run, fed the same scalars as TensorBoard. A restart or rerun of
    the run name logs into the same tracker runs (their ids are kept in <run_dir>/trackers.json); steps that a
    restart redoes are logged again (TensorBoard purges them, W&B ignores steps it has, MLflow keeps both).
    Parameters are the run folder's config.yaml, flattened, logged when a tracker run is created."""

    def __init__(self, settings: TrackerSettings, run_dir: Path):
        import yaml

        ids_file = run_dir / "trackers.json"
        ids = json.loads(ids_file.read_text()) if ids_file.is_file() else {}
        config_file = run_dir / "config.yaml"
        params = _flatten(yaml.safe_load(config_file.read_text()) or {}) if config_file.is_file() else {}
        group = settings.experiment or f"vigorl-{run_dir.parent.name}"  # vigorl-sft, vigorl-grpo
        self.wandb = self.mlflow = None
        if settings.wandb:
            import wandb

            ids.setdefault("wandb", f"{run_dir.name}-{uuid.uuid4().hex[:8]}")  # W&B run ids are unique per project
            self.wandb = wandb.init(project=settings.wandb, id=ids["wandb"], name=run_dir.name, group=group,
                                    dir=str(run_dir), config=params, resume="allow")
        if settings.mlflow:
            from mlflow import MlflowClient
            from mlflow.entities import Param

            if _is_folder(settings.mlflow) or settings.mlflow.startswith("file:"):
                # MLflow 3's file store, which it opens only when asked
                os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            client = MlflowClient(tracking_uri=settings.mlflow)
            if "mlflow" not in ids:
                found = client.get_experiment_by_name(group)
                experiment = found.experiment_id if found else client.create_experiment(group)
                ids["mlflow"] = client.create_run(experiment, run_name=run_dir.name).info.run_id
                client.log_batch(ids["mlflow"], params=[Param(k[:250], str(v)[:6000]) for k, v in params.items()])
            self.mlflow = (client, ids["mlflow"])
        ids_file.write_text(json.dumps(ids) + "\n")

    def log(self, scalars: dict[str, float], step: int) -> None:
        if self.wandb is not None:
            self.wandb.log(scalars, step=step)
        if self.mlflow is not None:
            from mlflow.entities import Metric

            client, run_id = self.mlflow
            now = int(time.time() * 1000)
            client.log_batch(run_id, metrics=[Metric(k, float(v), now, step) for k, v in scalars.items()])

    def close(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()
        if self.mlflow is not None:
            client, run_id = self.mlflow
            client.set_terminated(run_id)


def _is_folder(uri: str) -> bool:
    return "://" not in uri and not uri.startswith(("databricks", "file:"))


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


class RunLog:
    """Rank 0's record of the run: a JSONL file (one line per step, `start` events), TensorBoard scalars (and
    W&B / MLflow with `trackers`), and a progress line with ETA. A restart first moves what was logged after its
    checkpoint to <name>.superseded.jsonl: those steps run again, and each step stays in the log once."""

    def __init__(self, path: Path, start: int, total: int, world: int, logger: logging.Logger,
                 scalars: Iterable[str], line: Callable[[dict], str], trackers: TrackerSettings | None = None):
        from tensorboardX import SummaryWriter

        from vigorl_core.train.sft_train import truncate_log

        self.path, self.start, self.total, self.began = path, start, total, time.perf_counter()
        self.logger, self.scalars, self.line = logger, tuple(scalars), line
        truncate_log(self.path, start)
        self.tensorboard = SummaryWriter(str(path.parent / "tensorboard"), purge_step=start + 1)
        on = trackers is not None and (trackers.wandb or trackers.mlflow)
        self.trackers = Trackers(trackers, path.parent) if on else None
        self._write({"event": "start", "step": start, "total_steps": total, "world_size": world})
        if start:
            logger.info(f"resuming at step {start} of {total}")

    def _write(self, record: dict) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps({**round_floats(record), "time": round(time.time(), 3)}) + "\n")

    def step(self, record: dict, show: bool) -> None:
        self._write(record)
        scalars = {}
        for key in self.scalars:
            if isinstance(record.get(key), (int, float)):
                tag = key if "/" in key else f"val/{key}" if key.startswith("val_") else f"train/{key}"
                scalars[tag] = record[key]
                self.tensorboard.add_scalar(tag, record[key], record["step"])
        if self.trackers is not None and scalars:
            self.trackers.log(scalars, record["step"])
        if show:
            step = record["step"]
            eta = (time.perf_counter() - self.began) / (step - self.start) * (self.total - step)
            self.logger.info(f"step {step}/{self.total} {self.line(record)} "
                             f"eta {time.strftime('%H:%M:%S', time.gmtime(eta))}")

    def close(self) -> None:
        self.tensorboard.close()
        if self.trackers is not None:
            self.trackers.close()


def fit(worker: Callable, loop_config: dict, cfg: Any, run_dir: Path):
    """Run `worker` on `cfg.num_workers` Ray Train workers (a GPU each with `cfg.use_gpu`, plus the custom
    resources of `cfg.resources_per_worker`: the trainer node role on a cluster), checkpoints
    under run_dir/checkpoints, restarts from the last checkpoint up to `cfg.max_failures` times. Ray must
    be initialised by the caller."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    if not os.environ.get("RAY_ADDRESS"):  # a local Ray: its controller polls workers every 0.2 s, not 2 s
        os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
    env = {k: os.environ[k] for k in ("OMP_NUM_THREADS", "TORCH_EXTENSIONS_DIR", "TOKENIZERS_PARALLELISM",
                                      "HF_HUB_OFFLINE") if k in os.environ}
    env["DS_ACCELERATOR"] = "cuda" if cfg.use_gpu else "cpu"
    env.update({k: v for k, v in os.environ.items() if k.startswith(("WANDB_", "MLFLOW_"))})  # rank 0's trackers
    gpus = getattr(cfg, "gpus_per_worker", 1.0)  # < 1: the trainer shares its GPU (with a policy replica)
    resources = {"CPU": cfg.cpus_per_worker, **({"GPU": gpus} if cfg.use_gpu else {}), **cfg.resources_per_worker}
    trainer = TorchTrainer(
        worker, train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu, resources_per_worker=resources),
        run_config=RunConfig(name="checkpoints", storage_path=str(run_dir),
                             failure_config=FailureConfig(max_failures=cfg.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
                             worker_runtime_env={"env_vars": env}),
    )
    return trainer.fit()


def cpus_needed(cfg: Any, extra: float = 2) -> int:
    return max(8, math.ceil(cfg.num_workers * cfg.cpus_per_worker + extra))
