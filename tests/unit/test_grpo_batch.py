"""vigorl_core.train.grpo_batch: the prompt schedule of a step (deterministic, epoch coverage, small datasets, bad
sizes), the mini/micro-batch plan (exact partition, equal accumulation per rank, length-sorted micro-steps,
errors), rollouts -> tensors (labels only on loss tokens, engine log-probs, image count check), collate, and
sequence_logprobs against a plain full forward of the tiny Qwen2.5-VL model."""

from __future__ import annotations

import itertools

import pytest
import torch
from PIL import Image

from vigorl_core.rollout.chat_tokens import ChatTokens
from vigorl_core.train.grpo_batch import collate_rollouts, minibatch_plan, rollout_item, sequence_logprobs, step_samples
from vigorl_core.records import RolloutRecord, Trace
from vigorl_core.train.sft_data import IGNORE_INDEX


@pytest.fixture(scope="module")
def chat(tiny_model_dir) -> ChatTokens:
    return ChatTokens.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def image_processor(tiny_model_dir):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(tiny_model_dir).image_processor


def _record(sample_id: str, prompt: list[int], response: list[int], images: list[Image.Image], chat: ChatTokens,
            group_index: int = 0, constrained: bool = False) -> RolloutRecord:
    """A rollout: `prompt` ids (each image's pads inserted in front), then `response` ids with loss and a
    distinct engine log-prob per generated token (-0.01 * (k + 1)), 0 / 0.0 elsewhere."""
    pads = [chat.image_pad_id] * sum(chat.image_tokens(im) for im in images)
    head = pads + prompt
    train_ids = head + response
    return RolloutRecord(
        sample_id=sample_id, group_index=group_index, task="visual_search", mode="single_turn",
        engine_ids=[chat.image_pad_id] * len(images) + prompt + response, train_ids=train_ids,
        loss_mask=[0] * len(head) + [1] * len(response),
        logprobs=[0.0] * len(head) + [-0.01 * (k + 1) for k in range(len(response))],
        prompt_len=len(head), images=[f"hash-{sample_id}-{k}" for k in range(len(images))],
        image_tokens=[chat.image_tokens(im) for im in images], text="", trace=Trace(), finish="answer",
        num_turns=1, policy_versions=[0], constrained_logprobs=constrained)


# ---------------------------------------------------------------- step_samples


def test_step_samples_is_a_pure_function_of_seed_and_step():
    """Same (seed, step) -> same indices; another step or another seed -> a different schedule."""
    assert step_samples(50, 8, seed=3, step=4) == step_samples(50, 8, seed=3, step=4)
    assert step_samples(50, 8, seed=3, step=4) != step_samples(50, 8, seed=3, step=5)
    assert step_samples(50, 8, seed=3, step=0) != step_samples(50, 8, seed=4, step=0)


