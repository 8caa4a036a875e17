"""Batch-level feature selection rules as pure tensor functions.

Every function here takes post-ReLU activations ``acts`` of shape ``[n_tokens, d_sae]``
(non-negative) and returns a tensor of the same shape in which the unselected entries
are zero. Selected entries are gathered from ``acts`` so gradients flow through them and
nothing else, as in SAELens's TopK and BatchTopK. Scores, pools and capacities are
computed without gradient.

Nothing in this module imports SAELens, so the rules can be tested and optimised alone.
"""

from __future__ import annotations

import math
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

    A flat top-k over ``n * d_sae`` entries costs several times more per entry than a
    per-row one, so on a 2-D ``acts`` this takes each row's ``c = 2 * ceil(budget / n)``
    largest entries as candidates and runs the global top-``budget`` over those. That
    is exact unless some row's smallest candidate is above the resulting threshold
    (the row may hide more winners). The search then also covers every entry of those
    rows at or above that threshold (a lower bound of the true one), or falls back to
    the flat top-k if that pool is large. The selected set can differ from a flat
    top-k's only among equal values.
    """
    flat = acts.flatten()
    budget = min(max(budget, 0), flat.numel())
    n_rows, n_cols = (acts.shape[0], acts.shape[-1]) if acts.dim() == 2 else (1, 0)
    n_candidates = 2 * -(-budget // max(n_rows, 1))
    with torch.no_grad():
        if acts.dim() != 2 or budget == 0 or 2 * n_candidates > n_cols:
            indices = torch.topk(flat, budget, sorted=False).indices
        else:
            cand_values, cand_cols = torch.topk(acts, n_candidates, dim=1, sorted=False)
            top = torch.topk(cand_values.flatten(), budget, sorted=False)
            threshold = top.values.min()
            rows = torch.arange(n_rows, device=acts.device)[:, None]
            cand_indices = rows * n_cols + cand_cols
            # A row's other entries are <= its smallest candidate, so only rows whose
            # smallest candidate is above the threshold can hide more winners.
            saturated = cand_values.amin(dim=1) > threshold
            if not bool(saturated.any()):  # host sync on accelerators
                indices = cand_indices.flatten()[top.indices]
            else:
                full_rows = saturated.nonzero().squeeze(1)
                sub_rows, cols = (acts[full_rows] >= threshold).nonzero().unbind(1)
                pool = torch.cat(
                    [
                        cand_indices[~saturated].flatten(),
                        full_rows[sub_rows] * n_cols + cols,
                    ]
                )
                if 2 * pool.numel() > flat.numel():
                    indices = torch.topk(flat, budget, sorted=False).indices
                else:
                    top = torch.topk(flat[pool], budget, sorted=False)
                    indices = pool[top.indices]
    # Gathered from acts, so gradients reach the selected entries only.
    return torch.zeros_like(flat).scatter_(0, indices, flat[indices]).view_as(acts)


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


# --- Feature Choice (Ayonrinde, arXiv 2411.02124): each feature picks its tokens ---

CapacitySchedule = Literal["zipf", "uniform", "zipf_fixed"]
CAPACITY_SCHEDULES: tuple[str, ...] = ("zipf", "uniform", "zipf_fixed")


@torch.no_grad()
def usage_ranks(usage: torch.Tensor) -> torch.Tensor:
    """1-based rank of each feature by ``usage`` ``[d_sae]``: the most used is rank 1.

    Ties (e.g. every feature at 0 before training) go to the lower feature index.
    """
    order = torch.sort(usage, descending=True, stable=True).indices
    ranks = torch.empty_like(order)
    ranks[order] = torch.arange(1, order.numel() + 1, device=order.device)
    return ranks


@torch.no_grad()
def zipf_capacity_fractions(
    ranks: torch.Tensor, k: float, alpha: float
) -> torch.Tensor:
    """Zipf capacities as fractions of the batch, ``k * r**-alpha / sum_r r**-alpha``.

    ``ranks`` holds each feature's 1-based rank (a permutation of ``1..d_sae``); the
    result is float64 and sums to ``k``, so feature j's nominal capacity in a batch of
    ``n`` tokens is ``fractions[j] * n``.
    """
    weights = ranks.to(torch.float64).pow(-alpha)
    return k * weights / weights.sum()


@torch.no_grad()
def uniform_capacity_fractions(
    d_sae: int, k: float, device: torch.device | str | None = None
) -> torch.Tensor:
    """Equal capacities, ``k / d_sae`` of the batch each (float64, summing to ``k``)."""
    return torch.full((d_sae,), k / d_sae, dtype=torch.float64, device=device)


def _capped_proportional(
    weights: torch.Tensor, n_tokens: int, budget: int
) -> torch.Tensor:
    """Real capacities ``clamp(s * weights, 1, n_tokens)`` summing to ``budget``.

    ``weights`` is float64, positive and sorted in descending order, with
    ``d_sae < budget < n_tokens * d_sae``. The sum ``g(s)`` is non-decreasing and
    piecewise linear in ``s``, with kinks where some ``s * w_j`` reaches 1 or
    ``n_tokens``; it is evaluated at every kink at once, and ``s`` is solved exactly on
    the linear piece that holds ``budget``. No loop over features, no host sync.
    """
    d_sae = weights.shape[0]
    ascending = weights.flip(0)
    prefix = torch.cat([weights.new_zeros(1), ascending.cumsum(0)])

    def pieces(scale: torch.Tensor) -> tuple[torch.Tensor, ...]:
        # floored: s*w <= 1 (capacity 1); capped: s*w >= n (capacity n); the rest
        # is proportional. n >= 2 here, so the two sets never overlap.
        n_floored = torch.searchsorted(ascending, 1 / scale, right=True)
        first_capped = torch.searchsorted(ascending, n_tokens / scale)
        n_capped = d_sae - first_capped
        proportional = prefix[first_capped] - prefix[n_floored]
        return n_floored, n_capped, proportional

    kinks = torch.cat([1 / weights, n_tokens / weights]).sort().values
    n_floored, n_capped, proportional = pieces(kinks)
    totals = n_floored + n_tokens * n_capped + kinks * proportional
    # g(first kink) = d_sae < budget <= g(last kink) = n * d_sae
    upper = (totals < budget).sum().clamp(1, kinks.numel() - 1)
    low, high = kinks[upper - 1], kinks[upper]
    n_floored, n_capped, proportional = pieces((low + high) / 2)
    scale = (budget - n_floored - n_tokens * n_capped) / proportional
    return (scale * weights).clamp(1, n_tokens)


def _largest_remainder(real: torch.Tensor, total: int) -> torch.Tensor:
    """Integers summing to ``total``: floors, plus one for the largest remainders.

    ``real`` is in priority order (ties in the remainder go to the earlier entry) and
    sums to ``total`` up to float error.
    """
    floors = real.floor()
    remainders = real - floors
    short = (total - floors.sum()).round().long()
    order = torch.sort(remainders, descending=True, stable=True).indices
    bump = torch.zeros_like(floors, dtype=torch.long)
    bump[order] = (torch.arange(real.numel(), device=real.device) < short).long()
    return floors.long() + bump


@torch.no_grad()
def capacities_for_batch(
    fractions: torch.Tensor, n_tokens: int, budget: int
) -> torch.Tensor:
    """Token capacities ``m_j`` (long ``[d_sae]``) for a batch of ``n_tokens`` tokens.

    ``fractions`` are the capacities as fractions of the batch (e.g. from
    :func:`zipf_capacity_fractions`); they set the proportions and the priority order
    (larger fraction first, then lower index). In the regular case
    ``d_sae <= budget <= n_tokens * d_sae``:

    - ``m_j = clamp(s * fractions_j * n_tokens, 1, n_tokens)`` with the scale ``s``
      that makes the real capacities sum to ``budget``: capacity above the batch
      size is handed down the ranks to the uncapped features in proportion to their
      fractions, and features below one token are raised to one at the others'
      expense (``s = budget / (k * n_tokens)`` when nothing is clamped);
    - rounded by largest remainder, so ``sum m_j == budget`` exactly and every
      ``1 <= m_j <= n_tokens``.

    Degenerate budgets: ``budget < d_sae`` gives one token to each of the ``budget``
    highest-priority features and 0 to the rest; ``budget >= n_tokens * d_sae`` gives
    every feature the whole batch; ``n_tokens == 0`` gives zeros.
    """
    d_sae = fractions.shape[0]
    device = fractions.device
    budget = max(0, min(int(budget), n_tokens * d_sae))
    weights = fractions.to(torch.float64)
    order = torch.sort(weights, descending=True, stable=True).indices
    capacities = torch.zeros(d_sae, dtype=torch.long, device=device)
    if budget <= d_sae:
        # exactly d_sae: one token each (the only way to give everyone >= 1)
        capacities[order[:budget]] = 1
        return capacities
    if budget == n_tokens * d_sae:  # includes n_tokens == 1
        return capacities.fill_(n_tokens)
    ordered = weights[order]
    # Relative to the largest, floored far from 0 so 1 / w and n / w stay finite.
    ordered = (ordered / ordered[0]).clamp_min(1e-200)
    real = _capped_proportional(ordered, n_tokens, budget)
    capacities[order] = _largest_remainder(real, budget)
    return capacities


def _ranked_entries(
    acts: torch.Tensor,
    capacities: torch.Tensor,
    columns: torch.Tensor | None,
    first_rank: int,
    depth: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat indices and values of ranks ``first_rank <= r < min(depth, m_j)``."""
    d_sae = acts.shape[1]
    if columns is None:
        columns = torch.arange(d_sae, device=acts.device)
    else:
        acts, capacities = acts.index_select(1, columns), capacities[columns]
    top = torch.topk(acts, depth, dim=0)
    rank = torch.arange(depth, device=acts.device)[:, None]
    keep = (rank >= first_rank) & (rank < capacities[None, :])
    flat = top.indices * d_sae + columns[None, :]
    return flat[first_rank:].flatten(), (top.values * keep)[first_rank:].flatten()


