"""aux_zipf: Zipf targets, the underutilised set, and equality with SAELens's aux-k."""

import contextlib
import math

import pytest
import torch
from sae_lens import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig, TrainingSAE
from sae_lens.saes.sae import TrainCoefficientConfig
from sae_lens.saes.topk_sae import TopKTrainingSAE, calculate_topk_aux_acts

import sae_lens_sampled
from sae_lens_sampled import (
    MutualChoiceTrainingSAE,
    MutualChoiceTrainingSAEConfig,
    SampledTrainingSAE,
    SampledTrainingSAEConfig,
)
from sae_lens_sampled.losses import (
    dead_by_rate,
    feature_zipf_targets,
    fit_zipf_exponent,
    masked_topk_aux_acts,
    underutilised_mask,
    zipf_targets,
)
from sae_lens_sampled.selection import fixed_shape_selection, usage_ranks
from tests.helpers import step_input

D_IN, D_SAE, K = 16, 64, 4.0
K_AUX = D_IN // 2

ARCHITECTURES = [
    (MutualChoiceTrainingSAE, MutualChoiceTrainingSAEConfig),
    (SampledTrainingSAE, SampledTrainingSAEConfig),
]
if hasattr(sae_lens_sampled, "FeatureChoiceTrainingSAE"):
    ARCHITECTURES.append(
        (
            sae_lens_sampled.FeatureChoiceTrainingSAE,
            sae_lens_sampled.FeatureChoiceTrainingSAEConfig,
        )
    )
ARCH_IDS = [cls.__name__ for cls, _ in ARCHITECTURES]


def make_sae(arch, **overrides):
    sae_cls, cfg_cls = arch
    settings = {"d_in": D_IN, "d_sae": D_SAE, "k": K, "aux_loss": "aux_zipf"}
    settings.update(overrides)
    sae = sae_cls(cfg_cls(**settings))
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.1)
        sae.b_dec.normal_(0, 0.1)
        # varied decoder norms, so rescale_acts_by_decoder_norm matters
        sae.W_dec.mul_(torch.rand(D_SAE, 1) * 3 + 0.1)
    return sae


def aux_loss(output) -> torch.Tensor:
    return output.losses["auxiliary_reconstruction_loss"]


# --- pure functions -------------------------------------------------------------


def test_zipf_targets_hand_computed():
    # weights 1, 1/2, 1/3, 1/4 sum to 25/12, so p = k * 12/25 * w
    torch.testing.assert_close(
        zipf_targets(4, 2.0, 1.0),
        torch.tensor([0.96, 0.48, 0.32, 0.24], dtype=torch.float64),
    )
    # alpha = 2: weights 1, 1/4, 1/9 sum to 49/36
    torch.testing.assert_close(
        zipf_targets(3, 1.0, 2.0),
        torch.tensor([36 / 49, 9 / 49, 4 / 49], dtype=torch.float64),
    )


def test_zipf_targets_cap_rates_at_one_and_keep_the_sum():
    # k = 3 would give rank 1 a rate of 1.44: it is capped at 1 and ranks 2..4
    # share the remaining 2 in proportion 1/2 : 1/3 : 1/4 (sum 13/12).
    torch.testing.assert_close(
        zipf_targets(4, 3.0, 1.0),
        torch.tensor([1.0, 12 / 13, 8 / 13, 6 / 13], dtype=torch.float64),
    )
    torch.testing.assert_close(zipf_targets(4, 4.0, 1.0), torch.ones(4).double())
    targets = zipf_targets(1000, 60.0, 1.2)
    torch.testing.assert_close(targets.sum(), torch.tensor(60.0).double())
    assert targets.max() <= 1.0
    assert (targets.diff() <= 0).all()


def test_usage_ranks_and_feature_targets():
    rates = torch.tensor([0.1, 0.5, 0.0, 0.3, 0.1], dtype=torch.float64)
    # most used first; the tie between features 0 and 4 goes by index
    assert usage_ranks(rates).tolist() == [3, 1, 5, 2, 4]
    targets = zipf_targets(5, 1.0, 1.0)
    torch.testing.assert_close(
        feature_zipf_targets(rates, 1.0, 1.0), targets[[2, 0, 4, 1, 3]]
    )


