"""What a batch rule and the training state need from a batch.

Each architecture writes its rule once, as ``rule(sae, acts, batch)`` against
:class:`GlobalBatch`. :class:`LocalBatch` is the batch of one process (the primitives
of :mod:`sae_lens_sampled.selection`), which ``select`` and ``select_ranked`` pass;
the distributed trainer's step implements the same protocol over a batch split across
processes. No SAELens imports.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import torch

from sae_lens_sampled.selection import (
    batch_budget,
    batch_topk,
    batch_topk_counts,
    batch_topk_positions,
    column_topk_positions,
    feature_choice_select,
    feature_scores,
    fixed_shapes,
    pool_from_scores,
)


class GlobalBatch(Protocol):
    """One training step's global batch, seen from one process's rows."""

    @property
    def n_tokens(self) -> int:
        """Tokens in the global batch."""

    def select(self, sae: Any, acts: torch.Tensor) -> torch.Tensor:
        """``sae``'s batch rule over the global batch, on this process's ``acts``."""

    def column_stats(
        self, counts: torch.Tensor, smallest: torch.Tensor, n_tokens: int
    ) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Global per-feature selection counts, smallest selected values, tokens."""

    def sum_floats(self, values: torch.Tensor) -> torch.Tensor:
        """``values`` summed over the processes (a copy), in their own dtype."""

    def sum_counts(self, counts: torch.Tensor) -> torch.Tensor:
        """Per-feature counts summed over the processes (a copy)."""

    def demand_counts(self, acts: torch.Tensor, k: float) -> tuple[torch.Tensor, int]:
        """Per-feature counts of the global top ``round(k * B)``, and ``B``."""

    def batch_topk(self, acts: torch.Tensor, budget: int) -> torch.Tensor:
        """Global BatchTopK on this process's rows; gradients reach selected entries."""

    def any_positive(self, flags: torch.Tensor) -> torch.Tensor:
        """Per-feature boolean ``flags`` ORed over the processes."""

    def feature_scores(self, acts: torch.Tensor, score: str) -> torch.Tensor:
        """Sampled-SAE column scores of the global batch, float64 ``[d_sae]``."""

    def draw_pool(
        self,
        scores: torch.Tensor,
        size: int,
        mode: str,
        generator: torch.Generator | None,
        **options: Any,
    ) -> torch.Tensor:
        """A Sampled-SAE pool from global ``scores``, the same on every process."""

    def column_topk(
        self, acts: torch.Tensor, capacities: torch.Tensor, depth: int | None = None
    ) -> torch.Tensor:
        """Each feature ``j`` keeps its global top ``capacities[j]`` tokens: ``acts``
        where selected, 0 elsewhere. ``depth``, when given, bounds every capacity
        (on the host), which lets the selection keep fixed shapes."""


class BatchTraffic(Protocol):
    """Bytes one process sends per training step for each exchange a rule makes on a
    :class:`GlobalBatch` of ``n_tokens`` split across processes: the traffic model's
    terms, implemented by :mod:`sae_lens_sampled.distributed.costs`."""

    def batch_topk(self, budget: int, width: int) -> float:
        """:meth:`GlobalBatch.batch_topk` of ``budget`` entries over ``width`` columns."""

    def feature_scores(self, d_sae: int, score: str) -> float:
        """:meth:`GlobalBatch.feature_scores` of ``d_sae`` columns."""

    def draw_pool(self, size: int) -> float:
        """:meth:`GlobalBatch.draw_pool` of a pool of ``size`` features."""

    def column_topk(self, capacities: torch.Tensor) -> float:
        """:meth:`GlobalBatch.column_topk` with the global ``capacities``."""


# ``rule(sae, acts, batch)``: an architecture's batch rule on this process's post-ReLU
# ``acts`` ``[n_tokens, d_sae]`` of ``batch``; ``sae`` is its training or inference SAE.
Rule = Callable[[Any, torch.Tensor, GlobalBatch], torch.Tensor]
# ``traffic(cfg, n_tokens, costs)``: the bytes one process sends per step to run the
# rule of training config ``cfg`` on a batch of ``n_tokens``, as a sum of ``costs``.
Traffic = Callable[[Any, int, BatchTraffic], float]


