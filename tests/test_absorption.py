"""Ground-truth absorption: oracle and fully absorbing SAEs, hand-computed cases."""

from __future__ import annotations

import math

import pytest
import torch
from sae_lens import JumpReLUSAE, JumpReLUSAEConfig
from sae_lens.synthetic import SyntheticModel, SyntheticModelConfig
from sae_lens.synthetic.firing_probabilities import ZipfianFiringProbabilityConfig
from sae_lens.synthetic.hierarchy import HierarchyConfig, HierarchyNode
from sae_lens.training.activation_scaler import ActivationScaler

from sae_lens_sampled.benchmark.absorption import (
    AbsorptionCounter,
    AbsorptionThresholds,
    HierarchyParent,
    absorbed_fraction,
    absorption_metrics,
    child_specific,
    hierarchy_parents,
)
from sae_lens_sampled.benchmark.compare import default_synthetic_model_config

# ---------------------------------------------------------------------------
# Builders


def small_model(std: float = 0.0, seed: int = 0) -> SyntheticModel:
    """8 parents x 4 children (half mutually exclusive), 40 features in 64-d.

    Every feature has magnitude exactly 1 when ``std`` is 0, so the full-absorption
    construction below is exact.
    """
    cfg = SyntheticModelConfig(
        num_features=40,
        hidden_dim=64,
        firing_probability=ZipfianFiringProbabilityConfig(
            exponent=0.7, max_prob=0.4, min_prob=0.01
        ),
        hierarchy=HierarchyConfig(
            total_root_nodes=8,
            branching_factor=4,
            max_depth=1,
            mutually_exclusive_portion=0.5,
            compensate_probabilities=True,
        ),
        mean_firing_magnitudes=1.0,
        std_firing_magnitudes=std,
        seed=seed,
    )
    return SyntheticModel(cfg)


def oracle_sae(model: SyntheticModel, threshold: float = 0.3) -> JumpReLUSAE:
    """Decoder = true directions, encoder = their pseudo-inverse, b_dec = the bias."""
    vectors = model.feature_dict.feature_vectors.detach()
    num_features, hidden_dim = vectors.shape
    sae = JumpReLUSAE(JumpReLUSAEConfig(d_in=hidden_dim, d_sae=num_features))
    with torch.no_grad():
        sae.W_dec.copy_(vectors)
        sae.W_enc.copy_(torch.linalg.pinv(vectors))
        sae.b_dec.copy_(model.feature_dict.bias.detach())
        sae.b_enc.zero_()
        sae.threshold.fill_(threshold)
    return sae


def switch_off_parents(
    sae: JumpReLUSAE, model: SyntheticModel, parents: list[HierarchyParent]
) -> JumpReLUSAE:
    """The full-absorption solution: each child latent carries its parent.

    The parent's encoder subtracts its children's, so with equal magnitudes the
    parent latent reads 0 (or less) whenever a child is active; the child's decoder
    is child + parent, so reconstruction stays perfect.
    """
    vectors = model.feature_dict.feature_vectors.detach()
    with torch.no_grad():
        for parent in parents:
            for child in parent.children:
                sae.W_enc[:, parent.feature] -= sae.W_enc[:, child]
                sae.W_dec[child] = vectors[child] + vectors[parent.feature]
    return sae


def sample(model: SyntheticModel, n: int = 20_000) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(1)
    return model.sample_with_features(n)


# ---------------------------------------------------------------------------
# Hierarchy extraction


def test_hierarchy_parents_of_the_default_compare_data():
    model = SyntheticModel(default_synthetic_model_config(0))
    parents = hierarchy_parents(model.hierarchy)
    assert [p.feature for p in parents] == list(range(8))
    for parent, root in zip(parents, model.hierarchy.roots, strict=True):
        expected = tuple(c.feature_index for c in root.children)
        assert parent.children == expected
        assert parent.descendants == expected
        assert parent.depth == 0
    assert parents[0].children == (8, 9, 10, 11)
    assert hierarchy_parents(model) == parents


