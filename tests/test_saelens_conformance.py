"""SAELens's generic architecture checks, run against the plugin architectures.

SAELens tests each architecture for config dict round trips, for weight folds that
leave the SAE's function unchanged, and for checkpoint round trips. These are the same
properties, written for this repo, with two strengthenings: decoder rows get norms
spread over two orders of magnitude (near-equal norms hide folds that change a batch
selection), and round trips compare buffers as well as parameters, bit for bit and
dtype for dtype.
"""

from pathlib import Path
from typing import Any

import pytest
import torch
from sae_lens import SAE, SAEConfig, TrainingSAE, TrainingSAEConfig
from sae_lens.registry import (
    SAE_CLASS_REGISTRY,
    SAE_TRAINING_CLASS_REGISTRY,
    get_sae_class,
    get_sae_training_class,
)
from sae_lens.saes.sae import TrainCoefficientConfig, TrainStepInput

ARCHITECTURES = [
    arch
    for arch in ("sampled", "mutual_choice", "feature_choice")
    if arch in SAE_TRAINING_CLASS_REGISTRY
]
D_IN, D_SAE, K = 16, 48, 3

# A non-default value for every field an architecture adds, so a field that is
# dropped or renamed by a round trip shows up.
SHARED_FIELDS = {
    "k": 2.5,
    "aux_loss": "none",
    "aux_loss_coefficient": 0.25,
    "topk_threshold_lr": 0.05,
    "threshold_mode": "global",
    "zipf_alpha": 1.3,
    "zipf_tau": 0.2,
    "zipf_ema_tokens": 5000,
    "decoder_init_norm": 0.3,
}
ARCH_FIELDS = {
    "sampled": {
        "pool_factor": 2.0,
        "score": "entropy",
        "pool_mode": "top",
        "pool_seed": 7,
        "threshold_mode": "global",
    },
    "mutual_choice": {"threshold_mode": "per_feature"},
    "feature_choice": {
        "capacity_schedule": "uniform",
        "rerank_every": 9,
        "rank_by": "demand",
    },
}
# Fields that keep the batch rule deterministic: the sampled pool draw is seeded.
DETERMINISTIC = {"sampled": {"pool_seed": 0}}


def training_cfg(arch: str, **fields: Any) -> TrainingSAEConfig:
    cfg_cls = SAE_TRAINING_CLASS_REGISTRY[arch][1]
    fields = {"k": K, **DETERMINISTIC.get(arch, {}), **fields}
    return cfg_cls(d_in=D_IN, d_sae=D_SAE, **fields)


def inference_cfg(arch: str, d_sae: int = D_SAE, k: float = K) -> SAEConfig:
    return SAEConfig.from_dict(
        {
            "architecture": arch,
            "d_in": D_IN,
            "d_sae": d_sae,
            "k": k,
            **DETERMINISTIC.get(arch, {}),
        }
    )


def non_default_fields(arch: str) -> dict[str, Any]:
    cfg_cls = SAE_TRAINING_CLASS_REGISTRY[arch][1]
    fields = {**SHARED_FIELDS, **ARCH_FIELDS[arch]}
    return {
        name: v for name, v in fields.items() if name in cfg_cls.__dataclass_fields__
    }


def randomize(sae: SAE, seed: int = 0) -> torch.Tensor:
    """Random weights; decoder row norms log-spread over [0.1, 10]. Returns the norms."""
    generator = torch.Generator().manual_seed(seed)
    d_sae = sae.cfg.d_sae
    with torch.no_grad():
        for param in sae.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
        norms = torch.logspace(-1, 1, d_sae)[torch.randperm(d_sae, generator=generator)]
        sae.W_dec.mul_((norms / sae.W_dec.norm(dim=-1))[:, None])
    return norms


def set_median_thresholds(sae: Any, x: torch.Tensor) -> None:
    """Thresholds between the two middle pre-activations of each feature on ``x``.

    Half the tokens fire, and no pre-activation sits on a threshold, where float
    rounding in a fold could flip it.
    """
    hidden_pre = sae.hidden_pre(x).detach().flatten(end_dim=-2)
    middle = hidden_pre.quantile(0.5, dim=0, interpolation="midpoint")
    sae.set_thresholds(middle.relu().double())


