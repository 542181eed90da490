"""What a GRPO step logs, computed from its rollouts, the trainer's summed statistics and the replay buffer's
counters (pure; jobs/grpo.py calls these and writes metrics.jsonl; docs/grpo.md lists every key).

    record = {**train_metrics(sums), **rollout_metrics(groups, records, version), **buffer_metrics(before, now)}
"""

from __future__ import annotations

import statistics
from collections import Counter

# Loss statistics the trainer sums per micro-batch (weighted by its loss tokens), then all-reduces.
STAT_KEYS = ("loss", "pg_loss", "kl", "entropy", "clip_fraction", "dual_clip_fraction", "ratio_mean", "approx_kl")
# After them in the same vector: tokens, trusted tokens, engine/trainer gap, off-policy tokens, weight sum,
# capped weights (all sums), then the weight maximum (a maximum over micro-batches and ranks).
EXTRA_SUMS = 7


def add_micro_batch(sums, values: list[float], weight_max: float) -> None:
    """Add one micro-batch's statistics to the step's vector `sums` (a tensor of len(STAT_KEYS) + EXTRA_SUMS):
    `values` are every entry but the last, summed; `weight_max` raises the running weight maximum."""
    sums[:-1] += sums.new_tensor(values)
    sums[-1] = max(float(sums[-1]), weight_max)


def loss_normalizer(aggregation: str, members, max_response_tokens: int) -> float:
    """The global denominator of a mini-batch's loss (vigorl_core.train.grpo.aggregate) for its rollouts `members`."""
    if aggregation == "token_mean":
        return float(sum(sum(r.loss_mask) for r in members))
    if aggregation == "seq_mean_token_mean":
        return float(len(members))
    return float(len(members) * max_response_tokens)


def train_metrics(sums) -> dict:
    """Token-weighted means of the loss statistics; the importance weights of older rollouts' tokens (every
    value is a sum over micro-batches and ranks except the weight maximum, which is the maximum)."""
    values = sums.tolist()
    tokens, trusted, gap, stale, w_sum, capped, w_max = values[len(STAT_KEYS):]
    out = {k: v / max(tokens, 1.0) for k, v in zip(STAT_KEYS, values)}
    out["trained_tokens"] = int(tokens)
    out["logprob_mismatch"] = gap / trusted if trusted else None
    out["off_policy_tokens"] = int(stale)
    out["importance_weight_mean"] = w_sum / stale if stale else None
    out["importance_weight_max"] = w_max if stale else None
    out["importance_weight_capped"] = capped / stale if stale else None
    return out


def rollout_metrics(groups, records, trained_version: int) -> dict:
    """What the step's rollouts look like (all ranks hold the same records; rank 0 logs)."""
    rewards = [r.reward for r in records]
    zero_var = sum(len({r.reward for r in g.records}) == 1 for g in groups)
    staleness = [trained_version - min(r.policy_versions) for r in records]
    received = [g.received for g in groups]
    return {
        "groups": len(groups), "rollouts": len(records),
        "reward_mean": statistics.fmean(rewards), "reward_std": statistics.pstdev(rewards),
        "accuracy": statistics.fmean(r.reward_details.get("accuracy", 0.0) for r in records),
        # format_reward is the reward's format term (multi-turn: 1 + 0.2 per extra distinct zoom, so above 1);
        # format_rate is the share of rollouts that pass the format gate (term not 0).
        "format_reward": statistics.fmean(r.reward_details.get("format", 0.0) for r in records),
        "format_rate": statistics.fmean(r.reward_details.get("format", 0.0) > 0 for r in records),
        "response_tokens": statistics.fmean(len(r.train_ids) - r.prompt_len for r in records),
        "generated_tokens": statistics.fmean(sum(r.loss_mask) for r in records),
        "turns": statistics.fmean(r.num_turns for r in records),
        "zooms": statistics.fmean(len(r.images) - 1 for r in records),
        "finish": dict(Counter(r.finish for r in records)),
        "zero_variance_groups": zero_var / len(groups),
        "staleness_mean": statistics.fmean(staleness), "staleness_max": max(staleness),
        "staleness_histogram": {str(k): v for k, v in sorted(Counter(staleness).items())},
        "versions_per_rollout": statistics.fmean(len(set(r.policy_versions)) for r in records),
        "constrained_rollouts": sum(r.constrained_logprobs for r in records),
        "time/generate": max(received) - min(g.received - g.seconds for g in groups),
        "time/score": sum(r.timings.get("score_seconds", 0.0) for r in records),
    }


def buffer_metrics(before: dict, now: dict) -> dict:
    """What the replay buffer saw during the step: whether it restarted (a new process; its counters start
    again), groups dropped as too old, rolled out again, put after their step was gone, and how long
    generation sat idle."""
    restarted = now["pid"] != before["pid"]
    if restarted:
        before = {}
    return {"replay_restarts": int(restarted), "stale_dropped": now["stale"] - before.get("stale", 0),
            "rollout_retries": now["retried"] - before.get("retried", 0),
            "late_groups": now["late"] - before.get("late", 0),
            "time/generation_idle": now["idle_seconds"] - before.get("idle_seconds", 0.0)}
