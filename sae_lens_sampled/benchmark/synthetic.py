"""Synthetic data source of ``compare``: SAELens's ``SyntheticSAERunner`` and
``eval_sae_on_synthetic_data`` on an embedded synthetic model with ground truth."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from sae_lens.saes.sae import TrainingSAEConfig
from sae_lens.synthetic import SyntheticModel, SyntheticModelConfig
from sae_lens.synthetic.evals import eval_sae_on_synthetic_data
from sae_lens.synthetic.firing_magnitudes import (
    ExponentialMagnitudeConfig,
    LinearMagnitudeConfig,
)
from sae_lens.synthetic.firing_probabilities import ZipfianFiringProbabilityConfig
from sae_lens.synthetic.hierarchy import HierarchyConfig
from sae_lens.synthetic.synthetic_sae_runner import (
    SyntheticSAERunner,
    SyntheticSAERunnerConfig,
)

from sae_lens_sampled.benchmark.absorption import absorption_metrics, hierarchy_parents
from sae_lens_sampled.benchmark.config import DEFAULT_EVAL_SAMPLES, CompareConfig
from sae_lens_sampled.benchmark.metrics import finite
from sae_lens_sampled.benchmark.source import DataSource, training_schedule

# Held-out samples on which calibrate_thresholds re-fits the per-token thresholds.
CALIBRATION_SAMPLES = 8192


def default_synthetic_model_config(seed: int = 0) -> SyntheticModelConfig:
    """The embedded default data: 256 ground-truth features in 64 dimensions.

    Zipfian firing probabilities (0.4 down to 0.01, about 6 active features per
    sample), mean magnitudes rising linearly from 1 to 6 with the feature index, so
    the rarest features are the strongest, and a shallow hierarchy (8 parents with 4
    children each, half of them mutually exclusive) on the most frequent features.
    """
    return SyntheticModelConfig(
        num_features=256,
        hidden_dim=64,
        firing_probability=ZipfianFiringProbabilityConfig(
            exponent=0.7, max_prob=0.4, min_prob=0.01
        ),
        hierarchy=HierarchyConfig(
            total_root_nodes=8,
            branching_factor=4,
            max_depth=1,
            mutually_exclusive_portion=0.5,
            compensate_probabilities=True,
        ),
        mean_firing_magnitudes=LinearMagnitudeConfig(start=1.0, end=6.0),
        std_firing_magnitudes=0.2,
        seed=seed,
    )


def lottery_synthetic_model_config(seed: int = 0) -> SyntheticModelConfig:
    """The default data with an "activation lottery": mean magnitudes rising
    exponentially from 0.5 to 20, so the rarest feature (firing probability 0.01)
    carries about 40 times the variance of the most frequent one (0.4), where the
    default makes them about equal."""
    cfg = default_synthetic_model_config(seed)
    cfg.mean_firing_magnitudes = ExponentialMagnitudeConfig(start=0.5, end=20.0)
    return cfg


# Named synthetic data sets of compare (``--data``).
SYNTHETIC_DATA: dict[str, Callable[[int], SyntheticModelConfig]] = {
    "default": default_synthetic_model_config,
    "lottery": lottery_synthetic_model_config,
}


class ReplayedActivations:
    """Serves pre-drawn ground-truth feature activations, batch after batch, so
    every eval pass reads the same samples whatever the SAEs draw from torch's
    global RNG in between (e.g. Sampled-SAE pools)."""

    def __init__(self, batches: list[torch.Tensor]):
        self._batches = iter(batches)

    def sample(self, batch_size: int) -> torch.Tensor:
        batch = next(self._batches)
        if batch.shape[0] != batch_size:
            raise ValueError(
                f"replayed batch has {batch.shape[0]} rows, not {batch_size}"
            )
        return batch


class SyntheticSource(DataSource):
    """SAELens synthetic data: one synthetic model per seed (or the given one).

    For seed ``s``: the default model is built with seed ``s``; the eval samples
    are drawn once after ``torch.manual_seed(s + 1)`` and replayed to every
    evaluation; calibration samples after ``torch.manual_seed(s + 2)``.
    """

    mode = "synthetic"

    def __init__(self, cfg: CompareConfig, synthetic_model: SyntheticModel | None):
        self.cfg = cfg
        self._override = synthetic_model
        self.eval_samples = cfg.eval_samples or DEFAULT_EVAL_SAMPLES
        self._model_config = SYNTHETIC_DATA[cfg.data]
        self.model = synthetic_model or SyntheticModel(
            self._model_config(cfg.seed), device=cfg.device
        )
        self.d_in = self.model.cfg.hidden_dim
        self.eval_batches: list[torch.Tensor] = []
        self._seed = cfg.seed

    def describe(self) -> dict[str, Any]:
        return {
            "synthetic_model": "given" if self._override else self.cfg.data,
            "num_features": self.model.cfg.num_features,
            "hidden_dim": self.d_in,
            "eval_samples": self.eval_samples,
        }

    def start_seed(self, seed: int) -> None:
        self._seed = seed
        if self._override is None and self.model.cfg.seed != seed:
            self.model = SyntheticModel(
                self._model_config(seed), device=self.cfg.device
            )
        torch.manual_seed(seed + 1)
        generator = self.model.activation_generator
        n, batch_size = self.eval_samples, self.cfg.batch_size
        # Full batches, then the remainder: eval_sae_on_synthetic_data's batches.
        self.eval_batches = [
            generator.sample(min(batch_size, n - start))
            for start in range(0, n, batch_size)
        ]

    def train(self, sae_cfg: TrainingSAEConfig, seed: int) -> Any:  # noqa: ARG002
        # The seed acts through torch's global RNG (set by the loop) and the
        # synthetic model of start_seed.
        cfg = self.cfg
        runner_cfg = SyntheticSAERunnerConfig(
            synthetic_model=self.model.cfg,
            sae=sae_cfg,
            training_samples=cfg.steps * cfg.batch_size,
            batch_size=cfg.batch_size,
            checkpoint_path=None,
            output_path=None,
            run_final_eval=False,
            **training_schedule(cfg),
        )
        runner = SyntheticSAERunner(runner_cfg, override_synthetic_model=self.model)
        return runner.run().sae

    def evaluate(self, sae: Any) -> dict[str, Any]:
        ev = eval_sae_on_synthetic_data(
            sae,
            self.model.feature_dict,
            ReplayedActivations(self.eval_batches),  # type: ignore[arg-type]
            num_samples=self.eval_samples,
            batch_size=self.cfg.batch_size,
        )
        return {
            "l0": ev.sae_l0,
            "explained_variance": finite(ev.explained_variance),
            "dead_features": ev.dead_latents,
            "f1": ev.classification.f1_score,
            "shrinkage": finite(ev.shrinkage),
            # Decoder-only metrics, the same under every encode rule.
            "mcc": ev.mcc,
            "uniqueness": ev.uniqueness,
            "precision": ev.classification.precision,
            "recall": ev.classification.recall,
            "true_l0": ev.true_l0,
        }

    def calibration_batches(self) -> list[torch.Tensor]:
        # Samples that are neither training nor eval data, drawn afresh for each
        # run so that every run sees the same RNG state afterwards.
        torch.manual_seed(self._seed + 2)
        generator = self.model.activation_generator
        n_batches = max(1, CALIBRATION_SAMPLES // self.cfg.batch_size)
        return [
            self.model.feature_dict(generator.sample(self.cfg.batch_size))
            for _ in range(n_batches)
        ]

    def absorption(self, sae: Any) -> float | None:
        """Ground-truth absorption of ``sae.encode`` (per-token SAE or batch-rule
        view) on the eval samples, in batches of the training batch size so that a
        batch rule sees its training budget; None without a hierarchy."""
        if not hierarchy_parents(self.model):
            return None
        result = absorption_metrics(
            sae.encode,
            sae.W_dec,
            self.model,
            torch.cat(self.eval_batches),
            batch_size=self.cfg.batch_size,
        )
        return result.absorption
