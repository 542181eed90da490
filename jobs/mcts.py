"""MCTS with a teacher model: one search tree per sample, written as JSON lines (ViGoRL's warm-start data).

    vigorl mcts --config configs/mcts_tiny.yaml                    # or: python -m jobs.mcts --config ...
    ray job submit --working-dir . -- python -m jobs.mcts --config configs/mcts_qwen72b.yaml

What happens (the search itself is vigorl_core.search.mcts; docs/mcts.md describes both):
1. Ray starts (or the cluster in RAY_ADDRESS is joined) and the teacher is served: a Serve app of
   PolicyServer replicas (`mcts-<run_name>`, vLLM with prefix caching), or an app already running
   (`teacher.app`, e.g. the `vigorl` app of `vigorl serve`), which is then left alone;
2. the samples are loaded (any schema vigorl_core.data reads); ids already in
   runs/mcts/<run_name>/trees.jsonl are skipped (a truncated last line from a killed job is dropped and
   its sample redone; with `retry_errors`, so are samples whose record says `error`);
3. the remaining samples become a Ray Data dataset; `map_batches` hands them to a pool of `actors`
   TreeSearcher actors (CPU). Each actor loads and resizes images itself and runs up to
   `trees_per_actor` searches at once (asyncio), all against PolicyClient over the PolicyServer handle,
   so the engine batches the requests of every tree (expansions are one n=3 call, rollouts one n=2 call);
4. the driver appends each finished tree to trees.jsonl (flushed per tree, one line per id), prints a
   line per tree and a progress bar with an ETA (jobs/progress.py), and at the end writes stats.json
   (vigorl_core.search.linearize.tree_stats: root correctness ratio, tree sizes, per-sample seconds, statuses) and
   prints it. The engine's, Ray's and the libraries' logs go to runs/mcts/<run_name>/job.log (`--verbose`
   shows them on the terminal).

A sample's failure or its time limit (`mcts.time_limit_s`) gives a record with `status` error/timeout,
`error` and the partial tree: nothing is dropped. Rewards: the task's rule judge in-process (`judge:
strict`, default; `original` = the original's lenient judge), or the Critic deployment (`reward: critic`).
On a cluster, runs_dir, the images and the model folder must be readable from every node.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from jobs.common import REPO_ROOT, check_resume, init_ray, log_to_run_folder, model_folder, run_main
from jobs.faults import requested_faults
from jobs.progress import Progress
from services.app import EngineSettings, kill_one_replica
from vigorl_core.config import ConfigError, RoleResources, StageConfig, parse_config
from vigorl_core.search.mcts import ASSISTANT_TAIL, FORCED_FINAL_USER, MCTSConfig


class DataSpec(StageConfig):
    """One input file of samples."""

    path: str = Field(description="samples file in any schema vigorl_core.data.load_samples reads")
    data_root: str | None = Field(None, description="root of relative image paths (default: the file's folder)")
    task: str | None = Field(None, description="task when the file does not name it (spatial, visual_search, ...)")
    source: str | None = Field(None, description="benchmark name when the path does not name it")
    limit: int | None = Field(None, ge=1, description="use the first `limit` samples only")
    check_images: bool = Field(True, description="fail up front listing missing image files (else: per-sample "
                                                 "error records)")


class TeacherConfig(StageConfig):
    """The teacher policy: a model served by PolicyServer replicas."""

    model: str | None = Field(None, description="Hugging Face folder of the teacher (any Qwen2.5-VL size); "
                                                "optional with `app` (then asked from the running server)")
    app: str | None = Field(None, description="name of a running Serve app with a PolicyServer to reuse (e.g. "
                                              "'vigorl'); null: start app mcts-<run_name> and delete it at the end")
    name: str | None = Field(None, description="teacher name stored in each tree (default: the model folder name)")
    replicas: int = Field(1, ge=1, description="PolicyServer replicas when the job starts the app")
    gpus: float = Field(0.0, ge=0, description="GPUs per replica (= engine.tensor_parallel_size on GPU machines)")
    resources: RoleResources = Field(default_factory=dict, description="custom resources per replica, e.g. "
                                     "{policy_node: 0.01}: lands replicas on cluster.yaml's policy nodes")
    engine: EngineSettings = Field(default_factory=EngineSettings)
    constrained: bool = Field(False, description="constrain every response by a grammar to one think step naming "
                              "a point or an answer among the options (random-weight demo models never answer "
                              "otherwise); never for real teachers")


class MCTSJobConfig(StageConfig):
    """Monte Carlo tree search with a served teacher over a dataset; trees as JSON lines, resumable."""

    run_name: str = Field("default", description="runs/mcts/<run_name>; rerunning a name resumes it")
    runs_dir: str = Field(str(REPO_ROOT / "runs"), description="root of run folders (shared storage on a cluster)")
    data: list[DataSpec] = Field(min_length=1, description="sample files: [{path, data_root, task, source, limit}]")
    teacher: TeacherConfig = Field(default_factory=TeacherConfig)
    mcts: MCTSConfig = Field(default_factory=MCTSConfig, description="search settings; mcts.time_limit_s is the "
                                                                     "per-sample time limit")
    reward: Literal["rule", "critic"] = Field("rule", description="rule: the task's judge in-process; critic: the "
                                              "Critic deployment (of teacher.app, else a Critic app the job starts)")
    judge: Literal["strict", "original"] = Field("strict", description="strict judge, or the original's lenient "
                                                 "one (ground truth substring of the answer counts)")
    actors: int = Field(1, ge=1, description="TreeSearcher actors (Ray Data actor pool)")
    trees_per_actor: int = Field(16, ge=1, description="searches each actor runs concurrently")
    batch_size: int = Field(1, ge=1, description="samples per Ray Data task: results reach trees.jsonl per task")
    actor_cpus: float = Field(0.5, gt=0, description="CPUs per actor (it decodes images and waits on the engine)")
    actor_resources: RoleResources = Field(default_factory=dict, description="custom resources per actor, e.g. "
                                           "{env_node: 0.01} (cluster.yaml's CPU nodes)")
    retry_errors: bool = Field(True, description="on resume, redo samples whose record has status 'error' "
                                                 "(timeouts are kept)")
    num_cpus: int = Field(8, ge=1, description="logical CPUs of a local Ray (ignored on a cluster)")
    replica_retry_s: float = Field(120.0, ge=0, description="a teacher request lost with its PolicyServer replica "
                                   "is sent again, backing off 1 s to 10 s, for up to this long (then the tree "
                                   "records the error)")


def _fixed(cfg: dict) -> dict:
    """Settings a resumed run must share with the trees already written (the time limit may change)."""
    teacher = cfg.get("teacher") or {}
    return {"mcts": {k: v for k, v in (cfg.get("mcts") or {}).items() if k != "time_limit_s"},
            "teacher.model": teacher.get("model"), "teacher.constrained": teacher.get("constrained"),
            "reward": cfg.get("reward"), "judge": cfg.get("judge")}


# ------------------------------------------------------------------------------------------ teacher

class ConstrainedTeacher:
    """PolicyEngine over `engine` whose responses follow a regular expression (vLLM structured outputs):
    `<think> words (x, y). </think>` with a two-digit point, or `<answer> option </answer>`. The first
    response of a path is a step and a forced-final one an answer, so every answer has reasoning before it.
    For random-weight demo models, which otherwise never answer."""

    _STEP = r"<think> [a-z ]{8,40} \([1-9][0-9], [1-9][0-9]\)\. </think>"

    def __init__(self, engine: Any, chat: Any, options: list[str]):
        choices = "|".join(re.escape(o) for o in options) if options else "[a-z]{1,12}"
        self.engine, self.chat, self.answer = engine, chat, rf"<answer> (?:{choices}) </answer>"
        self.forced_tail = chat.encode(f"<|im_end|>\n<|im_start|>user\n{FORCED_FINAL_USER}{ASSISTANT_TAIL}")

    @property
    def version(self) -> int:
        return self.engine.version

    async def generate(self, prompt_ids, images, sampling, request_id=None):
        if list(prompt_ids[-len(self.forced_tail):]) == self.forced_tail:
            regex = self.answer
        elif "Previous thought 1:" not in self.chat.decode(list(prompt_ids)):
            regex = self._STEP
        else:
            regex = f"(?:{self._STEP})|(?:{self.answer})"
        return await self.engine.generate(prompt_ids, images, replace(sampling, regex=regex), request_id)

    async def abort(self, request_id: str) -> None:
        await self.engine.abort(request_id)


class CriticReward:
    """Reward through the Critic deployment's judges (same answer extraction as mcts.judge_reward)."""

    def __init__(self, handle: Any, original: bool):
        self.handle, self.key = handle, "score_original" if original else "score"

    async def __call__(self, task: str, text: str, truth: Any) -> float:
        scores = await self.handle.judge.remote(task, _answer_of(text), truth)
        return float(scores[self.key])


