"""``sae-lens-sampled compare``: train architectures side by side at equal k.

One data source (:mod:`~sae_lens_sampled.benchmark.source`: synthetic, language
model or activations file) feeds one training-and-evaluation loop
(:mod:`~sae_lens_sampled.benchmark.loop`); ``docs/compare.md`` describes the modes,
the metrics and the output files.
"""

from __future__ import annotations

import argparse
import dataclasses
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sae_lens_sampled.benchmark.config import (
    NORMALIZE_OPTIONS,
    SYNTHETIC_DATA_NAMES,
    CompareConfig,
)
from sae_lens_sampled.benchmark.output_dir import (
    check_output,
    clear_output,
    finished_runs,
)
from sae_lens_sampled.benchmark.specs import DEFAULT_RUNS, parse_run_specs

# torch and SAELens are imported by the functions that train, after the arguments
# are checked: ``compare --help`` and a bad argument answer at once.
if TYPE_CHECKING:
    from sae_lens.synthetic import SyntheticModel

    from sae_lens_sampled.benchmark.source import DataSource
    from sae_lens_sampled.benchmark.synthetic import (
        ReplayedActivations,
        default_synthetic_model_config,
    )

__all__ = [
    "CompareConfig",
    "ReplayedActivations",
    "default_synthetic_model_config",
    "run_compare",
]


def __getattr__(name: str) -> Any:
    if name in ("ReplayedActivations", "default_synthetic_model_config"):
        import sae_lens_sampled.benchmark.synthetic as synthetic

        return getattr(synthetic, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
    from sae_lens_sampled.benchmark.synthetic import SyntheticSource

    return SyntheticSource(cfg, override_synthetic_model)


def check_device(device: str) -> None:
    """Refuse a CUDA device this machine does not have, before anything trains."""
    import torch

    from sae_lens_sampled.checks import FieldValueError

    if not device.startswith("cuda"):
        return
    if not torch.cuda.is_available():
        built = "" if torch.version.cuda else ", a build without CUDA"
        problem = (
            f"CUDA is not available here (torch {torch.__version__}{built}); "
            "use --device cpu"
        )
    elif (torch.device(device).index or 0) >= torch.cuda.device_count():
        problem = f"this machine has {torch.cuda.device_count()} CUDA device(s)"
    else:
        return
    raise FieldValueError(f"device is {device!r}, but {problem}", "device", device)


def run_compare(
    config: CompareConfig | None = None,
    *,
    override_model: Any | None = None,
    override_dataset: Any | None = None,
    override_synthetic_model: SyntheticModel | None = None,
    **settings: Any,
) -> dict[str, Any]:
    """Train and evaluate every run; print a table; write results.json and plots.

    results.json, table.md and table.csv are rewritten after every finished run, so
    an interrupted comparison (Ctrl-C: KeyboardInterrupt, after one line on
    stderr) keeps the runs it finished; ``resume=True`` continues it.

    Args:
        config: Settings; keyword ``settings`` (CompareConfig fields) override it.
        override_model: A HookedRootModule for language-model mode (needs ``hook``),
            e.g. a small random HookedTransformer for offline use.
        override_dataset: A ``datasets.Dataset`` for language-model mode.
        override_synthetic_model: Use this SAELens SyntheticModel instead of the
            embedded default.

    Returns:
        The results.json payload (``docs/compare.md`` lists its keys).
    """
    import torch

    from sae_lens_sampled.benchmark.loop import compare_runs
    from sae_lens_sampled.benchmark.specs import resolve_runs
    from sae_lens_sampled.benchmark.summary import summarize

    cfg = (
        dataclasses.replace(config, **settings) if config else CompareConfig(**settings)
    )
    check_output(cfg.output, resume=cfg.resume, overwrite=cfg.overwrite)
    runs, skipped = resolve_runs(cfg.runs)
    for note in skipped:
        print(f"note: {note}")
    check_device(cfg.device)
    output = Path(cfg.output) if cfg.output is not None else None

    lm_mode = cfg.model is not None or override_model is not None
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads or (threads if lm_mode else 1))
    sigint = signal.getsignal(signal.SIGINT)
    results: list[dict[str, Any]] = []
    planned = len(runs) * cfg.seeds

    def make_payload() -> dict[str, Any]:
        """results.json's content for the runs finished so far."""
        return {
            "mode": source.mode,
            "config": cfg.to_dict(),
            "data": data,
            "skipped": skipped,
            "complete": len(results) == planned,
            "results": results,
            "summary": summarize(results),
        }

    def save() -> None:
        if output is not None:
            write_outputs(make_payload(), output)

    try:
        source = make_source(
            cfg,
            override_model=override_model,
            override_dataset=override_dataset,
            override_synthetic_model=override_synthetic_model,
        )
        cfg = dataclasses.replace(cfg, eval_samples=source.eval_samples)
        data = source.describe()
        finished = finished_runs(cfg.output, cfg.to_dict()) if cfg.resume else {}
        if cfg.overwrite and cfg.output is not None:
            clear_output(cfg.output)
        if source.mode == "activations":
            print(
                f"activations: {data['path']} {data['shape']} {data['dtype']}; "
                f"eval split {data['eval_rows']:,} rows, training "
                f"{data['train_rows']:,} rows ({data['epochs_per_run']:.2f} "
                "epochs per run)"
            )
        compare_runs(cfg, source, runs, output, results, finished, save)
        save()  # also when every run was kept from an earlier results.json
    except BaseException as exc:
        # SAELens's language-model runner turns SIGINT into its InterruptedException.
        if not isinstance(exc, KeyboardInterrupt) and (
            type(exc).__name__ != "InterruptedException"
        ):
            raise
        # Close SAELens's live tqdm bars, so that the message is the last line, not
        # glued to a bar or redrawn over.
        tqdm = sys.modules.get("tqdm")
        if tqdm is not None:
            for bar in list(getattr(tqdm.tqdm, "_instances", ())):
                bar.close()
        kept = (
            f"kept in {output / 'results.json'}; continue with --resume"
            if output is not None and results
            else "nothing written"
        )
        print(
            f"interrupted: {len(results)} of {planned} runs finished, {kept}",
            file=sys.stderr,
        )
        raise KeyboardInterrupt from None
    finally:
        torch.set_num_threads(threads)
        signal.signal(signal.SIGINT, sigint)

    payload = make_payload()
    print()
    print(terminal_table(payload))
    if source.probing is not None:  # sparse probing: baselines, table, plot
        source.probing.report(payload, output, cfg.plots)
        if output is not None:  # with the baselines
            write_outputs(payload, output)
    if output is not None:
        print(f"\nresults: {output / 'results.json'}")
        if cfg.plots:
            write_plot_files(payload, output)
    return payload


