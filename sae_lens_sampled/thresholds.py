"""Per-token inference thresholds: learned in training, re-fitted, exported.

Batch-level rules depend on the other tokens of a batch, so the inference SAEs encode
each token alone with the JumpReLU rule ``relu(h) * (h > threshold)``. The thresholds'
job is fidelity: per token, each feature should fire about as often as the batch rule
selected it in training. :class:`ThresholdState` owns a training SAE's threshold
buffers and updates them every step, without a host sync, by one of three rules
(``threshold_mode``):

- ``"rate"`` (default), rate matching: each step moves feature j's threshold toward
  the quantile of its pre-activations that fires as often as the batch rule selects
  j. In a batch of ``B`` tokens, with ``n_j`` the batch rule's selections of j,
  ``c_j = #{h_ij > t_j}`` the tokens j fires on per token, ``r_j`` the EMA of
  ``n_j / B`` (weight ``topk_threshold_lr``), ``p_j`` the EMA of ``c_j / B`` and
  ``s_j`` the EMA of the mean excess ``h_ij - t_j`` over those ``c_j`` tokens (the
  tail scale)::

      e_j = clip((c_j - r_j B) / max(B sqrt(p_j r_j), 1), -4, 4)
      t_j <- max(0, t_j + threshold_gain * s_j * e_j)

  The fixed point is ``E[c_j] = r_j B``: the per-token firing rate equals the batch
  rule's selection rate, which for ``sampled`` includes the chance of being in the
  pool. ``e_j`` approximates ``log(p_j / r_j)``, so the step is a damped Newton step
  for a tail ``P(h > t) ~ exp(-t / s_j)``: every feature converges at the same pace,
  whatever its scale or rate. A feature's first selection sets its threshold to its
  smallest selected value (the start of the other rules too, and under data
  parallelism a global statistic); a feature never selected keeps ``inf`` and never
  fires. A batch in which the rule selects nothing changes nothing. Everything is
  read from per-feature sums (``c_j``, the excess), so data-parallel ranks agree by
  summing them.
- ``"per_feature"``: EMA of each feature's smallest selected activation.
- ``"global"``: one EMA of the batch's smallest selected activation (BatchTopK's).

:func:`calibrate_thresholds` re-fits the same targets on other activations, and
:func:`export_jumprelu` hands the result to tools that never import this plugin.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeAlias, cast

import torch
from typing_extensions import TypeIs

if TYPE_CHECKING:
    from sae_lens import JumpReLUSAE
    from sae_lens.saes.sae import SAEMetadata

    from sae_lens_sampled.global_batch import GlobalBatch
    from sae_lens_sampled.saes.base import BatchLevelSAE, BatchLevelTrainingSAE

# What calibration reads and re-fits: a plugin SAE (inference or training), or a
# SAELens JumpReLU SAE (a plugin SAE's export, whose metadata names its batch rule).
ThresholdedSAE: TypeAlias = "JumpReLUSAE | BatchLevelTrainingSAE"
# What applies a batch rule (``encode_batch``).
BatchRuleSAE: TypeAlias = "BatchLevelSAE | BatchLevelTrainingSAE"

ThresholdMode = Literal["rate", "per_feature", "global"]
THRESHOLD_MODES: tuple[str, ...] = ("rate", "per_feature", "global")

# Largest upward step of the rate rule, in tail scales per lr: a feature firing far
# too often climbs steadily instead of jumping past its quantile.
MAX_RELATIVE_STEP = 4.0

# On CPU, [n, d_sae] temporaries are counted in row chunks of about this many
# entries: large fresh allocations cost more in page faults than the arithmetic.
_CPU_CHUNK_ENTRIES = 1 << 20


# ---------------------------------------------------------------------------
# Pure update rules (no SAELens imports, no host sync)


@torch.no_grad()
def column_stats_dense(feature_acts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per feature of ``[n, d_sae]`` codes: positive count, smallest positive value.

    The smallest is ``inf`` for a feature with no positive entry (``sparse.column_stats``
    computes both from the selected entries alone).
    """
    counts = (feature_acts > 0).sum(dim=0)
    if feature_acts.shape[0] == 0:  # amin has no identity for an empty dim
        return counts, feature_acts.new_full(counts.shape, torch.inf)
    smallest = torch.where(feature_acts > 0, feature_acts, torch.inf).amin(dim=0)
    return counts, smallest


