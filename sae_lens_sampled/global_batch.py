"""What the training SAEs need from a batch split across processes.

The core sees data parallelism only through :class:`GlobalBatch`; the distributed
trainer's step implements it. With none set, a training SAE selects and updates its
state from the rows it is given. Pure typing; no SAELens imports.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch


class GlobalBatch(Protocol):
    """One training step's global batch, seen from one process's rows."""

    @property
    def n_tokens(self) -> int:
        """Tokens in the global batch."""
        ...

    def select(self, sae: Any, acts: torch.Tensor) -> torch.Tensor:
        """``sae``'s batch rule over the global batch, on this process's ``acts``."""
        ...

    def column_stats(
        self, counts: torch.Tensor, smallest: torch.Tensor, n_tokens: int
    ) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Global per-feature selection counts, smallest selected values, tokens."""
        ...

    def sum_floats(self, values: torch.Tensor) -> torch.Tensor:
        """``values`` summed over the processes (a copy), in their own dtype."""
        ...

    def sum_counts(self, counts: torch.Tensor) -> torch.Tensor:
        """Per-feature counts summed over the processes (a copy)."""
        ...

    def demand_counts(self, acts: torch.Tensor, k: float) -> tuple[torch.Tensor, int]:
        """Per-feature counts of the global top ``round(k * B)``, and ``B``."""
        ...

    def batch_topk(self, acts: torch.Tensor, budget: int) -> torch.Tensor:
        """Global BatchTopK on this process's rows; gradients reach selected entries."""
        ...

    def any_positive(self, flags: torch.Tensor) -> torch.Tensor:
        """Per-feature boolean ``flags`` ORed over the processes."""
        ...

    def feature_scores(self, acts: torch.Tensor, score: str) -> torch.Tensor:
        """Sampled-SAE column scores of the global batch, float64 ``[d_sae]``."""
        ...

    def draw_pool(
        self,
        scores: torch.Tensor,
        size: int,
        mode: str,
        generator: torch.Generator | None,
        **options: Any,
    ) -> torch.Tensor:
        """A Sampled-SAE pool from global ``scores``, the same on every process."""
        ...

    def column_topk_mask(
        self, acts: torch.Tensor, capacities: torch.Tensor
    ) -> torch.Tensor:
        """Boolean mask of this process's entries among feature ``j``'s global top
        ``capacities[j]`` tokens."""
        ...
