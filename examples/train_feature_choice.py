"""Train a Feature Choice SAE on Pythia-160M, layer 6 residual stream.

NEEDS THE HUGGING FACE HUB (model, tokenizer, dataset) and, at this size, a GPU;
``--offline`` trains the same way on a tiny random stand-in instead (nothing
downloaded; 19 s wall on a busy 2-core CPU; see ``pythia_setup.py``). Prints the L0 and the
dead features the saved SAE recorded at the end of training.

The output directory holds an inference ``feature_choice`` SAE (per-token ``encode``
with per-feature thresholds, ``encode_batch`` for the batch rule).

    python examples/train_feature_choice.py --output fc_l6            # the defaults
    python examples/train_feature_choice.py --output fc_l6_demand --rank-by demand
    python examples/train_feature_choice.py --offline --output /tmp/fc_tiny --k 4
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pythia_setup import base_parser, sae_fields, train

from sae_lens_sampled import FeatureChoiceTrainingSAEConfig


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument(
        "--schedule", default="zipf", choices=["zipf", "uniform", "zipf_fixed"]
    )
    parser.add_argument(
        "--rank-by", default="demand", choices=["demand", "firing_rate"]
    )
    parser.add_argument("--zipf-alpha", type=float, default=0.5)
    parser.add_argument("--rerank-every", type=int, default=100)
    args = parser.parse_args(argv)
    sae_cfg = FeatureChoiceTrainingSAEConfig(
        **sae_fields(args),
        capacity_schedule=args.schedule,
        rank_by=args.rank_by,
        zipf_alpha=args.zipf_alpha,
        rerank_every=args.rerank_every,
    )
    return train(sae_cfg, args)


if __name__ == "__main__":
    main()
