"""Batch-level selection over a batch split across ranks, exchanging statistics only.

Rank r holds rows ``[offset_r, offset_r + n_r)`` of the global batch (rank order is
token order). Each function returns, on every rank, that rank's part of what the
single-process rule gives on the concatenated batch, ties included, while sending far
less than the ``[B, d_sae]`` matrix (``docs/distributed.md``, "How the ranks agree").
Nothing here imports SAELens; ``comm`` is a :class:`~.comm.Comm`.
"""

from __future__ import annotations

import math

import torch

from sae_lens_sampled.checks import check_choice
from sae_lens_sampled.distributed.comm import Comm

SELECTION = "selection"
_TOKEN_BITS = 32
_TOKEN_MASK = (1 << _TOKEN_BITS) - 1
FEATURE_CHOICE_LAYOUTS: tuple[str, ...] = ("auto", "all_gather", "all_to_all")


def _top_entries(values: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``count`` largest entries of ``values`` and their flat indices, unordered.

    On a 2-D matrix each row's ``2 * ceil(count / n_rows)`` largest entries are
    taken first and the top ``count`` found among them: exact unless some row's
    smallest candidate is above the result (that row may hide more), in which case
    the flat top-k runs. Costs far less than a flat top-k over the whole matrix.
    """
    if values.dim() == 2 and count > 0:
        n_rows, n_cols = values.shape
        per_row = 2 * -(-count // n_rows)
        if 2 * per_row <= n_cols:
            rows_top = torch.topk(values, per_row, dim=1, sorted=False)
            top = torch.topk(rows_top.values.reshape(-1), count, sorted=False)
            if not bool((rows_top.values.amin(dim=1) > top.values.min()).any()):
                row = top.indices // per_row
                column = rows_top.indices.reshape(-1)[top.indices]
                return top.values, row * n_cols + column
    top = torch.topk(values.reshape(-1), count, sorted=False)
    return top.values, top.indices


def _local_top_entries(
    values: torch.Tensor, count: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The ``count`` largest of ``values`` and their flat indices, padded with
    ``-inf`` (index -1) to ``count``, and the next largest value (``-inf`` if
    there is none)."""
    flat = values.reshape(-1)
    count_here = min(count, flat.numel())
    if count_here < flat.numel():
        # One more than is sent: the first unsent value tells whether entries
        # equal to the threshold were left out.
        top, indices = _top_entries(values, count_here + 1)
        extra = torch.argmin(top)
        keep = torch.arange(top.numel(), device=top.device) != extra
        following = top[extra]
        top, indices = top[keep], indices[keep]
    else:
        top = flat
        indices = torch.arange(flat.numel(), device=flat.device)
        following = flat.new_tensor(-torch.inf)
    if count_here < count:
        top = torch.cat([top, top.new_full((count - count_here,), -torch.inf)])
        indices = torch.cat([indices, indices.new_full((count - count_here,), -1)])
    return top, indices, following


def _candidate_threshold(
    values: torch.Tensor, budget: int, count: int, comm: Comm, sizes: list[int]
) -> tuple[torch.Tensor, ...] | None:
    """The ``budget``-th largest of every rank's top ``count``, with this rank's sent
    values, their flat indices and its largest unsent value; None if not exact.

    Every entry a rank did not send is at most the smallest value it sent, so the
    threshold is exact unless a truncated rank sent only values above it.
    """
    top, indices, following = _local_top_entries(values, count)
    gathered = comm.all_gather(top, SELECTION)
    threshold = torch.topk(gathered.flatten(), budget, sorted=False).values.min()
    truncated = torch.tensor([count < size for size in sizes], device=values.device)
    hiding = truncated & (gathered.amin(dim=1) > threshold)
    if bool(hiding.any()):  # the same answer on every rank
        return None
    return threshold, top, indices, following


@torch.no_grad()
def global_topk_indices(
    acts: torch.Tensor,
    budget: int,
    comm: Comm,
    sizes: list[int],
    oversample: float = 2.0,
) -> torch.Tensor:
    """Flat indices of this rank's entries among the global top-``budget``.

    ``acts`` is this rank's block (non-negative, any shape); ``sizes`` every rank's
    number of entries in rank order. Exactly ``budget`` entries are selected over
    all ranks (all of them if there are fewer); among entries equal to the
    threshold the lowest global flat index (rank, then row-major) wins. Selected
    entries equal to 0 are left out, as they contribute nothing.
    """
    flat = acts.reshape(-1)
    if budget <= 0:
        return torch.empty(0, dtype=torch.long, device=acts.device)
    if budget >= sum(sizes):
        return (flat > 0).nonzero().squeeze(1)
    largest = max(sizes)
    count = min(budget, largest, math.ceil(oversample * budget / comm.world_size))
    found = _candidate_threshold(acts, budget, count, comm, sizes)
    if found is None:  # every rank's top min(budget, entries) is always exact
        found = _candidate_threshold(acts, budget, min(budget, largest), comm, sizes)
    assert found is not None
    threshold, top, indices, following = found
    # Every local entry above the threshold was sent (exactness), so the sent
    # entries name them.
    if threshold <= 0:  # host sync; the same branch on every rank
        return indices[top > 0]
    above = indices[top > threshold]
    if following < threshold:  # every local entry equal to the threshold was sent
        tied = indices[top == threshold].sort().values
    else:  # the smallest sent value equals the threshold: ties may hide unsent
        tied = (flat == threshold).nonzero().squeeze(1)
    counts = torch.tensor([above.numel(), tied.numel()], device=acts.device)
    gathered = comm.all_gather(counts, SELECTION).tolist()
    need = budget - sum(count_above for count_above, _ in gathered)
    before = sum(count_ties for _, count_ties in gathered[: comm.rank])
    quota = max(0, min(need - before, tied.numel()))
    return torch.cat([above, tied[:quota]])


@torch.no_grad()
def global_feature_scores(
    acts: torch.Tensor, score: str, comm: Comm, chunk_bytes: int = 1 << 28
) -> torch.Tensor:
    """Sampled-SAE column scores of the global batch, float64 ``[d_sae]``.

    From per-feature float64 sums reduced over ranks (``T`` would otherwise lose
    digits against ``S log S``): ``l2 = sqrt(sum a^2)``, ``squared_l2 = sum a^2``,
    ``entropy = log S - T / S`` with ``S = sum a``, ``T = sum a log a`` (0 for an
    all-zero column); ``uniform`` needs no exchange. Summed over row chunks so that
    no float64 copy larger than ``chunk_bytes`` is made.
    """
    d_sae = acts.shape[-1]
    if score == "uniform":
        return torch.ones(d_sae, dtype=torch.float64, device=acts.device)
    check_choice("score", score, ("l2", "squared_l2", "entropy", "uniform"))
    rows = max(1, chunk_bytes // max(8 * d_sae, 1))
    sums = acts.new_zeros((2 if score == "entropy" else 1, d_sae), dtype=torch.float64)
    for chunk in acts.split(rows):
        chunk64 = chunk.to(torch.float64)
        if score == "entropy":
            sums[0] += chunk64.sum(dim=0)
            sums[1] += torch.special.xlogy(chunk64, chunk64).sum(dim=0)
        else:
            sums[0] += chunk64.square().sum(dim=0)
    comm.all_reduce(sums, "sum", SELECTION)
    if score == "l2":
        return sums[0].sqrt()
    if score == "squared_l2":
        return sums[0]
    total, weighted_log = sums
    positive = total > 0
    safe = torch.where(positive, total, 1.0)
    return torch.where(positive, safe.log() - weighted_log / safe, 0.0)


def _check_key_dtype(acts: torch.Tensor) -> None:
    if acts.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(
            "data-parallel feature_choice ranks float32, float16 or bfloat16 "
            f"activations exactly; got {acts.dtype} (train the SAE in float32, or "
            "under bf16 autocast)"
        )


def _pack_keys(
    values: torch.Tensor, rows: torch.Tensor, first_token: int
) -> torch.Tensor:
    """:func:`token_keys` of the entries ``values`` found at local ``rows``."""
    # + 0.0 turns -0.0 into +0.0, whose bits are 0
    bits = (values.float().clamp_min(0) + 0.0).view(torch.int32).to(torch.int64)
    return (bits << _TOKEN_BITS) | (_TOKEN_MASK - (first_token + rows))


def token_keys(acts: torch.Tensor, first_token: int) -> torch.Tensor:
    """Int64 keys ``(float32 bits of a) << 32 | (2**32 - 1 - global token)``.

    For ``a >= 0`` the keys order entries of a column by value, then by lower global
    token, and are unique within a column. Requires fewer than ``2**32`` tokens.
    """
    _check_key_dtype(acts)
    n_rows = acts.shape[0]
    if first_token + n_rows > _TOKEN_MASK:
        raise ValueError(f"global batch too large for 32-bit token keys: {n_rows}")
    rows = torch.arange(n_rows, device=acts.device, dtype=torch.int64)
    return _pack_keys(acts, rows[:, None], first_token)


def _depth_buckets(depths: torch.Tensor, n_rows: int) -> list[tuple[int, torch.Tensor]]:
    """Features grouped by ``topk`` depth (powers of two, capped at ``n_rows``)."""
    positive = depths > 0
    if not bool(positive.any()):
        return []
    levels = torch.ceil(torch.log2(depths.clamp_min(1).double())).long()
    levels = torch.where(positive, levels, -1)
    return [
        (min(n_rows, 1 << level), (levels == level).nonzero().squeeze(1))
        for level in levels[positive].unique().tolist()
    ]


def _column_top(
    block: torch.Tensor, wanted: torch.Tensor, depth: int, first_token: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each column's ``depth`` best entries by key (value, then lower token): keys
    and local rows, ``[depth, n_columns]``, sorted by value.

    A ``topk`` on the values decides it, except in a column whose ``wanted``-th and
    next values are equal and positive: which of the tied tokens make the cut then
    depends on the token, and that column is ranked on full keys.
    """
    probe = min(depth + 1, block.shape[0])
    top = torch.topk(block, probe, dim=0)
    values, rows = top.values[:depth], top.indices[:depth]
    if probe > depth:
        cut = wanted.clamp(max=depth)
        last = top.values.gather(0, (cut - 1).clamp(min=0)[None])[0]
        after = top.values.gather(0, cut[None])[0]
        tied = ((cut > 0) & (last == after) & (last > 0)).nonzero().squeeze(1)
        if tied.numel():  # host sync
            keys = token_keys(block.index_select(1, tied), first_token)
            rows = rows.clone()
            rows[:, tied] = torch.topk(keys, depth, dim=0).indices
            values = block.gather(0, rows)
    return _pack_keys(values, rows, first_token), rows


def column_top_keys(
    acts: torch.Tensor, depths: torch.Tensor, n_rows_max: int, first_token: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each column's ``depths[j]`` largest keys, feature-major, padded with ``-1``.

    ``acts`` is ``[n_rows, d_sae]``; ``depths`` long ``[d_sae]`` with every entry
    at most ``n_rows_max``; keys as :func:`token_keys` with rows numbered from
    ``first_token``, built for the candidates only. Returns ``(keys, columns,
    rows)`` of length ``sum(depths)``: the layout (which column each position
    belongs to) depends only on ``depths`` and ``n_rows_max``, so it is the same on
    every rank; a rank with fewer than ``depths[j]`` rows pads with key ``-1``
    (row ``-1``).
    """
    _check_key_dtype(acts)
    n_rows = acts.shape[0]
    parts_keys, parts_cols, parts_rows = [], [], []
    for depth, columns in _depth_buckets(depths, n_rows_max):
        wanted = depths[columns]
        here = min(depth, n_rows)
        block = acts.index_select(1, columns)
        top_keys, top_rows = _column_top(block, wanted, here, first_token)
        if here < depth:
            pad_shape = (depth - here, columns.numel())
            top_keys = torch.cat([top_keys, top_keys.new_full(pad_shape, -1)])
            top_rows = torch.cat([top_rows, top_rows.new_full(pad_shape, -1)])
        rank = torch.arange(depth, device=acts.device)[:, None]
        keep = (rank < wanted[None, :]).t()  # feature-major
        parts_keys.append(top_keys.t()[keep])
        parts_rows.append(top_rows.t()[keep])
        parts_cols.append(columns[:, None].expand(-1, depth)[keep])
    if not parts_keys:
        empty = torch.empty(0, dtype=torch.int64, device=acts.device)
        return empty, empty.clone(), empty.clone()
    return torch.cat(parts_keys), torch.cat(parts_cols), torch.cat(parts_rows)


def _segment_kth(
    keys: torch.Tensor,
    columns: torch.Tensor,
    segment_lengths: torch.Tensor,
    ks: torch.Tensor,
) -> torch.Tensor:
    """Per column j, the ``ks[j]``-th largest of the ``segment_lengths[j]`` keys
    whose column is j; ``ks[j] = 0`` gives the largest int64 (nothing passes ``>=``
    it)."""
    order = torch.argsort(keys, descending=True, stable=True)
    order = order[torch.argsort(columns[order], stable=True)]
    ordered = keys[order]
    starts = segment_lengths.cumsum(0) - segment_lengths
    cut = torch.full_like(ks, torch.iinfo(torch.int64).max)
    has = ks > 0
    cut[has] = ordered[starts[has] + ks[has] - 1]
    return cut


def feature_choice_layout_bytes(
    n_candidates: int, d_sae: int, world: int
) -> dict[str, float]:
    """Bytes one rank sends to find the cuts, for each exchange layout.

    ``all_gather``: every rank's ``L`` candidate keys to every rank. ``all_to_all``
    (features sharded over ranks): each rank sends its candidates to the owners of
    their features, owners find the cuts of their ``d_sae / W`` features, and the
    cuts are all-gathered.
    """
    block = -(-d_sae // world)
    return {
        "all_gather": 8.0 * n_candidates * (world - 1),
        "all_to_all": 8.0 * n_candidates * (world - 1) / world
        + 8.0 * block * (world - 1),
    }


def _cuts_all_to_all(
    cand_keys: torch.Tensor,
    cand_cols: torch.Tensor,
    depths: torch.Tensor,
    ks: torch.Tensor,
    comm: Comm,
) -> torch.Tensor:
    """Every feature's cut, found by the rank that owns the feature.

    Rank q owns features ``q, q + W, q + 2W, ...``: round-robin, so that the
    largest capacities (Zipf heads, adjacent in rank or index) spread over ranks.
    """
    rank, world = comm.rank, comm.world_size
    owner = cand_cols % world
    order = torch.argsort(owner, stable=True)
    # The layout is the same on every rank, so are these counts.
    counts = torch.bincount(owner, minlength=world).tolist()
    mine = counts[rank]
    received = comm.all_to_all(cand_keys[order], counts, [mine] * world, SELECTION)
    start = sum(counts[:rank])
    my_cols = cand_cols[order][start : start + mine] // world
    cut_mine = _segment_kth(
        received, my_cols.repeat(world), world * depths[rank::world], ks[rank::world]
    )
    block = -(-depths.numel() // world)
    padded = cut_mine.new_full((block,), torch.iinfo(torch.int64).max)
    padded[: cut_mine.numel()] = cut_mine
    gathered = comm.all_gather(padded, SELECTION)
    cut = torch.empty_like(ks)
    for owner_rank in range(world):
        owned = cut[owner_rank::world]
        owned.copy_(gathered[owner_rank, : owned.numel()])
    return cut


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
    check_choice("layout", layout, FEATURE_CHOICE_LAYOUTS)
    rank, world = comm.rank, comm.world_size
    n_rows_max = max(shard_rows)
    depths = capacities.clamp(0, n_rows_max)
    ks = capacities.clamp(0, sum(shard_rows))
    cand_keys, cand_cols, cand_rows = column_top_keys(
        acts, depths, n_rows_max, sum(shard_rows[:rank])
    )
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