def _answer_of(text: str) -> str:
    from vigorl_core.protocol import parse_response

    answer = parse_response(text).answer
    return answer if answer is not None else re.sub(r"</?think>", "", text).strip()


def _original_judge(task: str, text: str, truth: Any) -> float:
    from vigorl_core.rewards import JUDGES, judge_for

    return float(JUDGES[judge_for(task)[1]](_answer_of(text), truth))


class TreeSearcher:
    """Ray Data actor: searches the samples of each batch, at most `trees` at once over all batches."""

    def __init__(self, app: str, model: str, teacher_name: str, mcts: dict, trees: int, reward: str, judge: str,
                 critic_app: str | None, constrained: bool, retry_s: float = 120.0,
                 kill_policy_after: int | None = None, run_dir: str = ""):
        from ray import serve

        from services.policy import PolicyClient
        from vigorl_core.rollout.chat_tokens import ChatTokens
        from vigorl_core.search.mcts import judge_reward

        self.chat = ChatTokens.from_pretrained(model)
        self.client = PolicyClient(serve.get_deployment_handle("PolicyServer", app))
        self.config, self.teacher_name, self.constrained = MCTSConfig.model_validate(mcts), teacher_name, constrained
        if reward == "critic":
            self.reward = CriticReward(serve.get_deployment_handle("Critic", critic_app), judge == "original")
        else:
            self.reward = _original_judge if judge == "original" else judge_reward
        self.slots = asyncio.Semaphore(trees)  # binds to the Ray Data UDF loop on first use
        self.app, self.retry_s, self.finished = app, retry_s, 0
        self.kill_policy_after, self.run_dir = kill_policy_after, Path(run_dir)  # a test's fault (jobs/faults.py)

    async def __call__(self, batch: dict) -> dict:
        import numpy as np

        results = await asyncio.gather(*(self._search(line) for line in batch["sample"]))
        return {"id": np.array([r.id for r, _ in results], dtype=object),
                "record": np.array([r.model_dump_json() for r, _ in results], dtype=object),
                "retries": np.array([n for _, n in results], dtype=np.int64)}

    async def _search(self, line: str):
        from vigorl_core.search.mcts import MCTS
        from vigorl_core.records import Sample

        from jobs.training import first_fault
        from services.policy import ReplicaRetry

        sample = Sample.model_validate_json(line)
        async with self.slots:
            # A request lost with its teacher replica is sent again (Serve replaces the replica), so a dying
            # replica costs the trees in flight some time, not their search.
            policy = ReplicaRetry(self.client, self.retry_s)
            teacher = ConstrainedTeacher(policy, self.chat, sample.options) if self.constrained else policy
            mcts = MCTS(teacher, self.chat, self.reward, self.config, self.teacher_name)
            try:  # decoding and resizing off the event loop, so other trees keep going
                item = await asyncio.to_thread(mcts.prepare, sample)
            except Exception:  # noqa: BLE001 - search() records it as the sample's error
                item = sample
            record = await mcts.search(item)
            self.finished += 1
            if self.kill_policy_after and self.finished >= self.kill_policy_after and first_fault(self.run_dir,
                                                                                                  "policy"):
                await asyncio.to_thread(kill_one_replica, self.app)
            return record, policy.retries


