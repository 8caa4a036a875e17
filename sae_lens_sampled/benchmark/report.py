"""Output of ``compare``: terminal table, results.json, table.md, table.csv and PNG
plots."""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sae_lens_sampled.benchmark.output_dir import (
    MCC_PLOT,
    RESULTS_FILENAME,
    TABLE_CSV,
    TABLE_MARKDOWN,
    TRADEOFF_PLOT,
)
from sae_lens_sampled.benchmark.probing import K_PROBE
from sae_lens_sampled.benchmark.summary import (
    SpectrumSeries,
    reference_entry,
    spectrum_series,
)

# (header, result key, format) of the terminal table; a column empty in every row is
# left out.
COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("L0", "l0", "{:.2f}"),
    ("L0 batch", "l0_batch", "{:.2f}"),
    ("L0 calib", "l0_calibrated", "{:.2f}"),
    ("EV", "explained_variance", "{:.3f}"),
    ("EV batch", "explained_variance_batch", "{:.3f}"),
    ("EV calib", "explained_variance_calibrated", "{:.3f}"),
    ("dead", "dead_features", "{:.0f}"),
    ("dead batch", "dead_features_batch", "{:.0f}"),
    ("MCC", "mcc", "{:.3f}"),
    ("F1", "f1", "{:.3f}"),
    ("absorption", "absorption", "{:.3f}"),
    ("absorption batch", "absorption_batch", "{:.3f}"),
    ("CE score", "ce_loss_score", "{:.3f}"),
    *((f"probe k={k}", f"probe_k{k}", "{:.3f}") for k in K_PROBE),
    ("tok/s", "tokens_per_second", "{:,.0f}"),
)


# What each column means (table.md's legend).
LEGEND: dict[str, str] = {
    "l0": "mean active features per token of the exported inference SAE "
    "(per-token thresholds, what a saved SAE does)",
    "l0_batch": "the same under the training SAE's batch rule (batch of "
    "batch_size tokens)",
    "l0_calibrated": "per token after calibrate_thresholds on held-out samples",
    "explained_variance": "explained variance of the reconstruction, per token",
    "explained_variance_batch": "explained variance under the batch rule",
    "explained_variance_calibrated": "explained variance after calibration",
    "dead_features": "features that never fire per token on the eval data",
    "dead_features_batch": "features the batch rule never selects on the eval data",
    "mcc": "mean correlation of the decoder with the ground-truth features (1 best)",
    "f1": "F1 of feature recovery against ground truth",
    "absorption": "fraction of parent-feature tokens absorbed by a child latent, "
    "per token (0 best)",
    "absorption_batch": "absorption under the batch rule",
    "ce_loss_score": "fraction of the language model's loss recovered with the "
    "SAE spliced in (1 best)",
    "tokens_per_second": "training tokens per second (wall clock, this machine)",
    **{
        f"probe_k{k}": f"sparse probing: balanced accuracy on the eval split of "
        f"one-vs-rest probes on the {k} latent(s) of largest train mean difference, "
        "mean over classes and label tasks (0.5 is chance)"
        for k in K_PROBE
    },
}


HEALTH_LEGEND = (
    "ok, or what went wrong in training: 'MSE rising' (the mean training MSE of the "
    "last window of steps above the window before it), 'L0 +N%' (per-token L0 N% off "
    "k: the per-token thresholds have not settled); the notes above name the cause "
    "and the setting to change"
)


def spread_cell(mean: Any, std: Any, fmt: str) -> str:
    if mean is None:
        return "-"
    if std is None:
        return fmt.format(mean)
    return f"{fmt.format(mean)} ± {fmt.format(std)}"


