"""Shared set-up of the Pythia-160M training examples (the Sampled-SAE paper's setting).

NEEDS THE HUGGING FACE HUB when a runner is started (model weights, tokenizer and the
dataset are downloaded); building the config downloads nothing. These examples are not
run by the tests, which train the same architectures offline on a tiny random model.
"""

from __future__ import annotations

import argparse
from typing import Any

from sae_lens import LanguageModelSAERunnerConfig, LoggingConfig

MODEL = "pythia-160m-deduped"
HOOK = "blocks.6.hook_resid_post"  # "sixth layer": output of block 6 (0-indexed)
D_MODEL = 768
DATASET = "monology/pile-uncopyrighted"
CONTEXT = 1024


def base_parser(description: str) -> argparse.ArgumentParser:
    """Flags every example shares; each script adds its architecture's own."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--expansion", type=int, default=16, help="d_sae / d_model")
    parser.add_argument("--k", type=float, default=32.0, help="mean L0 per token")
    parser.add_argument(
        "--aux-loss", default="aux_k", choices=["aux_k", "aux_zipf", "none"]
    )
    parser.add_argument("--training-tokens", type=int, default=50_000_000)
    parser.add_argument("--batch-tokens", type=int, default=4096)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--output", required=True)
    parser.add_argument(
        "--wandb", action="store_true", help="log to wandb (and run evals)"
    )
    return parser


def sae_fields(args: argparse.Namespace) -> dict[str, Any]:
    """The training-config fields shared by every plugin architecture."""
    return {
        "d_in": D_MODEL,
        "d_sae": D_MODEL * args.expansion,
        "k": args.k,
        "aux_loss": args.aux_loss,
        "device": args.device,
    }


def runner_config(
    sae_cfg: Any, args: argparse.Namespace
) -> LanguageModelSAERunnerConfig[Any]:
    """A SAELens runner config around ``sae_cfg``."""
    return LanguageModelSAERunnerConfig(
        sae=sae_cfg,
        model_name=MODEL,
        hook_name=HOOK,
        dataset_path=DATASET,
        is_dataset_tokenized=False,
        streaming=True,
        context_size=CONTEXT,
        train_batch_size_tokens=args.batch_tokens,
        # the activation buffer must hold at least one batch of tokens
        n_batches_in_buffer=max(32, -(-args.batch_tokens // CONTEXT)),
        store_batch_size_prompts=16,
        training_tokens=args.training_tokens,
        lr=args.lr,
        lr_warm_up_steps=1000,
        # counted in training steps, not tokens (SAELens's convention)
        dead_feature_window=1000,
        feature_sampling_window=2000,
        device=args.device,
        logger=LoggingConfig(log_to_wandb=args.wandb, wandb_project="sae_lens_sampled"),
        checkpoint_path=f"{args.output}/checkpoints",
        output_path=args.output,
        n_checkpoints=2,
    )
