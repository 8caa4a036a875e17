"""Sampled-SAE (Oozeer et al., arXiv 2508.21324): a feature pool, then batch top-k.

Each step scores every feature column of the batch's activations (L2, squared L2,
entropy or uniform), forms a pool of features (sampled in proportion to the score by
default, or the best scores), and keeps the batch's ``round(k * B)`` largest
activations inside the pool. The pool holds ``round(pool_fraction * d_sae)`` features
(default half the dictionary) or, with the paper's ``l`` as ``pool_factor``,
``round(k * pool_factor)``: small pools force the batch onto a few shared features,
and a pool of every feature is exactly BatchTopK.
"""

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
from sae_lens.saes.sae import TrainStepInput, TrainStepOutput
from typing_extensions import override

from sae_lens_sampled._registry import Architecture
from sae_lens_sampled.global_batch import BatchTraffic, GlobalBatch
from sae_lens_sampled.saes.base import (
    BatchLevelSAE,
    BatchLevelSAEConfig,
    BatchLevelTrainingSAE,
    BatchLevelTrainingSAEConfig,
    FieldValueError,
    check_choice,
    check_range,
)
from sae_lens_sampled.selection import (
    POOL_MODES,
    SCORES,
    PoolMode,
    ScoreName,
    batch_budget,
    pool_size,
    seeded_generator,
    topk_in_pool,
    update_missed_chances,
    update_staleness,
)

ARCHITECTURE = "sampled"

AuxDead = Literal["trainer", "pooled"]
AUX_DEAD: tuple[str, ...] = ("trainer", "pooled")


# The pool's default size as a share of the dictionary, so that the default lands on
# the same point of the spectrum at every width (docs/sampled.md, "Pool size").
DEFAULT_POOL_FRACTION = 0.5


def validate_pool_fields(cfg: "SampledTrainingSAEConfig | SampledSAEConfig") -> None:
    """Check the pool fields; with neither size set, set the default fraction, so that
    the saved config names the pool it was trained with."""
    if cfg.pool_factor is not None and cfg.pool_fraction is not None:
        raise FieldValueError(
            "set one of pool_factor (the paper's l: a pool of round(k * pool_factor) "
            "features) and pool_fraction (a pool of round(pool_fraction * d_sae) "
            f"features), not both; got pool_factor={cfg.pool_factor!r}, "
            f"pool_fraction={cfg.pool_fraction!r}",
            "pool_fraction",
            cfg.pool_fraction,
        )
    if cfg.pool_factor is not None:
        check_range("pool_factor", cfg.pool_factor, low=1)
    else:
        # At least k features, as pool_factor >= 1 guarantees.
        low = min(1.0, cfg.k / cfg.d_sae)
        if cfg.pool_fraction is None:
            cfg.pool_fraction = max(DEFAULT_POOL_FRACTION, low)
        check_range(
            "pool_fraction", cfg.pool_fraction, low=0, high=1, low_inclusive=False
        )
        if cfg.pool_fraction * cfg.d_sae < cfg.k:
            raise FieldValueError(
                f"pool_fraction must be in [k / d_sae, 1] = [{low:.6g}, 1] for "
                f"k={cfg.k} and d_sae={cfg.d_sae} (the pool holds at least k "
                f"features), got {cfg.pool_fraction!r}",
                "pool_fraction",
                cfg.pool_fraction,
            )
    check_choice("score", cfg.score, SCORES)
    check_choice("pool_mode", cfg.pool_mode, POOL_MODES)
    check_range("pool_beta", cfg.pool_beta, low=0)
    if math.isinf(cfg.pool_beta):
        raise FieldValueError(
            f"pool_beta must be finite, got {cfg.pool_beta!r}; its limit "
            "pool_beta -> inf is pool_mode='top'",
            "pool_beta",
            cfg.pool_beta,
        )
    if cfg.pool_seed is not None:
        check_range("pool_seed", cfg.pool_seed, low=0)


