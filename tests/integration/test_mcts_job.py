"""`vigorl mcts` and `vigorl chains` end to end on the tiny model through Serve (real Ray Data, real vLLM).

The searches run in Ray Data actors against the session Serve app's PolicyServer (teacher.app = "vigorl",
no second engine). The random-weight model never answers on its own, so the teacher is grammar-constrained
(teacher.constrained: one think step with a point, or an option): on two-option spatial questions about half
the answers are right and the trees yield both direct and backtracking chains. Checked: trees readable by
load_trees, stats.json, resume (nothing redone, file unchanged; a partial last line repaired and its sample
redone), chains readable by vigorl_core.data and vigorl_core.train.sft_data, the Critic reward, a per-sample
error record, and the --help smoke of both entrypoints.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from jobs import chains as chains_job
from jobs import mcts as mcts_job
from jobs.common import previous_output
from tests.conftest import REPO_ROOT
from vigorl_core.rollout.chat_tokens import ChatTokens
from vigorl_core.config import ConfigError
from vigorl_core.data import load_samples, read_jsonl
from vigorl_core.search.linearize import Chain
from vigorl_core.prompts import system_prompt
from vigorl_core.train.sft_data import conversation_mode, encode_conversation, read_conversations
from vigorl_core.synthetic.tasks import write_dataset
from vigorl_core.search.trees import load_trees

pytestmark = pytest.mark.slow

N = 3


def mcts_args(runs: Path, data: list[dict], run_name: str = "e2e", *extra: str) -> list[str]:
    return ["--run_name", run_name, "--runs_dir", str(runs), "--data", json.dumps(data),
            "--teacher.app", "vigorl", "--teacher.constrained", "true", "--mcts.simulations", "2",
            "--mcts.children", "2", "--mcts.max_depth", "3", "--mcts.rollout_max_steps", "2",
            "--mcts.max_tokens", "64", "--mcts.min_thoughts", "null", "--mcts.time_limit_s", "120",
            "--trees_per_actor", "4", *extra]


@pytest.fixture(scope="module")
def spatial(tmp_path_factory) -> Path:
    return write_dataset("spatial", N, 0, tmp_path_factory.mktemp("data") / "spatial")


@pytest.fixture(scope="module")
def run(serve_app, spatial, tmp_path_factory) -> Path:
    """One MCTS run of N samples; returns runs/mcts/e2e."""
    runs = tmp_path_factory.mktemp("runs")
    assert mcts_job.main(mcts_args(runs, [{"path": str(spatial)}])) == 0
    return runs / "mcts" / "e2e"


def test_mcts_job_writes_one_tree_per_sample(run, spatial):
    records = load_trees(run / "trees.jsonl")
    samples = {s.id: s for s in load_samples(spatial)}
    assert sorted(r.id for r in records) == sorted(samples)
    for rec in records:
        assert rec.status == "ok", rec.error
        assert rec.stats["simulations"] == 2 and rec.stats["expansions"] >= 1 and rec.tree.children
        assert rec.task == "spatial" and rec.teacher == "tiny" and rec.model_size is not None
        rollouts = [r for node in rec.nodes() for r in node.rollouts]
        assert rollouts and all(r.reward in (0.0, 1.0) for r in rollouts)
        # the grammar lets the teacher answer only with an option
        assert {r.final_answer for r in rollouts} <= set(samples[rec.id].options)
        assert rec.config["simulations"] == 2 and rec.global_search_time > 0
    stats = json.loads((run / "stats.json").read_text())
    assert stats["trees"] == N and stats["status"] == {"ok": N} and stats["this_run"]["trees"] == N
    assert 0 <= stats["root_correct_ratio"] <= 1 and stats["nodes_mean"] > 1 and stats["seconds_mean"] > 0
    assert stats["rollouts"] == sum(len(n.rollouts) for r in records for n in r.nodes())


def test_chains_from_the_trees_read_back(run, tiny_model_dir, tmp_path):
    out = tmp_path / "chains"
    assert chains_job.main(["--trees", str(run), "--out", str(out), "--student", str(tiny_model_dir),
                            "--linearize.val_fraction", "0.5"]) == 0
    stats = json.loads((out / "stats.json").read_text())
    assert stats["trees"]["trees"] == N and stats["linearized_trees"] == N
    assert stats["student_profile"]["name"] == "tiny"
    chains = [Chain.model_validate(obj) for _, obj in read_jsonl(out / "chains.jsonl")]
    assert len(chains) == stats["chains"]["chains"] == stats["files"]["chains.jsonl"]
    # ~half of the answers are right: a tree without any correct rollout among N is very unlikely
    assert stats["trees"]["solved_ratio"] > 0 and chains, stats
    assert {c.kind for c in chains} <= {"direct", "backtrack"} and all(c.steps or c.kind == "direct" for c in chains)
    chat = ChatTokens.from_pretrained(tiny_model_dir)
    for split in ("train", "val"):
        n = sum(c.split == split for c in chains)
        assert stats["files"][f"{split}.json"] == n
        if not n:
            continue
        samples = load_samples(out / f"{split}.json", task="spatial", source="synthetic")
        assert len(samples) == n and all(s.answer in s.options for s in samples)
        convs = read_conversations(out / f"{split}.json")
        assert all(conversation_mode(c) == "grounded" for c in convs)
        example = encode_conversation(convs[0], chat, system_prompt("spatial", "grounded"))
        assert example.label_tokens > 0
        multi = read_conversations(out / f"{split}_multiturn.json") if stats["files"][f"{split}_multiturn.json"] else []
        for conv in multi:  # every crop exists (read_conversations checks) and sits behind an <image>
            assert Path(conv.images[0]).parent != out / "crops"
            assert all(Path(p).parent == out / "crops" for p in conv.images[1:])
            assert (len(conv.images) > 1) == (conversation_mode(conv) == "multiturn")
        if multi:
            assert encode_conversation(multi[0], chat, system_prompt("spatial", "multiturn")).label_tokens > 0
    assert stats["files"]["train_multiturn.json"] + stats["files"]["val_multiturn.json"] > 0
    info = json.loads((out / "dataset_info.json").read_text())
    assert all(v["formatting"] == "sharegpt" and (out / v["file_name"]).is_file() for v in info.values())


def test_resume_skips_finished_samples_and_repairs_a_partial_line(run, spatial, capsys):
    trees = run / "trees.jsonl"
    before = trees.read_bytes()
    args = mcts_args(run.parent.parent, [{"path": str(spatial)}])
    assert mcts_job.main(args) == 0
    assert trees.read_bytes() == before
    assert f"{N - 0} already have trees" in capsys.readouterr().out
    # a job killed while writing the last tree: half a line
    lines = before.decode().splitlines(keepends=True)
    trees.write_text("".join(lines[:-1]) + lines[-1][: len(lines[-1]) // 2])
    assert mcts_job.main(args) == 0
    out = capsys.readouterr().out
    assert "dropped a partial last line" in out and f"{N - 1} already have trees" in out and "1 to search" in out
    after = trees.read_text().splitlines(keepends=True)
    assert after[:-1] == lines[:-1] and len(after) == N
    assert sorted(r.id for r in load_trees(trees)) == sorted(json.loads(line)["id"] for line in lines)
    # other search settings on the same run name are refused
    assert mcts_job.main([*args, "--mcts.simulations", "3"]) == 2


def test_a_killed_teacher_replica_is_replaced_and_every_tree_completes(serve_app, tmp_path, monkeypatch):
    """The session app's only PolicyServer replica is the teacher (no second engine start: the replacement's is
    the one this test pays); when the first tree is done, that replica is killed while the other trees search.
    Their lost requests are sent again once Serve has replaced it: one ok tree per sample, and the resends are
    counted in stats.json."""
    data = write_dataset("spatial", 4, 1, tmp_path / "data")
    args = mcts_args(tmp_path / "runs", [{"path": str(data)}], "replica-fault", "--mcts.simulations", "4")
    monkeypatch.setenv("VIGORL_FAULTS", '{"kill_policy_after": 1}')  # a test's fault (jobs/faults.py)
    assert mcts_job.main(args) == 0
    run_dir = tmp_path / "runs" / "mcts" / "replica-fault"
    assert (run_dir / "fault_injected_policy").is_file()  # the replica did die
    records = load_trees(run_dir / "trees.jsonl")
    assert sorted(r.id for r in records) == sorted(s.id for s in load_samples(data))
    assert all(r.status == "ok" for r in records), [r.error for r in records]
    stats = json.loads((run_dir / "stats.json").read_text())
    assert stats["this_run"]["trees"] == 4 and stats["this_run"]["replica_retries"] >= 1


def test_critic_reward_and_a_per_sample_error_record(serve_app, spatial, tmp_path):
    [first, *_] = [obj for _, obj in read_jsonl(spatial)]
    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps({**first, "id": "no-image", "images": ["missing.png"]}) + "\n")
    data = [{"path": str(spatial), "limit": 1}, {"path": str(broken), "check_images": False}]
    args = mcts_args(tmp_path, data, "critic", "--reward", "critic", "--mcts.simulations", "1")
    assert mcts_job.main(args) == 0
    records = {r.id: r for r in load_trees(tmp_path / "mcts" / "critic" / "trees.jsonl")}
    assert set(records) == {first["id"], "no-image"}
    ok, error = records[first["id"]], records["no-image"]
    assert ok.status == "ok" and all(r.reward in (0.0, 1.0) for n in ok.nodes() for r in n.rollouts)
    assert error.status == "error" and "missing.png" in error.error and not error.tree.children
    stats = json.loads((tmp_path / "mcts" / "critic" / "stats.json").read_text())
    assert stats["status"] == {"ok": 1, "error": 1}


@pytest.mark.parametrize("module", ["jobs.chains", "jobs.mcts"])
def test_help(module, subprocess_env):
    result = subprocess.run([sys.executable, "-m", module, "--help"], check=False, cwd=REPO_ROOT,
                            env=subprocess_env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "--trees" in result.stdout if module == "jobs.chains" else "--trees_per_actor" in result.stdout


def test_tree_file_repair_on_resume(tmp_path):
    """No Ray: duplicates and (with retry_errors) error records are removed, a partial last line is cut."""
    path = tmp_path / "trees.jsonl"
    rows = [{"id": "a", "status": "ok"}, {"id": "b", "status": "error", "error": "boom"}, {"id": "a", "status": "ok"},
            {"id": "c", "status": "timeout"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"id": "d", "sta')
    ids, notes = mcts_job._finished(path, retry_errors=False)
    assert ids == {"a", "b", "c"} and any("partial last line" in n for n in notes)
    assert [json.loads(line)["id"] for line in path.read_text().splitlines()] == ["a", "b", "c"]
    ids, notes = mcts_job._finished(path, retry_errors=True)
    assert ids == {"a", "c"} and notes == ["retrying b (error: boom)"]
    assert [json.loads(line)["id"] for line in path.read_text().splitlines()] == ["a", "c"]
    path.write_text('{"id": "a"}\nnot json\n{"id": "c"}\n')
    with pytest.raises(ValueError, match="trees.jsonl:2: not a tree record line"):
        mcts_job._finished(path, retry_errors=True)


def test_each_stage_reads_the_previous_stage_of_its_run_name(run, tiny_model_dir):
    """The documented pipeline's chaining on real trees: `vigorl chains` without --trees reads the MCTS run of its
    run name, and SFT without --data reads that chains folder (single-turn and zoom chains to train, its val
    files to validate); a stage whose previous output is missing says which path and which command."""
    from jobs.sft import SFTConfig, _prepare_data

    runs = run.parent.parent
    assert chains_job.main(["--runs_dir", str(runs), "--run_name", "e2e", "--student", str(tiny_model_dir)]) == 0
    chains_dir = runs / "chains" / "e2e"
    stats = json.loads((chains_dir / "stats.json").read_text())
    assert stats["trees"]["trees"] == N  # the trees of runs/mcts/e2e
    cfg = SFTConfig(runs_dir=str(runs), run_name="e2e", model=str(tiny_model_dir),
                    data=str(previous_output("sft", runs, "e2e")))
    data = _prepare_data(cfg, tiny_model_dir)
    files = stats["files"]
    assert len(data["train"]) + len(data["dropped"]) + len(data["val"]) == sum(
        files[f"{split}{kind}.json"] for split in ("train", "val") for kind in ("", "_multiturn"))
    assert len(data["train"]) >= files["train.json"] > 0
    with pytest.raises(ConfigError, match=r"model: .*sft/e2e/latest/config.json does not exist: make it with "
                                          r"`vigorl sft --run_name e2e \.\.\.`"):
        previous_output("grpo", runs, "e2e")
