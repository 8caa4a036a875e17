"""Sampled-SAE (Oozeer et al., arXiv 2508.21324): a feature pool, then batch top-k.

Each step scores every feature column of the batch's activations (L2, squared L2,
entropy or uniform), forms a pool of ``round(k * pool_factor)`` features (sampled in
proportion to the score by default, or the best scores), and keeps the batch's
``round(k * B)`` largest activations inside the pool. ``pool_factor`` is the paper's
``l``: small values force the batch onto a few shared features, and once
``k * pool_factor >= d_sae`` the rule is exactly BatchTopK.
"""

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from typing_extensions import override

from sae_lens_sampled.saes.base import (
    BatchLevelSAE,
    BatchLevelSAEConfig,
    BatchLevelTrainingSAE,
    BatchLevelTrainingSAEConfig,
    check_choice,
    check_range,
)
from sae_lens_sampled.selection import (
    POOL_MODES,
    SCORES,
    PoolMode,
    ScoreName,
    sampled_topk,
    seeded_generator,
)

ARCHITECTURE = "sampled"


def validate_pool_fields(cfg: "SampledTrainingSAEConfig | SampledSAEConfig") -> None:
    check_range("pool_factor", cfg.pool_factor, low=1)
    check_choice("score", cfg.score, SCORES)
    check_choice("pool_mode", cfg.pool_mode, POOL_MODES)
    if cfg.pool_seed is not None:
        check_range("pool_seed", cfg.pool_seed, low=0)


@dataclass
class SampledTrainingSAEConfig(BatchLevelTrainingSAEConfig):
    """Configuration for training a Sampled-SAE.

    Args:
        k (float): Mean active features per token; a batch of B tokens keeps
            ``round(k * B)`` entries, all from the pool.
        pool_factor (float): The paper's ``l`` (>= 1): the pool holds
            ``min(d_sae, round(k * pool_factor))`` features.
        score (str): Column score: ``"l2"`` (default), ``"squared_l2"``,
            ``"entropy"`` (high entropy, i.e. spread over many tokens, is kept) or
            ``"uniform"``.
        pool_mode (str): ``"sample"`` (default) draws the pool without replacement with
            probability proportional to the score; ``"top"`` takes the best scores
            (then ``l2`` and ``squared_l2`` give the same pool).
        pool_seed (int | None): Seed for pool sampling. With a seed, the draw depends
            only on the seed and the step count (a saved buffer), so runs, resumes and
            ``encode_batch`` are reproducible; ``None`` uses torch's global RNG.
        threshold_mode (str): Per-token inference thresholds: ``"rate"`` (default;
            each feature fires per token as often as the batch rule selects it,
            counting the chance of being in the pool), ``"per_feature"`` (EMA of its
            smallest selected activation) or ``"global"``. Features never selected
            never fire.
        aux_loss (str): ``"aux_k"`` (default), ``"aux_zipf"`` or ``"none"``.
        aux_loss_coefficient (float): Weight of the auxiliary loss.
        rescale_acts_by_decoder_norm (bool): Select on ``hidden_pre * ||W_dec||``.
        topk_threshold_lr (float): Step rate of the thresholds, in (0, 1].
        decoder_init_norm (float | None): Initial decoder row norm (SAELens's).
        d_in (int): Input dimension.
        d_sae (int): Number of features.
    """

    pool_factor: float = 3.0
    score: ScoreName = "l2"
    pool_mode: PoolMode = "sample"
    pool_seed: int | None = None

    @override
    @classmethod
    def architecture(cls) -> str:
        return ARCHITECTURE

    @override
    def validate(self) -> None:
        super().validate()
        validate_pool_fields(self)


