"""A fourth architecture added from this one file, through the plugin's registry.

The toy rule keeps each token's largest activation. One rule function, four classes
with no methods, its entry and ``add_architecture`` are all it takes: the training
SAE's ``select``, the inference SAE's ``encode_batch`` and the data-parallel step run
the rule, SAELens's runner trains it and loads it back, and ``bench``, ``compare``
and ``train --help`` find it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from sae_lens import SAE, LanguageModelSAETrainingRunner
from sae_lens.registry import SAE_CLASS_REGISTRY, SAE_TRAINING_CLASS_REGISTRY

from sae_lens_sampled import _registry
from sae_lens_sampled._registry import Architecture, add_architecture
from sae_lens_sampled.benchmark.specs import parse_run_specs, resolve_runs
from sae_lens_sampled.benchmark.speed import available_architectures
from sae_lens_sampled.cli import train_help_header
from sae_lens_sampled.distributed import costs
from sae_lens_sampled.distributed.comm import Comm
from sae_lens_sampled.distributed.step import DataParallelStep, data_parallel_step
from sae_lens_sampled.global_batch import BatchTraffic, GlobalBatch
from sae_lens_sampled.saes.base import (
    BatchLevelSAE,
    BatchLevelSAEConfig,
    BatchLevelTrainingSAE,
    BatchLevelTrainingSAEConfig,
)
from sae_lens_sampled.shape import Shape
from tests.helpers import D_MODEL, runner_config, tiny_model, token_dataset

KEY = "toy_row_top1"


def row_top1(acts: torch.Tensor) -> torch.Tensor:
    """Keep each row's largest entry (the first of equal ones), zero the rest."""
    keep = torch.zeros_like(acts, dtype=torch.bool)
    keep.scatter_(1, acts.argmax(dim=1, keepdim=True), True)
    return torch.where(keep, acts, 0)


@dataclass
class ToyTrainingSAEConfig(BatchLevelTrainingSAEConfig):
    """Configuration for training the toy SAE (``k`` should be 1)."""

    architecture_key = KEY


class ToyTrainingSAE(BatchLevelTrainingSAE):
    cfg: ToyTrainingSAEConfig


@dataclass
class ToySAEConfig(BatchLevelSAEConfig):
    architecture_key = KEY


class ToySAE(BatchLevelSAE):
    cfg: ToySAEConfig


RULE_CALLS: list[tuple[str, int]] = []


def toy_rule(
    sae: ToyTrainingSAE | ToySAE, acts: torch.Tensor, batch: GlobalBatch
) -> torch.Tensor:
    """Per-token, so nothing to exchange over the batch (each call is recorded)."""
    RULE_CALLS.append((type(batch).__name__, batch.n_tokens))
    return row_top1(acts)


ENTRY = Architecture(
    KEY, ToySAE, ToySAEConfig, ToyTrainingSAE, ToyTrainingSAEConfig, toy_rule
)


@contextmanager
def registered(entry: Architecture) -> Iterator[Architecture]:
    add_architecture(entry)
    try:
        yield entry
    finally:
        SAE_CLASS_REGISTRY.pop(KEY, None)
        SAE_TRAINING_CLASS_REGISTRY.pop(KEY, None)
        _registry._ARCHITECTURES.pop(KEY, None)


@pytest.fixture
def toy() -> Iterator[Architecture]:
    with registered(ENTRY) as entry:
        yield entry


def test_row_top1_by_hand():
    acts = torch.tensor([[1.0, 3.0, 0.0], [2.0, 0.5, 2.0]])
    expected = torch.tensor([[0.0, 3.0, 0.0], [2.0, 0.0, 0.0]])
    assert torch.equal(row_top1(acts), expected)


def test_registered_in_both_saelens_registries(toy: Architecture):
    assert SAE_TRAINING_CLASS_REGISTRY[KEY] == (ToyTrainingSAE, ToyTrainingSAEConfig)
    assert SAE_CLASS_REGISTRY[KEY] == (ToySAE, ToySAEConfig)
    assert _registry.architecture_keys()[-1] == KEY