def config_pool_size(cfg: "SampledTrainingSAEConfig | SampledSAEConfig") -> int:
    """The number of features in the pool of ``cfg``."""
    return pool_size(cfg.k, cfg.pool_factor, cfg.d_sae, cfg.pool_fraction)


@dataclass(frozen=True)
class StepPool:
    """What a training step's selection leaves for its state update.

    Args:
        pool (torch.Tensor | None): The pooled features (None: every feature).
        positive (torch.Tensor | None): Per feature, whether it had a positive
            activation in the batch (``aux_dead="pooled"`` only, else None).
    """

    pool: torch.Tensor | None
    positive: torch.Tensor | None


class PoolDraw(NamedTuple):  # a NamedTuple, which torch.compile traces through
    """What one selection's pool draw takes from the SAE that makes it.

    Args:
        generator (Callable): The draw's generator on a device (None: torch's
            global RNG); called only when a pool is drawn.
        step (SampledTrainingSAE | None): The training SAE whose training step this
            selection is: its warm-up, exploration and ``aux_dead="pooled"`` apply,
            and it keeps the step's pool in ``step_pool``. None elsewhere.
    """

    generator: Callable[[torch.device], torch.Generator | None]
    step: "SampledTrainingSAE | None" = None


@dataclass
class SampledTrainingSAEConfig(BatchLevelTrainingSAEConfig):
    """Configuration for training a Sampled-SAE (shared fields:
    :class:`BatchLevelTrainingSAEConfig`).

    Args:
        k (float): Mean active features per token; a batch of B tokens keeps
            ``round(k * B)`` entries, all from the pool.
        pool_factor (float | None): The paper's ``l`` (>= 1): a pool of
            ``min(d_sae, round(k * pool_factor))`` features. The same ``l`` is a
            different share of the dictionary at every width, so by default the
            pool is sized by ``pool_fraction`` instead. Set at most one of the two.
        pool_fraction (float | None): The pool as a share of the dictionary, in
            ``[k / d_sae, 1]``: ``round(pool_fraction * d_sae)`` features. With
            neither field set, ``DEFAULT_POOL_FRACTION`` (0.5; ``k / d_sae`` if
            larger) is used and written into the config: on real activations
            at 1,536 to 16,384 latents it reconstructs within 0.015 of BatchTopK,
            where smaller pools lose more as the dictionary grows. Explained
            variance rises with the pool and reaches BatchTopK's at 1
            (docs/sampled.md).
        score (str): Column score: ``"squared_l2"`` (default), ``"l2"``,
            ``"entropy"`` (high entropy, i.e. spread over many tokens, is kept) or
            ``"uniform"``. Sampling by squared L2 reconstructs better than by L2
            with no more dead features on every data set we measured.
        pool_mode (str): ``"sample"`` (default) draws the pool without replacement with
            probability proportional to ``score ** pool_beta``; ``"top"`` takes the
            best scores (then ``l2`` and ``squared_l2`` give the same pool).
        pool_beta (float): Sharpness of the sampled pool (>= 0, finite): features are
            drawn with probability proportional to ``score ** pool_beta``. 1 (default)
            is proportional to the score; 0 is uniform over the features with a
            positive score; large values approach ``pool_mode="top"``.
            ``score="squared_l2"`` at ``pool_beta=b`` is ``score="l2"`` at ``2 * b``.
        pool_explore (float): Share of the pool, in [0, 1], reserved during training
            for the features outside the score-based pool that were pooled least
            recently (``round(pool_explore * P)`` slots), so that no feature can go
            unpooled for long. 0 (default) reserves none. Training only:
            ``encode_batch`` uses the score-based pool alone.
        pool_warmup_steps (int): Training steps (>= 0) at the start that use every
            feature as the pool (plain BatchTopK) before the pool rule takes over.
            0 (default) uses the pool from the first step.
        aux_dead (str): Which features the aux losses treat as dead. ``"trainer"``
            (default): SAELens's dead mask, features not selected for
            ``dead_feature_window`` steps, which counts a feature left out of the
            pool as dead. ``"pooled"``: features that missed more than
            ``aux_dead_window`` consecutive chances to fire, a chance being a step on
            which the feature was in the pool or had no positive activation at all
            (steps spent outside the pool with positive activations do not count).
            With every feature pooled on every step, ``"pooled"`` equals the
            trainer's mask for ``aux_dead_window = dead_feature_window``.
        aux_dead_window (int): Missed chances (>= 1) after which ``aux_dead="pooled"``
            counts a feature as dead.
        pool_seed (int | None): Seed for pool sampling. With a seed, the draw depends
            only on the seed and the step count (a saved buffer), so runs, resumes and
            ``encode_batch`` are reproducible; ``None`` uses torch's global RNG.
        threshold_mode (str): Per-token inference thresholds: ``"rate"`` (default;
            each feature fires per token as often as the batch rule selects it,
            counting the chance of being in the pool), ``"per_feature"`` (EMA of its
            smallest selected activation) or ``"global"``. Features never selected
            never fire.
    """

    architecture_key = ARCHITECTURE

    pool_factor: float | None = None
    pool_fraction: float | None = None
    score: ScoreName = "squared_l2"
    pool_mode: PoolMode = "sample"
    pool_beta: float = 1.0
    pool_explore: float = 0.0
    pool_warmup_steps: int = 0
    aux_dead: AuxDead = "trainer"
    aux_dead_window: int = 100
    pool_seed: int | None = None

    @override
    def validate(self) -> None:
        super().validate()
        validate_pool_fields(self)
        check_range("pool_explore", self.pool_explore, low=0, high=1)
        check_range("pool_warmup_steps", self.pool_warmup_steps, low=0)
        check_choice("aux_dead", self.aux_dead, AUX_DEAD)
        check_range("aux_dead_window", self.aux_dead_window, low=1)


