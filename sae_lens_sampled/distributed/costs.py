"""What data-parallel selection costs: bytes on the wire (modelled and counted) and
time per step on W ranks against one process.

    python -m sae_lens_sampled.distributed.costs traffic            # model table
    python -m sae_lens_sampled.distributed.costs traffic --measure  # + counted, 2 gloo ranks
    python -m sae_lens_sampled.distributed.costs timing             # 1 process vs 2 ranks

Bytes are those one rank sends per training step under ring collectives (all-reduce
of N bytes: ``2 (W-1)/W N``; all-gather of s bytes per rank: ``(W-1) s``; broadcast:
N), as :class:`~.comm.Comm` counts them. The model below follows the implementation
term by term, so a measured count equals it whenever no fallback round runs.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from sae_lens_sampled.distributed.comm import Comm
from sae_lens_sampled.distributed.global_select import feature_choice_layout_bytes
from sae_lens_sampled.distributed.launch import spawn
from sae_lens_sampled.shape import Shape

if TYPE_CHECKING:
    from sae_lens_sampled._registry import Architecture

MIB = 2**20
TRAFFIC_SHAPES = (
    Shape(4096, 256, 8192, 32),
    Shape(4096, 768, 16384, 64),
    Shape(4096, 768, 2**16, 64),
    Shape(4096, 768, 2**20, 64),
)


def _ring_all_reduce(n_bytes: float, world: int) -> float:
    return 2 * (world - 1) / world * n_bytes


@dataclass(frozen=True)
class RingTraffic:
    """The bytes of each ``GlobalBatch`` exchange for one of ``world`` ranks holding
    ``rows`` tokens (:class:`~sae_lens_sampled.global_batch.BatchTraffic`)."""

    world: int
    rows: int
    oversample: float = 2.0
    act_bytes: int = 4

    def batch_topk(self, budget: int, width: int) -> float:
        # The candidate all-gather and the tie counts' (no fallback round).
        share = math.ceil(self.oversample * budget / self.world)
        candidates = min(budget, self.rows * width, share)
        return (self.world - 1) * (candidates * self.act_bytes + 16)

    def feature_scores(self, d_sae: int, score: str) -> float:
        # float64 sums per feature: two for entropy, one for the norms
        return _ring_all_reduce((16 if score == "entropy" else 8) * d_sae, self.world)

    def draw_pool(self, size: int) -> float:
        return 8.0 * size  # the pool's int64 indices, broadcast

    def column_topk(self, capacities: torch.Tensor) -> float:
        # L = sum_j min(m_j, rows) candidates per rank; the cheaper layout
        candidates = int(capacities.clamp(max=self.rows).sum())
        layouts = feature_choice_layout_bytes(
            candidates, capacities.numel(), self.world
        )
        return min(layouts.values())


def traffic_cases() -> dict[str, tuple[Architecture, dict[str, Any]]]:
    """The traffic model's columns, from the registry: name -> (architecture, its
    training config fields), for the architectures that declare a traffic formula."""
    from sae_lens_sampled._registry import architectures

    cases: dict[str, tuple[Architecture, dict[str, Any]]] = {}
    for entry in architectures():
        if entry.traffic is not None:
            for name, fields in (entry.traffic_cases or {entry.key: {}}).items():
                cases[name] = (entry, dict(fields))
    return cases


def case_config(case: str, shape: Shape, device: str = "cpu") -> Any:
    """The training config of traffic column ``case`` at ``shape``. The rules read
    only the config and selection state: ``d_in=1`` keeps the weights small."""
    cases = traffic_cases()
    if case not in cases:
        raise ValueError(f"architecture must be one of {list(cases)}, got {case!r}")
    entry, fields = cases[case]
    return entry.training_config_class(  # type: ignore[call-arg]
        d_in=1, d_sae=shape.d_sae, k=shape.k, device=device, **fields
    )


def selection_bytes(
    case: str,
    shape: Shape,
    world: int,
    *,
    oversample: float = 2.0,
    act_bytes: int = 4,
) -> float:
    """Bytes one rank sends per step to select, for the traffic column ``case`` (an
    architecture key, or a named setting of one: :func:`traffic_cases`)."""
    cfg = case_config(case, shape)
    if world == 1:
        return 0.0
    entry, _ = traffic_cases()[case]
    assert entry.traffic is not None
    costs = RingTraffic(world, shape.batch // world, oversample, act_bytes)
    return entry.traffic(cfg, shape.batch, costs)


def stats_bytes(shape: Shape, world: int, act_bytes: int = 4) -> float:
    """Per-feature statistics: the SAE's counts (int32) and smallest selected values,
    the thresholds' per-token counts and excess sums (float32), and the trainer's
    firing counts (int32)."""
    return _ring_all_reduce((4 + act_bytes + 8 + 4) * shape.d_sae, world)


def gradient_bytes(shape: Shape, world: int, param_bytes: int = 4) -> float:
    """The gradient all-reduce: ``W_enc``, ``W_dec``, ``b_enc``, ``b_dec``."""
    params = 2 * shape.d_in * shape.d_sae + shape.d_sae + shape.d_in
    return _ring_all_reduce(param_bytes * params, world)


def traffic_table(
    shapes: Sequence[Shape], worlds: Sequence[int], oversample: float
) -> list[dict[str, Any]]:
    rows = []
    for shape in shapes:
        for world in worlds:
            row: dict[str, Any] = {
                "shape": str(shape),
                "world": world,
                "gradients_mib": gradient_bytes(shape, world) / MIB,
                "stats_mib": stats_bytes(shape, world) / MIB,
            }
            for case in traffic_cases():
                sent = selection_bytes(case, shape, world, oversample=oversample)
                row[f"{case}_mib"] = sent / MIB
            rows.append(row)
    return rows


# --- counting: 2 gloo ranks run the selection and the statistics once ---


def _measure_worker(
    rank: int, world: int, device: str, shapes: list[Shape], out: str
) -> None:
    from sae_lens_sampled.distributed.step import DataParallelStep
    from sae_lens_sampled.sparse import SparseCodes, column_stats

    comm = Comm()
    results = []
    for shape in shapes:
        rows = shape.batch // world
        generator = torch.Generator().manual_seed(1000 + rank)
        acts = torch.randn(rows, shape.d_sae, generator=generator).relu_().to(device)
        for arch, (entry, _) in traffic_cases().items():
            sae = entry.training_sae_class(case_config(arch, shape, device))
            step = DataParallelStep(comm, [rows] * world)
            comm.counter.reset()
            selected = step.select(sae, acts)
            codes = SparseCodes.from_dense(selected)
            counts, smallest = column_stats(codes, selected[codes.rows, codes.cols])
            step.column_stats(counts, smallest, rows)
            step.sum_floats(torch.zeros(2, shape.d_sae, device=device))  # thresholds
            step.sum_counts(counts)  # the trainer's firing counts
            results.append(
                {
                    "shape": [shape.batch, shape.d_in, shape.d_sae, shape.k],
                    "arch": arch,
                    "world": world,
                    "traffic": comm.counter.snapshot(),
                }
            )
            del selected, codes
    with open(f"{out}.rank{rank}", "w") as f:
        json.dump(results, f)


def measure_traffic(
    shapes: Sequence[Shape], world: int = 2, device: str = "cpu"
) -> list[list[dict[str, Any]]]:
    """Counted bytes per category for one selection step on ``world`` local ranks:
    one list of results per rank."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "traffic.json")
        spawn(_measure_worker, world, device, (list(shapes), out))
        per_rank = []
        for rank in range(world):
            with open(f"{out}.rank{rank}") as f:
                per_rank.append(json.load(f))
        return per_rank


