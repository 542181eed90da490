"""A multi-node Ray cluster on this machine (ray.cluster_utils.Cluster: a CPU-less head, one policy node and two
env nodes with cluster.yaml's role resources) running the real Serve app and the real evaluation job:

- evaluation spread over two node types (PolicyServer on the policy node, EvalActors on the env nodes) loses
  an env node after a batch was evaluated there but before its results came back, and still writes every
  prediction exactly once: the lost batch is run again on the other env node;
- the PolicyServer deployment, autoscaled through `policy_autoscaling` of services.app.ServeConfig, adds a
  replica under load and removes it once the load stops.

    .venv/bin/python -m pytest tests/integration/test_cluster_multinode.py -q

It starts two vLLM engines (the first replica, then the one autoscaling adds) and four Ray nodes: 185-230 s on a
2-core machine shared with other test runs (cluster 14 s, app 44 s, evaluation 34 s, scale-up 71 s while the
load keeps a core busy, scale-down 8 s), 450 s when that machine was overloaded (load average 35).

One cluster serves both tests (one scenario in a subprocess, run once per module): a driver connects to one
cluster, and the test session may hold a local Ray. Cluster runs no `ray stop`: it ends the processes of its
own nodes, and Ray's reaper ends them if the subprocess dies. RAY_TMPDIR keeps its sessions and address file
apart from any other Ray on the machine. The delays and windows of the autoscaling are scaled down to seconds.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BATCH_LOG = "VIGORL_TEST_BATCH_LOG"
AUTOSCALING = {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 6, "upscale_delay_s": 1,
               "downscale_delay_s": 2, "metrics_interval_s": 0.5, "look_back_period_s": 2}
LOAD = 24  # concurrent requests under load: 4x the target per replica, so Serve wants max_replicas
# The eval asks for at most actors x concurrency = 4 at once, below the target: it does not scale the policy.


def record_eval_batches() -> None:
    """Worker setup hook (instrumentation, not a fake): every EvalActor batch appends to $VIGORL_TEST_BATCH_LOG
    the node it runs on and its sample ids, when it starts and when it returns. The run's first batch, once
    evaluated, waits before returning, so that its node is killed with its results in hand (no race with
    the kill): the worst case, work done and lost."""
    import ray

    from jobs import evaluate

    call = evaluate.EvalActor.__call__
    log = Path(os.environ[BATCH_LOG])

    def append(entry: dict) -> None:
        with log.open("a") as f:
            f.write(json.dumps({**entry, "t": time.time()}) + "\n")

    def recorded(self, batch: dict) -> dict:
        entry = {"node": ray.get_runtime_context().get_node_id(), "pid": os.getpid(),
                 "ids": [json.loads(str(s))["id"] for s in batch["sample"]]}
        append({**entry, "event": "start"})
        out = call(self, batch)
        try:
            os.close(os.open(log.with_suffix(".held"), os.O_CREAT | os.O_EXCL))
            append({**entry, "event": "held"})
            time.sleep(120)  # the test kills this node now; if it does not, the batch returns from it and fails
        except FileExistsError:
            pass
        append({**entry, "event": "end"})
        return out

    evaluate.EvalActor.__call__ = recorded


def progress(what: str, started: float = time.perf_counter()) -> None:
    print(f"[{time.perf_counter() - started:.0f} s] {what}", file=sys.stderr, flush=True)


def read_log(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def roles_of_nodes() -> dict[str, list[str]]:
    """Node id -> the role resources it offers (empty for the head)."""
    import ray

    return {n["NodeID"]: sorted(r for r in n["Resources"] if r.endswith("_node")) for n in ray.nodes()}


def policy_replica_roles() -> list[list[str]]:
    """The roles of the nodes that run a PolicyServer replica, one entry per replica."""
    import ray

    roles = roles_of_nodes()
    return [roles[a["Address"]["NodeID"]] for a in ray._private.state.actors().values()
            if a["State"] == "ALIVE" and a["Name"].startswith("SERVE_REPLICA::vigorl#PolicyServer#")]


def policy_states() -> dict[str, int]:
    from ray import serve

    return dict(serve.status().applications["vigorl"].deployments["PolicyServer"].replica_states)


def lose_an_env_node_during_eval(cluster, model: str, work: Path) -> dict:
    """Evaluate 8 samples; the env node of the first batch is killed once that batch is evaluated, before it
    returns (record_eval_batches holds it)."""
    from jobs import evaluate as job
    from vigorl_core.evals import evaluation as ev
    from vigorl_core.synthetic.tasks import write_dataset

    data = write_dataset("grounding", 8, 0, work / "data")
    cfg = job.EvalConfig.model_validate({
        "run_name": "node-loss", "runs_dir": str(work / "runs"), "model": model,
        "benchmarks": [{"name": "synthetic_grounding", "path": str(data)}],
        "sampling": {"max_tokens_per_turn": 48, "max_response_tokens": 512}, "policy": {"app": "vigorl"},
        "actors": 2, "actor_cpus": 0.5, "actor_resources": {"env_node": 0.5}, "batch_size": 4, "concurrency": 2,
        "examples": 0})
    log, killed, roles = Path(os.environ[BATCH_LOG]), {}, roles_of_nodes()

    def kill_held_node():
        while not killed:
            held = [e for e in read_log(log) if e["event"] == "held"]
            if held:
                [node] = [n for n in cluster.worker_nodes if n.node_id == held[0]["node"]]
                written = (work / "runs" / "eval" / "node-loss" / "predictions.jsonl")
                killed.update(node=node.node_id, predictions_before=len(written.read_text().splitlines())
                              if written.is_file() else 0)
                cluster.remove_node(node, allow_graceful=False)
                progress(f"killed env node {node.node_id[:8]} ({killed['predictions_before']} predictions written)")
            time.sleep(0.1)

    killer = threading.Thread(target=kill_held_node, daemon=True)
    killer.start()
    stats = job.evaluate(cfg)
    lines = (work / "runs" / "eval" / "node-loss" / "predictions.jsonl").read_text().splitlines()
    return {"stats": stats, "killed": killed, "batches": [{**b, "roles": roles[b["node"]]} for b in read_log(log)],
            "keys": [list(ev.Prediction.model_validate_json(line).key) for line in lines],
            "policy_roles": policy_replica_roles()}


def scale_under_load(model: str) -> dict:
    """Keep LOAD requests in flight until a second PolicyServer replica runs and answers; then stop and wait
    until Serve is back to one replica."""
    import asyncio

    from ray import serve

    from services.policy import PolicyClient
    from vigorl_core.rollout.chat_tokens import ChatTokens
    from vigorl_core.rollout.engine import Sampling

    handle = serve.get_deployment_handle("PolicyServer", "vigorl")
    chat = ChatTokens.from_pretrained(model)
    prompt = chat.encode(chat.prompt_text("You answer.", "Describe a red square.", 0))
    result = {"before": policy_states(), "seen": [], "answered_by": []}
    stop = threading.Event()

    def load():
        client = PolicyClient(handle)

        async def one_user():
            while not stop.is_set():
                await client.generate(prompt, [], Sampling(max_tokens=64, logprobs=False))

        async def users():
            await asyncio.gather(*(one_user() for _ in range(LOAD)))

        try:
            asyncio.run(users())
        except Exception:
            import traceback

            result["load_error"] = traceback.format_exc()

    loader = threading.Thread(target=load, daemon=True)
    loader.start()
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and loader.is_alive():
        states = policy_states()
        if not result["seen"] or states != result["seen"][-1]:
            result["seen"].append(states)
            progress(f"under load: {states}")
        if states.get("RUNNING", 0) == 2:  # the new replica answers too (the router prefers the idler one)
            result["answered_by"] = sorted({handle.info.remote().result()["replica"] for _ in range(8)})
            if len(result["answered_by"]) == 2:
                break
        time.sleep(0.5)
    stop.set()
    loader.join(timeout=60)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        states = policy_states()
        if states != result["seen"][-1]:
            result["seen"].append(states)
            progress(f"load stopped: {states}")
        if states == {"RUNNING": 1}:
            break
        time.sleep(0.5)
    result["after"], result["policy_roles"] = policy_states(), policy_replica_roles()
    return result


def scenario(model: str, work: Path) -> dict:
    """Start the cluster and the app, run both parts (each reports its error instead of stopping the other)."""
    import traceback

    import ray
    from ray import serve
    from ray.cluster_utils import Cluster

    from services.app import build_app

    fast_failure_detection = {"health_check_period_ms": 1000, "health_check_failure_threshold": 3}
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "include_dashboard": False, "dashboard_agent_listen_port": None,
        "_system_config": fast_failure_detection})  # the machine's address: ray.init resolves 127.0.0.1 to it
    progress("head up")
    result = {}
    try:
        roles = {"policy": {"policy_node": 1}, "env-a": {"env_node": 1}, "env-b": {"env_node": 1}}
        for resources in roles.values():
            cluster.add_node(num_cpus=4, resources=resources)
        progress("worker nodes up")
        ray.init(address=cluster.address, log_to_driver=False, runtime_env={
            "worker_process_setup_hook": "tests.integration.test_cluster_multinode.record_eval_batches",
            "env_vars": {BATCH_LOG: os.environ[BATCH_LOG]}})
        serve.start(proxy_location="Disabled", logging_config={"enable_access_log": False})
        serve.run(build_app({"model": model, "policy_resources": {"policy_node": 0.01},
                             "policy_autoscaling": AUTOSCALING,
                             "engine": {"max_model_len": 4096, "dtype": "float32", "enforce_eager": True}}),
                  name="vigorl", route_prefix=None, logging_config={"enable_access_log": False})
        progress("app up")
        for part, run in (("eval", lambda: lose_an_env_node_during_eval(cluster, model, work)),
                          ("autoscaling", lambda: scale_under_load(model))):
            started = time.perf_counter()
            try:
                result[part] = run()
            except Exception:
                result[part] = {"error": traceback.format_exc()}
            result[part]["seconds"] = round(time.perf_counter() - started, 1)
            progress(f"{part} done")
        return result
    finally:
        serve.shutdown()
        ray.shutdown()
        cluster.shutdown()


@pytest.fixture(scope="module")
def cluster_run(subprocess_env, tiny_model_dir, tmp_path_factory) -> dict:
    import shutil
    import subprocess

    work = tmp_path_factory.mktemp("multinode")
    ray_tmp = tempfile.mkdtemp(prefix="vmn")  # short: Ray's socket paths live under it
    env = {k: v for k, v in subprocess_env.items() if k != "RAY_ADDRESS"}
    env.update(RAY_TMPDIR=ray_tmp, **{BATCH_LOG: str(work / "batches.jsonl")})
    try:
        run = subprocess.run([sys.executable, __file__, str(tiny_model_dir), str(work)], env=env, cwd=REPO,
                             capture_output=True, text=True, timeout=720)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-5000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def test_policy_autoscaling_reaches_the_policy_server_deployment(tiny_model_dir):
    from services.app import ServeConfig, build_app

    app = build_app({"model": str(tiny_model_dir), "policy_autoscaling": AUTOSCALING})
    [policy] = [a._bound_deployment for a in app._bound_deployment.init_args
                if getattr(a, "_bound_deployment", None) and a._bound_deployment.name == "PolicyServer"]
    config = policy._deployment_config.autoscaling_config  # what Serve deploys (no public accessor)
    assert config.model_dump(include=set(AUTOSCALING)) == AUTOSCALING
    with pytest.raises(ValueError, match="set policy_replicas or policy_autoscaling, not both"):
        ServeConfig(model="m", policy_replicas=2, policy_autoscaling={"max_replicas": 2})
    with pytest.raises(ValueError, match=r"min_replicas \(3\) > max_replicas \(2\)"):
        ServeConfig(model="m", policy_autoscaling={"min_replicas": 3, "max_replicas": 2})


def test_gateway_and_zoom_replica_counts_reach_their_deployments(tiny_model_dir):
    from services.app import build_app

    def replicas(app) -> dict[str, int | None]:
        gateway = app._bound_deployment
        counts = {gateway.name: gateway._deployment_config.num_replicas}
        for arg in gateway.init_args:
            if getattr(arg, "_bound_deployment", None):
                counts[arg._bound_deployment.name] = arg._bound_deployment._deployment_config.num_replicas
        return counts

    scaled = replicas(build_app({"model": str(tiny_model_dir), "gateway_replicas": 3, "zoom_replicas": 2,
                                 "policy_replicas": 2}))
    assert scaled == {"Gateway": 3, "ZoomServer": 2, "PolicyServer": 2, "Critic": 1}
    assert replicas(build_app({"model": str(tiny_model_dir)}))["Gateway"] == 1


@pytest.mark.slow
def test_eval_over_two_node_types_survives_losing_an_env_node(cluster_run):
    part = cluster_run["eval"]
    assert "error" not in part, part.get("error")
    killed, batches = part["killed"]["node"], part["batches"]
    assert part["policy_roles"] == [["policy_node"]] and all(b["roles"] == ["env_node"] for b in batches)
    assert part["killed"]["predictions_before"] < 8  # the node went down mid-run
    lost = [b for b in batches if b["node"] == killed]
    assert lost and {b["event"] for b in lost} == {"start", "held"}  # evaluated there, never returned
    lost_ids = {i for b in lost for i in b["ids"]}
    redone = [b for b in batches if b["event"] == "end" and b["node"] != killed and set(b["ids"]) & lost_ids]
    assert {i for b in redone for i in b["ids"]} >= lost_ids  # run again, to the end, on the other env node
    keys = [tuple(k) for k in part["keys"]]
    assert len(keys) == len(set(keys)) == 8
    assert part["stats"]["evaluated"] == 8 and part["stats"]["errors"] == 0


@pytest.mark.slow
def test_policy_server_scales_up_under_load_and_back_down(cluster_run):
    part = cluster_run["autoscaling"]
    assert "error" not in part and "load_error" not in part, part.get("error") or part.get("load_error")
    assert part["before"] == {"RUNNING": 1}
    assert {"RUNNING": 2} in part["seen"] and len(part["answered_by"]) == 2  # added, and serving
    assert part["after"] == {"RUNNING": 1}
    assert part["policy_roles"] == [["policy_node"]]


if __name__ == "__main__":
    print(json.dumps(scenario(sys.argv[1], Path(sys.argv[2]))))
