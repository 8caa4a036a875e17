"""Batch-level feature selection rules as pure tensor functions.

Every function here takes post-ReLU activations ``acts`` of shape ``[n_tokens, d_sae]``
(non-negative) and returns a tensor of the same shape in which the unselected entries
are zero. Selected entries are gathered from ``acts`` so gradients flow through them and
nothing else, as in SAELens's TopK and BatchTopK. Scores, pools and capacities are
computed without gradient.

Ties: every rule keeps the entries above its cut-off value, and of the entries equal to
the cut-off, the first ones in token order (row-major: lower token index first, then
lower feature index; within one feature column, lower token index first) until the
budget or capacity is met. The selection is therefore a function of the values alone,
the same on every device and on every path.

Nothing in this module imports SAELens, so the rules can be tested and optimised alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
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


def keep_top(
    acts: torch.Tensor, cutoffs: torch.Tensor, capacities: torch.Tensor
) -> torch.Tensor:
    """Keep, in each column j of ``acts`` ``[n, c]``, its ``capacities[j]`` largest
    positive entries, given ``cutoffs[j]``, the column's ``capacities[j]``-th largest
    value (``inf`` where the capacity is 0).

    Entries above the cut-off are kept; of those equal to it, the first ones along the
    column until the capacity is met (the module's tie rule). A column whose cut-off is
    not positive keeps all its positive entries (fewer than its capacity). Returns
    ``acts`` where kept and 0 elsewhere, so gradients reach the kept entries only.
    """
    with torch.no_grad():
        positive = torch.nextafter(acts.new_zeros(()), acts.new_ones(()))
        floor = torch.maximum(cutoffs, positive)
        keep = acts >= floor
        # Host sync: only a tie at some cut-off needs the ordered count below.
        if bool((keep.sum(dim=0) > capacities).any()):
            above = acts > floor
            at = (acts == floor) & (cutoffs > 0)
            room = capacities - above.sum(dim=0)
            order_dtype = torch.int32 if acts.shape[0] < 2**31 else torch.int64
            keep = above | (at & (at.cumsum(dim=0, dtype=order_dtype) <= room))
    return torch.where(keep, acts, acts.new_zeros(()))


@dataclass
class _TopSearch:
    """A search for the ``budget`` largest entries of ``acts``.

    ``searched`` holds the flat indices of the entries it looked at (``None``: all of
    them, in order) and ``values`` their values, ``top`` the positions among them of a
    top-``budget`` set and ``cutoff`` that set's smallest value. Every entry above the
    cut-off was searched; an unsearched entry equal to it can only sit in a row
    flagged in ``unsearched_rows`` (``None`` when every entry was searched).
    """

    searched: torch.Tensor | None
    values: torch.Tensor
    top: torch.Tensor
    cutoff: torch.Tensor
    unsearched_rows: torch.Tensor | None


@torch.no_grad()
def _search_top(acts: torch.Tensor, budget: int) -> _TopSearch:
    """Find the ``budget`` largest entries of ``acts`` (``0 < budget <= acts.numel()``).

    A flat top-k over ``n * d_sae`` entries costs several times more per entry than a
    per-row one, so on a 2-D ``acts`` this takes each row's ``c = 2 * ceil(budget / n)``
    largest entries as candidates and runs the global top-``budget`` over those. That
    is exact unless some row's smallest candidate is above the resulting cut-off (the
    row may hide more winners); the search then also covers every entry of those rows
    at or above that cut-off (a lower bound of the true one), or falls back to the flat
    top-k if that pool is large.
    """
    flat = acts.flatten()
    n_rows, n_cols = (acts.shape[0], acts.shape[-1]) if acts.dim() == 2 else (1, 0)
    n_candidates = 2 * -(-budget // max(n_rows, 1))

    def flat_search() -> _TopSearch:
        top = torch.topk(flat, budget, sorted=False)
        return _TopSearch(None, flat, top.indices, top.values.min(), None)

    if acts.dim() != 2 or 2 * n_candidates > n_cols:
        return flat_search()
    cand_values, cand_cols = torch.topk(acts, n_candidates, dim=1, sorted=False)
    top = torch.topk(cand_values.flatten(), budget, sorted=False)
    cutoff = top.values.min()
    rows = torch.arange(n_rows, device=acts.device)[:, None]
    cand_indices = (rows * n_cols + cand_cols).flatten()
    # A row's other entries are <= its smallest candidate, so only rows whose
    # smallest candidate is above the cut-off can hide larger entries, and only rows
    # whose smallest candidate equals it can hide equal ones.
    cand_min = cand_values.amin(dim=1)
    saturated = cand_min > cutoff
    if not bool(saturated.any()):  # host sync on accelerators
        return _TopSearch(
            cand_indices, cand_values.flatten(), top.indices, cutoff, cand_min == cutoff
        )
    full_rows = saturated.nonzero().squeeze(1)
    sub_rows, cols = (acts[full_rows] >= cutoff).nonzero().unbind(1)
    kept_rows = ~saturated[:, None].expand(n_rows, n_candidates).flatten()
    pool = torch.cat([cand_indices[kept_rows], full_rows[sub_rows] * n_cols + cols])
    if 2 * pool.numel() > flat.numel():
        return flat_search()
    values = flat[pool]
    top = torch.topk(values, budget, sorted=False)
    cutoff = top.values.min()
    # Saturated rows were searched down to a lower bound of the cut-off.
    return _TopSearch(
        pool, values, top.indices, cutoff, ~saturated & (cand_min == cutoff)
    )


def _searched_where(search: _TopSearch, mask: torch.Tensor) -> torch.Tensor:
    """Flat indices of the searched entries where ``mask`` (over ``search.values``)."""
    positions = mask.nonzero().squeeze(1)
    return positions if search.searched is None else search.searched[positions]


def _tie_rule_selection(
    acts: torch.Tensor, search: _TopSearch, budget: int
) -> torch.Tensor:
    """Flat indices of the top ``budget`` entries under the tie rule: those above the
    cut-off, then the entries equal to it in row-major order (host syncs)."""
    cutoff = search.cutoff
    above = _searched_where(search, search.values > cutoff)
    if not bool(cutoff > 0):
        return above  # fewer positive entries than the budget; zeros are not kept
    equal = [_searched_where(search, search.values == cutoff)]
    if search.unsearched_rows is not None:
        rows = search.unsearched_rows.nonzero().squeeze(1)
        sub_rows, cols = (acts[rows] == cutoff).nonzero().unbind(1)
        equal.append(rows[sub_rows] * acts.shape[-1] + cols)
    in_order = torch.cat(equal).unique()  # sorted, so in row-major order
    return torch.cat([above, in_order[: budget - above.numel()]])


def batch_topk(acts: torch.Tensor, budget: int) -> torch.Tensor:
    """Keep the ``budget`` largest entries of ``acts`` over the whole matrix.

    This is SAELens's ``BatchTopK`` selection with an explicit budget and a fixed tie
    rule: of the entries equal to the smallest kept value, the first in row-major order
    are kept. Entries that would be selected but are zero stay zero, so the realised
    L0 can fall below the budget. When no entry left out equals the cut-off (the
    common case), the top-``budget`` set is unique and comes straight from the search;
    otherwise the entries equal to the cut-off are found (in the searched set and in
    the few rows that can hide more) and taken in row-major order.
    """
    flat = acts.flatten()
    budget = min(max(budget, 0), flat.numel())
    indices = torch.zeros(0, dtype=torch.long, device=acts.device)
    if budget > 0:
        search = _search_top(acts, budget)
        indices = search.top if search.searched is None else search.searched[search.top]
        with torch.no_grad():
            equal = search.values == search.cutoff
            ties = equal.sum() > equal[search.top].sum()
            if search.unsearched_rows is not None:
                ties = ties | search.unsearched_rows.any()
        if bool(ties):  # host sync on accelerators
            indices = _tie_rule_selection(acts, search, budget)
    # Gathered from acts, so gradients reach the selected entries only.
    return torch.zeros_like(flat).scatter_(0, indices, flat[indices]).view_as(acts)


@torch.no_grad()
def feature_scores(acts: torch.Tensor, score: str) -> torch.Tensor:
    """Score each feature column of ``acts`` over the batch: float64 ``[d_sae]``.

    - ``l2``: ``||acts[:, j]||_2``;
    - ``squared_l2``: ``||acts[:, j]||_2 ** 2``;
    - ``entropy``: Shannon entropy (nats) of the column normalised to sum 1 over
      tokens; an all-zero column scores 0. High entropy means the feature is spread
      over many tokens, which is what the pool keeps;
    - ``uniform``: every feature scores 1.

    Computed in float32 at least and returned in float64: a float16 column's squared
    norm overflows float16 (above 65504) on ordinary activations, and a score of
    ``inf`` would make every draw the same. Each column is reduced as a contiguous
    row of a ``[d_sae, n_tokens]`` copy: a reduction along dim 0 can round identical
    columns differently (vector lanes and tail), which would break score ties.
    """
    if score not in SCORES:
        raise ValueError(f"score must be one of {SCORES}, got {score!r}")
    if score == "uniform":
        return torch.ones(acts.shape[-1], dtype=torch.float64, device=acts.device)
    wide = torch.promote_types(acts.dtype, torch.float32)
    columns = acts.new_empty(acts.t().shape, dtype=wide).copy_(acts.t())
    if score == "entropy":
        totals = columns.sum(dim=-1, keepdim=True)
        probs = columns / totals.clamp_min(torch.finfo(wide).tiny)
        return -torch.special.xlogy(probs, probs).sum(dim=-1).to(torch.float64)
    norms = torch.linalg.vector_norm(columns, dim=-1).to(torch.float64)
    return norms if score == "l2" else norms.square()


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

    ``mode="top"`` takes the best scores (of equal scores, the lower feature index).
    ``mode="sample"`` draws without replacement with probability proportional to the
    score (Gumbel-top-k on the log score); features scoring 0 are drawn only once every
    positive-score feature is in the pool. The indices come in ascending order, so the
    pool's columns keep the features' order.
    """
    if mode == "top":
        order = torch.sort(scores, descending=True, stable=True).indices
        return order[:size].sort().values
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
    return torch.topk(log_scores + gumbel, size).indices.sort().values


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
    if the pool holds fewer). The pool's columns keep the features' order, so ties
    follow the module's rule as if the other columns were zero. A pool covering every
    feature is exactly :func:`batch_topk`.
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


