"""Batch-level selection over a batch split across ranks, exchanging statistics only.

Rank r holds rows ``[offset_r, offset_r + n_r)`` of the global batch (rank order is
token order). Each function here returns, on every rank, that rank's part of what the
single-process rule would give on the concatenated batch, and sends far less than the
``[B, d_sae]`` matrix:

- :func:`global_topk_mask`: the global top-``budget`` entries (BatchTopK, Mutual
  Choice, Sampled-SAE inside its pool). Each rank sends its ``c`` largest values,
  ``c = ceil(oversample * budget / W)``; the threshold found among them is exact unless
  a rank that sent only part of its entries sent nothing below it, in which case every
  rank sends ``min(budget, n_r)`` values (always exact). Ties at the threshold go to
  the lowest global flat index.
- :func:`global_feature_scores`: Sampled-SAE column scores from per-feature sums
  reduced in float64.
- :func:`shared_pool`: one pool, drawn by rank 0 and broadcast.
- :func:`global_feature_choice_mask`: each feature's top-``m_j`` tokens of the global
  batch. Every rank sends, per feature, its ``min(m_j, n_max)`` best keys
  ``(value bits << 32) | (2**32 - 1 - global token)``, unique within a feature, so the
  ``m_j``-th largest key is the exact cut and ties go to the lowest global token.

Nothing here imports SAELens; ``comm`` is a :class:`~.comm.Comm`.
"""

from __future__ import annotations

import math

import torch

from sae_lens_sampled.distributed.comm import Comm
from sae_lens_sampled.selection import select_pool

SELECTION = "selection"
_TOKEN_BITS = 32
_TOKEN_MASK = (1 << _TOKEN_BITS) - 1


def _local_top_values(values: torch.Tensor, count: int) -> torch.Tensor:
    """The ``count`` largest of ``values`` (flat), padded with ``-inf`` to ``count``."""
    count_here = min(count, values.numel())
    if count_here < values.numel():
        top = torch.topk(values, count_here, sorted=False).values
    else:
        top = values
    if count_here < count:
        pad = values.new_full((count - count_here,), -torch.inf)
        top = torch.cat([top, pad])
    return top


def _threshold_from_candidates(
    values: torch.Tensor, budget: int, count: int, comm: Comm, sizes: list[int]
) -> tuple[torch.Tensor, bool]:
    """The ``budget``-th largest of every rank's top-``count``, and whether it is exact.

    Every entry a rank did not send is at most the smallest value it sent, so the
    threshold is exact when no truncated rank sent only values above it.
    """
    gathered = comm.all_gather(_local_top_values(values, count), SELECTION)
    threshold = torch.topk(gathered.flatten(), budget, sorted=False).values.min()
    truncated = torch.tensor([count < size for size in sizes], device=values.device)
    hiding = truncated & (gathered.amin(dim=1) > threshold)
    return threshold, not bool(hiding.any())  # same answer on every rank


def global_kth_largest(
    values: torch.Tensor,
    k: int,
    comm: Comm,
    sizes: list[int],
    oversample: float = 2.0,
) -> torch.Tensor:
    """The ``k``-th largest entry of all ranks' ``values`` (flat), on every rank.

    ``sizes`` holds every rank's ``values.numel()``, in rank order; ``1 <= k <=
    sum(sizes)``. One all-gather of ``ceil(oversample * k / W)`` values per rank, and
    a second of ``min(k, max(sizes))`` only when the first cannot prove its answer.
    """
    total = sum(sizes)
    if not 1 <= k <= total:
        raise ValueError(f"k must be in [1, {total}], got {k}")
    largest = max(sizes)
    optimistic = min(k, largest, math.ceil(oversample * k / comm.world_size))
    threshold, exact = _threshold_from_candidates(values, k, optimistic, comm, sizes)
    if not exact:
        full = min(k, largest)
        threshold, _ = _threshold_from_candidates(values, k, full, comm, sizes)
    return threshold


