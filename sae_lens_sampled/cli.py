"""The ``sae-lens-sampled`` command.

``train``: SAELens's own training CLI (``python -m sae_lens.llm_sae_training_runner``)
with the plugin's architectures registered, so ``--architecture sampled`` and every
plugin field (``--pool_factor``, ``--score``, ...) work like SAELens's built-ins.

``compare``: train architectures side by side at equal k and compare them
(:mod:`sae_lens_sampled.benchmark.compare`).

``bench``: time the training step and its peak memory against SAELens's BatchTopK and
TopK (:mod:`sae_lens_sampled.benchmark.speed`).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

COMMANDS = {
    "train": "train an SAE with SAELens's training CLI (all its flags)",
    "compare": "train architectures side by side at equal k and compare them",
    "bench": "time the training step of each architecture against SAELens's",
}


def _train(argv: Sequence[str]) -> int:
    from sae_lens.llm_sae_training_runner import _run_cli

    import sae_lens_sampled  # noqa: F401  (registers the architectures)

    _run_cli(list(argv))
    return 0


def _compare(argv: Sequence[str]) -> int:
    # Imported here so that ``train`` does not pay for the benchmark's imports.
    from sae_lens_sampled.benchmark.compare import main as compare_main

    return compare_main(list(argv))


def _bench(argv: Sequence[str]) -> int:
    from sae_lens_sampled.benchmark.speed import main as bench_main

    return bench_main(list(argv))


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="sae-lens-sampled",
        description="Batch-level SAE architectures for SAELens.",
        epilog="\n".join(f"  {name:10s}{text}" for name, text in COMMANDS.items()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("command", choices=sorted(COMMANDS))
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0 if argv else 2
    args, rest = parser.parse_known_args(argv[:1])
    if args.command == "train":
        return _train(argv[1:])
    if args.command == "compare":
        return _compare(argv[1:])
    if args.command == "bench":
        return _bench(argv[1:])
    raise AssertionError(args.command)


if __name__ == "__main__":
    sys.exit(main())
