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
from typing import TYPE_CHECKING, Any

import torch
from sae_lens import LoggingConfig, TrainingSAE
from sae_lens.saes.sae import TrainingSAEConfig

if TYPE_CHECKING:
    from sae_lens_sampled.benchmark.config import CompareConfig


def training_schedule(cfg: CompareConfig) -> dict[str, Any]:
    """The settings every source hands SAELens's runner or trainer alike."""
    return {
        "lr": cfg.lr,
        "lr_decay_steps": cfg.steps // 5,
        "device": cfg.device,
        "dead_feature_window": cfg.dead_feature_window,
        "feature_sampling_window": 2 * cfg.dead_feature_window,
        "logger": LoggingConfig(log_to_wandb=False),
    }


class DataSource(ABC):
    """Where a comparison's activations come from: ``mode`` is results.json's
    (``synthetic``, ``language_model``, ``activations``), ``d_in`` the activations'
    width, ``eval_samples`` the tokens per evaluation."""

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
        """Metrics of ``sae.encode`` on the held-out data (keys of
        :mod:`~sae_lens_sampled.benchmark.metrics`; missing ones are None)."""

    def calibration_batches(self) -> list[torch.Tensor] | None:
        """Held-out batches on which per-token thresholds are re-fitted, or None."""
        return None

    def absorption(self, sae: Any) -> float | None:  # noqa: ARG002
        """Ground-truth feature absorption of the per-token ``sae``, or None."""
        return None

    def probe(self, sae: Any) -> dict[str, Any]:
        """Sparse-probing fields of the per-token ``sae`` (none without labels)."""
        return {} if self.probing is None else dict(self.probing.probe_sae(sae))
