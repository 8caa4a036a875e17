"""The sampled architecture: limits, reproducibility, thresholds, save and load."""

import pytest
import torch
from sae_lens import SAE, BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig, TrainingSAE

from sae_lens_sampled import (
    SampledSAE,
    SampledSAEConfig,
    SampledTrainingSAE,
    SampledTrainingSAEConfig,
)
from tests.helpers import step_input

D_IN, D_SAE = 16, 64


def make_sae(**fields) -> SampledTrainingSAE:
    cfg = SampledTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, **{"k": 4, **fields})
    sae = SampledTrainingSAE(cfg)
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.1)
        sae.W_dec.mul_(torch.rand(D_SAE, 1) * 3 + 0.1)
    return sae


@pytest.mark.parametrize("score", ["l2", "squared_l2", "entropy", "uniform"])
def test_full_pool_equals_saelens_batchtopk(score):
    sae = make_sae(pool_factor=16, score=score)  # 4 * 16 = d_sae
    bt = BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=4))
    bt.load_state_dict(dict(sae.named_parameters()), strict=False)
    x = torch.randn(32, D_IN)
    ours = sae.training_forward_pass(step_input(x)).feature_acts
    theirs = bt.training_forward_pass(step_input(x)).feature_acts
    assert torch.equal(ours, theirs)


def test_pool_factor_one_top_mode_uses_the_k_best_scored_features():
    sae = make_sae(k=3, pool_factor=1, pool_mode="top", score="l2")
    x = torch.randn(32, D_IN)
    acts = sae.training_forward_pass(step_input(x)).feature_acts.detach()
    used = set((acts != 0).any(dim=0).nonzero().flatten().tolist())
    scores = sae.hidden_pre(x).relu().norm(dim=0)
    assert used <= set(torch.topk(scores, 3).indices.tolist())
    assert len(used) <= 3


def test_top_mode_l2_and_squared_l2_select_the_same_codes():
    x = torch.randn(32, D_IN)
    a = make_sae(pool_mode="top", score="l2", pool_factor=2)
    b = SampledTrainingSAE(
        SampledTrainingSAEConfig(
            d_in=D_IN, d_sae=D_SAE, k=4, pool_mode="top", score="squared_l2",
            pool_factor=2,
        )
    )  # fmt: skip
    b.load_state_dict(a.state_dict())
    assert torch.equal(
        a.training_forward_pass(step_input(x)).feature_acts,
        b.training_forward_pass(step_input(x)).feature_acts,
    )


def test_seeded_runs_reproduce_and_survive_checkpoint(tmp_path):
    x = [torch.randn(32, D_IN) for _ in range(4)]
    a = make_sae(pool_seed=5, pool_factor=1.5)
    b = SampledTrainingSAE(a.cfg)
    b.load_state_dict(a.state_dict())
    codes_a = [a.training_forward_pass(step_input(xi)).feature_acts for xi in x]
    # b runs two steps, is saved and reloaded, then runs the last two
    for xi in x[:2]:
        b.training_forward_pass(step_input(xi))
    b.save_model(tmp_path)
    c = TrainingSAE.load_from_disk(tmp_path)
    assert int(c.n_selection_steps) == 2
    codes_c = [c.training_forward_pass(step_input(xi)).feature_acts for xi in x[2:]]
    for ours, theirs in zip(codes_a[2:], codes_c, strict=True):
        assert torch.equal(ours, theirs)
    # different steps draw different pools
    assert not torch.equal(codes_a[0] != 0, codes_a[1] != 0)


def test_never_selected_features_never_fire_at_inference():
    sae = make_sae(pool_factor=1, pool_mode="top")
    sae.training_forward_pass(step_input(torch.randn(32, D_IN)))
    never = torch.isinf(sae.running_threshold)
    assert never.sum() >= D_SAE - 4
    sae.eval()
    acts = sae.encode(torch.randn(100, D_IN) * 5)
    assert (acts[:, never] == 0).all()


def test_inference_round_trip_and_batch_rule(tmp_path):
    sae = make_sae(pool_seed=1, pool_factor=2, score="entropy")
    for _ in range(5):
        sae.training_forward_pass(step_input(torch.randn(64, D_IN)))
    sae.save_inference_model(tmp_path)
    loaded = SAE.load_from_disk(tmp_path)
    assert isinstance(loaded, SampledSAE)
    assert loaded.cfg.pool_factor == 2 and loaded.cfg.score == "entropy"
    assert "n_selection_steps" not in loaded.state_dict()
    x = torch.randn(2, 9, D_IN)
    sae.eval()
    torch.testing.assert_close(loaded.encode(x), sae.encode(x), rtol=1e-5, atol=1e-6)
    single = loaded.encode(x[0, 0])
    assert single.shape == (D_SAE,)
    torch.testing.assert_close(single, loaded.encode(x)[0, 0])
    batch = loaded.encode_batch(x)
    assert batch.shape == (2, 9, D_SAE)
    assert (batch != 0).sum() <= round(4 * 18)
    assert (batch != 0).any(dim=(0, 1)).sum() <= 8  # pool of 4 * 2 features
    # seeded: successive draws advance, and replay from the same count
    assert not torch.equal(batch, loaded.encode_batch(x))
    loaded.n_batch_draws = 0
    assert torch.equal(batch, loaded.encode_batch(x))


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("pool_factor", 0.5, "pool_factor must be in"),
        ("score", "l1", "score must be one of"),
        ("pool_mode", "best", "pool_mode must be one of"),
        ("k", 0, "k must be in"),
        ("k", 65, "k must be in"),
        ("aux_loss", "aux", "aux_loss must be one of"),
        ("threshold_mode", "local", "threshold_mode must be one of"),
        ("pool_seed", -1, "pool_seed must be in"),
    ],
)
def test_bad_config_raises_naming_the_field(field, value, message):
    with pytest.raises(ValueError, match=message) as info:
        SampledTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, **{"k": 4, field: value})
    assert repr(value) in str(info.value)


def test_inference_config_validates_too():
    with pytest.raises(ValueError, match="pool_factor"):
        SampledSAEConfig(d_in=D_IN, d_sae=D_SAE, k=4, pool_factor=0)
