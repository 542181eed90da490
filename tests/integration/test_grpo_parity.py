"""The GRPO trainer's forward (vigorl_core.train.grpo_batch: rollout_item -> collate_rollouts -> sequence_logprobs,
exactly what jobs/grpo.py runs) reproduces the engine's log-probs on real rollouts (tiny model, fp32):
multi-turn conversations with at least two crops (against the engine's teacher-forced, unconstrained
log-probs: the planned turns' sampling log-probs are grammar-constrained and marked so) and single-turn
samples (against the log-probs returned with the sampled tokens)."""

from __future__ import annotations

import pytest

from vigorl_core.rollout.chat_tokens import ChatTokens
from vigorl_core.rollout.planned import PlannedTurnsEngine
from vigorl_core.rollout.driver import RolloutConfig, RolloutDriver
from vigorl_core.synthetic.tasks import generate

pytestmark = pytest.mark.slow

TOLERANCE = 2e-3  # the SFT/rollout parity tolerance (fp32 on both sides)


@pytest.fixture(scope="module")
def trainer_side(tiny_model_dir):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(tiny_model_dir).eval()
    return model, AutoProcessor.from_pretrained(tiny_model_dir), ChatTokens.from_pretrained(tiny_model_dir)


def _rollouts(vllm_engine, engine, chat, config, data):
    driver = RolloutDriver(engine, chat, config)
    prepared = [driver.prepare(sample, [image]) for sample, image in data]

    async def collect():
        return [r for group in [g async for g in driver.run(prepared)] for r in group]

    return vllm_engine.run(collect())


def _trainer_logprobs(trainer_side, rollouts):
    """Per rollout: {train_ids position: the trainer's log-prob of that token}, from one padded batch."""
    import torch

    from vigorl_core.train.grpo_batch import collate_rollouts, rollout_item, sequence_logprobs

    model, processor, chat = trainer_side
    items = [rollout_item(r.record, r.images, 0.0, processor.image_processor) for r in rollouts]
    batch = collate_rollouts(items, chat.tokenizer.pad_token_id, chat.image_pad_id)
    with torch.no_grad():
        logprobs, mask, positions = sequence_logprobs(model, batch)
    return [{int(p) + 1: float(logprobs[row, k]) for k, p in enumerate(positions) if mask[row, k]}
            for row in range(len(rollouts))]


def test_trainer_forward_matches_the_engine_on_multiturn_rollouts_with_crops(vllm_engine, trainer_side):
    _, _, chat = trainer_side
    engine = PlannedTurnsEngine(vllm_engine.engine, chat.tokenizer, min_zooms=2, max_zooms=3)
    # 160 tokens a turn: a planned zoom turn (up to 48 think characters and a tool call) always fits.
    config = RolloutConfig(mode="multiturn", group_size=2, max_tokens_per_turn=160)
    rollouts = _rollouts(vllm_engine, engine, chat, config, generate("visual_search", 2, seed=3))
    assert all(r.record.constrained_logprobs for r in rollouts)
    rollouts = [r for r in rollouts if len(r.images) >= 3]
    assert len(rollouts) >= 2, "conversations with two crops or more"
    trainer = _trainer_logprobs(trainer_side, rollouts)  # several conversations of different lengths, padded
    for rollout, mine in zip(rollouts, trainer):
        rec = rollout.record
        assert sorted(mine) == [i for i, m in enumerate(rec.loss_mask) if m]  # exactly the generated tokens
        _, engine_lp = vllm_engine.run(vllm_engine.engine.score(rec.engine_ids, rollout.images))
        assert max(abs(mine[i] - engine_lp[i]) for i in mine) < TOLERANCE


def test_trainer_forward_matches_the_sampled_logprobs_single_turn(vllm_engine, trainer_side):
    _, _, chat = trainer_side
    config = RolloutConfig(mode="grounded", group_size=3, max_tokens_per_turn=32, logprobs=True)
    rollouts = _rollouts(vllm_engine, vllm_engine.engine, chat, config, generate("grounding", 2, seed=5))
    assert not any(r.record.constrained_logprobs for r in rollouts)
    for rollout, mine in zip(rollouts, _trainer_logprobs(trainer_side, rollouts)):
        rec = rollout.record
        assert mine and max(abs(mine[i] - rec.logprobs[i]) for i in mine) < TOLERANCE