class SampledTrainingSAE(BatchLevelTrainingSAE):
    """Sampled-SAE training SAE: score, pool, then batch top-k inside the pool."""

    cfg: SampledTrainingSAEConfig
    n_selection_steps: torch.Tensor
    training_buffers = (*BatchLevelTrainingSAE.training_buffers, "n_selection_steps")

    def __init__(self, cfg: SampledTrainingSAEConfig, use_error_term: bool = False):
        super().__init__(cfg, use_error_term)
        # Counts training steps, so a seeded pool draw can be replayed after a resume.
        self.register_buffer(
            "n_selection_steps",
            torch.zeros((), dtype=torch.long, device=self.W_dec.device),
        )

    def _generator(self) -> torch.Generator | None:
        if self._draw_seed is not None:
            return seeded_generator(self._draw_seed, 0, self.W_dec.device)
        if self.cfg.pool_seed is None:
            return None
        step = int(self.n_selection_steps)
        return seeded_generator(self.cfg.pool_seed, step, self.W_dec.device)

    _draw_seed: int | None = None

    @override
    @contextmanager
    def one_selection_draw(self) -> Iterator[None]:
        # A seeded draw depends on the step count alone, which a forward does not
        # move; an unseeded one takes one seed from torch's global RNG for the whole
        # forward, so the error term's second encode draws the same pool.
        if self.cfg.pool_seed is not None or self._draw_seed is not None:
            yield
            return
        self._draw_seed = int(torch.randint(0, 2**62, ()))
        try:
            yield
        finally:
            self._draw_seed = None

    @override
    def select(self, acts: torch.Tensor) -> torch.Tensor:
        return sampled_topk(
            acts,
            k=self.cfg.k,
            pool_factor=self.cfg.pool_factor,
            score=self.cfg.score,
            pool_mode=self.cfg.pool_mode,
            generator=self._generator(),
        )

    @override
    @torch.no_grad()
    def update_state(
        self, feature_acts: torch.Tensor, hidden_pre: torch.Tensor
    ) -> torch.Tensor:
        fire_rates = super().update_state(feature_acts, hidden_pre)
        self.n_selection_steps += 1
        return fire_rates


@dataclass
class SampledSAEConfig(BatchLevelSAEConfig):
    """Configuration for a Sampled-SAE inference SAE (fields used by ``encode_batch``).

    Args:
        k (float): Mean active features per token of the batch rule.
        pool_factor (float): Pool size factor ``l`` (>= 1).
        score (str): ``"l2"``, ``"squared_l2"``, ``"entropy"`` or ``"uniform"``.
        pool_mode (str): ``"sample"`` or ``"top"``.
        pool_seed (int | None): Seed of the pool draws in ``encode_batch``. With a
            seed, the i-th draw since the SAE was built or loaded uses the stream of
            ``(pool_seed, i)``, as training step i did: successive calls draw fresh
            pools, and a reloaded SAE replays the same sequence (set
            ``n_batch_draws`` to restart it). ``None`` uses torch's global RNG, so two
            calls on the same input can give different codes.
    """

    pool_factor: float = 3.0
    score: ScoreName = "l2"
    pool_mode: PoolMode = "sample"
    pool_seed: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        validate_pool_fields(self)

    @override
    @classmethod
    def architecture(cls) -> str:
        return ARCHITECTURE


class SampledSAE(BatchLevelSAE):
    """Sampled-SAE inference SAE: per-token thresholds; ``encode_batch`` for the rule."""

    cfg: SampledSAEConfig

    def __init__(self, cfg: SampledSAEConfig, use_error_term: bool = False):
        super().__init__(cfg, use_error_term)
        # Pool draws made so far; with a pool_seed, draw i replays training step i's
        # stream. Not saved: a loaded SAE starts again at 0.
        self.n_batch_draws = 0

    @override
    def select_ranked(self, ranking: torch.Tensor) -> torch.Tensor:
        generator = None
        if self.cfg.pool_seed is not None:
            generator = seeded_generator(
                self.cfg.pool_seed, self.n_batch_draws, ranking.device
            )
        self.n_batch_draws += 1
        return sampled_topk(
            ranking,
            k=self.cfg.k,
            pool_factor=self.cfg.pool_factor,
            score=self.cfg.score,
            pool_mode=self.cfg.pool_mode,
            generator=generator,
        )
