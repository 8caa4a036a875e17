"""The fast training path gives the dense path's values and gradients.

Covers the two-stage ``batch_topk`` (against a flat top-k, including its fallbacks),
the sparse autograd functions (against dense references and ``gradcheck``), the
plugin's sparse training step (against SAELens's BatchTopK and against its own dense
path) and the benchmark harness's result structure.
"""

import pytest
import torch
from sae_lens import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig
from sae_lens.registry import get_sae_training_class

from sae_lens_sampled.benchmark.speed import (
    FLOOR,
    Shape,
    available_architectures,
    format_results,
    run_benchmark,
)
from sae_lens_sampled.saes.mutual_choice_sae import (
    MutualChoiceTrainingSAE,
    MutualChoiceTrainingSAEConfig,
)
from sae_lens_sampled.selection import batch_topk
from sae_lens_sampled.sparse import (
    SparseCodes,
    attach_values,
    bag_offsets,
    gather_linear,
    sparse_decode,
)
from tests.helpers import step_input

PARAMS = ("W_enc", "b_enc", "W_dec", "b_dec")


def flat_topk(acts: torch.Tensor, budget: int) -> torch.Tensor:
    """SAELens BatchTopK's selection, as the reference."""
    flat = acts.flatten()
    top = torch.topk(flat, budget)
    return torch.zeros_like(flat).scatter(0, top.indices, top.values).view_as(acts)


# --- batch_topk -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("n", "d", "budget"),
    [(32, 64, 128), (50, 300, 400), (7, 100, 3), (64, 512, 64 * 8), (5, 9, 45)],
)
@pytest.mark.parametrize("row_scales", ["equal", "heavy_tailed"])
def test_batch_topk_equals_flat_topk(
    n: int, d: int, budget: int, row_scales: str
) -> None:
    acts = torch.randn(n, d).relu()
    if row_scales == "heavy_tailed":
        # tokens of very different norms: the rows that hold many winners
        acts = acts * torch.randn(n, 1).mul(2).exp()
    assert torch.equal(batch_topk(acts, budget), flat_topk(acts, budget))


def test_batch_topk_row_with_more_winners_than_candidates() -> None:
    n, d, budget = 16, 256, 64  # 2 * ceil(64 / 16) = 8 candidates per row
    acts = torch.rand(n, d)
    acts[3] += 10.0  # row 3 holds all 64 winners, 8 times its candidate count
    out = batch_topk(acts, budget)
    assert torch.equal(out, flat_topk(acts, budget))
    assert int((out[3] > 0).sum()) == 64
    assert int((out > 0).sum()) == 64


def test_batch_topk_large_search_pool_falls_back_to_flat_topk() -> None:
    d, budget = 24, 12  # 3 rows of 8 candidates
    offsets = torch.tensor([[20.0], [10.0], [0.0]])
    acts = offsets + torch.arange(d) * 1e-3
    # candidate threshold 10.020 (row 1), so all 24 entries of row 0 join the pool,
    # which then exceeds half the matrix: the flat top-k runs
    out = batch_topk(acts, budget)
    assert torch.equal(out, flat_topk(acts, budget))
    assert torch.equal((out > 0).sum(dim=1), torch.tensor([12, 0, 0]))


def test_batch_topk_ties_keep_the_first_entries_in_row_major_order() -> None:
    n, d, budget = 4, 64, 8  # 4 candidates per row
    acts = torch.zeros(n, d)
    acts[0] = 5.0  # 64 tied entries for 8 places
    out = batch_topk(acts, budget)
    expected = torch.zeros(n, d)
    expected[0, :8] = 5.0
    assert torch.equal(out, expected)


def test_batch_topk_gradient_reaches_selected_entries_only() -> None:
    acts = torch.tensor([[3.0, 1.0, 0.0, 2.0], [0.5, 4.0, 0.2, 0.1]])
    acts.requires_grad_(True)
    batch_topk(acts, 3).sum().backward()
    assert acts.grad is not None
    expected = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.0, 1.0, 0.0, 0.0]])
    assert torch.equal(acts.grad, expected)


# --- sparse autograd functions ------------------------------------------------------


def test_sparse_decode_hand_computed() -> None:
    codes = SparseCodes.from_rows_cols(
        torch.tensor([0, 0, 2]), torch.tensor([1, 2, 0]), n_rows=3, n_cols=3
    )
    weight = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], requires_grad=True)
    values = torch.tensor([2.0, 3.0, 4.0], requires_grad=True)
    out = sparse_decode(values, weight, codes)
    # row 0: 2 * [0, 1] + 3 * [1, 1]; row 1: nothing; row 2: 4 * [1, 0]
    assert torch.equal(out, torch.tensor([[3.0, 5.0], [0.0, 0.0], [4.0, 0.0]]))
    out.backward(torch.tensor([[1.0, 2.0], [5.0, 5.0], [3.0, 0.0]]))
    assert values.grad is not None and weight.grad is not None
    # d/dvalues[e] = grad[row e] . weight[col e]
    assert torch.equal(values.grad, torch.tensor([2.0, 3.0, 3.0]))
    # d/dweight[c] = sum of values[e] * grad[row e] over entries of column c
    expected = torch.tensor([[12.0, 0.0], [2.0, 4.0], [3.0, 6.0]])
    assert torch.equal(weight.grad, expected)


