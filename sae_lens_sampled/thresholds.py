"""Inference thresholds: EMA updates during training, calibration and JumpReLU export.

Batch-level rules depend on the other tokens in a batch, so the inference SAEs encode
each token alone with a JumpReLU-form rule ``acts * (hidden_pre > threshold)``. The
thresholds are learned during training by the EMA updates below (pure tensor functions,
no host sync), re-fitted on held-out activations by :func:`calibrate_thresholds`, and
handed to tools that never import this plugin by :func:`export_jumprelu`.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch


@torch.no_grad()
def column_stats_dense(feature_acts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per feature of ``[n, d_sae]`` codes: positive count, smallest positive value.

    The smallest is ``inf`` for a feature with no positive entry. These two vectors are
    all the threshold and firing-rate updates read (``sparse.column_stats`` computes
    them from the selected entries alone).
    """
    counts = (feature_acts > 0).sum(dim=0)
    if feature_acts.shape[0] == 0:  # amin has no identity for an empty dim
        return counts, feature_acts.new_full(counts.shape, torch.inf)
    smallest = torch.where(feature_acts > 0, feature_acts, torch.inf).amin(dim=0)
    return counts, smallest


@torch.no_grad()
def update_global_threshold(
    threshold: torch.Tensor, smallest: torch.Tensor, lr: float
) -> torch.Tensor:
    """BatchTopK's rule: EMA of the smallest positive selected activation of the batch.

    ``threshold`` is a ``[d_sae]`` vector holding one shared value, ``smallest`` each
    feature's smallest positive selection in the batch (``inf`` if none). The threshold
    starts at ``inf`` and the first batch with a positive activation sets it outright
    (BatchTopK starts from 0, which makes early per-token encodes fire far too often);
    a batch with no positive activation leaves it unchanged.
    """
    batch_min = smallest.amin().to(threshold.dtype)
    updated = torch.where(
        torch.isfinite(threshold), (1 - lr) * threshold + lr * batch_min, batch_min
    )
    return torch.where(torch.isfinite(batch_min), updated, threshold)


@torch.no_grad()
def update_per_feature_threshold(
    threshold: torch.Tensor, smallest: torch.Tensor, lr: float
) -> torch.Tensor:
    """Per-feature EMA of each feature's smallest positive selected activation.

    Only features selected in this batch (finite ``smallest``) move. A feature's first
    selection sets its threshold outright (it starts at ``inf``: never selected, never
    fires).
    """
    batch_min = smallest.to(threshold.dtype)
    seen = torch.isfinite(threshold)
    updated = torch.where(seen, (1 - lr) * threshold + lr * batch_min, batch_min)
    return torch.where(torch.isfinite(batch_min), updated, threshold)


@torch.no_grad()
def update_firing_rate(
    firing_rate: torch.Tensor,
    counts: torch.Tensor,
    n_tokens: int,
    n_tokens_seen: torch.Tensor,
    horizon_tokens: int,
) -> torch.Tensor:
    """EMA of the fraction of tokens on which each feature is selected.

    ``counts`` are this batch's per-feature selection counts over ``n_tokens`` tokens;
    ``n_tokens_seen`` counts tokens including this batch. The batch's weight is
    ``n_tokens / min(n_tokens_seen, horizon_tokens)``: the plain running mean until the
    horizon is reached, an EMA with that horizon after, so early estimates carry no
    zero bias. Runs on device without a host sync.
    """
    if n_tokens == 0:
        return firing_rate
    batch_rate = counts.to(firing_rate.dtype) / n_tokens
    weight = n_tokens / n_tokens_seen.clamp(min=n_tokens, max=horizon_tokens)
    return firing_rate + weight.clamp(max=1.0) * (batch_rate - firing_rate)


@torch.no_grad()
def thresholds_matching_counts(
    hidden_pre: torch.Tensor, fire_counts: torch.Tensor
) -> torch.Tensor:
    """Per-feature thresholds under which feature j fires on ``fire_counts[j]`` tokens.

    ``hidden_pre`` is ``[n, d_sae]``. Feature j's threshold is its
    ``(fire_counts[j] + 1)``-th largest pre-activation, so that exactly
    ``fire_counts[j]`` tokens lie strictly above it (fewer on ties); a feature that
    never fired gets ``inf`` and one that fired on every token gets ``-inf``.
    """
    n_tokens = hidden_pre.shape[0]
    ordered = hidden_pre.sort(dim=0, descending=True).values
    counts = fire_counts.to(torch.long).clamp(0, n_tokens)
    picked = ordered.gather(0, counts.clamp(max=n_tokens - 1)[None]).squeeze(0)
    thresholds = picked.to(torch.float64)
    thresholds = torch.where(counts == n_tokens, -torch.inf, thresholds)
    return torch.where(counts == 0, torch.inf, thresholds)


@torch.no_grad()
def calibrate_thresholds(sae: Any, batches: Iterable[torch.Tensor]) -> torch.Tensor:
    """Re-fit ``sae``'s per-token thresholds on held-out activations.

    Each batch of activations (``[n, d_in]`` or ``[..., d_in]``) is encoded with the
    architecture's batch rule; every feature's threshold is then set so that per-token
    inference fires it on as many of these tokens as the batch rule did. Works on the
    plugin's inference SAEs and training SAEs alike and returns the new thresholds
    (float64). All pre-activations are held in memory at once: a few thousand tokens
    are enough.
    """
    pre_chunks: list[torch.Tensor] = []
    counts: torch.Tensor | None = None
    for batch in batches:
        hidden_pre = sae.hidden_pre(batch).flatten(end_dim=-2)
        selected = sae.select(hidden_pre.relu())
        fired = (selected > 0).sum(dim=0)
        counts = fired if counts is None else counts + fired
        pre_chunks.append(hidden_pre)
    if counts is None:
        raise ValueError("calibrate_thresholds needs at least one batch, got none")
    thresholds = thresholds_matching_counts(torch.cat(pre_chunks), counts)
    sae.set_thresholds(thresholds)
    return thresholds


@torch.no_grad()
def export_jumprelu(sae: Any, path: str | Path | None = None) -> Any:
    """Convert a plugin SAE into a plain SAELens ``JumpReLUSAE``.

    ``sae`` is one of the plugin's inference SAEs or training SAEs (training SAEs are
    converted exactly as ``save_inference_model`` would). The result's per-token
    ``encode`` equals the plugin's inference ``encode``; the batch rule and its state
    (capacities, pool settings) are not carried over, since ``jumprelu`` has no place
    for them. With ``path``, the SAE is also saved there (``cfg.json`` with
    architecture ``"jumprelu"``), loadable by any SAELens install without this plugin.
    """
    from sae_lens import JumpReLUSAE, JumpReLUSAEConfig, TrainingSAE

    state_dict = sae.state_dict()
    if isinstance(sae, TrainingSAE):
        sae.process_state_dict_for_saving_inference(state_dict)
    cfg_dict = {
        name: getattr(sae.cfg, name)
        for name in JumpReLUSAEConfig.__dataclass_fields__
        if hasattr(sae.cfg, name)
    }
    jumprelu = JumpReLUSAE(JumpReLUSAEConfig(**cfg_dict))
    wanted = jumprelu.state_dict().keys()
    jumprelu.load_state_dict(
        {name: state_dict[name].to(jumprelu.dtype) for name in wanted}
    )
    jumprelu.to(sae.device)
    if path is not None:
        jumprelu.save_model(path)
    return jumprelu
