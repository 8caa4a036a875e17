"""feature_choice: capacities, the selection rule, re-ranking, save/load, no dead features."""

from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sae_lens import (
    SAE,
    BatchTopKTrainingSAEConfig,
    LanguageModelSAETrainingRunner,
    TrainingSAE,
)
from sae_lens.registry import SAE_CLASS_REGISTRY, SAE_TRAINING_CLASS_REGISTRY

from sae_lens_sampled import (
    FeatureChoiceSAE,
    FeatureChoiceSAEConfig,
    FeatureChoiceTrainingSAE,
    FeatureChoiceTrainingSAEConfig,
)
from sae_lens_sampled.selection import (
    batch_topk,
    capacities_for_batch,
    feature_choice_select,
    uniform_capacity_fractions,
    usage_ranks,
    zipf_capacity_fractions,
)
from tests.helpers import D_MODEL, runner_config, step_input, tiny_model, token_dataset

D_IN, D_SAE = 8, 16


def make_sae(**overrides) -> FeatureChoiceTrainingSAE:
    settings_ = {"d_in": D_IN, "d_sae": D_SAE, "k": 3.0, **overrides}
    sae = FeatureChoiceTrainingSAE(FeatureChoiceTrainingSAEConfig(**settings_))
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.1)
        sae.b_dec.normal_(0, 0.1)
        sae.W_dec.mul_(torch.rand(D_SAE, 1) * 3 + 0.1)
    return sae


def zipf(ranks: list[int], k: float) -> torch.Tensor:
    return zipf_capacity_fractions(torch.tensor(ranks), k, 1.0)


# --- pure functions -------------------------------------------------------------


def test_zipf_fractions_hand_computed():
    # weights 1, 1/2, 1/3 sum to 11/6; k = 2
    expected = torch.tensor([12 / 11, 6 / 11, 4 / 11], dtype=torch.float64)
    torch.testing.assert_close(zipf([1, 2, 3], 2.0), expected)
    torch.testing.assert_close(zipf([3, 1, 2], 2.0), expected[[2, 0, 1]])
    torch.testing.assert_close(
        uniform_capacity_fractions(4, 2.0), torch.full((4,), 0.5, dtype=torch.float64)
    )


def test_usage_ranks_ties_go_to_lower_index():
    rates = torch.tensor([0.1, 0.5, 0.1, 0.3])
    assert usage_ranks(rates).tolist() == [3, 1, 4, 2]
    assert usage_ranks(torch.zeros(3)).tolist() == [1, 2, 3]


@pytest.mark.parametrize(
    ("fractions", "n_tokens", "budget", "expected"),
    [
        # uniform 2.75 each: floors 2, the 3 leftover tokens go to the first three
        (uniform_capacity_fractions(4, 2.2), 5, 11, [3, 3, 3, 2]),
        (uniform_capacity_fractions(4, 2.0), 4, 8, [2, 2, 2, 2]),
        # Zipf 4.36, 2.18, 1.45: the first is capped at B=4 and its excess shared
        # by the others in proportion (2.4, 1.6); largest remainder gives the third +1
        (zipf([1, 2, 3], 2.0), 4, 8, [4, 2, 2]),
        (zipf([3, 1, 2], 2.0), 4, 8, [2, 4, 2]),
        # B=3 < 4 features: raw 2.88, 1.44, 0.96, 0.72; the last two are raised to 1,
        # the first two share 4 tokens as 2.67, 1.33
        (zipf([1, 2, 3, 4], 2.0), 3, 6, [3, 1, 1, 1]),
        # raw 4.8, 2.4, 1.6, 1.2: cap at 4, then 2.77, 1.85, 1.38 -> +1 to ranks 2, 3
        (zipf([1, 2, 3, 4], 2.5), 4, 10, [4, 3, 2, 1]),
        # budget below d_sae: the `budget` top-ranked features get one token each
        (zipf([2, 4, 1, 3], 1.0), 4, 3, [1, 0, 1, 1]),
        (uniform_capacity_fractions(4, 0.5), 4, 2, [1, 1, 0, 0]),
        # budget at or above n * d_sae: every feature takes the whole batch
        (zipf([1, 2, 3], 2.0), 2, 6, [2, 2, 2]),
        (zipf([1, 2, 3], 2.0), 2, 100, [2, 2, 2]),
        (zipf([1, 2, 3], 2.0), 1, 3, [1, 1, 1]),
        (zipf([1, 2, 3], 2.0), 0, 0, [0, 0, 0]),
        (zipf([1, 2, 3], 2.0), 5, 0, [0, 0, 0]),
    ],
)
def test_capacities_hand_computed(fractions, n_tokens, budget, expected):
    capacities = capacities_for_batch(fractions, n_tokens, budget)
    assert capacities.dtype == torch.long
    assert capacities.tolist() == expected


