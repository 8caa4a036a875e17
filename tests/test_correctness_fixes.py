"""Regression tests for silent wrong results found by running every rule against a
plain reference. Each test failed before its fix.

Covered: feature_choice ties on the bucketed path; inference ``encode_batch`` ranking
differently from training (no decoder-norm rescaling, covariance whitening, the
activation-norm scaling factor); ``b_enc`` added in bf16 under autocast on the sparse
path; no gradient for a hook on ``hook_sae_acts_post``; float16 scores overflowing;
the error term re-drawing the pool; empty training batches; non-finite input to
``encode_batch``; seeded inference draws that never advanced.
"""

from pathlib import Path

import pytest
import torch
from sae_lens import SAE, BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig
from sae_lens.registry import SAE_TRAINING_CLASS_REGISTRY

from sae_lens_sampled.saes.feature_choice_sae import capacities_from_fractions
from sae_lens_sampled.selection import (
    feature_choice_select,
    feature_scores,
    fixed_shape_selection,
    seeded_generator,
    select_pool,
    zipf_capacity_fractions,
)
from tests import reference
from tests.helpers import step_input

ARCHITECTURES = ("sampled", "mutual_choice", "feature_choice")
PARAMS = ("W_enc", "b_enc", "W_dec", "b_dec")


def build(arch: str, d_in: int = 8, d_sae: int = 48, **fields) -> torch.nn.Module:
    sae_class, cfg_class = SAE_TRAINING_CLASS_REGISTRY[arch]
    if arch == "sampled":
        fields = {"pool_factor": 2.0, **fields}
    sae = sae_class(cfg_class(d_in=d_in, d_sae=d_sae, **{"k": 3, **fields}))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name in PARAMS:
            param = getattr(sae, name)
            param.copy_(torch.randn(param.shape, generator=generator).to(param) * 0.5)
        # decoder norms spread over two orders of magnitude
        norms = torch.logspace(-1, 1, d_sae)[torch.randperm(d_sae, generator=generator)]
        sae.W_dec.mul_((norms / sae.W_dec.norm(dim=-1)).to(sae.W_dec)[:, None])
    return sae


def train_steps(sae, n_steps: int = 3, d_in: int = 8) -> None:
    generator = torch.Generator().manual_seed(10)
    sae.train()
    for _ in range(n_steps):
        x = torch.randn(64, d_in, generator=generator).to(sae.W_enc.dtype)
        sae.training_forward_pass(step_input(x))


def save_and_load(sae, path: Path):
    sae.save_inference_model(path)
    return SAE.load_from_disk(path, dtype=sae.cfg.dtype)


# --- feature_choice: ties on the bucketed path ---------------------------------------


def test_feature_choice_all_equal_values_keep_each_capacity_once():
    acts = torch.ones(40, 8, requires_grad=True)
    capacities = torch.tensor([20, 1, 1, 1, 1, 1, 1, 1])  # 20 > 2 * 8: bucketed
    out = feature_choice_select(acts, capacities)
    expected = torch.zeros(40, 8)
    expected[:20, 0] = 1.0  # ties go to the lower token indices
    expected[0, 1:] = 1.0
    assert torch.equal(out, expected)
    out.sum().backward()
    assert torch.equal(acts.grad, expected)  # 1 on each selected entry, 0 elsewhere


def test_feature_choice_bos_like_duplicate_rows_match_reference():
    generator = torch.Generator().manual_seed(0)
    acts = torch.randn(512, 256, generator=generator).relu()
    acts[:32] = acts[0] * 3  # 32 identical large rows, as repeated BOS tokens
    acts.requires_grad_(True)
    fractions = zipf_capacity_fractions(torch.arange(1, 257), k=16, alpha=1.0)
    capacities = capacities_from_fractions(fractions, 16, 512)
    assert int(capacities.max()) > 128  # the head is deeper than the shallow topk
    out = feature_choice_select(acts, capacities)
    expected = reference.feature_choice_mask(acts.detach(), capacities)
    assert torch.equal(out != 0, expected)
    out.sum().backward()
    # 1 on each selected entry, 0 on the others (zeros carry no gradient after ReLU)
    positive = acts.detach() > 0
    assert torch.equal(acts.grad * positive, expected.float())


# --- encode_batch selects what training selected ---------------------------------------