def write_plot_files(payload: dict[str, Any], output: Path) -> None:
    from sae_lens_sampled.benchmark.report import write_plots

    try:
        for path in write_plots(payload["summary"], output, about=describe(payload)):
            print(f"plot: {path}")
    except ImportError:
        print(
            "note: matplotlib is not installed, so no plots were written; "
            "pip install 'sae-lens-sampled[plot]'"
        )


def terminal_table(payload: dict[str, Any]) -> str:
    from sae_lens_sampled.benchmark.report import (
        format_summary_table,
        format_table,
        with_notes,
    )

    cfg = payload["config"]
    if cfg["seeds"] > 1:
        seeds = ", ".join(map(str, range(cfg["seed"], cfg["seed"] + cfg["seeds"])))
        table = (
            f"mean ± std over {cfg['seeds']} seeds ({seeds})\n"
            + format_summary_table(payload["summary"])
        )
    else:
        table = format_table(payload["results"])
    return with_notes(table, payload["results"])


def write_outputs(payload: dict[str, Any], output: Path) -> None:
    """results.json, table.md and table.csv of the runs finished so far."""
    from sae_lens_sampled.benchmark.report import write_json, write_tables

    write_json(payload, output)
    write_tables(payload, output, describe(payload))


def describe(payload: dict[str, Any]) -> str:
    """What a comparison ran on, for plot titles and table.md: data, k, d_sae,
    steps and seeds."""
    cfg, data = payload["config"], payload["data"]
    if payload["mode"] == "activations":
        what = f"activations {Path(str(data.get('path', ''))).name}"
    elif payload["mode"] == "language_model":
        what = f"{cfg['model'] or 'language model'} {cfg['hook']}"
    else:
        what = f"synthetic data '{cfg['data']}'"
    seeds = sorted({r["seed"] for r in payload["results"]}) or [cfg["seed"]]
    seed_text = f"seed {seeds[0]}" if len(seeds) == 1 else f"seeds {seeds}"
    return (
        f"{what}; k={cfg['k']:g}, d_sae={cfg['d_sae']}, {cfg['steps']} steps, "
        f"{seed_text}"
    )


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
    add(
        "--resume",
        action="store_true",
        help="continue the comparison in --output: runs already in its results.json "
        "with the same settings are kept, not retrained",
    )
    add(
        "--overwrite",
        action="store_true",
        help="replace the comparison in --output (a directory with files is "
        "refused otherwise)",
    )
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
    fields = {field.name for field in dataclasses.fields(CompareConfig)}
    for name, value in vars(args).items():
        # A flag left out is None (False for a switch): the config's default holds.
        if name in fields and value is not None and value is not False:
            settings[name] = value
    if args.no_plots:
        settings["plots"] = False
    if args.quick:
        for name, value in QUICK_SETTINGS.items():
            # A file's eval split keeps its own default (a tenth of the rows).
            if name == "eval_samples" and args.activations is not None:
                continue
            settings.setdefault(name, value)
    for item in args.lm:
        name, eq, value = item.partition("=")
        if not eq:
            raise ValueError(f"--lm must be FIELD=VALUE, got {item!r}")
        settings.setdefault("lm_settings", {})[name.strip()] = parse_value(value)
    return settings


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = settings_from_args(args)
        # Checked before torch and SAELens are imported: a bad setting or an
        # output directory in use is reported at once.
        cfg = CompareConfig(**settings)
        check_output(cfg.output, resume=cfg.resume, overwrite=cfg.overwrite)
        if cfg.activations is not None and not Path(cfg.activations).exists():
            raise ValueError(
                f"activations: {cfg.activations}: no such file or directory"
            )
        check_device(cfg.device)  # imports torch, not SAELens
        start = time.perf_counter()
        run_compare(cfg)
    except ValueError as error:
        # ``sae-lens-sampled --debug compare``: errors keep their traceback.
        cli = sys.modules.get("sae_lens_sampled.cli")
        if cli is not None and cli.debugging():
            raise
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # run_compare said what was kept
        return 130
    print(f"total: {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
