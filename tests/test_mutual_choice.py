"""mutual_choice against SAELens's BatchTopK, and its inference SAE."""

import pytest
import torch
from sae_lens import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig

from sae_lens_sampled import (
    MutualChoiceSAE,
    MutualChoiceTrainingSAE,
    MutualChoiceTrainingSAEConfig,
)
from tests.helpers import step_input

D_IN, D_SAE = 16, 64


def twin_saes(
    k: float = 4.0, **fields
) -> tuple[MutualChoiceTrainingSAE, BatchTopKTrainingSAE]:
    mc = MutualChoiceTrainingSAE(
        MutualChoiceTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=k, **fields)
    )
    bt = BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=k))
    with torch.no_grad():
        mc.b_enc.normal_(0, 0.1)
        mc.b_dec.normal_(0, 0.1)
        # varied decoder norms, so rescale_acts_by_decoder_norm matters
        mc.W_dec.mul_(torch.rand(D_SAE, 1) * 3 + 0.1)
        bt.load_state_dict(
            {n: p.clone() for n, p in mc.named_parameters()}, strict=False
        )
    return mc, bt


@pytest.mark.parametrize("k", [1.0, 4.0, 12.5])
def test_training_encode_equals_saelens_batchtopk(k):
    mc, bt = twin_saes(k)
    x = torch.randn(32, D_IN) * 2
    ours = mc.training_forward_pass(step_input(x))
    theirs = bt.training_forward_pass(step_input(x))
    assert torch.equal(ours.feature_acts != 0, theirs.feature_acts != 0)
    torch.testing.assert_close(ours.feature_acts, theirs.feature_acts)
    torch.testing.assert_close(ours.loss, theirs.loss)
    assert (ours.feature_acts != 0).sum() == round(k * 32)


def test_aux_k_loss_equals_saelens():
    mc, bt = twin_saes()
    x = torch.randn(32, D_IN)
    dead = torch.rand(D_SAE) < 0.3
    ours = mc.training_forward_pass(step_input(x, dead))
    theirs = bt.training_forward_pass(step_input(x, dead))
    aux = "auxiliary_reconstruction_loss"
    assert ours.losses[aux] > 0
    torch.testing.assert_close(ours.losses[aux], theirs.losses[aux])


def test_global_threshold_is_ema_of_batch_minimum_selected():
    mc, bt = twin_saes(threshold_mode="global")
    lr = mc.cfg.topk_threshold_lr
    assert torch.isinf(mc.running_threshold).all()  # unable to fire before training
    expected = None
    for _ in range(3):
        x = torch.randn(32, D_IN)
        mc.training_forward_pass(step_input(x))
        acts = bt.training_forward_pass(step_input(x)).feature_acts.detach()
        batch_min = acts[acts > 0].min().double()
        # the first batch sets it, later ones move it by BatchTopK's EMA
        expected = (
            batch_min if expected is None else (1 - lr) * expected + lr * batch_min
        )
    assert mc.running_threshold.dtype == torch.float64
    torch.testing.assert_close(
        mc.running_threshold, expected.expand(D_SAE), rtol=1e-6, atol=0
    )


def test_per_feature_threshold_is_each_features_smallest_selected():
    cfg = MutualChoiceTrainingSAEConfig(
        d_in=D_IN, d_sae=D_SAE, k=4, threshold_mode="per_feature", topk_threshold_lr=1.0
    )
    sae = MutualChoiceTrainingSAE(cfg)
    out = sae.training_forward_pass(step_input(torch.randn(32, D_IN)))
    acts = out.feature_acts.detach()
    fired = (acts > 0).any(dim=0)
    expected = torch.where(acts > 0, acts, torch.inf).amin(dim=0).double()
    assert torch.equal(sae.running_threshold[fired], expected[fired])
    assert torch.isinf(sae.running_threshold[~fired]).all()


def test_threshold_not_updated_by_encode_or_eval():
    mc, _ = twin_saes()
    before = mc.running_threshold.clone()
    mc.encode(torch.randn(8, D_IN))
    mc.encode_batch(torch.randn(8, D_IN))
    mc.eval()
    mc.encode(torch.randn(8, D_IN))
    assert torch.equal(before, mc.running_threshold)


def test_eval_mode_encode_is_per_token_threshold_rule():
    mc, _ = twin_saes()
    mc.running_threshold.fill_(0.05)
    mc.eval()
    x = torch.randn(4, 5, D_IN)
    acts = mc.encode(x)
    assert acts.shape == (4, 5, D_SAE)
    # a token encodes the same alone as inside a batch
    torch.testing.assert_close(acts[2, 3], mc.encode(x[2, 3]))
    hidden = mc.hidden_pre(x)
    torch.testing.assert_close(acts, hidden.relu() * (hidden > 0.05))


def test_saved_inference_sae_matches_training_sae(tmp_path):
    mc, _ = twin_saes()
    for _ in range(3):
        mc.training_forward_pass(step_input(torch.randn(32, D_IN)))
    mc.save_inference_model(tmp_path)
    from sae_lens import SAE

    loaded = SAE.load_from_disk(tmp_path)
    assert isinstance(loaded, MutualChoiceSAE)
    mc.eval()
    x = torch.randn(3, 7, D_IN)
    torch.testing.assert_close(loaded.encode(x), mc.encode(x), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(
        loaded.encode_batch(x), mc.encode_batch(x), rtol=1e-5, atol=1e-6
    )
    torch.testing.assert_close(
        loaded.decode(loaded.encode(x)), mc.decode(mc.encode(x)), rtol=1e-5, atol=1e-5
    )