class SampledTrainingSAE(BatchLevelTrainingSAE):
    """Sampled-SAE training SAE: score, pool, then batch top-k inside the pool."""

    cfg: SampledTrainingSAEConfig
    n_selection_steps: torch.Tensor
    pool_staleness: torch.Tensor
    missed_chances: torch.Tensor
    training_buffers = (
        *BatchLevelTrainingSAE.training_buffers,
        "n_selection_steps",
        "pool_staleness",
        "missed_chances",
    )
    # One forward's seed of an unseeded draw (one_selection_draw).
    _draw_seed: int | None = None
    # Set during training_forward_pass: select is the training step's rule.
    _in_training_step: bool = False
    # The pool of the current training step (sampled_rule), until update_state.
    step_pool: StepPool | None = None

    def __init__(self, cfg: SampledTrainingSAEConfig, use_error_term: bool = False):
        super().__init__(cfg, use_error_term)
        device = self.W_dec.device
        # Steps since each feature was last in the pool (pool_explore), and the
        # chances to fire it has missed since it last fired (aux_dead="pooled").
        self.register_buffer(
            "pool_staleness", torch.zeros(cfg.d_sae, dtype=torch.long, device=device)
        )
        self.register_buffer(
            "missed_chances", torch.zeros(cfg.d_sae, dtype=torch.long, device=device)
        )

    def _generator(self) -> torch.Generator | None:
        if self._draw_seed is not None:
            return seeded_generator(self._draw_seed, 0, self.W_dec.device)
        if self.cfg.pool_seed is None:
            return None
        step = self.host_step_count()
        return seeded_generator(self.cfg.pool_seed, step, self.W_dec.device)

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

    def in_warmup(self) -> bool:
        """Whether the current training step still uses every feature as the pool."""
        warmup = self.cfg.pool_warmup_steps
        return warmup > 0 and self.host_step_count() < warmup

    def pool_draw(self) -> PoolDraw:
        """This selection's draw: in a training step, the step's generator and
        options; outside one, the generator of a plain ``sampled`` selection."""
        if self._in_training_step:
            return PoolDraw(lambda _device: self._generator(), self)
        generator = self._generator()
        return PoolDraw(lambda _device: generator)

    @override
    def training_forward_pass(self, step_input: TrainStepInput) -> TrainStepOutput:
        self._in_training_step = True
        self.step_pool = None
        try:
            output = super().training_forward_pass(step_input)
        finally:
            self._in_training_step = False
        if config_pool_size(self.cfg) < self.cfg.d_sae:
            staleness = self.pool_staleness
            output.metrics["pool_max_staleness"] = lambda: staleness.max()
        return output

    @override
    def selected_columns(self) -> torch.Tensor | None:
        # The training step's pool, which sampled_rule ran its batch top-k over.
        step_pool = self.step_pool
        return None if step_pool is None else step_pool.pool

    @override
    def aux_dead_features(
        self, dead_neuron_mask: torch.Tensor | None
    ) -> torch.Tensor | None:
        if self.cfg.aux_dead == "pooled":
            # The state is updated after the loss, so this is the mask up to the
            # previous step, as the trainer's own mask is.
            return self.aux_dead_mask()
        return dead_neuron_mask

    @override
    def mse_rise_advice(self) -> str:
        size, d_sae = config_pool_size(self.cfg), self.cfg.d_sae
        if size >= d_sae:
            return super().mse_rise_advice()
        # The usual cause with a pool (docs/sampled.md, "Why the loss does not fall").
        now = (
            f"pool_fraction={self.cfg.pool_fraction:g}"
            if self.cfg.pool_fraction is not None
            else f"pool_factor={self.cfg.pool_factor:g}"
        )
        return (
            f"a pool of {size} of {d_sae} features changes from step to step and "
            f"holds too little of what the batch needs; enlarge it with "
            f"pool_fraction (now {now}) or lower the learning rate (lr)"
        )

    @torch.no_grad()
    def aux_dead_mask(self) -> torch.Tensor:
        """``aux_dead="pooled"``'s dead set: more than ``aux_dead_window`` missed
        chances to fire."""
        return self.missed_chances > self.cfg.aux_dead_window

    @override
    @torch.no_grad()
    def update_rule_state(
        self, feature_acts: torch.Tensor, counts: torch.Tensor
    ) -> None:
        step_pool, self.step_pool = self.step_pool, None
        if step_pool is None:  # called outside a training step
            return
        self.pool_staleness.copy_(update_staleness(self.pool_staleness, step_pool.pool))
        if step_pool.positive is not None:
            chance = (self.pool_staleness == 0) | ~step_pool.positive
            if self.entries_of(feature_acts) is not None:
                # The selected values are never negative, so the features with a
                # non-zero code are those with a positive one: global counts > 0.
                fired = counts > 0
            else:
                # the trainer's did_fire
                fired = (feature_acts.detach().flatten(end_dim=-2) != 0).any(dim=0)
                if self.data_parallel is not None:  # fired on any rank's rows
                    fired = self.data_parallel.sum_counts(fired.long()) > 0
            self.missed_chances.copy_(
                update_missed_chances(self.missed_chances, fired, chance)
            )


