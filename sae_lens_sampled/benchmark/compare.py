"""``sae-lens-sampled compare``: train architectures side by side at equal k.

One data source (:mod:`~sae_lens_sampled.benchmark.source`) feeds one
training-and-evaluation loop (:mod:`~sae_lens_sampled.benchmark.loop`):

- synthetic (default): SAELens's ``SyntheticSAERunner`` on an embedded synthetic
  model, evaluated with ``eval_sae_on_synthetic_data`` (ground truth: MCC, F1, ...);
- language model (``--model``/``--hook``): ``LanguageModelSAETrainingRunner``,
  evaluated with ``run_evals``;
- activations (``--activations PATH``): a SAELens activation cache or a tensor file,
  trained with SAELens's ``SAETrainer``, evaluated on a held-out split.

Metrics are computed per token on the exported inference SAE (columns ``l0``,
``explained_variance``, ...) and under the training SAE's batch rule (``*_batch``);
with ``--calibrate``, in synthetic mode, also per token after re-fitting the
thresholds with ``calibrate_thresholds`` (``*_calibrated``). The
gap between per token and batch rule is the threshold drift of the batch-level
rules. ``--seeds N`` repeats every run over N seeds and reports mean ± std.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from sae_lens.synthetic import SyntheticModel

from sae_lens_sampled.benchmark.config import (
    NORMALIZE_OPTIONS,
    SYNTHETIC_DATA_NAMES,
    CompareConfig,
)
from sae_lens_sampled.benchmark.loop import compare_runs
from sae_lens_sampled.benchmark.report import (
    format_summary_table,
    format_table,
    write_json,
    write_plots,
)
from sae_lens_sampled.benchmark.source import DataSource
from sae_lens_sampled.benchmark.specs import DEFAULT_RUNS, parse_run_specs, resolve_runs
from sae_lens_sampled.benchmark.summary import summarize
from sae_lens_sampled.benchmark.synthetic import (
    ReplayedActivations,
    SyntheticSource,
    default_synthetic_model_config,
)

__all__ = [
    "CompareConfig",
    "ReplayedActivations",
    "default_synthetic_model_config",
    "run_compare",
]

# --quick: the default set in about a minute on two CPU cores.
QUICK_SETTINGS: dict[str, Any] = {"steps": 300, "eval_samples": 16_384}


def make_source(
    cfg: CompareConfig,
    *,
    override_model: Any | None = None,
    override_dataset: Any | None = None,
    override_synthetic_model: SyntheticModel | None = None,
) -> DataSource:
    """The data source ``cfg`` asks for; files are checked here, before training."""
    if cfg.activations is not None:
        if override_model is not None:
            raise ValueError(
                "activations mode takes no model: got override_model with "
                f"activations={cfg.activations!r}"
            )
        from sae_lens_sampled.benchmark.activations import ActivationsSource

        return ActivationsSource(cfg)
    if cfg.model is not None or override_model is not None:
        from sae_lens_sampled.benchmark.language_model import LanguageModelSource

        return LanguageModelSource(cfg, override_model, override_dataset)
    return SyntheticSource(cfg, override_synthetic_model)


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
        The results.json payload: ``mode``, ``config``, ``data`` (what the source
        was), ``skipped``, ``results`` (one dict per run and seed) and ``summary``
        (one dict per run: mean and std over seeds).
    """
    cfg = (
        dataclasses.replace(config, **settings) if config else CompareConfig(**settings)
    )
    runs, skipped = resolve_runs(cfg.runs)
    for note in skipped:
        print(f"note: {note}")
    output = Path(cfg.output) if cfg.output is not None else None

    lm_mode = cfg.model is not None or override_model is not None
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads or (threads if lm_mode else 1))
    try:
        source = make_source(
            cfg,
            override_model=override_model,
            override_dataset=override_dataset,
            override_synthetic_model=override_synthetic_model,
        )
        cfg = dataclasses.replace(cfg, eval_samples=source.eval_samples)
        data = source.describe()
        if source.mode == "activations":
            print(
                f"activations: {data['path']} {data['shape']} {data['dtype']}; "
                f"eval split {data['eval_rows']:,} rows, training "
                f"{data['train_rows']:,} rows ({data['epochs_per_run']:.2f} "
                "epochs per run)"
            )
        results = compare_runs(cfg, source, runs, output)
    finally:
        torch.set_num_threads(threads)

    summary = summarize(results)
    payload: dict[str, Any] = {
        "mode": source.mode,
        "config": cfg.to_dict(),
        "data": data,
        "skipped": skipped,
        "results": results,
        "summary": summary,
    }
    print()
    if cfg.seeds > 1:
        print(
            f"mean ± std over {cfg.seeds} seeds ({', '.join(map(str, cfg.seed_list))})"
        )
        print(format_summary_table(summary))
    else:
        print(format_table(results))
    if source.probing is not None:  # sparse probing: baselines, table, plot
        source.probing.report(payload, output, cfg.plots)
    if output is not None:
        print(f"\nresults: {write_json(payload, output)}")
        if cfg.plots:
            try:
                for path in write_plots(summary, output):
                    print(f"plot: {path}")
            except ImportError:
                print(
                    "note: matplotlib is not installed, so no plots were written; "
                    "pip install 'sae-lens-sampled[plot]'"
                )
    return payload


