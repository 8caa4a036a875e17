"""Data-parallel training: 2 gloo ranks against one process on the whole batches.

One set of 2 spawned processes (loopback, 1 thread each) trains every parity case,
checks the selection primitives on awkward inputs and a checkpoint resume; the tests
below read what they saved. The reference is SAELens's own ``SAETrainer`` fed the
concatenated batches, in this process.
"""

from __future__ import annotations

import math

import pytest
import torch
from sae_lens.config import SAETrainerConfig
from sae_lens.training.sae_trainer import SAETrainer

from sae_lens_sampled.distributed import costs, launch
from sae_lens_sampled.distributed.comm import Comm
from sae_lens_sampled.distributed.global_select import (
    _segment_kth,
    column_top_keys,
    global_feature_choice_mask,
    global_feature_scores,
    token_keys,
)
from sae_lens_sampled.distributed.step import DataParallelStep, data_parallel_step
from sae_lens_sampled.distributed.trainer import DistributedSAETrainer
from sae_lens_sampled.selection import batch_topk, feature_choice_select, feature_scores
from sae_lens_sampled.shape import Shape
from tests import parity
from tests.parity import global_topk_mask

WORLD = 2
N_STEPS = 14
BATCH = 64
CASES = sorted(parity.parity_cases())


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    out_dir = tmp_path_factory.mktemp("data_parallel")
    launch.spawn(parity.parity_worker, WORLD, "cpu", (str(out_dir), N_STEPS, BATCH))
    return [
        torch.load(out_dir / f"rank{rank}.pt", weights_only=False)
        for rank in range(WORLD)
    ]


@pytest.fixture(scope="module")
def reference() -> dict:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return parity.reference_states(N_STEPS, BATCH)
    finally:
        torch.set_num_threads(threads)


# --- W ranks train the same SAE as one process ---------------------------------


@pytest.mark.parametrize("case", CASES)
def test_two_ranks_match_one_process(case, ranks, reference):
    ours = ranks[0]["cases"][case]["state"]
    expected = reference[case]["state"]
    assert ours.keys() == expected.keys()
    diffs = parity.max_differences(ours, expected)
    for name in ("W_enc", "W_dec", "b_enc", "b_dec"):
        assert diffs[name] < 1e-5, (name, diffs[name])
    # thresholds (float64 EMAs of float32 values) and firing rates
    assert diffs["running_threshold"] < 1e-5
    assert diffs["firing_rate"] < 1e-9
    # counters: equal, not close
    for name, value in expected.items():
        if name.startswith("trainer.") or not value.is_floating_point():
            assert torch.equal(ours[name], value), name
    assert torch.equal(ours["n_tokens_seen"], expected["n_tokens_seen"])
    # the case exercised something: features fired, dead ones were seen
    assert expected["trainer.act_freq_scores"].sum() > 0
    assert torch.isfinite(expected["running_threshold"]).any()


@pytest.mark.parametrize("case", CASES)
def test_replicas_identical_across_ranks(case, ranks):
    first, second = (r["cases"][case]["state"] for r in ranks)
    for name, value in first.items():
        assert torch.equal(value, second[name]), name


@pytest.mark.parametrize("case", CASES)
def test_each_rank_encodes_only_its_shard(case, ranks, reference):
    for result in ranks:
        assert result["cases"][case]["rows"] == {
            "rows": N_STEPS * BATCH // WORLD,
            "calls": N_STEPS,
        }
    assert reference[case]["rows"]["rows"] == N_STEPS * BATCH


@pytest.mark.parametrize("case", CASES)
def test_selection_traffic_is_small(case, ranks):
    calls, sent = ranks[0]["cases"][case]["traffic"]["selection"]
    gathered_matrix = BATCH * parity.D_SAE * 4  # what gathering [B, d_sae] would send
    assert sent / N_STEPS < gathered_matrix / 4
    _, gradient_bytes = ranks[0]["cases"][case]["traffic"]["gradients"]
    assert gradient_bytes > 0


def test_counted_traffic_equals_the_model(ranks):
    shape = Shape(BATCH, parity.D_IN, parity.D_SAE, int(parity.K))
    traffic = ranks[0]["cases"]["mutual_choice"]["traffic"]
    assert traffic["selection"] == (
        2 * N_STEPS,  # candidates and tie counts; no exact second round at W=2
        N_STEPS * costs.selection_bytes("mutual_choice", shape, WORLD),
    )
    assert traffic["stats"][1] == N_STEPS * costs.stats_bytes(shape, WORLD)
    assert traffic["gradients"][1] == N_STEPS * costs.gradient_bytes(shape, WORLD)


