"""Property-based tests (hypothesis) of the pure selection rules."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sae_lens_sampled.selection import batch_budget, batch_topk, sampled_topk

SETTINGS = settings(max_examples=60, deadline=None)


@st.composite
def activation_batches(draw, max_tokens=12, max_features=24):
    """Post-ReLU activations, with zeros and ties on purpose."""
    n_tokens = draw(st.integers(1, max_tokens))
    d_sae = draw(st.integers(1, max_features))
    seed = draw(st.integers(0, 2**31 - 1))
    generator = torch.Generator().manual_seed(seed)
    acts = torch.randn(n_tokens, d_sae, generator=generator).relu()
    if draw(st.booleans()):  # coarse values make ties common
        acts = (acts * 2).round() / 2
    k = draw(st.floats(0.1, float(d_sae)))
    return acts, k


def assert_is_selection_of(out: torch.Tensor, acts: torch.Tensor) -> None:
    """Each output entry is either 0 or the untouched input entry."""
    assert out.shape == acts.shape
    assert (out >= 0).all()
    kept = out != 0
    assert torch.equal(out[kept], acts[kept])


@SETTINGS
@given(activation_batches())
def test_batch_topk_budget_and_largest(batch):
    acts, k = batch
    budget = batch_budget(k, acts.shape[0])
    out = batch_topk(acts, budget)
    assert_is_selection_of(out, acts)
    kept = out != 0
    assert kept.sum() <= budget
    # nothing dropped is larger than anything kept
    if kept.any() and (~kept).any():
        assert acts[~kept].max() <= out[kept].min()
    # every positive entry is kept when the budget allows it
    if (acts > 0).sum() <= budget:
        assert torch.equal(out, acts)


@SETTINGS
@given(activation_batches(), st.integers(0, 2**31 - 1))
def test_batch_topk_does_not_depend_on_token_order(batch, seed):
    acts, k = batch
    budget = batch_budget(k, acts.shape[0])
    order = torch.randperm(acts.shape[0], generator=torch.Generator().manual_seed(seed))
    out = batch_topk(acts, budget)
    out_permuted = batch_topk(acts[order], budget)
    # equal up to ties: the multiset of kept values is the same
    assert torch.equal(
        out[out != 0].sort().values, out_permuted[out_permuted != 0].sort().values
    )


@SETTINGS
@given(
    activation_batches(),
    st.floats(1.0, 6.0),
    st.sampled_from(["l2", "squared_l2", "entropy", "uniform"]),
    st.sampled_from(["sample", "top"]),
    st.integers(0, 1000),
)
def test_sampled_topk_properties(batch, pool_factor, score, pool_mode, seed):
    acts, k = batch
    n_tokens, d_sae = acts.shape
    generator = torch.Generator().manual_seed(seed)
    out = sampled_topk(acts, k, pool_factor, score, pool_mode, generator)
    assert_is_selection_of(out, acts)
    assert (out != 0).sum() <= batch_budget(k, n_tokens)
    pool = max(1, min(d_sae, round(k * pool_factor)))
    assert (out != 0).any(dim=0).sum() <= pool
    # inside the columns it used, the rule is a batch top-k
    used = (out != 0).any(dim=0)
    if used.any():
        dropped = acts[:, used][out[:, used] == 0]
        if dropped.numel():
            assert dropped.max() <= out[out != 0].min()


@SETTINGS
@given(activation_batches(), st.integers(0, 2**31 - 1))
def test_sampled_top_mode_does_not_depend_on_token_order(batch, seed):
    acts, k = batch
    order = torch.randperm(acts.shape[0], generator=torch.Generator().manual_seed(seed))
    # distinct values so that neither the pool nor the top-k has ties
    acts = acts + torch.arange(acts.numel()).view_as(acts) * 1e-4 * (acts > 0)
    out = sampled_topk(acts, k, 2.0, "l2", "top")
    out_permuted = sampled_topk(acts[order], k, 2.0, "l2", "top")
    assert torch.equal(out[order], out_permuted)


@SETTINGS
@given(activation_batches(), st.integers(0, 2**31 - 1))
def test_feature_choice_select_properties(batch, seed):
    from sae_lens_sampled.selection import capacities_for_batch, feature_choice_select

    acts, k = batch
    n_tokens, d_sae = acts.shape
    generator = torch.Generator().manual_seed(seed)
    fractions = torch.rand(d_sae, generator=generator, dtype=torch.float64) + 0.01
    fractions = fractions / fractions.sum() * k
    budget = batch_budget(k, n_tokens)
    capacities = capacities_for_batch(fractions, n_tokens, budget)
    out = feature_choice_select(acts, capacities)
    assert_is_selection_of(out, acts)
    kept = out != 0
    assert kept.sum() <= budget
    assert (kept.sum(dim=0) <= capacities).all()
    # per feature: every positive entry up to its capacity is kept, and nothing
    # dropped from a column is larger than what that column kept
    positives = (acts > 0).sum(dim=0)
    assert torch.equal(kept.sum(dim=0), torch.minimum(positives, capacities))
    for j in range(d_sae):
        column_kept, column = out[:, j][kept[:, j]], acts[:, j][~kept[:, j]]
        if column_kept.numel() and column.numel():
            assert column.max() <= column_kept.min()
