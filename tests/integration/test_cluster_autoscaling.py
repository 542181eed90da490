"""A simulated autoscaling cluster with cluster.yaml's node types: the role requests of a shipped cluster config
make Ray's autoscaler launch the right node types from zero workers, the work runs there, and the nodes go away
once it is done.

    .venv/bin/python -m pytest tests/integration/test_cluster_autoscaling.py -q      (about 30 s)

The cluster is Ray's fake multi-node provider (the provider behind ray.cluster_utils.AutoscalingCluster) on this
machine: a head started with `ray start --head --block --autoscaling-config`, whose autoscaler starts each
"node" as another raylet here. AutoscalingCluster itself is not used: its start and shutdown run
`ray stop --force`, which would kill every Ray on the machine. This test ends only the processes of its own
head, by pid. Node types keep their names, GPU counts and role resources; CPUs are scaled down to 2.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
ROLE_OF = {"policy_node": "policy", "trainer_node": "trainer", "env_node": "env"}


def fake_cluster_config(gcs_address: str) -> dict:
    """cluster.yaml's node types for the fake provider: same names, GPUs and roles, 2 CPUs, one node each."""
    cluster = yaml.safe_load((REPO / "cluster.yaml").read_text())
    types = {"ray.head.default": {"resources": {"CPU": 0}, "node_config": {}, "max_workers": 0}}
    for name, node in cluster["available_node_types"].items():
        if name == cluster["head_node_type"]:
            assert node["resources"] == {"CPU": 0}
            continue
        resources = {**node["resources"], "CPU": 2, "object_store_memory": 100 * 1024**2}
        types[name] = {"resources": resources, "node_config": {}, "min_workers": node["min_workers"], "max_workers": 1}
    return {
        "cluster_name": "vigorl-simulated", "max_workers": len(types) - 1,
        "upscaling_speed": cluster["upscaling_speed"],
        "idle_timeout_minutes": 0.05,  # cluster.yaml's 10 minutes, scaled down to 3 s
        "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                     "disable_launch_config_check": True, "gcs_address": gcs_address},
        "head_node_type": "ray.head.default", "available_node_types": types,
        "auth": {}, "docker": {}, "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False,
        "rsync_exclude": [], "rsync_filter": [], "initialization_commands": [], "setup_commands": [],
        "head_setup_commands": [], "worker_setup_commands": [], "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
    }


def stop_tree(root: subprocess.Popen) -> int:
    """End the head process and everything it started (the fake nodes are children of its autoscaler), by pid.
    Returns how many needed SIGKILL."""
    import psutil

    procs = [psutil.Process(root.pid), *psutil.Process(root.pid).children(recursive=True)]
    for p in procs:
        try:
            p.send_signal(signal.SIGTERM)
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=5)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=5)
    return len(alive)


