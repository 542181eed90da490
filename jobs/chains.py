"""Linearize MCTS trees into SFT reasoning chains: single-turn chains and multi-turn zoom conversations.

    vigorl chains --config configs/chains_tiny.yaml                  # or: python -m jobs.chains ...
    vigorl chains --run_name tiny --student tiny                     # trees: runs/mcts/tiny (same run name)
    vigorl chains --trees data/mcts/vstar_20250514_134727 --task visual_search --student qwen2.5-vl

Input: trees of `vigorl mcts` (runs/mcts/<run>/ or its trees.jsonl; by default the MCTS run of the same run
name, <runs_dir>/mcts/<run_name>) or of the original project (its rollouts_*.jsonl files or their folder;
`task` is then required); several paths may be given, a sample id
seen twice counts once (the first). Trees whose status is not in `statuses` are skipped (a timed-out
tree's rollouts are complete, so `timeout` is linearized by default).

Each tree becomes direct chains (correct rollouts) and backtracking chains (a wrong attempt, the
correction phrase, a correct attempt), deduplicated, capped per sample, and assigned to train or val by a
hash of the sample id (vigorl_core.search.linearize; docs/mcts.md). Points are rescaled to the frame of the
`student` model (a profile name or its model folder). Multi-turn conversations turn points into zoom tool
calls answered with crops, cut with the task x profile ZoomEnv settings that RL and serving use.

Outputs in runs/chains/<run_name>/ (or `out`):
  chains.jsonl                           our Chain records, both splits
  train.json, val.json                   single-turn, sharegpt {messages, images, ...} (LLaMA-Factory)
  train_multiturn.json, val_multiturn.json   multi-turn, same format; crop images in crops/
  dataset_info.json                      LLaMA-Factory's registry of those files (dataset_dir = this folder)
  stats.json                             tree_stats, chain_stats, records per file; printed too
  job.log                                library output (on the terminal with --verbose)
Image paths in these files are relative to the folder (the readers resolve them against it), so the folder
moves between machines with its crops and, by the same relative path, the samples' images; files are
created with the usual mode (0644 under umask 022), readable on a shared runs folder.
vigorl_core.train.sft_data.read_conversations and vigorl_core.data.load_samples read the JSON files back.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from collections import Counter, defaultdict
from pathlib import Path
from typing import Literal

import yaml
from pydantic import Field, field_validator

from jobs.common import REPO_ROOT, log_to_run_folder, previous_output, run_main
from vigorl_core.config import ConfigError, StageConfig, parse_config
from vigorl_core.search.linearize import LinearizeConfig

SPLITS = ("train", "val")


class ChainsConfig(StageConfig):
    """Turn MCTS trees into SFT data: single-turn chains and multi-turn zoom conversations (sharegpt JSON)."""

    run_name: str = Field("default", description="output folder runs/chains/<run_name> (unless `out` is given)")
    runs_dir: str = Field(str(REPO_ROOT / "runs"), description="root of run folders")
    trees: list[str] | None = Field(None, description="tree files or folders: runs/mcts/<run>/, trees.jsonl, the "
                                    "original's rollouts_*.jsonl or their folder; one path or a list (default: "
                                    "<runs_dir>/mcts/<run_name>, the MCTS run of the same name)")
    task: str | None = Field(None, description="task of the original's trees (ours carry it): spatial, "
                                               "visual_search, grounding, web_action")
    source: str = Field("unknown", description="benchmark name recorded for the original's trees")
    out: str | None = Field(None, description="output folder (default: <runs_dir>/chains/<run_name>)")
    student: str = Field("qwen2.5-vl", description="model the chains are for: a profile name (tiny, qwen2.5-vl) "
                                                   "or its model folder; sets the frame of points and the crops")
    formats: list[Literal["single_turn", "multi_turn"]] = Field(
        ["single_turn", "multi_turn"], min_length=1, description="which conversations to write")
    statuses: list[Literal["ok", "timeout", "error"]] = Field(
        ["ok", "timeout"], description="tree statuses to linearize (an error tree is partial, its rollouts valid)")
    linearize: LinearizeConfig = Field(default_factory=LinearizeConfig,
                                       description="caps, correctness threshold, val fraction, seed, image budget")

    @field_validator("trees", mode="before")
    @classmethod
    def _one_or_many(cls, value):
        return [value] if isinstance(value, str) else value


def _tree_files(path: str) -> list[Path]:
    p = Path(path)
    if p.is_file():
        return [p]
    if p.is_dir():
        if (p / "trees.jsonl").is_file():
            return [p / "trees.jsonl"]
        files = sorted(f for f in p.rglob("*.jsonl") if not f.name.startswith("errors_"))
        if files:
            return files
    raise FileNotFoundError(f"trees: {path}: no such file, and no folder holding trees.jsonl or *.jsonl files")


def _student_profile(student: str):
    """The student's ModelProfile, named for the zoom table as the rollout driver names it."""
    from vigorl_core.frames import PROFILES

    if student in PROFILES:
        return PROFILES[student]
    if not Path(student).is_dir():
        raise ConfigError(f"student: {student!r} is neither a profile ({', '.join(PROFILES)}) nor a model folder")
    from vigorl_core.rollout.chat_tokens import ChatTokens

    profile = ChatTokens.from_pretrained(student).profile
    return dataclasses.replace(profile, name="tiny" if profile.max_pixels <= 200_704 else "qwen2.5-vl")


