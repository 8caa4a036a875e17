"""Per-token inference thresholds: the rules that learn them in training.

The inference SAEs encode each token alone with the JumpReLU rule
``relu(h) * (h > threshold)``; per token, each feature should fire about as often as
the batch rule selected it in training. :class:`ThresholdState` owns a training SAE's
threshold buffers and updates them every step, without a host sync, by one of three
rules (``threshold_mode``):

- ``"rate"`` (default), rate matching. In a batch of ``B`` tokens, with ``n_j`` the
  batch rule's selections of feature j, ``c_j = #{h_ij > t_j}``, ``r_j`` the EMA of
  ``n_j / B`` (weight ``topk_threshold_lr``), ``p_j`` the EMA of ``c_j / B`` and
  ``s_j`` the EMA of the mean excess ``h_ij - t_j`` over those ``c_j`` tokens (the
  tail scale)::

      e_j = clip((c_j - r_j B) / max(B sqrt(p_j r_j), 1), -4, 4)
      t_j <- max(0, t_j + threshold_gain * s_j * e_j)

  The fixed point is ``E[c_j] = r_j B`` (for ``sampled``, the pool chance included).
  ``e_j`` approximates ``log(p_j / r_j)``, so this is a damped Newton step for a
  tail ``P(h > t) ~ exp(-t / s_j)``: every feature converges at the same pace. A
  feature's first selection sets its threshold to its smallest selected value (as
  in the other rules); one never selected keeps ``inf`` and never fires; a batch
  that selects nothing changes nothing. Everything is read from per-feature sums,
  so data-parallel ranks agree by summing them.
- ``"per_feature"``: EMA of each feature's smallest selected activation.
- ``"global"``: one EMA of the batch's smallest selected activation (BatchTopK's).

:mod:`sae_lens_sampled.calibration` re-fits the same targets on other activations.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Protocol

import torch

if TYPE_CHECKING:
    from sae_lens.saes.sae import SAEMetadata

    from sae_lens_sampled.global_batch import GlobalBatch

ThresholdMode = Literal["rate", "per_feature", "global"]

# Largest upward step of the rate rule, in tail scales per lr: a feature firing far
# too often climbs steadily instead of jumping past its quantile.
MAX_RELATIVE_STEP = 4.0

# On CPU, [n, d_sae] temporaries are counted in row chunks of about this many
# entries: large fresh allocations cost more in page faults than the arithmetic.
_CPU_CHUNK_ENTRIES = 1 << 20


@torch.no_grad()
def column_stats_dense(feature_acts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per feature of ``[n, d_sae]`` codes: positive count, smallest positive value
    (``inf`` if none); ``sparse.column_stats`` from the selected entries alone."""
    counts = (feature_acts > 0).sum(dim=0)
    if feature_acts.shape[0] == 0:  # amin has no identity for an empty dim
        return counts, feature_acts.new_full(counts.shape, torch.inf)
    smallest = torch.where(feature_acts > 0, feature_acts, torch.inf).amin(dim=0)
    return counts, smallest


