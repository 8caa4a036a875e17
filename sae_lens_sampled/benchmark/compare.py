"""``sae-lens-sampled compare``: train architectures side by side at equal k.

Every run goes through SAELens's own machinery: ``SyntheticSAERunner`` (synthetic
default) or ``LanguageModelSAETrainingRunner`` (``--model``/``--hook``), each driving
``SAETrainer``. Metrics come from SAELens's evaluators (``eval_sae_on_synthetic_data``,
``run_evals``), computed twice for the batch-level architectures:

- per token (columns ``l0``, ``explained_variance``, ...): the exported inference SAE,
  i.e. what a user loads after training (JumpReLU thresholds for batch-level rules);
- under the batch rule (``*_batch``): the training SAE's batch selection over eval
  batches of the training batch size, i.e. what training optimised;
- per token with calibrated thresholds (``*_calibrated``, plugin architectures):
  ``calibrate_thresholds`` re-fitted on held-out samples so each feature fires per token
  as often as under the batch rule.

The gap between the two is the threshold drift of the batch-level rules.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from sae_lens import LoggingConfig
from sae_lens.synthetic import SyntheticModel, SyntheticModelConfig
from sae_lens.synthetic.evals import (
    SyntheticDataEvalResult,
    eval_sae_on_synthetic_data,
)
from sae_lens.synthetic.firing_magnitudes import LinearMagnitudeConfig
from sae_lens.synthetic.firing_probabilities import ZipfianFiringProbabilityConfig
from sae_lens.synthetic.hierarchy import HierarchyConfig
from sae_lens.synthetic.synthetic_sae_runner import (
    SyntheticSAERunner,
    SyntheticSAERunnerConfig,
)

from sae_lens_sampled.benchmark.report import format_table, write_json, write_plots
from sae_lens_sampled.benchmark.runs import (
    base_result,
    batch_rule_view,
    finite,
    run_dir_name,
    to_inference_sae,
)
from sae_lens_sampled.benchmark.specs import (
    DEFAULT_RUNS,
    RunSpec,
    build_sae_config,
    parse_run_specs,
    resolve_runs,
)
from sae_lens_sampled.saes.base import check_range
from sae_lens_sampled.thresholds import calibrate_thresholds

# Held-out samples on which calibrate_thresholds re-fits the per-token thresholds,
# and batch-rule draws per batch (Sampled-SAE pools) it averages.
CALIBRATION_SAMPLES = 8192
CALIBRATION_POOL_DRAWS = 8

# --quick: the default set in a few minutes on two CPU cores.
QUICK_SETTINGS: dict[str, Any] = {"steps": 300, "eval_samples": 16_384}


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


@dataclass
class CompareConfig:
    """Settings of a comparison.

    Args:
        runs (list[RunSpec]): Architectures and their settings (default: topk,
            batchtopk, sampled x3, feature_choice, mutual_choice).
        k (float): Mean active features per token, shared by every run (whole number
            when ``topk`` is in the set).
        d_sae (int): Number of SAE features.
        steps (int): Training steps per run.
        batch_size (int): Training batch size in tokens (samples); batch-rule evals
            use it too, so their budget matches training.
        lr (float): Adam learning rate (the last fifth of training decays it 10x).
        seed (int): Seed of the synthetic model, of the eval samples (shared by all
            runs) and of torch's global RNG at the start of each run
            (initialisation, training data stream, Sampled-SAE pool draws).
        eval_samples (int): Tokens (samples) per evaluation.
        output (str | None): Directory for results.json, plots and the trained
            inference SAEs (``saes/``); None writes nothing.
        plots (bool): Write PNG plots (needs matplotlib, the ``plot`` extra).
        device (str): Torch device.
        threads (int | None): CPU threads for torch during the comparison; None
            uses 1 in synthetic mode (the default model is too small to gain from
            more, and spare threads spin when the cores are shared) and torch's
            setting in language-model mode.
        dead_feature_window (int): SAELens trainer setting, in steps: a feature not
            selected for this many steps is dead for the aux-k loss.
        model (str | None): Language-model mode: a SAELens/TransformerLens model
            name (e.g. ``pythia-160m``); None uses the synthetic default.
        hook (str | None): Hook name for language-model mode
            (e.g. ``blocks.6.hook_resid_post``).
        model_class_name (str): SAELens ``model_class_name``.
        dataset (str): Hugging Face dataset for language-model mode.
        context_size (int | None): Tokens per prompt (None: min(128, model n_ctx)).
        lm_settings (dict[str, Any]): Further ``LanguageModelSAERunnerConfig`` fields.
    """

    runs: list[RunSpec] = field(
        default_factory=lambda: [
            RunSpec(s.architecture, dict(s.params)) for s in DEFAULT_RUNS
        ]
    )
    k: float = 6
    d_sae: int = 256
    steps: int = 1500
    batch_size: int = 1024
    lr: float = 3e-3
    seed: int = 0
    eval_samples: int = 65_536
    output: str | None = "compare-results"
    plots: bool = True
    device: str = "cpu"
    threads: int | None = None
    dead_feature_window: int = 100
    model: str | None = None
    hook: str | None = None
    model_class_name: str = "HookedTransformer"
    dataset: str = "monology/pile-uncopyrighted"
    context_size: int | None = None
    lm_settings: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_range("k", self.k, low=0, high=self.d_sae, low_inclusive=False)
        check_range("d_sae", self.d_sae, low=1)
        check_range("steps", self.steps, low=1)
        check_range("batch_size", self.batch_size, low=1)
        check_range("lr", self.lr, low=0, low_inclusive=False)
        check_range("seed", self.seed, low=0)
        check_range("eval_samples", self.eval_samples, low=1)
        check_range("dead_feature_window", self.dead_feature_window, low=1)
        if self.threads is not None:
            check_range("threads", self.threads, low=1)
        if self.context_size is not None:
            check_range("context_size", self.context_size, low=1)
        if self.model is not None and self.hook is None:
            raise ValueError(f"hook must be set with model={self.model!r}, got None")

    def to_dict(self) -> dict[str, Any]:
        settings = dataclasses.asdict(self)
        settings["runs"] = [spec.label for spec in self.runs]
        return settings


def run_compare(
    config: CompareConfig | None = None,
    *,
    override_model: Any | None = None,
    override_dataset: Any | None = None,
    override_synthetic_model: SyntheticModel | None = None,
    **settings: Any,
) -> dict[str, Any]:
    """Train and evaluate every run; print a table; write results.json and plots.

    Args:
        config: Settings; keyword ``settings`` (CompareConfig fields) override it.
        override_model: A HookedRootModule for language-model mode (needs ``hook``),
            e.g. a small random HookedTransformer for offline use.
        override_dataset: A ``datasets.Dataset`` for language-model mode.
        override_synthetic_model: Use this SAELens SyntheticModel instead of the
            embedded default.

    Returns:
        The results.json payload: ``mode``, ``config``, ``skipped`` and ``results``
        (one dict per run).
    """
    cfg = (
        dataclasses.replace(config, **settings) if config else CompareConfig(**settings)
    )
    lm_mode = cfg.model is not None or override_model is not None
    if lm_mode and cfg.hook is None:
        raise ValueError("hook must be set in language-model mode, got None")
    runs, skipped = resolve_runs(cfg.runs)
    for note in skipped:
        print(f"note: {note}")
    output = Path(cfg.output) if cfg.output is not None else None

    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads or (threads if lm_mode else 1))
    try:
        if lm_mode:
            from sae_lens_sampled.benchmark.language_model import compare_lm

            results = compare_lm(cfg, runs, output, override_model, override_dataset)
        else:
            results = _compare_synthetic(cfg, runs, output, override_synthetic_model)
    finally:
        torch.set_num_threads(threads)

    payload: dict[str, Any] = {
        "mode": "language_model" if lm_mode else "synthetic",
        "config": cfg.to_dict(),
        "skipped": skipped,
        "results": results,
    }
    print()
    print(format_table(results))
    if output is not None:
        print(f"\nresults: {write_json(payload, output)}")
        if cfg.plots:
            try:
                for path in write_plots(results, output):
                    print(f"plot: {path}")
            except ImportError:
                print(
                    "note: matplotlib is not installed, so no plots were written; "
                    "pip install 'sae-lens-sampled[plot]'"
                )
    return payload


# ---------------------------------------------------------------------------
# Synthetic mode


def _compare_synthetic(
    cfg: CompareConfig,
    runs: list[RunSpec],
    output: Path | None,
    synthetic_model: SyntheticModel | None,
) -> list[dict[str, Any]]:
    if synthetic_model is None:
        synthetic_model = SyntheticModel(
            default_synthetic_model_config(cfg.seed), device=cfg.device
        )
    eval_batches = _draw_eval_batches(cfg, synthetic_model)
    results = []
    for index, spec in enumerate(runs, start=1):
        print(f"[{index}/{len(runs)}] {spec.label}", flush=True)
        run_dir = output / "saes" / run_dir_name(index, spec) if output else None
        results.append(
            _synthetic_run(cfg, spec, synthetic_model, eval_batches, run_dir)
        )
    return results


class ReplayedActivations:
    """Serves pre-drawn ground-truth feature activations, batch after batch.

    Every eval pass of every run reads the same samples, whatever the SAEs draw
    from torch's global RNG in between (e.g. Sampled-SAE pools).
    """

    def __init__(self, batches: list[torch.Tensor]):
        self._batches = iter(batches)

    def sample(self, batch_size: int) -> torch.Tensor:
        batch = next(self._batches)
        if batch.shape[0] != batch_size:
            raise ValueError(
                f"replayed batch has {batch.shape[0]} rows, not {batch_size}"
            )
        return batch


def _draw_eval_batches(
    cfg: CompareConfig, synthetic_model: SyntheticModel
) -> list[torch.Tensor]:
    # The same batch sizes as eval_sae_on_synthetic_data's loop.
    torch.manual_seed(cfg.seed + 1)
    sizes = [cfg.batch_size] * (cfg.eval_samples // cfg.batch_size)
    if cfg.eval_samples % cfg.batch_size:
        sizes.append(cfg.eval_samples % cfg.batch_size)
    generator = synthetic_model.activation_generator
    return [generator.sample(size) for size in sizes]


def _synthetic_run(
    cfg: CompareConfig,
    spec: RunSpec,
    synthetic_model: SyntheticModel,
    eval_batches: list[torch.Tensor],
    run_dir: Path | None,
) -> dict[str, Any]:
    sae_cfg = build_sae_config(
        spec,
        d_in=synthetic_model.cfg.hidden_dim,
        d_sae=cfg.d_sae,
        k=cfg.k,
    )
    runner_cfg = SyntheticSAERunnerConfig(
        synthetic_model=synthetic_model.cfg,
        sae=sae_cfg,
        training_samples=cfg.steps * cfg.batch_size,
        batch_size=cfg.batch_size,
        lr=cfg.lr,
        lr_decay_steps=cfg.steps // 5,
        device=cfg.device,
        checkpoint_path=None,
        output_path=None,
        run_final_eval=False,
        dead_feature_window=cfg.dead_feature_window,
        feature_sampling_window=2 * cfg.dead_feature_window,
        logger=LoggingConfig(log_to_wandb=False),
    )
    # Same initialisation seed and data stream for every run.
    torch.manual_seed(cfg.seed)
    runner = SyntheticSAERunner(runner_cfg, override_synthetic_model=synthetic_model)
    start = time.perf_counter()
    sae = runner.run().sae
    seconds = time.perf_counter() - start

    result = base_result(spec, sae, runner_cfg.training_samples, seconds)
    inference = to_inference_sae(sae)
    per_token = _synthetic_eval(cfg, inference, synthetic_model, eval_batches)
    result.update(_synthetic_fields(per_token, ""))
    calibrated = None
    if hasattr(inference, "set_thresholds"):
        # Per-token thresholds re-fitted so each feature fires as often as under the
        # batch rule, on samples that are neither training nor eval data.
        calibrated = copy.deepcopy(inference)
        with warnings.catch_warnings():  # rare features: expected on 8,192 samples
            warnings.simplefilter("ignore")
            calibrate_thresholds(
                calibrated,
                _calibration_batches(cfg, synthetic_model),
                batch_size=cfg.batch_size,
                pool_draws=CALIBRATION_POOL_DRAWS,
            )
        calibrated = _synthetic_eval(cfg, calibrated, synthetic_model, eval_batches)
    result.update(_synthetic_fields(calibrated, "_calibrated"))
    view = batch_rule_view(sae)
    batch = None
    if view is not None:
        batch = _synthetic_eval(cfg, view, synthetic_model, eval_batches)
    result.update(_synthetic_fields(batch, "_batch"))
    if run_dir is not None:
        inference.save_model(run_dir)
    return result


def _calibration_batches(
    cfg: CompareConfig, synthetic_model: SyntheticModel
) -> list[torch.Tensor]:
    torch.manual_seed(cfg.seed + 2)
    generator = synthetic_model.activation_generator
    n_batches = max(1, CALIBRATION_SAMPLES // cfg.batch_size)
    return [
        synthetic_model.feature_dict(generator.sample(cfg.batch_size))
        for _ in range(n_batches)
    ]


def _synthetic_eval(
    cfg: CompareConfig,
    sae: Any,
    synthetic_model: SyntheticModel,
    eval_batches: list[torch.Tensor],
) -> SyntheticDataEvalResult:
    return eval_sae_on_synthetic_data(
        sae,
        synthetic_model.feature_dict,
        ReplayedActivations(eval_batches),  # type: ignore[arg-type]
        num_samples=cfg.eval_samples,
        batch_size=cfg.batch_size,
    )


def _synthetic_fields(
    ev: SyntheticDataEvalResult | None, suffix: str
) -> dict[str, Any]:
    names = ("l0", "explained_variance", "dead_features", "f1", "shrinkage")
    if ev is None:
        return {name + suffix: None for name in names}
    fields: dict[str, Any] = {
        "l0" + suffix: ev.sae_l0,
        "explained_variance" + suffix: finite(ev.explained_variance),
        "dead_features" + suffix: ev.dead_latents,
        "f1" + suffix: ev.classification.f1_score,
        "shrinkage" + suffix: finite(ev.shrinkage),
    }
    if not suffix:
        # Decoder-only metrics, the same under both encode rules.
        fields.update(
            mcc=ev.mcc,
            uniqueness=ev.uniqueness,
            precision=ev.classification.precision,
            recall=ev.classification.recall,
            true_l0=ev.true_l0,
            ce_loss_score=None,
        )
    return fields


# ---------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sae-lens-sampled compare",
        description=(
            "Train SAE architectures side by side at equal k through SAELens's "
            "trainer and compare them (explained variance, L0 per token and under "
            "the batch rule, dead features, ground-truth MCC, tokens/s). Default "
            "data: an embedded SAELens synthetic model (offline, CPU)."
        ),
    )
    defaults = CompareConfig()
    add = parser.add_argument
    add(
        "--architectures",
        default="default",
        help="comma list of runs, e.g. 'topk,sampled:pool_factor=4,score=entropy'; "
        "'default' is: " + ",".join(s.label for s in DEFAULT_RUNS),
    )
    add("--k", type=float, help=f"mean active features per token ({defaults.k})")
    add("--steps", type=int, help=f"training steps per run ({defaults.steps})")
    add("--d-sae", type=int, help=f"SAE width ({defaults.d_sae})")
    add("--seed", type=int, help=f"seed ({defaults.seed})")
    add("--batch-size", type=int, help=f"tokens per batch ({defaults.batch_size})")
    add("--lr", type=float, help=f"learning rate ({defaults.lr})")
    add("--eval-samples", type=int, help=f"eval tokens ({defaults.eval_samples})")
    add("--device", help=f"torch device ({defaults.device})")
    add("--threads", type=int, help="CPU threads (synthetic default: 1)")
    add("--output", help=f"output directory ({defaults.output})")
    add("--no-plots", action="store_true", help="write no PNG plots")
    add(
        "--quick",
        action="store_true",
        help="short runs: " + ", ".join(f"{k}={v}" for k, v in QUICK_SETTINGS.items()),
    )
    lm = parser.add_argument_group("language-model mode (needs the Hugging Face hub)")
    lm.add_argument("--model", help="model name, e.g. pythia-160m")
    lm.add_argument("--hook", help="hook name, e.g. blocks.6.hook_resid_post")
    lm.add_argument("--model-class-name", help="SAELens model_class_name")
    lm.add_argument("--dataset", help=f"dataset path ({defaults.dataset})")
    lm.add_argument("--context-size", type=int, help="tokens per prompt")
    lm.add_argument(
        "--lm",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="any LanguageModelSAERunnerConfig field (repeatable)",
    )
    return parser


def settings_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """CompareConfig fields from parsed arguments (only those given)."""
    from sae_lens_sampled.benchmark.specs import parse_value

    settings: dict[str, Any] = {"runs": parse_run_specs(args.architectures)}
    for name in (
        "k",
        "steps",
        "d_sae",
        "seed",
        "batch_size",
        "lr",
        "eval_samples",
        "device",
        "threads",
        "output",
        "model",
        "hook",
        "model_class_name",
        "dataset",
        "context_size",
    ):
        value = getattr(args, name)
        if value is not None:
            settings[name] = value
    if args.no_plots:
        settings["plots"] = False
    if args.quick:
        for name, value in QUICK_SETTINGS.items():
            settings.setdefault(name, value)
    lm_settings = {}
    for item in args.lm:
        name, eq, value = item.partition("=")
        if not eq:
            raise ValueError(f"--lm must be FIELD=VALUE, got {item!r}")
        lm_settings[name.strip()] = parse_value(value)
    if lm_settings:
        settings["lm_settings"] = lm_settings
    return settings


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = settings_from_args(args)
        start = time.perf_counter()
        run_compare(**settings)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"total: {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
