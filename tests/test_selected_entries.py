"""The sparse path's codes travel as a typed value the SAE keeps, not on the tensor."""

import copy

import torch

from sae_lens_sampled import MutualChoiceTrainingSAE, MutualChoiceTrainingSAEConfig
from tests.helpers import step_input


def trained_sae() -> tuple[MutualChoiceTrainingSAE, torch.Tensor]:
    torch.manual_seed(0)
    sae = MutualChoiceTrainingSAE(MutualChoiceTrainingSAEConfig(d_in=4, d_sae=8, k=2))
    acts = sae.training_forward_pass(step_input(torch.randn(6, 4))).feature_acts
    return sae, acts


def test_the_entries_are_those_of_the_codes_the_step_returned():
    sae, acts = trained_sae()
    entries = sae.entries_of(acts)
    assert entries is not None
    dense = torch.zeros(6, 8).index_put_(
        (entries.codes.rows, entries.codes.cols), entries.values.detach()
    )
    assert torch.equal(dense, acts.detach())
    assert int((acts != 0).sum()) == 12  # k * n entries


def test_another_tensor_or_an_edited_one_has_no_entries():
    sae, acts = trained_sae()
    assert sae.entries_of(acts.detach().clone()) is None
    assert sae.entries_of(acts * 1) is None
    with torch.no_grad():
        acts.mul_(2)  # decode must see the edit: the dense path
    assert sae.entries_of(acts) is None


def test_the_entries_never_keep_the_codes_alive():
    sae, acts = trained_sae()
    entries = sae.entries_of(acts)
    del acts
    assert entries is not None and entries.dense() is None


def test_a_copy_after_a_step_carries_no_entries():
    sae, acts = trained_sae()
    twin = copy.deepcopy(sae)
    assert twin.selected_entries is None
    for name, value in sae.state_dict().items():
        assert torch.equal(twin.state_dict()[name], value), name


def test_decode_reuses_the_encodes_decoder_norms_only_while_w_dec_is_unchanged():
    sae, acts = trained_sae()
    entries = sae.entries_of(acts)
    assert entries is not None and entries.norms is not None
    norms = sae.W_dec.norm(dim=-1)
    assert torch.equal(entries.norms.of_entries, norms[entries.codes.cols])
    # Dense decode of the same codes, with the norms of W_dec as it is at decode time.
    dense = acts.detach().clone()
    torch.testing.assert_close(sae.decode(acts), sae.decode(dense))
    with torch.no_grad():
        sae.W_dec.mul_(torch.linspace(0.5, 2.0, 8)[:, None])  # new norms
    assert sae.entries_of(acts) is entries  # the codes themselves are unchanged
    torch.testing.assert_close(sae.decode(acts), sae.decode(dense))
