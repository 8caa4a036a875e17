"""Why Sampled-SAE trails BatchTopK: the measurements behind ``docs/sampled.md``.

Two tools, both offline on CPU:

- ``ceiling``: the **pool ceiling** on synthetic data. The ground-truth features
  themselves, with their true activations, are put through each selection rule
  (BatchTopK, or a pool of ``round(k * l)`` features scored on the true
  contributions, then batch top-k inside it) and the explained variance of what is
  kept is measured. No SAE is trained: it is the best a dictionary of the true
  features can do under the rule, and it shows how much of the batch's signal a pool
  of that size can carry at all.
- ``trace``: ``compare`` with a per-step trace of SAELens's trainer: the MSE and
  auxiliary losses, the trainer's dead mask, the gradient norm before SAELens's
  clipping at 1.0, and for Sampled-SAE the pool (churn between steps, the share of
  features pooled, the features the trainer calls dead although they were merely
  left out of the pool). Each run's result gains a ``trace`` summary.

::

    python -m experiments.pool_study ceiling --data default --seeds 3
    python -m experiments.pool_study trace --quick --seeds 3 \\
        --architectures "batchtopk,sampled:pool_factor=4" --output pool-trace
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from sae_lens.synthetic import SyntheticModel
from sae_lens.training.sae_trainer import SAETrainer

from sae_lens_sampled.benchmark.compare import build_parser, run_compare
from sae_lens_sampled.benchmark.compare import settings_from_args as compare_settings
from sae_lens_sampled.benchmark.synthetic import SYNTHETIC_DATA
from sae_lens_sampled.selection import (
    batch_budget,
    batch_topk,
    sampled_topk,
    seeded_generator,
)

# --- the pool ceiling -----------------------------------------------------------------


@dataclass(frozen=True)
class PoolRule:
    """A selection rule for :func:`pool_ceiling`: ``pool_factor=None`` is BatchTopK."""

    pool_factor: float | None = None
    score: str = "l2"
    pool_mode: str = "sample"
    beta: float = 1.0

    @property
    def label(self) -> str:
        if self.pool_factor is None:
            return "batchtopk"
        label = f"l={self.pool_factor:g} {self.score} {self.pool_mode}"
        if self.pool_mode == "sample" and self.beta != 1.0:
            label += f" beta={self.beta:g}"
        return label


@torch.no_grad()
def ceiling_explained_variance(
    feature_acts: Sequence[torch.Tensor],
    feature_vectors: torch.Tensor,
    bias: torch.Tensor,
    k: float,
    rule: PoolRule,
    generator: torch.Generator | None = None,
) -> float:
    """Explained variance of the true features kept by ``rule``, over all batches.

    ``feature_acts`` are batches ``[B, n_features]`` of true activations; token t's
    input is ``acts[t] @ feature_vectors + bias``. The rule ranks each feature's true
    contribution ``acts * ||feature_vectors_j||``; the reconstruction keeps the true
    activations it selects (and the bias). Explained variance is
    ``1 - sum ||x - x_hat||^2 / sum ||x - mean(x)||^2``.
    """
    norms = feature_vectors.norm(dim=1)
    inputs = [acts @ feature_vectors + bias for acts in feature_acts]
    stacked = torch.cat(inputs)
    total = (stacked - stacked.mean(dim=0)).pow(2).sum()
    error = stacked.new_zeros(())
    for acts, x in zip(feature_acts, inputs, strict=True):
        contributions = acts * norms
        if rule.pool_factor is None:
            kept = batch_topk(contributions, batch_budget(k, acts.shape[0]))
        else:
            kept = sampled_topk(
                contributions,
                k,
                rule.pool_factor,
                rule.score,
                rule.pool_mode,
                generator,
                beta=rule.beta,
            )
        codes = torch.where(kept != 0, acts, torch.zeros_like(acts))
        error += (x - (codes @ feature_vectors + bias)).pow(2).sum()
    return float(1 - error / total)


def pool_ceiling(
    model: SyntheticModel,
    rules: Sequence[PoolRule],
    k: float,
    batch_size: int = 1024,
    n_batches: int = 8,
    seed: int = 0,
) -> dict[str, float]:
    """:func:`ceiling_explained_variance` of every rule on ``n_batches`` fresh
    batches of ``model`` (drawn after ``torch.manual_seed(seed)``)."""
    torch.manual_seed(seed)
    generator = model.activation_generator
    batches = [generator.sample(batch_size) for _ in range(n_batches)]
    vectors = model.feature_dict.feature_vectors.detach()
    bias = model.feature_dict.bias.detach()
    return {
        rule.label: ceiling_explained_variance(
            batches, vectors, bias, k, rule, seeded_generator(seed, 0, vectors.device)
        )
        for rule in rules
    }


def default_ceiling_rules(pool_factors: Sequence[float]) -> list[PoolRule]:
    rules = [PoolRule()]
    for score in ("l2", "entropy"):
        for mode, beta in (("sample", 1.0), ("sample", 2.0), ("top", 1.0)):
            if score == "entropy" and beta != 1.0:
                continue
            rules += [PoolRule(float(f), score, mode, beta) for f in pool_factors]
    return rules


# --- the pool ceiling of a trained BatchTopK dictionary ----------------------------


class RuleEncoder:
    """``encode`` of a plugin inference SAE under another selection rule: the SAE's
    ranking values put through ``rule``; counts the features active per call."""

    def __init__(self, sae: Any, rule: PoolRule, generator: torch.Generator):
        self.sae, self.rule, self.generator = sae, rule, generator
        self.features_per_call: list[int] = []

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        sae, rule = self.sae, self.rule
        hidden_pre = sae.hidden_pre(x)
        acts = hidden_pre.relu().reshape(-1, hidden_pre.shape[-1])
        ranking = acts * sae.rank_scale.to(acts.dtype)
        if rule.pool_factor is None:
            kept = batch_topk(ranking, batch_budget(sae.cfg.k, acts.shape[0]))
        else:
            kept = sampled_topk(
                ranking,
                sae.cfg.k,
                rule.pool_factor,
                rule.score,
                rule.pool_mode,
                self.generator,
                beta=rule.beta,
            )
        self.features_per_call.append(int((kept != 0).any(dim=0).sum()))
        codes = torch.where(kept != 0, acts, torch.zeros_like(acts))
        return codes.reshape(hidden_pre.shape)


def dictionary_ceiling(
    cfg: Any, rules: Sequence[PoolRule], seed: int
) -> dict[str, dict[str, Any]]:
    """Train ``mutual_choice`` (BatchTopK's rule) on ``cfg``'s data with ``seed``,
    then evaluate its dictionary under each rule without retraining: explained
    variance, dead features on the held-out data, and the mean number of distinct
    features active per eval batch."""
    from sae_lens_sampled.benchmark.compare import make_source
    from sae_lens_sampled.benchmark.runs import BatchRuleView, to_inference_sae
    from sae_lens_sampled.benchmark.specs import RunSpec, build_sae_config

    source = make_source(cfg)
    source.start_seed(seed)
    sae_cfg = build_sae_config(
        RunSpec("mutual_choice"),
        d_in=source.d_in,
        d_sae=cfg.d_sae,
        k=cfg.k,
        normalize_activations=cfg.normalize_activations,
    )
    torch.manual_seed(seed)
    inference = to_inference_sae(source.train(sae_cfg, seed))
    out = {}
    for rule in rules:
        encoder = RuleEncoder(
            inference, rule, seeded_generator(seed, 0, torch.device("cpu"))
        )
        metrics = source.evaluate(BatchRuleView(inference, encoder))
        out[rule.label] = {
            "explained_variance": metrics["explained_variance"],
            "dead_features": metrics["dead_features"],
            "features_per_batch": statistics.fmean(encoder.features_per_call),
        }
    return out


# --- the training trace ---------------------------------------------------------------


@dataclass
class RunTrace:
    """Per-step records of one training run (see :func:`tracing`)."""

    mse: list[float] = field(default_factory=list)
    aux: list[float] = field(default_factory=list)
    dead: list[int] = field(default_factory=list)
    grad_norm: list[float] = field(default_factory=list)
    churn: list[float] = field(default_factory=list)
    dead_but_unpooled: list[int] = field(default_factory=list)
    fired_steps: torch.Tensor | None = None
    pooled_steps: torch.Tensor | None = None
    # steps each feature has missed in the pool since it last fired, and last pool
    missed: torch.Tensor | None = None
    last_pool: torch.Tensor | None = None
    n_steps: int = 0

    def summary(self) -> dict[str, Any]:
        """Means over the first and the last fifth of training, and per-feature
        counts of the steps on which a feature fired (was trained) or was pooled."""
        fifth = max(1, self.n_steps // 5)

        def mean(values: Sequence[float], part: slice) -> float | None:
            values = values[part]
            return statistics.fmean(values) if values else None

        early, late = slice(0, fifth), slice(-fifth, None)
        ratio = [a / m for a, m in zip(self.aux, self.mse, strict=True) if m > 0]
        out: dict[str, Any] = {
            "steps": self.n_steps,
            "aux_over_mse_early": mean(ratio, early),
            "aux_over_mse_late": mean(ratio, late),
            "trainer_dead_early": mean(self.dead, early),
            "trainer_dead_late": mean(self.dead, late),
            "clipped_share": statistics.fmean(g > 1.0 for g in self.grad_norm)
            if self.grad_norm
            else None,
            "grad_norm_median": statistics.median(self.grad_norm)
            if self.grad_norm
            else None,
        }
        if self.fired_steps is not None and self.n_steps:
            share = (self.fired_steps.double() / self.n_steps).sort().values
            out["fired_step_share_median"] = float(share.median())
            out["features_fired_under_5pct_of_steps"] = int((share < 0.05).sum())
        if self.churn:
            out["pool_churn"] = statistics.fmean(self.churn)
            out["dead_but_unpooled_late"] = mean(self.dead_but_unpooled, late)
        if self.pooled_steps is not None and self.n_steps:
            pooled = self.pooled_steps.double() / self.n_steps
            out["features_never_pooled"] = int((pooled == 0).sum())
            out["pooled_step_share_median"] = float(pooled.median())
        return out


@contextmanager
def tracing(dead_window: int = 100) -> Iterator[list[RunTrace]]:
    """Record every SAELens training step taken inside the block.

    Yields a list that gains one :class:`RunTrace` per trainer. For SAEs with a
    ``pool_staleness`` buffer (Sampled-SAE), this step's pool is the features at
    staleness 0; ``dead_but_unpooled`` counts the trainer's dead features that have
    missed at most ``dead_window`` steps *in the pool* since they last fired.
    """
    traces: list[RunTrace] = []
    original_step = SAETrainer._train_step
    original_clip = torch.nn.utils.clip_grad_norm_
    current: list[RunTrace] = []

    def clip(parameters: Any, max_norm: float, *args: Any, **kwargs: Any) -> Any:
        norm = original_clip(parameters, max_norm, *args, **kwargs)
        if current:
            current[-1].grad_norm.append(float(norm))
        return norm

    def step(trainer: Any, sae: Any, sae_in: torch.Tensor) -> Any:
        # kept on the trainer itself: ids of collected trainers are reused
        trace = getattr(trainer, "_pool_study_trace", None)
        if trace is None:
            trace = trainer._pool_study_trace = RunTrace()
            traces.append(trace)
            d_sae = sae.W_dec.shape[0]
            trace.fired_steps = torch.zeros(d_sae, dtype=torch.long)
            if hasattr(sae, "pool_staleness"):
                trace.pooled_steps = torch.zeros(d_sae, dtype=torch.long)
                trace.missed = torch.zeros(d_sae, dtype=torch.long)
                trace.last_pool = None
        dead = trainer.dead_neurons.cpu()
        current.append(trace)
        try:
            output = original_step(trainer, sae, sae_in)
        finally:
            current.pop()
        losses = output.losses
        for name, values in (
            ("mse_loss", trace.mse),
            ("auxiliary_reconstruction_loss", trace.aux),
        ):
            value = losses.get(name)
            values.append(0.0 if value is None else float(value.detach()))
        trace.dead.append(int(dead.sum()))
        fired = (trainer.n_forward_passes_since_fired == 0).cpu()
        assert trace.fired_steps is not None
        trace.fired_steps += fired
        if trace.pooled_steps is not None:
            pooled = (sae.pool_staleness == 0).cpu()
            trace.pooled_steps += pooled
            last = trace.last_pool
            if last is not None and pooled.sum() > 0:
                same = (pooled & last).sum()
                trace.churn.append(1.0 - float(same) / float(pooled.sum()))
            trace.last_pool = pooled
            missed = trace.missed
            assert missed is not None
            # the trainer's mask of this step against the pooled misses before it
            trace.dead_but_unpooled.append(int((dead & (missed <= dead_window)).sum()))
            missed = torch.where(fired, 0, torch.where(pooled, missed + 1, missed))
            trace.missed = missed
        trace.n_steps += 1
        return output

    SAETrainer._train_step = step  # type: ignore[method-assign,assignment]
    torch.nn.utils.clip_grad_norm_ = clip
    try:
        yield traces
    finally:
        SAETrainer._train_step = original_step  # type: ignore[method-assign]
        torch.nn.utils.clip_grad_norm_ = original_clip


def traced_compare(**settings: Any) -> dict[str, Any]:
    """:func:`run_compare` with a :func:`tracing` block; each result gains
    ``trace`` (its run's :meth:`RunTrace.summary`)."""
    window = settings.get("dead_feature_window", 100)
    output = settings.get("output")
    with tracing(window) as traces:
        payload = run_compare(**settings)
    for result, trace in zip(payload["results"], traces, strict=True):
        result["trace"] = trace.summary()
    if output is not None:
        path = Path(output) / "results.json"
        path.write_text(json.dumps(payload, indent=2) + "\n")
    print()
    print(format_traces(payload["results"]))
    return payload


TRACE_COLUMNS: tuple[tuple[str, str], ...] = (
    ("aux/mse early", "aux_over_mse_early"),
    ("aux/mse late", "aux_over_mse_late"),
    ("dead(trainer) late", "trainer_dead_late"),
    ("of which unpooled", "dead_but_unpooled_late"),
    ("clipped", "clipped_share"),
    ("churn", "pool_churn"),
    ("never pooled", "features_never_pooled"),
    ("fired <5% steps", "features_fired_under_5pct_of_steps"),
)


def format_traces(results: Sequence[dict[str, Any]]) -> str:
    """Mean ± std over seeds of the trace summaries, one row per run label."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for result in results:
        groups.setdefault(result["label"], []).append(result["trace"])
    header = ["run", *(name for name, _ in TRACE_COLUMNS)]
    rows = []
    for label, summaries in groups.items():
        row = [label]
        for _, key in TRACE_COLUMNS:
            values = [s[key] for s in summaries if s.get(key) is not None]
            if not values:
                row.append("-")
            elif len(values) == 1:
                row.append(f"{values[0]:.3g}")
            else:
                row.append(
                    f"{statistics.fmean(values):.3g} ± {statistics.stdev(values):.2g}"
                )
        rows.append(row)
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(header, widths, strict=True))]
    lines += [
        "  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in rows
    ]
    return "\n".join(lines)


# --- command line ---------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["trace"]:
        # compare's own options
        traced_compare(**compare_settings(build_parser().parse_args(argv[1:])))
        return 0
    if argv[:1] == ["dictionary"]:
        return dictionary_main(argv[1:])
    parser = argparse.ArgumentParser(
        prog="python -m experiments.pool_study",
        epilog="'trace' takes compare's options instead: "
        "python -m experiments.pool_study trace --quick ...",
    )
    parser.add_argument("command", choices=("ceiling",))
    parser.add_argument("--data", choices=tuple(SYNTHETIC_DATA), default="default")
    parser.add_argument("--k", type=float, default=6)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--pool-factors", default="1,2,4,8,16,32", help="comma list")
    parser.add_argument("--output", help="JSON file for the results")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    factors = [float(v) for v in args.pool_factors.split(",")]
    rules = default_ceiling_rules(factors)
    per_seed = []
    for seed in range(args.seeds):
        model = SyntheticModel(SYNTHETIC_DATA[args.data](seed))
        per_seed.append(pool_ceiling(model, rules, args.k, args.batch_size, seed=seed))
    print(f"pool ceiling on {args.data} data, k={args.k:g}, {args.seeds} seeds")
    table = {}
    for rule in rules:
        values = [result[rule.label] for result in per_seed]
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        table[rule.label] = {"mean": statistics.fmean(values), "std": spread}
        print(f"{rule.label:28s} {statistics.fmean(values):7.3f} ± {spread:.3f}")
    if args.output:
        Path(args.output).write_text(json.dumps(table, indent=2) + "\n")
    return 0


def dictionary_main(argv: Sequence[str]) -> int:
    """``dictionary``: compare's data options plus ``--pool-factors``."""
    from sae_lens_sampled.benchmark.compare import CompareConfig

    parser = build_parser()
    parser.add_argument("--pool-factors", default="1,2,4,8,16,32", help="comma list")
    args = parser.parse_args(argv)
    settings = compare_settings(args)
    settings.pop("runs")
    cfg = CompareConfig(**settings)
    torch.set_num_threads(cfg.threads or 1)
    factors = [float(v) for v in args.pool_factors.split(",")]
    rules = [PoolRule(), *(PoolRule(f, "l2", "sample") for f in factors)]
    rules += [PoolRule(f, "l2", "top") for f in factors]
    per_seed = [dictionary_ceiling(cfg, rules, seed) for seed in cfg.seed_list]
    print(
        f"mutual_choice (BatchTopK) dictionary under each rule, seeds {cfg.seed_list}"
    )
    table: dict[str, dict[str, float]] = {}
    for rule in rules:
        row = {}
        for name in ("explained_variance", "dead_features", "features_per_batch"):
            values = [float(result[rule.label][name]) for result in per_seed]
            row[name] = statistics.fmean(values)
            row[name + "_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        table[rule.label] = row
        print(
            f"{rule.label:24s} EV {row['explained_variance']:.3f} ± "
            f"{row['explained_variance_std']:.3f}  dead {row['dead_features']:.1f}  "
            f"features per batch {row['features_per_batch']:.1f}"
        )
    if cfg.output:
        Path(cfg.output).mkdir(parents=True, exist_ok=True)
        path = Path(cfg.output) / "dictionary_ceiling.json"
        path.write_text(json.dumps(table, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