def test_underutilised_mask_hand_computed():
    # k = 1, alpha = 1: targets by rank 0.48, 0.24, 0.16, 0.12. Ranks of the
    # features below: 1, 3, 2, 4, so their targets are 0.48, 0.16, 0.24, 0.12.
    rates = torch.tensor([0.5, 0.02, 0.3, 0.0], dtype=torch.float64)
    dead = torch.tensor([True, False, False, False])

    def mask(tau, dead_mask=None):
        return underutilised_mask(rates, 1.0, 1.0, tau, dead_mask).tolist()

    # tau = 0.5: thresholds 0.24, 0.08, 0.12, 0.06
    assert mask(0.5) == [False, True, False, True]
    assert mask(0.5, dead) == [True, True, False, True]
    # tau = 0 leaves exactly the dead set
    assert mask(0.0) == [False] * 4
    assert mask(0.0, dead) == dead.tolist()
    # tau = 2: thresholds 0.96, 0.32, 0.48, 0.24
    assert mask(2.0) == [True, True, True, True]
    # tau = 0.1: thresholds 0.048, 0.016, 0.024, 0.012
    assert mask(0.1) == [False, False, False, True]


@pytest.mark.parametrize("alpha", [0.5, 1.0, 1.7])
def test_fit_zipf_exponent_recovers_an_exact_power_law(alpha):
    rates = 0.3 * torch.arange(1, 201, dtype=torch.float64).pow(-alpha)
    # order and zero-rate features do not matter
    shuffled = torch.cat([rates[torch.randperm(200)], torch.zeros(37)])
    torch.testing.assert_close(
        fit_zipf_exponent(shuffled), torch.tensor(alpha, dtype=torch.float64)
    )


def test_fit_zipf_exponent_edge_cases():
    assert abs(fit_zipf_exponent(torch.full((10,), 0.2)).item()) < 1e-12
    assert math.isnan(fit_zipf_exponent(torch.tensor([0.0, 0.4, 0.0])).item())


def test_dead_by_rate_counts_expected_firings_in_the_window():
    rates = torch.tensor([0.0, 1e-3, 4e-4, 6e-4], dtype=torch.float64)
    # 1000 tokens seen (< horizon): expected firings 0, 1, 0.4, 0.6
    seen = torch.tensor(1000.0, dtype=torch.float64)
    assert dead_by_rate(rates, seen, 10_000).tolist() == [True, False, True, False]
    # past the horizon the window is the horizon: 0, 0.1, 0.04, 0.06 per 100 tokens
    seen = torch.tensor(1e6, dtype=torch.float64)
    assert dead_by_rate(rates, seen, 100).tolist() == [True, True, True, True]


@pytest.mark.parametrize("n_masked", [0, 1, 5, K_AUX, 30])
def test_masked_topk_aux_acts_equals_saelens(n_masked):
    hidden_pre = torch.randn(12, D_SAE)
    mask = torch.zeros(D_SAE, dtype=torch.bool)
    mask[torch.randperm(D_SAE)[:n_masked]] = True
    ours = masked_topk_aux_acts(hidden_pre, mask, K_AUX)
    if n_masked == 0:
        assert torch.equal(ours, torch.zeros_like(hidden_pre))
        return
    theirs = calculate_topk_aux_acts(min(K_AUX, n_masked), hidden_pre, mask)
    assert torch.equal(ours, theirs)


# --- the loss on the training SAEs ----------------------------------------------


