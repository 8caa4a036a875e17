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
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from sae_lens import SAE, TrainingSAE
from sae_lens.llm_sae_training_runner import _parse_cfg_args
from sae_lens.training.activations_store import ActivationsStore
from sae_lens.training.sae_trainer import SAETrainer

from sae_lens_sampled import SampledTrainingSAE, SampledTrainingSAEConfig
from sae_lens_sampled.distributed import launch
from sae_lens_sampled.distributed.train import (
    DATA_PARALLEL_FILENAME,
    DistributedLanguageModelRunner,
    run_cli,
    shard_dataset,
    store_state_filename,
)
from tests import parity
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
    launch.spawn(cli_worker, WORLD, "cpu", (str(tmp),))
    return tmp


def reference_output(args: list[str], model, dataset, out: Path) -> Path:
    """One process, SAELens's trainer, the ranks' batches concatenated per step."""
    cfg = _parse_cfg_args(args)
    local = copy.copy(cfg)
    local.train_batch_size_tokens = cfg.train_batch_size_tokens // WORLD
    stores = [
        ActivationsStore.from_config(
            model, local, override_dataset=shard_dataset(dataset, rank, WORLD)
        )
        for rank in range(WORLD)
    ]
    steps = cfg.training_tokens // cfg.train_batch_size_tokens
    batches = [torch.cat([next(store) for store in stores]) for _ in range(steps)]
    assert cfg.from_pretrained_path is not None
    sae = TrainingSAE.load_from_disk(cfg.from_pretrained_path)
    trainer = SAETrainer(
        cfg=cfg.to_sae_trainer_config(), sae=sae, data_provider=iter(batches)
    )
    trainer.fit()
    sae.save_inference_model(out)
    return out


def assert_same_saved_sae(ours_path: Path, reference_path: Path) -> None:
    reference = SAE.load_from_disk(reference_path)
    ours = SAE.load_from_disk(ours_path)
    assert type(ours) is type(reference)
    assert ours.cfg.architecture() == "sampled"
    ours_state, reference_state = ours.state_dict(), reference.state_dict()
    assert ours_state.keys() == reference_state.keys()
    for name, value in reference_state.items():
        torch.testing.assert_close(ours_state[name], value, rtol=0, atol=1e-5)
    assert torch.isfinite(ours.threshold).any()


def test_train_command_saves_what_one_process_would(trained):
    reference = reference_output(
        argv(trained, "reference"),
        tiny_model(),
        token_dataset(),
        trained / "reference_out",
    )
    assert_same_saved_sae(trained / "straight_out", reference)
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


# --- the real thing: torchrun, a Hugging Face model and a parquet dataset on disk ---


def save_tiny_hf_model(root: Path) -> None:
    """A random 1-layer GPT-2 with a word-level tokenizer, and pre-tokenized data."""
    from datasets import Dataset
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(64)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="t0", bos_token="t1", eos_token="t2"
    )
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=64, n_positions=32, n_embd=32, n_layer=1, n_head=4,
        bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    GPT2LMHeadModel(config).save_pretrained(root / "model")
    fast.save_pretrained(root / "model")
    tokens = torch.randint(4, 64, (200, CONTEXT), generator=torch.Generator())
    (root / "data").mkdir()
    Dataset.from_dict({"tokens": tokens.tolist()}).to_parquet(
        str(root / "data" / "train.parquet")
    )


@pytest.mark.slow
def test_torchrun_train_command(tmp_path):
    save_tiny_hf_model(tmp_path)
    torch.manual_seed(0)
    SampledTrainingSAE(
        SampledTrainingSAEConfig(d_in=32, d_sae=D_SAE, k=3, pool_factor=4, pool_seed=5)
    ).save_model(str(tmp_path / "init"))
    args = argv(tmp_path, "torchrun")
    model_args = [
        "--model_class_name", "AutoModelForCausalLM",
        "--model_name", str(tmp_path / "model"), "--hook_name", "transformer.h.0",
        "--dataset_path", str(tmp_path / "data"), "--streaming", "False",
    ]  # fmt: skip
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "WANDB_MODE": "disabled",
        "TQDM_DISABLE": "1",
    }
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        "--nnodes", "1", "--nproc_per_node", str(WORLD),
        "-m", "sae_lens_sampled", "train", *args, *model_args,
    ]  # fmt: skip
    result = subprocess.run(
        command, env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert result.returncode == 0, result.stderr[-3000:]
    cfg_path = tmp_path / "torchrun_out" / "cfg.json"
    assert json.loads(cfg_path.read_text())["architecture"] == "sampled"

    from datasets import load_dataset
    from sae_lens.load_model import load_model

    model = load_model(
        "AutoModelForCausalLM", str(tmp_path / "model"), device="cpu",
        hook_names=["transformer.h.0"],
    )  # fmt: skip
    dataset = load_dataset(str(tmp_path / "data"), split="train")
    reference = reference_output(
        [*args, *model_args], model, dataset, tmp_path / "reference_out"
    )
    assert_same_saved_sae(tmp_path / "torchrun_out", reference)


def _primitives_worker(rank: int, world: int, device: str, out: str) -> None:
    masks = parity.run_primitives(rank, world, device)
    torch.save(masks, Path(out) / f"rank{rank}.pt")


@pytest.mark.slow
def test_fresh_interpreters_spawned(tmp_path):
    """The spawn start method (fresh interpreters, as CUDA needs) works too."""
    launch.spawn(
        _primitives_worker, WORLD, "cpu", (str(tmp_path),), start_method="spawn"
    )
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    for name, expected in parity.reference_primitives(WORLD).items():
        got = torch.cat([result[name][0] for result in results])
        assert torch.equal(got, expected), name