def _layout(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        first = cells[0].ljust(widths[0])
        rest = (
            cell.rjust(width) for cell, width in zip(cells[1:], widths[1:], strict=True)
        )
        return "  ".join([first, *rest])

    rule = "-" * len(line(header))
    return "\n".join([line(header), rule, *(line(row) for row in rows)])


def _with_health(
    header: list[str], rows: list[list[str]], entries: Sequence[dict[str, Any]]
) -> tuple[list[str], list[list[str]]]:
    """A ``health`` column (the entries' flags, or ok) when any entry has flags."""
    if any("health_flags" in e for e in entries):
        header.append("health")
        for row, e in zip(rows, entries, strict=True):
            row.append(", ".join(e.get("health_flags", [])) or "ok")
    return header, rows


def table_cells(results: Sequence[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of :func:`format_table`."""
    columns = [c for c in COLUMNS if any(r.get(c[1]) is not None for r in results)]
    header = ["run", *(name for name, _, _ in columns)]
    rows = [
        [r["label"], *(spread_cell(r.get(key), None, fmt) for _, key, fmt in columns)]
        for r in results
    ]
    return _with_health(header, rows, results)


def health_notes(results: Sequence[dict[str, Any]]) -> list[str]:
    """One line per problem of a run (and seed): its cause and the setting to
    change (``loop.health_fields``)."""
    seeds = {r.get("seed") for r in results}
    notes = []
    for r in results:
        where = r["label"] + (f" (seed {r.get('seed')})" if len(seeds) > 1 else "")
        notes += [f"{where}: {problem}" for problem in r.get("health", [])]
    return notes


def with_notes(table: str, results: Sequence[dict[str, Any]]) -> str:
    """``table`` followed by the runs' health notes, if any."""
    notes = health_notes(results)
    if not notes:
        return table
    return "\n".join([table, "", "health:", *(f"  {note}" for note in notes)])


def format_table(results: Sequence[dict[str, Any]]) -> str:
    """A fixed-width table, one row per result."""
    return _layout(*table_cells(results))


def summary_cells(
    summary: Sequence[dict[str, Any]],
) -> tuple[list[str], list[list[str]]]:
    """Header and rows of :func:`format_summary_table`."""
    # Counts (dead features) averaged over seeds keep one decimal.
    columns = [
        (name, key, "{:.1f}" if fmt == "{:.0f}" else fmt)
        for name, key, fmt in COLUMNS
        if any(e.get(key + "_mean") is not None for e in summary)
    ]
    header = ["run", "seeds", *(name for name, _, _ in columns)]
    rows = []
    for e in summary:
        cells = [
            spread_cell(e.get(key + "_mean"), e.get(key + "_std"), fmt)
            for _, key, fmt in columns
        ]
        rows.append([e["label"], str(e["n_seeds"]), *cells])
    return _with_health(header, rows, summary)


def format_summary_table(summary: Sequence[dict[str, Any]]) -> str:
    """A fixed-width table of mean ± std over seeds, one row per run label."""
    return _layout(*summary_cells(summary))


def write_json(payload: dict[str, Any], output: Path) -> Path:
    output.mkdir(parents=True, exist_ok=True)
    path = output / RESULTS_FILENAME
    # Written beside and renamed: a Ctrl-C mid-write leaves the previous file whole.
    partial = path.with_suffix(".json.partial")
    partial.write_text(json.dumps(payload, indent=2) + "\n")
    partial.replace(path)
    return path


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def write_tables(payload: dict[str, Any], output: Path, about: str) -> list[Path]:
    """``table.md`` (the terminal table as markdown, with a title and a legend) and
    ``table.csv`` (one row per run and seed, unrounded) beside results.json."""
    output.mkdir(parents=True, exist_ok=True)
    results, summary = payload["results"], payload["summary"]
    n_seeds = payload["config"]["seeds"]
    if n_seeds > 1:
        cells = summary_cells(summary)
        spread = f"Mean ± standard deviation over {n_seeds} seeds.\n\n"
    else:
        cells = table_cells(results)
        spread = ""
    shown = [c for c in COLUMNS if any(r.get(c[1]) is not None for r in results)]
    legend = [f"- **{name}**: {LEGEND[key]}" for name, key, _ in shown]
    if "health" in cells[0]:
        legend.append(f"- **health**: {HEALTH_LEGEND}")
    notes = health_notes(results)
    markdown = output / TABLE_MARKDOWN
    markdown.write_text(
        f"# compare: {about}\n\n{spread}{markdown_table(*cells)}\n\n"
        + "".join(f"- {note}\n" for note in notes)
        + ("\n" if notes else "")
        + "\n".join(["Columns (- : not measured):", *legend])
        + "\n"
    )
    keys = ["label", "seed", *(key for _, key, _ in shown)]
    table_csv = output / TABLE_CSV
    with table_csv.open("w", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(keys)
        for r in results:
            writer.writerow(["" if r.get(k) is None else r.get(k) for k in keys])
    return [markdown, table_csv]


def write_plots(
    summary: Sequence[dict[str, Any]], output: Path, *, about: str | None = None
) -> list[Path]:
    """EV vs L0 (per-token and batch rule), MCC per run and one
    ``spectrum_<field>.png`` per spectrum (:func:`spectrum_series`), from the
    summary over seeds; ``about`` (the data, k, d_sae and seeds) heads every title.
    Error bars (standard deviation over seeds) are drawn only where a run has
    several seeds; a spectrum has a panel per measured metric.

    Raises ImportError when matplotlib is missing.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    output.mkdir(parents=True, exist_ok=True)
    paths = [_plot_tradeoff(plt, summary, output / TRADEOFF_PLOT, about)]
    if any(e.get("mcc_mean") is not None for e in summary):
        paths.append(_plot_mcc(plt, summary, output / MCC_PLOT, about))
    reference = reference_entry(summary)
    for field, series in spectrum_series(summary).items():
        path = output / f"spectrum_{field}.png"
        paths.append(_plot_spectrum(plt, field, series, reference, path, about))
    return paths


def save_figure(plt: Any, fig: Any, path: Path, dpi: int = 120) -> Path:
    """Lay ``fig`` out, write it to ``path`` and close it."""
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def _title(about: str | None, text: str) -> str:
    return text if about is None else f"{about}\n{text}"


# Explained variances below this are drawn on it (a "v" marker, value printed), so
# that one failed run does not squash the others.
EV_FLOOR = -0.5


def _print_value(ax: Any, x: float, y: float, value: float, color: Any) -> None:
    """``value`` written beside the point ``(x, y)`` it is drawn at (clipped)."""
    ax.annotate(
        f"{value:.1f}",
        (x, y),
        textcoords="offset points",
        xytext=(4, 4),
        fontsize=7,
        color=color,
    )


def _plot_tradeoff(
    plt: Any, summary: Sequence[dict[str, Any]], path: Path, about: str | None
) -> Path:
    fig, ax = plt.subplots(figsize=(8, 5))
    colors = plt.get_cmap("tab10")
    for i, e in enumerate(summary):
        color = colors(i % 10)
        points = {}  # rule -> (mean L0, mean EV drawn at EV_FLOOR or above)
        for rule in ("", "_batch"):
            l0, ev = e.get(f"l0{rule}_mean"), e.get(f"explained_variance{rule}_mean")
            if l0 is None or ev is None:
                continue
            points[rule] = (l0, max(ev, EV_FLOOR))
            ax.scatter(
                *points[rule],
                marker="v" if ev < EV_FLOOR else "o",
                facecolors=color if rule == "" else "none",
                edgecolors=color,
                label=e["label"] if rule == "" else None,
            )
            if ev < EV_FLOOR:
                _print_value(ax, l0, EV_FLOOR, ev, color)
        if len(points) == 2:
            # From the batch rule (training) to per-token inference: the arrow's
            # length is the drift the learned thresholds introduce.
            ax.annotate(
                "",
                xy=points[""],
                xytext=points["_batch"],
                arrowprops={"arrowstyle": "->", "color": color, "alpha": 0.6},
            )
    l0s = [
        e[key] for e in summary for key in ("l0_mean", "l0_batch_mean") if e.get(key)
    ]
    if l0s and max(l0s) > 20 * min(l0s):
        ax.set_xscale("log")
    ax.set_xlabel("L0 (mean active features per token)")
    ax.set_ylabel("explained variance")
    ax.set_title(
        _title(
            about,
            "Explained variance vs L0 (filled: per-token inference, hollow: batch "
            f"rule; v: below {EV_FLOOR})",
        ),
        fontsize=9,
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    return save_figure(plt, fig, path, dpi=120)


def _plot_mcc(
    plt: Any, summary: Sequence[dict[str, Any]], path: Path, about: str | None
) -> Path:
    fig, ax = plt.subplots(figsize=(7.5, 4))
    labels = [e["label"] for e in summary]
    values = [e.get("mcc_mean") or 0.0 for e in summary]
    # A standard deviation exists only over two seeds or more: one seed, no bars.
    spread = any(e.get("mcc_std") is not None for e in summary)
    errors = [e.get("mcc_std") or 0.0 for e in summary] if spread else None
    ax.bar(range(len(labels)), values, yerr=errors, capsize=3, color="tab:blue")
    ax.set_title(_title(about, "MCC with the ground-truth features"), fontsize=9)
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("MCC with ground-truth features")
    ax.set_ylim(0, 1)
    ax.grid(axis="y", alpha=0.3)
    return save_figure(plt, fig, path, dpi=120)


# (title, metrics) of the spectrum panels; a ``_batch`` metric (the batch rule) is
# drawn dashed beside the per-token one.
SPECTRUM_PANELS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("explained variance", ("explained_variance", "explained_variance_batch")),
    ("MCC", ("mcc",)),
    ("absorption", ("absorption", "absorption_batch")),
    ("dead features", ("dead_features", "dead_features_batch")),
)


def _style(name: str) -> tuple[str, str]:
    """Line style and what it shows: dashed for the batch rule."""
    return ("--", "batch rule") if name.endswith("_batch") else ("-", "per token")


def _draw_series(
    ax: Any,
    xs: Sequence[float],
    ys: Sequence[float],
    errs: Sequence[float | None],
    style: str,
    color: Any,
    label: str,
    floor: float | None,
) -> None:
    """Means, with error bars where ``errs`` holds spreads (None: one seed); values
    below ``floor`` drawn on it as "v", printed."""
    shown = [y if floor is None else max(y, floor) for y in ys]
    clipped = [floor is not None and y < floor for y in ys]
    if all(e is None for e in errs):
        ax.plot(xs, shown, style, color=color, label=label)
    else:
        bars = [
            0.0 if c or e is None else e for c, e in zip(clipped, errs, strict=True)
        ]
        ax.errorbar(
            xs, shown, yerr=bars, fmt=style, color=color, capsize=3, label=label
        )
    for x, y, low, c in zip(xs, ys, shown, clipped, strict=True):
        ax.scatter(x, low, marker="v" if c else "o", color=color, zorder=3)
        if c:
            _print_value(ax, x, low, y, color)


def _plot_spectrum(
    plt: Any,
    field: str,
    series: Sequence[SpectrumSeries],
    reference: dict[str, Any] | None,
    path: Path,
    about: str | None = None,
) -> Path:
    # The panels with a value in a series or the reference (activations mode
    # measures neither MCC nor absorption).
    entries = [e for one in series for e in one.entries]
    entries += [reference] if reference is not None else []
    panels = [
        (title, metrics)
        for title, metrics in SPECTRUM_PANELS
        if any(e.get(name + "_mean") is not None for e in entries for name in metrics)
    ]
    fig, axes = plt.subplots(
        1, len(panels), figsize=(4 * len(panels), 4.2), sharex=True, squeeze=False
    )
    colors = plt.get_cmap("tab10")
    all_values = [v for s in series for v in s.values]
    n_seeds = max(e["n_seeds"] for s in series for e in s.entries)
    for ax, (title, metrics) in zip(axes[0], panels, strict=True):
        floor = EV_FLOOR if title == "explained variance" else None
        drawn: list[float] = []
        for i, one in enumerate(series):
            for name in metrics:
                points = [
                    (x, e[name + "_mean"], e.get(name + "_std"))
                    for x, e in zip(one.values, one.entries, strict=True)
                    if e.get(name + "_mean") is not None
                ]
                if not points:
                    continue
                xs, ys, errs = zip(*points, strict=True)
                style, what = _style(name)
                label = one.label if len(metrics) == 1 else f"{one.label}, {what}"
                _draw_series(ax, xs, ys, errs, style, colors(i % 10), label, floor)
                drawn.extend(ys)
        for name in metrics:
            value = reference.get(name + "_mean") if reference else None
            if reference is None or value is None:
                continue
            style, what = _style(name)
            label = reference["label"]
            label += f" ({what})" if len(metrics) > 1 else ""
            ax.axhline(value, color="black", linestyle=style, alpha=0.6, label=label)
            spread = reference.get(name + "_std")
            if spread:
                ax.axhspan(value - spread, value + spread, color="black", alpha=0.08)
            drawn.append(value)
        if floor is not None and drawn and min(drawn) < floor:
            ax.set_ylim(floor - 0.05, max(1.0, *drawn) + 0.05)
        if min(all_values) > 0:
            ax.set_xscale("log")
        # The runs' own values as ticks, written plainly (not as 4 x 10^0).
        ticks = sorted(set(all_values))
        ax.set_xticks(ticks, [f"{v:g}" for v in ticks])
        ax.minorticks_off()
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(field)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, loc="best")
    over = f"mean ± std over {n_seeds} seeds" if n_seeds > 1 else "one seed"
    fig.suptitle(
        _title(about, f"{field} spectrum ({over}; black: reference)"), fontsize=10
    )
    return save_figure(plt, fig, path, dpi=110)