@torch.no_grad()
def fired_and_excess(
    hidden_pre: torch.Tensor, threshold: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per feature of ``[n, d_sae]`` pre-activations: ``#{h > t}`` and ``sum(relu(h - t))``.

    ``threshold`` is compared in ``hidden_pre``'s dtype (as inference encodes); both
    results are float32 ``[d_sae]``. One read of ``hidden_pre``, in row chunks on CPU.
    """
    hidden_pre = hidden_pre.detach().flatten(end_dim=-2)
    threshold = threshold.to(hidden_pre.dtype)
    n_rows, width = hidden_pre.shape
    fired = hidden_pre.new_zeros(width, dtype=torch.float32)
    excess = hidden_pre.new_zeros(width, dtype=torch.float32)
    rows = n_rows
    if hidden_pre.device.type == "cpu":
        rows = max(1, _CPU_CHUNK_ENTRIES // max(width, 1))
    for chunk in hidden_pre.split(max(rows, 1)):
        above = (chunk - threshold).relu_()
        excess += above.sum(dim=0, dtype=torch.float32)
        fired += above.sign_().sum(dim=0, dtype=torch.float32)
    return fired, excess


@torch.no_grad()
def update_rate_threshold(
    threshold: torch.Tensor,
    scale: torch.Tensor,
    target_rate: torch.Tensor,
    token_rate: torch.Tensor,
    fired: torch.Tensor,
    n_tokens: int,
    gain: float | torch.Tensor,
) -> torch.Tensor:
    """One rate-matching step (module docstring); returns the new thresholds.

    ``fired`` counts this batch's tokens above ``threshold`` per feature,
    ``target_rate`` is the batch rule's selection-rate EMA, ``token_rate`` the
    per-token firing-rate EMA (before this batch) and ``scale`` the tail scales (0:
    unknown, then the threshold itself sets the step). Thresholds at ``inf`` stay.
    """
    step_scale = torch.where(scale > 0, scale, threshold)
    # (p - r) / sqrt(p r) ~ log(p / r): the Newton step for an exponential tail,
    # as fast up as down, yet linear in this batch's count (whose noise then
    # averages out); p is the firing-rate EMA from before this batch.
    normaliser = (token_rate * target_rate).sqrt() * n_tokens
    error = (fired - target_rate * n_tokens) / normaliser.clamp_min(1.0)
    error = error.clamp(-MAX_RELATIVE_STEP, MAX_RELATIVE_STEP)
    moved = (threshold + gain * step_scale * error).clamp_min(0.0)
    return torch.where(torch.isfinite(threshold), moved, threshold)


@torch.no_grad()
def update_global_threshold(
    threshold: torch.Tensor, smallest: torch.Tensor, lr: float
) -> torch.Tensor:
    """BatchTopK's rule: EMA of the smallest positive selected activation of the batch.

    ``threshold`` is a ``[d_sae]`` vector holding one shared value, ``smallest`` each
    feature's smallest positive selection in the batch (``inf`` if none). The threshold
    starts at ``inf`` and the first batch with a positive activation sets it outright
    (BatchTopK starts from 0, which makes early per-token encodes fire far too often);
    a batch with no positive activation leaves it unchanged.
    """
    batch_min = smallest.amin().to(threshold.dtype)
    updated = torch.where(
        torch.isfinite(threshold), (1 - lr) * threshold + lr * batch_min, batch_min
    )
    return torch.where(torch.isfinite(batch_min), updated, threshold)


@torch.no_grad()
def update_per_feature_threshold(
    threshold: torch.Tensor, smallest: torch.Tensor, lr: float
) -> torch.Tensor:
    """Per-feature EMA of each feature's smallest positive selected activation.

    Only features selected in this batch (finite ``smallest``) move. A feature's first
    selection sets its threshold outright (it starts at ``inf``: never selected, never
    fires).
    """
    batch_min = smallest.to(threshold.dtype)
    seen = torch.isfinite(threshold)
    updated = torch.where(seen, (1 - lr) * threshold + lr * batch_min, batch_min)
    return torch.where(torch.isfinite(batch_min), updated, threshold)


@torch.no_grad()
def update_firing_rate(
    firing_rate: torch.Tensor,
    counts: torch.Tensor,
    n_tokens: int,
    n_tokens_seen: torch.Tensor,
    horizon_tokens: float,
) -> torch.Tensor:
    """EMA of the fraction of tokens on which each feature is selected.

    ``counts`` are this batch's per-feature selection counts over ``n_tokens`` tokens;
    ``n_tokens_seen`` counts tokens including this batch. The batch's weight is
    ``n_tokens / min(n_tokens_seen, horizon_tokens)``: the plain running mean until the
    horizon is reached, an EMA with that horizon after, so early estimates carry no
    zero bias. Runs on device without a host sync.
    """
    if n_tokens == 0:
        return firing_rate
    batch_rate = counts.to(firing_rate.dtype) / n_tokens
    weight = n_tokens / n_tokens_seen.clamp(min=n_tokens, max=horizon_tokens)
    return firing_rate + weight.clamp(max=1.0) * (batch_rate - firing_rate)


# ---------------------------------------------------------------------------
# The training SAE's threshold state


class ThresholdState:
    """The per-token thresholds of a training SAE: its buffers and their update rule.

    The buffers are registered on ``owner`` (so they keep their names in state dicts,
    and float64 state is saved bit-exactly with the owner's other buffers); the rule
    is the owner's ``cfg.threshold_mode``, paced by ``cfg.topk_threshold_lr`` and
    ``cfg.threshold_gain``. Adding a rule means a branch in :meth:`update`.

    - ``running_threshold``: the thresholds, in the units of the owner's
      ``hidden_pre`` (exported as the inference SAE's ``threshold``);
    - ``selection_rate``: EMA (weight ``topk_threshold_lr``, plain mean at first) of
      the fraction of tokens on which the batch rule selects each feature;
    - ``token_rate``: EMA (weight ``threshold_gain``) of the fraction of tokens on
      which each feature fires per token; the two sums are the two L0s;
    - ``tail_scale``: EMA of each feature's mean excess over its threshold (``rate``).
    """

    buffers: tuple[str, ...] = (
        "running_threshold",
        "selection_rate",
        "token_rate",
        "tail_scale",
    )
    training_buffers: tuple[str, ...] = buffers[1:]

    def __init__(self, owner: BatchLevelTrainingSAE, d_sae: int, device: torch.device):
        self.owner = owner
        # float64: the EMAs move by steps that float32 would lose. Thresholds start
        # at inf: a feature the batch rule never selected never fires per token.
        owner.register_buffer(
            "running_threshold",
            torch.full((d_sae,), torch.inf, dtype=torch.float64, device=device),
        )
        for name in self.training_buffers:
            owner.register_buffer(
                name, torch.zeros(d_sae, dtype=torch.float64, device=device)
            )

    def __getattr__(self, name: str) -> torch.Tensor:
        # Buffers live on the owner, which moves and reloads them.
        if name in ThresholdState.buffers:
            buffer: torch.Tensor = getattr(self.owner, name)
            return buffer
        raise AttributeError(name)

    @torch.no_grad()
    def update(
        self,
        hidden_pre: torch.Tensor,
        selected: torch.Tensor,
        smallest: torch.Tensor,
        n_tokens: int,
        data_parallel: GlobalBatch | None = None,
    ) -> torch.Tensor:
        """Update from one training batch; returns the per-token fire rates.

        ``hidden_pre`` ``[..., d_sae]`` in threshold units; ``selected`` and
        ``smallest``: the batch rule's positive selections per feature and the
        smallest selected value (``inf`` if none), over the batch of ``n_tokens``
        tokens, which the owner's ``n_tokens_seen`` already counts. Under data
        parallelism (``data_parallel``, a :class:`GlobalBatch`) these are global and
        ``hidden_pre`` holds this rank's rows. The fire rates are taken at the
        thresholds before this update.
        """
        cfg = self.owner.cfg
        threshold = self.running_threshold
        if n_tokens == 0:
            return threshold.new_zeros(threshold.shape)
        fired, excess = fired_and_excess(hidden_pre, threshold)
        if data_parallel is not None:  # sums over the ranks' rows
            fired, excess = data_parallel.sum_floats(torch.stack([fired, excess]))
        fired, excess = fired.to(threshold.dtype), excess.to(threshold.dtype)
        selected = selected.to(threshold.dtype)
        lr, gain = cfg.topk_threshold_lr, cfg.threshold_gain
        # A batch in which the rule selects nothing (all pre-activations <= 0)
        # says nothing about rates or thresholds.
        informative = (selected.sum() > 0).to(threshold.dtype)
        # The plain running mean at first, so early estimates carry no zero bias.
        warm_up = n_tokens / self.owner.n_tokens_seen.clamp_min(n_tokens)
        weight = warm_up.clamp_min(lr) * informative
        fast_weight = warm_up.clamp_min(gain) * informative
        self.selection_rate.add_(weight * (selected / n_tokens - self.selection_rate))
        token_rate = self.token_rate.clone()  # the step's scale must not see this batch
        # The per-token rate follows the thresholds, at their pace.
        self.token_rate.add_(fast_weight * (fired / n_tokens - self.token_rate))

        smallest = smallest.to(threshold.dtype)
        if cfg.threshold_mode == "global":
            threshold.copy_(update_global_threshold(threshold, smallest, lr))
        elif cfg.threshold_mode == "per_feature":
            threshold.copy_(update_per_feature_threshold(threshold, smallest, lr))
        else:
            scale = self.tail_scale
            batch_scale = excess / fired.clamp_min(1.0)
            blended = scale + weight * (batch_scale - scale)
            blended = torch.where(scale > 0, blended, batch_scale)
            scale.copy_(torch.where(fired > 0, blended, scale))
            moved = update_rate_threshold(
                threshold,
                scale,
                self.selection_rate,
                token_rate,
                fired,
                n_tokens,
                gain * informative,
            )
            # A feature's first selection after the first batch starts it at its
            # smallest selected value; the steps take it from there.
            first_seen = torch.isinf(threshold) & torch.isfinite(smallest)
            threshold.copy_(torch.where(first_seen, smallest, moved))
        return fired / n_tokens

    @torch.no_grad()
    def set(self, thresholds: torch.Tensor) -> None:
        self.running_threshold.copy_(thresholds.to(self.running_threshold))

    @torch.no_grad()
    def rescale(self, factor: float) -> None:
        """Multiply thresholds and tail scales by ``factor`` (a fold changed units)."""
        self.running_threshold.mul_(factor)
        self.tail_scale.mul_(factor)

    def metrics(self, fire_rates: torch.Tensor) -> dict[str, Any]:
        """Training-log callables (evaluated on logging steps only, so no sync else).

        ``l0_per_token``: the per-token L0 of the batch whose ``fire_rates`` (from
        :meth:`update`) are given, at the thresholds it met.
        """
        threshold = self.running_threshold
        return {
            "threshold_mean": lambda: threshold[threshold.isfinite()].mean(),
            "l0_per_token": lambda: fire_rates.sum(),
        }

    def record_metadata(self, metadata: SAEMetadata) -> None:
        """Write the L0s of the end of training into SAELens ``metadata``.

        ``l0_per_token`` (per-token rule, EMA over about ``1 / threshold_gain``
        steps) and ``l0_batch_rule`` (EMA over ``1 / topk_threshold_lr`` steps), next
        to the trainer's own ``l0``. One host sync; nothing before the first step.
        """
        if bool(self.selection_rate.any()):
            metadata.l0_per_token = float(self.token_rate.sum())
            metadata.l0_batch_rule = float(self.selection_rate.sum())


# ---------------------------------------------------------------------------
# Calibration on held-out activations


@dataclass
class CalibrationResult:
    """What :func:`calibrate_thresholds` did.

    Args:
        thresholds (torch.Tensor): The thresholds now set on the SAE (float64).
        n_tokens (int): Calibration tokens seen.
        selected (torch.Tensor): Per feature, the mean number of calibration tokens
            on which the batch rule selected it (over ``pool_draws`` draws).
        refitted (torch.Tensor): Features whose threshold was re-fitted (selected
            at least once); the others kept their threshold.
        dead_before (int): Features firing per token on no calibration token with
            the thresholds before calibration.
        dead_after (int): The same with the new thresholds.
        rare (int): Re-fitted features selected on fewer than ``min_selections``
            tokens (their thresholds rest on few tokens).
    """

    thresholds: torch.Tensor
    n_tokens: int
    selected: torch.Tensor
    refitted: torch.Tensor
    dead_before: int
    dead_after: int
    rare: int


class _LogHistogram:
    """Per-feature counts of positive values in log-spaced buckets (a quantile sketch).

    Bucket ``b`` holds values in ``[lo * g**b, lo * g**(b+1))`` with ``g = 1 + 2 *
    accuracy``; ``lo`` is set per feature from the first chunk (its largest value
    times ``1e-4``), and the buckets reach ``1e7`` times above it. Values below ``lo``
    share bucket 0, values above the top share the last one; the exact per-feature
    maximum is kept too. Memory ``d_sae * n_buckets`` int32, whatever the data size.
    """

    def __init__(self, accuracy: float):
        self.log_growth = math.log1p(2 * accuracy)
        self.n_buckets = math.ceil(math.log(1e7) / self.log_growth) + 1
        self.counts: torch.Tensor | None = None
        self.log_low: torch.Tensor | None = None
        self.maximum: torch.Tensor | None = None

    def add(self, values: torch.Tensor) -> None:
        values = values.to(torch.float32)
        chunk_max = values.amax(dim=0)
        if self.counts is None:
            overall = chunk_max.amax().clamp_min(torch.finfo(torch.float32).tiny)
            start = torch.where(chunk_max > 0, chunk_max, overall)
            self.log_low = start.double().log() + math.log(1e-4)
            self.counts = torch.zeros(
                values.shape[1], self.n_buckets, dtype=torch.int32, device=values.device
            )
            self.maximum = chunk_max
        assert self.log_low is not None and self.maximum is not None
        self.maximum = torch.maximum(self.maximum, chunk_max)
        log_low = self.log_low.float()
        rows = max(1, _CPU_CHUNK_ENTRIES // max(values.shape[1], 1))
        for piece in values.split(rows):  # bounds the int64 index temporaries
            rows_at, features = (piece > 0).nonzero().unbind(1)
            logs = piece[rows_at, features].log()
            bucket = ((logs - log_low[features]) / self.log_growth).floor()
            bucket = bucket.clamp(0, self.n_buckets - 1).long()
            flat = features * self.n_buckets + bucket
            self.counts.view(-1).scatter_add_(
                0, flat, torch.ones_like(flat, dtype=torch.int32)
            )

    def quantiles(self, targets: torch.Tensor) -> torch.Tensor:
        """Per feature, the value above which about ``targets`` values lie (float64).

        0 where the target reaches every positive value; interpolated inside the
        bucket that holds it (log-linear, linear in bucket 0), capped at the maximum.
        """
        assert self.counts is not None and self.log_low is not None
        assert self.maximum is not None
        counts = self.counts.double()
        above = counts.flip(1).cumsum(1).flip(1)  # values in bucket b or higher
        target = targets.double()[:, None]
        n_higher = (above > target).sum(1)  # buckets whose tail exceeds the target
        bucket = (n_higher - 1).clamp_min(0)
        in_bucket = counts.gather(1, bucket[:, None]).squeeze(1)
        beyond = torch.cat([above[:, 1:], above.new_zeros(above.shape[0], 1)], 1)
        past = beyond.gather(1, bucket[:, None]).squeeze(1)
        fraction = ((targets.double() - past) / in_bucket.clamp_min(1.0)).clamp(0, 1)
        log_top = self.log_low + (bucket + 1) * self.log_growth
        value = (log_top - fraction * self.log_growth).exp()
        low_bucket = self.log_low.exp() * (1 - fraction)
        value = torch.where(bucket == 0, low_bucket, value)
        # at or above the maximum nothing fires: keep a target of one token or more
        maximum = self.maximum.double()
        cap = torch.where(
            targets >= 1, torch.nextafter(maximum, maximum.new_zeros(())), maximum
        )
        value = torch.minimum(value, cap)
        return torch.where(n_higher == 0, 0.0, value)


def _is_plugin(sae: object) -> TypeIs[BatchLevelSAE | BatchLevelTrainingSAE]:
    # Imported here: the SAE classes import this module.
    from sae_lens_sampled.saes.base import BatchLevelSAE, BatchLevelTrainingSAE

    return isinstance(sae, (BatchLevelSAE, BatchLevelTrainingSAE))


def _is_training(sae: object) -> TypeIs[BatchLevelTrainingSAE]:
    from sae_lens_sampled.saes.base import BatchLevelTrainingSAE

    return isinstance(sae, BatchLevelTrainingSAE)


def _pre_activations(sae: ThresholdedSAE, x: torch.Tensor) -> torch.Tensor:
    """``sae``'s pre-activations in the units of its thresholds, ``[n, d_sae]``."""
    if _is_plugin(sae):
        return sae.hidden_pre(x).flatten(end_dim=-2)
    sae_in = sae.process_sae_in(x)  # a plain SAELens JumpReLUSAE
    return (sae_in @ sae.W_enc + sae.b_enc).flatten(end_dim=-2)


def _current_thresholds(sae: ThresholdedSAE) -> torch.Tensor:
    if _is_training(sae):
        return sae.running_threshold.detach().double()
    return _jumprelu_threshold(sae).detach().double()


@torch.no_grad()
def _set_thresholds(sae: ThresholdedSAE, thresholds: torch.Tensor) -> None:
    if _is_plugin(sae):
        sae.set_thresholds(thresholds)
    else:
        threshold = _jumprelu_threshold(sae)
        threshold.data.copy_(thresholds.to(threshold))


def _jumprelu_threshold(sae: JumpReLUSAE) -> torch.Tensor:
    # A parameter SAELens assigns in __init__, so the type checker sees
    # Module.__getattr__'s union.
    return cast(torch.Tensor, sae.threshold)


def _rule_from_metadata(sae: JumpReLUSAE) -> BatchLevelSAE:
    """The plugin SAE whose batch rule an exported JumpReLU SAE records, if any."""
    from sae_lens import SAE

    rule = sae.cfg.metadata.get("batch_rule") if sae.cfg.metadata else None
    if not rule:
        raise ValueError(
            f"calibrate_thresholds: {type(sae).__name__} has no batch rule and its "
            "metadata records none; pass batch_rule=<the plugin SAE it came from>"
        )
    if rule.get("capacity_schedule") == "zipf":
        raise ValueError(
            "calibrate_thresholds: this SAE was exported from a feature_choice SAE "
            "with learned (capacity_schedule='zipf') capacities, which the export "
            "does not keep; pass batch_rule=<the feature_choice SAE>"
        )
    rule = dict(rule)
    rank_scale = rule.pop("rank_scale", None)
    cfg = {**sae.cfg.to_dict(), **rule}
    plugin: SAE[Any] = SAE.from_dict(cfg)
    if not _is_plugin(plugin) or _is_training(plugin):
        raise ValueError(
            "calibrate_thresholds: the batch rule in this SAE's metadata names "
            f"architecture {plugin.cfg.architecture()!r}, not a plugin architecture; "
            "pass batch_rule=<the plugin SAE it came from>"
        )
    state = {name: value for name, value in sae.state_dict().items()}
    if rank_scale is not None:
        state["rank_scale"] = torch.tensor(rank_scale, dtype=sae.W_dec.dtype)
    plugin.load_state_dict(state, strict=False)
    return plugin.to(sae.device)


@contextlib.contextmanager
def _fresh_pool_draws(
    rule: BatchRuleSAE, seed: int, device: torch.device
) -> Iterator[None]:
    """Every batch-rule call draws a new pool, from torch's RNG seeded with ``seed``.

    A seeded ``sampled`` SAE would otherwise replay one draw on every call; the
    caller's RNG state is restored afterwards.
    """
    cfg: Any = getattr(rule, "cfg", None)  # a sampled SAE's has a pool_seed
    saved = getattr(cfg, "pool_seed", None)
    draws = getattr(rule, "n_batch_draws", None)  # a seeded SAE's draw counter
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        if saved is not None:
            cfg.pool_seed = None
        try:
            yield
        finally:
            if saved is not None:
                cfg.pool_seed = saved
            if draws is not None:
                rule.n_batch_draws = draws


def _rechunk(batches: Iterable[torch.Tensor], size: int) -> Iterator[torch.Tensor]:
    """Tokens of ``batches`` (``[..., d_in]``) regrouped into ``[size, d_in]`` chunks.

    The last chunk may be shorter. The chunks depend only on the token order, not
    on how the tokens were split into batches.
    """
    pending: list[torch.Tensor] = []
    n_pending = 0
    for batch in batches:
        flat = batch.reshape(-1, batch.shape[-1])
        pending.append(flat)
        n_pending += flat.shape[0]
        while n_pending >= size:
            joined = torch.cat(pending)
            yield joined[:size]
            rest = joined[size:]
            pending, n_pending = [rest], rest.shape[0]
    if n_pending:
        yield torch.cat(pending)


def calibrate_thresholds(
    sae: ThresholdedSAE,
    batches: Iterable[torch.Tensor],
    *,
    batch_rule: BatchRuleSAE | None = None,
    batch_size: int = 4096,
    pool_draws: int = 1,
    seed: int = 0,
    min_selections: int = 10,
    accuracy: float = 0.01,
) -> CalibrationResult:
    """Re-fit ``sae``'s per-token thresholds on other activations.

    The activations are streamed once, regrouped into batches of ``batch_size``
    tokens (use the training batch size), and encoded with the batch rule; each
    feature's threshold is then set so that per token it fires on as many of these
    tokens as the batch rule selected it, the target the rate rule tracks during
    training. Features the batch rule never selected keep their threshold. Memory
    does not grow with the data: the pre-activations go into per-feature log-bucket
    histograms (thresholds within ``accuracy`` relative error before interpolation).

    Args:
        sae: A plugin inference or training SAE, or a SAELens ``JumpReLUSAE`` (e.g.
            from :func:`export_jumprelu`).
        batches: Activations ``[..., d_in]``, any iterable (a generator is read once).
        batch_rule: The plugin SAE whose batch rule sets the targets; default ``sae``
            itself, or for a ``JumpReLUSAE`` the rule its export metadata records.
        batch_size: Tokens per batch-rule call, > 0.
        pool_draws: Batch-rule calls per batch, averaged (``sampled``: fresh pools).
        seed: Seeds the pool draws; the caller's RNG state is left as it was.
        min_selections: A warning names features selected fewer times than this.
        accuracy: Relative bucket half-width of the histograms, in (0, 0.5).

    Returns:
        A :class:`CalibrationResult` (thresholds, dead features before and after).
    """
    for name, value, low in (
        ("batch_size", batch_size, 1),
        ("pool_draws", pool_draws, 1),
        ("min_selections", min_selections, 0),
    ):
        if value < low:
            raise ValueError(f"{name} must be in [{low}, inf), got {value!r}")
    if not 0 < accuracy < 0.5:
        raise ValueError(f"accuracy must be in (0, 0.5), got {accuracy!r}")
    if batch_rule is None:
        batch_rule = sae if _is_plugin(sae) else _rule_from_metadata(sae)
    with torch.no_grad():
        old = _current_thresholds(sae)
        histogram = _LogHistogram(accuracy)
        selected = old.new_zeros(old.shape)
        fired_before = old.new_zeros(old.shape)
        n_tokens = 0
        with _fresh_pool_draws(batch_rule, seed, old.device):
            for chunk in _rechunk(batches, batch_size):
                for _ in range(pool_draws):
                    codes = batch_rule.encode_batch(chunk).flatten(end_dim=-2)
                    selected += (codes > 0).sum(dim=0).double() / pool_draws
                pre = _pre_activations(sae, chunk)
                fired_before += fired_and_excess(pre, old.clamp_min(0))[0].double()
                histogram.add(pre)
                n_tokens += chunk.shape[0]
        if n_tokens == 0:
            raise ValueError("calibrate_thresholds needs at least one token, got none")
    refitted = selected > 0
    thresholds = torch.where(refitted, histogram.quantiles(selected), old)
    _set_thresholds(sae, thresholds)
    assert histogram.maximum is not None
    fires_after = histogram.maximum.double() > thresholds.clamp_min(0)
    rare = int((refitted & (selected < min_selections)).sum())
    unseen = int((~refitted & torch.isfinite(old)).sum())
    notes = []
    if rare:
        notes.append(
            f"{rare} features were selected fewer than {min_selections} times "
            "(their thresholds rest on few tokens)"
        )
    if unseen:
        notes.append(
            f"{unseen} features with a threshold were never selected (they keep it)"
        )
    if notes:
        warnings.warn(
            f"calibrate_thresholds: on {n_tokens} tokens, "
            + " and ".join(notes)
            + "; more calibration data narrows this",
            stacklevel=2,
        )
    return CalibrationResult(
        thresholds=thresholds,
        n_tokens=n_tokens,
        selected=selected,
        refitted=refitted,
        dead_before=int((fired_before == 0).sum()),
        dead_after=int((~fires_after).sum()),
        rare=rare,
    )


# ---------------------------------------------------------------------------
# Export


@torch.no_grad()
def export_jumprelu(
    sae: BatchLevelSAE | BatchLevelTrainingSAE, path: str | Path | None = None
) -> JumpReLUSAE:
    """Convert a plugin SAE into a plain SAELens ``JumpReLUSAE``.

    ``sae`` is one of the plugin's inference SAEs or training SAEs (training SAEs are
    converted exactly as ``save_inference_model`` would). The result's per-token
    ``encode`` equals the plugin's inference ``encode``. Its metadata keeps the
    plugin's (``l0_per_token``, ``l0_batch_rule``, ...) and records the batch rule's
    settings as ``batch_rule``, which :func:`calibrate_thresholds` can rebuild (not
    learned Feature Choice capacities); after ``fold_W_dec_norm`` on the inference
    SAE, ``batch_rule`` also lists the per-feature ``rank_scale``, so the rebuilt
    rule selects what the plugin's ``encode_batch`` selects. With ``path``, the SAE is also saved there
    (``cfg.json`` with architecture ``"jumprelu"``), loadable by any SAELens install
    without this plugin.
    """
    from sae_lens import JumpReLUSAE, JumpReLUSAEConfig, TrainingSAE
    from sae_lens.saes.sae import SAEMetadata

    state_dict = sae.state_dict()
    if isinstance(sae, TrainingSAE):
        sae.process_state_dict_for_saving_inference(state_dict)
        plugin_cfg = sae.cfg.get_inference_sae_cfg_dict()
    else:
        plugin_cfg = sae.cfg.to_dict()
    fields = JumpReLUSAEConfig.__dataclass_fields__
    cfg_dict = {
        name: getattr(sae.cfg, name) for name in fields if hasattr(sae.cfg, name)
    }
    metadata = SAEMetadata(**sae.cfg.metadata.to_dict())
    metadata.batch_rule = {
        name: value
        for name, value in plugin_cfg.items()
        if name not in fields and name != "metadata"
    }
    rank_scale = state_dict.get("rank_scale")
    if rank_scale is not None and not bool((rank_scale == 1).all()):
        # A fold on the inference SAE (fold_W_dec_norm) moved part of the ranking
        # into this buffer, which JumpReLU has no place for: the rule keeps it here.
        metadata.batch_rule["rank_scale"] = rank_scale.tolist()
    cfg_dict["metadata"] = metadata
    jumprelu = JumpReLUSAE(JumpReLUSAEConfig(**cfg_dict))
    wanted = jumprelu.state_dict().keys()
    jumprelu.load_state_dict(
        {name: state_dict[name].to(jumprelu.dtype) for name in wanted}
    )
    jumprelu.to(sae.device)
    if path is not None:
        jumprelu.save_model(path)
    return jumprelu
