"""deploy/kuberay/ and docs/cluster.md against the code: every KubeRay manifest has the fields KubeRay's API
requires, its RayCluster specs pass the translation Ray's own KubeRay autoscaler applies (with the node roles
of cluster.yaml), and every stage command (RayJob entrypoints, `ray job submit` lines in docs/cluster.md)
names a real job module and parses into that stage's config, files included."""

from __future__ import annotations

import copy
import re
import shlex
from pathlib import Path

import pytest
import yaml

from jobs.chains import ChainsConfig
from jobs.evaluate import EvalConfig
from jobs.grpo import GRPOConfig
from jobs.mcts import MCTSJobConfig
from jobs.sft import SFTConfig
from services.app import ServeConfig
from vigorl_core.config import parse_config

REPO = Path(__file__).resolve().parents[2]
KUBERAY = REPO / "deploy" / "kuberay"
IMAGE_ROOT = "/home/ray/vigorl"  # where deploy/kuberay/Dockerfile puts the repo
RAY_VERSION = re.search(r'"ray\[[^]]*\]==([0-9.]+)"', (REPO / "pyproject.toml").read_text()).group(1)
STAGES = {"jobs.mcts": MCTSJobConfig, "jobs.chains": ChainsConfig, "jobs.sft": SFTConfig, "jobs.grpo": GRPOConfig,
          "jobs.evaluate": EvalConfig}
CLUSTER_TYPES = yaml.safe_load((REPO / "cluster.yaml").read_text())["available_node_types"]
ROLES = {"policy": "policy_node", "trainer": "trainer_node", "env": "env_node"}


def manifests() -> dict[str, list[dict]]:
    return {p.name: list(yaml.safe_load_all(p.read_text())) for p in sorted(KUBERAY.glob("*.yaml"))}


def ray_objects(kind: str) -> list[dict]:
    return [d for docs in manifests().values() for d in docs if d.get("kind") == kind]


def check_stage_command(argv: list[str], repo_path=lambda p: REPO / p):
    """`python -m jobs.<stage> ARGS`: the module file exists, ARGS parse into the stage's config, and every
    --config file exists (`repo_path` maps a path of the command to this checkout). Returns the config."""
    assert argv[:2] == ["python", "-m"] and argv[2] in STAGES, f"not a stage command: {argv}"
    assert (REPO / (argv[2].replace(".", "/") + ".py")).is_file()
    args = list(argv[3:])
    for i, arg in enumerate(args[:-1]):
        if arg == "--config":
            args[i + 1] = str(repo_path(args[i + 1]))
            assert Path(args[i + 1]).is_file(), f"{argv}: no config {args[i + 1]}"
    return parse_config(STAGES[argv[2]], args)


def derived_node_types(spec: dict, name: str) -> dict:
    """The node types Ray's KubeRay autoscaler derives from a RayCluster spec (and validates)."""
    from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr

    cr = {"apiVersion": "ray.io/v1", "kind": "RayCluster", "metadata": {"name": name, "namespace": "default"},
          "spec": copy.deepcopy(spec)}
    return _derive_autoscaling_config_from_ray_cr(cr)["available_node_types"]


def check_cluster_spec(spec: dict, name: str) -> set[str]:
    """Fields KubeRay requires, autoscaling on, a CPU-only head, the roles of cluster.yaml per worker group, the
    shared volume in every pod. Returns the worker group names."""
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["rayVersion"] == RAY_VERSION
    groups = spec["workerGroupSpecs"]
    names = [g["groupName"] for g in groups]
    assert len(set(names)) == len(names) and set(names) <= set(ROLES)
    for group in [spec["headGroupSpec"], *groups]:
        pod = group["template"]["spec"]
        assert isinstance(group["rayStartParams"], dict)
        assert pod["containers"][0]["image"] and pod["containers"][0]["name"]
        mounts = {m["name"]: m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}
        claims = {v["name"]: v.get("persistentVolumeClaim", {}).get("claimName") for v in pod["volumes"]}
        assert mounts["shared"] == "/mnt/shared" and claims["shared"] == "vigorl-shared"
    for g in groups:
        assert 0 <= g["minReplicas"] <= g["replicas"] <= g["maxReplicas"], g["groupName"]
    types = derived_node_types(spec, name)
    assert types["headgroup"]["resources"]["CPU"] == 0
    for group in names:
        resources = types[group]["resources"]
        expected = CLUSTER_TYPES[group]["resources"]
        assert [r for r in resources if r.endswith("_node")] == [ROLES[group]] and resources[ROLES[group]] == 1
        assert resources.get("GPU", 0) == expected.get("GPU", 0), group
    return set(names)


def test_every_manifest_is_a_kuberay_or_core_object():
    found = manifests()
    assert {"raycluster.yaml", "rayservice.yaml", "shared-storage.yaml"} <= set(found)
    for name, docs in found.items():
        for doc in docs:
            assert doc["metadata"]["name"], name
            if doc["kind"] in ("RayCluster", "RayJob", "RayService"):
                assert doc["apiVersion"] == "ray.io/v1", name
            else:
                assert (doc["apiVersion"], doc["kind"]) == ("v1", "PersistentVolumeClaim"), name
                assert doc["spec"]["accessModes"] == ["ReadWriteMany"]  # every pod mounts it
                assert doc["metadata"]["name"] == "vigorl-shared"


def test_raycluster_has_the_roles_of_cluster_yaml_as_autoscaling_worker_groups():
    [cluster] = ray_objects("RayCluster")
    assert check_cluster_spec(cluster["spec"], cluster["metadata"]["name"]) == set(ROLES)
    assert all(g["minReplicas"] == 0 for g in cluster["spec"]["workerGroupSpecs"])  # from zero, as cluster.yaml


