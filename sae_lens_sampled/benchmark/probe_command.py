"""Sparse probing of trained SAEs on an activations file with labels.

``compare --activations ACTS --labels LABELS`` probes each SAE right after training;
``sae-lens-sampled probe OUTPUT_DIR --labels LABELS`` probes the SAEs an earlier
``compare`` saved (``docs/compare.md``, "Sparse probing"). Label and group files are
checked before anything is trained or loaded.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from sae_lens_sampled.benchmark.activation_files import ActivationFile, open_activations
from sae_lens_sampled.benchmark.probing import (
    ALL_DIMS,
    K_PROBE,
    ProbeSet,
    build_probe_set,
    load_groups,
    load_labels,
    pool_rows,
    probe_encoder,
    probe_features,
    probe_random_directions,
    split_file_spec,
    table_fields,
)
from sae_lens_sampled.benchmark.report import markdown_table, save_figure, spread_cell

if TYPE_CHECKING:
    from sae_lens_sampled.benchmark.config import CompareConfig

# The train/eval split of the probes does not change with the SAE's seed, so the
# spread over seeds is the SAEs' own.
SPLIT_SEED = 0
COMPARE_TABLE = "probing.md"
COMPARE_PLOT = "probing.png"
RAW_LABEL = "raw activations"


@contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Torch's CPU threads set to ``threads`` meanwhile (None: left as set)."""
    saved = torch.get_num_threads()
    torch.set_num_threads(threads or saved)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


class ActivationProbes:
    """Probes over every row of ``file`` with ``labels`` (``PATH[:NAME,...]``) and
    ``groups`` (``PATH[:NAME]``, None: probe rows); ``threads``: torch's CPU threads
    while the baselines are computed (None: as set)."""

    def __init__(
        self,
        file: ActivationFile,
        labels: str,
        groups: str | None = None,
        batch_size: int = 1024,
        threads: int | None = None,
    ):
        self.file = file
        self.labels, self.groups = labels, groups
        self.batch_size = batch_size
        self.threads = threads
        group_ids = load_groups(groups, file.n_rows) if groups else None
        exclude: list[str] = []
        if groups:
            group_path, group_names = split_file_spec(groups)
            if split_file_spec(labels)[0] == group_path and group_names:
                exclude = group_names  # the group ids are no label task
        columns = load_labels(labels, file.n_rows, exclude)
        self.probe_set: ProbeSet = build_probe_set(columns, group_ids, seed=SPLIT_SEED)
        self._pooled: torch.Tensor | None = None

    def rows(self) -> Iterator[torch.Tensor]:
        n_rows = self.file.n_rows
        for start in range(0, n_rows, self.batch_size):
            yield self.file.read(start, min(start + self.batch_size, n_rows))

    def describe(self) -> dict[str, Any]:
        return {
            "activations": str(self.file.path.resolve()),
            "labels": self.labels,
            "groups": self.groups,
            "split_seed": SPLIT_SEED,
            "k_probe": list(K_PROBE),
            **self.probe_set.describe(),
        }

    def probe_sae(self, sae: Any) -> dict[str, Any]:
        """``probing`` and the ``probe_k<k>`` fields of ``sae``'s per-token encode."""
        if sae.cfg.d_in != self.file.d_in:
            raise ValueError(
                f"probing: the SAE reads d_in={sae.cfg.d_in}; {self.file.path} has "
                f"d_in={self.file.d_in}"
            )
        if hasattr(sae, "eval"):
            sae.eval()
        device, dtype = sae.W_dec.device, sae.W_dec.dtype

        def encode(x: torch.Tensor) -> torch.Tensor:
            codes: torch.Tensor = sae.encode(x.to(device, dtype))
            return codes

        probes = probe_encoder(encode, self.rows, self.probe_set)
        return {"probing": probes, **table_fields(probes)}

    def baselines(self, seeds: Sequence[int], d_sae: int) -> dict[str, Any]:
        """``raw`` (the activations, and all their dimensions as ``k="all"``) and
        ``random`` (``d_sae`` random directions, one draw per seed)."""
        with torch_threads(self.threads):
            if self._pooled is None:
                self._pooled = pool_rows(self.rows, self.probe_set)
            pooled = self._pooled
            random = {
                str(seed): probe_random_directions(pooled, self.probe_set, d_sae, seed)
                for seed in seeds
            }
            raw = probe_features(pooled, self.probe_set, all_dims=True)
        return {"raw": raw, "random": random, "random_directions": d_sae}

    def report(
        self,
        payload: dict[str, Any],
        output: Path | None,
        plots: bool,
        plot_name: str = COMPARE_PLOT,
        table_name: str = COMPARE_TABLE,
    ) -> str:
        """Add ``probing`` (setup and baselines) to ``payload``, print the probe table
        and write it (and the plot) to ``output``; returns the table."""
        results = payload["results"]
        seeds = sorted({int(r["seed"]) for r in results})
        d_sae = int(payload["config"]["d_sae"])
        baselines = self.baselines(seeds, d_sae)
        payload["probing"] = {"setup": self.describe(), "baselines": baselines}
        table = format_probe_table(results, baselines)
        print(
            "\nsparse probing: balanced accuracy on the eval split, mean over classes"
        )
        print(table)
        if output is not None:
            output.mkdir(parents=True, exist_ok=True)
            (output / table_name).write_text(table + "\n")
            if plots:
                try:
                    print(f"plot: {write_plot(results, baselines, output / plot_name)}")
                except ImportError:
                    print("note: matplotlib is not installed, so no probe plot")
        return table


