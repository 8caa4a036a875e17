"""Start-up time of the ``sae-lens-sampled`` command (a benchmark, not a test).

::

    python -m experiments.cli_timing [--repeat 7] [--train]
        [--checkout DIR]

Runs each command ``--repeat`` times in a fresh interpreter, round-robin (so load
from other processes spreads over all commands alike), and prints the median,
minimum and maximum wall-clock time. ``python -c pass`` is the floor: the
interpreter's own start-up, the installed ``.pth`` hooks included. ``--train`` adds
``train --help`` and a bare ``import sae_lens``, which pay for SAELens and torch.
``--checkout DIR`` puts another checkout of the package first on ``PYTHONPATH``, to
time an older version side by side on the same machine.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

Command = tuple[str, list[str]]


def console_script() -> list[str]:
    """The installed ``sae-lens-sampled`` script, else ``python -m sae_lens_sampled``."""
    script = Path(sys.executable).with_name("sae-lens-sampled")
    if script.is_file():
        return [str(script)]
    found = shutil.which("sae-lens-sampled")
    return [found] if found else [sys.executable, "-m", "sae_lens_sampled"]


def commands(train: bool) -> list[Command]:
    cli = console_script()
    python = sys.executable
    timed: list[Command] = [
        ("python -c pass", [python, "-c", "pass"]),
        ("sae-lens-sampled --help", [*cli, "--help"]),
        ("sae-lens-sampled --version", [*cli, "--version"]),
        ("python -m sae_lens_sampled --help", [python, "-m", "sae_lens_sampled", "-h"]),
    ]
    if train:
        timed += [
            ("python -c 'import sae_lens'", [python, "-c", "import sae_lens"]),
            ("sae-lens-sampled train --help", [*cli, "train", "--help"]),
        ]
    return timed


def time_once(argv: list[str], env: dict[str, str]) -> tuple[float, int]:
    start = time.perf_counter()
    # From a neutral directory: `python -m` puts the working directory first on
    # sys.path, which would shadow --checkout with a checkout it is run from.
    result = subprocess.run(
        argv,
        env=env,
        cwd=tempfile.gettempdir(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    return time.perf_counter() - start, result.returncode


def run(
    timed: list[Command], repeat: int, env: dict[str, str]
) -> dict[str, tuple[list[float], set[int]]]:
    samples: dict[str, tuple[list[float], set[int]]] = {
        name: ([], set()) for name, _ in timed
    }
    for _ in range(repeat):
        for name, argv in timed:
            seconds, code = time_once(argv, env)
            samples[name][0].append(seconds)
            samples[name][1].add(code)
    return samples


def report(samples: dict[str, tuple[list[float], set[int]]]) -> str:
    width = max(len(name) for name in samples)
    lines = [f"{'command':{width}s}  median s   min s   max s   n  exit"]
    for name, (seconds, codes) in samples.items():
        lines.append(
            f"{name:{width}s}  {statistics.median(seconds):8.3f} "
            f"{min(seconds):7.3f} {max(seconds):7.3f} {len(seconds):3d}  "
            f"{','.join(str(c) for c in sorted(codes))}"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m experiments.cli_timing",
        description="Wall-clock start-up time of the sae-lens-sampled command.",
    )
    parser.add_argument("--repeat", type=int, default=7, help="runs per command")
    parser.add_argument(
        "--train", action="store_true", help="also time train --help and SAELens"
    )
    parser.add_argument(
        "--checkout", type=Path, help="time this checkout (put first on PYTHONPATH)"
    )
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error(f"--repeat must be >= 1, got {args.repeat}")
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    env.pop("PYTHONPATH", None)
    if args.checkout is not None:
        env["PYTHONPATH"] = str(args.checkout.resolve())
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs, ", end="")
    print(f"load average {os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else "")
    print(report(run(commands(args.train), args.repeat, env)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
