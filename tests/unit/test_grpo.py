"""vigorl_core.train.grpo: hand-computed values, and gradients against an independent per-token loop implementation."""

from __future__ import annotations

import math

import pytest
import torch

from vigorl_core.train.grpo import (
    AGGREGATIONS,
    aggregate,
    group_advantages,
    grpo_loss,
    low_var_kl,
    masked_mean,
    policy_loss,
    token_logprobs,
)

# ---------------------------------------------------------------- advantages


def test_group_of_three_uses_unbiased_std():
    adv = group_advantages(torch.tensor([1.0, 0.0, 0.0]), ["p", "p", "p"], eps=0.0)
    std = math.sqrt(((2 / 3) ** 2 + 2 * (1 / 3) ** 2) / 2)  # divide by n - 1 = 2: sqrt(1/3)
    assert std == pytest.approx(math.sqrt(1 / 3))
    assert adv.dtype == torch.float32
    assert adv.tolist() == pytest.approx([(2 / 3) / std, (-1 / 3) / std, (-1 / 3) / std], rel=1e-6)


def test_interleaved_groups_single_member_and_zero_variance():
    rewards = torch.tensor([1, 5, 0, 7, 5, 0])  # ints on purpose: output is float32 anyway
    ids = ["a", "b", "a", "c", "b", "a"]
    adv = group_advantages(rewards, ids)
    std_a = math.sqrt(1 / 3)
    assert adv[[0, 2, 5]].tolist() == pytest.approx([(2 / 3) / (std_a + 1e-6), (-1 / 3) / (std_a + 1e-6),
                                                      (-1 / 3) / (std_a + 1e-6)], rel=1e-6)
    assert adv[3].item() == 0.0  # group "c" has one member: no baseline
    assert adv[[1, 4]].tolist() == [0.0, 0.0]  # group "b" has equal rewards: 0, not NaN
    assert adv.dtype == torch.float32


def test_group_ids_must_match_rewards():
    with pytest.raises(ValueError, match="group id"):
        group_advantages(torch.zeros(3), ["a", "b"])


# ---------------------------------------------------------------- policy loss

# Row 0 has A = +1, row 1 has A = -1; the last token of each row is padding (mask 0).
RATIOS = [[1.1, 1.5, 0.5, 1.0], [0.5, 10.0, 1.1, 1.0]]
MASK = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 0]], dtype=torch.bool)
ADV = torch.tensor([1.0, -1.0])


def ratio_batch(pad_lp: float = -1.0, pad_old: float = -1.0):
    old = torch.tensor([[-1.0, -2.0, -0.5, pad_old], [-3.0, -4.0, -1.5, pad_old]], dtype=torch.float64)
    lp = old + torch.log(torch.tensor(RATIOS, dtype=torch.float64))
    lp[:, 3] = pad_lp
    return lp, old


def test_policy_loss_by_hand():
    lp, old = ratio_batch()
    loss, stats = policy_loss(lp, old, ADV, MASK)
    # row 0 (A=+1): 1.1 inside -> -1.1; 1.5 > 1.28 -> clipped to -1.28; 0.5 < 0.8 but A > 0 -> pessimistic -0.5.
    # row 1 (A=-1): 0.5 < 0.8 -> clipped to 0.8; 10 -> max(10, 1.28) = 10, dual-clipped to 3; 1.1 inside -> 1.1.
    per_token = [-1.1, -1.28, -0.5, 0.8, 3.0, 1.1]
    assert loss.item() == pytest.approx(sum(per_token) / 6, rel=1e-9)
    assert stats["clip_fraction"] == pytest.approx(2 / 6)  # row 0 token 1, row 1 token 0
    assert stats["dual_clip_fraction"] == pytest.approx(1 / 6)
    assert stats["ratio_mean"] == pytest.approx((1.1 + 1.5 + 0.5 + 0.5 + 10.0 + 1.1) / 6)
    assert stats["approx_kl"] == pytest.approx(-sum(math.log(r) for r in RATIOS[0][:3] + RATIOS[1][:3]) / 6)
    assert all(isinstance(v, float) for v in stats.values())


