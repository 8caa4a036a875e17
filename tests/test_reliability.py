"""Bad input, degenerate batches, folding and dtypes."""

import pytest
import torch
from sae_lens import SAE, TrainingSAE

from sae_lens_sampled import (
    MutualChoiceTrainingSAE,
    MutualChoiceTrainingSAEConfig,
    SampledTrainingSAE,
    SampledTrainingSAEConfig,
)
from sae_lens_sampled.selection import fixed_shape_selection
from tests.helpers import step_input

D_IN, D_SAE = 8, 32
ARCHITECTURES = {
    "sampled": (SampledTrainingSAE, SampledTrainingSAEConfig, {"pool_factor": 2}),
    "mutual_choice": (MutualChoiceTrainingSAE, MutualChoiceTrainingSAEConfig, {}),
}


def make(name: str, **fields):
    cls, cfg_cls, defaults = ARCHITECTURES[name]
    sae = cls(cfg_cls(d_in=D_IN, d_sae=D_SAE, **{"k": 3, **defaults, **fields}))
    with torch.no_grad():
        # decoder rows of genuinely different norms: folding bugs show up only then
        sae.W_dec.mul_(torch.linspace(0.05, 4.0, D_SAE)[:, None])
        sae.b_enc.normal_(0, 0.2)
        sae.b_dec.normal_(0, 0.2)
    return sae


def trained(name: str, **fields):
    sae = make(name, **fields)
    for _ in range(4):
        sae.training_forward_pass(step_input(torch.randn(64, D_IN)))
    return sae


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("k", -1.0, r"k must be in \(0, 32\], got -1.0"),
        ("k", 33, r"k must be in \(0, 32\], got 33"),
        ("aux_loss", "auxk", "aux_loss must be one of"),
        ("threshold_mode", "both", "threshold_mode must be one of"),
        ("zipf_alpha", 0.0, r"zipf_alpha must be in \(0"),
        ("zipf_tau", -0.5, r"zipf_tau must be in \[0"),
        ("zipf_ema_tokens", 0, r"zipf_ema_tokens must be in \[1"),
        ("topk_threshold_lr", 0.0, r"topk_threshold_lr must be in \(0, 1\]"),
        ("topk_threshold_lr", 1.5, r"topk_threshold_lr must be in \(0, 1\]"),
        ("threshold_gain", 0.0, r"threshold_gain must be in \(0, 1\], got 0.0"),
        ("threshold_gain", 2.0, r"threshold_gain must be in \(0, 1\], got 2.0"),
        ("aux_loss_coefficient", -1.0, "aux_loss_coefficient must be in"),
        ("k", float("nan"), "k must be in"),
        ("check_finite_inputs", "always", "check_finite_inputs must be one of"),
    ],
)
def test_config_validation(name, field, value, message):
    cls, cfg_cls, defaults = ARCHITECTURES[name]
    with pytest.raises(ValueError, match=message):
        cfg_cls(d_in=D_IN, d_sae=D_SAE, **{"k": 3, **defaults, field: value})


def test_aux_loss_with_layer_norm_is_rejected_at_construction():
    with pytest.raises(ValueError, match="normalize_activations='layer_norm'"):
        MutualChoiceTrainingSAEConfig(
            d_in=D_IN, d_sae=D_SAE, k=3, normalize_activations="layer_norm"
        )
    # without an aux loss it is fine
    MutualChoiceTrainingSAEConfig(
        d_in=D_IN, d_sae=D_SAE, k=3, normalize_activations="layer_norm", aux_loss="none"
    )


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_wrong_width_raises_everywhere(name, tmp_path):
    sae = trained(name)
    bad = torch.randn(4, D_IN + 1)
    expected = r"d_in=8 .* shape \(4, 9\)"
    with pytest.raises(ValueError, match=expected):
        sae.training_forward_pass(step_input(bad))
    with pytest.raises(ValueError, match=expected):
        sae.encode_batch(bad)
    sae.eval()
    with pytest.raises(ValueError, match=expected):
        sae.encode(bad)
    sae.save_inference_model(tmp_path)
    inference = SAE.load_from_disk(tmp_path)
    with pytest.raises(ValueError, match=expected):
        inference.encode(bad)
    with pytest.raises(ValueError, match=expected):
        inference.encode_batch(bad)


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
@pytest.mark.parametrize("bad_value", [float("nan"), float("inf")])
@pytest.mark.parametrize("check", ["every_step", True])
def test_non_finite_batch_raises_and_changes_nothing(name, bad_value, check):
    # "every_step" on any device; the default too, eager on a CPU (a read is free)
    sae = trained(name, check_finite_inputs=check)
    before = {n: t.clone() for n, t in sae.state_dict().items()}
    x = torch.randn(16, D_IN)
    x[3, 2] = bad_value
    with pytest.raises(ValueError, match="non-finite.*(1 NaN, 0 Inf|0 NaN, 1 Inf)"):
        sae.training_forward_pass(step_input(x))
    for n, t in sae.state_dict().items():
        assert torch.equal(t, before[n]), n


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
@pytest.mark.parametrize("bad_value", [float("nan"), float("inf")])
def test_non_finite_batch_raises_at_the_next_logged_metric_and_save(
    name, bad_value, tmp_path
):
    # On the GPU path the default check costs no sync: the step goes through and the
    # error comes where a read is paid anyway, through the logged metric or a save.
    sae = trained(name)
    with fixed_shape_selection():
        good = sae.training_forward_pass(step_input(torch.randn(16, D_IN)))
        assert bool(good.metrics["inputs_finite"]())
        x = torch.randn(16, D_IN)
        x[3, 2] = bad_value
        out = sae.training_forward_pass(step_input(x))
        expected = "non-finite activations.*already applied.*'every_step'"
        with pytest.raises(ValueError, match=expected):
            out.metrics["inputs_finite"]()
        # a later clean batch does not clear it
        later = sae.training_forward_pass(step_input(torch.randn(16, D_IN)))
        with pytest.raises(ValueError, match=expected):
            later.metrics["inputs_finite"]()
        with pytest.raises(ValueError, match=expected):
            sae.save_model(tmp_path / "training")
        with pytest.raises(ValueError, match=expected):
            sae.save_inference_model(tmp_path / "inference")


