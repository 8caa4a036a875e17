"""Sampled-SAE pool options: sharpness, exploration, warm-up and the aux dead set."""

import json
import math

import pytest
import torch
from sae_lens import SAE, TrainingSAE

from sae_lens_sampled import SampledTrainingSAE, SampledTrainingSAEConfig
from sae_lens_sampled.selection import (
    batch_topk,
    explore_pool,
    explore_size,
    sampled_pool,
    sampled_topk,
    select_pool,
    update_missed_chances,
    update_staleness,
)
from tests.helpers import step_input

D_IN, D_SAE = 8, 16

# --- pure tensor logic ----------------------------------------------------------------


def test_beta_one_is_the_plain_sampled_pool():
    scores = torch.rand(50, generator=torch.Generator().manual_seed(3)) * 10
    scores[::7] = 0
    for seed in range(5):
        plain = select_pool(scores, 12, "sample", torch.Generator().manual_seed(seed))
        beta_one = select_pool(
            scores, 12, "sample", torch.Generator().manual_seed(seed), beta=1.0
        )
        assert torch.equal(plain, beta_one)


@pytest.mark.parametrize(("beta", "expected"), [(0.0, 0.5), (1.0, 0.9), (2.0, 81 / 82)])
def test_beta_sets_the_draw_probability(beta, expected):
    # one slot, scores 1 and 9: P(feature 1) = 9**b / (1 + 9**b)
    scores = torch.tensor([1.0, 9.0])
    generator = torch.Generator().manual_seed(0)
    draws = [
        int(select_pool(scores, 1, "sample", generator, beta=beta)) for _ in range(6000)
    ]
    assert abs(sum(draws) / len(draws) - expected) < 0.015


def test_large_beta_is_the_top_pool_and_zero_scores_stay_last():
    scores = torch.tensor([0.0, 1e-3, 0.0, 2.0, 1.5, 0.7])
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        sharp = select_pool(scores, 3, "sample", generator, beta=200.0)
        assert sharp.tolist() == [3, 4, 5] == select_pool(scores, 3, "top").tolist()
        # beta = 0: uniform over the positive scores, zero scores still last
        flat = select_pool(scores, 4, "sample", generator, beta=0.0)
        assert flat.tolist() == [1, 3, 4, 5]


def test_explore_pool_by_hand():
    pool = torch.tensor([2])
    scores = torch.tensor([3.0, 0.0, 5.0, 1.0, 2.0])
    staleness = torch.tensor([4, 9, 0, 4, 1])
    # outside the pool: feature 1 scores 0 (last, however stale); 0 and 3 tie at
    # staleness 4 and 0 scores higher; then 4
    assert explore_pool(pool, scores, staleness, 1).tolist() == [0, 2]
    assert explore_pool(pool, scores, staleness, 2).tolist() == [0, 2, 3]
    assert explore_pool(pool, scores, staleness, 3).tolist() == [0, 2, 3, 4]
    assert explore_pool(pool, scores, staleness, 9).tolist() == [0, 1, 2, 3, 4]
    assert explore_pool(pool, scores, staleness, 0).tolist() == [2]
    # equal staleness and score: the lower index
    flat = explore_pool(torch.tensor([0]), torch.ones(4), torch.zeros(4), 2)
    assert flat.tolist() == [0, 1, 2]


def test_explore_size_rounds():
    assert explore_size(24, 0.25) == 6
    assert explore_size(10, 0.25) == 2  # round(2.5) is 2, half to even
    assert explore_size(10, 0.0) == 0
    assert explore_size(10, 1.0) == 10


def test_sampled_pool_with_exploration_by_hand():
    # 4 tokens x 6 features, k = 1, pool_factor = 1.5: P = 2; explore 0.5: one slot
    # by score (top: feature 5) and one for the stalest positive feature (2)
    acts = torch.tensor(
        [
            [1.0, 0.0, 0.2, 0.0, 0.5, 3.0],
            [0.0, 0.0, 0.0, 0.0, 0.5, 3.0],
            [1.0, 0.0, 0.0, 0.0, 0.5, 0.0],
            [0.0, 0.0, 0.0, 0.0, 0.5, 0.0],
        ]
    )
    staleness = torch.tensor([1, 7, 5, 7, 0, 0])
    pool, scores = sampled_pool(
        acts, 1, 1.5, "l2", "top", explore=0.5, staleness=staleness
    )
    assert pool.tolist() == [2, 5]
    assert scores is not None
    codes = sampled_topk(acts, 1, 1.5, "l2", "top", explore=0.5, staleness=staleness)
    # budget 4: the two 3.0s and the 0.2 (the only other pooled entry)
    assert (codes != 0).nonzero().tolist() == [[0, 2], [0, 5], [1, 5]]
    # without staleness (inference) the score-based pool holds both slots: 5, then 0
    # (l2 1.41 against feature 4's 1.0)
    plain, _ = sampled_pool(acts, 1, 1.5, "l2", "top", explore=0.5)
    assert plain.tolist() == [0, 5]


