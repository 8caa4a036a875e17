"""Output of ``compare``: terminal table, results.json and PNG plots."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

RESULTS_FILENAME = "results.json"
TRADEOFF_PLOT = "ev_vs_l0.png"
MCC_PLOT = "mcc.png"

# (header, result key, format) of the terminal table.
COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("L0", "l0", "{:.2f}"),
    ("L0 batch", "l0_batch", "{:.2f}"),
    ("L0 calib", "l0_calibrated", "{:.2f}"),
    ("EV", "explained_variance", "{:.3f}"),
    ("EV batch", "explained_variance_batch", "{:.3f}"),
    ("EV calib", "explained_variance_calibrated", "{:.3f}"),
    ("dead", "dead_features", "{:d}"),
    ("dead batch", "dead_features_batch", "{:d}"),
    ("MCC", "mcc", "{:.3f}"),
    ("F1", "f1", "{:.3f}"),
    ("CE score", "ce_loss_score", "{:.3f}"),
    ("tok/s", "tokens_per_second", "{:,.0f}"),
)


def _cell(value: Any, fmt: str) -> str:
    if value is None:
        return "-"
    if fmt.endswith("d}"):
        value = int(value)
    return fmt.format(value)


def format_table(results: Sequence[dict[str, Any]]) -> str:
    """A fixed-width table, one row per run; columns empty in every row are left out."""
    columns = [c for c in COLUMNS if any(r.get(c[1]) is not None for r in results)]
    header = ["run", *(name for name, _, _ in columns)]
    rows = [
        [r["label"], *(_cell(r.get(key), fmt) for _, key, fmt in columns)]
        for r in results
    ]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        first = cells[0].ljust(widths[0])
        rest = (
            cell.rjust(width) for cell, width in zip(cells[1:], widths[1:], strict=True)
        )
        return "  ".join([first, *rest])

    rule = "-" * len(line(header))
    return "\n".join([line(header), rule, *(line(row) for row in rows)])


def write_json(payload: dict[str, Any], output: Path) -> Path:
    output.mkdir(parents=True, exist_ok=True)
    path = output / RESULTS_FILENAME
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path


def write_plots(results: Sequence[dict[str, Any]], output: Path) -> list[Path]:
    """EV vs L0 (per-token and batch rule) and MCC per run; needs matplotlib.

    Raises ImportError when matplotlib is missing.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    output.mkdir(parents=True, exist_ok=True)
    paths = [_plot_tradeoff(plt, results, output / TRADEOFF_PLOT)]
    if any(r.get("mcc") is not None for r in results):
        paths.append(_plot_mcc(plt, results, output / MCC_PLOT))
    return paths


# Explained variances below this are drawn on it (a "v" marker, value printed), so
# that one failed run does not squash the others.
EV_FLOOR = -0.5


def _point(r: dict[str, Any], l0_key: str, ev_key: str) -> tuple[float, float] | None:
    if r.get(l0_key) is None or r.get(ev_key) is None:
        return None
    return r[l0_key], r[ev_key]


def _draw(
    ax: Any,
    point: tuple[float, float],
    color: Any,
    *,
    filled: bool,
    label: str | None = None,
) -> None:
    l0, ev = point
    clipped = ev < EV_FLOOR
    ax.scatter(
        l0,
        max(ev, EV_FLOOR),
        marker="v" if clipped else "o",
        facecolors=color if filled else "none",
        edgecolors=color,
        label=label,
    )
    if clipped:
        ax.annotate(
            f"{ev:.1f}",
            (l0, EV_FLOOR),
            textcoords="offset points",
            xytext=(4, 4),
            fontsize=7,
            color=color,
        )


def _plot_tradeoff(plt: Any, results: Sequence[dict[str, Any]], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(8, 5))
    colors = plt.get_cmap("tab10")
    for i, r in enumerate(results):
        color = colors(i % 10)
        token = _point(r, "l0", "explained_variance")
        batch = _point(r, "l0_batch", "explained_variance_batch")
        if token is not None:
            _draw(ax, token, color, filled=True, label=r["label"])
        if batch is not None:
            _draw(ax, batch, color, filled=False)
        if token is not None and batch is not None:
            # From the batch rule (training) to per-token inference: the arrow's
            # length is the drift the learned thresholds introduce.
            ax.annotate(
                "",
                xy=(token[0], max(token[1], EV_FLOOR)),
                xytext=(batch[0], max(batch[1], EV_FLOOR)),
                arrowprops={"arrowstyle": "->", "color": color, "alpha": 0.6},
            )
    l0s = [r[key] for r in results for key in ("l0", "l0_batch") if r.get(key)]
    if l0s and max(l0s) > 20 * min(l0s):
        ax.set_xscale("log")
    ax.set_xlabel("L0 (mean active features per token)")
    ax.set_ylabel("explained variance")
    ax.set_title(
        "Explained variance vs L0\n(filled: per-token inference, hollow: batch rule; "
        f"v: below {EV_FLOOR})",
        fontsize=10,
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _plot_mcc(plt: Any, results: Sequence[dict[str, Any]], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(7.5, 4))
    labels = [r["label"] for r in results]
    values = [r["mcc"] if r.get("mcc") is not None else 0.0 for r in results]
    ax.bar(range(len(labels)), values, color="tab:blue")
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("MCC with ground-truth features")
    ax.set_ylim(0, 1)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
