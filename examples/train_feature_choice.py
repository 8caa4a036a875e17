"""Train a Feature Choice SAE on Pythia-160M, layer 6 residual stream.

NEEDS THE HUGGING FACE HUB (model weights, tokenizer and dataset are downloaded) and,
at the default size, a GPU. It has not been run as part of this project's tests; the
tests train the same architecture offline on a tiny random model instead.

Everything below is plain SAELens: the plugin only adds the ``feature_choice``
architecture, so the runner, activations store, trainer, evals and the saved output
are SAELens's own. The output directory holds an inference ``feature_choice`` SAE
(per-token ``encode`` with per-feature thresholds, ``encode_batch`` for the batch
rule), loadable with ``SAE.load_from_disk`` once ``sae_lens_sampled`` is imported.

    python examples/train_feature_choice.py --training-tokens 50_000_000 --device cuda
    python examples/train_feature_choice.py --schedule uniform --k 64 --wandb
"""

from __future__ import annotations

import argparse

from sae_lens import (
    LanguageModelSAERunnerConfig,
    LanguageModelSAETrainingRunner,
    LoggingConfig,
)

from sae_lens_sampled import FeatureChoiceTrainingSAEConfig

MODEL = "pythia-160m-deduped"
HOOK = "blocks.6.hook_resid_post"
D_MODEL = 768
DATASET = "monology/pile-uncopyrighted"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--expansion", type=int, default=16, help="d_sae / d_model")
    parser.add_argument("--k", type=float, default=32.0, help="mean L0 per token")
    parser.add_argument(
        "--schedule", default="zipf", choices=["zipf", "uniform", "zipf_fixed"]
    )
    parser.add_argument(
        "--rank-by", default="firing_rate", choices=["firing_rate", "demand"]
    )
    parser.add_argument("--zipf-alpha", type=float, default=1.0)
    parser.add_argument("--rerank-every", type=int, default=100)
    parser.add_argument("--training-tokens", type=int, default=50_000_000)
    parser.add_argument("--batch-tokens", type=int, default=4096)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--output", default="feature_choice_pythia160m_l6")
    parser.add_argument(
        "--wandb", action="store_true", help="log to wandb (and run evals)"
    )
    return parser.parse_args()


def build_config(
    args: argparse.Namespace,
) -> LanguageModelSAERunnerConfig[FeatureChoiceTrainingSAEConfig]:
    """The runner config; building it downloads nothing."""
    sae_cfg = FeatureChoiceTrainingSAEConfig(
        d_in=D_MODEL,
        d_sae=D_MODEL * args.expansion,
        k=args.k,
        capacity_schedule=args.schedule,
        rank_by=args.rank_by,
        zipf_alpha=args.zipf_alpha,
        rerank_every=args.rerank_every,
        dtype="float32",
        device=args.device,
    )
    context_size = 1024
    return LanguageModelSAERunnerConfig(
        sae=sae_cfg,
        model_name=MODEL,
        hook_name=HOOK,
        dataset_path=DATASET,
        is_dataset_tokenized=False,
        streaming=True,
        context_size=context_size,
        train_batch_size_tokens=args.batch_tokens,
        # the activation buffer must hold at least one batch of tokens
        n_batches_in_buffer=max(32, -(-args.batch_tokens // context_size)),
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


def main() -> None:
    args = parse_args()
    sae = LanguageModelSAETrainingRunner(build_config(args)).run()
    print(
        f"saved to {args.output}; dead features (SAELens window): "
        f"{sae.cfg.metadata.num_dead_features}"
    )


if __name__ == "__main__":
    main()
