"""GRPO batches: which samples a step rolls out, and rollouts -> padded training micro-batches.

Pure (torch, numpy, PIL; no Ray). jobs/grpo.py calls these from its Ray Train workers:

    indices = step_samples(len(samples), rollout_batch, seed, step)       # the prompts of step `step`
    plan = minibatch_plan([len(r.train_ids) for r in records], train_batch, micro_batch, world, seed, step)
    for minibatch in plan:                                                 # one optimizer step each
        for micro in minibatch[rank]:                                      # this rank's micro-batches
            batch = collate_rollouts([rollout_item(records[i], images[i], adv[i], ip) for i in micro], pad, img)

A rollout's labels are its `train_ids` where `loss_mask` is 1 (model-generated tokens only: prompts,
observations, forced prefixes and driver-appended EOS carry no loss) and IGNORE_INDEX elsewhere; its
pixel values come from its own images, in order (the original image, then each crop).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

from vigorl_core.records import RolloutRecord
from vigorl_core.train.sft_data import IGNORE_INDEX, collate


def step_samples(num_samples: int, batch: int, seed: int, step: int) -> list[int]:
    """Sample indices of step `step`: `batch` consecutive items of an endless stream of seeded epoch
    permutations, so step s is a pure function of (seed, s) (a resumed run repeats no prompt schedule) and
    any dataset size works (a dataset smaller than a batch repeats within it)."""
    if num_samples < 1 or batch < 1:
        raise ValueError(f"need at least one sample and a batch of at least 1, got {num_samples}, {batch}")
    out = []
    for position in range(step * batch, (step + 1) * batch):
        epoch, offset = divmod(position, num_samples)
        order = list(range(num_samples))
        random.Random(f"vigorl-grpo/{seed}/{epoch}").shuffle(order)
        out.append(order[offset])
    return out


def minibatch_plan(lengths: Sequence[int], train_batch: int, micro_batch: int, world: int, seed: int,
                   step: int) -> list[list[list[list[int]]]]:
    """Split a step's rollouts into optimizer steps: plan[m][rank] = that rank's micro-batches (lists of
    rollout indices) of mini-batch m. The rollouts are shuffled (seeded by step) into mini-batches of
    `train_batch`; each mini-batch is sorted by length and cut into world x accumulation micro-batches of
    `micro_batch`, micro-batch j going to rank j % world, so the ranks of one micro-step hold similar lengths."""
    n = len(lengths)
    if n % train_batch or train_batch % (micro_batch * world):
        raise ValueError(f"{n} rollouts per step must be a multiple of train_batch_size {train_batch}, itself a "
                         f"multiple of micro_batch_size x workers = {micro_batch} x {world}")
    order = list(range(n))
    random.Random(f"vigorl-grpo-minibatch/{seed}/{step}").shuffle(order)
    plan = []
    for start in range(0, n, train_batch):
        mini = sorted(order[start:start + train_batch], key=lambda i: (-lengths[i], i))
        chunks = [mini[i:i + micro_batch] for i in range(0, len(mini), micro_batch)]
        plan.append([chunks[rank::world] for rank in range(world)])
    return plan


def rollout_item(record: RolloutRecord, images: Sequence[Any], advantage: float, image_processor: Any) -> dict:
    """One rollout as tensors: input_ids, labels, engine_logprobs [L], advantage, and the pixel values of its
    images (model-frame PIL images in order; the processor does not resize them again)."""
    import torch

    ids = torch.tensor(record.train_ids, dtype=torch.long)
    mask = torch.tensor(record.loss_mask, dtype=torch.bool)
    if len(images) != len(record.images):
        raise ValueError(f"rollout {record.sample_id}#{record.group_index}: {len(images)} images for "
                         f"{len(record.images)} in the record")
    item = {"input_ids": ids, "labels": torch.where(mask, ids, IGNORE_INDEX),
            "engine_logprobs": torch.tensor(record.logprobs, dtype=torch.float32),
            "advantage": float(advantage), "untrusted": record.constrained_logprobs or not record.has_logprobs}
    if images:
        vision = image_processor(images=list(images), return_tensors="pt")
        item["pixel_values"], item["image_grid_thw"] = vision["pixel_values"], vision["image_grid_thw"]
    return item


def collate_rollouts(items: list[dict], pad_id: int, image_pad_id: int) -> dict:
    """A padded micro-batch (sft_data.collate's keys) plus advantages [B], engine_logprobs [B, L] and
    untrusted [B] (rollouts whose engine log-probs are not the policy's sampling log-probs: a grammar-constrained
    engine's, or zeros because the rollout did not ask for them)."""
    import torch

    batch = collate(items, pad_id, image_pad_id)
    width = batch["input_ids"].shape[1]
    engine = torch.zeros((len(items), width), dtype=torch.float32)
    for row, it in enumerate(items):
        engine[row, :len(it["engine_logprobs"])] = it["engine_logprobs"]
    batch["engine_logprobs"] = engine
    batch["advantages"] = torch.tensor([it["advantage"] for it in items], dtype=torch.float32)
    batch["untrusted"] = torch.tensor([it["untrusted"] for it in items], dtype=torch.bool)
    return batch


MODEL_INPUTS = ("input_ids", "attention_mask", "mm_token_type_ids", "pixel_values", "image_grid_thw", "position_ids")


def sequence_logprobs(model: Any, batch: dict):
    """Log-probs of the labelled tokens under `model`: (logprobs [B, K], mask [B, K], positions [K]) where
    positions are the columns whose NEXT token carries a label in some row (logits only there: prompt and
    image tokens are most of a sequence). logprobs[:, k] = log p(input_ids[:, positions[k] + 1])."""
    from vigorl_core.train.grpo import token_logprobs

    positions = batch["loss_positions"]  # sft_train.loss_positions of the labels, computed by collate
    inputs = {k: batch[k] for k in MODEL_INPUTS if k in batch}
    logits = model(**inputs, logits_to_keep=positions, use_cache=False).logits
    targets = batch["input_ids"][:, positions + 1]
    mask = batch["labels"][:, positions + 1] != IGNORE_INDEX
    return token_logprobs(logits, targets), mask, positions
