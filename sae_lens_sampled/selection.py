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
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Literal, get_args

import torch

ScoreName = Literal["l2", "squared_l2", "entropy", "uniform"]
PoolMode = Literal["sample", "top"]
SCORES: tuple[str, ...] = get_args(ScoreName)
POOL_MODES: tuple[str, ...] = get_args(PoolMode)

# Offset that puts every zero-score feature behind every positive-score one in the
# Gumbel keys: log-scores of positive float32/64 values lie within about +-750 and
# Gumbel noise within about [-4, 40], far inside this gap.
_ZERO_SCORE_KEY_OFFSET = 1e4
_FIXED_SHAPES_FORCED = False


def fixed_shapes(acts: torch.Tensor) -> bool:
    """Whether a selection on ``acts`` must keep every shape fixed and read nothing
    back to the host: on an accelerator (a read stalls the queue of kernels), while
    ``torch.compile`` traces, and inside :func:`fixed_shape_selection`. Eager CPU
    code keeps the data-dependent paths, faster there; both select the same entries.
    """
    return (
        _FIXED_SHAPES_FORCED
        or acts.device.type != "cpu"
        or torch.compiler.is_compiling()
    )


@contextmanager
def fixed_shape_selection() -> Iterator[None]:
    """Take the fixed-shape, read-free paths on every device (tests, audits)."""
    global _FIXED_SHAPES_FORCED
    previous, _FIXED_SHAPES_FORCED = _FIXED_SHAPES_FORCED, True
    try:
        yield
    finally:
        _FIXED_SHAPES_FORCED = previous


def batch_budget(k: float, n_tokens: int) -> int:
    """Number of entries a batch of ``n_tokens`` keeps: ``round(k * n_tokens)``."""
    return int(round(k * n_tokens))


def keep_top(
    acts: torch.Tensor,
    cutoffs: torch.Tensor,
    capacities: torch.Tensor,
    ties: bool | None = None,
) -> torch.Tensor:
    """Keep, by the tie rule, each column j's ``capacities[j]`` largest positive
    entries of ``acts`` ``[n, c]``, given ``cutoffs[j]``, its ``capacities[j]``-th
    largest value (``inf`` where the capacity is 0; a cut-off that is not positive
    keeps every positive entry). ``ties``: whether some column has more entries at its
    cut-off than it keeps (``None``: find out, one host sync); only then are they
    counted in order.
    """
    with torch.no_grad():
        if not ties:  # None or False: every positive entry at or above the cut-off
            positive = torch.nextafter(acts.new_zeros(()), acts.new_ones(()))
            keep = acts >= torch.maximum(cutoffs, positive)
            if ties is None:
                ties = bool((keep.sum(dim=0) > capacities).any())
        if ties:
            # A cut-off that is not positive keeps every positive entry, the
            # smallest subnormal included.
            above = acts > cutoffs.clamp(min=0)
            at = (acts == cutoffs) & (cutoffs > 0)
            room = capacities - above.sum(dim=0)
            # Counted along each column as a contiguous row: a scan along the inner
            # dimension is much faster than along the outer one.
            order_dtype = torch.int32 if acts.shape[0] < 2**31 else torch.int64
            rank = at.t().contiguous().cumsum(dim=1, dtype=order_dtype).t()
            keep = above | (at & (rank <= room))
    return torch.where(keep, acts, acts.new_zeros(()))


def _first_in_order(
    values: torch.Tensor, cutoff: torch.Tensor, budget: int
) -> torch.Tensor:
    """Which of ``values`` (in row-major order) the tie rule keeps, given the cut-off
    and ``budget``; zeros never. No host sync."""
    above = values > cutoff
    at = (values == cutoff) & (cutoff > 0)
    room = budget - above.sum()
    return above | (at & (at.cumsum(dim=0) <= room))


