"""Tree linearization: MCTS trees (vigorl_core.search.trees.TreeRecord) -> SFT reasoning chains.

An attempt is one rollout read as reasoning: the `<think>` texts of its responses from the root on (tags
removed, whitespace collapsed), then its final answer. Chains (docs/mcts.md "Linearization"):
- direct: a correct attempt (reward >= correct_threshold) with at least `min_steps` steps;
- backtrack: a wrong attempt W and a correct attempt C of one tree: the steps they share from the root
  (their longest common prefix, i.e. the tree path to where they branched) written ONCE, then W's other
  steps, the correction phrase, C's other steps and C's answer. The original paired rollouts of one node
  only, wrote the shared prefix twice and enumerated every pair (capped at 10,000 per sample).
Chains are deduplicated (same steps and answer) and capped per sample and kind after a shuffle seeded by
(seed, sample id), so the output does not depend on the order trees are read. A sample's chains all go
to one split, chosen by a hash of (seed, sample id).

Points are written in the teacher's model frame (TreeRecord.model_size; an original tree: the file's
frame). Given the student's `profile`, every `(x, y)` in the steps (and a grounding answer) is rescaled to
the frame the student sees, so SFT, RL and evaluation agree (the original single-turn builder never did).

Outputs: `Chain` JSONL (ours); `to_sharegpt` single-turn and `to_multiturn` conversations as LLaMA-Factory
sharegpt records {id, messages, images, gt_answer, task, metadata} (vigorl_core.data reads them back, schema C).
`write_json` writes image paths relative to the file's folder, so a chains folder and its crops travel.
Multi-turn: each step that names a new point ends an assistant turn with a zoom tool call on it, and the
user answers with the crop, cut by vigorl_core.zoom with the task x profile settings that RL and serving
use; the last turn holds the remaining steps and the answer, or the RL forced-final text once the image
budget is spent.

    chains = linearize(tree, LinearizeConfig(), profile=get_profile("qwen2.5-vl"))
    write_json([to_sharegpt(c) for c in chains], out / "chains.json")
    write_json(to_multiturn(chains, get_profile("qwen2.5-vl"), out / "crops"), out / "chains_multiturn.json")
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import statistics
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from PIL import Image
from pydantic import Field

from vigorl_core.config import StageConfig
from vigorl_core.data import IMAGE_TOKEN, atomic_write
from vigorl_core.frames import FrameMap, ModelProfile, resize_to_model
from vigorl_core.images import image_hash, open_images
from vigorl_core.search.trees import TreeNode, TreeRecord
from vigorl_core.prompts import system_prompt, user_text
from vigorl_core.protocol import (
    FORCED_FINAL_PREFIX, POINT_RE, format_point, parse_response, render_single_turn, render_turn,
)
from vigorl_core.records import Record, Task
from vigorl_core.zoom import ZoomEnv, zoom_settings

CORRECTION = "Wait, this seems off. Let's try something else."
_NOT_STEP_RE = re.compile(r"<answer>.*?(?:</answer>|$)|<tool_call>.*?(?:</tool_call>|$)|</?think>|<\|im_end\|>"
                          r"|<\|endoftext\|>", re.DOTALL)


class LinearizeConfig(StageConfig):
    """How trees become chains. Caps are per sample."""

    correct_threshold: float = Field(1.0, description="a rollout with reward >= this is correct (original: 1.0)")
    correction: str = Field(CORRECTION, description="phrase between the wrong and the correct attempt")
    max_direct: int = Field(10, ge=0, description="direct chains kept per sample")
    max_backtrack: int = Field(10, ge=0, description="backtracking chains kept per sample")
    min_steps: int = Field(1, ge=0, description="steps a direct chain needs (the original dropped answer-only ones)")
    val_fraction: float = Field(0.05, ge=0, le=1, description="share of samples (all their chains) in val")
    seed: int = Field(0, description="seeds the shuffle before capping and the split hash")
    max_images: int = Field(5, ge=2, description="multi-turn: original + crops, as in RL (5: at most 4 zooms)")
    modal_first_point: bool = Field(False, description="keep only chains whose first point is the one the tree's "
                                    "attempts name first most often (a self-consistency filter that needs no box: "
                                    "the teacher's most frequent point is the one greedy decoding names, and a chain "
                                    "that reached the right answer from another point is likely a lucky guess)")


class Chain(Record):
    """One SFT reasoning chain. `steps` hold points in the student's model frame."""

    id: str
    sample_id: str
    task: Task
    source: str
    kind: Literal["direct", "backtrack"]
    split: Literal["train", "val"]
    question: str = Field(description="user text: the question and its options")
    images: list[str]
    steps: list[str] = Field(description="think steps; a backtracking chain's correction phrase is one step")
    answer: str
    gt_answer: str
    shared_steps: int = Field(0, description="backtrack: steps the wrong and the correct attempt share")
    wrong_steps: int = Field(0, description="backtrack: steps of the wrong attempt after the shared ones")
    tree_value: float = Field(0.0, description="root value of the sample's tree")
    text: str = Field(description="single-turn rendering: <think> steps </think> <answer> answer </answer>")