def inputs(seed: int = 1, n: int = 64) -> torch.Tensor:
    return torch.randn(n, D_IN, generator=torch.Generator().manual_seed(seed)) * 2


def train_steps(sae: TrainingSAE, n_steps: int = 3) -> None:
    """A few training forward passes, which move every state buffer."""
    coefficients = {
        name: value.value if isinstance(value, TrainCoefficientConfig) else value
        for name, value in sae.get_coefficients().items()
    }
    for step in range(n_steps):
        sae.training_forward_pass(
            TrainStepInput(
                sae_in=inputs(seed=10 + step),
                coefficients=coefficients,
                dead_neuron_mask=torch.zeros(sae.cfg.d_sae, dtype=torch.bool),
                n_training_steps=step,
                is_logging_step=False,
            )
        )


def assert_same_state(
    actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]
):
    assert actual.keys() == expected.keys()
    for name, tensor in expected.items():
        assert actual[name].dtype == tensor.dtype, name
        assert torch.equal(actual[name], tensor), name


def encode_in_mode(sae: TrainingSAE, x: torch.Tensor, training: bool) -> torch.Tensor:
    sae.train(training)
    with torch.no_grad():
        return sae.encode(x)


# ---------------------------------------------------------------------------
# Config dict round trips
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_training_config_to_and_from_dict(arch):
    cfg = training_cfg(arch, **non_default_fields(arch))
    cfg_dict = cfg.to_dict()
    assert cfg_dict["architecture"] == arch
    restored = TrainingSAEConfig.from_dict(cfg_dict)
    assert type(restored) is type(cfg)
    assert restored.to_dict() == cfg_dict
    for name, value in non_default_fields(arch).items():
        assert getattr(restored, name) == value, name


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_inference_config_from_training_config(arch):
    cfg = training_cfg(arch, **non_default_fields(arch))
    inference = SAEConfig.from_dict(cfg.get_inference_sae_cfg_dict())
    assert type(inference) is get_sae_class(arch)[1]
    assert inference.architecture() == arch
    assert (inference.d_in, inference.d_sae) == (D_IN, D_SAE)
    # what the inference config keeps of the training fields keeps its value
    for name, value in non_default_fields(arch).items():
        if name in type(inference).__dataclass_fields__:
            assert getattr(inference, name) == value, name
    # the rest is recorded as training details
    details = inference.metadata.training_architecture_details
    assert inference.metadata.training_architecture == arch
    assert details is None or details.get("topk_threshold_lr") == 0.05
    restored = SAEConfig.from_dict(inference.to_dict())
    assert type(restored) is type(inference)
    assert restored.to_dict() == inference.to_dict()


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_every_training_key_has_an_inference_entry(arch):
    assert arch in SAE_CLASS_REGISTRY
    assert issubclass(SAE_CLASS_REGISTRY[arch][0], SAE)
    assert issubclass(SAE_TRAINING_CLASS_REGISTRY[arch][0], TrainingSAE)


