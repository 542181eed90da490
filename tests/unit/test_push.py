"""vigorl push without the network: folder validation, repo ids, HF_HUB_OFFLINE, and what reaches huggingface_hub
(create_repo and upload_folder replaced by recorders)."""

from __future__ import annotations

import os

import pytest

from jobs import push as job


def _checkpoint(folder, weights: bool = True):
    (folder / "deepspeed").mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    (folder / "deepspeed" / "optim_states.pt").write_bytes(b"x" * 10)
    if weights:
        (folder / "model.safetensors").write_bytes(b"w" * 100)
    return folder


@pytest.fixture
def hub(monkeypatch):
    """huggingface_hub's create_repo and upload_folder, recorded instead of called."""
    from huggingface_hub import HfApi

    calls = []
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: calls.append(("create", repo_id, kw)))
    monkeypatch.setattr(HfApi, "upload_folder", lambda self, **kw: calls.append(("upload", kw)) or
                        type("CommitInfo", (), {"commit_url": "https://hub/commit/1"})())
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    return calls


def test_a_run_folder_pushes_its_latest_checkpoint_without_deepspeed(tmp_path, hub, capsys):
    run = tmp_path / "sft" / "demo"
    step = _checkpoint(run / "checkpoints" / "step-4")
    os.symlink("checkpoints/step-4", run / "latest")
    assert job.main(["--checkpoint", str(run), "--repo", "me/vigorl-demo", "--private"]) == 0
    create, upload = hub
    assert create == ("create", "me/vigorl-demo", {"repo_type": "model", "private": True, "exist_ok": True})
    assert upload[1]["folder_path"] == str(step.resolve()) and upload[1]["repo_id"] == "me/vigorl-demo"
    assert "deepspeed/*" in upload[1]["ignore_patterns"] and upload[1]["revision"] is None
    out = capsys.readouterr().out
    assert "2 files" in out and "https://hub/commit/1" in out  # config.json + weights; deepspeed/ not counted


def test_public_by_default_means_the_hubs_default(tmp_path, hub):
    job.main(["--checkpoint", str(_checkpoint(tmp_path / "ckpt")), "--repo", "org/name", "--message", "v1"])
    assert hub[0][2]["private"] is None and hub[1][1]["commit_message"] == "v1"


@pytest.mark.parametrize("args, says", [
    (["--repo", "me/x"], "checkpoint: Field required"),
    (["--checkpoint", "{tmp}/missing", "--repo", "me/x"], "no such folder"),
    (["--checkpoint", "{tmp}", "--repo", "me/x"], "not a Hugging Face model folder"),
    (["--checkpoint", "{tmp}/noweights", "--repo", "me/x"], "no weights"),
    (["--checkpoint", "{tmp}/ckpt", "--repo", "just-a-name"], "not a Hub repo id"),
])
def test_bad_arguments_are_named_and_nothing_is_sent(tmp_path, hub, capsys, args, says):
    _checkpoint(tmp_path / "ckpt")
    _checkpoint(tmp_path / "noweights", weights=False)
    assert job.main([a.format(tmp=tmp_path) for a in args]) == 2
    assert says in capsys.readouterr().err and not hub


def test_offline_mode_is_refused(tmp_path, hub, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert job.main(["--checkpoint", str(_checkpoint(tmp_path / "ckpt")), "--repo", "me/x"]) == 2
    assert "HF_HUB_OFFLINE" in capsys.readouterr().err and not hub