@dataclass(frozen=True)
class Attempt:
    steps: tuple[str, ...]
    answer: str | None
    reward: float


def _step(text: str) -> str:
    return " ".join(_NOT_STEP_RE.sub(" ", text).split())


def attempts(record: TreeRecord, rescale: Callable[[str], str] = str) -> list[Attempt]:
    """Every rollout of the tree as an Attempt (tree order, duplicates kept). The first ephemeral text is
    the question; the last gave the answer and contributes a step only if it has a `<think>` block."""
    out = []
    for node in record.nodes():
        for r in node.rollouts:
            texts = list(r.ephemeral_texts)
            if texts and (texts[0] == record.tree.thought_text or texts[0].startswith(IMAGE_TOKEN)
                          or texts[0].endswith(IMAGE_TOKEN)):
                texts = texts[1:]
            if not texts:
                continue
            steps = [_step(t) for t in texts[:-1]] + ([_step(texts[-1])] if "<think>" in texts[-1] else [])
            answer = r.final_answer if r.final_answer is not None else parse_response(texts[-1]).answer
            answer = answer.strip() if answer else None
            if answer and record.task == "grounding":
                answer = rescale(answer)
            out.append(Attempt(tuple(rescale(s) for s in steps if s), answer, r.reward))
    return out


def point_rescaler(record: TreeRecord, profile: ModelProfile | None) -> Callable[[str], str]:
    """Rewrites every `(x, y)` from the teacher's model frame to the student's (`profile`); identity when
    the frames agree or no profile is given. An original tree's points are in the file's frame."""
    if profile is None:
        return str
    size = record.original_size
    if size is None:
        with Image.open(record.image) as im:
            size = im.size
    teacher = record.model_size or size
    student = FrameMap.for_image(*size, profile).model_size
    if tuple(teacher) == tuple(student):
        return str
    sx, sy = student[0] / teacher[0], student[1] / teacher[1]
    return lambda text: POINT_RE.sub(lambda m: format_point(float(m[1]) * sx, float(m[2]) * sy), text)


def split_of(sample_id: str, val_fraction: float, seed: int = 0) -> Literal["train", "val"]:
    """Deterministic split of a sample: sha256 of (seed, id) as a number in [0, 1) below val_fraction."""
    h = int.from_bytes(hashlib.sha256(f"{seed}:{sample_id}".encode()).digest()[:8], "big") / 2 ** 64
    return "val" if h < val_fraction else "train"


def _common_prefix(a: tuple[str, ...], b: tuple[str, ...]) -> int:
    k = 0
    while k < min(len(a), len(b)) and a[k] == b[k]:
        k += 1
    return k


def first_point(steps: Sequence[str]) -> tuple[str, str] | None:
    """The first `(x, y)` named in `steps`, as written; None when no step names one."""
    for step in steps:
        if match := POINT_RE.search(step):
            return match[1], match[2]
    return None


def modal_first_point(found: Sequence[Attempt]) -> tuple[str, str] | None:
    """The first point that the most attempts name first (ties: the earliest in tree order); None if none does."""
    counts = Counter(p for a in found if (p := first_point(a.steps)) is not None)
    return counts.most_common(1)[0][0] if counts else None


