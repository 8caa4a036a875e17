"""The ``sae-lens-sampled`` command: ``train`` (SAELens's training CLI, run in this
process with the plugin's architectures registered), ``compare``, ``bench`` and
``probe`` (``docs/compare.md``, README.md).

Starting it imports neither torch nor SAELens, so ``--help`` answers at once. A bad
setting or a fault of the machine (no CUDA, a missing file or model) ends the command
with one line; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

PROG = "sae-lens-sampled"
DEBUG_FLAG = "--debug"
# The training CLI SAELens documents; run as __main__ in this process.
SAELENS_TRAINING_CLI = "sae_lens.llm_sae_training_runner"

COMMANDS = {
    "train": "train an SAE with SAELens's training CLI (all its flags)",
    "compare": "train architectures side by side at equal k and compare them",
    "bench": "time the training step of each architecture against SAELens's",
    "probe": "sparse probing of the SAEs a compare run saved, on a label set",
}


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser (help text only: the command line is read by :func:`main`)."""
    commands = "\n".join(f"  {name:10s}{text}" for name, text in COMMANDS.items())
    parser = argparse.ArgumentParser(
        prog=PROG,
        usage=f"{PROG} [-h] [--version] [{DEBUG_FLAG}] COMMAND [ARGS ...]",
        description="Batch-level SAE architectures for SAELens.",
        epilog=f"commands:\n{commands}\n\nRun '{PROG} COMMAND --help' for a "
        "command's flags.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="store_true", help="print the version")
    parser.add_argument(
        DEBUG_FLAG,
        action="store_true",
        help="on an error, show the full traceback instead of one line",
    )
    return parser


def _defaults(cls: type) -> dict[str, Any]:
    """Each field's default (``dataclasses.MISSING`` where it has none)."""
    values = {}
    for field in dataclasses.fields(cls):
        values[field.name] = field.default
        if field.default_factory is not dataclasses.MISSING:
            values[field.name] = field.default_factory()
    return values


def _wrapped_flags(first: str, defaults: dict[str, Any], width: int = 88) -> str:
    """``first`` then ``--flag default`` items, wrapped between items only."""
    # simple_parsing gives one-letter fields a single dash (-k).
    items = [
        f"{'-' if len(name) == 1 else '--'}{name} {value}"
        for name, value in defaults.items()
    ]
    indent = " " * len(first)
    lines, line = [], first
    for i, item in enumerate(items):
        piece = item + ("," if i < len(items) - 1 else "")
        if line.strip() and len(line) + len(piece) + 1 > width:
            lines.append(line.rstrip())
            line = indent
        line += piece + " "
    lines.append(line.rstrip())
    return "\n".join(lines)


def train_help_header() -> str:
    """Lines printed above SAELens's help: the plugin architectures and their flags."""
    from sae_lens.saes.sae import TrainingSAEConfig

    from sae_lens_sampled._plugin import register_all
    from sae_lens_sampled._registry import architectures
    from sae_lens_sampled.saes.base import BatchLevelTrainingSAEConfig

    saelens = _defaults(TrainingSAEConfig)
    shared = {
        name: value
        for name, value in _defaults(BatchLevelTrainingSAEConfig).items()
        if name not in saelens and name != "metadata"
    }
    lines = [
        f"{PROG} train: SAELens's training CLI ({SAELENS_TRAINING_CLI})",
        "with the plugin's architectures registered. Every flag of an architecture,",
        f"with its description: {PROG} train --architecture NAME --help",
        "",
        "Plugin architectures (--architecture NAME), their own flags and defaults:",
    ]
    register_all()
    for entry in architectures():
        key = entry.key
        own = {
            name: value
            for name, value in _defaults(entry.training_config_class).items()
            if name not in saelens and shared.get(name, dataclasses.MISSING) != value
        }
        if own:
            lines.append(_wrapped_flags(f"  {key:16s}", own))
        else:
            lines.append(f"  {key:16s}(the shared flags below only)")
    lines.append(_wrapped_flags(f"  {'all of them:':16s}", shared))
    lines += [
        "  and SAELens's SAE flags (--d_in, --d_sae, ...).",
        "",
        "SAELens's help follows (for --architecture standard unless one is given).",
        "",
    ]
    return "\n".join(lines)


def _wants_help(argv: Sequence[str]) -> bool:
    return not argv or "-h" in argv or "--help" in argv


def run_saelens_training_cli(argv: Sequence[str], prog: str) -> None:
    """Run SAELens's documented training CLI in this process, with ``prog`` in usage.

    ``runpy`` warns that the module is already imported (``import sae_lens`` imports
    it); that warning, and only that one, is silenced.
    """
    import runpy
    import warnings

    saved = sys.argv
    sys.argv = [prog, *argv]  # argparse names the program after sys.argv[0]
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings(
                "ignore",
                message=f".*{SAELENS_TRAINING_CLI}' found in sys.modules",
                category=RuntimeWarning,
            )
            runpy.run_module(SAELENS_TRAINING_CLI, run_name="__main__")
    finally:
        sys.argv = saved


def _device_argument(argv: Sequence[str]) -> str | None:
    for i, arg in enumerate(argv):
        if arg.startswith("--device="):
            return arg.partition("=")[2]
        if arg == "--device" and i + 1 < len(argv):
            return argv[i + 1]
    return None


def _train(argv: Sequence[str]) -> int:
    device = _device_argument(argv)
    if device is not None and not _wants_help(argv):
        from sae_lens_sampled.benchmark.compare import check_device

        check_device(device)  # before SAELens builds a model on it
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # under torchrun with N > 1
        from sae_lens_sampled.distributed.train import main as train_data_parallel

        return train_data_parallel(argv)
    from sae_lens_sampled._plugin import register_all

    register_all()  # already done by the import; again after any reload
    names_architecture = any(
        a == "--architecture" or a.startswith("--architecture=") for a in argv
    )
    if _wants_help(argv) and not names_architecture:
        print(train_help_header())
        sys.stdout.flush()
    run_saelens_training_cli(argv, prog=f"{PROG} train")
    return 0


def _tool(module: str) -> Callable[[Sequence[str]], int]:
    """A subcommand run by ``module``'s ``main``, imported only when it runs (so
    ``train`` does not pay for the benchmark's imports)."""

    def run(argv: Sequence[str]) -> int:
        main: Callable[[list[str]], int] = importlib.import_module(module).main
        return main(list(argv))

    return run


RUNNERS: dict[str, Callable[[Sequence[str]], int]] = {
    "train": _train,
    "compare": _tool("sae_lens_sampled.benchmark.compare"),
    "bench": _tool("sae_lens_sampled.benchmark.speed"),
    "probe": _tool("sae_lens_sampled.benchmark.probe_command"),
}


def is_setting_error(exc: BaseException) -> bool:
    """Whether ``exc`` reports a bad setting rather than a failure while running.

    That is: a parser's ``ArgumentError``, a field check of the plugin, or a
    ``ValueError``/``TypeError`` raised while a config dataclass validated itself.
    """
    if isinstance(exc, argparse.ArgumentError):
        return True
    checks = sys.modules.get("sae_lens_sampled.checks")
    if checks is not None and isinstance(exc, checks.FieldValueError):
        return True
    if not isinstance(exc, ValueError | TypeError):
        return False
    import traceback

    return any(
        frame.f_code.co_name == "__post_init__"
        and dataclasses.is_dataclass(frame.f_locals.get("self"))
        for frame, _ in traceback.walk_tb(exc.__traceback__)
    )


def is_environment_error(exc: BaseException) -> bool:
    """Whether ``exc`` is a fault of the machine rather than of the program: a file,
    network or hub error (``OSError``: a model not cached while offline, a missing
    file, a full disk) or a CUDA device that is missing or out of memory."""
    if isinstance(exc, OSError):
        return True
    return isinstance(exc, RuntimeError | AssertionError) and (
        "CUDA" in str(exc) or "out of memory" in str(exc)
    )


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


# Set by main for the command it runs: subcommands that report their own errors in one
# line let them propagate instead (--debug).
_debug = False


def debugging() -> bool:
    """Whether the running command was given ``--debug``."""
    return _debug


def main(argv: Sequence[str] | None = None) -> int:
    global _debug
    args = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    debug = False
    while args and args[0].startswith("-"):  # options before the command
        option = args.pop(0)
        if option in ("-h", "--help"):
            parser.print_help()
            return 0
        if option == "--version":
            from sae_lens_sampled import __version__

            print(f"{PROG} {__version__}")
            return 0
        if option == DEBUG_FLAG:
            debug = True
            continue
        parser.print_usage(sys.stderr)
        print(f"{PROG}: error: unrecognized option {option}", file=sys.stderr)
        return 2
    if not args:
        parser.print_help(sys.stderr)
        return 2
    command, rest = args[0], args[1:]
    if command not in RUNNERS:
        parser.print_usage(sys.stderr)
        choices = ", ".join(COMMANDS)
        print(
            f"{PROG}: error: unknown command {command!r} (choose from {choices})",
            file=sys.stderr,
        )
        return 2
    if DEBUG_FLAG in rest:  # accepted after the command too; no subcommand has it
        debug = True
        rest = [a for a in rest if a != DEBUG_FLAG]
    _debug = debug
    try:
        return RUNNERS[command](rest)
    except SystemExit as exit_:  # argparse: --help (0) or a usage error (2)
        if exit_.code is None or isinstance(exit_.code, int):
            return exit_.code or 0
        print(exit_.code, file=sys.stderr)
        return 1
    except (KeyboardInterrupt, Exception) as exc:
        if debug:
            raise
        # SIGINT, or SAELens's runner's InterruptedException for it.
        if isinstance(exc, KeyboardInterrupt) or (
            type(exc).__name__ == "InterruptedException"
        ):
            print(f"{PROG} {command}: interrupted", file=sys.stderr)
            return 130
        if is_setting_error(exc):
            print(f"{PROG} {command}: error: {_one_line(exc)}", file=sys.stderr)
            return 2
        if is_environment_error(exc):
            print(
                f"{PROG} {command}: error: {_one_line(exc)} ({DEBUG_FLAG} shows the "
                "traceback)",
                file=sys.stderr,
            )
            return 1
        raise
    finally:
        _debug = False


if __name__ == "__main__":
    sys.exit(main())