def reference_real_capacities(
    fractions: torch.Tensor, n_tokens: int, budget: int
) -> torch.Tensor:
    """clamp(s * f, 1, n) summing to budget, by bisection on s (slow but obvious)."""
    weights = fractions.double()
    low, high = 0.0, 1.0
    while (high * weights).clamp(1, n_tokens).sum() < budget:
        high *= 2
    for _ in range(200):
        mid = (low + high) / 2
        if (mid * weights).clamp(1, n_tokens).sum() < budget:
            low = mid
        else:
            high = mid
    return (high * weights).clamp(1, n_tokens)


@settings(max_examples=150, deadline=None)
@given(
    weights=st.lists(st.floats(min_value=1e-3, max_value=1e3), min_size=1, max_size=30),
    n_tokens=st.integers(min_value=1, max_value=40),
    budget_share=st.floats(min_value=0.0, max_value=1.2),
)
def test_capacities_exact_sum_bounds_and_order(weights, n_tokens, budget_share):
    fractions = torch.tensor(weights, dtype=torch.float64)
    d_sae = len(weights)
    budget = int(budget_share * n_tokens * d_sae)
    capacities = capacities_for_batch(fractions, n_tokens, budget)
    assert int(capacities.sum()) == min(budget, n_tokens * d_sae)
    assert int(capacities.max()) <= n_tokens
    if budget >= d_sae:
        assert int(capacities.min()) >= 1
    if d_sae <= budget < n_tokens * d_sae:
        # within one token of the real-valued capped-proportional capacities
        real = reference_real_capacities(fractions, n_tokens, budget)
        assert (capacities - real).abs().max() < 1 + 1e-6
    # a larger fraction never gets a smaller capacity (ties: lower index first)
    order = torch.sort(fractions, descending=True, stable=True).indices
    assert (capacities[order].diff() <= 0).all()


def test_capacities_at_realistic_scale():
    # a Pythia-160M-scale setting: B=4096, k=32, F=24576, Zipf alpha=1
    fractions = zipf_capacity_fractions(torch.randperm(24576) + 1, 32.0, 1.0)
    capacities = capacities_for_batch(fractions, 4096, 32 * 4096)
    assert int(capacities.sum()) == 32 * 4096
    assert int(capacities.min()) == 1
    assert int(capacities.max()) == 4096
    assert int(capacities[fractions.argmax()]) == 4096


def test_select_hand_computed():
    acts = torch.tensor(
        [
            [3.0, 0.0, 1.0, 5.0],
            [1.0, 0.0, 2.0, 0.0],
            [2.0, 0.0, 0.5, 0.0],
            [0.0, 0.0, 4.0, 0.0],
        ]
    )
    capacities = torch.tensor([2, 1, 3, 2])
    expected = torch.tensor(
        [
            [3.0, 0.0, 1.0, 5.0],
            [0.0, 0.0, 2.0, 0.0],
            [2.0, 0.0, 0.0, 0.0],
            [0.0, 0.0, 4.0, 0.0],
        ]
    )
    # column 1 is all zero and column 3 has one positive entry: selected zeros stay
    # inactive, so a feature fires on at most m_j tokens
    assert torch.equal(feature_choice_select(acts, capacities), expected)
    assert torch.equal(
        feature_choice_select(acts, torch.zeros(4, dtype=torch.long)),
        torch.zeros_like(acts),
    )


