"""The seam between the plugin's training SAEs and data-parallel selection.

A :class:`DataParallelStep` describes one training step over a batch split across
ranks (the process group and every rank's number of tokens) and implements
:class:`~sae_lens_sampled.global_batch.GlobalBatch` over it. While
:func:`data_parallel_step` holds it on an SAE (``sae.data_parallel``), the SAE runs its
batch rule (the one its registry entry names, as in one process) against the step
instead of a :class:`~sae_lens_sampled.global_batch.LocalBatch`, and takes the
per-feature statistics of its state updates from the global batch.

The trainer sets it around ``training_forward_pass`` only, so ``encode`` called
anywhere else (evals on one rank, ``HookedSAETransformer``) never runs a collective.
:func:`register_data_parallel_rule` replaces an architecture's rule in data-parallel
steps.
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
    global_feature_choice_mask,
    global_feature_scores,
    global_topk_indices,
    reduce_column_stats,
    shared_pool,
    sum_counts,
)
from sae_lens_sampled.global_batch import GlobalBatch, Rule
from sae_lens_sampled.selection import batch_budget

if TYPE_CHECKING:
    from sae_lens.saes.sae import TrainingSAE

# Rules added here take precedence over the ones the architectures declare.
_RULES: dict[str, Rule] = {}


def register_data_parallel_rule(architecture: str, rule: Rule) -> None:
    """Use ``rule(sae, acts, step)`` for ``architecture`` in data-parallel steps.

    An architecture in the plugin's registry (:func:`~sae_lens_sampled._registry.
    add_architecture`) brings its own rule, which one process runs too; this one
    replaces it in data-parallel steps only.
    """
    _RULES[architecture] = rule


@dataclass
class DataParallelStep:
    """One training step whose batch is split across the ranks of ``comm``.

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
        """Tokens in the global batch."""
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
        """``sae``'s batch rule over the global batch, on this rank's ``acts``."""
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
        width = acts.shape[-1]
        sizes = [rows * width for rows in self.shard_sizes]
        return global_topk_indices(acts, budget, self.comm, sizes, self.oversample)

    def batch_topk(self, acts: torch.Tensor, budget: int) -> torch.Tensor:
        """Global BatchTopK on this rank's rows; gradients reach selected entries."""
        flat = acts.reshape(-1)
        indices = self.topk_indices(acts, budget)
        # Gathered from acts, so gradients reach the selected entries only.
        out = torch.zeros_like(flat).scatter_(0, indices, flat[indices])
        return out.view_as(acts)

    @torch.no_grad()
    def column_stats(
        self, counts: torch.Tensor, smallest: torch.Tensor, n_tokens: int
    ) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Global per-feature selection counts, smallest selected values, tokens."""
        if n_tokens != self.local_tokens:
            raise ValueError(
                f"statistics of {n_tokens} tokens on rank {self.comm.rank}, "
                f"expected {self.local_tokens}"
            )
        counts, smallest = reduce_column_stats(counts, smallest, self.comm)
        return counts, smallest, self.n_tokens

    @torch.no_grad()
    def sum_floats(self, values: torch.Tensor) -> torch.Tensor:
        """``values`` summed over ranks (a copy), in their own dtype."""
        return self.comm.all_reduce(values.clone(), "sum", "stats")

    @torch.no_grad()
    def sum_counts(self, counts: torch.Tensor) -> torch.Tensor:
        """Per-feature counts summed over ranks (a copy)."""
        return sum_counts(counts, self.comm)

    @torch.no_grad()
    def any_positive(self, flags: torch.Tensor) -> torch.Tensor:
        """Per-feature boolean ``flags`` ORed over the ranks."""
        return self.sum_counts(flags.long()) > 0

    def feature_scores(self, acts: torch.Tensor, score: str) -> torch.Tensor:
        """Sampled-SAE column scores of the global batch, float64 ``[d_sae]``."""
        return global_feature_scores(acts, score, self.comm)

    def draw_pool(
        self,
        scores: torch.Tensor,
        size: int,
        mode: str,
        generator: torch.Generator | None,
        **options: Any,
    ) -> torch.Tensor:
        """The pool drawn on rank 0 (as one process would) and broadcast."""
        return shared_pool(scores, size, mode, generator, self.comm, **options)

    def column_topk(
        self, acts: torch.Tensor, capacities: torch.Tensor, depth: int | None = None
    ) -> torch.Tensor:
        """This rank's ``acts`` where among each feature's global top
        ``capacities[j]`` tokens, 0 elsewhere (``depth`` is not used: the exchange
        has data-dependent sizes anyway)."""
        del depth
        mask = global_feature_choice_mask(
            acts, capacities, self.comm, self.shard_sizes, self.feature_choice_layout
        )
        return torch.where(mask, acts, 0)

    @torch.no_grad()
    def demand_counts(self, acts: torch.Tensor, k: float) -> tuple[torch.Tensor, int]:
        """Per-feature counts of the global top ``round(k * B)``, and ``B``."""
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