def _batch_topk_dense(
    acts: torch.Tensor, budget: int, ties: bool | None = None
) -> torch.Tensor:
    """:func:`batch_topk` by a flat top-k for the cut-off and one pass over ``acts``
    (``ties=True``: apply the tie rule unconditionally, with no host read)."""
    flat = acts.flatten()
    with torch.no_grad():
        if budget > 0:
            cutoff = torch.topk(flat, budget, sorted=False).values.min()
        else:
            cutoff = flat.new_full((), torch.inf)
    capacity = torch.full((1,), budget, device=acts.device)
    # One column of n * d_sae entries: "along the column" is row-major order.
    return keep_top(flat.view(-1, 1), cutoff.view(1), capacity, ties).view_as(acts)


def batch_topk(acts: torch.Tensor, budget: int) -> torch.Tensor:
    """Keep the ``budget`` largest entries of ``acts`` over the whole matrix.

    SAELens's ``BatchTopK`` with an explicit budget and the module's tie rule.
    Selected zeros stay zero, so the realised L0 can fall below the budget.

    Eager CPU, 2-D ``acts``: each row's ``2 * ceil(budget / n)`` largest entries are
    the candidates of one global top-``budget`` (``docs/performance.md``, two-stage
    batch top-k). One host sync checks that no row may hide more winners (its
    smallest candidate at or above the cut-off) and no candidate at the cut-off was
    left out; else :func:`_batch_topk_settled` applies the tie rule. Where shapes
    must stay fixed (:func:`fixed_shapes`), one flat top-k gives the cut-off and
    :func:`keep_top` the tie rule: the same entries, no host read.
    """
    flat = acts.flatten()
    budget = min(max(budget, 0), flat.numel())
    if budget > 0 and fixed_shapes(acts):
        return _batch_topk_dense(acts, budget, ties=True)
    n_rows, n_cols = (acts.shape[0], acts.shape[-1]) if acts.dim() == 2 else (1, 0)
    n_candidates = 2 * -(-budget // max(n_rows, 1))
    if budget == 0 or acts.dim() != 2 or 2 * n_candidates > n_cols:
        return _batch_topk_dense(acts, budget)
    with torch.no_grad():
        cand_values, cand_cols = torch.topk(acts, n_candidates, dim=1, sorted=False)
        top = torch.topk(cand_values.flatten(), budget, sorted=False)
        cutoff = top.values.min()
        open_rows = cand_values.amin(dim=1) >= cutoff
        left_out = (cand_values == cutoff).sum() > (top.values == cutoff).sum()
        any_open, any_left_out = torch.stack([open_rows.any(), left_out]).tolist()
    if any_open or any_left_out:  # the one host sync above
        return _batch_topk_settled(
            acts,
            budget,
            cand_values,
            cand_cols,
            cutoff,
            open_rows if any_open else None,
        )
    rows = torch.arange(n_rows, device=acts.device)[:, None]
    indices = (rows * n_cols + cand_cols).flatten()[top.indices]
    # Gathered from acts, so gradients reach the selected entries only.
    return torch.zeros_like(flat).scatter_(0, indices, flat[indices]).view_as(acts)


# Integer types holding a float's bits, for the keys of _tie_rule_keys.
_BITS_OF = {
    torch.float32: torch.int32,
    torch.float16: torch.int16,
    torch.bfloat16: torch.int16,
}


def _tie_rule_keys(values: torch.Tensor) -> torch.Tensor | None:
    """``bits * 2**32 - i`` (int64, one op) for each entry ``i`` along dim 0 of
    non-negative ``values``; None where that does not fit (``float64``, more than
    ``2**32`` entries along dim 0).

    The bits of a non-negative float, read as an integer, order like the float, so
    the keys order the entries by value, then lower ``i`` first: a top-k of them is
    exactly the tie rule's, with no pass to settle ties.
    """
    bits_dtype = _BITS_OF.get(values.dtype)
    n = values.shape[0]
    if bits_dtype is None or n > 2**32:
        return None
    negated = torch.arange(0, -n, -1, device=values.device)
    if values.dim() == 2:
        negated = negated[:, None]
    return torch.add(negated, values.view(bits_dtype), alpha=2**32)


@torch.no_grad()
def batch_topk_positions(acts: torch.Tensor, budget: int) -> torch.Tensor | None:
    """Row-major positions (ascending, flat into non-negative ``acts`` ``[n, c]``)
    of the ``budget`` entries :func:`batch_topk` keeps, by one top-k of
    :func:`_tie_rule_keys` with fixed shapes and no host read; None where the keys
    do not fit or the budget is outside ``[1, n * c]``. Where fewer than ``budget``
    entries are positive, zero entries (never active) fill the count.
    """
    if not 0 < budget <= acts.numel():
        return None
    keys = _tie_rule_keys(acts.reshape(-1))
    if keys is None:
        return None
    top = torch.topk(keys, budget, sorted=False).indices
    return top.sort().values


@torch.no_grad()
def batch_topk_counts(acts: torch.Tensor, budget: int) -> torch.Tensor:
    """Per column of non-negative ``acts`` ``[n, c]``, the positive entries
    :func:`batch_topk` keeps: ``(batch_topk(acts, budget) > 0).sum(0)`` (long).
    Where shapes must stay fixed, counted from :func:`batch_topk_positions`
    without building the dense result."""
    positions = batch_topk_positions(acts, budget) if fixed_shapes(acts) else None
    if positions is None:
        return (batch_topk(acts, budget) > 0).sum(dim=0)
    n_cols = acts.shape[-1]
    positive = (acts.reshape(-1)[positions] > 0).long()
    counts = torch.zeros(n_cols, dtype=torch.long, device=acts.device)
    return counts.index_add_(0, positions % n_cols, positive)


def _batch_topk_settled(
    acts: torch.Tensor,
    budget: int,
    cand_values: torch.Tensor,
    cand_cols: torch.Tensor,
    cutoff: torch.Tensor,
    open_rows: torch.Tensor | None,
) -> torch.Tensor:
    """:func:`batch_topk` when ties or rows with many winners need more than the
    candidates' top set: a search pool in row-major order, then the tie rule.
    ``cutoff``: the candidates' ``budget``-th largest value; ``open_rows``: the rows
    whose smallest candidate is at or above it (``None``: no such row)."""
    flat = acts.flatten()
    n_rows, n_cols = acts.shape
    pool: torch.Tensor | None
    with torch.no_grad():
        rows = torch.arange(n_rows, device=acts.device)[:, None]
        if open_rows is not None:
            # Open rows are searched down to the cut-off found, a lower bound of the
            # true one: then the pool holds every entry above or equal to it.
            closed = ~open_rows[:, None].expand_as(cand_cols).flatten()
            full_rows = open_rows.nonzero().squeeze(1)
            sub_rows, cols = (acts[full_rows] >= cutoff).nonzero().unbind(1)
            pool = torch.cat(
                [
                    (rows * n_cols + cand_cols).flatten()[closed],
                    full_rows[sub_rows] * n_cols + cols,
                ]
            )
            if 2 * pool.numel() > flat.numel():
                pool = None
            else:
                pool = pool.sort().values
                values = flat[pool]
                cutoff = torch.topk(values, budget, sorted=False).values.min()
        else:
            cand_cols, order = cand_cols.sort(dim=1)
            pool = (rows * n_cols + cand_cols).flatten()
            values = cand_values.gather(1, order).flatten()
        if pool is not None:
            keep = _first_in_order(values, cutoff, budget)
            # Entries not kept go to one extra slot that is dropped.
            target = torch.where(keep, pool, flat.numel())
    if pool is None:  # the pool would be large
        return _batch_topk_dense(acts, budget)
    kept_values = torch.where(keep, flat[pool], flat.new_zeros(()))
    out = flat.new_zeros(flat.numel() + 1).scatter_(0, target, kept_values)
    return out[:-1].view_as(acts)


@torch.no_grad()
def feature_scores(acts: torch.Tensor, score: str) -> torch.Tensor:
    """Score each feature column of ``acts`` over the batch: float64 ``[d_sae]``.

    ``l2`` / ``squared_l2``: the column's norm / squared norm; ``entropy``: Shannon
    entropy (nats) of the column normalised to sum 1 (0 for an all-zero column; high
    for a feature spread over many tokens); ``uniform``: 1. Computed in float32 at
    least: a float16 squared norm overflows on ordinary activations, and an ``inf``
    score would make every draw the same.
    """
    if score not in SCORES:
        raise ValueError(f"score must be one of {SCORES}, got {score!r}")
    if score == "uniform":
        return torch.ones(acts.shape[-1], dtype=torch.float64, device=acts.device)
    wide = torch.promote_types(acts.dtype, torch.float32)
    if score == "entropy":
        # Reduced as rows of a [d_sae, n_tokens] copy, each padded with zeros to the
        # same alignment: a sum along dim 0, or over rows that start at different
        # alignments, can round identical columns differently (vector lanes and
        # tails), which would break score ties.
        n_tokens = acts.shape[0]
        columns = acts.new_zeros((acts.shape[1], -(-n_tokens // 64) * 64), dtype=wide)
        columns[:, :n_tokens].copy_(acts.t())
        totals = columns.sum(dim=-1, keepdim=True)
        probs = columns / totals.clamp_min(torch.finfo(wide).tiny)
        plogp: torch.Tensor = torch.special.xlogy(probs, probs).sum(dim=-1)
        return -plogp.to(torch.float64)
    norms: torch.Tensor = torch.linalg.vector_norm(acts, dim=0, dtype=wide).to(
        torch.float64
    )
    return norms if score == "l2" else norms.square()


def pool_size(
    k: float, pool_factor: float | None, d_sae: int, pool_fraction: float | None = None
) -> int:
    """``round(pool_fraction * d_sae)`` when given, else the paper's
    ``round(k * pool_factor)``, clamped to ``[1, d_sae]``."""
    if pool_fraction is not None:
        wanted = round(pool_fraction * d_sae)
    elif pool_factor is not None:
        wanted = round(k * pool_factor)
    else:
        raise ValueError("pool_size needs pool_factor or pool_fraction")
    return max(1, min(d_sae, int(wanted)))


@torch.no_grad()
def select_pool(
    scores: torch.Tensor,
    size: int,
    mode: str,
    generator: torch.Generator | None = None,
    beta: float = 1.0,
) -> torch.Tensor:
    """Indices (ascending) of the ``size`` features that form the pool.

    ``"top"``: the best scores (ties: lower index). ``"sample"``: drawn without
    replacement with probability proportional to ``score ** beta`` (Gumbel-top-k;
    ``beta=0`` is uniform among positive scores, ``beta -> inf`` tends to ``"top"``).
    Features scoring 0 are drawn only after every positive-score feature.
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
    # Gumbel noise is -log(-log(u)); added as the subtraction of log(-log(u)).
    neg_gumbel = torch.log(-torch.log(uniform.clamp_min(1e-300)))
    scores64 = scores.to(torch.float64)
    positive = scores64 > 0
    # beta * log(score) spans about +-750 * beta: the offset grows with it. A score
    # of 0 (log -inf) takes the offset instead.
    offset = _ZERO_SCORE_KEY_OFFSET * max(1.0, beta)
    log_scores = torch.log(scores64)
    if beta != 1.0:
        log_scores = beta * log_scores
    log_scores = torch.where(positive, log_scores, -offset)
    return torch.topk(log_scores - neg_gumbel, size).indices.sort().values


def explore_size(size: int, explore: float) -> int:
    """Pool slots reserved for exploration: ``round(explore * size)``."""
    return int(round(explore * size))


@torch.no_grad()
def explore_pool(
    pool: torch.Tensor,
    scores: torch.Tensor,
    staleness: torch.Tensor,
    n_explore: int,
) -> torch.Tensor:
    """``pool`` plus the ``n_explore`` features outside it pooled least recently
    (``staleness``: steps since each was last pooled), ascending.

    Order outside ``pool``: a positive score first (no positive activation, no
    selection), then larger staleness, larger score, lower index.
    """
    d_sae = scores.shape[0]
    n_explore = max(0, min(n_explore, d_sae - pool.numel()))
    if n_explore == 0:
        return pool
    order = torch.arange(d_sae, device=scores.device)
    # Lexicographic order by successive stable sorts, the least important key first.
    for key in (
        scores.to(torch.float64),
        staleness.to(torch.float64),
        (scores > 0).to(torch.float64),
    ):
        order = order[torch.sort(key[order], descending=True, stable=True).indices]
    outside = torch.ones(d_sae, dtype=torch.bool, device=scores.device)
    outside[pool] = False
    chosen = order[outside[order]][:n_explore]
    return torch.cat([pool, chosen]).sort().values


@torch.no_grad()
def sampled_pool(
    acts: torch.Tensor,
    k: float,
    pool_factor: float | None,
    score: str = "l2",
    pool_mode: str = "sample",
    generator: torch.Generator | None = None,
    *,
    beta: float = 1.0,
    explore: float = 0.0,
    staleness: torch.Tensor | None = None,
    pool_fraction: float | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The :func:`pool_size` pool of a batch (by :func:`pool_from_scores`) and the
    :func:`feature_scores` it was chosen from; ``(None, None)`` when the pool holds
    every feature (then the rule is BatchTopK and nothing is scored).
    """
    d_sae = acts.shape[1]
    size = pool_size(k, pool_factor, d_sae, pool_fraction)
    if size >= d_sae:
        return None, None
    scores = feature_scores(acts, score)
    pool = pool_from_scores(
        scores, size, pool_mode, generator, beta, explore=explore, staleness=staleness
    )
    return pool, scores


@torch.no_grad()
def pool_from_scores(
    scores: torch.Tensor,
    size: int,
    pool_mode: str,
    generator: torch.Generator | None,
    beta: float,
    *,
    explore: float = 0.0,
    staleness: torch.Tensor | None = None,
) -> torch.Tensor:
    """The ``size`` pooled features given the column ``scores``: :func:`select_pool`,
    with ``explore_size(size, explore)`` slots left to :func:`explore_pool` when
    ``staleness`` is given."""
    n_explore = explore_size(size, explore) if staleness is not None else 0
    pool = select_pool(scores, size - n_explore, pool_mode, generator, beta)
    if n_explore > 0:
        assert staleness is not None
        pool = explore_pool(pool, scores, staleness, n_explore)
    return pool


def topk_in_pool(
    acts: torch.Tensor,
    budget: int,
    pool: torch.Tensor | None,
    select: Callable[[torch.Tensor, int], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Keep the ``budget`` largest entries of ``acts`` among the ``pool`` columns
    (every column when ``pool`` is None), by :func:`batch_topk`'s rule (or by
    ``select(acts, budget)``, e.g. its data-parallel form)."""
    select = batch_topk if select is None else select
    if pool is None:
        return select(acts, budget)
    # Select within the pool columns only: [n_tokens, P] instead of [n_tokens, d_sae].
    pooled = select(acts.index_select(1, pool), budget)
    return torch.zeros_like(acts).index_copy(1, pool, pooled)


def sampled_topk(
    acts: torch.Tensor,
    k: float,
    pool_factor: float | None,
    score: str = "l2",
    pool_mode: str = "sample",
    generator: torch.Generator | None = None,
    *,
    beta: float = 1.0,
    explore: float = 0.0,
    staleness: torch.Tensor | None = None,
    pool_fraction: float | None = None,
) -> torch.Tensor:
    """Sampled-SAE selection: the :func:`sampled_pool`, then the batch's
    ``batch_budget(k, n_tokens)`` largest entries among its columns (which keep the
    features' order, so ties follow the module's rule as if the others were zero).
    """
    pool, _ = sampled_pool(
        acts,
        k,
        pool_factor,
        score,
        pool_mode,
        generator,
        beta=beta,
        explore=explore,
        staleness=staleness,
        pool_fraction=pool_fraction,
    )
    return topk_in_pool(acts, batch_budget(k, acts.shape[0]), pool)


@torch.no_grad()
def update_staleness(
    staleness: torch.Tensor, pool: torch.Tensor | None
) -> torch.Tensor:
    """Steps since each feature was last pooled, after one more step with ``pool``
    (None: every feature was pooled)."""
    if pool is None:
        return torch.zeros_like(staleness)
    return (staleness + 1).index_fill_(0, pool, 0)


@torch.no_grad()
def update_missed_chances(
    missed: torch.Tensor, fired: torch.Tensor, chance: torch.Tensor
) -> torch.Tensor:
    """Consecutive chances to fire each feature has missed, after one step: 0 where
    it ``fired``, one more where it had a ``chance``. With a chance on every step,
    the steps-since-fired counter of SAELens's trainer."""
    return torch.where(fired, 0, torch.where(chance, missed + 1, missed))


def seeded_generator(seed: int, step: int, device: torch.device) -> torch.Generator:
    """A generator whose stream depends only on ``(seed, step)``: seeded from the
    step counter (a persistent buffer), pool sampling is reproducible across save,
    load and resume without storing generator state."""
    generator = torch.Generator(device=device)
    generator.manual_seed((seed * 1_000_003 + step) % (2**63 - 1))
    return generator


# --- Feature Choice (Ayonrinde, arXiv 2411.02124): each feature picks its tokens ---

CapacitySchedule = Literal["zipf", "uniform", "zipf_fixed"]
CAPACITY_SCHEDULES: tuple[str, ...] = get_args(CapacitySchedule)


@torch.no_grad()
def usage_ranks(usage: torch.Tensor) -> torch.Tensor:
    """1-based rank of each feature by ``usage`` ``[d_sae]``, most used first; ties
    (e.g. all 0 before training) go to the lower feature index."""
    order = torch.sort(usage, descending=True, stable=True).indices
    ranks = torch.empty_like(order)
    ranks[order] = torch.arange(1, order.numel() + 1, device=order.device)
    return ranks


@torch.no_grad()
def zipf_capacity_fractions(
    ranks: torch.Tensor, k: float, alpha: float
) -> torch.Tensor:
    """Zipf capacities as fractions of the batch, ``k * r**-alpha / sum_r r**-alpha``
    for each feature's 1-based rank ``r`` (float64, summing to ``k``)."""
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
    """Real capacities ``clamp(s * weights, 1, n_tokens)`` summing to ``budget``,
    for float64 ``weights`` positive and descending, ``d_sae < budget < n * d_sae``.

    The sum ``g(s)`` is piecewise linear with kinks where some ``s * w_j`` reaches 1
    or ``n_tokens``: evaluated at every kink at once, then solved exactly on the
    piece that holds ``budget``. No loop over features, no host sync.
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
    # One-element index tensors: indexing with a 0-d tensor reads it on the host.
    low, high = kinks.gather(0, torch.stack([upper - 1, upper]))
    n_floored, n_capped, proportional = pieces(((low + high) / 2).reshape(1))
    scale = (budget - n_floored - n_tokens * n_capped) / proportional
    return (scale * weights).clamp(1, n_tokens)


def _largest_remainder(real: torch.Tensor, total: int) -> torch.Tensor:
    """Integers summing to ``total``: floors, plus one for the largest remainders of
    ``real`` (in priority order: ties go to the earlier entry; sums to ``total`` up
    to float error)."""
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
    """Token capacities ``m_j`` (long ``[d_sae]``) for a batch of ``n_tokens`` tokens
    (``docs/feature_choice.md``, Capacities and Rounding).

    ``fractions`` set the proportions and the priority order (larger first, then
    lower index): ``m_j = clamp(s * fractions_j * n_tokens, 1, n_tokens)`` with the
    scale ``s`` that makes them sum to ``budget``, rounded by largest remainder, so
    ``sum m_j == budget`` exactly. ``budget < d_sae`` gives one token to each of the
    ``budget`` first features; ``budget >= n_tokens * d_sae`` the whole batch to all.
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
    """The first ``depth`` ranks along the tokens (one sorted ``topk``) of some
    columns of ``acts`` ``[n, d_sae]`` whose capacities are below ``depth`` (or
    ``depth == n``), so the entry after each cut-off shows whether it ties with it.
    A capacity of 0 leaves a column to another call."""

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
        self.columns, self.capacities = columns, capacities
        self.top = torch.topk(acts, depth, dim=0)  # sorted
        with torch.no_grad():
            ranks = torch.stack([capacities - 1, capacities]).clamp_(0, depth - 1)
            cutoff, after = self.top.values.gather(0, ranks)
            self.cutoffs = cutoff
            # Ties among zeros do not matter (zeros are never active), and a column
            # that keeps no token or every token has none.
            self.ties = (
                (after == cutoff)
                & (cutoff > 0)
                & (capacities >= 1)
                & (capacities < n_tokens)
            )

    def kept_entries(self, d_sae: int, dropped: int) -> tuple[torch.Tensor, ...]:
        """Flat indices of the ranks ``< m_j`` (the others sent to index ``dropped``),
        and the values at all ranks."""
        indices = self.top.indices
        rank = torch.arange(indices.shape[0], device=indices.device)[:, None]
        columns = (
            torch.arange(d_sae, device=indices.device)
            if self.columns is None
            else self.columns
        )
        flat = torch.where(
            rank < self.capacities, indices * d_sae + columns, dropped
        ).flatten()
        return flat, self.top.values.flatten()


def _feature_choice_fixed(
    acts: torch.Tensor, capacities: torch.Tensor, depth: int
) -> torch.Tensor:
    """:func:`feature_choice_select` with fixed shapes and no host read: a sorted
    top-``depth`` per column gives the cut-offs, :func:`keep_top` the tie rule."""
    with torch.no_grad():
        capacities = capacities.clamp(max=depth)
        top = torch.topk(acts, depth, dim=0).values  # sorted
        ranks = (capacities - 1).clamp(min=0)[None]
        cutoffs = top.gather(0, ranks)[0].masked_fill(capacities == 0, torch.inf)
    return keep_top(acts, cutoffs, capacities, ties=True)


@torch.no_grad()
def column_topk_positions(
    acts: torch.Tensor, capacities: torch.Tensor, depth: int, size: int
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The entries :func:`feature_choice_select` keeps (``depth`` bounding every
    capacity), as ``size`` row-major positions flat into non-negative ``acts``
    ``[n, c]`` and which of them are kept, with fixed shapes and no host read:
    the kept ones in ascending order, then padding at ``(n - 1, 0)`` (never kept).
    None where the keys do not fit or ``depth`` or ``size`` is out of range.

    Per column, a sorted top-``depth`` of :func:`_tie_rule_keys` ranks the tokens,
    so rank ``< capacities[j]`` is the tie rule's kept set; a second top-k takes
    the kept positions in order.
    """
    n_tokens, n_cols = acts.shape
    n_entries = n_tokens * n_cols
    if not (0 < depth <= n_tokens and 0 < size <= depth * n_cols):
        return None
    keys = _tie_rule_keys(acts)
    if keys is None:
        return None
    rows = torch.topk(keys, depth, dim=0).indices  # [depth, c], ranks down
    ranks = torch.arange(depth, device=acts.device)[:, None]
    positions = rows * n_cols + torch.arange(n_cols, device=acts.device)
    # Entries past a capacity sort after every kept one.
    order = torch.where(ranks < capacities, positions, positions + n_entries)
    first = torch.topk(order.view(-1), size, largest=False).values  # ascending
    kept = first < n_entries
    return torch.where(kept, first, (n_tokens - 1) * n_cols), kept


def feature_choice_select(
    acts: torch.Tensor, capacities: torch.Tensor, depth: int | None = None
) -> torch.Tensor:
    """Each feature j keeps its ``capacities[j]`` (long ``[d_sae]``) largest entries
    of post-ReLU ``acts`` ``[n_tokens, d_sae]`` over the tokens, by the tie rule.

    One ``topk`` along the tokens takes the first ``D`` ranks of every feature with a
    capacity below ``D`` (twice the mean capacity, rounded up to a power of two, at
    least 8); deeper features go in buckets of power-of-two depth, each a ``topk``
    over its own columns (``docs/feature_choice.md``, Cost), all ending in one
    scatter. Where an entry past a capacity ties with its cut-off (``topk`` orders
    equal values arbitrarily), :func:`keep_top` applies the tie rule instead.

    ``depth``, when given, bounds every capacity; where shapes must stay fixed
    (:func:`fixed_shapes`), :func:`_feature_choice_fixed` selects the same entries.
    """
    n_tokens, d_sae = acts.shape
    capacities = capacities.clamp(0, n_tokens)
    if depth is not None and fixed_shapes(acts):
        depth = min(depth, n_tokens)
        if depth == 0:
            return torch.zeros_like(acts)
        return _feature_choice_fixed(acts, capacities, depth)
    depth, total = 0, 0
    if acts.numel() > 0:
        # One host sync: topk depths must be Python ints.
        depth, total = torch.stack([capacities.max(), capacities.sum()]).tolist()
    if depth == 0:
        return keep_top(acts, acts.new_full((d_sae,), torch.inf), capacities)
    window = max(8, 1 << max(0, math.ceil(math.log2(max(2 * total / d_sae, 1.0)))))
    if depth < 2 * window:
        window = depth + 1  # one call covers every feature
    window = min(window, n_tokens)
    # A window one rank deeper than a capacity shows the entry after its cut-off.
    deep = (capacities >= window) & (window < n_tokens)
    parts = [_ColumnTop(acts, torch.where(deep, 0, capacities), None, window)]
    if depth >= window and window < n_tokens:
        # bucket b holds capacities in [window * 2**(b-1), window * 2**b)
        levels = torch.floor(torch.log2(capacities.double() / window)).long() + 1
        for level in levels[deep].unique().tolist():  # host sync
            columns = ((levels == level) & deep).nonzero().squeeze(1)
            depth_b = min(n_tokens, window << level)
            parts.append(_ColumnTop(acts, capacities, columns, depth_b))
    ties = torch.stack([part.ties.any() for part in parts]).any()
    if bool(ties):  # host sync
        # topk orders equal values arbitrarily: the tie rule takes a few passes.
        with torch.no_grad():
            cutoffs = parts[0].cutoffs.masked_fill(deep | (capacities == 0), torch.inf)
            for part in parts[1:]:
                cutoffs[part.columns] = part.cutoffs
        return keep_top(acts, cutoffs, capacities, ties=True)
    # Without ties each column's kept set is its first ranks. Entries beyond a
    # capacity go to one extra slot that is dropped, so they overwrite nothing.
    dropped = n_tokens * d_sae
    kept = [part.kept_entries(d_sae, dropped) for part in parts]
    indices = torch.cat([part[0] for part in kept])
    values = torch.cat([part[1] for part in kept])
    out = acts.new_zeros(dropped + 1).scatter_(0, indices, values)
    return out[:dropped].view_as(acts)
