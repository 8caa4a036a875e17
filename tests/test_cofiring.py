"""The co-firing measurement (``experiments/cofiring.py``): by hand, and on a compare run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from experiments.cofiring import (
    cofiring_totals,
    main,
    similar_rows,
    study,
)
from sae_lens_sampled.benchmark import RunSpec, run_compare


def test_similar_rows_compares_directions_not_lengths():
    W_dec = torch.tensor([[1.0, 0.0], [3.0, 0.1], [0.0, 2.0], [0.0, 0.0], [-1.0, 0.0]])
    similar = similar_rows(W_dec, 0.5)
    expected = torch.zeros(5, 5, dtype=torch.bool)
    expected[0, 1] = expected[1, 0] = True  # same direction, other length
    assert torch.equal(similar, expected)  # no diagonal, zero row similar to none


def test_cofiring_totals_by_hand():
    similar = similar_rows(torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]), 0.5)
    codes = torch.tensor([[1.0, 2.0, 0.0], [1.0, 0.0, 3.0], [0.0, 0.0, 0.0]])
    b_dec = torch.tensor([1.0, 1.0])
    x = torch.tensor([[4.0, 5.0], [1.0, 3.0], [2.0, 1.0]])  # centred lengths 5, 2, 1
    recon = torch.tensor([[7.0, 9.0], [1.0, 2.0], [1.0, 1.0]])  # 10, 1, 0
    totals = cofiring_totals(x, codes, recon, b_dec, similar)
    assert totals.n_tokens == 3
    assert totals.fired == 4  # 2 + 2 + 0
    assert totals.similar_pairs == 1  # features 0 and 1 on the first token only
    assert totals.length_ratio == pytest.approx(10 / 5 + 1 / 2 + 0 / 1)
    assert totals.means() == pytest.approx(
        {"l0": 4 / 3, "similar_pairs": 1 / 3, "length_ratio": 2.5 / 3}
    )
    assert (totals + totals).means() == pytest.approx(totals.means())


def compare_run(tmp_path: Path, seeds: int) -> Path:
    rows = torch.randn(1_536, 16, generator=torch.Generator().manual_seed(0))
    path = tmp_path / "acts.npy"
    np.save(path, rows.numpy())
    run_compare(
        activations=str(path),
        runs=[RunSpec("mutual_choice"), RunSpec("sampled", {"pool_factor": 2.0})],
        k=3,
        d_sae=32,
        steps=8,
        batch_size=128,
        eval_samples=256,
        seeds=seeds,
        plots=False,
        output=str(tmp_path / "results"),
    )
    return tmp_path / "results"


@pytest.mark.parametrize("seeds", [1, 2])
def test_study_reads_every_saved_run_and_matches_compare(tmp_path, seeds):
    results_dir = compare_run(tmp_path, seeds)
    rows = study(results_dir)
    labels = ["mutual_choice", "sampled:pool_factor=2.0"]
    assert [(r["run"], r["encode"]) for r in rows] == [
        (label, encode) for label in labels for encode in ("per_token", "batch_rule")
    ]
    assert all(r["n"] == seeds for r in rows)
    results = json.loads((results_dir / "results.json").read_text())["results"]
    for label in labels:
        per_token = next(
            r for r in rows if r["run"] == label and r["encode"] == "per_token"
        )
        l0s = [r["l0"] for r in results if r["label"] == label]
        # The same SAEs on the same eval rows as compare's per-token column.
        assert per_token["l0"] == pytest.approx(sum(l0s) / len(l0s), rel=1e-5)
        batch = next(
            r for r in rows if r["run"] == label and r["encode"] == "batch_rule"
        )
        assert batch["l0"] == pytest.approx(3.0)
        assert batch["length_ratio"] > 0
    assert study(results_dir) == rows  # batch-rule draws are seeded


def test_cli_writes_the_table_and_json(tmp_path, capsys):
    results_dir = compare_run(tmp_path, 1)
    capsys.readouterr()  # compare's own output
    assert main([str(results_dir), "--json", str(tmp_path / "rows.json")]) == 0
    table = capsys.readouterr().out
    assert table.startswith("| run | encode | L0 | length ratio | similar pairs |")
    assert "| sampled:pool_factor=2.0 | batch_rule | 3.000 ± 0.000 |" in table
    assert len(json.loads((tmp_path / "rows.json").read_text())) == 4


def test_synthetic_results_and_bad_cosine_are_refused(tmp_path):
    (tmp_path / "results.json").write_text(json.dumps({"mode": "synthetic"}))
    with pytest.raises(ValueError, match="mode is 'synthetic'"):
        study(tmp_path)
    with pytest.raises(SystemExit):
        main([str(tmp_path), "--cosine", "1.5"])
