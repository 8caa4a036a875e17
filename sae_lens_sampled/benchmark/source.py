"""The data-source layer of ``compare``.

A data source trains one SAE through SAELens's machinery on its data and evaluates
SAEs on its held-out data; the loop in :mod:`sae_lens_sampled.benchmark.loop` does
everything else (configs, seeds, inference export, batch-rule view, results). The
sources: :class:`~sae_lens_sampled.benchmark.synthetic.SyntheticSource`,
:class:`~sae_lens_sampled.benchmark.language_model.LanguageModelSource` and
:class:`~sae_lens_sampled.benchmark.activations.ActivationsSource`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch
from sae_lens import TrainingSAE
from sae_lens.saes.sae import TrainingSAEConfig


class DataSource(ABC):
    """Where a comparison's activations come from.

    Attributes:
        mode: ``results.json``'s ``mode`` (``synthetic``, ``language_model``,
            ``activations``).
        d_in: Width of the activations.
        eval_samples: Tokens per evaluation.
    """

    mode: str
    d_in: int
    eval_samples: int
    # Sparse probing of each trained SAE (``probe_command.ActivationProbes``).
    probing: Any = None

    def describe(self) -> dict[str, Any]:
        """What results.json records about the data (``data``)."""
        return {}

    def start_seed(self, seed: int) -> None:  # noqa: B027  (optional hook)
        """Prepare the data of ``seed`` before its runs (e.g. a synthetic model)."""

    @abstractmethod
    def train(self, sae_cfg: TrainingSAEConfig, seed: int) -> TrainingSAE[Any]:
        """Train one SAE on this source's training data; torch's RNG is seeded."""

    @abstractmethod
    def evaluate(self, sae: Any) -> dict[str, Any]:
        """Metrics of ``sae.encode`` on the held-out data.

        Keys from ``RULE_METRICS`` and ``GROUND_TRUTH_METRICS``
        (:mod:`~sae_lens_sampled.benchmark.metrics`); missing ones are None.
        """

    def calibration_batches(self) -> list[torch.Tensor] | None:
        """Held-out batches on which per-token thresholds are re-fitted, or None."""
        return None

    def absorption(self, sae: Any) -> float | None:  # noqa: ARG002
        """Ground-truth feature absorption of the per-token ``sae``, or None."""
        return None

    def probe(self, sae: Any) -> dict[str, Any]:
        """Sparse-probing result fields of the per-token ``sae`` (none without
        labels)."""
        return {} if self.probing is None else dict(self.probing.probe_sae(sae))
