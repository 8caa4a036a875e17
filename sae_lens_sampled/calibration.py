"""Per-token thresholds re-fitted on held-out activations, and exported.

:func:`calibrate_thresholds` re-fits the targets the training rules of
:mod:`sae_lens_sampled.thresholds` aim at (each feature firing per token as often as
the batch rule selects it) on other activations; :func:`export_jumprelu` hands the
result to tools that never import this plugin.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias, cast

import torch
from typing_extensions import TypeIs

from sae_lens_sampled._registry import entry_of
from sae_lens_sampled.checks import check_range
from sae_lens_sampled.saes.base import BatchLevelSAE, BatchLevelTrainingSAE
from sae_lens_sampled.thresholds import _CPU_CHUNK_ENTRIES, fired_and_excess

if TYPE_CHECKING:
    from sae_lens import JumpReLUSAE

# What calibration reads and re-fits: a plugin SAE (inference or training), or a
# SAELens JumpReLU SAE (a plugin SAE's export, whose metadata names its batch rule).
ThresholdedSAE: TypeAlias = "JumpReLUSAE | BatchLevelTrainingSAE"
# What applies a batch rule (``encode_batch``).
BatchRuleSAE: TypeAlias = "BatchLevelSAE | BatchLevelTrainingSAE"


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
    return isinstance(sae, (BatchLevelSAE, BatchLevelTrainingSAE))


def _is_training(sae: object) -> TypeIs[BatchLevelTrainingSAE]:
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
    key = str(rule.get("architecture"))
    entry = entry_of(key)
    for name, (value, what) in (entry.lost_on_export if entry else {}).items():
        if rule.get(name) == value:
            raise ValueError(
                f"calibrate_thresholds: this SAE was exported from a {key} SAE with "
                f"{what} ({name}={value!r}), which the export does not keep; pass "
                f"batch_rule=<the {key} SAE>"
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

    A rule seeded by its config's ``pool_seed`` would otherwise replay one draw on
    every call; the caller's RNG state is restored afterwards.
    """
    cfg: Any = getattr(rule, "cfg", None)
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
        pool_draws: Batch-rule calls per batch, averaged (a random pool: fresh pools).
        seed: Seeds the pool draws; the caller's RNG state is left as it was.
        min_selections: A warning names features selected fewer times than this.
        accuracy: Relative bucket half-width of the histograms, in (0, 0.5).

    Returns:
        A :class:`CalibrationResult` (thresholds, dead features before and after).
    """
    check_range("batch_size", batch_size, low=1)
    check_range("pool_draws", pool_draws, low=1)
    check_range("min_selections", min_selections, low=0)
    check_range(
        "accuracy", accuracy, low=0, high=0.5, low_inclusive=False, high_inclusive=False
    )
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
    the learned state of an entry's ``lost_on_export`` settings); after
    ``fold_W_dec_norm`` on the inference SAE, ``batch_rule`` also lists the
    per-feature ``rank_scale``, so the rebuilt rule selects what the plugin's
    ``encode_batch`` selects. With ``path``, the SAE is also saved there (``cfg.json``
    with architecture ``"jumprelu"``), loadable by any SAELens install without this
    plugin.
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
