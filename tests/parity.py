"""W ranks against one process: the harness behind the data-parallel tests and
``benchmarks/selftest.py``.

:func:`train_case` trains one SAE for a few steps, either data-parallel (each rank fed
its shard of every global batch, ranks started by
:func:`sae_lens_sampled.distributed.launch.spawn`) or in one process with SAELens's own
``SAETrainer`` fed the whole batches, from the same initial weights; :func:`state_of`
collects what must agree (weights, buffers, trainer counters). The selection
primitives are checked against the single-process rules of ``tests/reference.py``.

Batches have rows of very different norms (log-normal scales), so a rule applied per
rank would pick different entries than the global one.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, cast

import torch
import torch.distributed as dist
from sae_lens.config import SAETrainerConfig
from sae_lens.saes.sae import TrainingSAE
from sae_lens.training.sae_trainer import SAETrainer

from sae_lens_sampled import (
    FeatureChoiceTrainingSAE,
    FeatureChoiceTrainingSAEConfig,
    MutualChoiceTrainingSAE,
    MutualChoiceTrainingSAEConfig,
    SampledTrainingSAE,
    SampledTrainingSAEConfig,
)
from sae_lens_sampled.distributed.comm import Comm
from sae_lens_sampled.distributed.global_select import (
    global_feature_choice_mask,
    global_topk_indices,
)
from sae_lens_sampled.distributed.trainer import DistributedSAETrainer
from sae_lens_sampled.selection import capacities_for_batch
from tests import reference


@dataclass
class Case:
    """One architecture setting trained in the parity check."""

    name: str
    build: Callable[[], TrainingSAE[Any]]
    normalize: bool = False
    trainer_overrides: dict[str, Any] = field(default_factory=dict)


D_IN, D_SAE, K = 16, 64, 3.0


def _init(sae: TrainingSAE[Any], seed: int) -> TrainingSAE[Any]:
    # Non-zero biases and uneven decoder norms, so that selection depends on them.
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in sae.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
        # b_enc is declared on SAELens's subclasses, not on TrainingSAE
        cast(torch.Tensor, sae.b_enc).add_(0.05)
    return sae


def global_topk_mask(acts: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """Boolean mask of ``global_topk_indices(acts, ...)``, shaped like ``acts``."""
    indices = global_topk_indices(acts, *args, **kwargs)
    mask = torch.zeros(acts.numel(), dtype=torch.bool, device=acts.device)
    return mask.index_fill_(0, indices, True).view_as(acts)


def parity_cases() -> dict[str, Case]:
    """The settings checked: every architecture, both pool modes, every aux loss."""
    common: dict[str, Any] = {"d_in": D_IN, "d_sae": D_SAE, "k": K}

    def mutual_choice() -> TrainingSAE[Any]:
        cfg = MutualChoiceTrainingSAEConfig(**common, threshold_mode="global")
        return MutualChoiceTrainingSAE(cfg)

    def mutual_choice_scaled() -> TrainingSAE[Any]:
        cfg = MutualChoiceTrainingSAEConfig(
            **common,
            threshold_mode="per_feature",
            aux_loss="aux_zipf",
            normalize_activations="expected_average_only_in",
        )
        return MutualChoiceTrainingSAE(cfg)

    def sampled_sample() -> TrainingSAE[Any]:
        cfg = SampledTrainingSAEConfig(
            **common, pool_factor=4.0, score="l2", pool_mode="sample", pool_seed=7
        )
        return SampledTrainingSAE(cfg)

    def sampled_top() -> TrainingSAE[Any]:
        cfg = SampledTrainingSAEConfig(
            **common, pool_factor=5.0, score="entropy", pool_mode="top"
        )
        return SampledTrainingSAE(cfg)

    def sampled_options() -> TrainingSAE[Any]:
        cfg = SampledTrainingSAEConfig(
            **common,
            pool_factor=4.0,
            score="squared_l2",
            pool_beta=2.0,
            pool_explore=0.25,
            pool_warmup_steps=2,
            aux_dead="pooled",
            aux_dead_window=2,
            pool_seed=3,
        )
        return SampledTrainingSAE(cfg)

    def feature_choice() -> TrainingSAE[Any]:
        cfg = FeatureChoiceTrainingSAEConfig(
            **common, rerank_every=3, aux_loss="aux_zipf", zipf_tau=0.5
        )
        return FeatureChoiceTrainingSAE(cfg)

    def feature_choice_demand() -> TrainingSAE[Any]:
        cfg = FeatureChoiceTrainingSAEConfig(
            **common, rerank_every=2, rank_by="demand", zipf_alpha=1.3
        )
        return FeatureChoiceTrainingSAE(cfg)

    cases = [
        Case("mutual_choice", mutual_choice),
        Case("mutual_choice_scaled", mutual_choice_scaled, normalize=True),
        Case("sampled_sample", sampled_sample),
        Case("sampled_top", sampled_top),
        Case("sampled_options", sampled_options),
        Case("feature_choice", feature_choice),
        Case("feature_choice_demand", feature_choice_demand),
    ]
    return {case.name: case for case in cases}


def make_batches(
    n_batches: int, batch_size: int, d_in: int, seed: int = 0
) -> list[torch.Tensor]:
    """Global batches whose rows have log-normal norms (spread over ~e^3)."""
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n_batches):
        x = torch.randn(batch_size, d_in, generator=generator)
        scale = torch.exp(torch.randn(batch_size, 1, generator=generator))
        batches.append(x * scale + 0.2)
    return batches


def shard(batch: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """Rank ``rank``'s contiguous rows of ``batch``."""
    rows = batch.shape[0] // world_size
    return batch[rank * rows : (rank + 1) * rows]


