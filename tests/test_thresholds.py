"""Threshold EMAs, calibration and JumpReLU export."""

import math

import torch
from sae_lens import SAE, JumpReLUSAE
from sae_lens.saes.sae import TrainStepInput

from sae_lens_sampled import (
    MutualChoiceTrainingSAE,
    MutualChoiceTrainingSAEConfig,
    SampledTrainingSAE,
    SampledTrainingSAEConfig,
    calibrate_thresholds,
    export_jumprelu,
)
from sae_lens_sampled.thresholds import (
    column_stats_dense,
    thresholds_matching_counts,
    update_firing_rate,
    update_global_threshold,
    update_per_feature_threshold,
)

ACTS = torch.tensor([[0.0, 2.0, 0.0], [0.5, 3.0, 0.0]])
INF = math.inf


def test_column_stats_dense():
    counts, smallest = column_stats_dense(ACTS)
    assert counts.tolist() == [1, 2, 0]
    assert smallest.tolist() == [0.5, 2.0, INF]


def test_global_update_uses_smallest_positive_entry():
    _, smallest = column_stats_dense(ACTS)
    threshold = torch.zeros(3, dtype=torch.float64)
    out = update_global_threshold(threshold, smallest, lr=0.1)
    assert torch.allclose(out, torch.full((3,), 0.05, dtype=torch.float64))
    # a batch with nothing selected leaves it alone
    nothing = torch.full((3,), INF)
    assert torch.equal(update_global_threshold(out, nothing, 0.1), out)
    # the first sighting sets an unset (inf) threshold outright
    unset = torch.full((3,), INF, dtype=torch.float64)
    assert update_global_threshold(unset, smallest, lr=0.1).tolist() == [0.5] * 3


def test_per_feature_update_first_sighting_then_ema():
    _, smallest = column_stats_dense(ACTS)
    threshold = torch.tensor([INF, 1.0, 7.0], dtype=torch.float64)
    out = update_per_feature_threshold(threshold, smallest, lr=0.5)
    # feature 0 first seen -> set to 0.5; feature 1 EMA of 1.0 and 2.0; 2 untouched
    assert out.tolist() == [0.5, 1.5, 7.0]


def test_firing_rate_is_running_mean_then_ema():
    def step(rate, acts, seen):
        counts, _ = column_stats_dense(acts)
        seen = torch.tensor(float(seen), dtype=torch.float64)
        return update_firing_rate(rate, counts, acts.shape[0], seen, horizon_tokens=4)

    rate = step(torch.zeros(3, dtype=torch.float64), ACTS, 2)
    assert rate.tolist() == [0.5, 1.0, 0.0]
    rate = step(rate, torch.zeros(2, 3), 4)
    assert rate.tolist() == [0.25, 0.5, 0.0]  # running mean over 4 tokens
    rate = step(rate, torch.ones(2, 3), 6)
    assert rate.tolist() == [0.625, 0.75, 0.5]  # EMA weight 2/4 past the horizon
    assert torch.equal(step(rate, torch.zeros(0, 3), 6), rate)  # empty batch


def test_thresholds_matching_counts():
    hidden = torch.tensor([[3.0, 1.0, 0.2], [2.0, 5.0, 0.1], [1.0, 4.0, 0.3]])
    counts = torch.tensor([2, 0, 3])
    out = thresholds_matching_counts(hidden, counts)
    assert out.tolist() == [1.0, INF, -INF]
    assert ((hidden > out.float()).sum(dim=0) == counts).all()


def trained_sae(cls, cfg_cls, **fields):
    sae = cls(cfg_cls(d_in=8, d_sae=32, k=3, **fields))
    with torch.no_grad():
        sae.W_dec.mul_(torch.rand(32, 1) * 2 + 0.2)
        sae.b_enc.normal_(0, 0.1)
    for _ in range(3):
        sae.training_forward_pass(
            TrainStepInput(
                sae_in=torch.randn(64, 8),
                coefficients={},
                dead_neuron_mask=torch.zeros(32, dtype=torch.bool),
                n_training_steps=0,
                is_logging_step=False,
            )
        )
    return sae


def test_calibration_reproduces_batch_rule_firing_counts():
    sae = trained_sae(
        MutualChoiceTrainingSAE,
        MutualChoiceTrainingSAEConfig,
        threshold_mode="per_feature",
    )
    batches = [torch.randn(128, 8) for _ in range(2)]
    thresholds = calibrate_thresholds(sae, batches)
    assert torch.equal(sae.running_threshold, thresholds)
    batch_counts = sum((sae.encode_batch(b) > 0).sum(dim=0) for b in batches)
    sae.eval()
    token_counts = sum((sae.encode(b) > 0).sum(dim=0) for b in batches)
    assert torch.equal(token_counts, batch_counts)


def test_calibration_works_on_inference_sae(tmp_path):
    sae = trained_sae(SampledTrainingSAE, SampledTrainingSAEConfig, pool_seed=0)
    sae.save_inference_model(tmp_path)
    loaded = SAE.load_from_disk(tmp_path)
    batch = torch.randn(256, 8)
    calibrate_thresholds(loaded, [batch])
    loaded.n_batch_draws = 0  # the calibration's seeded pool draw, once more
    assert torch.equal(
        (loaded.encode(batch) > 0).sum(dim=0), (loaded.encode_batch(batch) > 0).sum(0)
    )


def test_export_jumprelu_matches_plugin_encode(tmp_path):
    sae = trained_sae(SampledTrainingSAE, SampledTrainingSAEConfig, pool_seed=0)
    exported = export_jumprelu(sae, tmp_path / "jumprelu")
    assert type(exported) is JumpReLUSAE
    reloaded = SAE.load_from_disk(tmp_path / "jumprelu")
    assert type(reloaded) is JumpReLUSAE
    x = torch.randn(4, 6, 8)
    sae.eval()
    expected = sae.encode(x)
    assert (expected != 0).any()
    torch.testing.assert_close(exported.encode(x), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(reloaded.encode(x), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(
        reloaded.decode(reloaded.encode(x)), sae.decode(expected), rtol=1e-5, atol=1e-5
    )
