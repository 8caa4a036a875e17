"""Mutual Choice SAE (Ayonrinde, arXiv 2411.02124): unrestricted batch allocation.

The batch keeps its ``round(k * B)`` largest activations over the whole token x feature
matrix, which is SAELens's BatchTopK selection. What this architecture adds: its own
registry key, the ``aux_zipf`` loss, rate-matched per-feature inference thresholds
(or BatchTopK's global one), and a per-token inference SAE that also offers the
batch rule.
"""

from dataclasses import dataclass

import torch

from sae_lens_sampled._registry import Architecture
from sae_lens_sampled.global_batch import BatchTraffic, GlobalBatch
from sae_lens_sampled.saes.base import (
    BatchLevelSAE,
    BatchLevelSAEConfig,
    BatchLevelTrainingSAE,
    BatchLevelTrainingSAEConfig,
)
from sae_lens_sampled.selection import batch_budget

ARCHITECTURE = "mutual_choice"


@dataclass
class MutualChoiceTrainingSAEConfig(BatchLevelTrainingSAEConfig):
    """Configuration for training a Mutual Choice SAE (shared fields:
    :class:`BatchLevelTrainingSAEConfig`).

    Args:
        k (float): Mean active features per token; a batch of B tokens keeps its
            ``round(k * B)`` largest activations (SAELens BatchTopK truncates
            ``k * B`` instead; they agree whenever ``k * B`` is whole).
        threshold_mode (str): Per-token inference thresholds: ``"rate"`` (default;
            each feature fires per token as often as the batch rule selects it),
            ``"global"`` (one EMA of the batch's smallest selected activation,
            BatchTopK's convention) or ``"per_feature"`` (an EMA per feature).
    """

    architecture_key = ARCHITECTURE


class MutualChoiceTrainingSAE(BatchLevelTrainingSAE):
    """Mutual Choice training SAE: global top-``k * B`` over the batch."""

    cfg: MutualChoiceTrainingSAEConfig


@dataclass
class MutualChoiceSAEConfig(BatchLevelSAEConfig):
    """Configuration for a Mutual Choice inference SAE."""

    architecture_key = ARCHITECTURE


class MutualChoiceSAE(BatchLevelSAE):
    """Mutual Choice inference SAE: per-token thresholds; ``encode_batch`` for the rule."""

    cfg: MutualChoiceSAEConfig


def mutual_choice_rule(
    sae: MutualChoiceTrainingSAE | MutualChoiceSAE,
    acts: torch.Tensor,
    batch: GlobalBatch,
) -> torch.Tensor:
    """Keep the batch's ``round(k * B)`` largest activations."""
    return batch.batch_topk(acts, batch_budget(sae.cfg.k, batch.n_tokens))


def mutual_choice_traffic(
    cfg: MutualChoiceTrainingSAEConfig, n_tokens: int, costs: BatchTraffic
) -> float:
    """One global top ``round(k * B)``."""
    return costs.batch_topk(batch_budget(cfg.k, n_tokens), cfg.d_sae)


ENTRY = Architecture(
    ARCHITECTURE,
    MutualChoiceSAE,
    MutualChoiceSAEConfig,
    MutualChoiceTrainingSAE,
    MutualChoiceTrainingSAEConfig,
    mutual_choice_rule,
    mutual_choice_traffic,
)
