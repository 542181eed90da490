"""GRPO math as small pure torch functions: group advantages, the clipped policy loss, the k3 KL, aggregation.

The trainer computes per-token log-probs of the sampled responses with `token_logprobs`, the advantages once per
rollout batch with `group_advantages`, and calls `grpo_loss` per micro-batch:

    adv = group_advantages(rewards, group_ids)                         # [N], one per response
    lp = token_logprobs(model(input_ids).logits[:, -K-1:-1], targets)  # [B, K]
    loss, stats = grpo_loss(lp, old_lp, ref_lp, adv[rows], mask, normalizer=global_token_count)
    loss.backward()

The formulas follow verl's `core_algos` (as EasyR1, which the original ViGoRL code forks): the dual-clip PPO
objective, the KL to the reference policy as a loss term (not a reward penalty) with the "low_var_kl" (k3)
estimator. Differences: a group of one response gets advantage 0 (verl passes its raw reward through), and
`aggregate` takes a `normalizer` so a data-parallel trainer can pass the global denominator of the mini-batch;
summing the micro-batch losses then gives exactly the full-batch loss.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import torch
from torch import Tensor

AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "constant")


def group_advantages(rewards: Tensor, group_ids: Sequence[Hashable], eps: float = 1e-6) -> Tensor:
    """Outcome advantages `(R - mean_group) / (std_group + eps)` per response, float32 [N].

    rewards: [N]; group_ids: N hashable ids (responses to the same prompt share one; order is free).
    std is the unbiased one (torch.std, as verl). A group of one member has no baseline, so it gets 0;
    a group whose rewards are all equal gets 0 too (0 / eps), never NaN.
    """
    rewards = rewards.detach().float()
    if rewards.dim() != 1 or rewards.numel() != len(group_ids):
        raise ValueError(f"rewards must be 1-D with one entry per group id; got shape {tuple(rewards.shape)} "
                         f"and {len(group_ids)} group ids")
    members: dict[Hashable, list[int]] = {}
    for i, gid in enumerate(group_ids):
        members.setdefault(gid, []).append(i)
    advantages = torch.zeros_like(rewards)
    for rows in members.values():
        if len(rows) > 1:
            r = rewards[rows]
            advantages[rows] = (r - r.mean()) / (r.std() + eps)
    return advantages


def masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean of `values` over the positions where `mask` is set (0-d); 0 when nothing is masked in.

    `torch.where` rather than `values * mask`, so extreme (or inf) values in padding cannot leak in as NaN.
    """
    mask = mask.bool()
    return torch.where(mask, values, 0.0).sum() / mask.sum().clamp(min=1)


def aggregate(token_values: Tensor, mask: Tensor, mode: str = "token_mean", normalizer: float | None = None) -> Tensor:
    """Reduce per-token values [B, T] over `mask` [B, T] to a 0-d loss.

    - "token_mean": sum / (normalizer or number of masked tokens); verl's default. A data-parallel trainer
      passes the mini-batch's GLOBAL token count so the micro-batch losses sum to the global token mean.
    - "seq_mean_token_mean": each sequence's token mean, summed / (normalizer or number of non-empty sequences).
    - "constant" (Dr. GRPO): sum / normalizer, normalizer required (e.g. sequences x max response tokens).
      Per-trajectory normalisation under-weights long failed trajectories in multi-step GRPO (AsyncWebRL 2026).
    An empty mask gives 0, not NaN.
    """
    if mode not in AGGREGATIONS:
        raise ValueError(f"unknown aggregation {mode!r}; expected one of {AGGREGATIONS}")
    if token_values.shape != mask.shape or token_values.dim() != 2:
        raise ValueError(f"token_values and mask must both be [B, T]; got {tuple(token_values.shape)} "
                         f"and {tuple(mask.shape)}")
    if mode == "constant" and normalizer is None:
        raise ValueError("aggregation 'constant' needs a normalizer (e.g. number of sequences x max response tokens)")
    if normalizer is not None and normalizer < 0:
        raise ValueError(f"normalizer must be >= 0; got {normalizer}")
    mask = mask.bool()
    values = torch.where(mask, token_values, 0.0)
    if mode == "seq_mean_token_mean":
        counts = mask.sum(-1)
        total = (values.sum(-1) / counts.clamp(min=1)).sum()
        default = (counts > 0).sum().clamp(min=1)
    else:
        total = values.sum()
        default = mask.sum().clamp(min=1)
    # A zero normalizer means the whole (global) batch is empty, so `total` is 0 as well: divide by 1.
    return total / (default if normalizer is None else (float(normalizer) or 1.0))


def behaviour_weights(old_logprobs: Tensor, behaviour_logprobs: Tensor, mask: Tensor, cap: float = 2.0) -> Tensor:
    """Truncated importance weights min(pi_old / mu, cap) per token [B, T] (detached; 0 off the mask), for
    responses sampled by an OLDER policy mu (asynchronous GRPO: the engine's weights lag the trainer's).

    The decoupled PPO objective (Hilton et al. 2022, "Batch size-invariance for policy optimization", used
    by AReaL, Fu et al. 2025) clips the ratio pi / pi_old against the trainer's own recomputed "proximal"
    log-probs and corrects for the behaviour policy with pi_old / mu; truncating that weight at `cap` (verl's
    truncated importance sampling, cap 2) bounds the variance a very stale token can add.
    """
    log_w = (old_logprobs.detach() - behaviour_logprobs.detach()).clamp(-20.0, 20.0)
    return torch.where(mask.bool(), torch.exp(log_w).clamp(max=cap), 0.0)


