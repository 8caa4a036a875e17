"""The metrics of ``compare``: their names, in one place, and the evaluator for
activations without ground truth.

Every result holds every metric below; a metric a data source cannot measure is
``None`` (e.g. ``mcc`` without ground-truth features, ``ce_loss_score`` without a
language model).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from sae_lens.evals import ExplainedVarianceCalculator
from sae_lens.synthetic.evals import (
    DeadLatentsCalculator,
    L0Calculator,
    ShrinkageCalculator,
)

from sae_lens_sampled.benchmark.probing import PROBE_METRICS

# Measured once per encode rule: per token on the exported inference SAE (no
# suffix), under the training SAE's batch rule and per token with calibrated
# thresholds (the suffixes of RULES).
RULE_METRICS: tuple[str, ...] = (
    "l0",
    "explained_variance",
    "dead_features",
    "f1",
    "shrinkage",
    "ce_loss_score",
)
RULES: tuple[str, ...] = ("", "_batch", "_calibrated")

# Against ground-truth features; None without ground truth. Per token, except
# ``absorption_batch``. ``absorption`` is the fraction of parent-feature tokens
# absorbed by a child latent, in [0, 1] (docs/absorption.md), per token and under
# the batch rule.
GROUND_TRUTH_METRICS: tuple[str, ...] = (
    "mcc",
    "uniqueness",
    "precision",
    "recall",
    "true_l0",
    "absorption",
    "absorption_batch",
)

# Summarised over seeds: ``<metric>_mean`` and ``<metric>_std`` per run label.
SUMMARY_METRICS: tuple[str, ...] = (
    *(name + rule for rule in RULES for name in RULE_METRICS),
    *GROUND_TRUTH_METRICS,
    "l0_train",
    "dead_features_train",
    "tokens_per_second",
    # Sparse probing, only with labels (compare --labels).
    *PROBE_METRICS,
)


def finite(value: Any) -> float | None:
    """``value`` as a float, or None when it is None, NaN or infinite."""
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def rule_fields(metrics: dict[str, Any] | None, suffix: str) -> dict[str, Any]:
    """The RULE_METRICS of one encode rule under their result keys (None if absent)."""
    metrics = metrics or {}
    return {name + suffix: metrics.get(name) for name in RULE_METRICS}


def ground_truth_fields(metrics: dict[str, Any] | None) -> dict[str, Any]:
    metrics = metrics or {}
    return {name: metrics.get(name) for name in GROUND_TRUTH_METRICS}


@torch.no_grad()
def evaluate_on_activations(
    sae: Any, batches: Iterable[torch.Tensor]
) -> dict[str, Any]:
    """L0, explained variance, dead features and shrinkage of ``sae`` on ``batches``.

    The same calculators as SAELens's ``eval_sae_on_synthetic_data``, so both modes
    define the metrics identically; each batch is encoded as one call, so a batch
    rule selects over it.
    """
    if hasattr(sae, "eval"):
        sae.eval()
    l0 = L0Calculator()
    dead = DeadLatentsCalculator(sae.W_dec.shape[0])
    shrinkage = ShrinkageCalculator()
    explained = ExplainedVarianceCalculator()
    n_rows = 0
    for batch in batches:
        batch = batch.to(sae.W_dec.device, sae.W_dec.dtype)
        latents = sae.encode(batch)
        output = sae.decode(latents)
        l0.add_batch(latents)
        dead.add_batch(latents)
        shrinkage.add_batch(output, batch)
        explained.add_batch(output, batch)
        n_rows += batch.shape[0]
    if n_rows == 0:
        raise ValueError("evaluate_on_activations needs at least one row, got none")
    return {
        "l0": l0.compute(),
        "explained_variance": finite(explained.compute()),
        "dead_features": dead.compute(),
        "shrinkage": finite(shrinkage.compute()),
    }
