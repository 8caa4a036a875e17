"""Plain dense references for the selection rules and the training loss.

Written from the rules' definitions, not from the implementation: full sorts instead
of top-k searches, a bisection instead of the piecewise-linear capacity solve, float64
throughout. They are slow and obviously correct on the small matrices the tests use.

The tie rule every reference applies (and that ``docs/reliability.md`` states): of
entries with equal values, the one earlier in row-major order (lower token index, then
lower feature index; within one feature, lower token index) ranks first. Entries that
are not positive are never selected. A stable sort by descending value gives exactly
that order.
"""

from __future__ import annotations

import math

import torch


def budget(k: float, n_tokens: int) -> int:
    """Entries a batch keeps: ``k * n`` rounded half to even."""
    return int(round(k * n_tokens))


def ranked_first(values: torch.Tensor, dim: int) -> torch.Tensor:
    """Rank (0 = first) of each entry along ``dim``: descending value, then index."""
    order = torch.sort(values, dim=dim, descending=True, stable=True).indices
    ranks = torch.empty_like(order)
    positions = torch.arange(values.shape[dim]).view(
        [-1 if i == dim else 1 for i in range(values.dim())]
    )
    ranks.scatter_(dim, order, positions.expand_as(order))
    return ranks


def batch_topk_mask(values: torch.Tensor, keep: int) -> torch.Tensor:
    """Positive entries among the ``keep`` first of the whole matrix (row-major ties)."""
    ranks = ranked_first(values.flatten(), 0).view_as(values)
    return (ranks < keep) & (values > 0)


def feature_choice_mask(values: torch.Tensor, capacities: torch.Tensor) -> torch.Tensor:
    """Positive entries among each column's ``capacities[j]`` first tokens."""
    ranks = ranked_first(values, 0)
    return (ranks < capacities[None, :]) & (values > 0)


def feature_scores(values: torch.Tensor, score: str) -> torch.Tensor:
    """Column scores in float64, from their definitions."""
    values = values.to(torch.float64)
    if score == "l2":
        return values.pow(2).sum(0).sqrt()
    if score == "squared_l2":
        return values.pow(2).sum(0)
    if score == "entropy":
        out = torch.zeros(values.shape[1], dtype=torch.float64)
        for j in range(values.shape[1]):
            column = values[:, j]
            total = float(column.sum())
            if total > 0:
                p = column[column > 0] / total
                out[j] = -(p * p.log()).sum()
        return out
    if score == "uniform":
        return torch.ones(values.shape[1], dtype=torch.float64)
    raise ValueError(score)


def pool_size(k: float, pool_factor: float, d_sae: int) -> int:
    return max(1, min(d_sae, int(round(k * pool_factor))))


def pool(
    scores: torch.Tensor, size: int, mode: str, generator: torch.Generator | None
) -> torch.Tensor:
    """Boolean ``[d_sae]`` pool membership.

    ``top``: the ``size`` best scores, lower feature index first on ties. ``sample``:
    Gumbel-top-k on the log score with one float64 uniform per feature drawn from
    ``generator``; features scoring 0 rank after every positive one.
    """
    member = torch.zeros(scores.shape[0], dtype=torch.bool)
    if mode == "top":
        member[ranked_first(scores, 0) < size] = True
        return member
    uniform = torch.rand(scores.shape, generator=generator, dtype=torch.float64)
    keys = []
    for j, u in enumerate(uniform.tolist()):
        gumbel = -math.log(-math.log(max(u, 1e-300)))
        s = float(scores[j])
        keys.append((0 if s > 0 else 1, -(math.log(s) + gumbel) if s > 0 else -gumbel))
    chosen = sorted(range(len(keys)), key=lambda j: keys[j])[:size]
    member[chosen] = True
    return member


