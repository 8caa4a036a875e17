"""No host sync in a default training forward + backward of any architecture.

A GPU step that never waits for the host can be queued ahead and captured as one
graph. On a CPU the audit counts the ATen ops that would sync on a GPU (a value read,
or an op whose output size depends on the data) and the tensor methods that copy
values to the host without an ATen op (``tolist``, ``numpy``), on the paths an
accelerator takes (``fixed_shape_selection``; eager CPU code keeps faster
data-dependent paths, whose reads cost nothing there); on CUDA the same step runs under
``torch.cuda.set_sync_debug_mode("error")``.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest
import torch

from benchmarks.op_audit import AuditShape, audit_sae, count_ops, training_step
from sae_lens_sampled.selection import fixed_shape_selection

ARCHITECTURES: list[tuple[str, dict[str, Any]]] = [
    ("mutual_choice", {}),
    ("sampled", {}),
    ("sampled", {"pool_seed": 0}),
    ("feature_choice", {}),
]
IDS = ["mutual_choice", "sampled", "sampled-seeded", "feature_choice"]


def _syncs(step: Callable[[], object]) -> Counter[str]:
    return count_ops(step).sync_sites


def _warm_step(architecture: str, fields: dict[str, Any], device: str) -> Any:
    shape = AuditShape()
    sae = audit_sae(architecture, shape, **fields).to(device)
    step = training_step(sae, shape)
    step()  # lazy state is built on the first step
    sae.zero_grad()
    return step


@pytest.mark.parametrize(("architecture", "fields"), ARCHITECTURES, ids=IDS)
def test_training_step_has_no_sync_op(architecture: str, fields: dict[str, Any]):
    # The paths an accelerator (or torch.compile) takes, audited on the CPU.
    with fixed_shape_selection():
        step = _warm_step(architecture, fields, "cpu")
        assert _syncs(step) == Counter()


def test_audit_sees_a_sync():
    # The counter itself: a value read and a data-dependent shape are both caught.
    def run() -> None:
        x = torch.arange(4.0)
        int(x.sum())
        x[x > 1].tolist()

    names = {site.split(" at ")[0] for site in _syncs(run)}
    assert names == {"_local_scalar_dense", "index", "tolist"}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize(("architecture", "fields"), ARCHITECTURES, ids=IDS)
def test_training_step_never_syncs_on_cuda(architecture: str, fields: dict[str, Any]):
    step = _warm_step(architecture, fields, "cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode("default")


def _train(architecture: str, fields: dict[str, Any], steps: int = 3) -> Any:
    # No dead features: the aux-k loss differs between the paths in float rounding
    # only (SAELens's dense loss on a CPU, the sparse masked one on the fixed-shape
    # path; tests/test_aux_zipf.py compares them), and adds exactly 0 here.
    shape = AuditShape(d_in=16, d_sae=64, k=4, n_tokens=48, n_dead=0)
    sae = audit_sae(architecture, shape, **fields)
    outputs = []
    for seed in range(steps):
        output = training_step(sae, shape, seed=seed)()
        grads = [p.grad.clone() for p in (sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec)]
        outputs.append((output.loss.detach(), output.feature_acts.detach(), grads))
        with torch.no_grad():
            for p in sae.parameters():
                p -= 1e-2 * p.grad
        sae.zero_grad()
    return outputs, sae.state_dict()


@pytest.mark.parametrize(("architecture", "fields"), ARCHITECTURES, ids=IDS)
def test_fixed_shape_path_trains_like_the_cpu_path(
    architecture: str, fields: dict[str, Any]
):
    # Same codes, losses, gradients and state, bit for bit, on both paths.
    if architecture == "sampled" and "pool_seed" not in fields:
        fields = {**fields, "pool_seed": 3}  # the same draws on both runs
    eager, eager_state = _train(architecture, fields)
    with fixed_shape_selection():
        fixed, fixed_state = _train(architecture, fields)
    for (loss_a, acts_a, grads_a), (loss_b, acts_b, grads_b) in zip(
        eager, fixed, strict=True
    ):
        assert torch.equal(acts_a, acts_b)
        assert torch.equal(loss_a, loss_b)
        for grad_a, grad_b in zip(grads_a, grads_b, strict=True):
            assert torch.equal(grad_a, grad_b)
    for name, value in eager_state.items():
        assert torch.equal(value, fixed_state[name]), name


@pytest.mark.parametrize("seed", range(20))
def test_fixed_shape_rules_select_what_the_cpu_rules_select(seed: int):
    # Many ties (few distinct values), zeros, float32 and bfloat16.
    from sae_lens_sampled.selection import batch_topk, feature_choice_select

    generator = torch.Generator().manual_seed(seed)
    n, d = (int(v) for v in torch.randint(1, 24, (2,), generator=generator))
    acts = torch.randint(0, 4, (n, d), generator=generator).float()
    acts = acts * torch.rand((), generator=generator)
    if seed % 3 == 0:
        acts = torch.randn(n, d, generator=generator).relu()
    if seed % 4 == 0:
        acts = acts.bfloat16()
    budget = int(torch.randint(0, n * d + 1, (), generator=generator))
    capacities = torch.randint(0, n + 1, (d,), generator=generator)
    depth = int(capacities.max())
    expected = (batch_topk(acts, budget), feature_choice_select(acts, capacities))
    with fixed_shape_selection():
        got = (
            batch_topk(acts, budget),
            feature_choice_select(acts, capacities, depth=depth),
        )
    assert torch.equal(got[0], expected[0])
    assert torch.equal(got[1], expected[1])


@pytest.mark.parametrize("fixed", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rules_keep_the_smallest_subnormal_under_a_loose_budget(dtype, fixed):
    # Fewer positive entries than the budget (or a capacity): every positive entry
    # is kept, the smallest positive value of the dtype included, on both paths.
    from sae_lens_sampled.selection import batch_topk, feature_choice_select

    tiny = torch.nextafter(torch.zeros((), dtype=dtype), torch.ones((), dtype=dtype))
    acts = torch.zeros(4, 3, dtype=dtype)
    acts[0, 0], acts[2, 0], acts[1, 2] = tiny, 0.5, tiny
    capacities = torch.tensor([3, 1, 2])
    with fixed_shape_selection() if fixed else contextlib.nullcontext():
        assert torch.equal(batch_topk(acts, 6), acts)
        assert torch.equal(feature_choice_select(acts, capacities, depth=3), acts)


def test_capacity_depth_bounds_the_capacities_after_any_rerank():
    shape = AuditShape(d_in=16, d_sae=300, k=7, n_tokens=1000)
    sae = audit_sae("feature_choice", shape)
    for n_tokens in (1, 7, 64, 1000):
        depth = sae.capacity_depth(n_tokens)
        for seed in range(10):
            generator = torch.Generator().manual_seed(seed)
            sae.firing_rate.copy_(torch.rand(300, generator=generator).double())
            sae.rerank()
            assert int(sae.capacities(n_tokens).max()) <= depth


def test_fixed_size_codes_list_the_nonzeros_then_padding():
    from sae_lens_sampled.sparse import SparseCodes

    dense = torch.tensor([[0.0, 2.0, 0.0], [0.0, 0.0, 0.0], [3.0, 0.0, 1.0]])
    codes = SparseCodes.from_dense_fixed(dense, 4)
    assert codes.rows.tolist() == [0, 2, 2, 2]  # non-decreasing
    assert codes.cols.tolist() == [1, 0, 2, 0]  # padding at (last row, 0)
    assert codes.valid is not None and codes.valid.tolist() == [True] * 3 + [False]
    assert codes.row_offsets.tolist() == [0, 1, 1]
    exact = SparseCodes.from_dense(dense)
    assert codes.rows[:3].tolist() == exact.rows.tolist()
    assert codes.cols[:3].tolist() == exact.cols.tolist()


def _tied_acts(seed: int) -> tuple[torch.Generator, torch.Tensor]:
    """A random ``[n, d]`` batch of few distinct values (many ties, zeros), in
    bfloat16 for every fourth seed, and the generator that drew it."""
    generator = torch.Generator().manual_seed(seed)
    n, d = (int(v) for v in torch.randint(1, 24, (2,), generator=generator))
    acts = torch.randint(0, 4, (n, d), generator=generator).float()
    acts = acts * torch.rand((), generator=generator)
    if seed % 4 == 0:
        acts = acts.bfloat16()
    return generator, acts


@pytest.mark.parametrize("seed", range(20))
def test_batch_topk_positions_follow_the_tie_rule(seed: int):
    # The first `budget` entries by value, then by row-major position (a stable
    # sort), zeros included when fewer are positive; the batch they come from
    # returns batch_topk's codes.
    from sae_lens_sampled.global_batch import PositionsBatch
    from sae_lens_sampled.selection import batch_topk, batch_topk_positions

    generator, acts = _tied_acts(seed)
    n, d = acts.shape
    budget = int(torch.randint(1, n * d + 1, (), generator=generator))
    order = torch.sort(acts.flatten().float(), descending=True, stable=True).indices
    positions = batch_topk_positions(acts, budget)
    assert positions is not None
    assert positions.tolist() == order[:budget].sort().values.tolist()
    batch = PositionsBatch(n)
    assert torch.equal(batch.batch_topk(acts, budget), batch_topk(acts, budget))
    assert batch.positions is not None and torch.equal(batch.positions, positions)


def test_batch_topk_positions_decline_what_their_keys_cannot_hold():
    from sae_lens_sampled.selection import batch_topk_positions

    acts = torch.tensor([[0.5, 0.0], [2.0, 0.5]])
    assert batch_topk_positions(acts, 3).tolist() == [0, 2, 3]  # type: ignore[union-attr]
    assert batch_topk_positions(acts.double(), 3) is None
    assert batch_topk_positions(acts, 0) is None
    assert batch_topk_positions(acts, 5) is None


@pytest.mark.parametrize("seed", range(20))
def test_column_topk_positions_list_what_feature_choice_keeps(seed: int):
    # Many ties, zeros, float32 and bfloat16: the kept positions are the nonzero
    # entries of feature_choice_select's codes plus the zero entries it ranks within
    # a capacity; where the capacities sum to fewer than `size`, padding follows.
    from sae_lens_sampled.global_batch import PositionsBatch
    from sae_lens_sampled.selection import column_topk_positions, feature_choice_select

    generator, acts = _tied_acts(seed)
    n, d = acts.shape
    capacities = torch.randint(0, n + 1, (d,), generator=generator)
    depth = max(1, int(capacities.max()))
    total = int(capacities.sum())
    size = total + seed % 3 if total > 0 else 1
    found = column_topk_positions(acts, capacities, depth, size)
    assert found is not None
    positions, kept = found
    # Reference: per column, a stable sort by value (lower token first on ties).
    expected = sorted(
        int(row) * d + col
        for col in range(d)
        for row in torch.sort(acts[:, col].float(), descending=True, stable=True)
        .indices[: int(capacities[col])]
        .tolist()
    )
    assert positions[kept].tolist() == expected
    assert kept.tolist() == [True] * total + [False] * (size - total)
    assert positions[~kept].tolist() == [(n - 1) * d] * (size - total)
    reference = feature_choice_select(acts, capacities)
    batch = PositionsBatch(n, size)
    with fixed_shape_selection():
        dense = batch.column_topk(acts, capacities, depth)
    assert torch.equal(dense, reference)
    assert batch.positions is not None and torch.equal(batch.positions, positions)


@pytest.mark.parametrize("seed", range(6))
def test_batch_topk_counts_count_batch_topks_positive_codes(seed: int):
    from sae_lens_sampled.selection import batch_topk, batch_topk_counts

    generator = torch.Generator().manual_seed(seed)
    acts = torch.randint(0, 3, (9, 7), generator=generator).float()
    budget = int(torch.randint(1, 64, (), generator=generator))
    expected = (batch_topk(acts, budget) > 0).sum(dim=0)
    assert torch.equal(batch_topk_counts(acts, budget), expected)
    with fixed_shape_selection():
        assert torch.equal(batch_topk_counts(acts, budget), expected)
