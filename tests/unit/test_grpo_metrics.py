"""The GRPO step metrics (vigorl_core.train.grpo_metrics) on hand-made records and buffer counters."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from vigorl_core.train.grpo_metrics import (
    EXTRA_SUMS,
    STAT_KEYS,
    add_micro_batch,
    buffer_metrics,
    loss_normalizer,
    rollout_metrics,
    train_metrics,
)
from vigorl_core.records import RolloutRecord, Trace


def _record(reward: float, versions: list[int], generated: int = 3, crops: int = 0,
            fmt: float = 1.0) -> RolloutRecord:
    n = 2 + generated
    return RolloutRecord(sample_id="s", task="grounding", mode="grounded", engine_ids=[1] * n, train_ids=[1] * n,
                         loss_mask=[0, 0] + [1] * generated, logprobs=[0.0] * n, prompt_len=2,
                         images=["h"] * (1 + crops), image_tokens=[4] * (1 + crops), text="", trace=Trace(),
                         finish="answer", num_turns=len(versions), reward=reward,
                         reward_details={"accuracy": reward, "format": fmt}, policy_versions=versions)


def test_rollout_metrics_count_staleness_against_the_trained_version():
    flat = SimpleNamespace(records=[_record(0.5, [3]), _record(0.5, [3])], received=10.0, seconds=2.0)
    mixed = SimpleNamespace(records=[_record(1.0, [2, 3], crops=1), _record(0.0, [3])], received=11.0, seconds=4.0)
    records = flat.records + mixed.records
    m = rollout_metrics([flat, mixed], records, trained_version=3)
    assert (m["groups"], m["rollouts"]) == (2, 4)
    assert m["zero_variance_groups"] == 0.5  # the flat group teaches nothing
    assert m["staleness_histogram"] == {"0": 3, "1": 1} and m["staleness_max"] == 1
    assert m["versions_per_rollout"] == 1.25 and m["zooms"] == 0.25
    assert m["time/generate"] == pytest.approx(11.0 - 7.0)


def test_format_is_logged_as_a_reward_and_as_a_rate():
    """The multi-turn format term exceeds 1 (diversity bonus): its mean is `format_reward`, never a rate."""
    records = [_record(1.0, [1], fmt=1.4), _record(0.0, [1], fmt=0.0), _record(1.0, [1], fmt=1.2),
               _record(0.0, [1], fmt=0.0)]
    m = rollout_metrics([SimpleNamespace(records=records, received=1.0, seconds=1.0)], records, trained_version=1)
    assert m["format_reward"] == pytest.approx(0.65) and m["format_rate"] == 0.5 and "format" not in m


def test_train_metrics_weight_by_tokens_and_report_importance_weights():
    sums = torch.zeros(len(STAT_KEYS) + EXTRA_SUMS, dtype=torch.float64)
    sums[STAT_KEYS.index("kl")] = 0.5 * 10  # stat x tokens, summed
    sums[len(STAT_KEYS):] = torch.tensor([10.0, 8.0, 0.4, 4.0, 4.4, 1.0, 2.0])
    m = train_metrics(sums)
    assert m["kl"] == 0.5 and m["trained_tokens"] == 10
    assert m["logprob_mismatch"] == pytest.approx(0.05)
    assert m["importance_weight_mean"] == pytest.approx(1.1) and m["importance_weight_capped"] == 0.25
    none = train_metrics(torch.zeros(len(STAT_KEYS) + EXTRA_SUMS, dtype=torch.float64))
    assert none["importance_weight_mean"] is None and none["logprob_mismatch"] is None


def test_micro_batches_add_their_sums_and_keep_the_largest_importance_weight():
    sums = torch.zeros(len(STAT_KEYS) + EXTRA_SUMS, dtype=torch.float64)
    width = len(sums) - 1
    for weight_max in (1.2, 1.9, 1.1):  # three micro-batches of 2 off-policy tokens each
        values = [0.0] * width
        values[len(STAT_KEYS)] = values[len(STAT_KEYS) + 3] = 2.0  # tokens, off-policy tokens
        values[len(STAT_KEYS) + 4] = 2.2  # weight sum
        add_micro_batch(sums, values, weight_max)
    m = train_metrics(sums)
    assert m["trained_tokens"] == 6 and m["off_policy_tokens"] == 6
    assert m["importance_weight_mean"] == pytest.approx(1.1)
    assert m["importance_weight_max"] == 1.9  # the largest, not the sum of the micro-batches' maxima


def test_buffer_metrics_are_deltas_and_start_again_after_a_restart():
    before = {"pid": 1, "stale": 2, "retried": 1, "late": 0, "idle_seconds": 3.0}
    now = {"pid": 1, "stale": 5, "retried": 1, "late": 2, "idle_seconds": 4.5}
    assert buffer_metrics(before, now) == {"replay_restarts": 0, "stale_dropped": 3, "rollout_retries": 0,
                                           "late_groups": 2, "time/generation_idle": 1.5}
    restarted = {"pid": 9, "stale": 0, "retried": 0, "late": 1, "idle_seconds": 0.5}
    assert buffer_metrics(now, restarted)["replay_restarts"] == 1
    assert buffer_metrics(now, restarted)["late_groups"] == 1


def test_loss_normalizers():
    members = [_record(0.0, [0], generated=3), _record(0.0, [0], generated=5)]
    assert loss_normalizer("token_mean", members, 100) == 8.0
    assert loss_normalizer("seq_mean_token_mean", members, 100) == 2.0
    assert loss_normalizer("constant", members, 100) == 200.0
