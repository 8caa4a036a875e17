"""The absorption study script: one short run per rule, and the table."""

from __future__ import annotations

import pytest

from experiments.absorption_study import (
    format_study_table,
    mean_std,
    study_run,
)


def test_study_run_scores_both_encodes():
    record = study_run(
        "batchtopk", seed=0, steps=3, eval_samples=2048, data="toy", k=3, d_sae=64
    )
    assert record["label"] == "batchtopk"
    per_token, batch = record["per_token"], record["batch_rule"]
    # The batch rule keeps exactly k x B entries of each 1024-token batch.
    assert batch["l0"] == pytest.approx(3.0)
    for scores in (per_token, batch):
        assert 0.0 <= scores["absorption"] <= 1.0
        assert scores["absorption_fraction"] >= scores["absorption"]
        assert len(scores["per_parent"]) == 8


def test_per_token_rules_have_no_batch_rule_row():
    record = study_run(
        "topk", seed=0, steps=3, eval_samples=1024, data="toy", k=3, d_sae=64
    )
    assert record["batch_rule"] is None
    assert record["per_token"]["l0"] <= 3.0
    table = format_study_table([record])
    assert "topk (n=1) | per token" in table
    assert "batch rule" not in table


def test_mean_std():
    assert mean_std([0.1, 0.3]) == "0.200 ± 0.141"
    assert mean_std([None, 0.5]) == "0.500"
    assert mean_std([None]) == "-"
