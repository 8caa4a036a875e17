"""Shared set-up of the training examples: Pythia-160M (the Sampled-SAE paper's
setting), or with ``--offline`` a tiny random stand-in.

THE HUB-ONLY PART is :func:`train` without ``--offline``: SAELens's runner then
downloads the model weights, the tokenizer and the dataset. With ``--offline`` the
same runner trains on :func:`offline_stand_in` (a random-weight two-layer
``HookedTransformer`` and generated token ids), nothing is downloaded, and a run takes
400 steps, about 19 s wall on a busy 2-core CPU (long enough for the per-token L0 to
settle within 20 % of k); the test suite runs every training example that way.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any

import torch
from datasets import Dataset
from sae_lens import (
    SAE,
    LanguageModelSAERunnerConfig,
    LanguageModelSAETrainingRunner,
    LoggingConfig,
    TrainingSAEConfig,
)
from transformer_lens import HookedTransformer, HookedTransformerConfig


@dataclass(frozen=True)
class Setting:
    """Where the activations come from, and the run-length defaults that suit it."""

    model: str
    hook: str
    d_model: int
    dataset: str
    context: int
    training_tokens: int
    batch_tokens: int
    warm_up_steps: int
    dead_feature_window: int  # in training steps (SAELens's convention)


PYTHIA = Setting(
    model="pythia-160m-deduped",
    hook="blocks.6.hook_resid_post",  # "sixth layer": output of block 6 (0-indexed)
    d_model=768,
    dataset="monology/pile-uncopyrighted",
    context=1024,
    training_tokens=50_000_000,
    batch_tokens=4096,
    warm_up_steps=1000,
    dead_feature_window=1000,
)
OFFLINE = Setting(
    model="tiny-random (offline)",
    hook="blocks.1.hook_resid_pre",
    d_model=32,
    dataset="generated Zipf-distributed token ids (offline)",
    context=16,
    # 400 steps: enough for the per-token thresholds to settle within 20 % of k
    training_tokens=400 * 256,
    batch_tokens=256,
    warm_up_steps=5,
    dead_feature_window=20,
)
_OFFLINE_VOCAB = 256


def base_parser(description: str) -> argparse.ArgumentParser:
    """Flags every example shares; each script adds its architecture's own."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument(
        "--offline",
        action="store_true",
        help="train on a tiny random model and generated tokens (no downloads, "
        "seconds on a CPU) instead of Pythia-160M and the Pile",
    )
    parser.add_argument("--expansion", type=int, default=16, help="d_sae / d_model")
    parser.add_argument("--k", type=float, default=32.0, help="mean L0 per token")
    parser.add_argument(
        "--aux-loss", default="aux_k", choices=["aux_k", "aux_zipf", "none"]
    )
    parser.add_argument(
        "--training-tokens",
        type=int,
        help=f"default {PYTHIA.training_tokens:,} ({OFFLINE.training_tokens:,} "
        "with --offline)",
    )
    parser.add_argument(
        "--batch-tokens",
        type=int,
        help=f"default {PYTHIA.batch_tokens} ({OFFLINE.batch_tokens} with --offline)",
    )
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--device", help="default cuda (cpu with --offline)")
    parser.add_argument("--output", required=True)
    parser.add_argument(
        "--wandb", action="store_true", help="log to wandb (and run evals)"
    )
    return parser


def setting(args: argparse.Namespace) -> Setting:
    return OFFLINE if args.offline else PYTHIA


def device(args: argparse.Namespace) -> str:
    if args.device is not None:
        return str(args.device)
    return "cpu" if args.offline else "cuda"


def sae_fields(args: argparse.Namespace) -> dict[str, Any]:
    """The training-config fields shared by every plugin architecture."""
    d_model = setting(args).d_model
    return {
        "d_in": d_model,
        "d_sae": d_model * args.expansion,
        "k": args.k,
        "aux_loss": args.aux_loss,
        "device": device(args),
    }