@torch.no_grad()
def fired_and_excess(
    hidden_pre: torch.Tensor, threshold: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per feature of ``[n, d_sae]`` pre-activations: ``#{h > t}`` and
    ``sum(relu(h - t))``, float32, compared in ``hidden_pre``'s dtype (as inference
    encodes). One read of ``hidden_pre``, in row chunks on CPU."""
    fired, excess = fired_and_excess_rows(hidden_pre, threshold).unbind()
    return fired, excess


@torch.no_grad()
def fired_and_excess_rows(
    hidden_pre: torch.Tensor, threshold: torch.Tensor
) -> torch.Tensor:
    """:func:`fired_and_excess` as the rows of one float32 ``[2, d_sae]`` tensor
    (what data-parallel ranks sum in one message)."""
    hidden_pre = hidden_pre.flatten(end_dim=-2)
    threshold = threshold.to(hidden_pre.dtype)
    n_rows, width = hidden_pre.shape
    rows = n_rows
    if hidden_pre.device.type == "cpu":
        rows = max(1, _CPU_CHUNK_ENTRIES // max(width, 1))
    if rows >= n_rows:  # one chunk: a few ops, no accumulators
        return _fired_and_excess_chunk(hidden_pre, threshold)
    totals = hidden_pre.new_zeros((2, width), dtype=torch.float32)
    for chunk in hidden_pre.split(rows):
        totals += _fired_and_excess_chunk(chunk, threshold)
    return totals


def _fired_and_excess_chunk(
    chunk: torch.Tensor, threshold: torch.Tensor
) -> torch.Tensor:
    above = (chunk - threshold).relu_()
    excess = above.sum(dim=0, dtype=torch.float32)
    # Counted as a float32 sum of signs (exact below 2 ** 24 tokens per feature):
    # on CPU several times faster than count_nonzero along the rows.
    fired = above.sign_().sum(dim=0, dtype=torch.float32)
    return torch.stack([fired, excess])


@torch.no_grad()
def update_rate_threshold(
    threshold: torch.Tensor,
    scale: torch.Tensor,
    target_rate: torch.Tensor,
    token_rate: torch.Tensor,
    fired: torch.Tensor,
    n_tokens: int,
    gain: float | torch.Tensor,
    first: torch.Tensor | None = None,
) -> torch.Tensor:
    """One rate-matching step (module docstring); returns the new thresholds.

    ``target_rate``: the selection-rate EMA; ``token_rate``: the per-token
    firing-rate EMA before this batch; ``scale``: the tail scales (0: unknown, then
    the threshold sets the step). Thresholds at ``inf`` stay, or start at ``first``
    where it is given and finite.
    """
    step_scale = torch.where(scale > 0, scale, threshold)
    # (p - r) / sqrt(p r) ~ log(p / r): the Newton step for an exponential tail,
    # as fast up as down, yet linear in this batch's count (whose noise then
    # averages out); p is the firing-rate EMA from before this batch.
    normaliser = (token_rate * target_rate).sqrt_().mul_(n_tokens)
    error = (fired - target_rate * n_tokens).div_(normaliser.clamp_min_(1.0))
    error = error.clamp_(-MAX_RELATIVE_STEP, MAX_RELATIVE_STEP)
    moved = (threshold + gain * step_scale * error).clamp_min_(0.0)
    # A threshold at inf has no step (inf + step); a NaN one stays NaN either way.
    # There `first` is the start: positive where finite, else inf, the threshold.
    start = threshold if first is None else first
    return torch.where(torch.isinf(threshold), start, moved)


@torch.no_grad()
def update_global_threshold(
    threshold: torch.Tensor, smallest: torch.Tensor, lr: float
) -> torch.Tensor:
    """BatchTopK's rule: EMA of the batch's smallest positive selected activation,
    one value shared by the ``[d_sae]`` ``threshold``, which starts at ``inf`` and is
    set outright by the first batch with one (BatchTopK starts from 0, which makes
    early per-token encodes fire far too often)."""
    return update_per_feature_threshold(threshold, smallest.amin(), lr)


@torch.no_grad()
def update_per_feature_threshold(
    threshold: torch.Tensor, smallest: torch.Tensor, lr: float
) -> torch.Tensor:
    """EMA of each feature's smallest positive selected activation (``smallest``:
    ``inf`` where none, which leaves it). A feature's first selection sets its
    threshold outright (it starts at ``inf``: never selected, never fires)."""
    batch_min = smallest.to(threshold.dtype)
    seen = threshold.abs() < torch.inf  # isfinite in two ops (isfinite takes four)
    updated = torch.where(seen, (1 - lr) * threshold + lr * batch_min, batch_min)
    # smallest is positive or inf, so `< inf` is its isfinite.
    return torch.where(batch_min < torch.inf, updated, threshold)


@dataclass(frozen=True)
class ThresholdStep:
    """What one training batch gives a threshold rule (float64 but ``smallest``,
    ``[d_sae]``).

    Args:
        threshold: The thresholds before this batch.
        smallest: Each feature's smallest positive selection (``inf`` if none), in
            the dtype of the codes.
        fired: Tokens above ``threshold``, per feature.
        excess: Summed excess over ``threshold`` of those tokens, per feature.
        n_tokens: Tokens in the batch.
        lr: ``topk_threshold_lr``.
        gain: ``threshold_gain``, 0 for a batch in which the rule selected nothing.
        weight: This batch's EMA weight (the plain mean at first), 0 likewise.
        selection_rate: The batch rule's selection-rate EMA, this batch included.
        token_rate: The per-token firing-rate EMA from before this batch.
        tail_scale: The tail-scale buffer; a rule that keeps it updates it in place.
    """

    threshold: torch.Tensor
    smallest: torch.Tensor
    fired: torch.Tensor
    excess: torch.Tensor
    n_tokens: int
    lr: float
    gain: torch.Tensor
    weight: torch.Tensor
    selection_rate: torch.Tensor
    token_rate: torch.Tensor
    tail_scale: torch.Tensor


def global_rule(step: ThresholdStep) -> torch.Tensor:
    """``"global"``: :func:`update_global_threshold`."""
    return update_global_threshold(step.threshold, step.smallest, step.lr)


def per_feature_rule(step: ThresholdStep) -> torch.Tensor:
    """``"per_feature"``: :func:`update_per_feature_threshold`."""
    return update_per_feature_threshold(step.threshold, step.smallest, step.lr)


def rate_rule(step: ThresholdStep) -> torch.Tensor:
    """``"rate"``: the tail scales' EMA, then :func:`update_rate_threshold`."""
    scale, fired = step.tail_scale, step.fired
    batch_scale = step.excess / fired.clamp_min(1.0)
    blended = scale + step.weight * (batch_scale - scale)
    blended = torch.where(scale > 0, blended, batch_scale)
    torch.where(fired > 0, blended, scale, out=scale)
    # A feature's first selection after the first batch starts it at its smallest
    # selected value (`first`); the steps take it from there.
    return update_rate_threshold(
        step.threshold,
        scale,
        step.selection_rate,
        step.token_rate,
        fired,
        step.n_tokens,
        step.gain,
        first=step.smallest,
    )