def sampled_mask(
    values: torch.Tensor,
    k: float,
    pool_factor: float,
    score: str,
    mode: str,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """Batch top-k restricted to the pool's columns (row-major ties)."""
    n, d_sae = values.shape
    size = pool_size(k, pool_factor, d_sae)
    if size >= d_sae:
        return batch_topk_mask(values, budget(k, n))
    member = pool(feature_scores(values, score), size, mode, generator)
    restricted = torch.where(member[None, :], values, torch.zeros_like(values))
    return batch_topk_mask(restricted, budget(k, n)) & member[None, :]


def capacities(fractions: torch.Tensor, n_tokens: int, keep: int) -> torch.Tensor:
    """Feature Choice capacities from their definition, solved by bisection.

    ``m_j = clamp(s * w_j, 1, n)`` with the scale ``s`` that makes them sum to
    ``keep``, rounded by largest remainder (ties: larger fraction, then lower index);
    ``keep < d_sae`` gives one token to the ``keep`` first features by priority.
    """
    d_sae = fractions.shape[0]
    keep = max(0, min(keep, n_tokens * d_sae))
    priority = ranked_first(fractions.double(), 0)
    out = torch.zeros(d_sae, dtype=torch.long)
    if keep <= d_sae:
        out[priority < keep] = 1
        return out
    if keep == n_tokens * d_sae:
        return out.fill_(n_tokens)
    w = [float(f) for f in fractions.double() / fractions.double().max()]
    w = [max(x, 1e-200) for x in w]

    def total(s: float) -> float:
        return sum(min(max(s * x, 1.0), n_tokens) for x in w)

    low, high = 0.0, n_tokens / min(w)
    for _ in range(200):
        mid = (low + high) / 2
        low, high = (mid, high) if total(mid) < keep else (low, mid)
    real = [min(max(high * x, 1.0), n_tokens) for x in w]
    floors = [math.floor(r) for r in real]
    short = keep - sum(floors)
    by_remainder = sorted(
        range(d_sae), key=lambda j: (-(real[j] - floors[j]), int(priority[j]))
    )
    for j in by_remainder[: max(short, 0)]:
        floors[j] += 1
    return torch.tensor(floors, dtype=torch.long)


def training_loss(
    params: dict[str, torch.Tensor],
    x: torch.Tensor,
    mask: torch.Tensor,
    *,
    rescale: bool,
    normalize: str,
    apply_b_dec_to_input: bool = True,
) -> torch.Tensor:
    """The training MSE loss of a TopK-family SAE with a fixed selection ``mask``.

    ``params`` hold float64 leaves (``W_enc``, ``b_enc``, ``W_dec``, ``b_dec``);
    ``x`` is ``[n, d_in]``. Run-time normalisations follow SAELens's definitions;
    the other ``normalize_activations`` values act outside the SAE.
    """
    W_enc, b_enc, W_dec, b_dec = (
        params[n] for n in ("W_enc", "b_enc", "W_dec", "b_dec")
    )
    x = x.to(torch.float64)
    if normalize == "constant_norm_rescale":
        coeff = x.shape[-1] ** 0.5 / x.norm(dim=-1, keepdim=True)
        sae_in = x * coeff
    elif normalize == "layer_norm":
        mu = x.mean(dim=-1, keepdim=True)
        std = (x - mu).std(dim=-1, keepdim=True)
        sae_in = (x - mu) / (std + 1e-5)
    else:
        sae_in = x
    if apply_b_dec_to_input:
        sae_in = sae_in - b_dec
    norms = W_dec.norm(dim=-1)
    acts = (sae_in @ W_enc + b_enc).relu()
    codes = (acts * norms if rescale else acts) * mask
    if rescale:
        # a zero decoder row has zero codes, and contributes nothing
        live = norms > 0
        codes = torch.where(live, codes / torch.where(live, norms, 1.0), 0.0)
    recons = codes @ W_dec + b_dec
    if normalize == "constant_norm_rescale":
        recons = recons / coeff
    elif normalize == "layer_norm":
        recons = recons * std + mu
    return (recons - x).pow(2).sum(dim=-1).mean()