@pytest.mark.parametrize("arch", ["mutual_choice", "sampled"])
def test_encode_batch_matches_training_without_decoder_norm_rescaling(arch, tmp_path):
    extra = {"pool_mode": "top"} if arch == "sampled" else {}
    sae = build(arch, rescale_acts_by_decoder_norm=False, **extra)
    train_steps(sae)
    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(3))
    sae.train()
    with torch.no_grad():
        training = sae.encode(x)
    loaded = save_and_load(sae, tmp_path)
    with torch.no_grad():
        inference = loaded.encode_batch(x)
    assert (training != 0).sum() > 0
    assert torch.equal(inference != 0, training != 0)


def whitening(d_in: int, seed: int = 1) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(seed)
    mean = torch.randn(d_in, generator=generator, dtype=torch.float64)
    matrix = torch.randn(d_in, d_in, generator=generator, dtype=torch.float64)
    matrix = matrix / d_in**0.5 + torch.eye(d_in, dtype=torch.float64)
    return mean, matrix, torch.linalg.inv(matrix)


@pytest.mark.parametrize("arch", ["mutual_choice", "sampled"])
def test_encode_batch_matches_training_after_covariance_whitening_fold(arch, tmp_path):
    extra = {"pool_mode": "top"} if arch == "sampled" else {}
    sae = build(
        arch, dtype="float64", normalize_activations="covariance_whitening", **extra
    )
    train_steps(sae)
    mean, matrix, inverse = whitening(8)
    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(3)).double()
    sae.train()
    with torch.no_grad():
        training = sae.encode((x - mean) @ matrix)  # what the SAE saw in training
    # SAELens's trainer folds the whitening at the end of training (sae_trainer.py)
    sae.fold_activation_whitening(mean, matrix, inverse)
    loaded = save_and_load(sae, tmp_path)
    assert not torch.allclose(loaded.W_dec.norm(dim=-1), torch.ones(48).double())
    with torch.no_grad():
        inference = loaded.encode_batch(x)
    assert torch.equal(inference != 0, training != 0)


@pytest.mark.parametrize("rescale", [True, False])
def test_encode_batch_matches_training_after_scaling_factor_fold(rescale, tmp_path):
    sae = build("mutual_choice", dtype="float64", rescale_acts_by_decoder_norm=rescale)
    train_steps(sae)
    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(3)).double()
    scale = 2.5
    sae.train()
    with torch.no_grad():
        training = sae.encode(x * scale)
    sae.fold_activation_norm_scaling_factor(scale)
    loaded = save_and_load(sae, tmp_path)
    with torch.no_grad():
        inference = loaded.encode_batch(x)
    assert torch.equal(inference != 0, training != 0)


def test_encode_batch_after_fold_w_dec_norm_without_rescaling(tmp_path):
    sae = build("mutual_choice", rescale_acts_by_decoder_norm=False, dtype="float64")
    train_steps(sae)
    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(3)).double()
    sae.train()
    with torch.no_grad():
        training = sae.encode(x)
    loaded = save_and_load(sae, tmp_path)
    loaded.fold_W_dec_norm()
    loaded.save_model(tmp_path / "folded")
    folded = SAE.load_from_disk(tmp_path / "folded", dtype="float64")
    with torch.no_grad():
        assert torch.equal(folded.encode_batch(x) != 0, training != 0)


# --- the sparse training path ------------------------------------------------------------


