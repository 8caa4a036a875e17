"""Feature Choice SAE (Ayonrinde, arXiv 2411.02124): each feature picks its tokens.

In a batch of B tokens, feature j keeps its ``m_j`` largest activations over the
tokens. The capacities sum to the batch budget ``round(k * B)`` and each is at least
one token, so every feature whose pre-activation is positive somewhere in the batch
fires: no feature can die. Capacities follow a Zipf law over the features' usage
ranks (re-ranked every ``rerank_every`` steps from the firing-rate EMA), a Zipf law
over feature indices, or are uniform. They are stored as fractions of the batch, so
any number of tokens (evals on ``[batch, seq]``) gets capacities in proportion.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Literal

import torch
from typing_extensions import override

from sae_lens_sampled._registry import Architecture
from sae_lens_sampled.global_batch import BatchTraffic, GlobalBatch
from sae_lens_sampled.saes.base import (
    BatchLevelSAE,
    BatchLevelSAEConfig,
    BatchLevelTrainingSAE,
    BatchLevelTrainingSAEConfig,
    check_choice,
    check_range,
)
from sae_lens_sampled.selection import (
    CAPACITY_SCHEDULES,
    CapacitySchedule,
    batch_budget,
    batch_topk_counts,
    capacities_for_batch,
    uniform_capacity_fractions,
    usage_ranks,
    zipf_capacity_fractions,
)
from sae_lens_sampled.thresholds import FiringRate

ARCHITECTURE = "feature_choice"

RankBy = Literal["firing_rate", "demand"]
RANK_BY: tuple[str, ...] = ("firing_rate", "demand")


def validate_capacity_fields(
    cfg: FeatureChoiceTrainingSAEConfig | FeatureChoiceSAEConfig,
) -> None:
    check_choice("capacity_schedule", cfg.capacity_schedule, CAPACITY_SCHEDULES)
    check_range("zipf_alpha", cfg.zipf_alpha, low=0, low_inclusive=False)


def storable_fractions(fractions: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``fractions`` rounded to ``dtype`` and back to float64.

    ``load_from_disk`` casts every buffer to the SAE's dtype. Rounding once here means
    the training SAE and any reloaded copy derive bit-identical capacities, instead
    of largest-remainder ties flipping on float32 noise.
    """
    if dtype.is_floating_point and dtype.itemsize < 8:
        fractions = fractions.to(dtype)
    return fractions.to(torch.float64)


def initial_capacity_fractions(
    schedule: str, d_sae: int, k: float, alpha: float, device: torch.device | str
) -> torch.Tensor:
    """Capacities before any usage is known: uniform, or Zipf by feature index."""
    if schedule == "uniform":
        return uniform_capacity_fractions(d_sae, k, device)
    ranks = torch.arange(1, d_sae + 1, device=device)
    return zipf_capacity_fractions(ranks, k, alpha)


def capacities_from_fractions(
    fractions: torch.Tensor, k: float, n_tokens: int
) -> torch.Tensor:
    """Capacities ``m_j`` of a batch of ``n_tokens``, summing to ``round(k * n)``."""
    return capacities_for_batch(fractions, n_tokens, batch_budget(k, n_tokens))


# Traced as a constant by torch.compile: a host int of the configuration alone.
@torch._dynamo.assume_constant_result  # type: ignore[untyped-decorator]
def capacity_bound(
    schedule: str, d_sae: int, k: float, alpha: float, dtype: torch.dtype, n_tokens: int
) -> int:
    """The largest capacity of the schedule's fractions (stored in ``dtype``) in a
    batch of ``n_tokens``, plus one, at most ``n_tokens``."""
    return _capacity_bound(schedule, d_sae, k, alpha, dtype, n_tokens)


@functools.cache
def _capacity_bound(
    schedule: str, d_sae: int, k: float, alpha: float, dtype: torch.dtype, n_tokens: int
) -> int:
    if n_tokens == 0:
        return 0
    fractions = initial_capacity_fractions(schedule, d_sae, k, alpha, "cpu")
    fractions = storable_fractions(fractions, dtype)
    capacities = capacities_from_fractions(fractions, k, n_tokens)
    return min(int(capacities.max()) + 1, n_tokens)