class _ColumnTop:
    """The first ``depth`` ranks of some columns of ``acts`` ``[n, d_sae]`` along the
    tokens (one sorted ``topk``), for capacities below ``depth`` (or equal to ``n``),
    so that the entry after each column's cut-off shows whether it ties with it."""

    def __init__(
        self,
        acts: torch.Tensor,
        capacities: torch.Tensor,
        columns: torch.Tensor | None,
        depth: int,
    ):
        n_tokens = acts.shape[0]
        if columns is not None:
            acts, capacities = acts.index_select(1, columns), capacities[columns]
        self.columns, self.capacities, self.n_tokens = columns, capacities, n_tokens
        self.top = torch.topk(acts, depth, dim=0)  # sorted
        with torch.no_grad():
            values = self.top.values.detach()
            self.cutoffs = values.gather(0, (capacities - 1).clamp(0, depth - 1)[None])[
                0
            ]
            after = values.gather(0, capacities.clamp(0, depth - 1)[None])[0]
            # ties among zeros do not matter: zeros are never active
            self.ties = (
                (capacities >= 1)
                & (capacities < min(depth, n_tokens))
                & (after == self.cutoffs)
                & (self.cutoffs > 0)
            )

    def put_ties_in_token_order(self) -> torch.Tensor:
        """Reorder the ranks by (value descending, token ascending), the tie rule.

        Returns, per column, whether entries equal to its cut-off may lie beyond the
        ranks taken (the last one taken equals the cut-off and tokens remain), where
        the reordering cannot settle the tie.
        """
        values, indices = self.top.values, self.top.indices
        by_token = indices.argsort(dim=0)
        values, indices = values.gather(0, by_token), indices.gather(0, by_token)
        by_value = values.detach().sort(dim=0, descending=True, stable=True).indices
        self.top = torch.return_types.topk(
            (values.gather(0, by_value), indices.gather(0, by_value))
        )
        window = values.shape[0]
        with torch.no_grad():
            last = self.top.values[-1].detach()
            return self.ties & (last == self.cutoffs) & (window < self.n_tokens)

    def kept_entries(
        self, d_sae: int, dropped: int, wanted: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Flat indices of ranks ``< m_j`` in the ``wanted`` (bool ``[d_sae]``)
        columns, the others sent to index ``dropped``; and their values."""
        indices, values = self.top.indices, self.top.values
        columns = (
            torch.arange(d_sae, device=indices.device)
            if self.columns is None
            else self.columns
        )
        rank = torch.arange(indices.shape[0], device=indices.device)[:, None]
        keep = (rank < self.capacities[None, :]) & wanted[columns][None, :]
        flat = torch.where(keep, indices * d_sae + columns[None, :], dropped)
        return flat.flatten(), values.flatten()


def feature_choice_select(acts: torch.Tensor, capacities: torch.Tensor) -> torch.Tensor:
    """Each feature j keeps its ``capacities[j]`` largest entries over the tokens.

    ``acts`` is ``[n_tokens, d_sae]`` (post-ReLU), ``capacities`` a long ``[d_sae]``.
    A selected entry that is 0 stays 0 (not active). Of tokens tied at a feature's
    cut-off, the lower token indices are kept.

    One ``topk`` along the token axis (no transposed copy) takes the first ``D`` ranks
    of every feature with a capacity below ``D``, the power of two at or above twice
    the mean capacity (at least 8). A Zipf head of a few features can hold capacities
    up to the whole batch, so deeper features are handled in buckets of power-of-two
    depth, each a ``topk`` over its own columns only: at most ``log2(n_tokens)``
    buckets, never a loop over features. Every column takes its entries from exactly one of these calls, and
    they end in one scatter, through which gradients reach the selected entries only.
    Where an entry beyond some feature's capacity ties with its cut-off (the order
    ``topk`` gives equal values is unspecified), the ranks are re-sorted by token
    index among equal values; only the columns whose tie group runs past the ranks
    taken (e.g. all-equal columns) go through :func:`keep_top`, one pass over them.
    """
    n_tokens, d_sae = acts.shape
    capacities = capacities.clamp(0, n_tokens)
    # Host syncs: topk depths must be Python ints.
    depth = int(capacities.max()) if acts.numel() > 0 else 0
    if depth == 0:
        cutoffs = acts.new_full((d_sae,), torch.inf)
        return keep_top(acts, cutoffs, capacities)
    mean = float(capacities.sum()) / d_sae
    window = max(8, 1 << max(0, math.ceil(math.log2(max(2 * mean, 1.0)))))
    if depth < 2 * window:
        window = depth + 1  # one call covers every feature
    window = min(window, n_tokens)
    # A window one rank deeper than a capacity shows the entry after its cut-off.
    in_head = (capacities < window) | (window == n_tokens)
    head = _ColumnTop(acts, capacities, None, window)
    buckets = []
    if not bool(in_head.all()):
        # bucket b holds capacities in [window * 2**(b-1), window * 2**b)
        levels = torch.floor(torch.log2(capacities.double() / window)).long() + 1
        for level in levels[~in_head].unique().tolist():
            columns = ((levels == level) & ~in_head).nonzero().squeeze(1)
            bucket_depth = min(n_tokens, window << level)
            buckets.append(_ColumnTop(acts, capacities, columns, bucket_depth))
    with torch.no_grad():
        cutoffs = torch.where(in_head & (capacities > 0), head.cutoffs, torch.inf)
        ties = in_head & head.ties
        for bucket in buckets:
            cutoffs[bucket.columns] = bucket.cutoffs
            ties[bucket.columns] = bucket.ties
    unresolved = torch.zeros_like(ties)
    to_settle = None
    if bool(ties.any()):  # host sync
        # topk orders equal values arbitrarily: put them in token order.
        unresolved = in_head & head.put_ties_in_token_order()
        for bucket in buckets:
            unresolved[bucket.columns] = bucket.put_ties_in_token_order()
        # A tie group running past the ranks taken (e.g. an all-equal column) is
        # settled by one pass over those columns.
        to_settle = unresolved.nonzero().squeeze(1)  # host sync
    # Each column's kept set is now its first capacity ranks. Entries beyond a
    # capacity go to one extra slot that is dropped, so they overwrite nothing.
    dropped = n_tokens * d_sae
    parts = [head.kept_entries(d_sae, dropped, in_head & ~unresolved)]
    parts += [bucket.kept_entries(d_sae, dropped, ~unresolved) for bucket in buckets]
    indices = torch.cat([part[0] for part in parts])
    values = torch.cat([part[1] for part in parts])
    out = acts.new_zeros(dropped + 1).scatter_(0, indices, values)
    out = out[:dropped].view_as(acts)
    if to_settle is not None and to_settle.numel() > 0:
        settled = keep_top(
            acts.index_select(1, to_settle), cutoffs[to_settle], capacities[to_settle]
        )
        out.index_copy_(1, to_settle, settled)
    return out
