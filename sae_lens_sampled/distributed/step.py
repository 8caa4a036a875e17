"""The seam between the plugin's training SAEs and data-parallel selection.

While :func:`data_parallel_step` holds a :class:`DataParallelStep` on an SAE
(``sae.data_parallel``), the SAE runs its batch rule and takes the statistics of its
state updates from the global batch. The trainer sets it around
``training_forward_pass`` only, so ``encode`` called anywhere else (evals on one
rank, ``HookedSAETransformer``) never runs a collective.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from sae_lens_sampled._registry import architecture_keys, rule_of
from sae_lens_sampled.distributed.comm import Comm
from sae_lens_sampled.distributed.global_select import (
    SELECTION,
    global_feature_choice_mask,
    global_feature_scores,
    global_topk_indices,
)
from sae_lens_sampled.global_batch import GlobalBatch, Rule
from sae_lens_sampled.selection import batch_budget, pool_from_scores

if TYPE_CHECKING:
    from sae_lens.saes.sae import TrainingSAE

# Rules added here take precedence over the ones the architectures declare.
_RULES: dict[str, Rule] = {}


def register_data_parallel_rule(architecture: str, rule: Rule) -> None:
    """Use ``rule(sae, acts, step)`` for ``architecture`` in data-parallel steps,
    instead of the rule its registry entry brings (which one process runs)."""
    _RULES[architecture] = rule


@dataclass
class DataParallelStep:
    """One training step whose batch is split across the ranks of ``comm``; the
    methods are :class:`~sae_lens_sampled.global_batch.GlobalBatch`'s.

    Args:
        comm: The ranks' collectives.
        shard_sizes: Every rank's number of tokens this step, in rank order (rank
            order is token order in the global batch).
        oversample: Candidates each rank sends for the global top-k, as a multiple
            of its even share ``budget / world_size`` (exact for any value; larger
            values make the fallback round rarer).
        feature_choice_layout: How feature_choice exchanges candidates:
            ``"auto"`` (the cheaper in bytes), ``"all_gather"`` or ``"all_to_all"``.
    """

    comm: Comm
    shard_sizes: list[int]
    oversample: float = 2.0
    feature_choice_layout: str = "auto"

    def __post_init__(self) -> None:
        if len(self.shard_sizes) != self.comm.world_size:
            raise ValueError(
                f"shard_sizes needs one entry per rank ({self.comm.world_size}), "
                f"got {self.shard_sizes}"
            )

    @property
    def n_tokens(self) -> int:
        return sum(self.shard_sizes)

    @property
    def local_tokens(self) -> int:
        return self.shard_sizes[self.comm.rank]

    def _check_rows(self, acts: torch.Tensor) -> None:
        if acts.shape[0] != self.local_tokens:
            raise ValueError(
                f"rank {self.comm.rank} was given {acts.shape[0]} tokens to select on, "
                f"but this data-parallel step expects its shard of "
                f"{self.local_tokens}"
            )

    def select(self, sae: TrainingSAE[Any], acts: torch.Tensor) -> torch.Tensor:
        self._check_rows(acts)
        architecture = sae.cfg.architecture()
        if architecture in _RULES:
            return _RULES[architecture](sae, acts, self)
        if architecture not in architecture_keys():
            known = sorted({*_RULES, *architecture_keys()})
            raise NotImplementedError(
                f"no data-parallel selection rule for architecture {architecture!r}; "
                f"known: {known}"
            )
        return rule_of(architecture)(sae, acts, self)

    def topk_indices(self, acts: torch.Tensor, budget: int) -> torch.Tensor:
        """Flat indices of this rank's entries among the global top ``budget``."""
        self._check_rows(acts)
        sizes = [rows * acts.shape[-1] for rows in self.shard_sizes]
        return global_topk_indices(acts, budget, self.comm, sizes, self.oversample)

    def batch_topk(self, acts: torch.Tensor, budget: int) -> torch.Tensor:
        flat = acts.reshape(-1)
        indices = self.topk_indices(acts, budget)
        # Gathered from acts, so gradients reach the selected entries only.
        out = torch.zeros_like(flat).scatter_(0, indices, flat[indices])
        return out.view_as(acts)

    @torch.no_grad()
    def column_stats(
        self, counts: torch.Tensor, smallest: torch.Tensor, n_tokens: int
    ) -> tuple[torch.Tensor, torch.Tensor, int]:
        if n_tokens != self.local_tokens:
            raise ValueError(
                f"statistics of {n_tokens} tokens on rank {self.comm.rank}, "
                f"expected {self.local_tokens}"
            )
        smallest = self.comm.all_reduce(smallest.clone(), "min", "stats")
        return self.sum_counts(counts), smallest, self.n_tokens

    @torch.no_grad()
    def sum_floats(self, values: torch.Tensor) -> torch.Tensor:
        return self.comm.all_reduce(values.clone(), "sum", "stats")

    @torch.no_grad()
    def sum_counts(self, counts: torch.Tensor) -> torch.Tensor:
        # Sent as int32: a step's count of tokens fits.
        summed = self.comm.all_reduce(counts.to(torch.int32), "sum", "stats")
        return summed.to(counts.dtype)

    @torch.no_grad()
    def any_positive(self, flags: torch.Tensor) -> torch.Tensor:
        return self.sum_counts(flags.long()) > 0

    def feature_scores(self, acts: torch.Tensor, score: str) -> torch.Tensor:
        return global_feature_scores(acts, score, self.comm)

    @torch.no_grad()
    def draw_pool(
        self,
        scores: torch.Tensor,
        size: int,
        mode: str,
        generator: torch.Generator | None,
        **options: Any,
    ) -> torch.Tensor:
        """Drawn on rank 0 as one process would, and broadcast: ``size`` indices
        cost little and make the pool identical on every rank even if the ranks'
        scores differed in the last bit or their RNGs drifted."""
        if self.comm.rank == 0:
            pool = pool_from_scores(scores, size, mode, generator, **options)
        else:
            pool = torch.empty(size, dtype=torch.long, device=scores.device)
        return self.comm.broadcast(pool, 0, SELECTION)

    def column_topk(
        self, acts: torch.Tensor, capacities: torch.Tensor, depth: int | None = None
    ) -> torch.Tensor:
        del depth  # not used: the exchange has data-dependent sizes anyway
        mask = global_feature_choice_mask(
            acts, capacities, self.comm, self.shard_sizes, self.feature_choice_layout
        )
        return torch.where(mask, acts, 0)

    @torch.no_grad()
    def demand_counts(self, acts: torch.Tensor, k: float) -> tuple[torch.Tensor, int]:
        indices = self.topk_indices(acts, batch_budget(k, self.n_tokens))
        counts = torch.bincount(indices % acts.shape[-1], minlength=acts.shape[-1])
        return self.sum_counts(counts), self.n_tokens


@contextmanager
def data_parallel_step(
    sae: TrainingSAE[Any], step: DataParallelStep | None
) -> Iterator[None]:
    """Make ``sae`` select and update its state from the global batch of ``step``."""
    # A plain attribute: nn.Module's __setattr__ is typed for tensors and modules.
    previous = getattr(sae, "data_parallel", None)
    batch: GlobalBatch | None = step  # the core's view of the step
    sae.data_parallel = batch  # type: ignore[assignment]
    try:
        yield
    finally:
        sae.data_parallel = previous  # type: ignore[assignment]