def simulate() -> dict:
    """Start the simulated cluster, run the GRPO 7B config's three role requests at once, report where they ran."""
    from jobs.grpo import GRPOConfig
    from vigorl_core.config import parse_config

    cfg = parse_config(GRPOConfig, ["--config", str(REPO / "configs" / "grpo_qwen2.5-vl-7b.yaml")])
    # What the job asks Ray for (CPUs scaled down like the nodes): a PolicyServer replica
    # (services.app.policy_app), a Ray Train worker (jobs.training.fit), a RolloutWorker (services.rollouts).
    requests = {
        "PolicyServer": {"num_cpus": 1, "num_gpus": cfg.policy.gpus, "resources": cfg.policy.resources},
        "trainer worker": {"num_cpus": 1, "num_gpus": cfg.gpus_per_worker, "resources": cfg.resources_per_worker},
        "RolloutWorker": {"num_cpus": 0.5, "resources": cfg.rollout_resources},
    }
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    tmp = tempfile.mkdtemp(prefix="vsim")  # short: Ray's socket paths live under it
    config_path = Path(tmp, "autoscaling.yaml")
    config_path.write_text(json.dumps(fake_cluster_config(f"127.0.0.1:{port}")))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_FAKE_CLUSTER="1", AUTOSCALER_UPDATE_INTERVAL_S="1", RAY_AUTH_MODE="disabled")
    log = open(Path(tmp, "head.log"), "w")
    head = subprocess.Popen(
        [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", f"--port={port}", "--num-cpus=0",
         "--num-gpus=0", f"--autoscaling-config={config_path}", "--include-dashboard=false",
         "--node-ip-address=127.0.0.1", f"--temp-dir={tmp}/ray", "--object-store-memory=100000000",
         "--dashboard-agent-listen-port=0",  # any free port: another Ray on this machine may hold the default
         "--disable-usage-stats"], env=env, stdout=log, stderr=subprocess.STDOUT)
    started = time.perf_counter()
    import ray

    try:
        for _ in range(120):
            try:
                ray.init(address=f"127.0.0.1:{port}", logging_level="WARNING", log_to_driver=False)
                break
            except Exception:
                if head.poll() is not None:
                    raise RuntimeError(f"ray start exited: {Path(tmp, 'head.log').read_text()[-2000:]}")
                time.sleep(0.5)
        nodes_at_start = [n["Resources"] for n in ray.nodes() if n["Alive"]]

        @ray.remote
        class Piece:  # an actor holds its node, as the replicas and workers do, until it is killed
            def node(self) -> str:
                return ray.get_runtime_context().get_node_id()

        actors = {piece: Piece.options(**opts).remote() for piece, opts in requests.items()}
        ran_on = {piece: ray.get(actor.node.remote(), timeout=120) for piece, actor in actors.items()}
        nodes = {n["NodeID"]: n["Resources"] for n in ray.nodes() if n["Alive"]}
        roles = {node: [r for r in res if r in ROLE_OF] for node, res in nodes.items()}
        result = {"requests": requests, "nodes_at_start": nodes_at_start,
                  "ran_on_type": {piece: [ROLE_OF[r] for r in roles[node]] for piece, node in ran_on.items()},
                  "worker_types": sorted(ROLE_OF[r] for rs in roles.values() for r in rs),
                  "gpus_of_type": {ROLE_OF[r]: res.get("GPU", 0)
                                   for res in nodes.values() for r in res if r in ROLE_OF},
                  "seconds_to_run": round(time.perf_counter() - started, 1)}
        # Once the work is gone, idle nodes go away again (idle_timeout_minutes).
        for actor in actors.values():
            ray.kill(actor)
        deadline = time.monotonic() + 60
        while len([n for n in ray.nodes() if n["Alive"]]) > 1 and time.monotonic() < deadline:
            time.sleep(0.5)
        result["nodes_after_idle"] = len([n for n in ray.nodes() if n["Alive"]])
        result["seconds_to_scale_down"] = round(time.perf_counter() - started - result["seconds_to_run"], 1)
        return result
    except Exception:
        log.flush()
        sys.stderr.write(f"head log (ray start, autoscaler):\n{Path(tmp, 'head.log').read_text()[-3000:]}\n")
        raise
    finally:
        ray.shutdown()
        stop_tree(head)
        log.close()
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.mark.slow
def test_role_requests_make_the_autoscaler_launch_their_node_types(subprocess_env):
    # Its own process: one driver connects to one cluster, and the test session may hold a local Ray.
    run = subprocess.run([sys.executable, __file__], env=subprocess_env, cwd=REPO, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    cluster = yaml.safe_load((REPO / "cluster.yaml").read_text())["available_node_types"]
    assert len(result["nodes_at_start"]) == 1 and result["nodes_at_start"][0].get("CPU", 0) == 0  # only the head
    assert result["ran_on_type"] == {"PolicyServer": ["policy"], "trainer worker": ["trainer"],
                                     "RolloutWorker": ["env"]}
    # Each needed type and nothing else. A type may get a second node: on a loaded machine a fake node can take
    # longer to register than the autoscaler waits, so it launches another (both go away once idle, below).
    assert sorted(set(result["worker_types"])) == ["env", "policy", "trainer"]
    assert result["gpus_of_type"] == {t: cluster[t]["resources"].get("GPU", 0) for t in ("policy", "trainer", "env")}
    assert result["nodes_after_idle"] == 1  # back to the head once the work is done


if __name__ == "__main__":
    print(json.dumps(simulate()))