def _random_codes(n: int, d_sae: int, density: float = 0.4) -> SparseCodes:
    return SparseCodes.from_dense((torch.rand(n, d_sae) < density).double())


def test_sparse_functions_gradcheck() -> None:
    n, d_in, d_sae = 5, 3, 7
    codes = _random_codes(n, d_sae)
    dtype = torch.float64
    x = torch.randn(n, d_in, dtype=dtype, requires_grad=True)
    w_enc = torch.randn(d_in, d_sae, dtype=dtype, requires_grad=True)
    b_enc = torch.randn(d_sae, dtype=dtype, requires_grad=True)
    w_dec = torch.randn(d_sae, d_in, dtype=dtype, requires_grad=True)

    def encode_decode(x, w_enc, b_enc, w_dec):
        values = gather_linear((x @ w_enc + b_enc).detach(), x, w_enc, b_enc, codes)
        return sparse_decode(values.tanh(), w_dec, codes)

    assert torch.autograd.gradcheck(encode_decode, (x, w_enc, b_enc, w_dec))


def test_sparse_functions_match_dense_reference() -> None:
    n, d_in, d_sae = 6, 4, 10
    codes = _random_codes(n, d_sae)
    mask = torch.zeros(n, d_sae)
    mask[codes.rows, codes.cols] = 1.0
    tensors = [torch.randn(n, d_in), torch.randn(d_in, d_sae), torch.randn(d_sae)]
    tensors.append(torch.randn(d_sae, d_in))
    sparse_in = [t.clone().requires_grad_(True) for t in tensors]
    dense_in = [t.clone().requires_grad_(True) for t in tensors]
    target = torch.randn(n, d_in)

    x, w_enc, b_enc, w_dec = sparse_in
    values = gather_linear((x @ w_enc + b_enc).detach(), x, w_enc, b_enc, codes)
    dense = torch.zeros(n, d_sae)
    dense[codes.rows, codes.cols] = values.detach()
    acts = attach_values(values, dense, codes)
    sparse_out = sparse_decode(values, w_dec, codes)
    ((sparse_out - target).square().sum() + acts.square().sum()).backward()

    x, w_enc, b_enc, w_dec = dense_in
    dense_acts = (x @ w_enc + b_enc) * mask
    dense_out = dense_acts @ w_dec
    ((dense_out - target).square().sum() + dense_acts.square().sum()).backward()

    assert torch.equal(acts, dense_acts.detach())
    torch.testing.assert_close(sparse_out, dense_out)
    for got, want in zip(sparse_in, dense_in, strict=True):
        torch.testing.assert_close(got.grad, want.grad)


# --- the training step --------------------------------------------------------------


def _grads_after_step(sae, x: torch.Tensor, dead: torch.Tensor):
    sae.train()
    output = sae.training_forward_pass(step_input(x, dead))
    output.loss.backward()
    return output, {name: getattr(sae, name).grad.clone() for name in PARAMS}