def test_trains_with_saelens_runner_and_loads_back(toy: Architecture, tmp_path: Path):
    torch.manual_seed(0)
    sae_cfg = ToyTrainingSAEConfig(d_in=D_MODEL, d_sae=64, k=1.0)
    cfg = runner_config(sae_cfg, tmp_path, steps=8)
    runner = LanguageModelSAETrainingRunner(
        cfg, override_model=tiny_model(), override_dataset=token_dataset(100)
    )
    trained = runner.run()
    assert isinstance(trained, ToyTrainingSAE)
    trained.train()
    x = torch.randn(10, D_MODEL)
    # The toy's batch rule ran in training: at most one active feature per token.
    assert int((trained.encode(x) != 0).sum(dim=1).max()) <= 1
    loaded = SAE.load_from_disk(str(tmp_path / "final"))
    assert isinstance(loaded, ToySAE)
    assert loaded.W_enc.shape == (D_MODEL, 64)
    # The inference SAE's batch rule is the toy's too.
    assert int((loaded.encode_batch(x) != 0).sum(dim=1).max()) == 1


def test_bench_compare_and_train_help_list_it(toy: Architecture):
    assert KEY in available_architectures()
    runs, notes = resolve_runs(parse_run_specs(KEY))
    assert [spec.architecture for spec in runs] == [KEY] and notes == []
    assert f"  {KEY} " in train_help_header()


def test_without_the_entry_none_of_them_know_it():
    assert KEY not in available_architectures()
    with pytest.raises(ValueError, match=f"unknown architecture '{KEY}'"):
        resolve_runs(parse_run_specs(KEY))


def test_select_and_encode_batch_run_the_entry_rule(toy: Architecture):
    acts = torch.tensor([[1.0, 3.0, 0.0], [2.0, 0.5, 2.0]])
    sae = ToyTrainingSAE(ToyTrainingSAEConfig(d_in=4, d_sae=3, k=1.0))
    inference = ToySAE(ToySAEConfig(d_in=4, d_sae=3, k=1.0))
    RULE_CALLS.clear()
    assert torch.equal(sae.select(acts), row_top1(acts))
    assert torch.equal(inference.select_ranked(acts), row_top1(acts))
    assert RULE_CALLS == [("LocalBatch", 2), ("LocalBatch", 2)]


def test_data_parallel_step_uses_the_entry_rule(toy: Architecture):
    torch.manual_seed(0)
    sae = ToyTrainingSAE(ToyTrainingSAEConfig(d_in=4, d_sae=6, k=1.0))
    sae.train()
    x = torch.randn(5, 4)
    RULE_CALLS.clear()
    with data_parallel_step(sae, DataParallelStep(Comm(), [5])):
        out = sae.encode(x)
    assert RULE_CALLS == [("DataParallelStep", 5)]
    assert torch.equal(out, sae.encode(x))


def toy_traffic(
    cfg: ToyTrainingSAEConfig, n_tokens: int, traffic: BatchTraffic
) -> float:
    """A made-up formula: one global top-B over the features."""
    return traffic.batch_topk(n_tokens, cfg.d_sae)


def test_traffic_model_reads_the_entry(toy: Architecture):
    assert KEY not in costs.traffic_cases()  # the entry declares no formula


def test_traffic_model_tabulates_an_entry_with_a_formula():
    with registered(dataclasses.replace(ENTRY, traffic=toy_traffic)):
        assert list(costs.traffic_cases())[-1] == KEY
        shape = Shape(64, 4, 32, 1)
        # to the one other rank: min(B, 32 * 32 local entries, ceil(2 B / 2)) float32
        # candidates and 16 bytes of tie counts
        assert costs.selection_bytes(KEY, shape, 2) == 64 * 4 + 16
        assert costs.selection_bytes(KEY, shape, 1) == 0.0
        assert KEY in costs._format_traffic(costs.traffic_table([shape], [2], 2.0))