@torch.no_grad()
def global_topk_mask(
    acts: torch.Tensor,
    budget: int,
    comm: Comm,
    sizes: list[int],
    oversample: float = 2.0,
) -> torch.Tensor:
    """Boolean mask of this rank's entries among the global top-``budget``.

    ``acts`` is this rank's ``[n_r, d]`` block (non-negative); ``sizes`` every rank's
    number of entries ``n_r * d`` in rank order. Exactly ``budget`` entries are
    selected over all ranks (all of them if there are fewer); among entries equal to
    the threshold the lowest global flat index (rank, then row-major) wins. A
    selected entry equal to 0 is left out of the mask, as it contributes nothing.
    """
    flat = acts.reshape(-1)
    total = sum(sizes)
    if budget <= 0:
        return torch.zeros_like(acts, dtype=torch.bool)
    if budget >= total:
        return acts > 0
    threshold = global_kth_largest(flat, budget, comm, sizes, oversample)
    above = flat > threshold
    if threshold <= 0:  # host sync; the same branch on every rank
        return above.view_as(acts)
    ties = flat == threshold
    counts = torch.stack([above.sum(), ties.sum()])
    gathered = comm.all_gather(counts, SELECTION).tolist()
    need = budget - sum(n_above for n_above, _ in gathered)
    before = sum(n_ties for _, n_ties in gathered[: comm.rank])
    n_ties = gathered[comm.rank][1]
    quota = max(0, min(need - before, n_ties))
    if quota == n_ties:
        mask = above | ties
    elif quota == 0:
        mask = above
    else:
        mask = above | (ties & (ties.cumsum(0) <= quota))
    return mask.view_as(acts)


@torch.no_grad()
def global_feature_scores(acts: torch.Tensor, score: str, comm: Comm) -> torch.Tensor:
    """Sampled-SAE column scores of the global batch, float64 ``[d_sae]``.

    From per-feature sums reduced over ranks: ``l2 = sqrt(sum a^2)``,
    ``squared_l2 = sum a^2``, ``entropy = log S - T / S`` with ``S = sum a`` and
    ``T = sum a log a`` (the entropy of the column normalised to sum 1; 0 for an
    all-zero column); ``uniform`` needs no exchange.
    """
    d_sae = acts.shape[-1]
    if score == "uniform":
        return torch.ones(d_sae, dtype=torch.float64, device=acts.device)
    if score in ("l2", "squared_l2"):
        sums = acts.to(torch.float64).square().sum(dim=0)
        comm.all_reduce(sums, "sum", SELECTION)
        return sums.sqrt() if score == "l2" else sums
    if score == "entropy":
        acts64 = acts.to(torch.float64)
        sums = torch.stack(
            [acts64.sum(dim=0), torch.special.xlogy(acts64, acts64).sum(dim=0)]
        )
        comm.all_reduce(sums, "sum", SELECTION)
        total, weighted_log = sums
        positive = total > 0
        safe = torch.where(positive, total, 1.0)
        return torch.where(positive, safe.log() - weighted_log / safe, 0.0)
    raise ValueError(
        f"score must be one of ('l2', 'squared_l2', 'entropy', 'uniform'), got {score!r}"
    )


@torch.no_grad()
def shared_pool(
    scores: torch.Tensor,
    size: int,
    mode: str,
    generator: torch.Generator | None,
    comm: Comm,
) -> torch.Tensor:
    """The Sampled-SAE pool (long ``[size]``), drawn on rank 0 and broadcast.

    Broadcasting ``size`` indices costs little and makes the pool identical on every
    rank even if the ranks' scores differed in the last bit or their RNGs drifted.
    """
    if comm.rank == 0:
        pool = select_pool(scores, size, mode, generator)
    else:
        pool = torch.empty(size, dtype=torch.long, device=scores.device)
    return comm.broadcast(pool, 0, SELECTION)


def _check_key_dtype(acts: torch.Tensor) -> None:
    if acts.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(
            "data-parallel feature_choice ranks float32, float16 or bfloat16 "
            f"activations exactly; got {acts.dtype} (train the SAE in float32, or "
            "under bf16 autocast)"
        )


def token_keys(acts: torch.Tensor, first_token: int) -> torch.Tensor:
    """Int64 keys ``(float32 bits of a) << 32 | (2**32 - 1 - global token)``.

    For ``a >= 0`` the keys order entries of a column by value, then by lower global
    token, and are unique within a column. Requires fewer than ``2**32`` tokens.
    """
    _check_key_dtype(acts)
    n_rows = acts.shape[0]
    if first_token + n_rows > _TOKEN_MASK:
        raise ValueError(f"global batch too large for 32-bit token keys: {n_rows}")
    # + 0.0 turns -0.0 into +0.0, whose bits are 0
    bits = (acts.float().clamp_min(0) + 0.0).view(torch.int32).to(torch.int64)
    tokens = torch.arange(
        first_token, first_token + n_rows, device=acts.device, dtype=torch.int64
    )
    return (bits << _TOKEN_BITS) | (_TOKEN_MASK - tokens)[:, None]


