"""Train a Sampled-SAE on Pythia-160M, layer 6 residual stream (the paper's setting).

NEEDS THE HUGGING FACE HUB (model, tokenizer, dataset) and, at this size, a GPU.

    python examples/train_sampled.py --output sampled_l6            # the defaults
    python examples/train_sampled.py --output sampled_l6_l4 --pool-factor 4 --score l2
"""

from pythia_setup import base_parser, runner_config, sae_fields
from sae_lens import LanguageModelSAETrainingRunner

from sae_lens_sampled import SampledTrainingSAEConfig


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument(
        "--pool-factor", type=float, default=16.0, help="the paper's l (default 16)"
    )
    parser.add_argument(
        "--score",
        default="squared_l2",
        choices=["squared_l2", "l2", "entropy", "uniform"],
    )
    parser.add_argument("--pool-mode", default="sample", choices=["sample", "top"])
    parser.add_argument("--pool-seed", type=int, default=0)
    args = parser.parse_args()
    sae_cfg = SampledTrainingSAEConfig(
        **sae_fields(args),
        pool_factor=args.pool_factor,
        score=args.score,
        pool_mode=args.pool_mode,
        pool_seed=args.pool_seed,
    )
    LanguageModelSAETrainingRunner(runner_config(sae_cfg, args)).run()
    print(f"saved to {args.output}")


if __name__ == "__main__":
    main()
