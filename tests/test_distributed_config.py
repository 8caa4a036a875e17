"""Data-parallel ranks started with different settings all stop with one clear error.

Two gloo ranks on 127.0.0.1, spawned here (group timeout 30 s, whole run bounded),
build a trainer (and a runner) per case with per-rank settings and record what each
rank raised.
"""

from __future__ import annotations

import json
import os
import socket
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from sae_lens.config import SAETrainerConfig

from sae_lens_sampled import (
    MutualChoiceTrainingSAE,
    MutualChoiceTrainingSAEConfig,
    SampledTrainingSAE,
    SampledTrainingSAEConfig,
)
from sae_lens_sampled.distributed.comm import Comm
from sae_lens_sampled.distributed.same_config import (
    check_same_settings,
    describe_settings,
    first_difference,
)
from sae_lens_sampled.distributed.trainer import DistributedSAETrainer

WORLD = 2
GROUP_TIMEOUT_S = 30
RUN_TIMEOUT_S = 240

# case: (both ranks' SAE settings, rank 1's SAE overrides, rank 1's trainer overrides)
TRAINER_CASES: dict[str, tuple[dict[str, Any], dict[str, Any], dict[str, Any]]] = {
    "same": ({}, {}, {}),
    "k": ({}, {"k": 4}, {}),
    "d_sae": ({}, {"d_sae": 24}, {}),
    "architecture": ({}, {"architecture": "sampled"}, {}),
    "pool_factor": (
        {"architecture": "sampled", "pool_factor": 16.0},
        {"pool_factor": 3.0},
        {},
    ),
    "threshold_gain": ({}, {"threshold_gain": 0.2}, {}),
    "lr": ({}, {}, {"lr": 3e-3}),
    "dtype": ({}, {"state_dtype": torch.float64}, {}),
    "device_only": ({}, {}, {"device": "cpu:0"}),
}


def build_sae(settings: dict[str, Any]) -> Any:
    settings = dict(settings)
    architecture = settings.pop("architecture", "mutual_choice")
    state_dtype = settings.pop("state_dtype", None)
    fields = {"d_in": 8, "d_sae": 16, "k": 3, **settings}
    if architecture == "sampled":
        sae: Any = SampledTrainingSAE(SampledTrainingSAEConfig(**fields))
    else:
        sae = MutualChoiceTrainingSAE(MutualChoiceTrainingSAEConfig(**fields))
    if state_dtype is not None:
        sae.W_dec.data = sae.W_dec.data.to(state_dtype)
    return sae


def trainer_config(**overrides: Any) -> SAETrainerConfig:
    settings: dict[str, Any] = {
        "total_training_samples": 64,
        "train_batch_size_samples": 16,
        "lr": 1e-2,
        "device": "cpu",
        **overrides,
    }
    settings["lr_end"] = settings["lr"]  # SAELens's trainer needs it set
    return SAETrainerConfig(**settings)


def worker(rank: int, port: int, out_dir: str) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        rank=rank,
        world_size=WORLD,
        timeout=timedelta(seconds=GROUP_TIMEOUT_S),
    )
    errors: dict[str, str | None] = {}
    try:
        for case, (common, sae_settings, trainer_settings) in TRAINER_CASES.items():
            torch.manual_seed(0)
            sae = build_sae({**common, **(sae_settings if rank == 1 else {})})
            cfg = trainer_config(**(trainer_settings if rank == 1 else {}))
            try:
                DistributedSAETrainer(cfg, sae, iter([]))
                errors[case] = None
            except ValueError as error:
                errors[case] = str(error)
        # The runner compares its whole config before loading a model.
        from sae_lens_sampled.distributed.train import DistributedLanguageModelRunner
        from tests.helpers import runner_config

        sae_cfg = MutualChoiceTrainingSAEConfig(d_in=32, d_sae=64, k=4)
        hook = "blocks.0.hook_resid_post" if rank == 0 else "blocks.0.hook_resid_pre"
        runner_cfg = runner_config(sae_cfg, Path(out_dir), hook_name=hook)
        try:
            DistributedLanguageModelRunner(runner_cfg, override_model=object())
            errors["runner_hook"] = None
        except ValueError as error:
            errors["runner_hook"] = str(error)
    finally:
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(errors))
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture(scope="module")
def raised(tmp_path_factory) -> list[dict[str, str | None]]:
    out_dir = tmp_path_factory.mktemp("same_config")
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    context = mp.start_processes(
        worker,
        args=(free_port(), str(out_dir)),
        nprocs=WORLD,
        join=False,
        start_method=method,
    )
    try:
        finished = context.join(timeout=RUN_TIMEOUT_S)
        while not finished:  # join returns early as each process ends
            finished = context.join(timeout=RUN_TIMEOUT_S)
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
    return [
        json.loads((out_dir / f"rank{rank}.json").read_text()) for rank in range(WORLD)
    ]


EXPECTED = {
    "k": "rank 1 has sae.k=4, rank 0 has sae.k=3",
    "d_sae": "rank 1 has sae.d_sae=24, rank 0 has sae.d_sae=16",
    "architecture": (
        'rank 1 has sae.architecture="sampled", rank 0 has '
        'sae.architecture="mutual_choice"'
    ),
    "pool_factor": "rank 1 has sae.pool_factor=3.0, rank 0 has sae.pool_factor=16.0",
    "threshold_gain": (
        "rank 1 has sae.threshold_gain=0.2, rank 0 has sae.threshold_gain=0.1"
    ),
    "lr": "rank 1 has trainer.lr=0.003, rank 0 has trainer.lr=0.01",
    "dtype": "rank 1 has state.W_dec=[16, 8] float64, rank 0 has state.W_dec=[16, 8] "
    "float32",
    "runner_hook": (
        'rank 1 has hook_name="blocks.0.hook_resid_pre", rank 0 has '
        'hook_name="blocks.0.hook_resid_post"'
    ),
}


@pytest.mark.parametrize("case", sorted(EXPECTED))
def test_every_rank_names_the_first_differing_field(raised, case):
    messages = [errors[case] for errors in raised]
    assert messages[0] is not None, f"{case}: no error"
    assert messages[0] == messages[1]  # the same error on every rank
    assert EXPECTED[case] in messages[0]
    assert messages[0].startswith("data-parallel ranks must share one ")
    assert "ranks differing from rank 0: 1)" in messages[0]


@pytest.mark.parametrize("case", ["same", "device_only"])
def test_equal_settings_pass(raised, case):
    assert [errors[case] for errors in raised] == [None, None]


# --- the pure parts, in one process ------------------------------------------------


def test_description_flattens_and_drops_device_fields():
    described = describe_settings(
        {"k": 3, "device": "cuda:1", "sae": {"device": "cuda:1", "d_sae": 8}, "x": None}
    )
    assert described == [("k", "3"), ("sae.d_sae", "8"), ("x", "null")]


def test_first_difference_follows_rank_0s_order_then_the_others_extra_fields():
    ours = [("a", "1"), ("b", "2"), ("c", "3")]
    assert first_difference(ours, ours) is None
    assert first_difference(ours, [("a", "1"), ("c", "4"), ("b", "5")]) == (
        "b",
        "2",
        "5",
    )
    assert first_difference(ours, [("a", "1"), ("b", "2")]) == ("c", "3", "(absent)")
    assert first_difference(ours[:2], ours) == ("c", "(absent)", "3")


def test_one_process_checks_nothing():
    check_same_settings(Comm(), [("k", "3")], "config")  # no group: returns