def test_masked_tokens_do_not_matter():
    ref = torch.full((2, 4), -1.2, dtype=torch.float64)
    results = []
    for pad_lp, pad_old, pad_ref in [(-1.0, -1.0, -1.0), (1e4, -1e4, -1e4), (-1e4, 1e4, 1e4)]:
        lp, old = ratio_batch(pad_lp, pad_old)
        lp.requires_grad_(True)
        r = ref.clone()
        r[:, 3] = pad_ref
        loss, stats = grpo_loss(lp, old, r, ADV, MASK, kl_coef=0.1)
        loss.backward()
        results.append((loss.item(), stats, lp.grad[:, :3].clone()))
        assert torch.all(lp.grad[:, 3] == 0)
    for loss, stats, grad in results[1:]:
        assert loss == results[0][0]
        assert stats == results[0][1]
        assert torch.equal(grad, results[0][2])


# ---------------------------------------------------------------- KL


def test_low_var_kl_by_hand():
    lp = torch.tensor([[-1.0, -2.0, -0.5, -5.0, -1.0]])
    ref = torch.tensor([[-1.0, -1.0, -1.5, -1.0, -100.0]])
    got = low_var_kl(lp, ref)[0].tolist()
    # kl = ref - lp = [0, 1, -1, 4, -99]; k3 = e^kl - kl - 1; 4 -> 49.6 clamped to 10; -99 -> clamp(-20) -> 19.
    expected = [0.0, math.e - 2, math.exp(-1), 10.0, math.exp(-20) + 20 - 1]
    assert got[:4] == pytest.approx(expected[:4], rel=1e-6)
    assert got[4] == pytest.approx(10.0)  # 19 is clamped too
    assert expected[4] > 10


# ---------------------------------------------------------------- aggregation

VALUES = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
AGG_MASK = torch.tensor([[1, 1, 0], [1, 0, 0]])


def test_aggregation_modes_by_hand():
    assert aggregate(VALUES, AGG_MASK, "token_mean").item() == pytest.approx(7 / 3)
    assert aggregate(VALUES, AGG_MASK, "token_mean", normalizer=7).item() == pytest.approx(1.0)
    assert aggregate(VALUES, AGG_MASK, "seq_mean_token_mean").item() == pytest.approx((1.5 + 4.0) / 2)
    assert aggregate(VALUES, AGG_MASK, "seq_mean_token_mean", normalizer=4).item() == pytest.approx(5.5 / 4)
    assert aggregate(VALUES, AGG_MASK, "constant", normalizer=6).item() == pytest.approx(7 / 6)
    # a row with no tokens does not count as a sequence
    mask = torch.tensor([[1, 1, 0], [0, 0, 0]])
    assert aggregate(VALUES, mask, "seq_mean_token_mean").item() == pytest.approx(1.5)
    assert masked_mean(VALUES, AGG_MASK).item() == pytest.approx(7 / 3)


def test_empty_mask_gives_zero_not_nan():
    empty = torch.zeros(2, 3)
    for mode in AGGREGATIONS:
        assert aggregate(VALUES, empty, mode, normalizer=6 if mode == "constant" else None).item() == 0.0
        assert aggregate(VALUES, empty, mode, normalizer=0).item() == 0.0
    assert masked_mean(VALUES, empty).item() == 0.0
    loss, stats = grpo_loss(VALUES, VALUES, VALUES, torch.ones(2), empty)
    assert loss.item() == 0.0 and not any(math.isnan(v) for v in stats.values())


def test_aggregation_errors():
    with pytest.raises(ValueError, match="constant.*normalizer"):
        aggregate(VALUES, AGG_MASK, "constant")
    with pytest.raises(ValueError, match="seq_mean_token_mean"):
        aggregate(VALUES, AGG_MASK, "sum")
    with pytest.raises(ValueError, match=r"\[B, T\]"):
        aggregate(VALUES, AGG_MASK[0], "token_mean")