def _start_teacher(cfg: MCTSJobConfig, started: list[str]) -> tuple[str, str, str | None]:
    """(app name, teacher model folder, critic app); the apps this job starts are appended to `started`
    before they deploy, so a failed start is cleaned up too."""
    from ray import serve

    from services.app import start_policy_app

    t = cfg.teacher
    if not t.app and not t.model:
        raise ConfigError("teacher.model: required unless teacher.app names a running Serve app")
    name = f"mcts-{cfg.run_name}"
    model = model_folder(t.model, cfg.runs_dir) if t.model and not t.app else t.model
    if not t.app:
        started.append(name)  # before it deploys, so a failed start is cleaned up too
    try:
        app, model, _ = start_policy_app(name, model, engine=t.engine, replicas=t.replicas, gpus=t.gpus, reuse=t.app,
                                         resources=t.resources)
    except ValueError as err:
        raise ConfigError(f"teacher.app: {err}") from None
    critic_app = None
    if cfg.reward == "critic":
        if cfg.teacher.app and "Critic" in serve.status().applications[cfg.teacher.app].deployments:
            critic_app = cfg.teacher.app
        else:
            from services.critic import Critic

            critic_app = f"mcts-critic-{cfg.run_name}"
            started.append(critic_app)
            serve.run(Critic.bind(), name=critic_app, route_prefix=None)
    return app, model, critic_app


