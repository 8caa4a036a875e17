"""Train a Mutual Choice SAE on Pythia-160M, layer 6 residual stream.

NEEDS THE HUGGING FACE HUB (model, tokenizer, dataset) and, at this size, a GPU;
``--offline`` trains the same way on a tiny random stand-in instead (nothing
downloaded; 19 s wall on a busy 2-core CPU; see ``pythia_setup.py``). Prints the L0 the
saved SAE recorded at the end of training, under the batch rule and per token.

    python examples/train_mutual_choice.py --output mutual_choice_l6
    python examples/train_mutual_choice.py --output mc_zipf --aux-loss aux_zipf
    python examples/train_mutual_choice.py --offline --output /tmp/mc_tiny --k 4
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pythia_setup import base_parser, sae_fields, train

from sae_lens_sampled import MutualChoiceTrainingSAEConfig


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument(
        "--threshold-mode", default="rate", choices=["rate", "global", "per_feature"]
    )
    args = parser.parse_args(argv)
    sae_cfg = MutualChoiceTrainingSAEConfig(
        **sae_fields(args), threshold_mode=args.threshold_mode
    )
    return train(sae_cfg, args)


if __name__ == "__main__":
    main()