def test_hierarchy_parents_looks_through_nodes_without_a_feature():
    # None root holding 0 and 5; 0 -> (None -> 1, 2), 3 -> 4 ; so 3 is 0's child.
    tree = HierarchyNode(
        children=[
            HierarchyNode(
                0,
                children=[
                    HierarchyNode(children=[HierarchyNode(1), HierarchyNode(2)]),
                    HierarchyNode(3, children=[HierarchyNode(4)]),
                ],
            ),
            HierarchyNode(5),
        ]
    )
    parents = hierarchy_parents([tree])
    assert parents == [
        HierarchyParent(
            feature=0, depth=0, children=(1, 2, 3), descendants=(1, 2, 3, 4)
        ),
        HierarchyParent(feature=3, depth=1, children=(4,), descendants=(4,)),
    ]
    assert hierarchy_parents(None) == []


# ---------------------------------------------------------------------------
# (a) oracle and (b) switched-off parents, through a real encode


def test_oracle_sae_scores_zero():
    model = small_model()
    hidden, acts = sample(model)
    sae = oracle_sae(model)
    result = absorption_metrics(sae.encode, sae.W_dec, model, acts, hidden)
    assert result.absorption is not None
    assert result.absorption <= 0.01
    assert result.absorption_fraction <= 0.01
    assert result.uncompensated_miss_rate <= 0.01
    assert result.parent_only_miss_rate <= 0.01
    assert result.mean_parent_latents == 1.0
    assert result.parents_without_latent == 0
    assert result.best_f1_agreement == 1.0
    assert [row.parent_latents for row in result.per_parent] == [[p] for p in range(8)]
    assert result.eligible_tokens > 8 * 1000


def test_switched_off_parents_score_one():
    model = small_model()
    hidden, acts = sample(model)
    parents = hierarchy_parents(model.hierarchy)
    sae = switch_off_parents(oracle_sae(model), model, parents)
    result = absorption_metrics(sae.encode, sae.W_dec, model, acts, hidden)
    assert result.absorption >= 0.98
    assert result.absorption_parent_mean >= 0.98
    assert result.absorption_fraction >= 0.98
    # The parent latent still fires where no child is active.
    assert result.parent_only_miss_rate <= 0.01
    # The margin keeps the child latents (cos ~0.71 with the parent) out of the
    # parent set.
    assert result.mean_parent_latents == 1.0


def test_half_the_parents_switched_off_score_their_token_share():
    model = small_model()
    hidden, acts = sample(model)
    parents = hierarchy_parents(model.hierarchy)
    switched = parents[::2]
    sae = switch_off_parents(oracle_sae(model), model, switched)
    result = absorption_metrics(sae.encode, sae.W_dec, model, acts, hidden)
    rows = {row.feature: row for row in result.per_parent}
    share = sum(rows[p.feature].eligible_tokens for p in switched) / sum(
        row.eligible_tokens for row in result.per_parent
    )
    assert result.absorption == pytest.approx(share, abs=0.01)
    assert result.absorption_parent_mean == pytest.approx(0.5, abs=0.01)
    for parent in parents:
        expected = 1.0 if parent in switched else 0.0
        assert rows[parent.feature].absorption == pytest.approx(expected, abs=0.01)


def test_oracle_under_superposition_on_the_default_data():
    # 256 features in 64-d: the pseudo-inverse misses many parent tokens, but
    # nothing reconstructs the parent in their place, so nothing is absorbed.
    model = SyntheticModel(default_synthetic_model_config(0))
    hidden, acts = sample(model, 8192)
    sae = oracle_sae(model)
    result = absorption_metrics(sae.encode, sae.W_dec, model, acts, hidden)
    assert result.absorption <= 0.02
    assert result.uncompensated_miss_rate > 0.3