# ---------------------------------------------------------------- gradients against a loop implementation


def loop_grpo_loss(lp, old, ref, adv, mask, mode, normalizer, clip_low=0.2, clip_high=0.28, dual=3.0, kl_coef=0.05):
    """Per-token python loops with explicit branches; only scalar autograd ops on lp[b, t]."""
    B, T = lp.shape
    pg_rows, kl_rows = [], []
    for b in range(B):
        a = float(adv[b])
        pg_row, kl_row = [], []
        for t in range(T):
            if not mask[b, t]:
                continue
            ratio = torch.exp(lp[b, t] - float(old[b, t]))
            r = ratio.item()
            if r < 1 - clip_low or r > 1 + clip_high:  # outside the trust region: the ratio is a constant
                clipped_ratio = torch.tensor(1 - clip_low if r < 1 - clip_low else 1 + clip_high, dtype=lp.dtype)
            else:
                clipped_ratio = ratio
            pg = -a * ratio if -a * r >= -a * clipped_ratio.item() else -a * clipped_ratio
            if a < 0 and pg.item() > -a * dual:
                pg = torch.tensor(-a * dual, dtype=lp.dtype)
            kl = float(ref[b, t]) - lp[b, t]
            k3 = torch.exp(kl) - kl - 1
            if k3.item() > 10:
                k3 = torch.tensor(10.0, dtype=lp.dtype)
            pg_row.append(pg)
            kl_row.append(k3)
        pg_rows.append(pg_row)
        kl_rows.append(kl_row)

    def reduce(rows):
        if mode == "seq_mean_token_mean":
            means = [sum(row) / len(row) for row in rows if row]
            return sum(means) / (normalizer if normalizer is not None else len(means))
        total = sum(x for row in rows for x in row)
        return total / (normalizer if normalizer is not None else sum(len(row) for row in rows))

    return reduce(pg_rows) + kl_coef * reduce(kl_rows)


def random_batch(seed=0, B=4, T=6):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3 - 0.1
    # log ratios spread over [-2, 2]: inside the clip range, beyond both ends, and past the dual clip (ln 3)
    lp = old + (torch.rand(B, T, generator=g, dtype=torch.float64) * 4 - 2)
    ref = old + (torch.rand(B, T, generator=g, dtype=torch.float64) * 6 - 2)  # some k3 values clamp at 10
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    mask = torch.rand(B, T, generator=g) < 0.7
    mask[0, 0] = True
    mask[1] = False  # an empty row
    mask[2, :] = True
    return lp, old, ref, adv, mask


@pytest.mark.parametrize("mode,normalizer", [("token_mean", None), ("token_mean", 17.0),
                                             ("seq_mean_token_mean", None), ("seq_mean_token_mean", 5.0),
                                             ("constant", 24.0)])
@pytest.mark.parametrize("seed", [1, 4, 5])
def test_gradient_matches_loop_reference(mode, normalizer, seed):
    lp, old, ref, adv, mask = random_batch(seed)
    lp_a = lp.clone().requires_grad_(True)
    loss, stats = grpo_loss(lp_a, old, ref, adv, mask, kl_coef=0.05, aggregation=mode, normalizer=normalizer)
    loss.backward()
    # the batch reaches every branch: clip, dual clip, k3 clamp
    assert stats["clip_fraction"] > 0 and stats["dual_clip_fraction"] > 0 and (low_var_kl(lp, ref)[mask] == 10).any()
    lp_b = lp.clone().requires_grad_(True)
    expected = loop_grpo_loss(lp_b, old, ref, adv, mask, mode, normalizer)
    expected.backward()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-10)
    torch.testing.assert_close(lp_a.grad, lp_b.grad, rtol=1e-10, atol=1e-12)