def test_zero_exploration_is_the_plain_rule():
    acts = torch.rand(20, 30, generator=torch.Generator().manual_seed(1))
    staleness = torch.arange(30)
    for mode in ("top", "sample"):
        a = sampled_topk(acts, 2, 3, "l2", mode, torch.Generator().manual_seed(4))
        b = sampled_topk(
            acts,
            2,
            3,
            "l2",
            mode,
            torch.Generator().manual_seed(4),
            explore=0.0,
            staleness=staleness,
        )
        assert torch.equal(a, b)


def test_full_pool_is_reported_as_none():
    acts = torch.rand(5, 8)
    assert sampled_pool(acts, 2, 4, "l2", "top") == (None, None)


def test_staleness_and_missed_chances_by_hand():
    staleness = torch.tensor([0, 3, 1, 5])
    assert update_staleness(staleness, torch.tensor([1, 2])).tolist() == [1, 0, 0, 6]
    assert update_staleness(staleness, None).tolist() == [0, 0, 0, 0]
    missed = torch.tensor([2, 2, 2, 2])
    fired = torch.tensor([True, False, False, True])
    chance = torch.tensor([True, True, False, False])
    assert update_missed_chances(missed, fired, chance).tolist() == [0, 3, 2, 0]


# --- configuration ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("pool_beta", -0.5, r"pool_beta must be in \[0, inf\), got -0.5"),
        ("pool_beta", math.inf, "pool_beta must be finite, got inf.*pool_mode='top'"),
        ("pool_beta", math.nan, "pool_beta must be in"),
        ("pool_explore", 1.5, r"pool_explore must be in \[0, 1\], got 1.5"),
        ("pool_explore", -0.1, r"pool_explore must be in \[0, 1\]"),
        ("pool_warmup_steps", -1, r"pool_warmup_steps must be in \[0, inf\)"),
        ("aux_dead", "unpooled", r"aux_dead must be one of \('trainer', 'pooled'\)"),
        ("aux_dead_window", 0, r"aux_dead_window must be in \[1, inf\), got 0"),
    ],
)
def test_bad_pool_options_raise_at_construction(field, value, message):
    with pytest.raises(ValueError, match=message):
        SampledTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=2, **{field: value})


def test_inference_config_validates_pool_beta():
    from sae_lens_sampled import SampledSAEConfig

    with pytest.raises(ValueError, match="pool_beta"):
        SampledSAEConfig(d_in=D_IN, d_sae=D_SAE, k=2, pool_beta=-1.0)


# --- the training SAE -------------------------------------------------------------------


def make_sae(**fields) -> SampledTrainingSAE:
    settings = {"k": 2, "pool_factor": 2.0, "pool_seed": 0, "aux_loss": "none"}
    cfg = SampledTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, **{**settings, **fields})
    sae = SampledTrainingSAE(cfg)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(D_IN, D_SAE, generator=generator))
        sae.b_enc.fill_(0.5)  # most pre-activations positive
    return sae


def batch(seed: int, n: int = 32) -> torch.Tensor:
    return torch.randn(n, D_IN, generator=torch.Generator().manual_seed(seed))


def test_warmup_steps_use_every_feature_then_the_pool():
    sae = make_sae(pool_warmup_steps=2)
    for step in range(4):
        x = batch(step)
        with torch.no_grad():
            acts = sae.hidden_pre(x).relu()
        codes = sae.training_forward_pass(step_input(x)).feature_acts.detach()
        batch_rule = batch_topk(acts, 64)
        used = int((codes != 0).any(dim=0).sum())
        if step < 2:
            assert torch.equal(codes, batch_rule)
            assert int(sae.pool_staleness.max()) == 0
        else:
            assert used <= 4 < int((batch_rule != 0).any(dim=0).sum())
    # encode_batch never warms up
    assert int((sae.encode_batch(batch(9)) != 0).any(dim=0).sum()) <= 4


