"""Shared builders for the tests: a tiny random model, token data, runner configs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from sae_lens import LanguageModelSAERunnerConfig, LoggingConfig
from sae_lens.saes.sae import TrainStepInput
from transformer_lens import HookedTransformer, HookedTransformerConfig

D_MODEL = 32
CONTEXT = 16
VOCAB = 256
HOOK = "blocks.0.hook_resid_post"


def tiny_model(seed: int = 0) -> HookedTransformer:
    """A 1-layer random-weight transformer; nothing is downloaded."""
    cfg = HookedTransformerConfig(
        n_layers=1,
        d_model=D_MODEL,
        n_ctx=CONTEXT,
        d_head=8,
        n_heads=4,
        d_mlp=64,
        d_vocab=VOCAB,
        act_fn="gelu",
        normalization_type="LN",
        device="cpu",
        seed=seed,
    )
    return HookedTransformer(cfg)


def token_dataset(n_rows: int = 400, seed: int = 0) -> Dataset:
    """Zipf-distributed token ids, so some tokens are common and some rare."""
    generator = torch.Generator().manual_seed(seed)
    weights = 1.0 / torch.arange(1, VOCAB + 1, dtype=torch.float64)
    tokens = torch.multinomial(
        weights, n_rows * CONTEXT, replacement=True, generator=generator
    )
    return Dataset.from_dict({"tokens": tokens.view(n_rows, CONTEXT).tolist()})


def runner_config(
    sae_cfg: Any,
    tmp_path: Path,
    *,
    steps: int = 30,
    batch_tokens: int = 128,
    **overrides: Any,
) -> LanguageModelSAERunnerConfig[Any]:
    """An offline CPU runner config around ``sae_cfg`` (wandb off)."""
    settings: dict[str, Any] = {
        "sae": sae_cfg,
        "hook_name": HOOK,
        "dataset_path": "",
        "streaming": False,
        "is_dataset_tokenized": True,
        "context_size": CONTEXT,
        "prepend_bos": False,
        "training_tokens": steps * batch_tokens,
        "train_batch_size_tokens": batch_tokens,
        "store_batch_size_prompts": 8,
        "n_batches_in_buffer": 16,
        "dead_feature_window": 10,
        "feature_sampling_window": 20,
        "lr": 3e-3,
        "device": "cpu",
        "seed": 0,
        "logger": LoggingConfig(log_to_wandb=False),
        "n_checkpoints": 0,
        "checkpoint_path": str(tmp_path / "checkpoints"),
        "output_path": str(tmp_path / "final"),
        "verbose": False,
        "exclude_special_tokens": False,
    }
    settings.update(overrides)
    return LanguageModelSAERunnerConfig(**settings)


def step_input(
    x: torch.Tensor,
    dead: torch.Tensor | None = None,
    coefficients: dict[str, float] | None = None,
) -> TrainStepInput:
    """A training step's input as SAELens's trainer builds it (not a logging step)."""
    return TrainStepInput(
        sae_in=x,
        coefficients={} if coefficients is None else coefficients,
        dead_neuron_mask=dead,
        n_training_steps=0,
        is_logging_step=False,
    )
