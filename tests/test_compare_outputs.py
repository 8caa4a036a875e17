"""What ``compare`` writes beside results.json: titled plots without error bars for
one seed and with panels only for measured metrics, table.md with a legend,
table.csv; and docs/compare.md's table of the default runs."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import pytest

from sae_lens_sampled.benchmark.compare import describe
from sae_lens_sampled.benchmark.report import write_plots, write_tables
from sae_lens_sampled.benchmark.specs import DEFAULT_RUNS
from sae_lens_sampled.benchmark.summary import summarize

DOCS = Path(__file__).resolve().parents[1] / "docs"
ABOUT = "synthetic data 'default'; k=2, d_sae=32, 4 steps, seed 0"


def result(label: str, seed: int, params: dict, **metrics) -> dict:
    architecture = label.partition(":")[0]
    return {"label": label, "architecture": architecture, "seed": seed,
            "params": {**params, "k": 2.0, "d_sae": 32}, **metrics}  # fmt: skip


def results(seeds: list[int], mcc: bool) -> list[dict]:
    rows = []
    for seed in seeds:
        for label, params in (
            ("batchtopk", {}),
            ("sampled:pool_factor=4", {"pool_factor": 4}),
            ("sampled:pool_factor=16", {"pool_factor": 16}),
        ):
            metrics = {"l0": 2.5 + seed, "explained_variance": 0.5 + 0.1 * seed,
                       "l0_batch": 2.0, "explained_variance_batch": 0.6,
                       "dead_features": 3 + seed, "dead_features_batch": 1}  # fmt: skip
            if mcc:
                metrics["mcc"] = 0.6 + 0.05 * seed
            rows.append(result(label, seed, params, **metrics))
    return rows


@pytest.fixture
def figures(monkeypatch):
    """The figures write_plots makes, kept open for inspection."""
    pytest.importorskip("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    close = plt.close
    monkeypatch.setattr(plt, "close", made.append)
    yield made
    for figure in made:
        close(figure)


def title(figure) -> str:
    texts = [figure._suptitle] if figure._suptitle is not None else []
    texts += [ax.title for ax in figure.axes]
    return "\n".join(t.get_text() for t in texts)


def error_bars(figure) -> int:
    from matplotlib.container import ErrorbarContainer

    # ax.bar(yerr=...) and ax.errorbar both add an ErrorbarContainer.
    containers = [c for ax in figure.axes for c in ax.containers]
    return sum(isinstance(c, ErrorbarContainer) for c in containers)


def test_plots_are_titled_and_have_no_error_bars_for_one_seed(figures, tmp_path):
    paths = write_plots(summarize(results([0], mcc=True)), tmp_path, about=ABOUT)
    assert [p.name for p in paths] == ["ev_vs_l0.png", "mcc.png",
                                       "spectrum_pool_factor.png"]  # fmt: skip
    assert len(figures) == 3
    for figure in figures:
        assert ABOUT in title(figure)
        assert error_bars(figure) == 0
    assert "one seed" in title(figures[2])


def test_plots_have_error_bars_over_several_seeds(figures, tmp_path):
    write_plots(summarize(results([0, 1], mcc=True)), tmp_path, about=ABOUT)
    _, mcc, spectrum = figures
    assert error_bars(mcc) == 1
    assert error_bars(spectrum) > 0
    assert "mean ± std over 2 seeds" in title(spectrum)


def test_spectrum_has_panels_only_for_what_was_measured(figures, tmp_path):
    # Activations mode: no ground truth, so no MCC and no absorption panel.
    paths = write_plots(summarize(results([0], mcc=False)), tmp_path, about=ABOUT)
    assert [p.name for p in paths] == ["ev_vs_l0.png", "spectrum_pool_factor.png"]
    panels = [ax.get_title() for ax in figures[1].axes]
    assert panels == ["explained variance", "dead features"]


def test_tables_beside_results_have_a_title_and_a_legend(tmp_path):
    rows = results([0], mcc=True)
    rows[1]["health_flags"] = ["L0 +25%"]
    rows[1]["health"] = ["per-token L0 2.50 is +25% off k=2: ..."]
    for row in (rows[0], rows[2]):
        row["health_flags"], row["health"] = [], []
    payload = {"mode": "synthetic", "data": {}, "results": rows,
               "summary": summarize(rows),
               "config": {"seeds": 1, "seed": 0, "k": 2.0, "d_sae": 32,
                          "steps": 4, "data": "default"}}  # fmt: skip
    assert describe(payload) == ABOUT
    markdown, table_csv = write_tables(payload, tmp_path, describe(payload))
    text = markdown.read_text()
    assert text.startswith(f"# compare: {ABOUT}\n\n| run | L0 | L0 batch | EV |")
    assert "| sampled:pool_factor=4 | 2.50 | 2.00 | 0.500 |" in text
    assert "| L0 +25% |" in text and "| ok |" in text
    assert "- sampled:pool_factor=4: per-token L0 2.50 is +25% off k=2" in text
    for name in ("L0", "L0 batch", "EV", "EV batch", "dead", "dead batch", "MCC",
                 "health"):  # fmt: skip
        assert f"- **{name}**: " in text
    assert "- **F1**" not in text  # not measured, not listed
    with table_csv.open() as handle:
        table = list(csv.reader(handle))
    assert table[0][:4] == ["label", "seed", "l0", "l0_batch"]
    assert table[1][:4] == ["batchtopk", "0", "2.5", "2.0"]
    assert len(table) == 1 + len(rows)


def test_compare_doc_lists_the_default_runs_in_one_table():
    text = (DOCS / "compare.md").read_text()
    start = text.index("| run | what |")
    block = text[start : text.index("\n\n", start)].splitlines()
    listed = [re.match(r"\| `([^`]+)` \|", line).group(1) for line in block[2:]]
    assert listed == [spec.label for spec in DEFAULT_RUNS]


def test_summary_merges_the_seeds_health_flags_per_problem():
    rows = results([0, 1, 2], mcc=False)
    for row in rows:
        row["health_flags"] = []
    seeds_of_first = [row for row in rows if row["label"] == rows[0]["label"]]
    seeds_of_first[0]["health_flags"] = ["MSE rising", "L0 +941%"]
    seeds_of_first[1]["health_flags"] = ["L0 +921%"]
    seeds_of_first[2]["health_flags"] = ["MSE rising", "L0 -30%"]
    first, *others = summarize(rows)
    assert first["health_flags"] == ["MSE rising", "L0 -30% to +941%"]
    assert [e["health_flags"] for e in others] == [[], []]
    seeds_of_first[1]["health_flags"] = seeds_of_first[2]["health_flags"] = ["L0 +941%"]
    assert summarize(rows)[0]["health_flags"] == ["MSE rising", "L0 +941%"]