def runner_config(
    sae_cfg: TrainingSAEConfig, args: argparse.Namespace
) -> LanguageModelSAERunnerConfig[Any]:
    """A SAELens runner config around ``sae_cfg``."""
    where = setting(args)
    batch_tokens = args.batch_tokens or where.batch_tokens
    return LanguageModelSAERunnerConfig(
        sae=sae_cfg,
        model_name=where.model,
        hook_name=where.hook,
        dataset_path="" if args.offline else where.dataset,
        is_dataset_tokenized=args.offline,
        streaming=not args.offline,
        context_size=where.context,
        prepend_bos=not args.offline,
        train_batch_size_tokens=batch_tokens,
        # the activation buffer must hold at least one batch of tokens
        n_batches_in_buffer=max(32, -(-batch_tokens // where.context)),
        store_batch_size_prompts=16,
        training_tokens=args.training_tokens or where.training_tokens,
        lr=args.lr,
        lr_warm_up_steps=where.warm_up_steps,
        dead_feature_window=where.dead_feature_window,
        feature_sampling_window=2 * where.dead_feature_window,
        device=device(args),
        seed=0,
        logger=LoggingConfig(log_to_wandb=args.wandb, wandb_project="sae_lens_sampled"),
        checkpoint_path=f"{args.output}/checkpoints",
        output_path=args.output,
        n_checkpoints=0 if args.offline else 2,
        exclude_special_tokens=not args.offline,
        verbose=not args.offline,
    )


def offline_stand_in(n_rows: int = 2000) -> tuple[HookedTransformer, Dataset]:
    """A random-weight two-layer transformer and ``n_rows`` rows of token ids."""
    model = HookedTransformer(
        HookedTransformerConfig(
            n_layers=2,
            d_model=OFFLINE.d_model,
            n_ctx=OFFLINE.context,
            d_head=8,
            n_heads=4,
            d_mlp=4 * OFFLINE.d_model,
            d_vocab=_OFFLINE_VOCAB,
            act_fn="gelu",
            normalization_type="LN",
            device="cpu",
            seed=0,
        )
    )
    generator = torch.Generator().manual_seed(0)
    # Zipf-distributed ids, so that some tokens are common and some rare.
    weights = 1.0 / torch.arange(1, _OFFLINE_VOCAB + 1, dtype=torch.float64)
    tokens = torch.multinomial(
        weights, n_rows * OFFLINE.context, replacement=True, generator=generator
    )
    rows = tokens.view(n_rows, OFFLINE.context).tolist()
    return model, Dataset.from_dict({"tokens": rows})


def train(sae_cfg: TrainingSAEConfig, args: argparse.Namespace) -> dict[str, Any]:
    """Train with SAELens's runner, save to ``args.output``, print and return what
    the saved SAE records about its training.

    Without ``--offline`` this NEEDS THE HUGGING FACE HUB (and, at this size, a GPU).
    """
    cfg = runner_config(sae_cfg, args)
    if args.offline:
        torch.set_num_threads(1)  # tiny matrices: more threads only add overhead
        model, dataset = offline_stand_in()
        runner = LanguageModelSAETrainingRunner(
            cfg, override_model=model, override_dataset=dataset
        )
    else:
        runner = LanguageModelSAETrainingRunner(cfg)
    runner.run()
    return report(args.output)


def report(output: str) -> dict[str, Any]:
    """Print and return what the SAE saved in ``output`` records about its training."""
    sae = SAE.load_from_disk(output)
    metadata = sae.cfg.metadata
    summary = {
        "architecture": sae.cfg.architecture(),
        "class": type(sae).__name__,
        "d_sae": sae.cfg.d_sae,
        "k": sae.cfg.k,
        # end-of-training moving averages, recorded by the plugin's training SAEs
        "l0_batch_rule": metadata.l0_batch_rule,
        "l0_per_token": metadata.l0_per_token,
        "dead_features": metadata.num_dead_features,
    }
    print(
        f"saved a {summary['architecture']} SAE ({summary['class']}, d_sae "
        f"{summary['d_sae']}, k {summary['k']:g}) to {output}; at the end of "
        f"training: L0 under the batch rule {summary['l0_batch_rule']:.2f}, per "
        f"token {summary['l0_per_token']:.2f}; dead features "
        f"{summary['dead_features']}"
    )
    return summary
