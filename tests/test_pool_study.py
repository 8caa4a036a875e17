"""The pool-study tools: the ground-truth pool ceiling and the training trace."""

import pytest
import torch
from sae_lens.training.sae_trainer import SAETrainer

from experiments.pool_study import (
    PoolRule,
    ceiling_explained_variance,
    format_traces,
    traced_compare,
    tracing,
)
from sae_lens_sampled.benchmark.specs import parse_run_specs

# 4 tokens, 4 orthonormal features, one active per token with values 1..4: the
# total variance is 0.75 * (1 + 4 + 9 + 16) = 22.5 (each column holds one value).
ACTS = torch.diag(torch.tensor([1.0, 2.0, 3.0, 4.0]))
VECTORS, BIAS = torch.eye(4), torch.zeros(4)


@pytest.mark.parametrize(
    ("k", "rule", "expected"),
    [
        (1.0, PoolRule(), 1.0),  # budget 4 keeps everything
        (0.5, PoolRule(), 1 - 5 / 22.5),  # budget 2 keeps 4 and 3
        # one feature in the pool (the largest l2, feature 3): only the 4 is kept
        (0.5, PoolRule(2.0, "l2", "top"), 1 - 14 / 22.5),
        # a pool of every feature is BatchTopK
        (0.5, PoolRule(8.0, "l2", "sample"), 1 - 5 / 22.5),
    ],
)
def test_ceiling_by_hand(k, rule, expected):
    value = ceiling_explained_variance([ACTS], VECTORS, BIAS, k, rule)
    assert value == pytest.approx(expected)


def test_ceiling_rule_labels():
    assert PoolRule().label == "batchtopk"
    assert PoolRule(4.0, "entropy", "top").label == "l=4 entropy top"
    assert PoolRule(4.0, "l2", "sample", 2.0).label == "l=4 l2 sample beta=2"


def test_traced_compare_records_every_step_and_restores_the_trainer(tmp_path):
    original_step = SAETrainer._train_step
    original_clip = torch.nn.utils.clip_grad_norm_
    steps = 12
    payload = traced_compare(
        runs=parse_run_specs(
            "batchtopk,sampled:pool_factor=2,pool_mode=top,aux_loss=none"
        ),
        k=2,
        d_sae=32,
        steps=steps,
        batch_size=128,
        eval_samples=256,
        output=str(tmp_path),
        plots=False,
    )
    assert SAETrainer._train_step is original_step
    assert torch.nn.utils.clip_grad_norm_ is original_clip
    batchtopk, sampled = (result["trace"] for result in payload["results"])
    for trace in (batchtopk, sampled):
        assert trace["steps"] == steps
        assert 0 <= trace["clipped_share"] <= 1
    assert "pool_churn" not in batchtopk
    assert 0 <= sampled["pool_churn"] <= 1
    # a top pool of 4 of 32 features for 12 steps leaves most never pooled
    assert 4 <= 32 - sampled["features_never_pooled"] <= 4 * steps
    assert sampled["aux_over_mse_early"] == 0  # aux_loss=none
    assert "pool_churn" in (tmp_path / "results.json").read_text()
    assert "sampled:pool_factor=2" in format_traces(payload["results"])


def test_tracing_restores_the_trainer_on_error():
    original_step = SAETrainer._train_step
    with pytest.raises(RuntimeError), tracing():
        raise RuntimeError
    assert SAETrainer._train_step is original_step


def test_rule_encoder_reproduces_the_batch_rules():
    from experiments.pool_study import RuleEncoder
    from sae_lens_sampled import (
        MutualChoiceSAE,
        MutualChoiceSAEConfig,
        SampledSAE,
        SampledSAEConfig,
    )

    generator = torch.Generator().manual_seed(0)
    cfg = MutualChoiceSAEConfig(d_in=8, d_sae=32, k=2)
    sae = MutualChoiceSAE(cfg)
    with torch.no_grad():
        for param in sae.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
        sae.threshold.zero_()
    x = torch.randn(16, 8, generator=generator)
    encoder = RuleEncoder(sae, PoolRule(), torch.Generator())
    assert torch.equal(encoder(x), sae.encode_batch(x))
    # a top pool as a Sampled-SAE with the same weights would select it
    sampled = SampledSAE(
        SampledSAEConfig(d_in=8, d_sae=32, k=2, pool_factor=3, pool_mode="top")
    )
    sampled.load_state_dict(sae.state_dict())
    top = RuleEncoder(sae, PoolRule(3.0, "l2", "top"), torch.Generator())
    assert torch.equal(top(x), sampled.encode_batch(x))
    assert top.features_per_call == [int((top(x) != 0).any(dim=0).sum())] * 2