def test_true_codes_on_the_default_data():
    """Codes equal to the true activations: 0; parents moved into children: 1."""
    model = SyntheticModel(default_synthetic_model_config(0))
    _, acts = sample(model, 8192)
    vectors = model.feature_dict.feature_vectors.detach()
    parents = hierarchy_parents(model.hierarchy)

    exact = AbsorptionCounter(vectors, vectors, parents)
    exact.add(acts.clone(), acts)
    assert exact.result().absorption == 0.0
    assert exact.result().uncompensated_miss_rate == 0.0

    decoder = vectors.clone()
    codes = acts.clone()
    for parent in parents:
        children = list(parent.children)
        decoder[children] += vectors[parent.feature]
        codes[(acts[:, children] > 0).any(dim=1), parent.feature] = 0
    absorbing = AbsorptionCounter(decoder, vectors, parents)
    absorbing.add(codes, acts)
    result = absorbing.result()
    # Magnitudes rise with the feature index on this data, so nearly every child
    # carries more than 0.4 of its parent along the parent direction (the rest:
    # a weak child whose direction leans away from the parent's).
    assert result.absorption >= 0.99
    assert result.absorption_fraction >= 0.99
    assert result.uncompensated_miss_rate == pytest.approx(1 - result.absorption)
    assert result.parent_only_miss_rate == 0.0


# ---------------------------------------------------------------------------
# (c) hand-computed cases on one parent (feature 0) with children 1 and 2


HAND_PARENTS = [
    HierarchyParent(feature=0, depth=0, children=(1, 2), descendants=(1, 2))
]
E = torch.eye(4)[:3]  # features 0, 1, 2 along the first three axes of 4-d


def hand_decoder() -> torch.Tensor:
    """Latent 0: parent; 1: child 1; 2: child 2 carrying the parent; 3: unused."""
    return torch.stack([E[0], E[1], E[2] + E[0], torch.eye(4)[3]])


def hand_result(codes, acts, decoder=None, **thresholds):
    counter = AbsorptionCounter(
        hand_decoder() if decoder is None else decoder,
        E,
        HAND_PARENTS,
        AbsorptionThresholds(**thresholds),
    )
    counter.add(torch.tensor(codes, dtype=torch.float), torch.tensor(acts))
    return counter.result()


# (true activations of features 0, 1, 2; codes of latents 0..3)
HAND_TOKENS = [
    ([1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]),  # parent latent fires
    ([1.0, 0.0, 1.0], [0.0, 0.0, 1.0, 0.0]),  # absorbed by latent 2
    ([1.0, 1.0, 0.0], [0.0, 1.0, 0.0, 0.0]),  # missed, child latent lacks parent
    ([1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]),  # parent only, missed
    ([1.0, 0.0, 1.0], [0.0, 0.0, 0.3, 0.0]),  # missed, absorber below 0.4 of 1
    ([2.0, 0.0, 1.0], [0.5, 0.0, 1.5, 0.0]),  # parent fires weakly: partial
    ([0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]),  # parent inactive: ignored
]


def test_hand_computed_conditions():
    acts = [a for a, _ in HAND_TOKENS]
    codes = [c for _, c in HAND_TOKENS]
    result = hand_result(codes, acts)
    row = result.per_parent[0]
    # Latent 2 has cosine 0.71 with the parent but also with child 2: not a
    # parent latent, and it is child 2's latent.
    assert row.parent_latents == [0]
    assert row.child_latents == {1: 1, 2: 2}
    assert row.eligible_tokens == 5
    assert row.absorbed_tokens == 1
    assert row.uncompensated_tokens == 2
    assert result.absorption == pytest.approx(1 / 5)
    assert result.uncompensated_miss_rate == pytest.approx(2 / 5)
    assert result.parent_only_miss_rate == 1.0
    # Fractions: 0, 1, 0, 0 (A/P = 0.3 < 0.4), 1.5 / (1.5 + 0.5) = 0.75.
    assert result.absorption_fraction == pytest.approx((1 + 0.75) / 5)
    assert result.tokens == 7


