"""Train a Sampled-SAE on Pythia-160M, layer 6 residual stream (the paper's setting).

NEEDS THE HUGGING FACE HUB (model, tokenizer, dataset) and, at this size, a GPU;
``--offline`` trains the same way on a tiny random stand-in instead (nothing
downloaded; 19 s wall on a busy 2-core CPU; see ``pythia_setup.py``). Prints the L0 the
saved SAE recorded at the end of training, under the batch rule and per token.

    python examples/train_sampled.py --output sampled_l6            # the defaults
    python examples/train_sampled.py --output sampled_l6_l4 --pool-factor 4 --score l2
    python examples/train_sampled.py --offline --output /tmp/sampled_tiny --k 4
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pythia_setup import base_parser, sae_fields, train

from sae_lens_sampled import SampledTrainingSAEConfig


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument(
        "--pool-fraction",
        type=float,
        default=None,
        help="the pool as a share of the dictionary (default 0.5)",
    )
    parser.add_argument(
        "--pool-factor",
        type=float,
        default=None,
        help="the paper's l instead: a pool of k * l features",
    )
    parser.add_argument(
        "--score",
        default="squared_l2",
        choices=["squared_l2", "l2", "entropy", "uniform"],
    )
    parser.add_argument("--pool-mode", default="sample", choices=["sample", "top"])
    parser.add_argument("--pool-seed", type=int, default=0)
    args = parser.parse_args(argv)
    sae_cfg = SampledTrainingSAEConfig(
        **sae_fields(args),
        pool_fraction=args.pool_fraction,
        pool_factor=args.pool_factor,
        score=args.score,
        pool_mode=args.pool_mode,
        pool_seed=args.pool_seed,
    )
    return train(sae_cfg, args)


if __name__ == "__main__":
    main()