def test_sparse_path_adds_b_enc_in_float32_under_autocast():
    d_in, d_sae, k, n = 64, 512, 8, 256
    ours = build("mutual_choice", d_in=d_in, d_sae=d_sae, k=k, aux_loss="none")
    dense = build("mutual_choice", d_in=d_in, d_sae=d_sae, k=k, aux_loss="none")
    dense.hook_sae_acts_pre.add_hook(lambda tensor, hook: tensor)  # the dense path
    theirs = BatchTopKTrainingSAE(
        BatchTopKTrainingSAEConfig(d_in=d_in, d_sae=d_sae, k=k, aux_loss_coefficient=0)
    )
    theirs.load_state_dict(ours.state_dict(), strict=False)
    x = torch.randn(n, d_in, generator=torch.Generator().manual_seed(1))
    outputs = []
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for sae in (ours, dense, theirs):
            sae.train()
            outputs.append(sae.training_forward_pass(step_input(x)))
    assert ours.entries_of(outputs[0].feature_acts) is not None  # the fast path ran
    acts, dense_acts, their_acts = (out.feature_acts.detach() for out in outputs)
    # bf16 products tie often; the selection is the tie rule's on float32 values
    hidden_pre = outputs[2].hidden_pre.detach()
    assert hidden_pre.dtype == torch.float32
    expected = reference.batch_topk_mask(hidden_pre.relu(), k * n)
    assert torch.equal(acts != 0, expected)
    assert torch.equal(dense_acts, acts)
    # and SAELens's BatchTopK keeps the same values (ties in other places)
    assert torch.equal(
        acts[acts != 0].sort().values, their_acts[their_acts != 0].sort().values
    )


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_hook_on_acts_post_receives_gradient_in_training_mode(arch):
    sae = build(
        arch, aux_loss="none", **({"pool_seed": 0} if arch == "sampled" else {})
    )
    plain = build(
        arch, aux_loss="none", **({"pool_seed": 0} if arch == "sampled" else {})
    )
    x = torch.randn(32, 8, generator=torch.Generator().manual_seed(2))
    seen: dict[str, torch.Tensor] = {}

    def keep_grad(tensor, hook):
        tensor.retain_grad()
        seen["acts"] = tensor

    sae.hook_sae_acts_post.add_hook(keep_grad)
    sae.train()
    plain.train()
    out = sae(x)
    out.pow(2).sum().backward()
    acts = seen["acts"]
    assert acts.grad is not None
    # the gradient the decoder sends back to the codes, computed by hand
    expected = 2 * out.detach() @ sae.W_dec.detach().T
    if sae.cfg.rescale_acts_by_decoder_norm:
        expected = expected / sae.W_dec.detach().norm(dim=-1)
    torch.testing.assert_close(acts.grad, expected, rtol=1e-4, atol=1e-4)
    # without hooks the sparse path still runs, with the same codes
    with torch.no_grad():
        plain_acts = plain.encode(x)
    assert plain.entries_of(plain_acts) is not None
    assert torch.equal(plain_acts, acts.detach())


def test_hook_gradient_matches_saelens_batchtopk():
    ours = build("mutual_choice", d_sae=64, k=4, aux_loss="none")
    theirs = BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(d_in=8, d_sae=64, k=4))
    theirs.load_state_dict(ours.state_dict(), strict=False)
    x = torch.randn(32, 8, generator=torch.Generator().manual_seed(2))
    grads = []
    for sae in (ours, theirs):
        seen: list[torch.Tensor] = []

        def keep_grad(tensor, hook, seen=seen):
            tensor.retain_grad()
            seen.append(tensor)

        sae.hook_sae_acts_post.add_hook(keep_grad)
        sae.train()
        sae(x).pow(2).sum().backward()
        grads.append(seen[0].grad)
    assert grads[0] is not None
    torch.testing.assert_close(grads[0], grads[1])


# --- sampled ---------------------------------------------------------------------------


def test_float16_scores_do_not_overflow():
    generator = torch.Generator().manual_seed(0)
    acts = (torch.rand(256, 32, generator=generator) * 30).half()
    for score in ("l2", "squared_l2", "entropy"):
        scores = feature_scores(acts, score)
        assert bool(scores.isfinite().all()), score
        torch.testing.assert_close(
            scores.double(),
            reference.feature_scores(acts.double(), score),
            rtol=1e-3,
            atol=0,
        )
    # a finite score keeps the draw random: two seeds, two pools
    scores = feature_scores(acts, "squared_l2")
    pools = {
        tuple(select_pool(scores, 8, "sample", seeded_generator(s, 0, "cpu")).tolist())
        for s in range(5)
    }
    assert len(pools) > 1


def test_unseeded_sampled_error_term_returns_input():
    sae_class, cfg_class = SAE_TRAINING_CLASS_REGISTRY["sampled"]
    sae = sae_class(cfg_class(d_in=16, d_sae=64, k=4, pool_factor=2), True)
    with torch.no_grad():
        for param in sae.parameters():
            param.copy_(torch.randn_like(param) * 0.3)
    sae.train()
    x = torch.randn(32, 16)
    with torch.no_grad():
        torch.testing.assert_close(sae(x), x, rtol=1e-5, atol=1e-5)


# --- empty batches ------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("shape", [(0, 8), (2, 0, 8)])
def test_empty_batch_training_forward_returns_empty_output(arch, shape):
    sae = build(arch)
    theirs = BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(d_in=8, d_sae=48, k=3))
    sae.train()
    theirs.train()
    x = torch.zeros(shape)
    out = sae(x)
    assert out.shape == theirs(x).shape == shape
    assert sae.encode(x).shape == (*shape[:-1], 48)