def _depth_buckets(depths: torch.Tensor, n_rows: int) -> list[tuple[int, torch.Tensor]]:
    """Features grouped by ``topk`` depth (powers of two, capped at ``n_rows``)."""
    positive = depths > 0
    if not bool(positive.any()):
        return []
    levels = torch.ceil(torch.log2(depths.clamp_min(1).double())).long()
    levels = torch.where(positive, levels, -1)
    buckets = []
    for level in levels[positive].unique().tolist():
        columns = (levels == level).nonzero().squeeze(1)
        buckets.append((min(n_rows, 1 << level), columns))
    return buckets


def column_top_keys(
    keys: torch.Tensor, depths: torch.Tensor, n_rows_max: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each column's ``depths[j]`` largest keys, feature-major, padded with ``-1``.

    ``keys`` is ``[n_rows, d_sae]``; ``depths`` long ``[d_sae]`` with every entry at
    most ``n_rows_max``. Returns ``(keys, columns, rows)`` of length
    ``sum(depths)``: the layout (which column each position belongs to) depends only
    on ``depths`` and ``n_rows_max``, so it is the same on every rank; a rank with
    fewer than ``depths[j]`` rows pads with key ``-1`` (row ``-1``).
    """
    n_rows = keys.shape[0]
    parts_keys, parts_cols, parts_rows = [], [], []
    for depth, columns in _depth_buckets(depths, n_rows_max):
        wanted = depths[columns]
        here = min(depth, n_rows)
        top = torch.topk(keys.index_select(1, columns), here, dim=0)
        top_keys, top_rows = top.values, top.indices
        if here < depth:
            pad_shape = (depth - here, columns.numel())
            top_keys = torch.cat([top_keys, top_keys.new_full(pad_shape, -1)])
            top_rows = torch.cat([top_rows, top_rows.new_full(pad_shape, -1)])
        rank = torch.arange(depth, device=keys.device)[:, None]
        keep = (rank < wanted[None, :]).t()  # feature-major
        parts_keys.append(top_keys.t()[keep])
        parts_rows.append(top_rows.t()[keep])
        parts_cols.append(columns[:, None].expand(-1, depth)[keep])
    if not parts_keys:
        empty = keys.new_empty(0)
        return empty, empty.clone(), empty.clone()
    return torch.cat(parts_keys), torch.cat(parts_cols), torch.cat(parts_rows)


def _segment_kth(
    keys: torch.Tensor,
    columns: torch.Tensor,
    segment_lengths: torch.Tensor,
    ks: torch.Tensor,
) -> torch.Tensor:
    """Per column j, the ``ks[j]``-th largest of the keys whose column is j.

    ``segment_lengths[j]`` is how many keys belong to column j; ``ks[j] = 0`` gives
    the largest int64 (nothing passes ``>=`` it).
    """
    order = torch.argsort(keys, descending=True, stable=True)
    order = order[torch.argsort(columns[order], stable=True)]
    ordered = keys[order]
    starts = segment_lengths.cumsum(0) - segment_lengths
    cut = torch.full_like(ks, torch.iinfo(torch.int64).max)
    has = ks > 0
    cut[has] = ordered[starts[has] + ks[has] - 1]
    return cut


FEATURE_CHOICE_LAYOUTS: tuple[str, ...] = ("auto", "all_gather", "all_to_all")


def feature_choice_layout_bytes(
    n_candidates: int, d_sae: int, world_size: int
) -> dict[str, float]:
    """Bytes one rank sends to find the cuts, for each exchange layout.

    ``all_gather``: every rank's ``L`` candidate keys to every rank. ``all_to_all``
    (features sharded over ranks): each rank sends its candidates to the owners of
    their features, owners find the cuts of their ``d_sae / W`` features, and the
    cuts are all-gathered.
    """
    world = world_size
    block = -(-d_sae // world)
    return {
        "all_gather": 8.0 * n_candidates * (world - 1),
        "all_to_all": 8.0 * n_candidates * (world - 1) / world
        + 8.0 * block * (world - 1),
    }


def _feature_owners(d_sae: int, world_size: int) -> list[int]:
    """First feature of each rank's contiguous block, and ``d_sae`` at the end."""
    return [-(-rank * d_sae // world_size) for rank in range(world_size + 1)]


def _cuts_all_to_all(
    cand_keys: torch.Tensor,
    cand_cols: torch.Tensor,
    depths: torch.Tensor,
    ks: torch.Tensor,
    comm: Comm,
) -> torch.Tensor:
    """Every feature's cut, found by the rank that owns the feature."""
    rank, world = comm.rank, comm.world_size
    d_sae = depths.numel()
    bounds = _feature_owners(d_sae, world)
    owner = torch.bucketize(cand_cols, cand_cols.new_tensor(bounds[1:]), right=True)
    order = torch.argsort(owner, stable=True)
    # The layout is the same on every rank, so are these counts.
    counts = torch.bincount(owner, minlength=world).tolist()
    mine = counts[rank]
    received = comm.all_to_all(cand_keys[order], counts, [mine] * world, SELECTION)
    start = sum(counts[:rank])
    lo, hi = bounds[rank], bounds[rank + 1]
    my_cols = cand_cols[order][start : start + mine] - lo
    cut_mine = _segment_kth(
        received, my_cols.repeat(world), world * depths[lo:hi], ks[lo:hi]
    )
    block = max(b - a for a, b in zip(bounds, bounds[1:], strict=False))
    padded = cut_mine.new_full((block,), torch.iinfo(torch.int64).max)
    padded[: hi - lo] = cut_mine
    gathered = comm.all_gather(padded, SELECTION)
    return torch.cat([gathered[q, : bounds[q + 1] - bounds[q]] for q in range(world)])


@torch.no_grad()
def global_feature_choice_mask(
    acts: torch.Tensor,
    capacities: torch.Tensor,
    comm: Comm,
    shard_rows: list[int],
    layout: str = "auto",
) -> torch.Tensor:
    """Boolean mask of this rank's entries among each feature's global top-``m_j``.

    ``acts`` is this rank's ``[n_r, d_sae]`` block (non-negative), ``capacities`` the
    long ``[d_sae]`` capacities of the global batch (identical on every rank) and
    ``shard_rows`` every rank's ``n_r``. Entries equal to 0 are never selected (not
    active). Ties go to the lowest global token. ``layout`` picks how candidates are
    exchanged (:func:`feature_choice_layout_bytes`); ``"auto"`` takes the one that
    sends fewer bytes.
    """
    if layout not in FEATURE_CHOICE_LAYOUTS:
        raise ValueError(
            f"layout must be one of {FEATURE_CHOICE_LAYOUTS}, got {layout!r}"
        )
    rank, world = comm.rank, comm.world_size
    n_rows_max = max(shard_rows)
    first_token = sum(shard_rows[:rank])
    depths = capacities.clamp(0, n_rows_max)
    ks = capacities.clamp(0, sum(shard_rows))
    keys = token_keys(acts, first_token)
    cand_keys, cand_cols, cand_rows = column_top_keys(keys, depths, n_rows_max)
    if layout == "auto":
        costs = feature_choice_layout_bytes(cand_keys.numel(), acts.shape[1], world)
        layout = min(costs, key=costs.__getitem__)
    if layout == "all_to_all" and world > 1:
        cut = _cuts_all_to_all(cand_keys, cand_cols, depths, ks, comm)
    else:
        gathered = comm.all_gather(cand_keys, SELECTION).reshape(-1)
        cut = _segment_kth(gathered, cand_cols.repeat(world), world * depths, ks)
    keep = (cand_keys >= cut[cand_cols]) & ((cand_keys >> _TOKEN_BITS) > 0)
    mask = torch.zeros_like(acts, dtype=torch.bool)
    mask[cand_rows[keep], cand_cols[keep]] = True
    return mask


@torch.no_grad()
def reduce_column_stats(
    counts: torch.Tensor, smallest: torch.Tensor, comm: Comm
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-feature counts summed and smallest values minimised over ranks (copies)."""
    counts = comm.all_reduce(counts.clone(), "sum", "stats")
    smallest = comm.all_reduce(smallest.clone(), "min", "stats")
    return counts, smallest