def test_an_uncompensated_miss_is_not_absorption():
    result = hand_result([[0.0, 1.0, 0.0, 0.0]], [[1.0, 1.0, 0.0]])
    assert result.absorption == 0.0
    assert result.uncompensated_miss_rate == 1.0
    assert result.absorption_fraction == 0.0


def test_a_dead_parent_latent_counts_as_absorbed_when_a_child_compensates():
    # No latent points at the parent: the parent set is empty, so condition (i)
    # holds on every token, and the compensated token counts.
    decoder = hand_decoder()
    decoder[0] = torch.eye(4)[3]
    result = hand_result(
        [[0.0, 0.0, 1.0, 0.0], [0.0, 1.0, 0.0, 0.0]],
        [[1.0, 0.0, 1.0], [1.0, 1.0, 0.0]],
        decoder=decoder,
    )
    row = result.per_parent[0]
    assert row.no_parent_latent
    assert result.parents_without_latent == 1
    assert row.absorbed_tokens == 1
    assert row.uncompensated_tokens == 1


def test_a_silent_parent_latent_is_flagged():
    result = hand_result([[0.0, 0.0, 1.0, 0.0]], [[1.0, 0.0, 1.0]])
    row = result.per_parent[0]
    assert not row.no_parent_latent
    assert row.parent_latent_silent
    assert row.absorption == 1.0


def test_a_split_parent_fires_if_any_member_fires():
    decoder = hand_decoder()
    decoder[3] = 2.0 * E[0]  # a second parent latent, decoder norm 2
    codes = [[0.0, 0.0, 1.0, 0.5], [0.0, 0.0, 1.0, 0.0]]
    acts = [[1.0, 0.0, 1.0], [1.0, 0.0, 1.0]]
    result = hand_result(codes, acts, decoder=decoder)
    row = result.per_parent[0]
    assert row.parent_latents == [0, 3]
    assert result.mean_parent_latents == 2.0
    assert row.absorbed_tokens == 1  # only the token where neither member fires
    # First token: M = 0.5 * 2 = 1 >= P = 1, so the fraction is 0.
    assert result.absorption_fraction == pytest.approx(0.5)


def test_without_the_margin_the_absorbing_latent_would_join_the_parent_set():
    acts = [a for a, _ in HAND_TOKENS]
    codes = [c for _, c in HAND_TOKENS]
    result = hand_result(codes, acts, parent_margin=0.0)
    assert result.per_parent[0].parent_latents == [0, 2]
    assert result.absorption == 0.0


def family_result(family_fires_with_child_2: bool):
    """A latent e0 + 0.9 e1 + 0.8 e2 (cosine 0.64 with the parent, 0.58 with child
    1: inside the margin), firing with child 1, and with child 2 or not."""
    decoder = torch.stack(
        [torch.eye(4)[3], E[0] + 0.9 * E[1] + 0.8 * E[2], E[2], torch.eye(4)[3]]
    )
    on_b = 1.0 if family_fires_with_child_2 else 0.0
    codes = [
        [0.0, 1.0, 0.0, 0.0],  # A: child 1
        [0.0, on_b, 1.0, 0.0],  # B: child 2
        [0.0, 1.0, 0.0, 0.0],  # C: child 1
        [0.0, 0.0, 1.0, 0.0],  # D: child 2
    ]
    acts = [[1.0, 1.0, 0.0], [1.0, 0.0, 1.0], [1.0, 1.0, 0.0], [1.0, 0.0, 1.0]]
    return hand_result(codes, acts, decoder=decoder)