# ---------------------------------------------------------------------------------------- run files

def _load_samples(cfg: MCTSJobConfig) -> list:
    from vigorl_core.data import load_samples

    samples, where = [], {}
    for spec in cfg.data:
        loaded = load_samples(spec.path, data_root=spec.data_root, task=spec.task, source=spec.source,
                              check_images=spec.check_images)
        for s in loaded[:spec.limit]:
            if s.id in where:
                raise ConfigError(f"sample id {s.id!r} is in {where[s.id]} and in {spec.path}: ids must be unique")
            where[s.id] = spec.path
            samples.append(s)
    if not samples:
        raise ConfigError("data: no samples")
    return samples


def _finished(path: Path, retry_errors: bool) -> tuple[set[str], list[str]]:
    """Ids with a tree in `path`, after repairing it: a partial last line (a job killed mid-write; each
    tree is written as one line with its newline) is cut off, repeated ids are dropped and, with
    `retry_errors`, error records are removed so those samples run again. Returns (ids, notes)."""
    if not path.exists():
        return set(), []
    ids, notes, drop = set(), [], set()
    with path.open(encoding="utf-8", errors="replace") as f:  # a cut multi-byte character: replaced, then dropped
        for number, line in enumerate(f, start=1):
            if not line.endswith("\n"):
                notes.append(f"dropped a partial last line ({len(line)} characters) of {path.name}; its sample "
                             "runs again")
                drop.add(number)
                continue
            if not line.strip():
                drop.add(number)
                continue
            try:
                obj = json.loads(line)
                sample_id = obj["id"]
            except (ValueError, KeyError, TypeError):
                raise ValueError(f"{path}:{number}: not a tree record line (only a last line without its newline "
                                 "may be partial)") from None
            if sample_id in ids or (retry_errors and obj.get("status") == "error"):
                if sample_id not in ids:
                    notes.append(f"retrying {sample_id} (error: {str(obj.get('error'))[:120]})")
                drop.add(number)
                continue
            ids.add(sample_id)
    if drop:
        tmp = path.with_suffix(".jsonl.tmp")
        with path.open(encoding="utf-8", errors="replace") as src, tmp.open("w", encoding="utf-8") as dst:
            dst.writelines(line for number, line in enumerate(src, start=1) if number not in drop)
        tmp.replace(path)
    return ids, notes


def _without_texts(record):
    """The tree without its texts (tree_stats reads none), so a big run's trees fit in memory at once."""
    for node in record.nodes():
        node.thought_text, node.text = "", None
        for rollout in node.rollouts:
            rollout.ephemeral_texts = []
    return record


