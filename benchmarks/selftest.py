"""Check data-parallel training on this machine and time one training step.

    python -m benchmarks.selftest --device cuda
    python -m benchmarks.selftest --device cuda --world 4
    python -m benchmarks.selftest --device cpu --world 2

Run from the root of a checkout of the repository: the self-test trains the cases of
``tests/parity.py`` and is not part of the installed package.

With one rank (the default on a single GPU) it joins a one-rank process group (NCCL
on CUDA, gloo on CPU) and runs every collective anyway, so the backend and the device
handling are exercised. With ``--world N`` it starts N processes, one GPU each. Then:

1. parity: every architecture setting trains for a dozen steps data-parallel and in
   one process with SAELens's ``SAETrainer`` on the whole batches; prints the largest
   weight difference and whether counters agree;
2. primitives: the global top-k and feature-choice masks on awkward inputs against a
   stable single-process reference;
3. speed: median time of one training step per architecture at ``--shape`` and
   tokens/s (global batch over step time), next to SAELens's trainer in one process.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

from sae_lens_sampled.distributed import launch
from sae_lens_sampled.distributed.comm import Comm
from sae_lens_sampled.shape import Shape
from tests import parity

N_STEPS, BATCH = 14, 64
SPEED_ARCHS = ("mutual_choice", "sampled", "feature_choice")


def _sync(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def step_times(
    arch: str, shape: Shape, device: str, comm: Comm | None, n_steps: int
) -> list[float]:
    """Seconds per training step: the data-parallel trainer over ``comm`` or, with
    ``comm=None``, SAELens's ``SAETrainer`` in this process."""
    import time

    from sae_lens.config import SAETrainerConfig
    from sae_lens.training.sae_trainer import SAETrainer

    from sae_lens_sampled.distributed.trainer import DistributedSAETrainer
    from sae_lens_sampled.shape import build_sae

    world = 1 if comm is None else comm.world_size
    rank = 0 if comm is None else comm.rank
    rows = shape.batch // world
    sae = build_sae(arch, shape, device)
    cfg = SAETrainerConfig(
        total_training_samples=shape.batch * (n_steps + 3),
        train_batch_size_samples=shape.batch,
        lr=1e-4,
        lr_end=1e-4,
        device=device,
    )
    if comm is None:
        trainer: Any = SAETrainer(cfg=cfg, sae=sae, data_provider=iter([]))
    else:
        trainer = DistributedSAETrainer(cfg, sae, iter([]), comm=comm)
    generator = torch.Generator().manual_seed(rank)
    batches = [torch.randn(rows, shape.d_in, generator=generator) for _ in range(2)]
    batches = [batch.to(device) for batch in batches]
    times = []
    for index in range(n_steps + 3):
        if comm is not None:
            comm.barrier()
        _sync(device)
        start = time.perf_counter()
        trainer.step(batches[index % 2])
        _sync(device)
        if comm is not None:
            comm.barrier()
        times.append(time.perf_counter() - start)
    del trainer, sae
    return times[3:]


def _checks(comm: Comm, device: str, shape: Shape, n_steps: int) -> dict[str, Any]:
    """Parity training, primitives and timing on this rank."""
    batches = parity.make_batches(N_STEPS + 2, BATCH, parity.D_IN)
    states = {}
    for name, case in parity.parity_cases().items():
        feed = batches if case.normalize else batches[:N_STEPS]
        sae, trainer, _ = parity.train_case(
            case, feed, device, distributed=True, comm=comm
        )
        states[name] = parity.state_of(sae, trainer)
    primitives = parity.run_primitives(comm.rank, comm.world_size, device, comm)
    speed = {
        arch: step_times(arch, shape, device, comm, n_steps) for arch in SPEED_ARCHS
    }
    return {"states": states, "primitives": primitives, "speed": speed}


def _worker(
    rank: int, _world: int, device: str, shape: Shape, n_steps: int, out: str
) -> None:
    torch.save(_checks(Comm(), device, shape, n_steps), f"{out}.rank{rank}")


def run(device: str, world: int, shape: Shape, n_steps: int) -> dict[str, Any]:
    if world == 1:
        launch.init_process_group(0, 1, launch.free_port(), device)
        try:
            results = _checks(Comm(always=True), device, shape, n_steps)
        finally:
            dist.destroy_process_group()
    else:
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "selftest.pt")
            launch.spawn(
                _worker, world, device, (shape, n_steps, out), start_method="spawn"
            )
            per_rank = [
                torch.load(f"{out}.rank{rank}", weights_only=False)
                for rank in range(world)
            ]
            results = per_rank[0]
            # every rank's part of the masks, in rank (= token) order
            results["primitives"] = {
                name: (torch.cat([r["primitives"][name][0] for r in per_rank]), 0)
                for name in per_rank[0]["primitives"]
            }
    reference = parity.reference_states(N_STEPS, BATCH, device)
    report: dict[str, Any] = {"device": device, "world": world, "parity": {}}
    for name, ref in reference.items():
        diffs = parity.max_differences(results["states"][name], ref["state"])
        weights = max(diffs[p] for p in ("W_enc", "W_dec", "b_enc", "b_dec"))
        counters = all(
            diffs[n] == 0
            for n, v in ref["state"].items()
            if n.startswith("trainer.") or not v.is_floating_point()
        )
        report["parity"][name] = {
            "max_weight_diff": weights,
            "max_threshold_diff": diffs["running_threshold"],
            "counters_equal": counters,
        }
    expected = parity.reference_primitives(world)
    report["primitives_exact"] = all(
        torch.equal(results["primitives"][n][0], expected[n]) for n in expected
    )
    one_process = {a: step_times(a, shape, device, None, n_steps) for a in SPEED_ARCHS}
    report["speed"] = {
        arch: {
            "shape": str(shape),
            "data_parallel_s": statistics.median(results["speed"][arch]),
            "one_process_s": statistics.median(one_process[arch]),
        }
        for arch in SPEED_ARCHS
    }
    for row in report["speed"].values():
        row["tokens_per_s"] = shape.batch / row["data_parallel_s"]
        row["one_process_tokens_per_s"] = shape.batch / row["one_process_s"]
    return report


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.selftest", description=__doc__
    )
    parser.add_argument(
        "--device", default="cuda" if torch.cuda.is_available() else "cpu"
    )
    parser.add_argument("--world", type=int, default=1)
    parser.add_argument(
        "--shape", type=Shape.parse, default=Shape(4096, 768, 16384, 64)
    )
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--json", help="also write the report to this file")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if (
        torch.device(args.device).type == "cuda"
        and args.world > torch.cuda.device_count()
    ):
        parser.error(f"--world {args.world} needs that many GPUs")
    report = run(args.device, args.world, args.shape, args.steps)
    print(f"device {report['device']}, {report['world']} rank(s)")
    for name, row in report["parity"].items():
        print(
            f"  parity {name:24s} max weight diff {row['max_weight_diff']:.2e}  "
            f"threshold diff {row['max_threshold_diff']:.2e}  "
            f"counters equal {row['counters_equal']}"
        )
    print(f"  primitives exact: {report['primitives_exact']}")
    for arch, row in report["speed"].items():
        print(
            f"  step {arch:15s} {row['shape']}: {row['data_parallel_s'] * 1e3:8.2f} ms "
            f"({row['tokens_per_s']:,.0f} tokens/s); SAELens trainer, 1 process: "
            f"{row['one_process_s'] * 1e3:8.2f} ms "
            f"({row['one_process_tokens_per_s']:,.0f} tokens/s)"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