@pytest.mark.parametrize("arch", ARCHITECTURES, ids=ARCH_IDS)
@pytest.mark.parametrize("n_dead", [0, 3, 20])
def test_tau_zero_equals_saelens_aux_k(arch, n_dead):
    sae = make_sae(arch, zipf_tau=0.0, aux_loss_coefficient=0.7)
    with torch.no_grad():  # some history, so that tau = 0 is what empties U
        sae.firing_rate.copy_(torch.rand(D_SAE).double() * 0.1)
    x = torch.randn(32, D_IN) * 2
    dead = torch.zeros(D_SAE, dtype=torch.bool)
    dead[torch.randperm(D_SAE)[:n_dead]] = True
    assert torch.equal(sae.underutilised(dead), dead)

    out = sae.training_forward_pass(step_input(x, dead))
    assert_aux_equals_saelens(sae, x, out, dead)


def assert_aux_equals_saelens(sae, x, out, dead, scale=1.0):
    """The step's aux loss, value and gradients, equals SAELens's aux-k function
    (times ``scale``) on the same weights, inputs, codes and dead mask."""
    ours = aux_loss(out)
    theirs = (
        TopKTrainingSAE.calculate_topk_aux_loss(
            sae, x, out.sae_out, out.hidden_pre, dead
        )
        * scale
    )
    torch.testing.assert_close(ours, theirs)
    if not dead.any():
        assert ours.item() == 0.0
        return
    assert ours.item() > 0
    params = [sae.W_enc, sae.W_dec, sae.b_enc]
    for g_ours, g_theirs in zip(
        torch.autograd.grad(ours, params, retain_graph=True),
        torch.autograd.grad(theirs, params),
        strict=True,
    ):
        torch.testing.assert_close(g_ours, g_theirs)


@pytest.mark.parametrize("arch", ARCHITECTURES, ids=ARCH_IDS)
@pytest.mark.parametrize("n_dead", [0, 3, 20])
@pytest.mark.parametrize("fixed", [False, True], ids=["cpu_path", "fixed_shapes"])
def test_aux_k_equals_saelens_on_both_paths(arch, n_dead, fixed):
    # On the fixed-shape path (accelerators, compile) aux_k runs the masked, sparse
    # loss (no host read of |dead|): value and gradients equal SAELens's
    # calculate_topk_aux_loss, at the configured weight and at a scheduled one.
    sae = make_sae(arch, aux_loss="aux_k", aux_loss_coefficient=0.7)
    x = torch.randn(32, D_IN) * 2
    dead = torch.zeros(D_SAE, dtype=torch.bool)
    dead[torch.randperm(D_SAE)[:n_dead]] = True
    for coefficient in (0.7, 0.35):
        with fixed_shape_selection() if fixed else contextlib.nullcontext():
            out = sae.training_forward_pass(
                step_input(x, dead, coefficients={"aux_loss_coefficient": coefficient})
            )
        assert_aux_equals_saelens(sae, x, out, dead, scale=coefficient / 0.7)


def test_aux_k_without_a_dead_mask_is_zero():
    sae = make_sae(ARCHITECTURES[0], aux_loss="aux_k")
    out = sae.training_forward_pass(step_input(torch.randn(8, D_IN), None))
    assert aux_loss(out).item() == 0.0


def test_mutual_choice_tau_zero_equals_saelens_batchtopk_twin():
    # An independent SAELens model with copied weights, through its own forward pass.
    mc = make_sae(ARCHITECTURES[0], zipf_tau=0.0)
    bt = BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=K))
    bt.load_state_dict({n: p.clone() for n, p in mc.named_parameters()}, strict=False)
    x = torch.randn(32, D_IN)
    dead = torch.rand(D_SAE) < 0.3
    ours = mc.training_forward_pass(step_input(x, dead))
    theirs = bt.training_forward_pass(step_input(x, dead))
    assert aux_loss(theirs).item() > 0
    torch.testing.assert_close(aux_loss(ours), aux_loss(theirs))
    torch.testing.assert_close(ours.loss, theirs.loss)


