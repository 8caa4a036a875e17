"""LocalBatch, one process's GlobalBatch: the local selection primitives."""

from __future__ import annotations

import torch

from sae_lens_sampled.global_batch import LocalBatch
from sae_lens_sampled.selection import pool_from_scores

ACTS = torch.tensor(
    [
        [3.0, 0.0, 1.0],
        [2.0, 5.0, 0.0],
        [0.5, 4.0, 6.0],
    ]
)


def test_batch_topk_keeps_the_largest_entries_of_the_batch():
    expected = torch.tensor([[0.0, 0.0, 0.0], [0.0, 5.0, 0.0], [0.0, 4.0, 6.0]])
    assert torch.equal(LocalBatch(3).batch_topk(ACTS, 3), expected)


def test_column_topk_keeps_each_features_top_tokens():
    capacities = torch.tensor([2, 1, 0])
    expected = torch.tensor([[3.0, 0.0, 0.0], [2.0, 5.0, 0.0], [0.0, 0.0, 0.0]])
    assert torch.equal(LocalBatch(3).column_topk(ACTS, capacities), expected)


def test_demand_counts_count_the_batch_topk_picks_per_feature():
    counts, n_tokens = LocalBatch(3).demand_counts(ACTS, k=1.0)  # budget 3
    assert counts.tolist() == [0, 2, 1] and n_tokens == 3


def test_reductions_over_one_process_are_the_values():
    batch = LocalBatch(3)
    counts, smallest = torch.tensor([1, 2]), torch.tensor([0.5, 0.25])
    assert batch.column_stats(counts, smallest, 3) == (counts, smallest, 3)
    summed = batch.sum_counts(counts)
    assert torch.equal(summed, counts) and summed is not counts
    flags = torch.tensor([True, False])
    assert torch.equal(batch.any_positive(flags), flags)
    assert batch.feature_scores(ACTS, "l2").tolist() == [
        torch.linalg.vector_norm(ACTS[:, j]).item() for j in range(3)
    ]


def test_draw_pool_is_pool_from_scores():
    scores = torch.tensor([1.0, 4.0, 2.0, 0.0], dtype=torch.float64)
    for seed in range(3):
        a = LocalBatch(3).draw_pool(
            scores, 2, "sample", torch.Generator().manual_seed(seed), beta=1.0
        )
        b = pool_from_scores(
            scores, 2, "sample", torch.Generator().manual_seed(seed), 1.0
        )
        assert torch.equal(a, b)