@dataclass
class FeatureChoiceTrainingSAEConfig(BatchLevelTrainingSAEConfig):
    """Configuration for training a Feature Choice SAE (shared fields:
    :class:`BatchLevelTrainingSAEConfig`).

    Args:
        k (float): Mean active features per token, in (0, d_sae]; a batch of B tokens
            has the budget ``round(k * B)``, shared out as per-feature capacities.
        capacity_schedule (str): How the budget is shared out: ``"zipf"`` (default;
            ``m_j ~ rank_j ** -zipf_alpha`` with rank 1 the most used feature by
            ``rank_by``, re-ranked every ``rerank_every`` steps), ``"uniform"``
            (``budget / d_sae`` each) or ``"zipf_fixed"`` (Zipf by feature index,
            never re-ranked). Every capacity is kept within ``[1, B]``.
        zipf_alpha (float): Zipf exponent (> 0) of the capacities (and of the
            ``aux_zipf`` targets). Default 0.5 here (1.0 for the other
            architectures): flatter capacities reconstructed better than 1.0 on
            every data set we measured (docs/feature_choice.md).
        rerank_every (int): Training steps (>= 1) between usage re-rankings under
            ``"zipf"``.
        rank_by (str): Usage measure of the ``"zipf"`` ranking: ``"firing_rate"``
            (default; the firing-rate EMA ``firing_rate``, fraction of tokens on
            which the feature is active) or ``"demand"`` (EMA of the fraction of
            tokens on which the feature would be selected by the unrestricted rule,
            the batch's global top ``round(k * B)`` entries; one extra batch-wide
            top-k per step). A feature's firing rate cannot exceed its own capacity,
            so ``"firing_rate"`` ranks stay where they started and ``"zipf"`` then
            behaves as ``"zipf_fixed"``; ``"demand"`` re-ranks by the data. At
            ``zipf_alpha=0.5`` the two trained equally well on every data set we
            measured, and ``"demand"`` ran 20 to 30 percent slower (docs/feature_choice.md).
        threshold_mode (str): Per-token inference thresholds: ``"rate"`` (default;
            each feature fires per token as often as it picks tokens in training),
            ``"per_feature"`` (EMA of its smallest selected activation) or
            ``"global"``.
        aux_loss (str): ``"aux_k"`` (default), ``"aux_zipf"`` or ``"none"``. With every
            capacity >= 1 SAELens's dead mask stays empty and aux-k adds nothing.
        rescale_acts_by_decoder_norm (bool): Select on ``hidden_pre * ||W_dec||``
            (a per-feature scale: it changes the thresholds' units, not which tokens
            a feature picks).
    """

    architecture_key = ARCHITECTURE

    capacity_schedule: CapacitySchedule = "zipf"
    zipf_alpha: float = 0.5
    rerank_every: int = 100
    rank_by: RankBy = "firing_rate"

    @override
    def validate(self) -> None:
        super().validate()
        validate_capacity_fields(self)
        check_range("rerank_every", self.rerank_every, low=1)
        check_choice("rank_by", self.rank_by, RANK_BY)