def feature_choice_select(acts: torch.Tensor, capacities: torch.Tensor) -> torch.Tensor:
    """Each feature j keeps its ``capacities[j]`` largest entries over the tokens.

    ``acts`` is ``[n_tokens, d_sae]`` (post-ReLU), ``capacities`` a long ``[d_sae]``.
    A selected entry that is 0 stays 0 (not active). Ties follow ``torch.topk``.

    One ``topk`` along the token axis (no transposed copy) takes every feature's
    first ``D`` ranks, with ``D`` the power of two at or above twice the mean
    capacity (at least 8); then a rank mask keeps ``rank < m_j``. A Zipf head of a
    few features can hold capacities up to the whole batch, so features deeper than
    ``D`` are handled in buckets of power-of-two depth, each a ``topk`` over its own
    columns only: at most ``log2(n_tokens)`` buckets, never a loop over features.
    Everything ends in one scatter, through which gradients reach the selected
    entries only.
    """
    n_tokens, d_sae = acts.shape
    if d_sae == 0 or n_tokens == 0:
        return torch.zeros_like(acts)
    capacities = capacities.clamp(0, n_tokens)
    # Host syncs: topk depths must be Python ints.
    depth = int(capacities.max())
    if depth == 0:
        return torch.zeros_like(acts)
    mean = float(capacities.sum()) / d_sae
    shallow = max(8, 1 << max(0, math.ceil(math.log2(max(2 * mean, 1.0)))))
    if depth <= 2 * shallow:
        shallow = depth
    parts = [_ranked_entries(acts, capacities, None, 0, shallow)]
    if depth > shallow:
        # bucket b holds capacities in (shallow * 2**(b-1), shallow * 2**b]
        levels = torch.ceil(torch.log2(capacities.double() / shallow)).long()
        deep = levels > 0
        for level in levels[deep].unique().tolist():
            columns = (levels == level).nonzero().squeeze(1)
            bucket_depth = min(n_tokens, shallow << level)
            parts.append(
                _ranked_entries(acts, capacities, columns, shallow, bucket_depth)
            )
    indices = torch.cat([part[0] for part in parts])
    values = torch.cat([part[1] for part in parts])
    out = torch.zeros_like(acts).flatten().scatter(0, indices, values)
    return out.view_as(acts)
