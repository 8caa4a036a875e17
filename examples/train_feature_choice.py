"""Train a Feature Choice SAE on Pythia-160M, layer 6 residual stream.

NEEDS THE HUGGING FACE HUB (model, tokenizer, dataset) and, at this size, a GPU.

The output directory holds an inference ``feature_choice`` SAE (per-token ``encode``
with per-feature thresholds, ``encode_batch`` for the batch rule).

    python examples/train_feature_choice.py --output fc_l6            # the defaults
    python examples/train_feature_choice.py --output fc_l6_demand --rank-by demand
"""

from pythia_setup import base_parser, runner_config, sae_fields
from sae_lens import LanguageModelSAETrainingRunner

from sae_lens_sampled import FeatureChoiceTrainingSAEConfig


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument(
        "--schedule", default="zipf", choices=["zipf", "uniform", "zipf_fixed"]
    )
    parser.add_argument(
        "--rank-by", default="demand", choices=["demand", "firing_rate"]
    )
    parser.add_argument("--zipf-alpha", type=float, default=0.5)
    parser.add_argument("--rerank-every", type=int, default=100)
    args = parser.parse_args()
    sae_cfg = FeatureChoiceTrainingSAEConfig(
        **sae_fields(args),
        capacity_schedule=args.schedule,
        rank_by=args.rank_by,
        zipf_alpha=args.zipf_alpha,
        rerank_every=args.rerank_every,
    )
    sae = LanguageModelSAETrainingRunner(runner_config(sae_cfg, args)).run()
    print(
        f"saved to {args.output}; dead features: {sae.cfg.metadata.num_dead_features}"
    )


if __name__ == "__main__":
    main()