def test_a_family_latent_firing_across_children_is_the_parent_latent():
    # It fires on every child-1 token and on half the parent tokens without child
    # 1 (0.5 >= 0.4 x 1): not child-specific, so it stands for the parent.
    result = family_result(family_fires_with_child_2=True)
    row = result.per_parent[0]
    assert row.parent_latents == [1]
    assert row.absorbed_tokens == 0
    assert row.uncompensated_tokens == 1  # D: latent 2 carries no parent


def test_a_latent_firing_only_with_one_child_absorbs_it():
    # The same decoder firing only with child 1 is child 1's absorber.
    result = family_result(family_fires_with_child_2=False)
    row = result.per_parent[0]
    assert row.parent_latents == []
    assert row.no_parent_latent
    assert row.child_latents[1] == 1
    assert row.absorbed_tokens == 2  # A and C: 1 x <w, e0> = 1 >= 0.4
    assert row.uncompensated_tokens == 2


def test_child_specific_compares_the_two_firing_rates():
    # 10 parent tokens, the first 5 with the closest child. Latent a fires on 4 of
    # 5 with and 1 of 5 without (0.2 < 0.4 x 0.8): specific. Latent b fires on 4 of
    # 5 with and 2 of 5 without (0.4 >= 0.32): not. Latent c never fires: not.
    parent = torch.ones(10, dtype=torch.bool)
    child = torch.arange(10) < 5
    fires = torch.zeros(10, 3, dtype=torch.bool)
    fires[[0, 1, 2, 3, 5], 0] = True
    fires[[0, 1, 2, 3, 5, 6], 1] = True
    specific = child_specific(fires, parent, child[:, None].expand(10, 3), 0.4)
    assert specific.tolist() == [True, False, False]
    # A child that is always on with the parent: cannot tell, so specific.
    always = torch.ones(10, 3, dtype=torch.bool)
    assert child_specific(fires, parent, always, 0.4).tolist() == [True] * 3


def test_two_children_sharing_one_latent_count_it_once_in_the_fraction():
    # Children 1 and 2 both best matched by latent 2 (decoder (e1+e2)/2 + e0/4):
    # A counts latent 2 once.
    decoder = torch.stack([E[0], torch.eye(4)[3], 0.5 * (E[1] + E[2]) + 0.25 * E[0]])
    decoder = torch.cat([decoder, torch.eye(4)[3:4]])
    codes = [[0.0, 0.0, 2.0, 0.0], [0.25, 0.0, 2.0, 0.0]]
    result = hand_result(codes, [[1.0, 1.0, 1.0]] * 2, decoder=decoder)
    row = result.per_parent[0]
    assert row.child_latents == {1: 2, 2: 2}
    # Latent 2 adds 2 * 0.25 = 0.5 >= 0.4 along the parent: the first token is
    # absorbed (fraction 1); on the second the parent latent fires (M = 0.25), and
    # the fraction is 0.5 / (0.5 + 0.25), not min(1.0, 0.75) / 1.0 = 0.75.
    assert row.absorbed_tokens == 1
    assert result.absorption_fraction == pytest.approx((1 + 2 / 3) / 2)


def test_absorbed_fraction_rule():
    p = torch.tensor([1.0, 1.0, 1.0, 2.0, 1.0])
    m = torch.tensor([1.0, 0.0, 0.0, 0.5, 0.2])
    a = torch.tensor([5.0, 0.39, 0.4, 3.0, 2.0])
    fraction = absorbed_fraction(p, m, a, 0.4)
    # M >= P -> 0; A/P < 0.4 -> 0; M <= 0 -> 1; a = min(3, 1.5) -> 0.75;
    # a = min(2, 0.8) = 0.8 -> 0.8.
    assert fraction.tolist() == pytest.approx([0.0, 0.0, 1.0, 0.75, 0.8])


# ---------------------------------------------------------------------------
# Units: decoder norms, scaled inputs, batch rules