def test_kl_term_skipped_without_ref_or_coef():
    lp, old, ref, adv, mask = random_batch()
    pg, _ = policy_loss(lp, old, adv, mask)
    no_ref, stats = grpo_loss(lp, old, None, adv, mask)
    no_coef, stats0 = grpo_loss(lp, old, ref, adv, mask, kl_coef=0.0)
    assert no_ref.item() == no_coef.item() == pg.item() == stats["pg_loss"] == stats["loss"]
    assert stats["kl"] == 0.0 and stats0["kl"] > 0  # kl is still logged when the coefficient is 0
    assert stats0["entropy"] == pytest.approx(masked_mean(-lp, mask).item())


# ---------------------------------------------------------------- micro-batches with a global normalizer


@pytest.mark.parametrize("mode", ["token_mean", "seq_mean_token_mean", "constant"])
def test_micro_batches_sum_to_full_batch(mode):
    lp, old, ref, adv, mask = random_batch(seed=3, B=6, T=5)
    if mode == "token_mean":
        normalizer = float(mask.sum())
    elif mode == "seq_mean_token_mean":
        normalizer = float((mask.sum(-1) > 0).sum())
    else:
        normalizer = float(mask.numel())
    full, _ = grpo_loss(lp, old, ref, adv, mask, aggregation=mode, normalizer=normalizer)
    if mode != "constant":
        default, _ = grpo_loss(lp, old, ref, adv, mask, aggregation=mode)
        assert full.item() == pytest.approx(default.item(), rel=1e-12)
    parts = [grpo_loss(lp[s], old[s], ref[s], adv[s], mask[s], aggregation=mode, normalizer=normalizer)[0]
             for s in (slice(0, 2), slice(2, 3), slice(3, 6))]
    assert sum(p.item() for p in parts) == pytest.approx(full.item(), rel=1e-12)


# ---------------------------------------------------------------- token log-probs


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_token_logprobs_matches_log_softmax(dtype):
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(2, 5, 11, generator=g) * 4).to(dtype)
    targets = torch.randint(0, 11, (2, 5), generator=g)
    got = token_logprobs(logits, targets)
    expected = torch.log_softmax(logits.float(), -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    assert got.dtype == torch.float32 and got.shape == (2, 5)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


def test_behaviour_weights_are_truncated_importance_ratios_off_the_mask_zero():
    from vigorl_core.train.grpo import behaviour_weights

    old = torch.tensor([[-1.0, -2.0, -0.5]])
    behaviour = torch.tensor([[-1.5, -1.0, -3.0]])
    mask = torch.tensor([[1, 1, 0]])
    w = behaviour_weights(old, behaviour, mask, cap=2.0)
    assert torch.allclose(w, torch.tensor([[math.exp(0.5), math.exp(-1.0), 0.0]]))
    assert behaviour_weights(old, behaviour - 5.0, torch.ones(1, 3), cap=2.0).max() == 2.0  # truncated


def test_token_weights_of_one_give_exactly_the_synchronous_loss_and_weights_scale_it():
    """k = 0: every rollout is fresh, so the asynchronous trainer passes weights of exactly 1 (or None):
    the loss and its gradient equal the synchronous ones bit for bit; other weights scale token losses."""
    torch.manual_seed(0)
    lp = torch.randn(3, 5, requires_grad=True)
    old, ref = lp.detach() + 0.1 * torch.randn(3, 5), lp.detach() + 0.1 * torch.randn(3, 5)
    adv, mask = torch.tensor([1.0, -0.5, 0.3]), torch.rand(3, 5) > 0.3
    sync, _ = grpo_loss(lp, old, ref, adv, mask)
    (g_sync,) = torch.autograd.grad(sync, lp)
    ones, _ = grpo_loss(lp, old, ref, adv, mask, token_weights=torch.ones(3, 5))
    (g_ones,) = torch.autograd.grad(ones, lp)
    assert torch.equal(sync, ones) and torch.equal(g_sync, g_ones)
    halves, _ = grpo_loss(lp, old, None, adv, mask, kl_coef=0.0, token_weights=torch.full((3, 5), 0.5))
    plain, _ = grpo_loss(lp, old, None, adv, mask, kl_coef=0.0)
    assert torch.allclose(halves, 0.5 * plain)