def trainer_config(
    batch_size: int, n_steps: int, device: str, n_norm_batches: int, **overrides: Any
) -> SAETrainerConfig:
    settings: dict[str, Any] = {
        "total_training_samples": batch_size * n_steps,
        "train_batch_size_samples": batch_size,
        "lr": 1e-2,
        "lr_end": 1e-2,
        "device": device,
        "dead_feature_window": 3,
        "feature_sampling_window": 5,
        "n_batches_for_norm_estimate": n_norm_batches,
    }
    settings.update(overrides)
    return SAETrainerConfig(**settings)


def train_case(
    case: Case,
    batches: list[torch.Tensor],
    device: str,
    *,
    distributed: bool,
    seed: int = 0,
    oversample: float = 2.0,
    evaluator: Callable[..., dict[str, Any]] | None = None,
    comm: Comm | None = None,
) -> tuple[TrainingSAE[Any], SAETrainer[Any, Any], dict[str, int]]:
    """Train ``case`` on ``batches`` (global batches); return SAE, trainer, row counts.

    ``distributed``: this process is one rank of the default group (or of
    ``comm``) and feeds its shard to :class:`DistributedSAETrainer`; else SAELens's
    ``SAETrainer`` gets the whole batches. The norm estimate (when the case normalises) uses the first two
    batches, then training uses all of them.
    """
    torch.manual_seed(seed)
    sae = _init(case.build(), seed).to(device)
    n_norm = 2 if case.normalize else 0
    n_steps = len(batches) - n_norm
    cfg = trainer_config(
        batches[0].shape[0], n_steps, device, max(n_norm, 1), **case.trainer_overrides
    )
    rows_encoded = {"rows": 0, "calls": 0}

    def count_rows(_module: Any, inputs: tuple[torch.Tensor, ...]) -> None:
        if sae.training:
            rows_encoded["rows"] += inputs[0].reshape(-1, inputs[0].shape[-1]).shape[0]
            rows_encoded["calls"] += 1

    sae.hook_sae_input.register_forward_pre_hook(count_rows)
    if distributed:
        comm = Comm() if comm is None else comm
        feed = [shard(batch, comm.rank, comm.world_size) for batch in batches]
        trainer: SAETrainer[Any, Any] = DistributedSAETrainer(
            cfg,
            sae,
            _provider(feed, device),
            evaluator,
            comm=comm,
            oversample=oversample,
        )
    else:
        trainer = SAETrainer(
            cfg=cfg,
            sae=sae,
            data_provider=_provider(batches, device),
            evaluator=evaluator,
        )
    trainer.fit()
    return sae, trainer, rows_encoded


def _provider(batches: list[torch.Tensor], device: str) -> Iterator[torch.Tensor]:
    for batch in batches:
        yield batch.to(device)
    raise RuntimeError("the parity check ran out of batches")


def state_of(sae: TrainingSAE[Any], trainer: SAETrainer[Any, Any]) -> dict[str, Any]:
    """Everything that must agree between W ranks and one process (on the CPU)."""
    state = {name: t.detach().cpu().clone() for name, t in sae.state_dict().items()}
    state["trainer.act_freq_scores"] = trainer.act_freq_scores.cpu().clone()
    state["trainer.n_forward_passes_since_fired"] = (
        trainer.n_forward_passes_since_fired.cpu().clone()
    )
    state["trainer.n_training_samples"] = torch.tensor(trainer.n_training_samples)
    state["trainer.n_training_steps"] = torch.tensor(trainer.n_training_steps)
    return state