def test_a_broken_group_fails_the_autoscaler_translation():
    [cluster] = ray_objects("RayCluster")
    spec = copy.deepcopy(cluster["spec"])
    spec["workerGroupSpecs"][0]["rayStartParams"]["resources"] = '"{\\"policy_node\\": 0.5}"'  # must be an int
    with pytest.raises(AssertionError):
        derived_node_types(spec, "broken")


def in_image(path: str) -> Path:
    """A config path of a RayJob: the image's copy of the repo (the job driver's cwd is not the repo)."""
    assert path.startswith(IMAGE_ROOT + "/configs/"), path
    return REPO / path.removeprefix(IMAGE_ROOT + "/")


def test_one_rayjob_per_stage_runs_a_real_module_with_a_real_config_on_the_raycluster():
    [cluster] = ray_objects("RayCluster")
    jobs = ray_objects("RayJob")
    modules = set()
    for job in jobs:
        spec = job["spec"]
        assert spec["clusterSelector"] == {"ray.io/cluster": cluster["metadata"]["name"]}
        assert spec["shutdownAfterJobFinishes"] is False  # the cluster is shared
        argv = shlex.split(spec["entrypoint"])
        cfg = check_stage_command(argv, in_image)
        for field in ("runs_dir", "out"):
            value = getattr(cfg, field, None)
            assert value is None or value.startswith("/mnt/shared/"), f"{argv[2]}: {field} {value} is not shared"
        modules.add(argv[2])
    assert modules == set(STAGES)  # mcts, chains, sft, grpo, evaluate


def test_rayservice_serves_configs_serve_yaml_on_the_policy_and_env_roles():
    from ray.serve.schema import ServeDeploySchema

    [service] = ray_objects("RayService")
    serve_config = yaml.safe_load(service["spec"]["serveConfigV2"])
    assert serve_config == yaml.safe_load((REPO / "configs" / "serve.yaml").read_text())
    ServeDeploySchema.model_validate(serve_config)
    [app] = serve_config["applications"]
    assert app["import_path"] == "services.app:build_app"
    assert ServeConfig.model_validate(app["args"]).policy_resources == {"policy_node": 0.01}
    assert check_cluster_spec(service["spec"]["rayClusterConfig"], service["metadata"]["name"]) == {"policy", "env"}


def test_every_pod_runs_the_image_of_the_dockerfile():
    images = set()
    for kind in ("RayCluster", "RayService"):
        for obj in ray_objects(kind):
            spec = obj["spec"].get("rayClusterConfig", obj["spec"])
            for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
                images |= {c["image"] for c in group["template"]["spec"]["containers"]}
    assert len(images) == 1
    dockerfile = (KUBERAY / "Dockerfile").read_text()
    assert f"FROM rayproject/ray:{RAY_VERSION}-py311-gpu" in dockerfile
    assert f"COPY --chown=ray:users . {IMAGE_ROOT}" in dockerfile
    assert f'pip install --no-cache-dir -e "{IMAGE_ROOT}[gpu,train]"' in dockerfile


# ------------------------------------------------------------------------------------------- docs/cluster.md

def doc_commands() -> list[str]:
    """Every shell command of docs/cluster.md's code blocks, continuation lines joined."""
    text = (REPO / "docs" / "cluster.md").read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        commands += [line.split("  #")[0].strip() for line in joined.splitlines()
                     if line.strip() and not line.lstrip().startswith("#")]
    return commands


def test_every_ray_job_submit_in_docs_cluster_md_runs_a_stage_that_parses():
    submits = [c for c in doc_commands() if c.startswith("ray job submit")]
    stages = set()
    for command in submits:
        argv = shlex.split(command)
        assert "--working-dir" in argv and argv[argv.index("--working-dir") + 1] == "."
        cfg = check_stage_command(argv[argv.index("--") + 1:])
        stages.add(argv[argv.index("--") + 3])
        assert getattr(cfg, "runs_dir", "/mnt/shared/").startswith("/mnt/shared/"), command
    assert stages == set(STAGES)


def test_every_file_docs_cluster_md_names_exists():
    text = (REPO / "docs" / "cluster.md").read_text()
    named = set(re.findall(r"\b((?:configs|deploy/kuberay|docs|jobs|services|tests/\w+)/[\w./-]+\.(?:yaml|py|md))",
                           text))
    named |= {"cluster.yaml"}
    assert len(named) > 5
    for path in named:
        assert (REPO / path).is_file(), path
    for command in doc_commands():
        if command.startswith("serve deploy"):
            assert (REPO / shlex.split(command)[2]).is_file()


def test_every_ray_and_serve_command_in_docs_cluster_md_parses(monkeypatch):
    """Subcommands, options and arguments as Ray's own CLI parses them (nothing runs)."""
    import click
    from ray.scripts.scripts import cli as ray_cli
    from ray.serve.scripts import cli as serve_cli

    monkeypatch.chdir(REPO)
    checked = 0
    for command in doc_commands():
        argv = shlex.split(command)
        if argv[0] not in ("ray", "serve"):
            continue
        cmd, args = (ray_cli if argv[0] == "ray" else serve_cli), argv[1:]
        while isinstance(cmd, click.Group):
            assert args and args[0] in cmd.commands, command
            name, cmd = args[0], cmd.commands[args.pop(0)]
        cmd.make_context(name, args)  # click.UsageError on an unknown option or a missing argument
        checked += 1
    assert checked >= 15