def test_select_gradient_only_through_selected_entries():
    acts = torch.rand(12, 6, requires_grad=True)
    capacities = torch.tensor([1, 2, 3, 12, 0, 5])
    out = feature_choice_select(acts, capacities)
    weights = torch.randn(12, 6)
    (out * weights).sum().backward()
    ranks = acts.detach().argsort(dim=0, descending=True).argsort(dim=0)
    selected = ranks < capacities
    assert torch.equal(out != 0, selected)
    assert torch.equal(acts.grad, weights * selected)


def reference_select(acts: torch.Tensor, capacities: torch.Tensor) -> torch.Tensor:
    """The plain rule: one top-max(m) per column, a rank mask, a scatter."""
    top = torch.topk(acts, int(capacities.max()), dim=0)
    keep = torch.arange(top.values.shape[0])[:, None] < capacities
    return torch.zeros_like(acts).scatter(0, top.indices, top.values * keep)


@pytest.mark.parametrize("n_tokens", [7, 64, 300])
@pytest.mark.parametrize("schedule", ["zipf", "uniform", "steep"])
def test_bucketed_select_equals_single_topk(n_tokens, schedule):
    d_sae = 96
    ranks = torch.randperm(d_sae) + 1
    fractions = {
        "zipf": zipf_capacity_fractions(ranks, 4.0, 1.0),
        "uniform": uniform_capacity_fractions(d_sae, 4.0),
        "steep": zipf_capacity_fractions(ranks, 20.0, 2.0),
    }[schedule]
    capacities = capacities_for_batch(
        fractions, n_tokens, round(fractions.sum().item() * n_tokens)
    )
    # distinct positive values: no ties, so the selection is unique
    acts = (torch.randperm(n_tokens * d_sae).view(n_tokens, d_sae).float() + 1) / 7
    acts.requires_grad_(True)
    ours = feature_choice_select(acts, capacities)
    weights = torch.randn(n_tokens, d_sae)
    (ours * weights).sum().backward()
    grad = acts.grad.clone()
    acts.grad = None
    theirs = reference_select(acts, capacities)
    (theirs * weights).sum().backward()
    assert torch.equal(ours, theirs)
    assert torch.equal(grad, acts.grad)
    assert torch.equal((ours != 0).sum(0), capacities)


# --- config ---------------------------------------------------------------------


def test_config_defaults():
    cfg = FeatureChoiceTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=3.0)
    assert cfg.capacity_schedule == "zipf"
    assert cfg.zipf_alpha == 0.5  # the other architectures keep 1.0 (aux_zipf)
    assert cfg.threshold_mode == "rate"
    assert cfg.rank_by == "firing_rate"
    assert cfg.rerank_every >= 1
    assert cfg.get_inference_config_class() is FeatureChoiceSAEConfig
    assert cfg.get_inference_sae_cfg_dict()["zipf_alpha"] == 0.5
    assert FeatureChoiceSAEConfig(d_in=D_IN, d_sae=D_SAE, k=3.0).zipf_alpha == 0.5


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("capacity_schedule", "zipfian"),
        ("rerank_every", 0),
        ("zipf_alpha", 0.0),
        ("rank_by", "usage"),
        ("k", 0.0),
        ("k", D_SAE + 1),
    ],
)
def test_config_rejects_bad_values(field, value):
    fields = {"k": 3.0, field: value}
    with pytest.raises(ValueError, match=field):
        FeatureChoiceTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, **fields)
    if field in ("capacity_schedule", "zipf_alpha", "k"):
        with pytest.raises(ValueError, match=field):
            FeatureChoiceSAEConfig(d_in=D_IN, d_sae=D_SAE, **fields)


def test_registered_in_both_registries():
    assert SAE_CLASS_REGISTRY["feature_choice"] == (
        FeatureChoiceSAE,
        FeatureChoiceSAEConfig,
    )
    assert SAE_TRAINING_CLASS_REGISTRY["feature_choice"] == (
        FeatureChoiceTrainingSAE,
        FeatureChoiceTrainingSAEConfig,
    )


# --- training SAE ---------------------------------------------------------------