# ---------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sae-lens-sampled compare",
        description=(
            "Train SAE architectures side by side at equal k through SAELens's "
            "trainer and compare them (explained variance, L0 per token and under "
            "the batch rule, dead features, ground-truth MCC, tokens/s). Default "
            "data: an embedded SAELens synthetic model (offline, CPU); or your own "
            "activations (--activations), or a language model (--model)."
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
    add("--seed", type=int, help=f"first seed ({defaults.seed})")
    add(
        "--seeds",
        type=int,
        help="repeat every run over this many seeds (seed, seed+1, ...) and report "
        f"mean ± std ({defaults.seeds})",
    )
    add("--batch-size", type=int, help=f"tokens per batch ({defaults.batch_size})")
    add("--lr", type=float, help=f"learning rate ({defaults.lr})")
    add(
        "--eval-samples",
        type=int,
        help="eval tokens (65,536; activations mode: a tenth of the rows, at most "
        "65,536)",
    )
    add(
        "--normalize-activations",
        choices=NORMALIZE_OPTIONS,
        help=f"SAELens's normalize_activations for every run ({defaults.normalize_activations})",
    )
    add(
        "--data",
        choices=SYNTHETIC_DATA_NAMES,
        help="synthetic data set: 'default' (the default), or 'lottery' (rare "
        "features far stronger than frequent ones)",
    )
    add("--device", help=f"torch device ({defaults.device})")
    add("--threads", type=int, help="CPU threads (synthetic/activations default: 1)")
    add("--output", help=f"output directory ({defaults.output})")
    add("--no-plots", action="store_true", help="write no PNG plots")
    add(
        "--calibrate",
        action="store_true",
        help="synthetic mode: also evaluate per token after calibrate_thresholds on "
        "held-out samples (*_calibrated columns; not needed for faithful inference)",
    )
    add(
        "--quick",
        action="store_true",
        help="short runs: " + ", ".join(f"{k}={v}" for k, v in QUICK_SETTINGS.items()),
    )
    add(
        "--hook",
        help="language-model mode: hook name, e.g. blocks.6.hook_resid_post; "
        "activations mode: the column or tensor to read when there are several",
    )
    act = parser.add_argument_group("activations mode (offline)")
    act.add_argument(
        "--activations",
        metavar="PATH",
        help="a directory written by SAELens's CacheActivationsRunner, or a tensor "
        "file [n_tokens, d_in] (.npy, .safetensors, .pt)",
    )
    act.add_argument(
        "--labels",
        metavar="PATH[:NAME,...]",
        help="sparse probing of every trained SAE: one integer label per activation "
        "row (.npy, .pt, .safetensors), or a .npz of named label columns "
        "(':NAME,...' picks some); see docs/compare.md",
    )
    act.add_argument(
        "--groups",
        metavar="PATH[:NAME]",
        help="with --labels: a group id per row; rows are mean-pooled into groups "
        "(documents) and split train/eval by group",
    )
    lm = parser.add_argument_group("language-model mode (needs the Hugging Face hub)")
    lm.add_argument("--model", help="model name, e.g. pythia-160m")
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
        "seeds",
        "batch_size",
        "lr",
        "eval_samples",
        "normalize_activations",
        "data",
        "device",
        "threads",
        "output",
        "activations",
        "model",
        "hook",
        "model_class_name",
        "dataset",
        "context_size",
        "labels",
        "groups",
    ):
        value = getattr(args, name)
        if value is not None:
            settings[name] = value
    if args.no_plots:
        settings["plots"] = False
    if args.calibrate:
        settings["calibrate"] = True
    if args.quick:
        for name, value in QUICK_SETTINGS.items():
            # A file's eval split keeps its own default (a tenth of the rows).
            if name == "eval_samples" and args.activations is not None:
                continue
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