class FeatureChoiceTrainingSAE(BatchLevelTrainingSAE):
    """Feature Choice training SAE: feature j keeps its top-``m_j`` tokens."""

    cfg: FeatureChoiceTrainingSAEConfig
    capacity_fractions: torch.Tensor
    n_selection_steps: torch.Tensor
    demand_rate: torch.Tensor
    training_buffers = (
        *BatchLevelTrainingSAE.training_buffers,
        "n_selection_steps",
        "demand_rate",
    )

    def __init__(
        self, cfg: FeatureChoiceTrainingSAEConfig, use_error_term: bool = False
    ):
        super().__init__(cfg, use_error_term)
        device = self.W_dec.device
        fractions = initial_capacity_fractions(
            cfg.capacity_schedule, cfg.d_sae, cfg.k, cfg.zipf_alpha, device
        )
        # Capacities as fractions of the batch (sum k); kept by the inference SAE.
        self.register_buffer(
            "capacity_fractions", storable_fractions(fractions, self.dtype)
        )
        # rank_by="demand": EMA of the rate at which the unrestricted rule would
        # select each feature (kept for every setting, so state dicts always match).
        self.register_buffer(
            "demand_rate", torch.zeros(cfg.d_sae, dtype=torch.float64, device=device)
        )

    # (capacity_fractions, its in-place version, n_tokens, the capacities) of the
    # last eager capacities() call.
    _capacities_cache: tuple[torch.Tensor, int, int, torch.Tensor] | None = None

    def capacities(self, n_tokens: int) -> torch.Tensor:
        """Token capacities ``m_j`` (long ``[d_sae]``) for a batch of ``n_tokens``.

        In eager code they are computed once per batch size between changes of
        ``capacity_fractions`` (a re-ranking every ``rerank_every`` steps, a load, a
        copy), which its in-place version and identity show; a compiled step, where
        version counters are not traced, computes them each time. The result is
        shared: do not modify it.
        """
        fractions = self.capacity_fractions
        if torch.compiler.is_compiling():
            return capacities_from_fractions(fractions, self.cfg.k, n_tokens)
        cached = self._capacities_cache
        if (
            cached is not None
            and cached[0] is fractions
            and cached[1] == fractions._version
            and cached[2] == n_tokens
        ):
            return cached[3]
        capacities = capacities_from_fractions(fractions, self.cfg.k, n_tokens)
        self._capacities_cache = (fractions, fractions._version, n_tokens, capacities)
        return capacities

    def capacity_depth(self, n_tokens: int) -> int | None:
        """A bound, known on the host, of every capacity in a batch of ``n_tokens``.

        Re-ranking only permutes the schedule's fractions, so the largest capacity
        is the largest of the capacities of the initial fractions (computed once per
        batch size on the CPU), plus one token against rounding differences between
        permutations.
        """
        cfg = self.cfg
        schedule, alpha = cfg.capacity_schedule, cfg.zipf_alpha
        depth: int = capacity_bound(
            schedule, cfg.d_sae, cfg.k, alpha, self.dtype, n_tokens
        )
        return depth

    @override
    def process_state_dict_for_saving_inference(
        self, state_dict: dict[str, Any]
    ) -> None:
        super().process_state_dict_for_saving_inference(state_dict)
        # The inference SAE holds the fractions in its own dtype; storable_fractions
        # made them exact in it, so this cast loses nothing.
        state_dict["capacity_fractions"] = (
            self.capacity_fractions.detach().to(state_dict["b_enc"].dtype).clone()
        )

    def usage(self) -> torch.Tensor:
        """The per-feature usage that the ``"zipf"`` schedule ranks by."""
        return self.demand_rate if self.cfg.rank_by == "demand" else self.firing_rate

    @torch.no_grad()
    def rerank(self) -> None:
        """Give the largest Zipf capacities to the features with the highest usage."""
        self.capacity_fractions.copy_(self.reranked_fractions())

    @torch.no_grad()
    def reranked_fractions(self) -> torch.Tensor:
        """The Zipf capacity fractions for the features' current usage ranks."""
        ranks = usage_ranks(self.usage())
        fractions = zipf_capacity_fractions(ranks, self.cfg.k, self.cfg.zipf_alpha)
        return storable_fractions(fractions, self.dtype)

    @override
    @torch.no_grad()
    def usage_rates(self, hidden_pre: torch.Tensor) -> list[FiringRate]:
        # rank_by="demand": the batch's unrestricted selections (BatchTopK's) move
        # demand_rate, in the same group as firing_rate and at its horizon.
        if self.cfg.capacity_schedule != "zipf" or self.cfg.rank_by != "demand":
            return []
        acts = hidden_pre.detach().flatten(end_dim=-2).relu()
        if self.data_parallel is None:
            counts = batch_topk_counts(acts, batch_budget(self.cfg.k, acts.shape[0]))
        else:
            counts, _ = self.data_parallel.demand_counts(acts, self.cfg.k)
        return [FiringRate(self.demand_rate, self.cfg.zipf_ema_tokens, counts)]

    @override
    @torch.no_grad()
    def update_rule_state(
        self, feature_acts: torch.Tensor, counts: torch.Tensor
    ) -> None:
        # Re-rank when one is due; the batch is already in firing_rate, demand_rate,
        # n_tokens_seen and n_selection_steps.
        if self.cfg.capacity_schedule != "zipf":
            return
        if torch.compiler.is_compiling():
            # No branch on the step count in a graph: re-rank on the device and
            # keep the result only when a re-ranking is due.
            due = self.n_selection_steps % self.cfg.rerank_every == 0
            self.capacity_fractions.copy_(
                torch.where(due, self.reranked_fractions(), self.capacity_fractions)
            )
        elif self.host_step_count() % self.cfg.rerank_every == 0:
            self.rerank()