@pytest.mark.parametrize("schedule", ["zipf", "uniform", "zipf_fixed"])
def test_training_step_respects_capacities(schedule):
    sae = make_sae(capacity_schedule=schedule)
    x = torch.randn(20, D_IN) * 2
    out = sae.training_forward_pass(step_input(x))
    capacities = sae.capacities(20)
    assert int(capacities.sum()) == round(3.0 * 20)
    # each feature fires on exactly min(m_j, tokens where its activation is > 0)
    positive = (out.hidden_pre > 0).sum(0)
    fired = (out.feature_acts > 0).sum(0)
    assert torch.equal(fired, torch.minimum(capacities, positive))
    expected = feature_choice_select(out.hidden_pre.relu(), capacities)
    torch.testing.assert_close(out.feature_acts, expected)


def test_initial_capacities_follow_schedule():
    torch.testing.assert_close(
        make_sae(capacity_schedule="uniform").capacity_fractions,
        uniform_capacity_fractions(D_SAE, 3.0),
    )
    for schedule in ("zipf", "zipf_fixed"):
        fractions = make_sae(capacity_schedule=schedule).capacity_fractions
        assert fractions.dtype == torch.float64
        expected = zipf_capacity_fractions(torch.arange(1, D_SAE + 1), 3.0, 0.5)
        torch.testing.assert_close(fractions, expected, rtol=1e-7, atol=0)


def test_encoder_gradient_matches_masked_reference():
    sae = make_sae()
    x = torch.randn(20, D_IN)
    out = sae.training_forward_pass(step_input(x))
    out.loss.backward()
    ours = sae.W_enc.grad.clone()
    # the same loss with the selection frozen as a mask on relu(hidden_pre)
    sae.zero_grad()
    mask = (out.feature_acts != 0).detach()
    hidden_pre = sae.hidden_pre(x)
    recon = sae.decode(hidden_pre.relu() * mask)
    ((recon - x) ** 2).sum(-1).mean().backward()
    torch.testing.assert_close(ours, sae.W_enc.grad)
    unselected = ~mask.any(0)
    if unselected.any():
        assert torch.equal(ours[:, unselected], torch.zeros_like(ours[:, unselected]))


@pytest.mark.parametrize("schedule", ["zipf", "uniform", "zipf_fixed"])
def test_rerank_every_n_steps(schedule):
    sae = make_sae(capacity_schedule=schedule, rerank_every=3, rank_by="firing_rate")
    initial = sae.capacity_fractions.clone()
    for _ in range(2):
        sae.training_forward_pass(step_input(torch.randn(20, D_IN) * 2))
    assert torch.equal(sae.capacity_fractions, initial)
    sae.training_forward_pass(step_input(torch.randn(20, D_IN) * 2))
    assert int(sae.n_selection_steps) == 3
    if schedule != "zipf":
        assert torch.equal(sae.capacity_fractions, initial)
        return
    expected = zipf_capacity_fractions(usage_ranks(sae.firing_rate), 3.0, 0.5)
    torch.testing.assert_close(sae.capacity_fractions, expected, rtol=1e-7, atol=0)


@pytest.mark.parametrize("rank_by", ["demand", "firing_rate"])
def test_rerank_gives_most_used_features_largest_capacities(rank_by):
    sae = make_sae(rank_by=rank_by)
    usage = sae.demand_rate if rank_by == "demand" else sae.firing_rate
    with torch.no_grad():
        usage.copy_(torch.linspace(0.0, 0.5, D_SAE))  # last is most used
    sae.rerank()
    capacities = sae.capacities(64)
    assert int(capacities.argmax()) == D_SAE - 1
    assert (capacities.flip(0).diff() <= 0).all()


def test_demand_ranking_tracks_unrestricted_selection():
    sae = make_sae(rank_by="demand", rerank_every=1)
    x = torch.randn(20, D_IN) * 2
    out = sae.training_forward_pass(step_input(x))
    # first batch: the EMA is the batch's rate of selection by global top-k(k*B)
    wanted = batch_topk(out.hidden_pre.detach().relu(), 60) > 0
    torch.testing.assert_close(sae.demand_rate, wanted.double().mean(0))
    expected = zipf_capacity_fractions(usage_ranks(sae.demand_rate), 3.0, 0.5)
    torch.testing.assert_close(sae.capacity_fractions, expected, rtol=1e-7, atol=0)


