"""The ``aux_zipf`` auxiliary loss and the aux-k core it generalises.

``aux_zipf`` (Ayonrinde, arXiv 2411.02124) is SAELens's aux-k loss with the set of
dead features replaced by a larger set of *underutilised* ones: features whose firing
rate lies below ``tau`` times the rate a Zipf law over usage ranks would give them.
Everything here is a pure tensor function with no SAELens import and no host sync, so
the training step can run them on every batch.
"""

from __future__ import annotations

import torch

from sae_lens_sampled.selection import usage_ranks


def zipf_targets(
    n_features: int,
    k: float,
    alpha: float,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Target firing rates by rank (entry ``r - 1`` for rank ``r``),
    ``p_r ~ r ** -alpha`` with ``sum_r p_r = k`` (``0 < k <= n_features``). No rate
    exceeds 1: capped ranks hand their excess to the ranks below in proportion to
    the Zipf weights, as feature_choice's capacities do.
    """
    ranks = torch.arange(1, n_features + 1, dtype=dtype, device=device)
    weights = ranks.pow(-alpha)
    # With the first m ranks capped at 1, the rest share k - m by weight:
    # p_r = c_m * w_r with c_m = (k - m) / sum_{r > m} w_r. The answer is the
    # smallest m whose uncapped head is at most 1, i.e. c_m * w_{m+1} <= 1.
    tail_sums = weights.flip(0).cumsum(0).flip(0)  # tail_sums[m] = sum_{r > m} w_r
    m = torch.arange(n_features, dtype=dtype, device=device)
    scale = (k - m) / tail_sums
    # the relative slack absorbs rounding when the cap is exactly reached
    fits = scale * weights <= 1 + 1e-12
    n_capped = fits.to(torch.uint8).argmax()  # first True; k <= n guarantees one
    scaled = scale.gather(0, n_capped[None]) * weights  # no .item(): stays on device
    return torch.where(m < n_capped, torch.ones_like(scaled), scaled).clamp(max=1)


def feature_zipf_targets(
    firing_rate: torch.Tensor, k: float, alpha: float
) -> torch.Tensor:
    """Each feature's Zipf target, ``p_(rank_j)``, for its current usage rank."""
    targets = zipf_targets(
        firing_rate.numel(), k, alpha, firing_rate.dtype, firing_rate.device
    )
    return targets[usage_ranks(firing_rate) - 1]


def underutilised_mask(
    firing_rate: torch.Tensor,
    k: float,
    alpha: float,
    tau: float,
    dead_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """``U = {j : rate_j < tau * p_(rank_j)}``, joined with ``dead_mask`` if given.

    ``tau = 0`` leaves exactly ``dead_mask`` (all False without one).
    """
    targets = feature_zipf_targets(firing_rate, k, alpha)
    mask = firing_rate < tau * targets
    if dead_mask is not None:
        mask = mask | dead_mask.to(device=mask.device, dtype=torch.bool)
    return mask


def masked_topk_aux_acts(
    hidden_pre: torch.Tensor, mask: torch.Tensor, k_aux: int
) -> torch.Tensor:
    """Per token, the ``k_aux`` largest pre-activations among ``mask``'s features, at
    their places in a zero ``[..., d_sae]`` tensor: SAELens's
    ``calculate_topk_aux_acts`` with a fixed ``k_aux`` (cutting it to the mask's size
    would sync); picks outside a mask of fewer features are zeroed.
    """
    mask = mask.to(device=hidden_pre.device, dtype=torch.bool)
    candidates = torch.where(mask, hidden_pre, -torch.inf)
    top = candidates.topk(k_aux, dim=-1, sorted=False)
    values = torch.where(mask[top.indices], top.values, 0.0)
    # in place on the fresh zeros, so no second dense tensor is made
    return torch.zeros_like(hidden_pre).scatter_(-1, top.indices, values)


def aux_k_budget(d_in: int, d_sae: int) -> int:
    """SAELens's ``k_aux = d_in // 2`` (at least 1), capped at the number of features."""
    return min(max(d_in // 2, 1), d_sae)


def aux_k_scale(mask: torch.Tensor, d_in: int) -> torch.Tensor:
    """SAELens's loss scale ``min(|mask| / (d_in // 2), 1)``, as a tensor (no sync)."""
    return (mask.sum() / max(d_in // 2, 1)).clamp(max=1.0)


def fit_zipf_exponent(firing_rate: torch.Tensor) -> torch.Tensor:
    """Least-squares ``alpha`` of ``log rate = c - alpha * log rank`` over the
    positive rates in decreasing order (``r ** -1.5`` gives 1.5); NaN when fewer
    than two are positive."""
    rates = firing_rate.to(torch.float64).sort(descending=True).values
    positive = rates > 0
    weight = positive.to(torch.float64)
    n = weight.sum()
    log_rank = torch.arange(
        1, rates.numel() + 1, dtype=torch.float64, device=rates.device
    ).log()
    log_rate = torch.where(positive, rates, 1.0).log()
    mean_x = (weight * log_rank).sum() / n
    mean_y = (weight * log_rate).sum() / n
    cov = (weight * (log_rank - mean_x) * (log_rate - mean_y)).sum()
    var = (weight * (log_rank - mean_x).pow(2)).sum()
    slope = cov / var
    return torch.where(n >= 2, -slope, torch.nan)


def dead_by_rate(
    firing_rate: torch.Tensor, n_tokens_seen: torch.Tensor, horizon_tokens: int
) -> torch.Tensor:
    """Features whose expected firings in the firing-rate EMA's window
    (``min(n_tokens_seen, horizon_tokens)`` tokens) are below 1/2: not selected
    within it (one selection in a plain running mean counts as alive). Unlike the
    trainer's dead mask it counts tokens, not steps, and lives in the SAE's state.
    """
    window = n_tokens_seen.clamp(min=1, max=horizon_tokens)
    return firing_rate * window.to(firing_rate.dtype) < 0.5