# --- inference encode_batch: non-finite input, seeded draws ---------------------------


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_encode_batch_rejects_non_finite_input(arch, tmp_path):
    sae = build(arch, **({"pool_seed": 0} if arch == "sampled" else {}))
    train_steps(sae)
    loaded = save_and_load(sae, tmp_path)
    x = torch.randn(16, 8)
    x[3, 2] = torch.nan
    x[5, 0] = torch.inf
    for model in (loaded, sae):
        with pytest.raises(ValueError, match=r"encode_batch input .*1 NaN, 1 Inf"):
            model.encode_batch(x)
    # the per-token encode confines the damage to the bad tokens
    clean = torch.randn(16, 8)
    mixed = clean.clone()
    mixed[3] = torch.nan
    with torch.no_grad():
        codes, expected = loaded.encode(mixed), loaded.encode(clean)
    others = torch.arange(16) != 3
    assert torch.equal(codes[others], expected[others])


def test_seeded_inference_draws_advance_and_replay(tmp_path):
    sae = build("sampled", d_sae=64, k=2, pool_seed=5, dtype="float64")
    train_steps(sae)
    loaded = save_and_load(sae, tmp_path)
    x = torch.randn(16, 8, generator=torch.Generator().manual_seed(4)).double()
    with torch.no_grad():
        first = [loaded.encode_batch(x) for _ in range(4)]
        assert (
            len({tuple((c != 0).any(0).nonzero().flatten().tolist()) for c in first})
            > 1
        )
        again = SAE.load_from_disk(tmp_path, dtype="float64")
        assert all(torch.equal(again.encode_batch(x), c) for c in first)
        # draw i uses the stream of training step i
        sae.train()
        for step, codes in enumerate(first):
            sae.n_selection_steps.fill_(step)
            assert torch.equal(sae.encode(x) != 0, codes != 0)


# --- found by the differential tests --------------------------------------------------


@pytest.mark.parametrize("score", ["l2", "squared_l2", "entropy"])
@pytest.mark.parametrize(
    ("n", "d", "dtype"), [(18, 17, torch.float64), (1000, 333, torch.float32)]
)
def test_identical_columns_score_equal_and_top_pool_takes_lower_indices(
    score, n, d, dtype
):
    # a reduction along dim 0 rounded some of these identical columns differently
    acts = torch.full((n, d), 0.5, dtype=dtype)
    scores = feature_scores(acts, score)
    assert scores.unique().numel() == 1
    assert torch.equal(select_pool(scores, 10, "top"), torch.arange(10))


def test_zero_decoder_row_gives_finite_dense_training_output():
    sae = build("mutual_choice", aux_loss="none")
    with torch.no_grad():
        sae.W_dec[5] = 0.0
    sae.hook_sae_acts_pre.add_hook(lambda tensor, hook: tensor)  # the dense path
    sae.train()
    output = sae.training_forward_pass(step_input(torch.randn(16, 8)))
    assert bool(output.sae_out.isfinite().all())
    output.loss.backward()
    assert all(bool(getattr(sae, p).grad.isfinite().all()) for p in PARAMS)


def test_zero_decoder_row_among_dead_features_gives_a_finite_aux_loss():
    # The sparse aux-k decodes its picks without dividing by their decoder norms
    # (they cancel), so a dead feature with a zero decoder row adds 0, not NaN.
    sae = build("mutual_choice", aux_loss="aux_k")
    with torch.no_grad():
        sae.W_dec[5] = 0.0
        sae.b_enc[5] = 10.0  # the dead feature's pre-activation is the largest
    dead = torch.zeros(48, dtype=torch.bool)
    dead[[5, 7, 9]] = True
    sae.train()
    with fixed_shape_selection():
        output = sae.training_forward_pass(step_input(torch.randn(16, 8), dead))
    aux = output.losses["auxiliary_reconstruction_loss"]
    assert bool(aux.isfinite()) and float(aux) > 0
    output.loss.backward()
    assert all(bool(getattr(sae, p).grad.isfinite().all()) for p in PARAMS)


def test_inference_select_is_encode_batchs_rule(tmp_path):
    # calibrate_thresholds calls select on relu(hidden_pre): it must be the rule that
    # encode_batch applies, also where the decoder rows are not unit norm
    sae = build("mutual_choice", rescale_acts_by_decoder_norm=False)
    train_steps(sae)
    loaded = save_and_load(sae, tmp_path)
    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        for model in (loaded, SAE.load_from_disk(tmp_path, fold_W_dec_norm=True)):
            acts = model.hidden_pre(x).relu()
            assert torch.equal(model.select(acts), model.encode_batch(x))
