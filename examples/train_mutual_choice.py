"""Train a Mutual Choice SAE on Pythia-160M, layer 6 residual stream.

NEEDS THE HUGGING FACE HUB (model, tokenizer, dataset) and, at this size, a GPU.

    python examples/train_mutual_choice.py --output mutual_choice_l6
    python examples/train_mutual_choice.py --output mc_zipf --aux-loss aux_zipf
"""

from pythia_setup import base_parser, runner_config, sae_fields
from sae_lens import LanguageModelSAETrainingRunner

from sae_lens_sampled import MutualChoiceTrainingSAEConfig


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument(
        "--threshold-mode", default="global", choices=["global", "per_feature"]
    )
    args = parser.parse_args()
    sae_cfg = MutualChoiceTrainingSAEConfig(
        **sae_fields(args), threshold_mode=args.threshold_mode
    )
    LanguageModelSAETrainingRunner(runner_config(sae_cfg, args)).run()
    print(f"saved to {args.output}")


if __name__ == "__main__":
    main()
