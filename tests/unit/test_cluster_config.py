"""cluster.yaml passes Ray's own cluster-launcher validator, and every piece of the shipped cluster configs
requests a node role that a cluster.yaml node type offers, with enough CPUs and GPUs on that node type.
No cluster starts here (tests/integration/test_cluster_autoscaling.py starts a simulated one)."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import jsonschema
import pytest
import yaml

from jobs.evaluate import EvalConfig
from jobs.grpo import GRPOConfig
from jobs.mcts import MCTSJobConfig
from jobs.sft import SFTConfig
from services.app import ServeConfig, policy_app
from vigorl_core.config import ConfigError, parse_config

REPO = Path(__file__).resolve().parents[2]
CLUSTER = yaml.safe_load((REPO / "cluster.yaml").read_text())
ROLES = {"policy_node": "policy", "trainer_node": "trainer", "env_node": "env"}


def prepared(config: dict) -> dict:
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(copy.deepcopy(config))
    validate_config(config)
    return config


def test_cluster_yaml_passes_rays_validator():
    config = prepared(CLUSTER)
    types = config["available_node_types"]
    assert config["head_node_type"] == "head" and types["head"]["resources"] == {"CPU": 0}
    assert types["head"]["max_workers"] == 0
    for role, name in ROLES.items():
        node = types[name]
        assert node["resources"][role] == 1 and node["min_workers"] == 0 < node["max_workers"], name
        assert [r for r in node["resources"] if r.endswith("_node")] == [role]  # one role per node type
    assert types["policy"]["resources"]["GPU"] >= 1 and types["trainer"]["resources"]["GPU"] >= 1
    assert "GPU" not in types["env"]["resources"]
    assert sum(types[n]["max_workers"] for n in ROLES.values()) <= config["max_workers"]
    assert config["idle_timeout_minutes"] > 0
    assert any('vigorl[gpu,train]' in c for c in config["setup_commands"])
    assert config["file_mounts"]["~/vigorl"] == "."
    # shared storage: mounted on the host and handed to the container at the path the configs use
    assert any("/mnt/shared" in c and "mount" in c for c in config["initialization_commands"])
    assert "--volume /mnt/shared:/mnt/shared" in config["docker"]["run_options"]


@pytest.mark.parametrize("break_it", [
    lambda c: c["available_node_types"]["policy"]["resources"].update(policy_node=0.5),  # must be integers
    lambda c: c.update(idle_timeout=10),  # unknown top-level key (the field is idle_timeout_minutes)
    lambda c: c["available_node_types"]["env"].pop("node_config"),
])
def test_the_validator_rejects_a_broken_copy(break_it):
    config = copy.deepcopy(CLUSTER)
    break_it(config)
    with pytest.raises(jsonschema.ValidationError):
        prepared(config)


def requests(path: str) -> dict[str, dict]:
    """What each piece of the stage configured by `configs/<path>` asks Ray for, as the job passes it:
    {piece: {"CPU": n, "GPU": n, <role>: n}}."""
    text = (REPO / "configs" / path).read_text()
    if path == "serve.yaml":
        [app] = yaml.safe_load(text)["applications"]
        cfg = ServeConfig.model_validate(app["args"])
        # build_app's PolicyServer options, and the Serve config's options of the other deployments
        pieces = {"PolicyServer": {"CPU": 1, "GPU": cfg.policy_gpus, **cfg.policy_resources}}
        for d in app["deployments"]:
            if "ray_actor_options" in d:
                opts = d["ray_actor_options"]
                pieces[d["name"]] = {"CPU": opts.get("num_cpus", 1), **opts.get("resources", {})}
        return pieces
    stage = {"grpo": GRPOConfig, "sft": SFTConfig, "eval": EvalConfig, "mcts": MCTSJobConfig}[path.split("_")[0]]
    cfg = parse_config(stage, ["--config", str(REPO / "configs" / path)])
    pieces = {}
    if stage in (GRPOConfig, SFTConfig):
        gpus = getattr(cfg, "gpus_per_worker", 1.0) if cfg.use_gpu else 0
        pieces["trainer worker"] = {"CPU": cfg.cpus_per_worker, "GPU": gpus, **cfg.resources_per_worker}
    if stage in (GRPOConfig, EvalConfig):
        pieces["PolicyServer"] = {"CPU": 1, "GPU": cfg.policy.gpus, **cfg.policy.resources}
    if stage is GRPOConfig:
        pieces["RolloutWorker"] = {"CPU": 0.5, **cfg.rollout_resources}
        pieces["ReplayBuffer"] = {"CPU": 0, **cfg.rollout_resources}
    if stage is MCTSJobConfig:
        pieces["PolicyServer"] = {"CPU": 1, "GPU": cfg.teacher.gpus, **cfg.teacher.resources}
    if stage in (EvalConfig, MCTSJobConfig):
        pieces["actor"] = {"CPU": cfg.actor_cpus, **cfg.actor_resources}
    return pieces


CLUSTER_CONFIGS = ["grpo_qwen2.5-vl-7b.yaml", "grpo_qwen2.5-vl-7b_multiturn.yaml", "sft_qwen2.5-vl-7b.yaml",
                   "mcts_qwen72b.yaml", "eval_vigorl_7b_cluster.yaml", "serve.yaml"]


@pytest.mark.parametrize("path", CLUSTER_CONFIGS)
def test_every_piece_of_a_cluster_config_lands_on_a_node_type_that_fits_it(path):
    types = CLUSTER["available_node_types"]
    expected = {"PolicyServer": "policy", "trainer worker": "trainer"}
    for piece, request in requests(path).items():
        roles = [r for r in request if r.endswith("_node")]
        assert len(roles) == 1, f"{path}: {piece} requests no node role (it could land on any node): {request}"
        node = ROLES[roles[0]]
        assert node == expected.get(piece, "env"), f"{path}: {piece} asks for the {node} role"
        offered = types[node]["resources"]
        for resource, amount in request.items():
            assert amount <= offered.get(resource, 0), \
                f"{path}: {piece} needs {resource}={amount}, {node} has {offered}"


@pytest.mark.parametrize("path", ["grpo_tiny.yaml", "sft_tiny.yaml", "eval_tiny.yaml", "mcts_tiny.yaml"])
def test_local_configs_request_no_roles(path):
    """Laptop configs run on a plain local Ray: no custom resources anywhere."""
    assert all(not [r for r in req if r.endswith("_node")] for req in requests(path).values())


def test_role_resources_reach_the_serve_options_and_reject_cpu_and_gpu():
    app = policy_app("model-folder", gpus=1, resources={"policy_node": 0.01})
    assert app._bound_deployment.ray_actor_options == {"num_cpus": 1, "num_gpus": 1, "resources": {"policy_node": 0.01}}
    with pytest.raises(ConfigError, match="policy.resources: Value error, \\['GPU'\\] have their own fields"):
        parse_config(GRPOConfig, ["--model", "m", "--data", "d", "--policy.resources", "{GPU: 1}"])
    cfg = parse_config(SFTConfig, ["--model", "m", "--data", "d", "--resources_per_worker.trainer_node", "0.01"])
    assert cfg.resources_per_worker == {"trainer_node": 0.01}


def test_trainer_workers_request_their_role(monkeypatch, tmp_path):
    """jobs.training.fit (SFT and GRPO) hands resources_per_worker to Ray Train with the CPUs and GPUs."""
    import ray.train.torch

    from jobs.training import fit

    seen = {}

    class Recorder:
        def __init__(self, worker, *, train_loop_config, scaling_config, run_config):
            seen["scaling"] = scaling_config

        def fit(self):
            return "result"

    monkeypatch.setattr(ray.train.torch, "TorchTrainer", Recorder)
    monkeypatch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")  # fit sets it for local runs: keep it scoped
    cfg = parse_config(GRPOConfig, ["--config", str(REPO / "configs" / "grpo_qwen2.5-vl-7b.yaml")])
    assert fit(lambda config: None, {}, cfg, tmp_path) == "result"
    assert seen["scaling"].num_workers == 8 and seen["scaling"].use_gpu
    assert seen["scaling"].resources_per_worker == {"CPU": 8, "GPU": 1.0, "trainer_node": 0.01}


def test_a_job_on_a_cluster_keeps_the_clusters_auth_mode(monkeypatch):
    """`ray job submit` sets RAY_ADDRESS: the job must not turn token authentication off for its driver."""
    from jobs.common import set_runtime_env

    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    monkeypatch.setenv("RAY_ADDRESS", "http://head:8265")
    set_runtime_env()
    assert "RAY_AUTH_MODE" not in os.environ
    monkeypatch.delenv("RAY_ADDRESS")
    set_runtime_env()  # a local run starts its own Ray: auth off, as the tests and `vigorl` commands expect
    assert os.environ["RAY_AUTH_MODE"] == "disabled"
