"""``compare --seeds``: summaries over seeds, the spectrum grouping and its plot."""

from __future__ import annotations

import json
import math

import pytest

from sae_lens_sampled.benchmark import RunSpec, run_compare
from sae_lens_sampled.benchmark.metrics import SUMMARY_METRICS
from sae_lens_sampled.benchmark.report import format_summary_table, write_plots
from sae_lens_sampled.benchmark.summary import (
    reference_entry,
    spectrum_series,
    summarize,
)

TIMING = ("train_seconds", "tokens_per_second")


def result(label: str, seed: int, **metrics: float | None) -> dict:
    architecture, _, _ = label.partition(":")
    return {
        "label": label,
        "architecture": architecture,
        "params": {},
        "seed": seed,
        **metrics,
    }


def test_summarize_gives_mean_and_sample_std_per_label_over_defined_seeds():
    results = [
        result("a", 0, l0=2.0, explained_variance=0.5, mcc=None),
        result("b", 0, l0=1.0, explained_variance=0.9),
        result("a", 1, l0=4.0, explained_variance=None, mcc=None),
        result("a", 2, l0=6.0, explained_variance=0.7, mcc=None),
    ]
    a, b = summarize(results)
    assert (a["label"], a["n_seeds"], a["seeds"]) == ("a", 3, [0, 1, 2])
    assert (a["l0_mean"], a["l0_std"]) == (4.0, 2.0)
    # Over the seeds that define it (0 and 2).
    assert a["explained_variance_mean"] == pytest.approx(0.6)
    assert a["explained_variance_std"] == pytest.approx(math.sqrt(0.02))
    assert (a["mcc_mean"], a["mcc_std"]) == (None, None)
    assert (b["n_seeds"], b["l0_mean"], b["l0_std"]) == (1, 1.0, None)
    for name in ("absorption", "dead_features", "explained_variance_batch", "mcc"):
        assert name in SUMMARY_METRICS
        assert name + "_mean" in a and name + "_std" in a


def test_summary_table_shows_mean_plus_minus_std():
    summary = summarize(
        [
            result("a", 0, l0=2.0, dead_features=1),
            result("a", 1, l0=4.0, dead_features=2),
            result("b", 0, l0=3.0, dead_features=None),
        ]
    )
    lines = format_summary_table(summary).splitlines()
    assert lines[0].split() == ["run", "seeds", "L0", "dead"]
    assert lines[2].split() == ["a", "2", "3.00", "±", "1.41", "1.5", "±", "0.7"]
    assert lines[3].split() == ["b", "1", "3.00", "-"]


def without_timing(results: list[dict]) -> list[dict]:
    # sae_dir: only a comparison with an output directory saves SAEs.
    dropped = {*TIMING, "sae_dir"}
    return [{k: v for k, v in r.items() if k not in dropped} for r in results]


def test_seeds_repeat_every_run_and_each_seed_is_its_own_run(tmp_path, capsys):
    settings = {
        "runs": [RunSpec("topk"), RunSpec("batchtopk")],
        "k": 4,
        "d_sae": 64,
        "steps": 8,
        "batch_size": 256,
        "eval_samples": 1024,
        "plots": False,
    }
    payload = run_compare(seeds=2, output=str(tmp_path), **settings)
    results = payload["results"]
    assert [(r["label"], r["seed"]) for r in results] == [
        ("topk", 0),
        ("batchtopk", 0),
        ("topk", 1),
        ("batchtopk", 1),
    ]
    # Seed 1 of the repeat is exactly a run with seed 1 alone: a seed fixes the
    # data, the initialisation and the training stream.
    alone = run_compare(seed=1, output=None, **settings)["results"]
    assert without_timing(results[2:]) == without_timing(alone)
    assert results[0]["mcc"] != results[2]["mcc"]
    summary = payload["summary"]
    assert [(e["label"], e["n_seeds"]) for e in summary] == [
        ("topk", 2),
        ("batchtopk", 2),
    ]
    for entry, first, second in zip(summary, results[:2], results[2:], strict=True):
        for name in ("explained_variance", "l0", "mcc", "dead_features", "absorption"):
            values = [first[name], second[name]]
            assert entry[name + "_mean"] == pytest.approx(sum(values) / 2)
            assert entry[name + "_std"] == pytest.approx(
                abs(values[0] - values[1]) / math.sqrt(2)
            )
    out = capsys.readouterr().out
    assert "mean ± std over 2 seeds (0, 1)" in out
    assert " ± " in out
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["summary"] == json.loads(json.dumps(summary))
    assert saved["config"]["seeds"] == 2
    for seed in (0, 1):
        assert len(list((tmp_path / "saes" / f"seed{seed}").glob("*/cfg.json"))) == 2