def _search(cfg: MCTSJobConfig, todo: list, out: Path, done: set[str], app: str, model: str,
            critic_app: str | None) -> dict[str, float]:
    """Run the searches through Ray Data, appending each tree to `out` as it arrives; totals of this run."""
    import ray

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    tasks = math.ceil(len(todo) / cfg.batch_size)
    calls = math.ceil(cfg.trees_per_actor / cfg.batch_size) + 1  # one more batch queued than the slots take
    ds = ray.data.from_items([{"sample": s.model_dump_json()} for s in todo], override_num_blocks=tasks)
    ds = ds.map_batches(
        TreeSearcher, batch_size=cfg.batch_size, batch_format="numpy", num_cpus=cfg.actor_cpus,
        resources=cfg.actor_resources or None,
        compute=ray.data.ActorPoolStrategy(size=min(cfg.actors, tasks), max_tasks_in_flight_per_actor=calls,
                                           max_concurrent_calls_per_actor=calls),
        fn_constructor_kwargs={"app": app, "model": model, "teacher_name": cfg.teacher.name or Path(model).name,
                               "mcts": cfg.mcts.model_dump(mode="json"), "trees": cfg.trees_per_actor,
                               "reward": cfg.reward, "judge": cfg.judge, "critic_app": critic_app,
                               "constrained": cfg.teacher.constrained, "retry_s": cfg.replica_retry_s,
                               "kill_policy_after": requested_faults().kill_policy_after,
                               "run_dir": str(out.parent)})
    started, n = time.perf_counter(), 0
    totals = dict.fromkeys(("trees", "expansions", "generated_tokens", "search_seconds", "replica_retries"), 0.0)
    with out.open("a", encoding="utf-8") as f, Progress(len(todo), "mcts", unit="tree") as progress:
        for row in ds.iter_rows():
            if row["id"] in done:  # a retried Ray Data task can deliver a tree twice
                continue
            f.write(row["record"] + "\n")
            f.flush()
            done.add(row["id"])
            n += 1
            totals["replica_retries"] += int(row["retries"])
            rec = json.loads(row["record"])
            stats = rec.get("stats", {})
            for key, stat in (("expansions", "expansions"), ("generated_tokens", "generated_tokens"),
                              ("search_seconds", "seconds")):
                totals[key] += stats.get(stat, 0.0)
            error = f" | {rec['error'][:160]}" if rec.get("error") else ""
            progress.write(f"{rec['id']} {rec['status']} nodes={stats.get('nodes', 0):.0f} "
                           f"{rec['global_search_time']:.1f}s{error}")
            progress.update(1)
    totals["trees"], totals["wall_seconds"] = n, time.perf_counter() - started
    totals["expansions_per_s"] = totals["expansions"] / max(totals["wall_seconds"], 1e-9)
    return totals


def _run(argv: list[str]) -> int:
    cfg = parse_config(MCTSJobConfig, argv, prog="vigorl mcts")
    import ray
    from ray import serve

    from vigorl_core.evals.evaluation import round_floats
    from vigorl_core.search.linearize import tree_stats
    from vigorl_core.search.trees import iter_trees

    run_dir = Path(cfg.runs_dir) / "mcts" / cfg.run_name
    trees = run_dir / "trees.jsonl"
    samples = _load_samples(cfg)
    check_resume(run_dir, cfg.model_dump(mode="json"), _fixed, made="searched")
    log_to_run_folder(run_dir)
    done, notes = _finished(trees, cfg.retry_errors)
    for note in notes:
        print(f"note: {note}")
    todo = [s for s in samples if s.id not in done]
    print(f"{len(samples)} samples: {len(samples) - len(todo)} already have trees in {trees}, {len(todo)} to search")
    this_run: dict[str, float] = {"trees": 0}
    if todo:
        own_ray = not ray.is_initialized()
        init_ray(cfg.num_cpus, reuses=f"teacher.app {cfg.teacher.app!r}" if cfg.teacher.app else None)
        started: list[str] = []
        try:
            app, model, critic_app = _start_teacher(cfg, started)
            this_run = _search(cfg, todo, trees, done, app, model, critic_app)
        finally:
            for name in started:
                serve.delete(name)
            if own_ray:
                ray.shutdown()
    stats = {**tree_stats([_without_texts(r) for r in iter_trees(trees)]), "this_run": this_run}
    (run_dir / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    print(f"trees: {trees}\nstats ({run_dir / 'stats.json'}):")
    for key, value in stats.items():
        print(f"  {key:<20} {round_floats(value, 4)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_main(_run, argv)


if __name__ == "__main__":
    sys.exit(main())