def test_budget_below_d_sae_gives_top_ranked_features_one_token():
    sae = make_sae(k=0.5, capacity_schedule="zipf_fixed")
    x = torch.randn(4, D_IN) * 2
    out = sae.training_forward_pass(step_input(x))
    assert sae.capacities(4).tolist() == [1, 1] + [0] * (D_SAE - 2)
    assert (out.feature_acts[:, 2:] == 0).all()


def test_batch_shape_scales_capacities():
    sae = make_sae()
    sae.rerank()
    x = torch.randn(4, 10, D_IN)
    codes = sae.encode_batch(x)
    assert codes.shape == (4, 10, D_SAE)
    torch.testing.assert_close(
        codes.flatten(end_dim=1), sae.encode_batch(x.flatten(end_dim=1))
    )
    capacities = capacities_for_batch(sae.capacity_fractions, 40, 120)
    assert ((codes.flatten(end_dim=1) > 0).sum(0) <= capacities).all()
    assert int(capacities.sum()) == 120


def test_per_feature_threshold_is_smallest_selected_on_first_step():
    sae = make_sae(threshold_mode="per_feature")
    out = sae.training_forward_pass(step_input(torch.randn(20, D_IN) * 2))
    acts = out.feature_acts.detach()
    smallest = torch.where(acts > 0, acts, torch.inf).amin(0).double()
    torch.testing.assert_close(sae.running_threshold, smallest)


# --- save and load --------------------------------------------------------------


def trained_sae(steps: int = 4, **overrides) -> FeatureChoiceTrainingSAE:
    sae = make_sae(rerank_every=2, **overrides)
    for _ in range(steps):
        sae.training_forward_pass(step_input(torch.randn(24, D_IN) * 2))
    return sae


def test_training_checkpoint_round_trip(tmp_path):
    sae = trained_sae(steps=3)
    sae.save_model(tmp_path)
    loaded = TrainingSAE.load_from_disk(tmp_path)
    assert isinstance(loaded, FeatureChoiceTrainingSAE)
    assert int(loaded.n_selection_steps) == 3
    for name in ("capacity_fractions", "firing_rate", "demand_rate"):
        torch.testing.assert_close(
            getattr(loaded, name).double(), getattr(sae, name), rtol=1e-6, atol=0
        )
    # the next step re-ranks (step 4) identically in both
    x = torch.randn(24, D_IN) * 2
    ours = sae.training_forward_pass(step_input(x))
    theirs = loaded.training_forward_pass(step_input(x))
    assert torch.equal(ours.feature_acts != 0, theirs.feature_acts != 0)
    assert torch.equal(sae.capacities(24), loaded.capacities(24))
    assert torch.equal(sae.capacities(24 * 7), loaded.capacities(24 * 7))


def test_inference_round_trip(tmp_path):
    sae = trained_sae(steps=5)
    sae.save_inference_model(tmp_path / "a")
    inference = SAE.load_from_disk(tmp_path / "a")
    assert isinstance(inference, FeatureChoiceSAE)
    state = inference.state_dict()
    assert "capacity_fractions" in state and "threshold" in state
    for name in (
        "firing_rate",
        "n_selection_steps",
        "demand_rate",
        "running_threshold",
    ):
        assert name not in state
    assert torch.equal(inference.capacities(37), sae.capacities(37))

    sae.eval()
    x = torch.randn(3, 7, D_IN) * 2
    with torch.no_grad():
        for ours, theirs in [
            (sae.encode(x), inference.encode(x)),
            (sae.encode_batch(x), inference.encode_batch(x)),
        ]:
            assert ours.shape == theirs.shape == (3, 7, D_SAE)
            assert torch.equal(ours != 0, theirs != 0)
            torch.testing.assert_close(ours, theirs)

    inference.save_model(tmp_path / "b")
    again = SAE.load_from_disk(tmp_path / "b")
    with torch.no_grad():
        assert torch.equal(again.encode(x), inference.encode(x))
        assert torch.equal(again.encode_batch(x), inference.encode_batch(x))


# --- a full offline training run ------------------------------------------------