def policy_loss(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, clip_low: float = 0.2,
                clip_high: float = 0.28, dual_clip: float = 3.0, aggregation: str = "token_mean",
                normalizer: float | None = None,
                token_weights: Tensor | None = None) -> tuple[Tensor, dict[str, float]]:
    """Dual-clip PPO policy loss (verl's compute_policy_loss) and its statistics.

    logprobs, old_logprobs, mask: [B, T]; advantages: [B], one per sequence, broadcast over its tokens.
    ratio is clipped to [1 - clip_low, 1 + clip_high] (the asymmetric DAPO "clip higher"); for negative
    advantages the loss is also capped at -A * dual_clip, so a huge ratio cannot blow up the update.
    Stats (python floats, masked token means): clip_fraction, dual_clip_fraction, ratio_mean, approx_kl
    (k1 estimate of KL(old || new), verl's ppo_kl).
    `token_weights` [B, T] (behaviour_weights) multiply each token's loss: the off-policy correction of
    asynchronous GRPO; None leaves the synchronous loss exactly as it is.
    """
    adv = advantages.detach().to(logprobs.dtype).unsqueeze(-1)  # [B, 1]
    log_ratio = (logprobs - old_logprobs.detach()).clamp(-20.0, 20.0)  # as verl: exp cannot overflow
    ratio = torch.exp(log_ratio)
    pg1 = -adv * ratio
    pg2 = -adv * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    clipped = torch.maximum(pg1, pg2)
    pg3 = -adv * dual_clip
    losses = torch.where(adv < 0, torch.minimum(pg3, clipped), clipped)
    if token_weights is not None:
        losses = losses * token_weights.detach()
    loss = aggregate(losses, mask, aggregation, normalizer)
    with torch.no_grad():
        stats = {
            "clip_fraction": masked_mean((pg2 > pg1).float(), mask).item(),
            "dual_clip_fraction": masked_mean(((clipped > pg3) & (adv < 0)).float(), mask).item(),
            "ratio_mean": masked_mean(ratio, mask).item(),
            "approx_kl": masked_mean(-log_ratio, mask).item(),
        }
    return loss, stats


def low_var_kl(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """k3 estimator of KL(new || ref) per token, [B, T] -> [B, T] (verl's kl_penalty "low_var_kl").

    kl = ref - lp; k3 = exp(kl) - kl - 1 >= 0, clamped to [-10, 10]; kl is clamped to [-20, 20] first
    so exp cannot overflow.
    """
    kl = (ref_logprobs.detach() - logprobs).clamp(-20.0, 20.0)
    return (torch.exp(kl) - kl - 1.0).clamp(-10.0, 10.0)


def grpo_loss(logprobs: Tensor, old_logprobs: Tensor, ref_logprobs: Tensor | None, advantages: Tensor, mask: Tensor,
              *, clip_low: float = 0.2, clip_high: float = 0.28, dual_clip: float = 3.0, kl_coef: float = 0.01,
              aggregation: str = "token_mean", normalizer: float | None = None,
              token_weights: Tensor | None = None) -> tuple[Tensor, dict[str, float]]:
    """Policy loss + kl_coef * aggregated k3 KL to the reference policy; returns (loss 0-d, stats).

    logprobs, old_logprobs, ref_logprobs, mask: [B, T]; advantages: [B]. The KL term is skipped when
    ref_logprobs is None or kl_coef == 0. Stats: policy_loss's, plus pg_loss, kl (masked token mean of the
    k3 KL, whatever the aggregation), entropy (masked mean of -logprobs of the SAMPLED tokens, the
    original's logged "entropy"; only an estimate and not in the loss) and loss.
    """
    pg_loss, stats = policy_loss(logprobs, old_logprobs, advantages, mask, clip_low, clip_high, dual_clip,
                                 aggregation, normalizer, token_weights)
    loss, kl = pg_loss, 0.0
    if ref_logprobs is not None:
        kl_tokens = low_var_kl(logprobs, ref_logprobs)
        if kl_coef != 0:
            loss = pg_loss + kl_coef * aggregate(kl_tokens, mask, aggregation, normalizer)
        kl = masked_mean(kl_tokens.detach(), mask).item()
    stats.update(pg_loss=pg_loss.item(), kl=kl, entropy=masked_mean(-logprobs.detach(), mask).item(),
                 loss=loss.item())
    return loss, stats


def token_logprobs(logits: Tensor, targets: Tensor) -> Tensor:
    """log softmax(logits)[target] in float32: logits [B, K, V], targets [B, K] (int64) -> [B, K].

    RAW log-probs: no temperature is applied, which matches what vLLM reports with
    logprobs_mode="raw_logprobs" when sampling at temperature 1. gather - logsumexp avoids materialising
    the full [B, K, V] log_softmax on top of the float32 copy of bf16 logits.
    """
    logits = logits.float()
    picked = torch.gather(logits, -1, targets.long().unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)