def test_decoder_row_norms_do_not_change_the_score():
    model = small_model()
    hidden, acts = sample(model, 4096)
    parents = hierarchy_parents(model.hierarchy)
    sae = switch_off_parents(oracle_sae(model), model, parents[::2])
    base = absorption_metrics(sae.encode, sae.W_dec, model, acts, hidden)
    scale = torch.linspace(0.2, 5.0, sae.cfg.d_sae)
    rescaled = absorption_metrics(
        lambda x: sae.encode(x) / scale, sae.W_dec * scale[:, None], model, acts, hidden
    )
    assert rescaled.summary() == pytest.approx(base.summary())
    assert base.absorption > 0.3


def test_scaled_inputs_are_scored_in_raw_units():
    # An SAE trained behind a 0.25 norm factor: it reads 0.25 x and writes codes a
    # quarter as large. Without the scaler the absorbers would fall below 0.4 of
    # the parent and the score would drop to 0.
    model = small_model()
    hidden, acts = sample(model, 4096)
    parents = hierarchy_parents(model.hierarchy)
    sae = switch_off_parents(oracle_sae(model), model, parents)
    factor = 0.25
    scaler = ActivationScaler(scaling_factor=factor)

    def scaled_encode(x: torch.Tensor) -> torch.Tensor:
        return sae.encode(x / factor) * factor

    raw = absorption_metrics(sae.encode, sae.W_dec, model, acts, hidden)
    scaled = absorption_metrics(
        scaled_encode, sae.W_dec, model, acts, hidden, activation_scaler=scaler
    )
    assert scaled.absorption == pytest.approx(raw.absorption)
    assert scaled.absorption_fraction == pytest.approx(raw.absorption_fraction)
    assert raw.absorption >= 0.98
    unscaled = absorption_metrics(
        lambda x: sae.encode(x) * factor, sae.W_dec, model, acts, hidden
    )
    assert unscaled.absorption == 0.0


def test_encode_is_called_in_batches_of_batch_size():
    model = small_model()
    hidden, acts = sample(model, 1000)
    sae = oracle_sae(model)
    sizes: list[int] = []

    def recording_encode(x: torch.Tensor) -> torch.Tensor:
        sizes.append(x.shape[0])
        return sae.encode(x)

    result = absorption_metrics(
        recording_encode, sae.W_dec, model, acts, hidden, batch_size=256
    )
    assert sizes == [256, 256, 256, 232]
    assert result.tokens == 1000


def test_hidden_defaults_to_the_feature_dictionary_output():
    model = small_model()
    hidden, acts = sample(model, 2048)
    parents = hierarchy_parents(model.hierarchy)
    sae = switch_off_parents(oracle_sae(model), model, parents[:3])
    given = absorption_metrics(sae.encode, sae.W_dec, model, acts, hidden)
    computed = absorption_metrics(sae.encode, sae.W_dec, model, acts.to_sparse())
    assert computed.absorption == given.absorption
    assert computed.eligible_tokens == given.eligible_tokens


# ---------------------------------------------------------------------------
# (d) the metric moves both ways, and not with the confounders


def test_the_metric_separates_absorption_from_its_confounders():
    model = small_model()
    hidden, acts = sample(model, 8192)
    parents = hierarchy_parents(model.hierarchy)
    vectors = model.feature_dict.feature_vectors.detach()

    oracle = oracle_sae(model)
    absorbing = switch_off_parents(oracle_sae(model), model, parents)
    # Parent latents silenced on child tokens (encoder as absorbing) but the
    # children's decoders left alone: a recall loss, nothing reconstructs the
    # parent.
    dropping = switch_off_parents(oracle_sae(model), model, parents)
    # Hedging-like: child latents carry the parent, the parent latent still fires.
    hedging = oracle_sae(model)
    with torch.no_grad():
        dropping.W_dec.copy_(vectors)
        for parent in parents:
            for child in parent.children:
                hedging.W_dec[child] = vectors[child] + 0.5 * vectors[parent.feature]

    def score(sae: JumpReLUSAE):
        return absorption_metrics(sae.encode, sae.W_dec, model, acts, hidden)

    low, high = score(oracle), score(absorbing)
    dropped, hedged = score(dropping), score(hedging)
    assert low.absorption <= 0.01
    assert high.absorption >= 0.98
    assert dropped.absorption <= 0.01
    assert dropped.uncompensated_miss_rate >= 0.98
    assert hedged.absorption <= 0.01
    assert hedged.absorption_fraction <= 0.01