def entry(label: str, params: dict, **means: float) -> dict:
    architecture = label.partition(":")[0]
    row = {"label": label, "architecture": architecture, "params": params}
    row["n_seeds"] = 3
    for name, value in means.items():
        row[name + "_mean"] = value
        row[name + "_std"] = 0.01
    return row


SHARED = {"k": 6.0, "d_sae": 256}


def spectrum_summary() -> list[dict]:
    return [
        entry("topk", {"k": 6, "d_sae": 256}, explained_variance=0.9),
        entry("batchtopk", {"k": 6.0, "d_sae": 256}, explained_variance=0.8, mcc=0.8),
        entry(
            "sampled:pool_factor=16,score=l2",
            {"pool_factor": 16, "score": "l2", **SHARED},
            explained_variance=0.5,
            mcc=0.7,
        ),
        entry(
            "sampled:pool_factor=1,score=l2",
            {"pool_factor": 1, "score": "l2", **SHARED},
            explained_variance=0.1,
            mcc=0.4,
        ),
        entry(
            "sampled:pool_factor=4.0,score=l2",
            {"pool_factor": 4.0, "score": "l2", **SHARED},
            explained_variance=0.3,
            mcc=0.6,
        ),
        entry(
            "sampled:pool_factor=16,score=entropy",
            {"pool_factor": 16, "score": "entropy", **SHARED},
            explained_variance=0.45,
        ),
        # Differs from the l2 runs in two fields: in no series.
        entry(
            "sampled:pool_factor=8,score=entropy,pool_mode=top",
            {"pool_factor": 8, "score": "entropy", "pool_mode": "top", **SHARED},
        ),
        # A boolean setting is not a spectrum.
        entry("feature_choice:flag=true", {"flag": True, **SHARED}),
        entry("feature_choice:flag=false", {"flag": False, **SHARED}),
        # Two values of k: a k spectrum.
        entry("mutual_choice:k=4", {**SHARED, "k": 4}),
        entry("mutual_choice:k=8", {**SHARED, "k": 8}),
    ]


def test_spectrum_series_groups_runs_differing_in_one_numeric_field():
    found = spectrum_series(spectrum_summary())
    assert sorted(found) == ["k", "pool_factor"]
    (pool,) = found["pool_factor"]
    assert pool.architecture == "sampled"
    assert pool.values == [1.0, 4.0, 16.0]  # sorted, ints and floats alike
    assert [e["explained_variance_mean"] for e in pool.entries] == [0.1, 0.3, 0.5]
    assert pool.fixed == {"score": "l2", **SHARED}
    assert pool.label == "sampled (score=l2)"
    (k,) = found["k"]
    assert (k.architecture, k.values, k.label) == (
        "mutual_choice",
        [4.0, 8.0],
        "mutual_choice",
    )
    assert reference_entry(spectrum_summary())["label"] == "batchtopk"
    # One value per field is no spectrum.
    assert spectrum_series(spectrum_summary()[:3]) == {}


def test_write_plots_draws_one_spectrum_per_field(tmp_path):
    pytest.importorskip("matplotlib")
    paths = write_plots(spectrum_summary(), tmp_path)
    names = [p.name for p in paths]
    assert names == [
        "ev_vs_l0.png",
        "mcc.png",
        "spectrum_pool_factor.png",
        "spectrum_k.png",
    ]
    for path in paths:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