@pytest.mark.parametrize("arch", ARCHITECTURES, ids=ARCH_IDS)
def test_gradient_reaches_only_underutilised_features(arch):
    sae = make_sae(arch, zipf_tau=0.5)
    # every feature at exactly its Zipf target, except three that never fired:
    # those drop to the last ranks, the rest keep their ranks and targets
    rates = zipf_targets(D_SAE, K, sae.cfg.zipf_alpha)[torch.randperm(D_SAE)]
    starved = torch.tensor([3, 17, 40])
    rates[starved] = 0.0
    with torch.no_grad():
        sae.firing_rate.copy_(rates)
    under = sae.underutilised()
    expected = torch.zeros(D_SAE, dtype=torch.bool)
    expected[starved] = True
    assert torch.equal(under, expected)

    out = sae.training_forward_pass(step_input(torch.randn(32, D_IN)))
    loss = aux_loss(out)
    assert loss.item() > 0
    g_enc, g_dec, g_b = torch.autograd.grad(loss, [sae.W_enc, sae.W_dec, sae.b_enc])
    # every U feature is among the top d_in // 2 of U on every token
    assert (g_enc[:, under].abs().sum(0) > 0).all()
    assert (g_dec[under].abs().sum(1) > 0).all()
    assert (g_b[under] != 0).all()
    assert torch.equal(g_enc[:, ~under], torch.zeros_like(g_enc[:, ~under]))
    assert torch.equal(g_dec[~under], torch.zeros_like(g_dec[~under]))
    assert torch.equal(g_b[~under], torch.zeros_like(g_b[~under]))


@pytest.mark.parametrize("arch", ARCHITECTURES, ids=ARCH_IDS)
def test_empty_underutilised_set_gives_zero_loss(arch):
    sae = make_sae(arch, zipf_tau=0.0)
    out = sae.training_forward_pass(step_input(torch.randn(16, D_IN)))
    assert aux_loss(out).item() == 0.0


# --- coefficient schedule -------------------------------------------------------


def test_get_coefficients_exposes_the_scheduled_aux_weight():
    arch = ARCHITECTURES[0]
    sae = make_sae(arch, aux_loss_coefficient=0.5, aux_loss_warm_up_steps=7)
    assert sae.get_coefficients() == {
        "aux_loss_coefficient": TrainCoefficientConfig(value=0.5, warm_up_steps=7)
    }
    assert make_sae(arch, aux_loss="none").get_coefficients() == {}


def test_aux_loss_warm_up_steps_is_validated():
    with pytest.raises(ValueError, match="aux_loss_warm_up_steps.*-1"):
        MutualChoiceTrainingSAEConfig(
            d_in=D_IN, d_sae=D_SAE, k=K, aux_loss_warm_up_steps=-1
        )


@pytest.mark.parametrize("kind", ["aux_k", "aux_zipf"])
def test_scheduled_coefficient_scales_the_loss(kind):
    sae = make_sae(ARCHITECTURES[0], aux_loss=kind, aux_loss_coefficient=0.8)
    x = torch.randn(32, D_IN)
    dead = torch.rand(D_SAE) < 0.3
    full = aux_loss(sae.training_forward_pass(step_input(x, dead)))
    sae.firing_rate.zero_()
    sae.n_tokens_seen.zero_()
    same = {"aux_loss_coefficient": 0.8}
    assert torch.equal(
        aux_loss(sae.training_forward_pass(step_input(x, dead, same))), full
    )
    sae.firing_rate.zero_()
    sae.n_tokens_seen.zero_()
    ramp = {"aux_loss_coefficient": 0.2}
    ramped = aux_loss(sae.training_forward_pass(step_input(x, dead, ramp)))
    assert full.item() > 0
    torch.testing.assert_close(ramped, full / 4)