# ---------------------------------------------------------------------------
# Bad input


def test_bad_input_is_rejected_with_the_value():
    with pytest.raises(ValueError, match="absorber_share"):
        AbsorptionThresholds(absorber_share=0.0)
    with pytest.raises(ValueError, match="parent_cos"):
        AbsorptionThresholds(parent_cos=1.5)
    with pytest.raises(ValueError, match="parents is empty"):
        AbsorptionCounter(hand_decoder(), E, [])
    with pytest.raises(ValueError, match="feature index"):
        AbsorptionCounter(hand_decoder(), E, [HierarchyParent(0, 0, (7,), (7,))])
    model = small_model()
    with pytest.raises(ValueError, match="batch_size"):
        absorption_metrics(
            lambda x: x, torch.zeros(40, 64), model, torch.zeros(2, 40), batch_size=0
        )
    counter = AbsorptionCounter(hand_decoder(), E, HAND_PARENTS)
    with pytest.raises(ValueError, match="codes must have shape"):
        counter.add(torch.zeros(2, 3), torch.zeros(2, 3))
    no_hierarchy = SyntheticModel(
        SyntheticModelConfig(num_features=8, hidden_dim=4, seed=0)
    )
    with pytest.raises(ValueError, match="no feature hierarchy"):
        absorption_metrics(
            lambda x: x, torch.zeros(8, 4), no_hierarchy, torch.zeros(2, 8)
        )


def test_result_to_dict_is_json_ready():
    import json

    acts = [a for a, _ in HAND_TOKENS]
    codes = [c for _, c in HAND_TOKENS]
    payload = hand_result(codes, acts).to_dict()
    text = json.dumps(payload)
    back = json.loads(text)
    assert back["absorption"] == pytest.approx(0.2)
    assert back["absorption_by_depth"] == {"0": pytest.approx(0.2)}
    assert back["per_parent"][0]["child_latents"] == {"1": 1, "2": 2}
    # The absorbing latent 2 predicts the parent better (F1 2/3) than the parent
    # latent (1/2): the F1 cross-check disagrees with the parent set here.
    assert back["per_parent"][0]["best_f1_latent"] == 2
    assert back["per_parent"][0]["best_f1"] == pytest.approx(2 / 3)
    assert back["per_parent"][0]["best_f1_in_parent_set"] is False
    assert not math.isnan(back["absorption_fraction"])


def test_batches_can_be_split_any_way_and_few_latents_are_kept():
    model = SyntheticModel(default_synthetic_model_config(0))
    hidden, acts = sample(model, 4096)
    vectors = model.feature_dict.feature_vectors.detach()
    parents = hierarchy_parents(model.hierarchy)
    decoder = vectors.clone()
    codes = acts.clone()
    for parent in parents[:4]:
        decoder[list(parent.children)] += vectors[parent.feature]
        codes[(acts[:, list(parent.children)] > 0).any(dim=1), parent.feature] = 0
    whole = AbsorptionCounter(decoder, vectors, parents)
    whole.add(codes, acts)
    split = AbsorptionCounter(decoder, vectors, parents)
    for start in range(0, 4096, 1000):
        split.add(codes[start : start + 1000], acts[start : start + 1000])
    assert split.result().to_dict() == whole.result().to_dict()
    assert 0.3 < whole.result().absorption < 0.7
    assert len(whole.kept_latents) < vectors.shape[0] / 2