# threshold_mode -> its rule; a new rule is a function here and its name in
# ThresholdMode (the config field's type, whose values the CLI offers).
THRESHOLD_RULES: dict[str, Callable[[ThresholdStep], torch.Tensor]] = {
    "rate": rate_rule,
    "per_feature": per_feature_rule,
    "global": global_rule,
}
THRESHOLD_MODES: tuple[str, ...] = tuple(THRESHOLD_RULES)


@torch.no_grad()
def update_firing_rate(
    firing_rate: torch.Tensor,
    counts: torch.Tensor,
    n_tokens: int,
    n_tokens_seen: torch.Tensor,
    horizon_tokens: float,
) -> torch.Tensor:
    """EMA of the fraction of tokens on which each feature is selected (``counts``
    of this batch; ``n_tokens_seen`` includes it), with weight
    ``n_tokens / min(n_tokens_seen, horizon_tokens)``: the plain running mean until
    the horizon, so early estimates carry no zero bias. No host sync.
    """
    if n_tokens == 0:
        return firing_rate
    batch_rate = counts.to(firing_rate.dtype) / n_tokens
    weight = n_tokens / n_tokens_seen.clamp(min=n_tokens, max=horizon_tokens)
    return firing_rate + weight.clamp(max=1.0) * (batch_rate - firing_rate)


@dataclass(frozen=True)
class FiringRate:
    """A selection-rate EMA moved as :func:`update_firing_rate` moves it, in one
    group with the threshold state's EMAs.

    Args:
        rate: The EMA buffer (float64 ``[d_sae]``), updated in place.
        horizon_tokens: The EMA's horizon in tokens.
        counts: This batch's per-feature counts the EMA follows (None: the batch
            rule's selections).
    """

    rate: torch.Tensor
    horizon_tokens: float
    counts: torch.Tensor | None = None

    def weight(self, warm_up: torch.Tensor, n_tokens: int) -> torch.Tensor:
        """The batch's weight from ``warm_up = n_tokens / max(n_tokens_seen, n_tokens)``:
        bit for bit :func:`update_firing_rate`'s (both divide ``n_tokens`` by one of
        two numbers, rounded the same way, and rounding keeps the order)."""
        return warm_up.clamp(min=(1.0 / self.horizon_tokens) * n_tokens, max=1.0)


@torch.no_grad()
def move_toward_(
    rates: list[torch.Tensor], targets: list[torch.Tensor], weights: list[torch.Tensor]
) -> None:
    """``rate += weight * (target - rate)`` for each triple, in place, as one group of
    ops (one kernel each on a GPU, whatever the number of EMAs)."""
    steps = torch._foreach_sub(targets, rates)
    torch._foreach_mul_(steps, weights)
    torch._foreach_add_(rates, steps)


class ThresholdSettings(Protocol):
    """The config fields a threshold rule reads."""

    @property
    def threshold_mode(self) -> str: ...
    @property
    def topk_threshold_lr(self) -> float: ...
    @property
    def threshold_gain(self) -> float: ...


class ThresholdOwner(Protocol):
    """The training SAE whose thresholds a :class:`ThresholdState` keeps."""

    @property
    def cfg(self) -> ThresholdSettings: ...
    @property
    def n_tokens_seen(self) -> torch.Tensor: ...
    def register_buffer(
        self, name: str, tensor: torch.Tensor | None, persistent: bool = True
    ) -> None: ...