def test_full_exploration_pools_every_feature_in_turn():
    # P = 4 of 16, every slot exploring: each feature is pooled once every 4 steps
    sae = make_sae(pool_mode="top", pool_explore=1.0)
    seen = torch.zeros(D_SAE, dtype=torch.long)
    for step in range(4):
        sae.training_forward_pass(step_input(batch(step)))
        seen += sae.pool_staleness == 0
    assert seen.tolist() == [1] * D_SAE
    # without exploration, a top pool on the same inputs leaves features out
    top = make_sae(pool_mode="top")
    for step in range(4):
        top.training_forward_pass(step_input(batch(step)))
    assert int(top.pool_staleness.max()) >= 1


def test_pooled_dead_set_equals_the_trainers_with_a_full_pool():
    # A full pool gives every feature a chance on every step, so the missed chances
    # are the trainer's steps since fired (SAELens: dead when > dead_feature_window).
    sae = make_sae(pool_factor=8.0, aux_dead="pooled", aux_dead_window=2)
    with torch.no_grad():
        sae.b_enc.copy_(torch.linspace(-3, 1, D_SAE))  # some features rarely fire
    since_fired = torch.zeros(D_SAE, dtype=torch.long)
    for step in range(8):
        assert torch.equal(sae.aux_dead_mask(), since_fired > 2)
        codes = sae.training_forward_pass(step_input(batch(step, 8))).feature_acts
        fired = (codes != 0).any(dim=0)
        since_fired = torch.where(fired, 0, since_fired + 1)
    assert bool((since_fired > 2).any())  # the test saw dead features


def test_pooled_dead_set_ignores_steps_outside_the_pool():
    sae = make_sae(pool_mode="top", aux_dead="pooled", aux_dead_window=1)
    x = batch(0)
    for _ in range(5):
        sae.training_forward_pass(step_input(x))
    with torch.no_grad():
        positive = (sae.hidden_pre(x) > 0).any(dim=0)
    never_pooled = sae.pool_staleness == 5
    assert bool((never_pooled & positive).any())
    # five steps outside the pool with positive activations: no missed chance
    assert int(sae.missed_chances[never_pooled & positive].max()) == 0
    assert not bool(sae.aux_dead_mask()[never_pooled & positive].any())


def test_pooled_aux_loss_replaces_the_trainers_mask():
    sae = make_sae(aux_loss="aux_k", aux_dead="pooled", aux_dead_window=1)
    with torch.no_grad():
        sae.missed_chances.copy_(torch.tensor([0, 3] * (D_SAE // 2)))
    x = batch(1)
    trainer = make_sae(aux_loss="aux_k")
    trainer.load_state_dict(sae.state_dict())  # same step count, so the same pool
    every = torch.ones(D_SAE, dtype=torch.bool)
    output = sae.training_forward_pass(step_input(x, dead=every))
    expected = trainer.training_forward_pass(
        step_input(x, dead=torch.tensor([False, True] * (D_SAE // 2)))
    )
    torch.testing.assert_close(
        output.losses["auxiliary_reconstruction_loss"],
        expected.losses["auxiliary_reconstruction_loss"],
    )


def test_pool_state_saves_and_loads_bit_exactly(tmp_path):
    sae = make_sae(pool_explore=0.5, aux_dead="pooled", pool_beta=0.5)
    for step in range(3):
        sae.training_forward_pass(step_input(batch(step)))
    sae.save_model(tmp_path / "training")
    loaded = TrainingSAE.load_from_disk(tmp_path / "training")
    for name in ("pool_staleness", "missed_chances", "n_selection_steps"):
        assert torch.equal(getattr(loaded, name), getattr(sae, name)), name
    sae.save_inference_model(tmp_path / "inference")
    inference = SAE.load_from_disk(tmp_path / "inference")
    assert inference.cfg.pool_beta == 0.5
    assert not hasattr(inference, "pool_staleness")


def test_a_file_saved_before_pool_beta_loads_with_beta_one(tmp_path):
    sae = make_sae(pool_factor=3.0, score="l2")
    sae.save_inference_model(tmp_path / "inference")
    path = tmp_path / "inference" / "cfg.json"
    cfg = json.loads(path.read_text())
    del cfg["pool_beta"]
    path.write_text(json.dumps(cfg))
    loaded = SAE.load_from_disk(tmp_path / "inference")
    assert loaded.cfg.pool_beta == 1.0
    assert (loaded.cfg.pool_factor, loaded.cfg.score) == (3.0, "l2")