def linearize(record: TreeRecord, config: LinearizeConfig | None = None,
              profile: ModelProfile | None = None) -> list[Chain]:
    """The chains of one tree: capped direct chains, then capped backtracking chains (see module doc)."""
    cfg = config or LinearizeConfig()
    found = attempts(record, point_rescaler(record, profile))
    modal = modal_first_point(found) if cfg.modal_first_point else None
    unique = {(a.steps, a.answer): a for a in found}.values()
    correct = [a for a in unique if a.reward >= cfg.correct_threshold and a.answer]
    wrong = [a for a in unique if a.reward < cfg.correct_threshold]
    candidates: dict[str, dict[tuple, tuple[int, int]]] = {"direct": {}, "backtrack": {}}
    for c in correct:
        if len(c.steps) >= cfg.min_steps:
            candidates["direct"].setdefault((c.steps, c.answer), (0, 0))
        for w in wrong:
            k = _common_prefix(w.steps, c.steps)
            if k < len(w.steps) and k < len(c.steps):  # both attempts have steps of their own
                steps = c.steps[:k] + w.steps[k:] + (cfg.correction,) + c.steps[k:]
                candidates["backtrack"].setdefault((steps, c.answer), (k, len(w.steps) - k))
    if modal is not None:
        for kind in candidates:
            candidates[kind] = {key: v for key, v in candidates[kind].items() if first_point(key[0]) == modal}
    rng = random.Random(f"{cfg.seed}:{record.id}")
    question = user_text(record.question.replace(IMAGE_TOKEN, "").strip(), record.options)
    images = record.images or ([record.image] if record.image else [])
    split = split_of(record.id, cfg.val_fraction, cfg.seed)
    chains = []
    for kind, cap in (("direct", cfg.max_direct), ("backtrack", cfg.max_backtrack)):
        keys = sorted(candidates[kind])
        rng.shuffle(keys)
        for i, (steps, answer) in enumerate(keys[:cap]):
            shared, wrong_steps = candidates[kind][(steps, answer)]
            chains.append(Chain(
                id=f"{record.id}-{kind[0]}{i}", sample_id=record.id, task=record.task, source=record.source,
                kind=kind, split=split, question=question, images=images, steps=list(steps), answer=answer,
                gt_answer=record.true_answer, shared_steps=shared, wrong_steps=wrong_steps,
                tree_value=record.tree.value, text=render_single_turn(list(steps), answer)))
    return chains


# ------------------------------------------------------------------------------------------- outputs

def _sharegpt(chain: Chain, turns: list[dict], images: list[str], mode: str) -> dict:
    user = {"role": "user", "content": IMAGE_TOKEN * len(chain.images) + chain.question}
    return {"id": chain.id, "messages": [{"role": "system", "content": system_prompt(chain.task, mode)}, user, *turns],
            "images": images, "gt_answer": chain.gt_answer, "task": chain.task,
            "metadata": {"sample_id": chain.sample_id, "kind": chain.kind, "split": chain.split,
                         "source": chain.source}}


def to_sharegpt(chain: Chain) -> dict:
    """Single-turn LLaMA-Factory sharegpt record with the grounded system prompt (the RL prompt)."""
    return _sharegpt(chain, [{"role": "assistant", "content": chain.text}], list(chain.images), "grounded")


def _save_png(image: Image.Image, folder: Path) -> str:
    """Content-addressed PNG (a crop shared by chains of one sample is written once); atomic rename."""
    digest = image_hash(image)[:24]
    path = (folder / f"{digest}.png").resolve()
    if not path.exists():
        with atomic_write(path, binary=True) as f:
            image.save(f, format="PNG")
    return str(path)