def run_and_watch(sae_cfg, tmp_path: Path, steps: int):
    """Train offline; return the SAE and, per batch, features positive but silent."""
    cfg = runner_config(
        sae_cfg,
        tmp_path,
        steps=steps,
        dead_feature_window=30,
        feature_sampling_window=60,
    )
    runner = LanguageModelSAETrainingRunner(
        cfg, override_model=tiny_model(), override_dataset=token_dataset(1000)
    )
    seen: dict[str, torch.Tensor] = {}
    silent: list[int] = []

    def keep_pre(acts, hook):
        seen["pre"] = acts.detach()
        return acts

    def check_post(acts, hook):
        if runner.sae.training:
            positive = (seen["pre"] > 0).flatten(end_dim=-2).any(0)
            fired = (acts.detach() > 0).flatten(end_dim=-2).any(0)
            silent.append(int((positive & ~fired).sum()))
        return acts

    runner.sae.hook_sae_acts_pre.add_hook(keep_pre)
    runner.sae.hook_sae_acts_post.add_hook(check_post)
    return runner.run(), silent


@pytest.fixture
def single_thread():
    # The training loop is tiny; thread hand-offs dominate on a shared CPU.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_no_dead_features_in_offline_run_unlike_batchtopk(tmp_path, single_thread):
    d_sae, k, steps = 8 * D_MODEL, 4.0, 120
    fc_cfg = FeatureChoiceTrainingSAEConfig(d_in=D_MODEL, d_sae=d_sae, k=k)
    sae, silent = run_and_watch(fc_cfg, tmp_path / "fc", steps)
    assert len(silent) == steps
    # every feature with a positive pre-activation in a batch fired in that batch
    assert sum(silent) == 0
    assert sae.cfg.metadata.num_dead_features == 0
    assert isinstance(SAE.load_from_disk(tmp_path / "fc" / "final"), FeatureChoiceSAE)

    bt_cfg = BatchTopKTrainingSAEConfig(d_in=D_MODEL, d_sae=d_sae, k=k)
    bt_sae, bt_silent = run_and_watch(bt_cfg, tmp_path / "bt", steps)
    # the same metric on the same run settings does see dead features elsewhere
    print(
        "num_dead_features: feature_choice",
        sae.cfg.metadata.num_dead_features,
        "batchtopk",
        bt_sae.cfg.metadata.num_dead_features,
    )
    assert bt_sae.cfg.metadata.num_dead_features > 0
    assert sum(bt_silent) > 0


def test_budget_equal_to_d_sae_gives_one_token_each():
    # regression: equal weights and budget == d_sae once divided by zero
    fractions = torch.tensor([0.0625, 0.0625], dtype=torch.float64)
    assert capacities_for_batch(fractions, 16, 2).tolist() == [1, 1]
    zipf = torch.tensor([0.5, 0.25, 0.125], dtype=torch.float64)
    assert capacities_for_batch(zipf, 10, 3).tolist() == [1, 1, 1]


def test_capacities_follow_every_change_of_the_fractions():
    # Eager steps compute them once per batch size between changes of
    # capacity_fractions: a re-ranking, an in-place copy, a load, a move.
    from sae_lens_sampled.saes.feature_choice_sae import capacities_from_fractions

    def fresh(sae: FeatureChoiceTrainingSAE, n: int) -> torch.Tensor:
        return capacities_from_fractions(sae.capacity_fractions, sae.cfg.k, n)

    sae = make_sae(rerank_every=1)
    first = sae.capacities(32)
    assert sae.capacities(32) is first  # not recomputed
    assert torch.equal(first, fresh(sae, 32))
    assert torch.equal(sae.capacities(7), fresh(sae, 7))
    with torch.no_grad():
        sae.firing_rate.copy_(torch.linspace(0.0, 1.0, D_SAE).double())
    sae.rerank()
    moved = sae.capacities(32)
    assert torch.equal(moved, fresh(sae, 32))
    assert not torch.equal(moved, first)
    other = make_sae()
    sae.load_state_dict(other.state_dict())
    assert torch.equal(sae.capacities(32), fresh(other, 32))
    sae.to(torch.float32)  # a new buffer
    assert torch.equal(sae.capacities(32), fresh(sae, 32))