# --- timing: one process against W ranks ---


def _time_training(
    arch: str, shape: Shape, n_steps: int, warmup: int = 2
) -> list[float]:
    """Seconds of each of ``n_steps`` training steps (after ``warmup``) of this rank,
    on the CPU."""
    from sae_lens.config import SAETrainerConfig

    from sae_lens_sampled.distributed.trainer import DistributedSAETrainer
    from sae_lens_sampled.shape import build_sae

    comm = Comm()
    rows = shape.batch // comm.world_size
    sae = build_sae(arch, shape, "cpu")
    total = n_steps + warmup
    cfg = SAETrainerConfig(
        total_training_samples=shape.batch * total,
        train_batch_size_samples=shape.batch,
        lr=1e-4,
        lr_end=1e-4,
        device="cpu",
    )
    generator = torch.Generator().manual_seed(comm.rank)
    batches = [torch.randn(rows, shape.d_in, generator=generator) for _ in range(4)]
    trainer = DistributedSAETrainer(cfg, sae, iter([]))
    times = []
    for index in range(total):
        comm.barrier()
        start = time.perf_counter()
        trainer.step(batches[index % len(batches)])
        comm.barrier()
        times.append(time.perf_counter() - start)
    return times[warmup:]


def _timing_worker(
    rank: int,
    _world: int,
    _device: str,
    archs: list[str],
    shape: Shape,
    n_steps: int,
    out: str,
) -> None:
    results = {arch: _time_training(arch, shape, n_steps) for arch in archs}
    if rank == 0:
        with open(out, "w") as f:
            json.dump(results, f)