class LocalBatch:
    """The :class:`GlobalBatch` of one process: its ``n_tokens`` rows are the batch."""

    # Methods that call selection.py's functions, not staticmethod attributes, which
    # torch.compile (2.13) cannot trace on an object built inside the graph.

    def __init__(self, n_tokens: int) -> None:
        self._n_tokens = n_tokens

    def batch_topk(self, acts: torch.Tensor, budget: int) -> torch.Tensor:
        return batch_topk(acts, budget)

    def feature_scores(self, acts: torch.Tensor, score: str) -> torch.Tensor:
        return feature_scores(acts, score)

    def column_topk(
        self, acts: torch.Tensor, capacities: torch.Tensor, depth: int | None = None
    ) -> torch.Tensor:
        return feature_choice_select(acts, capacities, depth)

    @property
    def n_tokens(self) -> int:
        return self._n_tokens

    def select(self, sae: Any, acts: torch.Tensor) -> torch.Tensor:
        # The SAE's own select, which runs its rule on a LocalBatch of these rows.
        selected: torch.Tensor = sae.select(acts)
        return selected

    def column_stats(
        self, counts: torch.Tensor, smallest: torch.Tensor, n_tokens: int
    ) -> tuple[torch.Tensor, torch.Tensor, int]:
        return counts, smallest, n_tokens

    def sum_floats(self, values: torch.Tensor) -> torch.Tensor:
        return values.clone()

    def sum_counts(self, counts: torch.Tensor) -> torch.Tensor:
        return counts.clone()

    @torch.no_grad()
    def demand_counts(self, acts: torch.Tensor, k: float) -> tuple[torch.Tensor, int]:
        return batch_topk_counts(acts, batch_budget(k, acts.shape[0])), acts.shape[0]

    def any_positive(self, flags: torch.Tensor) -> torch.Tensor:
        return flags

    def draw_pool(
        self,
        scores: torch.Tensor,
        size: int,
        mode: str,
        generator: torch.Generator | None,
        **options: Any,
    ) -> torch.Tensor:
        return pool_from_scores(scores, size, mode, generator, **options)


class PositionsBatch(LocalBatch):
    """A :class:`LocalBatch` whose top-k rules also keep what they selected, for a
    training encode that builds its sparse codes from them (no scan of the dense
    result).

    After a rule ran: :attr:`positions`, the ascending row-major positions of the
    kept entries, flat into the ``[n_tokens, width]`` matrix the top-k ran on (e.g. a
    pool's columns); None when none ran or its keys could not hold the values.
    After a column top-k, :attr:`kept` flags which of the ``size`` positions are kept
    (the others are padding).
    """

    positions: torch.Tensor | None = None
    width: int = 0
    kept: torch.Tensor | None = None

    def __init__(self, n_tokens: int, size: int = 0) -> None:
        super().__init__(n_tokens)
        self.size = size

    def batch_topk(self, acts: torch.Tensor, budget: int) -> torch.Tensor:
        positions = batch_topk_positions(acts, budget)
        if positions is None:
            return batch_topk(acts, budget)
        self.positions, self.width = positions, acts.shape[-1]
        flat = acts.reshape(-1)
        return (
            torch.zeros_like(flat).scatter_(0, positions, flat[positions]).view_as(acts)
        )

    def column_topk(
        self, acts: torch.Tensor, capacities: torch.Tensor, depth: int | None = None
    ) -> torch.Tensor:
        found = None
        if depth is not None and fixed_shapes(acts):
            capacities = capacities.clamp(0, acts.shape[0])
            depth = min(depth, acts.shape[0])
            found = column_topk_positions(acts, capacities, depth, self.size)
        if found is None:
            return super().column_topk(acts, capacities, depth)
        positions, kept = found
        self.positions, self.kept, self.width = positions, kept, acts.shape[-1]
        values = torch.where(kept, acts.reshape(-1)[positions], 0)
        # Padding repeats a position: accumulated, so it adds 0 there.
        dense = torch.zeros_like(acts).view(-1)
        return dense.index_put_((positions,), values, accumulate=True).view_as(acts)