@pytest.mark.parametrize("rescale", [True, False])
@pytest.mark.parametrize("with_dead", [False, True])
def test_mutual_choice_matches_batchtopk_gradients(
    rescale: bool, with_dead: bool
) -> None:
    d_in, d_sae, k, n = 16, 128, 4, 64
    mc = MutualChoiceTrainingSAE(
        MutualChoiceTrainingSAEConfig(
            d_in=d_in, d_sae=d_sae, k=k, rescale_acts_by_decoder_norm=rescale
        )
    )
    bt = BatchTopKTrainingSAE(
        BatchTopKTrainingSAEConfig(
            d_in=d_in, d_sae=d_sae, k=k, rescale_acts_by_decoder_norm=rescale
        )
    )
    with torch.no_grad():
        for name in PARAMS:
            value = torch.randn_like(getattr(mc, name)) * 0.3
            if name == "W_dec":
                value *= torch.rand(d_sae, 1) * 3 + 0.1  # varied decoder norms
            getattr(mc, name).copy_(value)
            getattr(bt, name).copy_(value)
    x = torch.randn(n, d_in) * torch.randn(n, 1).exp()
    dead = torch.rand(d_sae) < 0.3 if with_dead else torch.zeros(d_sae, dtype=bool)

    mc_out, mc_grads = _grads_after_step(mc, x, dead)
    bt_out, bt_grads = _grads_after_step(bt, x, dead)

    assert mc.entries_of(mc_out.feature_acts) is not None  # the fast path ran
    assert torch.equal(mc_out.feature_acts, bt_out.feature_acts)
    assert int((mc_out.feature_acts > 0).sum()) == k * n
    torch.testing.assert_close(mc_out.sae_out, bt_out.sae_out)
    torch.testing.assert_close(mc_out.hidden_pre, bt_out.hidden_pre)
    assert mc_out.losses.keys() == bt_out.losses.keys()
    for name, loss in mc_out.losses.items():
        torch.testing.assert_close(loss, bt_out.losses[name])
    if with_dead:
        assert float(mc_out.losses["auxiliary_reconstruction_loss"].detach()) > 0
    for name in PARAMS:
        torch.testing.assert_close(mc_grads[name], bt_grads[name], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "architecture",
    [a for a in available_architectures() if a not in ("batchtopk", "topk")],
)
def test_sparse_path_matches_own_dense_path(architecture: str) -> None:
    sae_class, cfg_class = get_sae_training_class(architecture)
    extra = {"pool_seed": 3} if architecture == "sampled" else {}
    sae = sae_class(cfg_class(d_in=8, d_sae=96, k=3, **extra))
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.2)
        sae.b_dec.normal_(0, 0.2)
    dense = sae_class(cfg_class(d_in=8, d_sae=96, k=3, **extra))
    dense.load_state_dict(sae.state_dict())
    # any hook on the pre-activations sends the step down the dense path
    dense.hook_sae_acts_pre.add_hook(lambda tensor, hook: tensor)
    x = torch.randn(40, 8)
    dead = torch.rand(96) < 0.2

    sparse_out, sparse_grads = _grads_after_step(sae, x, dead)
    dense_out, dense_grads = _grads_after_step(dense, x, dead)

    assert sae.entries_of(sparse_out.feature_acts) is not None
    assert dense.entries_of(dense_out.feature_acts) is None
    assert torch.equal(sparse_out.feature_acts, dense_out.feature_acts)
    torch.testing.assert_close(sparse_out.loss, dense_out.loss)
    for name in PARAMS:
        torch.testing.assert_close(sparse_grads[name], dense_grads[name])
    # the state updates read the selected entries instead of the dense codes
    for name, buffer in sae.named_buffers():
        assert torch.equal(buffer, dense.get_buffer(name)), name
    mean_l0 = float((sparse_out.feature_acts > 0).sum()) / x.shape[0]
    assert float(sae.firing_rate.sum()) == pytest.approx(mean_l0)


def test_decode_honours_edited_codes() -> None:
    sae = MutualChoiceTrainingSAE(MutualChoiceTrainingSAEConfig(d_in=8, d_sae=32, k=2))
    with torch.no_grad():
        sae.b_dec.copy_(torch.arange(8.0))
    sae.train()
    feature_acts = sae.encode(torch.randn(5, 8))
    assert float(feature_acts.detach().abs().sum()) > 0
    with torch.no_grad():
        feature_acts.zero_()  # an ablation after encode: decode must see it
    assert torch.equal(sae.decode(feature_acts), torch.arange(8.0).expand(5, 8))

    # a hook that edits the codes is honoured as well
    sae.hook_sae_acts_post.add_hook(lambda tensor, hook: tensor * 0)
    assert torch.equal(sae(torch.randn(5, 8)), torch.arange(8.0).expand(5, 8))


# --- benchmark harness --------------------------------------------------------------


def test_benchmark_result_structure() -> None:
    shape = Shape(batch=16, d_in=8, d_sae=32, k=2)
    names = ["batchtopk", "mutual_choice"]
    (result,) = run_benchmark([shape], repeats=2, architectures=names, memory=False)
    assert result.shape == shape
    assert list(result.results) == [*names, FLOOR]
    base = result.results["batchtopk"]
    assert base.vs_batchtopk == 1.0
    assert result.results[FLOOR].vs_encoder_floor == 1.0
    for entry in result.results.values():
        assert len(entry.times_s) == 2
        assert entry.vs_batchtopk == pytest.approx(entry.median_s / base.median_s)
        assert entry.tokens_per_s is None  # absolute rates only on a GPU
    table = format_results([result])
    assert "| mutual_choice |" in table and "encoder_floor" in table


def test_shape_parse_rejects_bad_input() -> None:
    assert Shape.parse("4096,256,8192,32") == Shape(4096, 256, 8192, 32)
    with pytest.raises(ValueError, match="shape"):
        Shape.parse("4096,256,8192")
    with pytest.raises(ValueError, match="k <= d_sae"):
        Shape.parse("4,2,8,9")


@pytest.mark.parametrize("n_keys", [0, 1, 6, 257])
def test_bag_offsets_are_the_start_of_each_bag(n_keys):
    # Bags 0 and 8 stay empty with these keys; the last bag may be empty too.
    keys = torch.sort(
        torch.randint(1, 7, (n_keys,), generator=torch.Generator().manual_seed(n_keys))
    ).values
    offsets = bag_offsets(keys, 9)
    for bag in range(9):
        assert offsets[bag] == int((keys < bag).sum())  # entries of earlier bags
    assert offsets.dtype == keys.dtype and offsets.shape == (9,)