def to_multiturn(chains: Sequence[Chain], profile: ModelProfile, crop_dir: str | os.PathLike, *,
                 max_images: int = 5, image: Image.Image | None = None) -> list[dict]:
    """Multi-turn sharegpt records for the chains of ONE sample (`image`: its first image as given, else
    opened from the path). A chain naming a point outside the image is dropped (as the original did)."""
    if not chains:
        return []
    if len({c.sample_id for c in chains}) > 1:
        raise ValueError(f"to_multiturn takes the chains of one sample, got samples "
                         f"{sorted({c.sample_id for c in chains})[:5]}")
    if image is None:
        [image] = open_images(chains[0].images[:1])
    model_image, _ = resize_to_model(image, profile)
    settings = zoom_settings(chains[0].task, profile.name)
    out = []
    for chain in chains:
        env = ZoomEnv(model_image, settings, max_images=max_images)
        turns, images, pending, zoomed, inside = [], list(chain.images), [], set(), True
        for step in chain.steps:
            pending.append(step)
            new = [p for p in ((round(float(x)), round(float(y))) for x, y in POINT_RE.findall(step))
                   if p not in zoomed]
            if not new:
                continue
            crop = env.crop(*new[0])
            if crop.clamped:
                inside = False
                break
            zoomed.add(new[0])
            head, _, tail = env.observation_segments(crop)
            turns += [{"role": "assistant", "content": render_turn(" ".join(pending), tool_call=new[0])},
                      {"role": "user", "content": head + IMAGE_TOKEN + tail}]
            images.append(_save_png(crop.image, Path(crop_dir)))
            pending = []
            if env.needs_forced_final:  # as in RL: the budget is spent, the next turn must answer
                break
        if not inside:
            continue
        if pending and not env.needs_forced_final:
            final = render_turn(" ".join(pending), answer=chain.answer)
        else:
            final = f"{FORCED_FINAL_PREFIX} {chain.answer} </answer>"
        out.append(_sharegpt(chain, turns + [{"role": "assistant", "content": final}], images, "multiturn"))
    return out


def relative_images(images: Sequence[str], folder: str | os.PathLike) -> list[str]:
    """Absolute image paths made relative to `folder` (a relative one is kept): a chain file's images then
    resolve against the file's folder, as the loaders (and LLaMA-Factory's dataset_dir) read them, so the
    folder can move to another machine together with its images."""
    base = Path(folder).resolve()
    return [os.path.relpath(Path(p).resolve(), base) if os.path.isabs(p) else p for p in images]


def write_json(records: Iterable[dict], path: str | os.PathLike) -> int:
    """Write a JSON array (what LLaMA-Factory's sharegpt loader takes) atomically, each record's `images`
    relative to the file's folder; returns the count."""
    path = Path(path)
    records = [{**r, "images": relative_images(r["images"], path.parent)} if "images" in r else r for r in records]
    with atomic_write(path) as f:
        json.dump(records, f, ensure_ascii=False, indent=1)
    return len(records)


# ----------------------------------------------------------------------------------------- statistics

def _depth(node: TreeNode) -> int:
    return 1 + max((_depth(c) for c in node.children), default=-1)


def _summary(values: Sequence[float], name: str) -> dict[str, float]:
    if not values:
        return {}
    return {f"{name}_mean": statistics.fmean(values), f"{name}_median": statistics.median(values),
            f"{name}_max": max(values)}


def tree_stats(records: Sequence[TreeRecord], correct_threshold: float = 1.0) -> dict:
    """Root-correctness ratio (trees whose root value is > 0, the original's definition), trees with a
    correct rollout, tree sizes and depths, rollout accuracy, search seconds, statuses."""
    n = len(records)
    rollouts = [r.reward for rec in records for node in rec.nodes() for r in node.rollouts]
    return {
        "trees": n, "status": dict(Counter(r.status for r in records)),
        "root_correct_ratio": sum(r.tree.value > 0 for r in records) / n if n else 0.0,
        "solved_ratio": sum(any(ro.reward >= correct_threshold for node in r.nodes() for ro in node.rollouts)
                            for r in records) / n if n else 0.0,
        "rollouts": len(rollouts),
        "rollout_accuracy": sum(x >= correct_threshold for x in rollouts) / len(rollouts) if rollouts else 0.0,
        **_summary([sum(1 for _ in r.nodes()) for r in records], "nodes"),
        **_summary([_depth(r.tree) for r in records], "depth"),
        **_summary([r.global_search_time for r in records], "seconds"),
    }


def chain_stats(chains: Sequence[Chain]) -> dict:
    """Chain counts by kind and split, chains per sample (samples with none are not seen here), steps."""
    per_sample = Counter(c.sample_id for c in chains)
    return {"chains": len(chains), "kind": dict(Counter(c.kind for c in chains)),
            "split": dict(Counter(c.split for c in chains)), "samples_with_chains": len(per_sample),
            **_summary(list(per_sample.values()), "chains_per_sample"),
            **_summary([len(c.steps) for c in chains], "steps")}
