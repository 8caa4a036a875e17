"""Batch-level feature selection rules as pure tensor functions.

Every function here takes post-ReLU activations ``acts`` of shape ``[n_tokens, d_sae]``
(non-negative) and returns a tensor of the same shape in which the unselected entries
are zero. Selected entries are gathered from ``acts`` so gradients flow through them and
nothing else, as in SAELens's TopK and BatchTopK. Scores, pools and capacities are
computed without gradient.

Nothing in this module imports SAELens, so the rules can be tested and optimised alone.
"""

from __future__ import annotations

from typing import Literal

import torch

ScoreName = Literal["l2", "squared_l2", "entropy", "uniform"]
PoolMode = Literal["sample", "top"]

SCORES: tuple[str, ...] = ("l2", "squared_l2", "entropy", "uniform")
POOL_MODES: tuple[str, ...] = ("sample", "top")

# Offset that puts every zero-score feature behind every positive-score one in the
# Gumbel keys: log-scores of positive float32/64 values lie within about +-750 and
# Gumbel noise within about [-4, 40], far inside this gap.
_ZERO_SCORE_KEY_OFFSET = 1e4


def batch_budget(k: float, n_tokens: int) -> int:
    """Number of entries a batch of ``n_tokens`` keeps: ``round(k * n_tokens)``."""
    return int(round(k * n_tokens))


def batch_topk(acts: torch.Tensor, budget: int) -> torch.Tensor:
    """Keep the ``budget`` largest entries of ``acts`` over the whole matrix.

    This is SAELens's ``BatchTopK`` selection with an explicit budget. Entries that are
    selected but zero stay zero, so the realised L0 can fall below the budget.
    """
    flat = acts.flatten()
    budget = min(max(budget, 0), flat.numel())
    top = torch.topk(flat, budget, dim=-1)
    return torch.zeros_like(flat).scatter(-1, top.indices, top.values).view_as(acts)


@torch.no_grad()
def feature_scores(acts: torch.Tensor, score: str) -> torch.Tensor:
    """Score each feature column of ``acts`` over the batch, shape ``[d_sae]``.

    - ``l2``: ``||acts[:, j]||_2``;
    - ``squared_l2``: ``||acts[:, j]||_2 ** 2``;
    - ``entropy``: Shannon entropy (nats) of the column normalised to sum 1 over
      tokens; an all-zero column scores 0. High entropy means the feature is spread
      over many tokens, which is what the pool keeps;
    - ``uniform``: every feature scores 1.
    """
    if score == "l2":
        return torch.linalg.vector_norm(acts, dim=0)
    if score == "squared_l2":
        return acts.square().sum(dim=0)
    if score == "entropy":
        totals = acts.sum(dim=0, keepdim=True)
        probs = acts / totals.clamp_min(torch.finfo(acts.dtype).tiny)
        return -torch.special.xlogy(probs, probs).sum(dim=0)
    if score == "uniform":
        return torch.ones(acts.shape[-1], dtype=acts.dtype, device=acts.device)
    raise ValueError(f"score must be one of {SCORES}, got {score!r}")


def pool_size(k: float, pool_factor: float, d_sae: int) -> int:
    """Pool size ``P = min(d_sae, round(k * pool_factor))``, at least 1."""
    return max(1, min(d_sae, int(round(k * pool_factor))))


@torch.no_grad()
def select_pool(
    scores: torch.Tensor,
    size: int,
    mode: str,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Indices of the ``size`` features that form the pool.

    ``mode="top"`` takes the best scores. ``mode="sample"`` draws without replacement
    with probability proportional to the score (Gumbel-top-k on the log score); features
    scoring 0 are drawn only once every positive-score feature is in the pool.
    """
    if mode == "top":
        return torch.topk(scores, size).indices
    if mode != "sample":
        raise ValueError(f"pool_mode must be one of {POOL_MODES}, got {mode!r}")
    # float64 keys keep the Gumbel noise resolvable next to the zero-score offset.
    uniform = torch.rand(
        scores.shape, generator=generator, device=scores.device, dtype=torch.float64
    )
    gumbel = -torch.log(-torch.log(uniform.clamp_min(1e-300)))
    scores64 = scores.to(torch.float64)
    positive = scores64 > 0
    log_scores = torch.where(
        positive,
        torch.log(torch.where(positive, scores64, 1.0)),
        -_ZERO_SCORE_KEY_OFFSET,
    )
    return torch.topk(log_scores + gumbel, size).indices


def sampled_topk(
    acts: torch.Tensor,
    k: float,
    pool_factor: float,
    score: str = "l2",
    pool_mode: str = "sample",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Sampled-SAE selection: a pool of features, then batch top-k inside the pool.

    The pool holds ``pool_size(k, pool_factor, d_sae)`` features chosen by
    :func:`select_pool` from :func:`feature_scores`; the batch keeps its
    ``batch_budget(k, n_tokens)`` largest entries among the pool columns (all of them
    if the pool holds fewer). A pool covering every feature is exactly
    :func:`batch_topk`.
    """
    n_tokens, d_sae = acts.shape
    budget = batch_budget(k, n_tokens)
    size = pool_size(k, pool_factor, d_sae)
    if size >= d_sae:
        return batch_topk(acts, budget)
    pool = select_pool(feature_scores(acts, score), size, pool_mode, generator)
    # Select within the pool columns only: [n_tokens, P] instead of [n_tokens, d_sae].
    pooled = batch_topk(acts.index_select(1, pool), budget)
    return torch.zeros_like(acts).index_copy(1, pool, pooled)


def seeded_generator(seed: int, step: int, device: torch.device) -> torch.Generator:
    """A generator whose stream depends only on ``(seed, step)``.

    Seeding from the step counter (a persistent buffer) makes pool sampling
    reproducible across save, load and resume without storing generator state.
    """
    generator = torch.Generator(device=device)
    generator.manual_seed((seed * 1_000_003 + step) % (2**63 - 1))
    return generator