def test_saelens_trainer_ramps_the_aux_weight(tmp_path):
    from sae_lens.config import LoggingConfig, SAETrainerConfig
    from sae_lens.training.sae_trainer import SAETrainer

    sae = make_sae(ARCHITECTURES[0], aux_loss_coefficient=0.5, aux_loss_warm_up_steps=4)
    seen = []
    calculate = sae.calculate_aux_loss

    def recording(step_input, *args, **kwargs):
        seen.append(step_input.coefficients["aux_loss_coefficient"])
        return calculate(step_input, *args, **kwargs)

    sae.calculate_aux_loss = recording
    batches = iter([torch.randn(16, D_IN) for _ in range(6)])
    cfg = SAETrainerConfig(
        n_checkpoints=0,
        checkpoint_path=None,
        save_final_checkpoint=False,
        total_training_samples=16 * 6,
        device="cpu",
        autocast=False,
        lr=1e-3,
        lr_end=1e-3,
        lr_scheduler_name="constant",
        lr_warm_up_steps=0,
        adam_beta1=0.9,
        adam_beta2=0.999,
        lr_decay_steps=0,
        n_restart_cycles=1,
        train_batch_size_samples=16,
        dead_feature_window=1000,
        feature_sampling_window=1000,
        logger=LoggingConfig(log_to_wandb=False),
        n_batches_for_norm_estimate=1,
    )
    SAETrainer(cfg=cfg, sae=sae, data_provider=batches, evaluator=None).fit()
    assert seen == [0.0, 0.125, 0.25, 0.375, 0.5, 0.5]


# --- state and metrics ----------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHITECTURES, ids=ARCH_IDS)
def test_firing_rate_updates_in_training_step_only(arch):
    sae = make_sae(arch)
    x = torch.randn(32, D_IN)
    sae.encode(x)
    sae.encode_batch(x)
    assert torch.equal(sae.firing_rate, torch.zeros(D_SAE, dtype=torch.float64))
    out = sae.training_forward_pass(step_input(x))
    # first batch: the running mean is the batch's selection rate
    expected = (out.feature_acts > 0).double().mean(0)
    torch.testing.assert_close(sae.firing_rate, expected)
    assert not sae.firing_rate.requires_grad


@pytest.mark.parametrize("arch", ARCHITECTURES, ids=ARCH_IDS)
def test_metrics_are_lazy_and_measure_the_rate_curve(arch):
    sae = make_sae(arch, zipf_tau=0.0)
    x = torch.randn(64, D_IN)
    dead = torch.zeros(D_SAE, dtype=torch.bool)
    dead[[1, 2, 5]] = True
    out = sae.training_forward_pass(step_input(x, dead))
    metrics = out.metrics
    for name in ("underutilised_features", "zipf_exponent", "dead_features_by_rate"):
        assert callable(metrics[name])
    counts = (out.feature_acts > 0).sum(0)
    assert metrics["underutilised_features"]().item() == 3  # tau = 0: the dead set
    assert metrics["dead_features_by_rate"]().item() == (counts == 0).sum().item()
    rates = counts.double() / 64
    sorted_rates = rates[rates > 0].sort(descending=True).values
    log_rank = torch.arange(1, len(sorted_rates) + 1).double().log()
    slope = torch.linalg.lstsq(
        torch.stack([log_rank, torch.ones_like(log_rank)], 1),
        sorted_rates.log()[:, None],
    ).solution[0, 0]
    torch.testing.assert_close(metrics["zipf_exponent"](), -slope)


@pytest.mark.parametrize("arch", ARCHITECTURES, ids=ARCH_IDS)
def test_state_survives_checkpoint_and_leaves_inference_export(arch, tmp_path):
    sae = make_sae(arch, zipf_tau=0.3)
    for _ in range(3):
        sae.training_forward_pass(step_input(torch.randn(32, D_IN)))
    under = sae.underutilised()
    assert 0 < under.sum() < D_SAE
    sae.save_model(tmp_path)
    loaded = TrainingSAE.load_from_disk(tmp_path)
    assert type(loaded) is type(sae)
    # bit-exact float64 state, so ranks, targets and U come back identical
    assert loaded.firing_rate.dtype == torch.float64
    assert torch.equal(loaded.firing_rate, sae.firing_rate)
    assert torch.equal(loaded.n_tokens_seen, sae.n_tokens_seen)
    assert loaded.n_tokens_seen.item() == 96
    assert torch.equal(loaded.underutilised(), under)

    state = sae.state_dict()
    sae.process_state_dict_for_saving_inference(state)
    assert "firing_rate" not in state
    assert "n_tokens_seen" not in state
