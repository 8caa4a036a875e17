"""Pure selection rules on small hand-computed tensors."""

import math

import pytest
import torch

from sae_lens_sampled.selection import (
    batch_budget,
    batch_topk,
    feature_scores,
    pool_size,
    sampled_topk,
    seeded_generator,
    select_pool,
)

# 3 tokens x 3 features; feature 1 never fires.
ACTS = torch.tensor([[1.0, 0.0, 3.0], [2.0, 0.0, 4.0], [2.0, 0.0, 0.0]])


def test_batch_budget_rounds():
    assert batch_budget(2.0, 3) == 6
    assert batch_budget(1.5, 3) == 4  # 4.5 rounds to even
    assert batch_budget(0.4, 4) == 2  # 1.6 -> 2 (truncation would give 1)


def test_batch_topk_keeps_largest_entries_over_whole_matrix():
    out = batch_topk(ACTS, 3)
    expected = torch.tensor([[0.0, 0.0, 3.0], [0.0, 0.0, 4.0], [0.0, 0.0, 0.0]])
    # the third largest is a tie between two 2.0 entries: the first in row-major
    # order (token 1) is kept
    expected[1, 0] = 2.0
    assert torch.equal(out, expected)


def test_batch_topk_budget_larger_than_matrix_keeps_everything():
    assert torch.equal(batch_topk(ACTS, 100), ACTS)


def test_batch_topk_passes_gradient_only_to_selected_entries():
    acts = ACTS.clone().requires_grad_(True)
    batch_topk(acts, 2).sum().backward()
    expected = torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, 1.0], [0.0, 0.0, 0.0]])
    assert torch.equal(acts.grad, expected)


def test_scores_hand_computed():
    f64 = {"dtype": torch.float64}
    assert torch.allclose(
        feature_scores(ACTS, "l2"), torch.tensor([3.0, 0.0, 5.0], **f64)
    )
    assert torch.allclose(
        feature_scores(ACTS, "squared_l2"), torch.tensor([9.0, 0.0, 25.0], **f64)
    )
    h0 = -(0.2 * math.log(0.2) + 2 * 0.4 * math.log(0.4))
    h2 = -(3 / 7 * math.log(3 / 7) + 4 / 7 * math.log(4 / 7))
    assert torch.allclose(
        feature_scores(ACTS, "entropy"), torch.tensor([h0, 0.0, h2], **f64), atol=1e-6
    )
    assert torch.equal(feature_scores(ACTS, "uniform"), torch.ones(3, **f64))


def test_entropy_prefers_spread_over_spiky_features():
    spread = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 9.0]])
    scores = feature_scores(spread, "entropy")
    assert scores[0] == pytest.approx(math.log(3))
    assert scores[1] == 0.0  # a single-token feature carries no entropy


def test_unknown_score_and_mode_raise():
    with pytest.raises(ValueError, match="score must be one of"):
        feature_scores(ACTS, "l1")
    with pytest.raises(ValueError, match="pool_mode must be one of"):
        select_pool(torch.ones(3), 1, "best")


def test_pool_size():
    assert pool_size(k=4, pool_factor=1.5, d_sae=100) == 6
    assert pool_size(k=4, pool_factor=100, d_sae=100) == 100
    assert pool_size(k=0.2, pool_factor=1, d_sae=100) == 1


def test_top_pool_takes_best_scores():
    scores = torch.tensor([0.5, 3.0, 0.0, 2.0, 1.0])
    assert set(select_pool(scores, 2, "top").tolist()) == {1, 3}


def test_sampled_pool_puts_zero_scores_last():
    scores = torch.tensor([0.0, 1e-6, 0.0, 5.0, 0.0])
    for seed in range(20):
        pool = select_pool(scores, 2, "sample", torch.Generator().manual_seed(seed))
        assert set(pool.tolist()) == {1, 3}


def test_sampled_pool_frequencies_follow_scores():
    # Drawing one feature: P(j) = s_j / sum(s).
    scores = torch.tensor([1.0, 3.0])
    generator = torch.Generator().manual_seed(0)
    draws = [select_pool(scores, 1, "sample", generator).item() for _ in range(4000)]
    assert sum(draws) / len(draws) == pytest.approx(0.75, abs=0.03)


def test_l2_and_squared_l2_sample_differently_but_top_identically():
    acts = torch.rand(64, 200) ** 4
    top_l2 = select_pool(feature_scores(acts, "l2"), 20, "top")
    top_sq = select_pool(feature_scores(acts, "squared_l2"), 20, "top")
    assert torch.equal(top_l2.sort().values, top_sq.sort().values)
    draws_l2 = select_pool(
        feature_scores(acts, "l2"), 20, "sample", torch.Generator().manual_seed(1)
    )
    draws_sq = select_pool(
        feature_scores(acts, "squared_l2"),
        20,
        "sample",
        torch.Generator().manual_seed(1),
    )
    assert not torch.equal(draws_l2.sort().values, draws_sq.sort().values)


def test_sampled_topk_with_full_pool_is_batch_topk():
    acts = torch.rand(16, 32)
    for score in ("l2", "entropy", "uniform"):
        out = sampled_topk(acts, k=4, pool_factor=8, score=score)
        assert torch.equal(out, batch_topk(acts, 64))


def test_sampled_topk_pool_factor_one_top_uses_exactly_top_k_scored_features():
    acts = torch.rand(16, 32) * torch.linspace(0.1, 3.0, 32)
    out = sampled_topk(acts, k=3, pool_factor=1, score="l2", pool_mode="top")
    used = set((out != 0).any(dim=0).nonzero().flatten().tolist())
    best = set(torch.topk(acts.norm(dim=0), 3).indices.tolist())
    assert used == best
    # budget 48 = all 16 x 3 pool entries, all positive here
    assert (out != 0).sum() == 48
    assert torch.equal(out[:, sorted(best)], acts[:, sorted(best)])


def test_sampled_topk_stays_in_pool_and_keeps_largest_pool_entries():
    acts = torch.rand(8, 40)
    gen = torch.Generator().manual_seed(3)
    out = sampled_topk(acts, k=2, pool_factor=2, score="l2", generator=gen)
    used = (out != 0).any(dim=0)
    assert used.sum() <= 4
    assert (out != 0).sum() == 16
    # every kept entry is at least every dropped entry among the used columns
    kept = out[out != 0]
    dropped = acts[:, used][out[:, used] == 0]
    assert kept.min() >= dropped.max()


def test_sample_mode_reproducible_under_seed():
    acts = torch.rand(32, 64)
    runs = [
        sampled_topk(acts, 2, 3, generator=seeded_generator(7, step, acts.device))
        for step in (0, 0, 1)
    ]
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], runs[2])