class ThresholdState:
    """The per-token thresholds of a training SAE: its buffers, registered on
    ``owner`` (so state dicts keep their names), and the rule
    ``THRESHOLD_RULES[cfg.threshold_mode]``.

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

    def __init__(self, owner: ThresholdOwner, d_sae: int, device: torch.device):
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
        firing_rates: Sequence[FiringRate] = (),
    ) -> torch.Tensor:
        """Update from one training batch; returns the per-token fire rates at the
        thresholds before it.

        ``selected`` and ``smallest``: the batch rule's positive selections per
        feature and the smallest selected value (``inf`` if none) over ``n_tokens``
        (already in the owner's ``n_tokens_seen``); global under ``data_parallel``,
        where ``hidden_pre`` holds this rank's rows. Each of ``firing_rates`` moves
        along with the state's own EMAs.
        """
        cfg = self.owner.cfg
        threshold = self.running_threshold
        if n_tokens == 0:
            return threshold.new_zeros(threshold.shape)
        fired_excess = fired_and_excess_rows(hidden_pre, threshold)
        if data_parallel is not None:  # sums over the ranks' rows
            fired_excess = data_parallel.sum_floats(fired_excess)
        fired, excess = fired_excess.to(threshold.dtype).unbind()
        selected = selected.to(threshold.dtype)
        own_counts = [
            r.counts.to(threshold.dtype) for r in firing_rates if r.counts is not None
        ]
        selection, fire_rates, *own_rates = torch._foreach_div(
            [selected, fired, *own_counts], n_tokens
        )
        lr, gain = cfg.topk_threshold_lr, cfg.threshold_gain
        # A batch in which the rule selects nothing (all pre-activations <= 0)
        # says nothing about rates or thresholds: 1 if it selects, else 0 (the
        # counts are whole numbers).
        informative = selected.sum().clamp_max(1.0)
        # The plain running mean at first, so early estimates carry no zero bias.
        warm_up = n_tokens / self.owner.n_tokens_seen.clamp_min(n_tokens)
        weight = warm_up.clamp_min(lr) * informative
        fast_weight = warm_up.clamp_min(gain) * informative
        token_rate = self.token_rate.clone()  # the step's scale must not see this batch
        # The per-token rate follows the thresholds, at their pace.
        rates = [self.selection_rate, self.token_rate]
        targets, weights = [selection, fire_rates], [weight, fast_weight]
        horizon_weights: dict[float, torch.Tensor] = {}
        for firing_rate in firing_rates:
            rates.append(firing_rate.rate)
            targets.append(
                selection if firing_rate.counts is None else own_rates.pop(0)
            )
            horizon = firing_rate.horizon_tokens
            if horizon not in horizon_weights:
                horizon_weights[horizon] = firing_rate.weight(warm_up, n_tokens)
            weights.append(horizon_weights[horizon])
        move_toward_(rates, targets, weights)

        rule = THRESHOLD_RULES[cfg.threshold_mode]
        step = ThresholdStep(
            threshold=threshold,
            smallest=smallest,
            fired=fired,
            excess=excess,
            n_tokens=n_tokens,
            lr=lr,
            gain=gain * informative,
            weight=weight,
            selection_rate=self.selection_rate,
            token_rate=token_rate,
            tail_scale=self.tail_scale,
        )
        threshold.copy_(rule(step))
        return fire_rates

    @torch.no_grad()
    def set(self, thresholds: torch.Tensor) -> None:
        self.running_threshold.copy_(thresholds.to(self.running_threshold))

    @torch.no_grad()
    def rescale(self, factor: float) -> None:
        """Multiply thresholds and tail scales by ``factor`` (a fold changed units)."""
        self.running_threshold.mul_(factor)
        self.tail_scale.mul_(factor)

    def metrics(self, fire_rates: torch.Tensor) -> dict[str, Any]:
        """Training-log callables (evaluated on logging steps only, so no sync else);
        ``l0_per_token`` of the batch whose ``fire_rates`` :meth:`update` returned."""
        threshold = self.running_threshold
        return {
            "threshold_mean": lambda: threshold[threshold.isfinite()].mean(),
            "l0_per_token": lambda: fire_rates.sum(),
        }

    def record_metadata(self, metadata: SAEMetadata) -> None:
        """Write ``l0_per_token`` (EMA over about ``1 / threshold_gain`` steps) and
        ``l0_batch_rule`` (over ``1 / topk_threshold_lr``) into SAELens ``metadata``.
        One host sync; nothing before the first step."""
        if bool(self.selection_rate.any()):
            metadata.l0_per_token = float(self.token_rate.sum())
            metadata.l0_batch_rule = float(self.selection_rate.sum())