def test_measure_traffic_counts_what_the_model_says():
    """``costs traffic --measure``: 2 ranks started from the package's launcher."""
    shape = Shape(BATCH, parity.D_IN, 2 * parity.D_SAE, int(parity.K) + 1)
    per_rank = costs.measure_traffic([shape], world=WORLD)
    assert len(per_rank) == WORLD
    for results in zip(*per_rank, strict=True):
        arch = results[0]["arch"]
        for result in results:
            assert result["traffic"]["stats"][1] == costs.stats_bytes(shape, WORLD)
            # feature_choice's model is an estimate: L from the starting capacities
            if arch != "feature_choice":
                sent = result["traffic"]["selection"][1]
                assert sent == costs.selection_bytes(arch, shape, WORLD), arch


def test_per_rank_rules_would_differ():
    """The parity data is one on which selecting per shard gives other entries."""
    batches = parity.make_batches(1, BATCH, parity.D_IN)
    for name, case in parity.parity_cases().items():
        sae = parity._init(case.build(), 0)
        with torch.no_grad():
            pre = sae.hidden_pre(batches[0]).relu()
            whole = sae.select(pre) != 0
            halves = torch.cat([sae.select(part) != 0 for part in pre.chunk(WORLD)])
        assert not torch.equal(whole, halves), name


def test_resume_on_same_world_size_is_bit_exact(ranks):
    assert all(result["resume_exact"] for result in ranks)


# --- the primitives on awkward inputs ------------------------------------------


@pytest.mark.parametrize("scenario", sorted(parity.primitive_scenarios(WORLD)))
def test_global_masks_equal_stable_single_process_rule(scenario, ranks):
    expected = parity.reference_primitives(WORLD)[scenario]
    got = torch.cat([result["primitives"][scenario][0] for result in ranks])
    assert torch.equal(got, expected)


def test_skewed_shards_take_the_exact_fallback_round(ranks):
    calls = [r["primitives"]["topk_skewed"][1] for r in ranks]
    # candidates (optimistic), candidates (exact), tie counts
    assert calls == [3, 3]
    assert [r["primitives"]["topk_random"][1] for r in ranks] == [2, 2]


# --- one process: the same code path, no process group --------------------------


def test_single_process_comm_is_identity():
    comm = Comm()
    t = torch.arange(4.0)
    assert comm.world_size == 1 and not comm.active
    assert comm.all_reduce(t) is t
    assert torch.equal(comm.all_gather(t, "selection"), t[None])
    assert comm.counter.snapshot() == {}


def test_token_keys_order_by_value_then_lower_token():
    acts = torch.tensor([[1.0, 0.0], [2.0, -0.0], [1.0, 0.5]])
    keys = token_keys(acts, first_token=10)
    # column 0: token 11 (2.0) > token 10 (1.0, lower token) > token 12 (1.0)
    assert torch.argsort(keys[:, 0], descending=True).tolist() == [1, 0, 2]
    assert (keys[:2, 1] >> 32).tolist() == [0, 0]  # 0.0 and -0.0 both value bits 0
    assert keys[2, 1] >> 32 > 0


def test_column_top_keys_layout_and_padding():
    acts = torch.tensor([[0.5, 0.1, 0.9], [0.7, 0.3, 0.8]])
    depths = torch.tensor([1, 0, 3])
    top, cols, rows = column_top_keys(acts, depths, n_rows_max=3, first_token=5)
    # feature-major, buckets by depth; column 2 wants 3 of 2 rows: one pad
    assert cols.tolist() == [0, 2, 2, 2]
    assert rows.tolist() == [1, 0, 1, -1]
    expected = token_keys(acts, first_token=5)
    assert top.tolist() == [
        expected[1, 0].item(),
        expected[0, 2].item(),
        expected[1, 2].item(),
        -1,
    ]


def test_column_top_keys_break_ties_by_lower_token():
    # the 2nd and 3rd largest tie at 1.0: the lower token makes the cut
    acts = torch.tensor([[1.0, 0.0], [2.0, 0.0], [1.0, 0.0], [0.5, 0.0]])
    _, cols, rows = column_top_keys(
        acts, torch.tensor([2, 2]), n_rows_max=4, first_token=0
    )
    assert rows[cols == 0].sort().values.tolist() == [0, 1]
    flipped = acts.flip(0)  # now the tied 1.0s sit at rows 1 and 3
    _, cols, rows = column_top_keys(
        flipped, torch.tensor([2, 2]), n_rows_max=4, first_token=0
    )
    assert rows[cols == 0].sort().values.tolist() == [1, 2]


def test_segment_kth():
    keys = torch.tensor([4, 9, 1, 7, 3, 8])
    cols = torch.tensor([0, 1, 0, 1, 0, 2])
    cut = _segment_kth(keys, cols, torch.tensor([3, 2, 1]), torch.tensor([2, 1, 0]))
    assert cut.tolist() == [3, 9, torch.iinfo(torch.int64).max]