def _linearize_all(cfg: ChainsConfig, files: list[Path], profile) -> tuple[list, list, int]:
    """(chains, every tree stripped of its texts (for tree_stats), duplicate ids), streaming one tree at
    a time so a big run's trees need not fit in memory."""
    from vigorl_core.search.linearize import linearize
    from vigorl_core.search.trees import iter_trees

    chains, records, seen, duplicates = [], [], set(), 0
    for file in files:
        for rec in iter_trees(file, task=cfg.task, source=cfg.source):
            if rec.id in seen:
                duplicates += 1
                continue
            seen.add(rec.id)
            if rec.status in cfg.statuses:
                chains += linearize(rec, cfg.linearize, profile)
            for node in rec.nodes():
                node.thought_text, node.text = "", None
                for rollout in node.rollouts:
                    rollout.ephemeral_texts = []
            records.append(rec)
    if not records:
        raise ValueError(f"trees: no tree records in {', '.join(cfg.trees)}")
    return chains, records, duplicates


def _dataset_info(out: Path, counts: dict[str, int], run_name: str) -> None:
    """LLaMA-Factory's dataset registry (dataset_info.json) for the sharegpt files written."""
    info = {}
    for file, n in counts.items():
        if file.endswith(".json") and n:
            info[f"{run_name}_{Path(file).stem}"] = {
                "file_name": file, "formatting": "sharegpt", "columns": {"messages": "messages", "images": "images"},
                "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user",
                         "assistant_tag": "assistant", "system_tag": "system"}}
    (out / "dataset_info.json").write_text(json.dumps(info, indent=2) + "\n")


def _run(argv: list[str]) -> int:
    cfg = parse_config(ChainsConfig, argv, prog="vigorl chains")
    from vigorl_core.data import write_jsonl
    from vigorl_core.search.linearize import (
        chain_stats,
        relative_images,
        to_multiturn,
        to_sharegpt,
        tree_stats,
        write_json,
    )

    if cfg.trees is None:
        cfg = cfg.model_copy(update={"trees": [str(previous_output("chains", cfg.runs_dir, cfg.run_name))]})
    files = [file for path in cfg.trees for file in _tree_files(path)]
    profile = _student_profile(cfg.student)
    out = Path(cfg.out) if cfg.out else Path(cfg.runs_dir) / "chains" / cfg.run_name
    out.mkdir(parents=True, exist_ok=True)
    log_to_run_folder(out)
    (out / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    chains, records, duplicates = _linearize_all(cfg, files, profile)
    used = [r for r in records if r.status in cfg.statuses]
    counts = {"chains.jsonl": write_jsonl((c.model_copy(update={"images": relative_images(c.images, out)})
                                           for c in chains), out / "chains.jsonl")}
    notes = [f"{duplicates} duplicate tree id(s) ignored (the first record of an id is used)"] if duplicates else []

    if "single_turn" in cfg.formats:
        for split in SPLITS:
            counts[f"{split}.json"] = write_json([to_sharegpt(c) for c in chains if c.split == split],
                                                 out / f"{split}.json")
    if "multi_turn" in cfg.formats:
        by_sample, multi = defaultdict(list), defaultdict(list)
        for c in chains:
            by_sample[c.sample_id].append(c)
        for sample_id, group in by_sample.items():
            try:
                convs = to_multiturn(group, profile, out / "crops", max_images=cfg.linearize.max_images)
            except OSError as err:  # a missing or unreadable image: the sample's single-turn chains still stand
                notes.append(f"multi-turn: sample {sample_id} skipped: {err}")
                continue
            multi[group[0].split] += convs
        for split in SPLITS:
            counts[f"{split}_multiturn.json"] = write_json(multi[split], out / f"{split}_multiturn.json")
    _dataset_info(out, counts, cfg.run_name)

    stats = {"trees": tree_stats(records), "linearized_trees": len(used),
             "skipped_trees": dict(Counter(r.status for r in records if r.status not in cfg.statuses)),
             "chains": chain_stats(chains), "files": counts, "student_profile": dataclasses.asdict(profile),
             "notes": notes}
    (out / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    for note in notes:
        print(f"note: {note}")
    t, c = stats["trees"], stats["chains"]
    print(f"{t['trees']} trees ({len(used)} linearized): root correct {t['root_correct_ratio']:.3f}, solved "
          f"{t['solved_ratio']:.3f}, rollout accuracy {t['rollout_accuracy']:.3f}, nodes mean "
          f"{t.get('nodes_mean', 0):.1f}, seconds mean {t.get('seconds_mean', 0):.1f}")
    print(f"{c['chains']} chains {c['kind']} from {c['samples_with_chains']} samples, splits {c['split']}")
    print("wrote " + ", ".join(f"{name} ({n})" for name, n in counts.items()) + f" in {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_main(_run, argv)


if __name__ == "__main__":
    sys.exit(main())
