"""Sampled-SAE against BatchTopK across dictionary widths, on real activations.

``run`` trains, for every width and seed, BatchTopK next to ``sampled`` over the pool
spectrum (the paper's ``pool_factor`` and the share of the dictionary,
``pool_fraction``; both pool modes; a flatter ``pool_beta``) through
``experiments.pool_dynamics`` (``sae-lens-sampled compare --activations`` with the
pool traced), one process per width and seed, ``--jobs`` at a time. ``report`` reads
the results and writes ``widths.md`` (mean ± std over seeds) and ``widths.png``.
The table and figure of docs/sampled.md ("Pool size across widths") come from::

    python -m experiments.sampled_widths run --activations acts.npy --output widths
    python -m experiments.sampled_widths run --set extra --activations acts.npy \
        --output widths
    python -m experiments.sampled_widths run --set aux_dead --activations acts.npy \
        --output widths
    python -m experiments.sampled_widths probe --labels labels.npz widths
    python -m experiments.sampled_widths report widths

Each width's runs are listed in ``WIDTHS`` below; every run of one width and seed
shares the initialisation and data order (compare seeds them alike).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from collections import defaultdict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SPECTRUM = (
    "batchtopk",
    "sampled:pool_factor=16",  # the 0.2 default, the paper's l
    "sampled:pool_fraction=0.125",
    "sampled:pool_fraction=0.25",
    "sampled:pool_fraction=0.5",
    "sampled:pool_fraction=0.25,pool_mode=top",
    "sampled:pool_fraction=0.25,pool_beta=0.5",
)


@dataclass(frozen=True)
class Width:
    d_sae: int
    k: int
    steps: int
    seeds: tuple[int, ...]
    runs: tuple[str, ...]


# What a 2-core CPU allowed: the whole spectrum at the smallest width, its main
# points at 4,096, 100 steps at 16,384.
WIDTHS = (
    Width(1536, 16, 300, (0, 1, 2), SPECTRUM[:2] + SPECTRUM[3:]),
    Width(4096, 16, 300, (0, 1, 2), SPECTRUM[:2] + SPECTRUM[3:5]),
    Width(16384, 64, 100, (0, 1, 2), (SPECTRUM[0],) + SPECTRUM[3:5]),
)

# A second set, run after the first had shown where the defaults fall: the point
# between the two fractions, and a sharper sampled pool (less churn) at a quarter.
BETWEEN = ("sampled:pool_fraction=0.375", "sampled:pool_fraction=0.25,pool_beta=4")
EXTRA_WIDTHS = (
    Width(1536, 16, 300, (0, 1, 2), BETWEEN),
    Width(4096, 16, 300, (0, 1, 2), BETWEEN[:1]),
)
# A third: the aux loss's dead set counted from missed chances in the pool, not from
# steps unselected (the rise of the loss starts once the trainer's window has passed).
POOLED_DEAD = (
    "sampled:pool_fraction=0.25,aux_dead=pooled",
    "sampled:pool_fraction=0.5,aux_dead=pooled",
    "sampled:pool_factor=16,aux_dead=pooled",
)
AUX_DEAD_WIDTHS = (
    Width(1536, 16, 300, (0, 1, 2), POOLED_DEAD),
    Width(4096, 16, 300, (0,), POOLED_DEAD),
)
SETS = {"main": WIDTHS, "extra": EXTRA_WIDTHS, "aux_dead": AUX_DEAD_WIDTHS}

COLUMNS = (
    ("ev", "EV per token"),
    ("ev_batch", "EV batch rule"),
    ("l0", "L0 per token"),
    ("dead", "dead (eval, per token)"),
)


def run_dir(output: Path, width: Width, seed: int) -> Path:
    return output / f"d{width.d_sae}_k{width.k}" / f"seed{seed}"


def log_path(output: Path, width: Width, seed: int) -> Path:
    # Beside compare's output directory: compare refuses one that holds other files.
    return output / f"d{width.d_sae}_k{width.k}" / f"seed{seed}.log"


def command(activations: str, width: Width, seed: int, output: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "experiments.pool_dynamics",
        "--activations",
        activations,
        "--d-sae",
        str(width.d_sae),
        "--k",
        str(width.k),
        "--steps",
        str(width.steps),
        "--seed",
        str(seed),
        "--architectures",
        ",".join(width.runs),
        "--no-plots",
        "--threads",
        "1",
        "--output",
        str(run_dir(output, width, seed)),
    ]


def run(args: argparse.Namespace) -> int:
    output = Path(args.output)
    if args.set != "main":
        output = output / args.set
    # Seed by seed, so that a first reading of every width comes early.
    jobs = [
        (width, seed)
        for seed in range(3)
        for width in SETS[args.set]
        if seed in width.seeds and (not args.widths or width.d_sae in args.widths)
    ]

    def one(job: tuple[Width, int]) -> int:
        width, seed = job
        target = run_dir(output, width, seed)
        if (target / "pool_dynamics.json").exists():
            return 0
        log_file = log_path(output, width, seed)
        log_file.parent.mkdir(parents=True, exist_ok=True)
        with open(log_file, "w") as log:
            done = subprocess.run(
                command(args.activations, width, seed, output),
                stdout=log,
                stderr=subprocess.STDOUT,
                check=False,
            )
        print(f"d_sae {width.d_sae} seed {seed}: exit {done.returncode}", flush=True)
        return done.returncode

    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        codes = list(pool.map(one, jobs))
    return max(codes, default=0)


# Probing tasks (name, labels column, groups column): the module a docstring documents,
# on docstrings (rows mean-pooled by doc), and the identity of the 20 most frequent
# tokens, on single tokens.
PROBE_TASKS = (("module", "module", "doc"), ("token", "token_id", None))


def probe(args: argparse.Namespace) -> int:
    """Sparse probing of every finished width and seed, on each of PROBE_TASKS."""
    output = Path(args.output)
    status = 0
    for results in sorted(output.rglob("d*_k*/seed*/results.json")):
        if not json.loads(results.read_text()).get("complete", True):
            continue  # still training
        for tag, column, groups in PROBE_TASKS:
            if (results.parent / f"probe_results_{tag}.json").exists():
                continue
            cmd = [
                sys.executable,
                "-m",
                "sae_lens_sampled",
                "probe",
                str(results.parent),
                "--labels",
                f"{args.labels}:{column}",
                "--tag",
                tag,
                "--no-plots",
            ]
            if groups is not None:
                cmd += ["--groups", f"{args.labels}:{groups}"]
            log_file = results.parent.with_name(results.parent.name + f".{tag}.log")
            with open(log_file, "w") as log:
                done = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT)
            print(f"{results.parent} {tag}: exit {done.returncode}", flush=True)
            status = max(status, done.returncode)
    return status


def collect_probes(
    output: Path,
) -> tuple[dict[tuple[int, str, str], list[dict[str, float]]], dict[Any, list[float]]]:
    """Probe accuracies by (d_sae, run label, task), one dict per seed, and the
    baselines by (d_sae, baseline, task, k)."""
    runs: dict[tuple[int, str, str], list[dict[str, float]]] = defaultdict(list)
    baselines: dict[Any, list[float]] = defaultdict(list)
    for path in sorted(output.rglob("d*_k*/seed*/probe_results_*.json")):
        task = path.stem.removeprefix("probe_results_")
        payload = json.loads(path.read_text())
        d_sae = int(payload["config"]["d_sae"])
        for row in payload["results"]:
            runs[(d_sae, row["label"], task)].append(
                {k: v for k, v in row.items() if k.startswith("probe_k")}
            )
        if "main" not in path.parts and "extra" in path.parts:
            continue  # the baselines do not depend on the run set
        found = payload["probing"]["baselines"]
        # the raw activations, and the random directions drawn for each seed
        named = [("raw activations", found["raw"])]
        named += [
            ("random directions", by_seed) for by_seed in found["random"].values()
        ]
        for name, baseline in named:
            for k, accuracy in baseline["mean"].items():
                baselines[(d_sae, name, task, k)].append(accuracy)
    return runs, baselines


def probe_table(output: Path) -> list[str]:
    runs, baselines = collect_probes(output)
    if not runs:
        return []
    ks = ("1", "2", "5", "20")
    lines = [
        "| d_sae | task | run | seeds | " + " | ".join(f"k={k}" for k in ks) + " |",
        "|" + "---|" * (4 + len(ks)),
    ]
    for d_sae, label, task in sorted(runs, key=lambda key: (key[0], key[2])):
        rows = runs[(d_sae, label, task)]
        cells = [str(d_sae), task, f"`{label}`", str(len(rows))]
        cells += [mean_std([r[f"probe_k{k}"] for r in rows]) for k in ks]
        lines.append("| " + " | ".join(cells) + " |")
    names = sorted({(d, n, t) for d, n, t, _ in baselines})
    for d_sae, name, task in names:
        values = [baselines.get((d_sae, name, task, k), []) for k in ks]
        cells = [str(d_sae), task, name, str(max(len(v) for v in values))]
        cells += [mean_std(v) if v else "-" for v in values]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def collect(output: Path) -> dict[tuple[int, int, str], list[dict[str, Any]]]:
    """Results by (d_sae, k, run label), one dict per seed, with the traced pool
    summary merged in."""
    found: dict[tuple[int, int, str], list[dict[str, Any]]] = defaultdict(list)
    for results in sorted(output.rglob("d*_k*/seed*/results.json")):
        payload = json.loads(results.read_text())
        if not payload.get("complete", True):
            continue  # still training
        config = payload["config"]
        dynamics_path = results.parent / "pool_dynamics.json"
        traced: list[dict[str, Any]] = []
        if dynamics_path.exists():
            traced = json.loads(dynamics_path.read_text())["summaries"]
        sampled = iter(traced)
        for row in payload["results"]:
            merged = dict(row)
            if row["label"].startswith("sampled"):
                merged.update({f"pool_{k}": v for k, v in next(sampled, {}).items()})
            found[(config["d_sae"], config["k"], row["label"])].append(merged)
    return found


def mean_std(values: Sequence[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.fmean(values):.3f} ± {statistics.stdev(values):.3f}"


def count_std(values: Sequence[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.0f}"
    return f"{statistics.fmean(values):.0f} ± {statistics.stdev(values):.0f}"


def report(args: argparse.Namespace) -> int:
    output = Path(args.output)
    found = collect(output)
    lines = [
        "| d_sae | k | run | seeds | EV per token | EV batch rule | L0 per token "
        "| dead (eval) | MSE first / last fifth | pool churn | BatchTopK's picks in "
        "the pool | features pooled on < 1 % of steps |",
        "|" + "---|" * 12,
    ]
    for (d_sae, k, label), rows in sorted(found.items(), key=lambda kv: kv[0][:2]):
        cells = [str(d_sae), str(k), f"`{label}`", str(len(rows))]
        cells.append(mean_std([r["explained_variance"] for r in rows]))
        batch = [r["explained_variance_batch"] for r in rows]
        cells.append(mean_std(batch) if None not in batch else "-")
        cells.append(mean_std([r["l0"] for r in rows]))
        cells.append(count_std([r["dead_features"] for r in rows]))
        if all("pool_mse_first_fifth" in row for row in rows):
            first = statistics.fmean(r["pool_mse_first_fifth"] for r in rows)
            last = statistics.fmean(r["pool_mse_last_fifth"] for r in rows)
            cells.append(f"{first:.1f} / {last:.1f}")
            cells.append(mean_std([r["pool_churn_last_fifth"] for r in rows]))
            cells.append(
                mean_std([r["pool_batchtopk_in_pool_last_fifth"] for r in rows])
            )
            cells.append(
                count_std([r["pool_features_pooled_under_1pct_of_steps"] for r in rows])
            )
        else:
            cells += ["-"] * 4
        lines.append("| " + " | ".join(cells) + " |")
    probes = probe_table(output)
    if probes:
        lines += ["", "Sparse probing (balanced accuracy, eval split):", "", *probes]
    (output / "widths.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    plot(found, output / "widths.png")
    return 0


def plot(found: dict[tuple[int, int, str], list[dict[str, Any]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    widths = sorted({(d, k) for d, k, _ in found})
    # One colour and marker per run label, the same in every panel.
    all_labels = sorted({label for _, _, label in found})
    palette = [plt.get_cmap("tab20")(i) for i in range(20)]
    style = {
        label: (
            palette[i % len(palette)],
            "s" if label == "batchtopk" else "oD^v<>"[i % 6],
        )
        for i, label in enumerate(all_labels)
    }
    fig, axes = plt.subplots(
        1, len(widths), figsize=(5 * len(widths), 4), squeeze=False
    )
    for ax, (d_sae, k) in zip(axes[0], widths, strict=True):
        labels = [label for d, kk, label in found if (d, kk) == (d_sae, k)]
        seeds = 0
        for label in labels:
            rows = found[(d_sae, k, label)]
            seeds = max(seeds, len(rows))
            ev = [r["explained_variance"] for r in rows]
            err = statistics.stdev(ev) if len(ev) > 1 else None
            dead = statistics.fmean(r["dead_features"] for r in rows) / d_sae
            color, marker = style[label]
            ax.errorbar(
                dead,
                statistics.fmean(ev),
                yerr=err,
                fmt=marker,
                color=color,
                label=label,
            )
        ax.set_title(f"d_sae {d_sae}, k {k}, {seeds} seed(s)")
        ax.set_xlabel("dead features (share of d_sae, eval)")
        ax.set_ylabel("explained variance per token")
        ax.legend(fontsize=7)
    fig.suptitle("MiniLM layer-5 activations: sampled pool spectrum vs BatchTopK")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run_parser = sub.add_parser("run", help="train every width and seed")
    run_parser.add_argument("--activations", required=True)
    run_parser.add_argument("--output", required=True)
    run_parser.add_argument("--jobs", type=int, default=2)
    run_parser.add_argument("--widths", type=int, nargs="*", help="only these d_sae")
    run_parser.add_argument(
        "--set", choices=sorted(SETS), default="main", help="which set of runs"
    )
    probe_parser = sub.add_parser("probe", help="sparse probing of the saved SAEs")
    probe_parser.add_argument("--labels", required=True, help="the labels .npz")
    probe_parser.add_argument("output")
    report_parser = sub.add_parser("report", help="table and figure from the results")
    report_parser.add_argument("output")
    args = parser.parse_args(argv)
    commands = {"run": run, "probe": probe, "report": report}
    return commands[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