def measure_timing(
    archs: Sequence[str], shape: Shape, n_steps: int, rounds: int, world: int = 2
) -> dict[str, dict[str, list[float]]]:
    """Step times of one process (1 thread, then 2 threads) and of ``world`` gloo
    ranks (1 thread each), in alternating rounds so that background load hits all."""
    threads = torch.get_num_threads()
    one = "1 process, 1 thread"
    threaded = f"1 process, {world} threads"
    ranks = f"{world} ranks, 1 thread each"
    runs: dict[str, dict[str, list[float]]] = {
        label: {a: [] for a in archs} for label in (one, threaded, ranks)
    }
    try:
        for _ in range(rounds):
            for label, n_threads in ((one, 1), (threaded, world)):
                torch.set_num_threads(n_threads)
                for arch in archs:
                    runs[label][arch] += _time_training(arch, shape, n_steps)
            torch.set_num_threads(1)
            with tempfile.TemporaryDirectory() as tmp:
                out = os.path.join(tmp, "timing.json")
                spawn(_timing_worker, world, "cpu", (list(archs), shape, n_steps, out))
                with open(out) as f:
                    for arch, times in json.load(f).items():
                        runs[ranks][arch] += times
    finally:
        torch.set_num_threads(threads)
    return runs


def _format_traffic(rows: list[dict[str, Any]]) -> str:
    cases = list(traffic_cases())
    header = "| shape | W | gradients | stats | " + " | ".join(cases) + " |"
    lines = [header, "|" + "---|" * (4 + len(cases))]
    for row in rows:
        cells = [row["shape"], str(row["world"])]
        cells += [f"{row['gradients_mib']:.2f}", f"{row['stats_mib']:.3f}"]
        cells += [f"{row[f'{case}_mib']:.3f}" for case in cases]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m sae_lens_sampled.distributed.costs", description=__doc__
    )
    sub = parser.add_subparsers(dest="command", required=True)
    traffic = sub.add_parser("traffic", help="selection bytes per rank per step")
    traffic.add_argument("--shape", action="append", type=Shape.parse)
    traffic.add_argument("--world", type=int, action="append")
    traffic.add_argument("--oversample", type=float, default=2.0)
    traffic.add_argument(
        "--measure", action="append", type=Shape.parse, default=[],
        help="also count the bytes of 2 gloo ranks at this shape (repeatable)",
    )  # fmt: skip
    timing = sub.add_parser("timing", help="step time: 1 process vs 2 gloo ranks")
    timing.add_argument("--shape", type=Shape.parse, default=Shape(4096, 256, 8192, 32))
    timing.add_argument("--arch", action="append")
    timing.add_argument("--steps", type=int, default=5)
    timing.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)

    if args.command == "traffic":
        shapes = args.shape or list(TRAFFIC_SHAPES)
        worlds = args.world or [2, 8, 64]
        print(_format_traffic(traffic_table(shapes, worlds, args.oversample)))
        print("(MiB sent per rank per step)")
        if args.measure:
            print("\ncounted on 2 gloo ranks, MiB sent per rank (mean, max):")
            per_rank = measure_traffic(args.measure)
            for results in zip(*per_rank, strict=True):
                shape = Shape(*results[0]["shape"])
                arch = results[0]["arch"]
                sent = [r["traffic"]["selection"][1] / MIB for r in results]
                stats = [r["traffic"]["stats"][1] / MIB for r in results]
                print(
                    f"{shape!s:36s} {arch:16s} selection "
                    f"{statistics.mean(sent):8.3f} {max(sent):8.3f} (model "
                    f"{selection_bytes(arch, shape, 2) / MIB:8.3f})  stats "
                    f"{statistics.mean(stats):7.3f} (model "
                    f"{stats_bytes(shape, 2) / MIB:7.3f})"
                )
        return 0
    from sae_lens_sampled._registry import architecture_keys

    archs = args.arch or architecture_keys()
    runs = measure_timing(archs, args.shape, args.steps, args.rounds)
    print(f"{args.shape}, median seconds per step (and ratio to 1 process, 1 thread)")
    base = runs["1 process, 1 thread"]
    for label, per_arch in runs.items():
        cells = []
        for arch in archs:
            median = statistics.median(per_arch[arch])
            ratio = median / statistics.median(base[arch])
            cells.append(f"{arch} {median:.3f} s ({ratio:.2f})")
        print(f"{label:26s} " + "   ".join(cells))
    return 0


if __name__ == "__main__":
    sys.exit(main())