@dataclass
class SampledSAEConfig(BatchLevelSAEConfig):
    """Configuration for a Sampled-SAE inference SAE (fields used by ``encode_batch``).

    Args:
        pool_factor (float | None): The paper's ``l`` (>= 1): a pool of
            ``round(k * pool_factor)`` features. Set at most one of the two sizes.
        pool_fraction (float | None): The pool as a share of the dictionary
            (``round(pool_fraction * d_sae)`` features, ``[k / d_sae, 1]``); with
            neither set, 0.5. Files saved before 0.3 carry ``pool_factor`` only.
        score (str): ``"squared_l2"``, ``"l2"``, ``"entropy"`` or ``"uniform"``.
        pool_mode (str): ``"sample"`` or ``"top"``.
        pool_beta (float): Sharpness of the sampled pool: probability proportional
            to ``score ** pool_beta`` (>= 0, finite).
        pool_seed (int | None): Seed of the pool draws in ``encode_batch``. With a
            seed, the i-th draw since the SAE was built or loaded uses the stream of
            ``(pool_seed, i)``, as training step i did: successive calls draw fresh
            pools, and a reloaded SAE replays the same sequence (set
            ``n_batch_draws`` to restart it). ``None`` uses torch's global RNG, so two
            calls on the same input can give different codes.
    """

    architecture_key = ARCHITECTURE

    pool_factor: float | None = None
    pool_fraction: float | None = None
    score: ScoreName = "squared_l2"
    pool_mode: PoolMode = "sample"
    pool_beta: float = 1.0
    pool_seed: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        validate_pool_fields(self)