def test_feature_scores_from_sums_match_single_process():
    acts = torch.rand(50, 12) * (torch.rand(50, 12) > 0.5)
    acts[:, 3] = 0  # an all-zero column
    acts[:, 4] = 0
    acts[7, 4] = 2.0  # a one-token column
    for score in ("l2", "squared_l2", "entropy", "uniform"):
        # whole, and in row chunks of 7 (the float64 copy is made per chunk)
        for chunk_bytes in (1 << 28, 8 * 12 * 7):
            got = global_feature_scores(acts, score, Comm(), chunk_bytes)
            torch.testing.assert_close(
                got, feature_scores(acts, score).double(), rtol=1e-6, atol=1e-6
            )


def test_one_rank_trainer_equals_saelens_trainer():
    case = parity.parity_cases()["feature_choice"]
    batches = parity.make_batches(8, 32, parity.D_IN)
    cfg = parity.trainer_config(32, 8, "cpu", 1)
    ours_sae = parity._init(case.build(), 0)
    ref_sae = parity._init(case.build(), 0)
    ours = DistributedSAETrainer(cfg, ours_sae, iter(batches))
    ref = SAETrainer(cfg=cfg, sae=ref_sae, data_provider=iter(batches))
    ours.fit(), ref.fit()
    diffs = parity.max_differences(
        parity.state_of(ours_sae, ours), parity.state_of(ref_sae, ref)
    )
    assert max(diffs.values()) < 1e-6


def test_trainer_rejects_wrong_shard_size_and_bad_options():
    case = parity.parity_cases()["mutual_choice"]
    cfg = parity.trainer_config(32, 4, "cpu", 1)
    sae = case.build()
    with pytest.raises(ValueError, match="oversample must be >= 1, got 0.5"):
        DistributedSAETrainer(cfg, sae, iter([]), oversample=0.5)
    trainer = DistributedSAETrainer(cfg, sae, iter([]))
    with pytest.raises(ValueError, match="gave 16 rows.*= 32"):
        trainer.step(torch.randn(16, parity.D_IN))


class _DriftedReplicas(Comm):
    """A one-process Comm whose replica check sees rank 1 ahead by 0.25 in one
    entry of ``b_dec`` from step ``from_step`` on (the check's max/min reductions)."""

    def __init__(self, from_step: int) -> None:
        super().__init__()
        self.from_step, self.checks, self.trainer = from_step, 0, None

    def all_reduce(self, tensor, op="sum", category="stats"):
        if category != "checks":
            return super().all_reduce(tensor, op, category)
        self.checks += 1
        step = self.trainer.n_training_steps
        if op == "max" and step >= self.from_step and tensor.shape == (parity.D_IN,):
            tensor[3] += 0.25
        return tensor


@pytest.mark.parametrize("every", [0, 2])
def test_replica_check_runs_every_n_steps_and_names_the_drift(every):
    cfg = parity.trainer_config(32, 6, "cpu", 1)
    batches = parity.make_batches(6, 32, parity.D_IN)
    comm = _DriftedReplicas(from_step=4)
    trainer = DistributedSAETrainer(
        cfg,
        parity.parity_cases()["mutual_choice"].build(),
        iter(batches),
        comm=comm,
        check_replicas_every=every,
    )
    comm.trainer = trainer
    if every == 0:  # never checked, so the drift goes unseen
        trainer.fit()
        assert comm.checks == 0
        return
    with pytest.raises(
        RuntimeError, match=r"differ between ranks after step 4 \(max difference 0.25\)"
    ):
        trainer.fit()
    n_tensors = len([*trainer.sae.parameters(), *trainer.sae.buffers()])
    assert comm.checks == 2 * 2 * n_tensors  # steps 2 and 4, a max and a min each


def test_replica_check_rejects_a_negative_period():
    cfg = parity.trainer_config(32, 4, "cpu", 1)
    sae = parity.parity_cases()["mutual_choice"].build()
    with pytest.raises(ValueError, match=r"check_replicas_every must be in \[0, inf\)"):
        DistributedSAETrainer(cfg, sae, iter([]), check_replicas_every=-1)


def test_collectives_unreachable_from_encode():
    """Outside a training step encode never consults the data-parallel step."""

    class Exploding(Comm):
        def all_gather(self, tensor, category):  # noqa: ARG002
            raise AssertionError("collective from encode")

    sae = parity.parity_cases()["mutual_choice"].build()
    x = torch.randn(8, parity.D_IN)
    step = DataParallelStep(Exploding(), [8])
    with data_parallel_step(sae, step):
        pass
    assert sae.data_parallel is None
    sae.train()
    sae.encode(x)  # training-mode encode: the batch rule, locally
    sae.eval()
    sae.encode(x)
    with data_parallel_step(sae, step), pytest.raises(AssertionError):
        sae.train()
        sae.encode(x)
    assert sae.data_parallel is None


