"""Push a checkpoint folder to the Hugging Face Hub, only when asked.

    vigorl push --checkpoint runs/sft/tiny/latest --repo you/vigorl-tiny-sft            # or: python -m jobs.push ...
    vigorl push --checkpoint runs/grpo/7b --repo your-org/vigorl-7b-grpo --private      # a run folder: its latest

The folder must be a Hugging Face model folder (config.json and *.safetensors or pytorch_model*.bin), as SFT and
GRPO write under checkpoints/step-N/; a run folder stands for the checkpoint its `latest` link points at. The
DeepSpeed state (deepspeed/: optimizer and ZeRO shards, only needed to resume training) stays behind. The repo
is created if missing (`--private` then makes it private; an existing repo keeps its visibility) and the folder
is uploaded as one commit with huggingface_hub's upload_folder. Credentials are huggingface_hub's own: HF_TOKEN or
`hf auth login`. Other vigorl commands run with HF_HUB_OFFLINE=1 by default; this one does not set it, and says
so if your environment does.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

from pydantic import Field

from vigorl_core.config import ConfigError, StageConfig, parse_config

LEFT_BEHIND = ["deepspeed/*", "deepspeed/**", ".latest.tmp"]  # resume state, not the model
REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}$")


class PushConfig(StageConfig):
    """Upload a checkpoint folder (config.json + weights) to a Hugging Face Hub model repo."""

    checkpoint: str = Field(description="checkpoint folder (e.g. runs/sft/<run>/checkpoints/step-N or "
                                        "runs/sft/<run>/latest), or a run folder (its latest checkpoint)")
    repo: str = Field(description="Hub model repo id, user/name or org/name (created if missing)")
    private: bool = Field(False, description="create the repo as private (an existing repo keeps its visibility)")
    revision: str | None = Field(None, description="an existing branch to commit to (default: the repo's main branch)")
    message: str | None = Field(None, description="commit message (default: 'Upload <checkpoint> with vigorl push')")


def checkpoint_folder(path: str) -> Path:
    """The model folder to upload: `path`, or the checkpoint a run folder's `latest` points at. Raises
    ConfigError naming what is missing."""
    folder = Path(path)
    if not folder.is_dir():
        raise ConfigError(f"checkpoint: no such folder {folder}")
    if not (folder / "config.json").is_file() and (folder / "latest").is_dir():
        folder = folder / "latest"
    folder = folder.resolve()
    if not (folder / "config.json").is_file():
        raise ConfigError(f"checkpoint: {path} is not a Hugging Face model folder (no config.json); pass a "
                          "checkpoint such as runs/sft/<run>/checkpoints/step-N, or a run folder with a latest link")
    if not any(folder.glob("*.safetensors")) and not any(folder.glob("pytorch_model*.bin")):
        raise ConfigError(f"checkpoint: {folder} has config.json but no weights (*.safetensors or pytorch_model*.bin)")
    return folder


def push(cfg: PushConfig) -> str:
    """Validate, create the repo if needed and upload the folder; returns the commit's URL."""
    if not REPO_ID.match(cfg.repo):
        raise ConfigError(f"repo: {cfg.repo!r} is not a Hub repo id (expected user/name or org/name)")
    folder = checkpoint_folder(cfg.checkpoint)
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        raise ConfigError("HF_HUB_OFFLINE is set in this environment: pushing needs the Hub (run with "
                          "HF_HUB_OFFLINE=0)")
    from huggingface_hub import HfApi

    files = [p for p in folder.rglob("*") if p.is_file() and "deepspeed" not in p.relative_to(folder).parts]
    size = sum(p.stat().st_size for p in files)
    print(f"pushing {folder} ({len(files)} files, {size / 1e6:.1f} MB; deepspeed/ left behind) to {cfg.repo}",
          flush=True)
    api = HfApi()  # the token: HF_TOKEN or the cached login
    api.create_repo(cfg.repo, repo_type="model", private=cfg.private or None, exist_ok=True)  # None: the Hub's default
    commit = api.upload_folder(folder_path=str(folder), repo_id=cfg.repo, repo_type="model", revision=cfg.revision,
                               commit_message=cfg.message or f"Upload {folder.name} with vigorl push",
                               ignore_patterns=LEFT_BEHIND)
    url = getattr(commit, "commit_url", None) or str(commit)
    print(f"pushed: {url}")
    return url


def main(argv: list[str] | None = None) -> int:
    # Not jobs.common.run_main: its runtime defaults turn the Hub off (HF_HUB_OFFLINE=1), which pushing needs.
    try:
        push(parse_config(PushConfig, sys.argv[1:] if argv is None else argv, prog="vigorl push"))
    except (ConfigError, ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