class SampledSAE(BatchLevelSAE):
    """Sampled-SAE inference SAE: per-token thresholds; ``encode_batch`` for the rule."""

    cfg: SampledSAEConfig

    def __init__(self, cfg: SampledSAEConfig, use_error_term: bool = False):
        super().__init__(cfg, use_error_term)
        # Pool draws made so far; with a pool_seed, draw i replays training step i's
        # stream. Not saved: a loaded SAE starts again at 0.
        self.n_batch_draws = 0

    def pool_draw(self) -> PoolDraw:
        """This selection's draw: with a ``pool_seed``, the stream of
        ``(pool_seed, n_batch_draws)``; the count moves on either way."""
        seed, draw = self.cfg.pool_seed, self.n_batch_draws
        self.n_batch_draws += 1
        if seed is None:
            return PoolDraw(lambda _device: None)
        return PoolDraw(lambda device: seeded_generator(seed, draw, device))


def sampled_rule(
    sae: SampledTrainingSAE | SampledSAE, acts: torch.Tensor, batch: GlobalBatch
) -> torch.Tensor:
    """Score the batch's features, draw a pool, and keep the batch's ``round(k * B)``
    largest activations inside it.

    Over a batch split across processes the scores are the global batch's, the first
    process draws the pool (with the generator one process would use) and every
    process uses it.
    """
    cfg = sae.cfg
    draw = sae.pool_draw()
    step = draw.step
    positive = None
    if step is not None and step.cfg.aux_dead == "pooled":
        with torch.no_grad():
            # A feature with no positive activation could not have fired anyway.
            positive = batch.any_positive((acts > 0).any(dim=0))
    pool = None
    size = config_pool_size(cfg)
    if size < acts.shape[-1] and (step is None or not step.in_warmup()):
        explore = 0.0 if step is None else step.cfg.pool_explore
        pool = batch.draw_pool(
            batch.feature_scores(acts, cfg.score),
            size,
            cfg.pool_mode,
            draw.generator(acts.device),
            beta=cfg.pool_beta,
            explore=explore,
            staleness=step.pool_staleness if step is not None and explore > 0 else None,
        )
    if step is not None:
        step.step_pool = StepPool(pool, positive)
    budget = batch_budget(cfg.k, batch.n_tokens)
    return topk_in_pool(acts, budget, pool, batch.batch_topk)


def sampled_traffic(
    cfg: SampledTrainingSAEConfig, n_tokens: int, costs: BatchTraffic
) -> float:
    """The global scores and the pool, then a global top-k inside the pool."""
    size = config_pool_size(cfg)
    budget = batch_budget(cfg.k, n_tokens)
    if size >= cfg.d_sae:
        return costs.batch_topk(budget, cfg.d_sae)
    return (
        costs.feature_scores(cfg.d_sae, cfg.score)
        + costs.draw_pool(size)
        + costs.batch_topk(budget, size)
    )


# The traffic model's columns: the paper's pool of 3k, scored by L2 or by entropy.
_TRAFFIC_CASES = {
    ARCHITECTURE: {"score": "l2", "pool_factor": 3.0, "pool_seed": 0},
    f"{ARCHITECTURE}_entropy": {"score": "entropy", "pool_factor": 3.0, "pool_seed": 0},
}

ENTRY = Architecture(
    ARCHITECTURE,
    SampledSAE,
    SampledSAEConfig,
    SampledTrainingSAE,
    SampledTrainingSAEConfig,
    sampled_rule,
    sampled_traffic,
    _TRAFFIC_CASES,
)