def test_global_topk_mask_single_rank_budgets():
    acts = torch.tensor([[3.0, 0.0, 1.0], [1.0, 2.0, 0.0]])
    sizes = [6]
    comm = Comm()
    assert global_topk_mask(acts, 2, comm, sizes).tolist() == [
        [True, False, False],
        [False, True, False],
    ]
    # ties at 1.0: the lower flat index wins
    assert global_topk_mask(acts, 3, comm, sizes).tolist() == [
        [True, False, True],
        [False, True, False],
    ]
    # budget beyond the positive entries: zeros stay out of the mask
    assert global_topk_mask(acts, 6, comm, sizes).sum() == 4
    assert not global_topk_mask(acts, 0, comm, sizes).any()
    assert math.isfinite(float(acts.sum()))


def test_trainer_config_batch_must_split_evenly():
    cfg = SAETrainerConfig(total_training_samples=30, train_batch_size_samples=30)
    assert cfg.total_training_steps == 1


# --- logging and evals ------------------------------------------------------------


def test_rank0_alone_logs_and_evaluates(ranks):
    assert ranks[1]["logged"] == {"logged": [], "evaluated": []}
    # 8 steps, a log every 2, evals every 4 steps, in eval mode
    assert ranks[0]["logged"]["evaluated"] == [False, False]


def test_logged_metrics_are_those_of_the_global_batch(ranks):
    ours = ranks[0]["logged"]["logged"]
    reference = parity.run_logged("cpu", distributed=False)["logged"]
    assert [step for step, _ in ours] == [step for step, _ in reference]
    for (_, got), (_, expected) in zip(ours, reference, strict=True):
        assert got.keys() == expected.keys()
        for name, value in expected.items():
            # nan_ok: mse_window_change is NaN before two full windows
            assert got[name] == pytest.approx(value, rel=1e-4, abs=1e-6, nan_ok=True), (
                name
            )
    names = set().union(*(entry.keys() for _, entry in ours))
    assert {
        "losses/overall_loss",
        "losses/mse_loss",
        "metrics/explained_variance",
        "metrics/explained_variance_legacy_std",
        "metrics/l0",
        "sparsity/dead_features",
        "eval/l0",
    } <= names


def test_clear_errors_for_bad_settings():
    cfg = parity.trainer_config(32, 4, "cpu", 1)
    comm = Comm()
    comm.world_size = 3  # as a 3-rank group would report
    with pytest.raises(ValueError, match="32 must be a multiple of the world size 3"):
        DistributedSAETrainer(cfg, parity.parity_cases()["mutual_choice"].build(),
                              iter([]), comm=comm)  # fmt: skip
    acts = torch.rand(4, 3)
    with pytest.raises(ValueError, match="layout must be one of"):
        global_feature_choice_mask(acts, torch.ones(3, dtype=torch.long), Comm(), [4],
                                   layout="ring")  # fmt: skip
    with pytest.raises(ValueError, match="got torch.float64"):
        token_keys(acts.double(), 0)
    with pytest.raises(ValueError, match="shard_sizes needs one entry per rank"):
        DataParallelStep(Comm(), [4, 4])
    step = DataParallelStep(Comm(), [4])
    sae = parity.parity_cases()["mutual_choice"].build()
    with pytest.raises(ValueError, match="was given 5 tokens.*shard of 4"):
        step.select(sae, torch.rand(5, parity.D_SAE))


def test_selftest_one_rank_group_runs_every_collective():
    """The device self-test in a one-rank gloo group that still runs the collectives."""
    from benchmarks import selftest

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        report = selftest.run("cpu", 1, Shape(64, parity.D_IN, parity.D_SAE, 3), 1)
    finally:
        torch.set_num_threads(threads)
    assert report["primitives_exact"] is True
    for name, row in report["parity"].items():
        assert row["max_weight_diff"] < 1e-5, name
        assert row["counters_equal"], name
    assert set(report["speed"]) == {"mutual_choice", "sampled", "feature_choice"}


@pytest.mark.parametrize("scenario", sorted(parity.primitive_scenarios(WORLD)))
def test_reference_is_the_single_process_rule_ties_included(scenario):
    """The stable references above are the plugin's own one-process rules, ties and
    all, so the ranks' masks equal what one process selects."""
    case = parity.primitive_scenarios(WORLD)[scenario]
    expected = parity.reference_primitives(WORLD)[scenario]
    if case.capacities is None:
        got = batch_topk(case.acts, case.budget) != 0
    else:
        got = feature_choice_select(case.acts, case.capacities) != 0
    assert torch.equal(got, expected)