def test_finite_check_off_reads_nothing():
    sae = trained("mutual_choice", check_finite_inputs=False)
    x = torch.randn(16, D_IN)
    x[0, 0] = float("nan")
    out = sae.training_forward_pass(step_input(x))
    assert "inputs_finite" not in out.metrics
    assert sae.inputs_finite is None


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_degenerate_batches(name):
    sae = trained(name)
    # a single token keeps round(k) = 3 entries
    one = sae.training_forward_pass(step_input(torch.randn(1, D_IN) * 10))
    assert (one.feature_acts != 0).sum() <= 3
    # an empty batch gives empty codes and leaves the thresholds alone
    thresholds = sae.running_threshold.clone()
    empty = sae.encode_batch(torch.randn(0, D_IN))
    assert empty.shape == (0, D_SAE)
    # all-zero pre-activations: nothing fires, thresholds unchanged
    with torch.no_grad():
        sae.b_enc.fill_(-1e4)
    zero = sae.training_forward_pass(step_input(torch.randn(16, D_IN)))
    assert (zero.feature_acts == 0).all()
    assert torch.equal(sae.running_threshold, thresholds)


def test_ties_keep_exactly_the_budget():
    sae = make("mutual_choice")
    with torch.no_grad():
        sae.W_enc.zero_()
        sae.b_enc.fill_(1.0)
        sae.W_dec.copy_(torch.nn.functional.normalize(sae.W_dec, dim=-1))
    acts = sae.encode_batch(torch.randn(10, D_IN))
    # every entry ties at 1.0: exactly round(3 * 10) of them are kept
    assert (acts != 0).sum() == 30


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_fold_activation_norm_scaling_factor(name):
    sae = trained(name, pool_seed=0) if name == "sampled" else trained(name)
    sae.eval()
    x = torch.randn(20, D_IN)
    scale = 2.5
    before_codes = sae.encode(x * scale)
    before_batch = sae.encode_batch(x * scale)
    before_out = sae(x * scale)
    sae.fold_activation_norm_scaling_factor(scale)
    # codes are in units of hidden_pre * ||W_dec||, which the fold divides by scale
    torch.testing.assert_close(sae.encode(x), before_codes / scale)
    torch.testing.assert_close(sae.encode_batch(x), before_batch / scale)
    torch.testing.assert_close(sae(x), before_out / scale, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_fold_W_dec_norm_keeps_codes_and_thresholds(name, tmp_path):
    sae = trained(name, pool_seed=0) if name == "sampled" else trained(name)
    sae.eval()
    x = torch.randn(20, D_IN)
    codes, batch, out = sae.encode(x), sae.encode_batch(x), sae(x)
    assert (codes != 0).any()
    sae.fold_W_dec_norm()
    torch.testing.assert_close(sae.W_dec.norm(dim=-1), torch.ones(D_SAE))
    torch.testing.assert_close(sae.encode(x), codes, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(sae.encode_batch(x), batch, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(sae(x), out, rtol=1e-5, atol=1e-5)
    # and the inference SAE folds its threshold too
    sae.save_inference_model(tmp_path)
    inference = SAE.load_from_disk(tmp_path)
    with torch.no_grad():
        inference.W_dec.mul_(torch.linspace(0.5, 2.0, D_SAE)[:, None])
        inference.W_enc.div_(torch.linspace(0.5, 2.0, D_SAE)[None])
        inference.b_enc.div_(torch.linspace(0.5, 2.0, D_SAE))
        inference.threshold.div_(torch.linspace(0.5, 2.0, D_SAE))
    reconstruction = inference(x)
    inference.fold_W_dec_norm()
    torch.testing.assert_close(inference(x), reconstruction, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(inference.encode(x), codes, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_bfloat16_autocast_training_keeps_float64_state(name):
    sae = make(name)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = sae.training_forward_pass(step_input(torch.randn(64, D_IN)))
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert sae.W_enc.grad is not None and torch.isfinite(sae.W_enc.grad).all()
    for buffer in ("running_threshold", "firing_rate", "n_tokens_seen"):
        assert getattr(sae, buffer).dtype == torch.float64
    assert torch.isfinite(sae.running_threshold).any()


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_checkpoint_round_trip_is_bit_exact(name, tmp_path):
    sae = trained(name)
    sae.save_model(tmp_path)
    restored = TrainingSAE.load_from_disk(tmp_path)
    original = sae.state_dict()
    assert restored.state_dict().keys() == original.keys()
    for n, t in restored.state_dict().items():
        assert t.dtype == original[n].dtype, n
        assert torch.equal(t, original[n]), n


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_inference_round_trip_is_bit_exact(name, tmp_path):
    sae = trained(name)
    sae.save_inference_model(tmp_path / "a")
    first = SAE.load_from_disk(tmp_path / "a")
    first.save_model(tmp_path / "b")
    second = SAE.load_from_disk(tmp_path / "b")
    x = torch.randn(3, 5, D_IN)
    assert torch.equal(first.encode(x), second.encode(x))
    for n, t in first.state_dict().items():
        assert torch.equal(t, second.state_dict()[n]), n


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_resume_from_checkpoint_matches_uninterrupted_training(name, tmp_path):
    from sae_lens.config import SAETrainerConfig
    from sae_lens.training.sae_trainer import SAETrainer

    steps, batch = 12, 32
    generator = torch.Generator().manual_seed(0)
    batches = [torch.randn(batch, D_IN, generator=generator) for _ in range(steps)]

    def trainer_for(sae, start, **fields):
        cfg = SAETrainerConfig(
            total_training_samples=steps * batch,
            train_batch_size_samples=batch,
            lr=1e-2,
            lr_end=1e-2,
            dead_feature_window=3,
            feature_sampling_window=5,
            **fields,
        )
        return SAETrainer(cfg, sae, iter(batches[start:]))

    fields = {"pool_seed": 0} if name == "sampled" else {}
    uninterrupted = make(name, **fields)
    initial = {n: t.clone() for n, t in uninterrupted.state_dict().items()}
    trainer = trainer_for(
        uninterrupted, 0, n_checkpoints=1, checkpoint_path=str(tmp_path)
    )
    trainer.fit()
    [checkpoint] = [p for p in tmp_path.iterdir() if p.is_dir()]
    assert int(checkpoint.name) == 7 * batch  # the first step past half way

    resumed = make(name, **fields)
    resumed.load_state_dict(initial)
    resumed.load_weights_from_checkpoint(checkpoint)
    trainer = trainer_for(resumed, 7)
    trainer.load_trainer_state(checkpoint)
    trainer.fit()
    for n, t in uninterrupted.state_dict().items():
        assert torch.equal(resumed.state_dict()[n], t), n


def test_deepcopy_selects_with_its_own_state():
    import copy

    sae = trained("sampled", pool_seed=3, pool_factor=1.5)
    twin = copy.deepcopy(sae)
    assert twin.activation_fn.__self__ is twin
    x = torch.randn(32, D_IN)
    with torch.no_grad():
        twin.n_selection_steps += 1  # the copy moves on, the original does not
    assert torch.equal(twin.encode_batch(x), copy.deepcopy(twin).encode_batch(x))
    assert not torch.equal(twin.encode_batch(x), sae.encode_batch(x))


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_fold_activation_whitening_keeps_codes_and_outputs(name):
    sae = trained(name, pool_seed=0) if name == "sampled" else trained(name)
    sae.eval()
    generator = torch.Generator().manual_seed(1)
    mean = torch.randn(D_IN, generator=generator)
    whitening = torch.randn(D_IN, D_IN, generator=generator) / D_IN**0.5
    whitening += torch.eye(D_IN)
    unwhitening = torch.linalg.inv(whitening)
    x = torch.randn(20, D_IN, generator=generator) * 2 + 1
    z = (x - mean) @ whitening  # what the SAE saw in training
    codes, batch = sae.encode(z), sae.encode_batch(z)
    output = sae(z) @ unwhitening + mean
    assert (codes != 0).any()
    sae.fold_activation_whitening(mean, whitening, unwhitening)
    # the folded SAE takes raw activations and gives the same codes and outputs
    torch.testing.assert_close(sae.encode(x), codes, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(sae.encode_batch(x), batch, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(sae(x), output, rtol=1e-4, atol=1e-4)