def from_config(file: ActivationFile, cfg: CompareConfig) -> ActivationProbes | None:
    """Probes of ``compare --labels``, or None without labels."""
    if cfg.labels is None:
        return None
    # The baselines run after compare restores torch's threads: keep its setting.
    threads = cfg.threads or 1
    return ActivationProbes(file, cfg.labels, cfg.groups, cfg.batch_size, threads)


# ---------------------------------------------------------------------------
# Table and plot


def _cell(values: Sequence[float]) -> str:
    if not values:
        return "-"
    std = statistics.stdev(values) if len(values) > 1 else None
    return spread_cell(statistics.fmean(values), std, "{:.3f}")


def _task_values(probes: Sequence[dict[str, Any]], task: str, key: str) -> list[float]:
    return [
        p["tasks"][task]["k"][key]["mean_balanced_accuracy"]
        for p in probes
        if key in p["tasks"][task]["k"]
    ]


def probes_by_label(
    results: Sequence[dict[str, Any]], baselines: dict[str, Any]
) -> dict[str, list[dict[str, Any]]]:
    """Each run's probes (one per seed), then the raw and random baselines'."""
    by_label: dict[str, list[dict[str, Any]]] = {}
    for result in results:
        if result.get("probing") is not None:
            by_label.setdefault(result["label"], []).append(result["probing"])
    by_label[RAW_LABEL] = [baselines["raw"]]
    random_label = f"random directions ({baselines['random_directions']})"
    by_label[random_label] = list(baselines["random"].values())
    return by_label


def format_probe_table(
    results: Sequence[dict[str, Any]], baselines: dict[str, Any]
) -> str:
    """Markdown: per run (or baseline) and task, mean ± std over seeds of the mean
    balanced accuracy over classes, per k_probe."""
    keys = [*map(str, K_PROBE), ALL_DIMS]
    header = ["run", "task", "seeds", *(f"k={k}" for k in keys)]
    rows = []
    for label, probes in probes_by_label(results, baselines).items():
        for task in probes[0]["tasks"]:
            cells = [_cell(_task_values(probes, task, key)) for key in keys]
            rows.append([label, task, str(len(probes)), *cells])
    return markdown_table(header, rows)