# ---------------------------------------------------------------------------
# fold_W_dec_norm
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("training", [True, False], ids=["batch_rule", "thresholds"])
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_training_sae_fold_w_dec_norm_keeps_encode(arch, training):
    sae = SAE_TRAINING_CLASS_REGISTRY[arch][0](training_cfg(arch))
    norms = randomize(sae)
    x = inputs()
    set_median_thresholds(sae, x)
    before = encode_in_mode(sae, x, training)
    out_before = sae.decode(before)
    sae.fold_W_dec_norm()
    torch.testing.assert_close(sae.W_dec.norm(dim=-1), torch.ones(D_SAE))
    after = encode_in_mode(sae, x, training)
    # the decoder norms are folded into the encoder, which selects on
    # hidden_pre * ||W_dec||: same support, same codes, same output
    assert torch.equal(after != 0, before != 0)
    assert (before != 0).any()
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sae.decode(after), out_before, rtol=1e-5, atol=1e-5)
    assert norms.max() / norms.min() > 50


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_training_sae_fold_w_dec_norm_without_rescale_is_refused_or_exact(arch):
    sae = SAE_TRAINING_CLASS_REGISTRY[arch][0](
        training_cfg(arch, rescale_acts_by_decoder_norm=False)
    )
    randomize(sae)
    x = inputs()
    set_median_thresholds(sae, x)
    before = encode_in_mode(sae, x, training=True)
    out_before = sae.decode(before)
    try:
        sae.fold_W_dec_norm()
    except NotImplementedError:
        return  # TopK's answer: the fold would change the selection
    after = encode_in_mode(sae, x, training=True)
    torch.testing.assert_close(sae.decode(after), out_before, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("d_sae", [1, D_SAE])
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_inference_sae_fold_w_dec_norm_keeps_output(arch, d_sae):
    sae = SAE.from_dict(inference_cfg(arch, d_sae=d_sae, k=1).to_dict())
    norms = randomize(sae)
    x = inputs()
    set_median_thresholds(sae, x)
    with torch.no_grad():
        before = sae.encode(x)
        out_before = sae.decode(before)
        sae.fold_W_dec_norm()
        after = sae.encode(x)
        # JumpReLU semantics: codes scale with the folded norms, outputs stay
        assert torch.equal(after != 0, before != 0)
        torch.testing.assert_close(after, before * norms, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(sae.decode(after), out_before, rtol=1e-5, atol=1e-5)
    assert (before != 0).any()


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_fold_w_dec_norm_with_a_zero_decoder_row_gives_no_nan(arch):
    training = SAE_TRAINING_CLASS_REGISTRY[arch][0](training_cfg(arch))
    inference = SAE.from_dict(inference_cfg(arch).to_dict())
    x = inputs()
    for sae in (training, inference):
        randomize(sae)
        set_median_thresholds(sae, x)
        with torch.no_grad():
            sae.W_dec[3] = 0.0
            sae.fold_W_dec_norm()
        for name, tensor in sae.state_dict().items():
            if tensor.is_floating_point():
                assert not tensor.isnan().any(), name
    # A zero decoder row cannot be used by the rescaled training SAE's dense decode
    # (SAELens's act_times_W_dec divides by the row norm, as for TopK), so only the
    # inference SAE's output is checked.
    with torch.no_grad():
        assert torch.isfinite(inference.decode(inference.encode(x))).all()


# ---------------------------------------------------------------------------
# fold_activation_norm_scaling_factor
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("rescale", [True, False], ids=["rescale", "no_rescale"])
@pytest.mark.parametrize("training", [True, False], ids=["batch_rule", "thresholds"])
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_training_sae_fold_scaling_factor(arch, training, rescale):
    # Before the fold the SAE is fed x * s (the trainer's scaler); after it, raw x.
    scale = 3.0
    sae = SAE_TRAINING_CLASS_REGISTRY[arch][0](
        training_cfg(arch, rescale_acts_by_decoder_norm=rescale)
    )
    randomize(sae)
    x = inputs()
    set_median_thresholds(sae, x * scale)
    before = encode_in_mode(sae, x * scale, training)
    out_before = sae.decode(before)
    sae.fold_activation_norm_scaling_factor(scale)
    after = encode_in_mode(sae, x, training)
    # with rescaling the codes are in units of hidden_pre * ||W_dec||, and the fold
    # divides W_dec by s
    expected = before / scale if rescale else before
    assert torch.equal(after != 0, before != 0)
    assert (before != 0).any()
    torch.testing.assert_close(after, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        sae.decode(after), out_before / scale, rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_inference_sae_fold_scaling_factor(arch):
    scale = 0.4
    sae = SAE.from_dict(inference_cfg(arch).to_dict())
    randomize(sae)
    x = inputs()
    set_median_thresholds(sae, x * scale)
    with torch.no_grad():
        before = sae.encode(x * scale)
        out_before = sae.decode(before)
        sae.fold_activation_norm_scaling_factor(scale)
        after = sae.encode(x)
    assert (before != 0).any()
    assert torch.equal(after != 0, before != 0)
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        sae.decode(after), out_before / scale, rtol=1e-5, atol=1e-5
    )


# ---------------------------------------------------------------------------
# Save / load round trips, parameters and buffers
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_training_checkpoint_round_trip_is_bit_exact(arch, tmp_path: Path):
    sae = SAE_TRAINING_CLASS_REGISTRY[arch][0](training_cfg(arch))
    randomize(sae)
    train_steps(sae)
    state = {name: t.clone() for name, t in sae.state_dict().items()}
    assert any(t.dtype == torch.float64 for t in state.values())
    sae.save_model(tmp_path)

    loaded = TrainingSAE.load_from_disk(tmp_path)  # SAELens's loader
    assert type(loaded) is type(sae)
    assert loaded.cfg.to_dict() == sae.cfg.to_dict()
    assert_same_state(loaded.state_dict(), state)

    resumed = type(sae)(sae.cfg)  # SAELens's resume path
    resumed.load_weights_from_checkpoint(tmp_path)
    assert_same_state(resumed.state_dict(), state)

    x = inputs(seed=5)
    for training in (True, False):
        torch.testing.assert_close(
            encode_in_mode(loaded, x, training), encode_in_mode(sae, x, training)
        )


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_inference_export_round_trip_is_bit_exact(arch, tmp_path: Path):
    sae = SAE_TRAINING_CLASS_REGISTRY[arch][0](training_cfg(arch))
    randomize(sae)
    train_steps(sae)
    expected = {name: t.clone() for name, t in sae.state_dict().items()}
    sae.process_state_dict_for_saving_inference(expected)
    sae.save_inference_model(tmp_path)

    loaded = SAE.load_from_disk(tmp_path)
    assert type(loaded) is get_sae_class(arch)[0]
    # the batch rule's rank_scale is not in files from training: it loads as 1
    expected["rank_scale"] = torch.ones(D_SAE)
    assert_same_state(loaded.state_dict(), expected)
    x = inputs(seed=5)
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode(x), encode_in_mode(sae, x, False))

    # and the inference SAE's own save/load
    loaded.save_model(tmp_path / "again")
    again = SAE.load_from_disk(tmp_path / "again")
    assert again.cfg.to_dict() == loaded.cfg.to_dict()
    assert_same_state(again.state_dict(), loaded.state_dict())


# ---------------------------------------------------------------------------
# The batch rule after export (encode_batch)
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_exported_encode_batch_reproduces_the_training_batch_rule(arch):
    # sampled: the best-scored pool, since a seeded draw depends on the step count
    extra = {"pool_mode": "top"} if arch == "sampled" else {}
    sae = SAE_TRAINING_CLASS_REGISTRY[arch][0](training_cfg(arch, **extra))
    randomize(sae)
    train_steps(sae)
    state = {name: t.clone() for name, t in sae.state_dict().items()}
    sae.process_state_dict_for_saving_inference(state)
    exported = SAE.from_dict(sae.cfg.get_inference_sae_cfg_dict())
    exported.load_state_dict(state)
    x = inputs(seed=3)
    with torch.no_grad():
        expected = encode_in_mode(sae, x, training=True)
        actual = exported.encode_batch(x)
    assert torch.equal(actual != 0, expected != 0)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_inference_fold_w_dec_norm_keeps_encode_batch(arch):
    sae = SAE.from_dict(inference_cfg(arch).to_dict())
    norms = randomize(sae)
    x = inputs()
    with torch.no_grad():
        before = sae.encode_batch(x)
        out_before = sae.decode(before)
        sae.fold_W_dec_norm()
        if arch == "sampled":
            sae.n_batch_draws = 0  # replay the first seeded pool draw
        after = sae.encode_batch(x)
    assert torch.equal(after != 0, before != 0)
    torch.testing.assert_close(after, before * norms, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sae.decode(after), out_before, rtol=1e-5, atol=1e-5)


def test_configs_name_their_key_and_the_shared_bases_keep_saelens_own():
    from sae_lens_sampled.saes.base import (
        BatchLevelSAEConfig,
        BatchLevelTrainingSAEConfig,
    )

    for arch in ("sampled", "feature_choice", "mutual_choice"):
        assert get_sae_training_class(arch)[1].architecture() == arch
        assert get_sae_class(arch)[1].architecture() == arch
    assert BatchLevelSAEConfig.architecture() == "jumprelu"  # JumpReLUSAEConfig's
    with pytest.raises(TypeError, match="abstract"):
        BatchLevelTrainingSAEConfig(d_in=4, d_sae=8)  # type: ignore[abstract]
