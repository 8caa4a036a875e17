"""`sae-lens-sampled train` data-parallel: 2 gloo ranks run the train command.

The ranks run :func:`sae_lens_sampled.distributed.train.run_cli` (what ``torchrun -m
sae_lens_sampled train`` runs) on the tiny offline model, each with its own shard of
the token dataset; the first run checkpoints half way and a second run resumes from
that checkpoint. In this process, SAELens's ``SAETrainer`` trains the same initial
SAE on the concatenated per-rank batches (rebuilt from each shard's
``ActivationsStore``; mixing is off so that they are a function of the shard).
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import pytest
import torch
from sae_lens import SAE, TrainingSAE
from sae_lens.llm_sae_training_runner import _parse_cfg_args
from sae_lens.training.activations_store import ActivationsStore
from sae_lens.training.sae_trainer import SAETrainer

from sae_lens_sampled import SampledTrainingSAE, SampledTrainingSAEConfig
from sae_lens_sampled.distributed import parity
from sae_lens_sampled.distributed.train import (
    DATA_PARALLEL_FILENAME,
    DistributedLanguageModelRunner,
    run_cli,
    shard_dataset,
    store_state_filename,
)
from tests.helpers import CONTEXT, D_MODEL, HOOK, tiny_model, token_dataset

WORLD = 2
STEPS = 12
BATCH = 128
D_SAE = 64


def argv(tmp: Path, name: str, *extra: str) -> list[str]:
    return [
        "--architecture", "sampled", "--d_in", str(D_MODEL), "--d_sae", str(D_SAE),
        "-k", "3", "--pool_factor", "4", "--pool_seed", "5",
        "--from_pretrained_path", str(tmp / "init"),
        "--hook_name", HOOK, "--context_size", str(CONTEXT),
        "--training_tokens", str(STEPS * BATCH),
        "--train_batch_size_tokens", str(BATCH),
        "--store_batch_size_prompts", "4", "--n_batches_in_buffer", "4",
        "--activations_mixing_fraction", "0", "--lr", "3e-3",
        "--dead_feature_window", "3", "--feature_sampling_window", "5",
        "--device", "cpu", "--log_to_wandb", "False", "--prepend_bos", "False",
        "--exclude_special_tokens", "False", "--n_checkpoints", "1",
        "--checkpoint_path", str(tmp / f"{name}_ckpt"),
        "--output_path", str(tmp / f"{name}_out"), *extra,
    ]  # fmt: skip


def cli_worker(rank: int, world: int, device: str, tmp: str) -> None:
    tmp_path = Path(tmp)
    run_cli(argv(tmp_path, "straight"), tiny_model(), token_dataset())
    [checkpoint_root] = (tmp_path / "straight_ckpt").iterdir()
    [checkpoint] = checkpoint_root.iterdir()
    resume = ("--resume_from_checkpoint", str(checkpoint))
    run_cli(argv(tmp_path, "resumed", *resume), tiny_model(), token_dataset())


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("cli")
    torch.manual_seed(0)
    init = SampledTrainingSAE(
        SampledTrainingSAEConfig(
            d_in=D_MODEL, d_sae=D_SAE, k=3, pool_factor=4, pool_seed=5
        )
    )
    init.save_model(str(tmp / "init"))
    parity.spawn(cli_worker, WORLD, "cpu", (str(tmp),))
    return tmp


def reference_output(tmp: Path) -> Path:
    """One process, SAELens's trainer, the ranks' batches concatenated per step."""
    cfg = _parse_cfg_args(argv(tmp, "reference"))
    model, dataset = tiny_model(), token_dataset()
    local = copy.copy(cfg)
    local.train_batch_size_tokens = BATCH // WORLD
    stores = [
        ActivationsStore.from_config(
            model, local, override_dataset=shard_dataset(dataset, rank, WORLD)
        )
        for rank in range(WORLD)
    ]
    batches = [torch.cat([next(store) for store in stores]) for _ in range(STEPS)]
    sae = TrainingSAE.load_from_disk(tmp / "init")
    trainer = SAETrainer(
        cfg=cfg.to_sae_trainer_config(), sae=sae, data_provider=iter(batches)
    )
    trainer.fit()
    out = tmp / "reference_out"
    sae.save_inference_model(out)
    return out


def test_train_command_saves_what_one_process_would(trained):
    reference = SAE.load_from_disk(reference_output(trained))
    ours = SAE.load_from_disk(trained / "straight_out")
    assert type(ours) is type(reference)
    assert ours.cfg.architecture() == "sampled"
    ours_state, reference_state = ours.state_dict(), reference.state_dict()
    assert ours_state.keys() == reference_state.keys()
    for name, value in reference_state.items():
        torch.testing.assert_close(ours_state[name], value, rtol=0, atol=1e-5)
    assert torch.isfinite(ours.threshold).any()
    saved = json.loads((trained / "straight_out" / "runner_cfg.json").read_text())
    assert saved["train_batch_size_tokens"] == BATCH  # the global run
    # rank 0 alone wrote the final SAE; nothing else appeared in the output folder
    assert sorted(p.name for p in (trained / "straight_out").iterdir()) == [
        "cfg.json", "runner_cfg.json", "sae_weights.safetensors",
        "sparsity.safetensors",
    ]  # fmt: skip


def test_checkpoint_has_every_ranks_loader_state(trained):
    [root] = (trained / "straight_ckpt").iterdir()
    [checkpoint] = root.iterdir()
    names = {p.name for p in checkpoint.iterdir()}
    assert {store_state_filename(r) for r in range(WORLD)} <= names
    assert json.loads((checkpoint / DATA_PARALLEL_FILENAME).read_text()) == {
        "world_size": WORLD
    }
    assert {"cfg.json", "sae_weights.safetensors", "trainer_state.pt"} <= names


def test_resume_on_same_world_size_equals_straight_run(trained):
    straight = SAE.load_from_disk(trained / "straight_out").state_dict()
    resumed = SAE.load_from_disk(trained / "resumed_out").state_dict()
    for name, value in straight.items():
        assert torch.equal(resumed[name], value), name


def test_resume_on_other_world_size_is_refused(trained, tmp_path):
    [root] = (trained / "straight_ckpt").iterdir()
    [checkpoint] = root.iterdir()
    cfg = _parse_cfg_args(argv(trained, "single"))
    runner = DistributedLanguageModelRunner(
        cfg, override_dataset=token_dataset(64), override_model=tiny_model()
    )
    with pytest.raises(ValueError, match="written by 2 rank.*not 1"):
        runner.resume(None, checkpoint)  # type: ignore[arg-type]


def test_train_command_dispatches_under_torchrun(monkeypatch):
    import sae_lens_sampled.distributed.train as train_module
    from sae_lens_sampled.cli import main

    seen = []
    monkeypatch.setattr(train_module, "main", lambda args: seen.append(args) or 0)
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["train", "--architecture", "sampled"]) == 0
    assert seen == [["--architecture", "sampled"]]
    assert os.environ["WORLD_SIZE"] == "2"