@dataclass
class FeatureChoiceSAEConfig(BatchLevelSAEConfig):
    """Configuration for a Feature Choice inference SAE.

    The capacities themselves travel in the ``capacity_fractions`` buffer; the fields
    below only set the capacities of a freshly built (not loaded) SAE.

    Args:
        capacity_schedule (str): ``"zipf"``, ``"uniform"`` or ``"zipf_fixed"``; a new
            SAE starts uniform or Zipf by feature index.
        zipf_alpha (float): Zipf exponent (> 0) of a new SAE's capacities.
    """

    architecture_key = ARCHITECTURE

    capacity_schedule: CapacitySchedule = "zipf"
    zipf_alpha: float = 0.5

    def __post_init__(self) -> None:
        super().__post_init__()
        validate_capacity_fields(self)


class FeatureChoiceSAE(BatchLevelSAE):
    """Feature Choice inference SAE: per-token thresholds; ``encode_batch`` for the rule."""

    cfg: FeatureChoiceSAEConfig
    capacity_fractions: torch.Tensor

    def __init__(self, cfg: FeatureChoiceSAEConfig, use_error_term: bool = False):
        super().__init__(cfg, use_error_term)
        fractions = initial_capacity_fractions(
            cfg.capacity_schedule, cfg.d_sae, cfg.k, cfg.zipf_alpha, self.W_dec.device
        )
        self.register_buffer(
            "capacity_fractions", storable_fractions(fractions, self.dtype)
        )

    def capacities(self, n_tokens: int) -> torch.Tensor:
        """Token capacities ``m_j`` (long ``[d_sae]``) for a batch of ``n_tokens``."""
        return capacities_from_fractions(self.capacity_fractions, self.cfg.k, n_tokens)

    def capacity_depth(self, n_tokens: int) -> int | None:
        """None: loaded capacities have no bound known on the host without a read,
        so ``encode_batch`` takes the general path."""
        del n_tokens
        return None


def feature_choice_rule(
    sae: FeatureChoiceTrainingSAE | FeatureChoiceSAE,
    acts: torch.Tensor,
    batch: GlobalBatch,
) -> torch.Tensor:
    """Each feature keeps its ``m_j`` largest activations over the batch's tokens."""
    n_tokens = batch.n_tokens
    return batch.column_topk(
        acts, sae.capacities(n_tokens), depth=sae.capacity_depth(n_tokens)
    )


def feature_choice_traffic(
    cfg: FeatureChoiceTrainingSAEConfig, n_tokens: int, costs: BatchTraffic
) -> float:
    """Each feature's global top ``m_j``, at the starting capacities."""
    fractions = initial_capacity_fractions(
        cfg.capacity_schedule, cfg.d_sae, cfg.k, cfg.zipf_alpha, "cpu"
    )
    return costs.column_topk(capacities_from_fractions(fractions, cfg.k, n_tokens))


ENTRY = Architecture(
    ARCHITECTURE,
    FeatureChoiceSAE,
    FeatureChoiceSAEConfig,
    FeatureChoiceTrainingSAE,
    FeatureChoiceTrainingSAEConfig,
    feature_choice_rule,
    feature_choice_traffic,
    # Zipf by feature index at exponent 1, the capacities' starting point.
    traffic_cases={ARCHITECTURE: {"zipf_alpha": 1.0}},
    lost_on_export={"capacity_schedule": ("zipf", "learned capacities")},
)