def write_plot(
    results: Sequence[dict[str, Any]], baselines: dict[str, Any], path: Path
) -> Path:
    """Mean balanced accuracy against k_probe, one line per run (mean ± std over
    seeds), the baselines dashed (``docs/compare.md``). Needs matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = list(K_PROBE)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    colors = plt.get_cmap("tab10")
    by_label = probes_by_label(results, baselines)
    n_runs = len(by_label) - 2  # then the raw and the random baseline, dashed
    for i, (label, probes) in enumerate(by_label.items()):
        values = [[p["mean"][str(k)] for p in probes] for k in ks]
        means = [statistics.fmean(v) for v in values]
        errors = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in values]
        style: dict[str, Any] = {"color": colors(i % 10)}
        if i >= n_runs:
            style = {"color": ("black", "gray")[i - n_runs], "linestyle": "--"}
        ax.errorbar(ks, means, yerr=errors, capsize=3, marker="o", label=label, **style)
    ax.axhline(
        baselines["raw"]["mean"][ALL_DIMS],
        color="black",
        linestyle=":",
        label="raw activations, all dims",
    )
    ax.set_xscale("log")
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.minorticks_off()
    ax.set_xlabel("k_probe (latents per probe)")
    ax.set_ylabel("balanced accuracy (eval split)")
    ax.set_title(
        "Sparse probing, one-vs-rest, mean over classes and tasks", fontsize=10
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    return save_figure(plt, fig, path)


# ---------------------------------------------------------------------------
# sae-lens-sampled probe OUTPUT_DIR


def _seed_of(run_dir: Path, default: int) -> int:
    name = run_dir.parent.name
    return int(name.removeprefix("seed")) if name.startswith("seed") else default


def probe_saved(
    output: Path,
    labels: str,
    groups: str | None = None,
    *,
    activations: str | None = None,
    hook: str | None = None,
    batch_size: int | None = None,
    device: str = "cpu",
    tag: str | None = None,
    plots: bool = True,
    threads: int | None = 1,
) -> dict[str, Any]:
    """Probe the SAEs a ``compare`` run saved in ``output``; write
    ``probe_results[_TAG].json``, ``probe_table[_TAG].md`` and ``probe[_TAG].png``
    there and return the JSON payload. ``threads`` as in compare (None: torch's)."""
    from sae_lens import SAE

    from sae_lens_sampled.benchmark.runs import run_directories

    with torch_threads(threads):
        results_path = output / "results.json"
        if not results_path.is_file():
            raise ValueError(
                f"probe: {output}: no results.json (a compare --output DIR)"
            )
        compared = json.loads(results_path.read_text())
        config = compared["config"]
        if activations is None:
            if compared.get("mode") != "activations":
                raise ValueError(
                    f"probe: {output} was not trained on an activations file; name the "
                    "probing rows with --activations"
                )
            activations, hook = compared["data"]["path"], compared["data"]["key"]
        file = open_activations(activations, hook)
        probes = ActivationProbes(
            file, labels, groups, batch_size or int(config["batch_size"])
        )
        runs_by_label = {r["label"]: r for r in compared["results"]}
        rows = []
        for label, run_dirs in run_directories(output, config["runs"]).items():
            for run_dir in run_dirs:
                print(f"probing {run_dir.relative_to(output)}", flush=True)
                sae: SAE[Any] = SAE.load_from_disk(str(run_dir), device=device)
                run = runs_by_label.get(label, {})
                row = {
                    "label": label,
                    "architecture": run.get("architecture"),
                    "params": run.get("params"),
                    "seed": _seed_of(run_dir, int(config["seed"])),
                    "path": str(run_dir.relative_to(output)),
                }
                rows.append({**row, **probes.probe_sae(sae)})
        # compare's order: seed by seed, the runs in order.
        rows.sort(key=lambda row: (row["seed"], row["path"]))
        suffix = f"_{tag}" if tag else ""
        payload: dict[str, Any] = {"config": config, "results": rows}
        probes.report(
            payload,
            output,
            plots,
            plot_name=f"probe{suffix}.png",
            table_name=f"probe_table{suffix}.md",
        )
        path = output / f"probe_results{suffix}.json"
        path.write_text(json.dumps(payload, indent=2) + "\n")
        print(f"\nresults: {path}")
        return payload


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sae-lens-sampled probe",
        description=(
            "Sparse probing of the SAEs a `compare --output DIR` run saved: "
            "one-vs-rest logistic-regression probes on the k latents of largest "
            f"train mean difference (k in {', '.join(map(str, K_PROBE))}), with the "
            "raw activations and random directions as baselines."
        ),
    )
    add = parser.add_argument
    add("output", type=Path, help="a compare output directory (with saes/)")
    add(
        "--labels",
        required=True,
        metavar="PATH[:NAME,...]",
        help="one integer label per activation row (.npy, .pt, .safetensors), or a "
        ".npz of named label columns (':NAME,...' picks some)",
    )
    add(
        "--groups",
        metavar="PATH[:NAME]",
        help="a group id per row: rows are mean-pooled into groups (documents) and "
        "split train/eval by group",
    )
    add(
        "--activations",
        metavar="PATH",
        help="the probing rows (default: the file the compare run trained on)",
    )
    add("--hook", help="the tensor or column of --activations, when it holds several")
    add("--batch-size", type=int, help="rows encoded at once (compare's batch size)")
    add("--device", default="cpu", help="torch device (cpu)")
    add("--tag", help="write probe_results_TAG.json, probe_table_TAG.md, probe_TAG.png")
    add("--threads", type=int, default=1, help="CPU threads for torch (1)")
    add("--no-plots", action="store_true", help="write no PNG plot")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    start = time.perf_counter()
    try:
        if args.batch_size is not None and args.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        probe_saved(
            args.output,
            args.labels,
            args.groups,
            activations=args.activations,
            hook=args.hook,
            batch_size=args.batch_size,
            device=args.device,
            tag=args.tag,
            plots=not args.no_plots,
            threads=args.threads,
        )
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"total: {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
