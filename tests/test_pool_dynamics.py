"""The per-step pool trace behind docs/sampled.md's "Why the loss does not fall"."""

import json

import numpy as np

from experiments.pool_dynamics import main


def test_trace_of_a_whole_and_a_small_pool(tmp_path):
    acts = np.random.default_rng(0).standard_normal((2048, 8)).astype("float32")
    np.save(tmp_path / "acts.npy", acts)
    out = tmp_path / "out"
    status = main(
        [
            "--activations", str(tmp_path / "acts.npy"), "--d-sae", "32", "--k", "2",
            "--steps", "6", "--batch-size", "128", "--no-plots", "--output", str(out),
            "--architectures",
            "sampled:pool_fraction=1.0,pool_seed=0,sampled:pool_factor=2,pool_seed=0",
        ]
    )  # fmt: skip
    assert status == 0
    payload = json.loads((out / "pool_dynamics.json").read_text())
    whole, small = payload["steps"]
    assert len(whole["steps"]) == len(small["steps"]) == 6
    # a pool of every feature: nothing churns and the pool holds all of the mass
    for step in whole["steps"]:
        assert step["churn"] == 0.0
        assert step["mass_in_pool"] == 1.0 == step["batchtopk_in_pool"]
        assert step["mse"] > 0
    assert payload["pooled_share"][0] == [1.0] * 32
    # a pool of 4 of 32 features: each step pools exactly 4, so the shares add to 4
    assert abs(sum(payload["pooled_share"][1]) - 4.0) < 1e-9
    for step in small["steps"][1:]:
        assert 0.0 <= step["churn"] <= 1.0
        assert step["mass_in_pool"] < 1.0
    summary = payload["summaries"][1]
    assert summary["steps"] == 6
    assert summary["features_never_pooled"] == sum(
        share == 0 for share in payload["pooled_share"][1]
    )