def max_differences(
    ours: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]
) -> dict[str, float]:
    """Largest absolute difference per entry (inf where one side is inf and not both)."""
    out = {}
    for name, ref in reference.items():
        mine = ours[name].double()
        ref = ref.double()
        same_inf = torch.isinf(mine) & torch.isinf(ref) & (mine == ref)
        diff = torch.where(same_inf, 0.0, (mine - ref).abs())
        out[name] = float(diff.max()) if diff.numel() else 0.0
    return out


# --- the selection primitives on awkward inputs ---


@dataclass
class Scenario:
    """A global ``[B, d]`` matrix split into ``shard_rows``, with a rule to apply."""

    acts: torch.Tensor
    shard_rows: list[int]
    budget: int = 0
    capacities: torch.Tensor | None = None
    layout: str = "auto"


def primitive_scenarios(world_size: int, seed: int = 0) -> dict[str, Scenario]:
    """Inputs on which the global top-k and feature-choice masks are checked.

    Random values; one shard 100x larger (the optimistic candidate round cannot
    prove its threshold and the exact round runs); small integers (many ties at
    the threshold); uneven shards; degenerate budgets.
    """
    generator = torch.Generator().manual_seed(seed)
    d = 24
    rows = [8 + 3 * rank for rank in range(world_size)]  # uneven
    even = [10] * world_size

    def randn(n: int) -> torch.Tensor:
        return torch.randn(n, d, generator=generator).relu()

    skewed = randn(sum(even))
    skewed[: even[0]] *= 100
    integers = torch.randint(0, 4, (sum(rows), d), generator=generator).float()
    n_even, n_rows = sum(even), sum(rows)
    zipf = torch.arange(1, d + 1, dtype=torch.float64).pow(-1.0)
    zipf = 3.0 * zipf / zipf.sum()

    def capacities(n_tokens: int, budget: int) -> torch.Tensor:
        return capacities_for_batch(zipf, n_tokens, budget)

    return {
        "topk_random": Scenario(randn(n_even), even, budget=3 * n_even),
        "topk_skewed": Scenario(skewed, even, budget=3 * n_even),
        "topk_ties_uneven": Scenario(integers, rows, budget=3 * n_rows),
        "topk_one": Scenario(randn(n_even), even, budget=1),
        "topk_all_but_one": Scenario(randn(n_even), even, budget=n_even * d - 1),
        "topk_everything": Scenario(randn(n_even), even, budget=n_even * d + 5),
        "topk_nothing": Scenario(randn(n_even), even, budget=0),
        "fc_random": Scenario(
            randn(n_even), even, capacities=capacities(n_even, 3 * n_even)
        ),
        "fc_ties_uneven": Scenario(
            integers, rows, capacities=capacities(n_rows, 3 * n_rows)
        ),
        "fc_all_to_all": Scenario(
            randn(n_even),
            even,
            capacities=capacities(n_even, 3 * n_even),
            layout="all_to_all",
        ),
        "fc_ties_uneven_all_to_all": Scenario(
            integers,
            rows,
            capacities=capacities(n_rows, 3 * n_rows),
            layout="all_to_all",
        ),
        "fc_all_gather": Scenario(
            randn(n_even),
            even,
            capacities=capacities(n_even, 3 * n_even),
            layout="all_gather",
        ),
        "fc_budget_below_features": Scenario(
            randn(n_even), even, capacities=capacities(n_even, d // 2)
        ),
        "fc_whole_batch": Scenario(
            randn(n_even), even, capacities=capacities(n_even, n_even * d)
        ),
    }


def run_primitives(
    rank: int, world_size: int, device: str, comm: Comm | None = None
) -> dict[str, Any]:
    """This rank's masks for every scenario, and the selection calls each took."""
    comm = Comm() if comm is None else comm
    out: dict[str, Any] = {}
    for name, scenario in primitive_scenarios(world_size).items():
        start = sum(scenario.shard_rows[:rank])
        local = scenario.acts[start : start + scenario.shard_rows[rank]].to(device)
        comm.counter.reset()
        if scenario.capacities is None:
            sizes = [n * local.shape[1] for n in scenario.shard_rows]
            # a low oversampling factor, so that the exact round can be needed
            mask = global_topk_mask(
                local, scenario.budget, comm, sizes, oversample=1.25
            )
        else:
            capacities = scenario.capacities.to(device)
            mask = global_feature_choice_mask(
                local, capacities, comm, scenario.shard_rows, scenario.layout
            )
        out[name] = (mask.cpu(), comm.counter.calls.get("selection", 0))
    return out


def reference_primitives(world_size: int) -> dict[str, torch.Tensor]:
    out = {}
    for name, scenario in primitive_scenarios(world_size).items():
        if scenario.capacities is None:
            out[name] = reference.batch_topk_mask(scenario.acts, scenario.budget)
        else:
            out[name] = reference.feature_choice_mask(
                scenario.acts, scenario.capacities
            )
    return out


# --- resume on the same world size ---


def run_resume(device: str, out_dir: str, case_name: str = "sampled_sample") -> bool:
    """12 steps straight vs 7, a checkpoint, and 5 more from it: bit-identical?"""
    case = parity_cases()[case_name]
    batches = make_batches(12, 32, D_IN, seed=1)
    straight, trainer, _ = train_case(case, batches, device, distributed=True)
    expected = state_of(straight, trainer)

    rank, world = dist.get_rank(), dist.get_world_size()
    feed = [shard(batch, rank, world) for batch in batches]
    cfg = trainer_config(32, 12, device, 1)
    first = _init(case.build(), 0).to(device)
    first_trainer = DistributedSAETrainer(cfg, first, _provider(feed[:7], device))
    for _ in range(7):
        first_trainer.maybe_reset_sparsity()
        first_trainer.step(next(first_trainer.data_provider))
        first_trainer.n_training_steps += 1
    checkpoint = os.path.join(out_dir, "resume_checkpoint")
    first_trainer.save_checkpoint("step7", base_path=checkpoint)

    resumed = _init(case.build(), 123).to(device)  # other weights: all must load
    resumed_trainer = DistributedSAETrainer(cfg, resumed, _provider(feed[7:], device))
    path = os.path.join(checkpoint, "step7")
    resumed_trainer.load_trainer_state(path)
    resumed.load_weights_from_checkpoint(path)
    resumed_trainer.fit()
    got = state_of(resumed, resumed_trainer)
    return all(torch.equal(got[name], expected[name]) for name in expected)


# --- logging and evals: rank 0 alone, global quantities ---


def run_logged(device: str, distributed: bool) -> dict[str, Any]:
    """Train with wandb logging on (``wandb.log`` captured) and an evaluator that
    encodes; return what was logged and which ranks evaluated."""
    import wandb
    from sae_lens import LoggingConfig

    logging = LoggingConfig(
        log_to_wandb=True, wandb_log_frequency=2, eval_every_n_wandb_logs=2
    )
    base = parity_cases()["mutual_choice"]
    case = Case("logged", base.build, trainer_overrides={"logger": logging})
    logged: list[tuple[int | None, dict[str, float]]] = []
    evaluated: list[bool] = []

    def capture(data: dict[str, Any], step: int | None = None) -> None:
        numbers = {k: float(v) for k, v in data.items() if isinstance(v, int | float)}
        logged.append((step, numbers))

    def evaluator(sae: Any, _provider: Any, _scaler: Any) -> dict[str, Any]:
        evaluated.append(sae.training)
        x = torch.randn(6, D_IN, generator=torch.Generator().manual_seed(3))
        codes = sae.encode(x.to(device))  # per-token, no collective
        return {"eval/l0": float((codes != 0).sum(-1).float().mean())}

    original = wandb.log
    wandb.log = capture  # type: ignore[assignment]
    try:
        batches = make_batches(8, 64, D_IN, seed=2)
        train_case(case, batches, device, distributed=distributed, evaluator=evaluator)
    finally:
        wandb.log = original
    return {"logged": logged, "evaluated": evaluated}


def parity_worker(
    rank: int,
    world_size: int,
    device: str,
    out_dir: str,
    n_steps: int = 14,
    batch_size: int = 64,
) -> None:
    """Everything the data-parallel tests check, run on one rank; saved per rank.

    Writes ``rank{r}.pt``: per parity case the trained state, rows encoded and
    traffic; the primitive masks; the resume verdict.
    """
    batches = make_batches(n_steps + 2, batch_size, D_IN)
    results: dict[str, Any] = {"cases": {}}
    for name, case in parity_cases().items():
        feed = batches if case.normalize else batches[:n_steps]
        sae, trainer, rows = train_case(case, feed, device, distributed=True)
        assert isinstance(trainer, DistributedSAETrainer)
        results["cases"][name] = {
            "state": state_of(sae, trainer),
            "rows": rows,
            "traffic": trainer.comm.counter.snapshot(),
        }
    results["primitives"] = run_primitives(rank, world_size, device)
    results["resume_exact"] = run_resume(device, out_dir)
    results["logged"] = run_logged(device, distributed=True)
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))


def reference_states(
    n_steps: int = 14, batch_size: int = 64, device: str = "cpu"
) -> dict[str, dict[str, Any]]:
    """One process, SAELens's ``SAETrainer``, the whole batches: per parity case."""
    batches = make_batches(n_steps + 2, batch_size, D_IN)
    out = {}
    for name, case in parity_cases().items():
        feed = batches if case.normalize else batches[:n_steps]
        sae, trainer, rows = train_case(case, feed, device, distributed=False)
        out[name] = {"state": state_of(sae, trainer), "rows": rows}
    return out