def test_step_samples_cover_each_sample_once_per_epoch():
    """With a batch dividing the dataset, the steps of each epoch are a permutation of the samples, and two
    epochs use different orders."""
    n, batch = 24, 6
    for epoch in range(3):
        steps = range(epoch * n // batch, (epoch + 1) * n // batch)
        seen = [i for s in steps for i in step_samples(n, batch, seed=0, step=s)]
        assert sorted(seen) == list(range(n)), epoch
    first = [i for s in range(4) for i in step_samples(n, batch, 0, s)]
    second = [i for s in range(4, 8) for i in step_samples(n, batch, 0, s)]
    assert first != second


def test_step_samples_with_a_dataset_smaller_than_a_batch():
    """3 samples, batch 7: every index is valid, each sample appears 2 or 3 times, and the first 3 positions
    (one epoch) are a permutation."""
    out = step_samples(3, 7, seed=1, step=0)
    assert len(out) == 7 and set(out) == {0, 1, 2}
    assert sorted(out[:3]) == [0, 1, 2]
    assert all(out.count(i) in (2, 3) for i in range(3))
    assert step_samples(1, 4, seed=0, step=9) == [0, 0, 0, 0]


@pytest.mark.parametrize("num_samples, batch", [(0, 4), (5, 0), (-1, 2), (4, -3)])
def test_step_samples_rejects_bad_sizes(num_samples, batch):
    with pytest.raises(ValueError, match="at least"):
        step_samples(num_samples, batch, seed=0, step=0)


# ---------------------------------------------------------------- minibatch_plan


def _flat(plan) -> list[int]:
    return [i for mini in plan for rank in mini for micro in rank for i in micro]


@pytest.mark.parametrize("n, train_batch, micro_batch, world", [(16, 8, 2, 2), (24, 12, 1, 3), (8, 8, 4, 1),
                                                                 (12, 4, 2, 2)])
def test_minibatch_plan_partitions_every_rollout_once(n, train_batch, micro_batch, world):
    """Every index appears exactly once; n / train_batch mini-batches of train_batch items each; every rank
    holds accumulation = train_batch / (micro_batch x world) micro-batches of micro_batch items."""
    lengths = [(7 * i) % 13 + 1 for i in range(n)]
    plan = minibatch_plan(lengths, train_batch, micro_batch, world, seed=0, step=3)
    assert sorted(_flat(plan)) == list(range(n))
    assert len(plan) == n // train_batch
    accumulation = train_batch // (micro_batch * world)
    for mini in plan:
        assert len(mini) == world
        assert sum(len(micro) for rank in mini for micro in rank) == train_batch
        assert [len(rank) for rank in mini] == [accumulation] * world
        assert all(len(micro) == micro_batch for rank in mini for micro in rank)


def test_minibatch_plan_is_seeded_by_step():
    """Same step -> same plan; another step -> the rollouts land in different mini-batches."""
    lengths = list(range(1, 33))
    a = minibatch_plan(lengths, 8, 2, 2, seed=0, step=1)
    assert a == minibatch_plan(lengths, 8, 2, 2, seed=0, step=1)
    b = minibatch_plan(lengths, 8, 2, 2, seed=0, step=2)
    assert [sorted(_flat([m])) for m in a] != [sorted(_flat([m])) for m in b]


def test_minibatch_plan_micro_steps_hold_similar_lengths():
    """Within a mini-batch, micro-step k's micro-batches (one per rank) are all at least as long as those of
    micro-step k + 1: lengths are sorted descending across micro-steps, so ranks synced together pad little."""
    lengths = [(37 * i) % 101 for i in range(32)]  # distinct lengths
    for mini in minibatch_plan(lengths, 16, 2, 2, seed=5, step=0):
        steps = [[i for rank in mini for i in rank[k]] for k in range(len(mini[0]))]
        for longer, shorter in itertools.pairwise(steps):
            assert min(lengths[i] for i in longer) >= max(lengths[i] for i in shorter)


@pytest.mark.parametrize("n, train_batch, micro_batch, world", [(10, 4, 1, 1), (8, 8, 3, 1), (8, 4, 2, 4)])
def test_minibatch_plan_rejects_sizes_that_do_not_divide(n, train_batch, micro_batch, world):
    with pytest.raises(ValueError, match="train_batch_size"):
        minibatch_plan([1] * n, train_batch, micro_batch, world, seed=0, step=0)


# ---------------------------------------------------------------- rollout_item / collate_rollouts


def test_rollout_item_labels_only_loss_tokens(chat, image_processor):
    """labels == train_ids where loss_mask is 1 (including a 0 gap inside the response, as an observation
    would make) and IGNORE_INDEX elsewhere; engine_logprobs align with train_ids; pixel values per image."""
    image = Image.new("RGB", (112, 112), (90, 30, 200))
    record = _record("s1", [5, 6, 7], [40, 41, 42, 43], [image], chat, constrained=True)
    gap = record.prompt_len + 1
    record.loss_mask[gap] = 0  # e.g. an observation token between two turns
    item = rollout_item(record, [image], advantage=0.5, image_processor=image_processor)
    mask = torch.tensor(record.loss_mask, dtype=torch.bool)
    ids = torch.tensor(record.train_ids)
    assert item["input_ids"].tolist() == record.train_ids
    assert torch.equal(item["labels"][mask], ids[mask])
    assert (item["labels"][~mask] == IGNORE_INDEX).all() and item["labels"][gap] == IGNORE_INDEX
    assert item["engine_logprobs"].dtype == torch.float32
    assert item["engine_logprobs"].tolist() == pytest.approx(record.logprobs)
    assert item["advantage"] == 0.5 and item["untrusted"] is True
    assert item["image_grid_thw"].shape == (1, 3)
    merge = image_processor.merge_size ** 2
    assert int(item["image_grid_thw"].prod()) // merge == record.image_tokens[0]
    assert item["pixel_values"].shape[0] == int(item["image_grid_thw"].prod())


def test_rollout_item_rejects_wrong_image_count(chat, image_processor):
    image = Image.new("RGB", (112, 112))
    record = _record("sample-7", [5], [6], [image, image], chat, group_index=3)
    with pytest.raises(ValueError, match="sample-7#3: 1 images for 2"):
        rollout_item(record, [image], 1.0, image_processor)


def test_rollout_item_without_images_has_no_pixels(chat, image_processor):
    item = rollout_item(_record("t", [5, 6], [7], [], chat), [], -1.0, image_processor)
    assert "pixel_values" not in item and item["labels"].tolist() == [IGNORE_INDEX, IGNORE_INDEX, 7]


def test_collate_rollouts_pads_and_stacks(chat, image_processor):
    """Two rollouts of different lengths (one with two images, one without): right padding, engine log-probs
    [B, L] zero on padding, advantages and untrusted [B], mm_token_type_ids 1 exactly on image pads,
    pixel values of all images in order."""
    a_images = [Image.new("RGB", (112, 112), (255, 0, 0)), Image.new("RGB", (56, 112), (0, 255, 0))]
    a = _record("a", [5, 6], [30, 31, 32], a_images, chat)
    b = _record("b", [8], [33, 34], [], chat, constrained=True)
    items = [rollout_item(a, a_images, 1.5, image_processor), rollout_item(b, [], -0.5, image_processor)]
    pad = 0
    batch = collate_rollouts(items, pad_id=pad, image_pad_id=chat.image_pad_id)
    la, lb = len(a.train_ids), len(b.train_ids)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["engine_logprobs"].shape == (2, la)
    assert batch["input_ids"][1, lb:].eq(pad).all() and batch["labels"][1, lb:].eq(IGNORE_INDEX).all()
    assert batch["attention_mask"].sum(1).tolist() == [la, lb]
    assert batch["engine_logprobs"][0].tolist() == pytest.approx(a.logprobs)
    assert batch["engine_logprobs"][1, :lb].tolist() == pytest.approx(b.logprobs)
    assert batch["engine_logprobs"][1, lb:].eq(0).all()
    assert batch["advantages"].tolist() == [1.5, -0.5] and batch["advantages"].dtype == torch.float32
    assert batch["untrusted"].tolist() == [False, True]
    assert batch["mm_token_type_ids"][0].sum() == sum(a.image_tokens)
    assert torch.equal(batch["mm_token_type_ids"].bool(), batch["input_ids"] == chat.image_pad_id)
    assert batch["image_grid_thw"].tolist() == [[1, 8, 8], [1, 8, 4]]  # 112x112 then 56x112, 14-px patches
    assert torch.equal(batch["pixel_values"], items[0]["pixel_values"])


# ---------------------------------------------------------------- sequence_logprobs


def test_sequence_logprobs_match_a_full_forward_and_ignore_padding(tiny_model_dir, chat, image_processor):
    """On a batch of two rollouts of different lengths with an image each, the log-probs at masked positions
    equal log_softmax of a plain full forward (all logits) within 1e-5, the mask is the next token's label,
    and the shorter row's values equal those of a batch of that rollout alone (padding changes nothing)."""
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    im_a, im_b = Image.new("RGB", (112, 112), (10, 120, 240)), Image.new("RGB", (112, 84), (240, 20, 20))
    a = _record("a", [11, 12, 13], [50, 51, 52, 53, 54, 55], [im_a], chat)
    b = _record("b", [14, 15], [60, 61, 62], [im_b], chat)
    items = [rollout_item(a, [im_a], 1.0, image_processor), rollout_item(b, [im_b], -1.0, image_processor)]
    batch = collate_rollouts(items, pad_id=0, image_pad_id=chat.image_pad_id)
    with torch.no_grad():
        logprobs, mask, positions = sequence_logprobs(model, batch)
        full = model(**{k: batch[k] for k in ("input_ids", "attention_mask", "mm_token_type_ids", "pixel_values",
                                              "image_grid_thw")}, use_cache=False).logits
    assert logprobs.shape == mask.shape == (2, len(positions))
    assert torch.equal(mask, batch["labels"][:, positions + 1] != IGNORE_INDEX)
    assert mask.sum().item() == 6 + 3
    expected = torch.log_softmax(full.float(), -1)[:, positions].gather(
        -1, batch["input_ids"][:, positions + 1].unsqueeze(-1)).squeeze(-1)
    assert torch.allclose(logprobs[mask], expected[mask], atol=1e-5)

    alone = collate_rollouts(items[1:], pad_id=0, image_pad_id=chat.image_pad_id)
    with torch.no_grad():
        alone_lp, alone_mask, alone_pos = sequence_logprobs(model, alone)
    by_position = dict(zip(positions[mask[1]].tolist(), logprobs[1][mask[1]].tolist()))
    alone_by_position = dict(zip(alone_pos[alone_mask[0]].tolist(), alone_lp[0][alone_mask[0]].tolist()))
    assert by_position.keys() == alone_by_position.keys() and len(by_position) == 3
    assert list(by_position.values()) == pytest.approx(list(alone_by_position.values()), abs=1e-5)


def test_a_rollout_without_engine_logprobs_is_untrusted(chat, image_processor):
    record = _record("n", [5], [6, 7], [], chat)
    assert rollout_item(record, [], 1.0, image_processor)["untrusted"] is False
    record.has_logprobs = False
    assert rollout_item(record, [], 1.0, image_processor)["untrusted"] is True
