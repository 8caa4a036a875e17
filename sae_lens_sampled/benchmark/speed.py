"""Training-step speed and peak memory of each architecture next to SAELens's.

``sae-lens-sampled bench`` times ``training_forward_pass`` plus ``loss.backward()`` of
every registered architecture, SAELens's ``batchtopk`` and ``topk`` and the encoder
floor (the two dense matmuls no architecture can skip), interleaved, and reports
median ratios and peak memory; ``docs/performance.md`` ("Method") says how.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

# torch is imported by the functions that use it, after the arguments are read:
# ``bench --help`` and a bad argument answer at once.
if TYPE_CHECKING:
    import torch

from sae_lens_sampled.checks import check_choice, check_range
from sae_lens_sampled.shape import Shape, build_sae

BASELINE = "batchtopk"
SAELENS_ARCHITECTURES = ("batchtopk", "topk")
FLOOR = "encoder_floor"


DEFAULT_SHAPES = (Shape(4096, 256, 8192, 32), Shape(4096, 768, 16384, 64))


@dataclass
class ArchResult:
    """Timing of one architecture at one shape (seconds; ratios to the baseline)."""

    name: str
    median_s: float
    times_s: list[float]
    vs_batchtopk: float = float("nan")
    vs_encoder_floor: float = float("nan")
    peak_bytes: int | None = None
    mem_vs_batchtopk: float | None = None
    tokens_per_s: float | None = None


@dataclass
class ShapeResult:
    shape: Shape
    device: str
    dtype: str
    repeats: int
    results: dict[str, ArchResult] = field(default_factory=dict)


def available_architectures() -> list[str]:
    """SAELens's two plus every architecture of the plugin's registry that SAELens's
    holds."""
    from sae_lens.registry import SAE_TRAINING_CLASS_REGISTRY

    from sae_lens_sampled._registry import architecture_keys

    plugins = [a for a in architecture_keys() if a in SAE_TRAINING_CLASS_REGISTRY]
    return [*SAELENS_ARCHITECTURES, *plugins]


def make_step(sae: Any, x: torch.Tensor, bf16: bool) -> Any:
    """One training step as SAELens's trainer runs it (autocast around the forward)."""
    import torch
    from sae_lens.saes.sae import TrainStepInput

    dead = torch.zeros(sae.cfg.d_sae, dtype=torch.bool, device=x.device)
    coefficients = {
        name: float(getattr(value, "value", value))
        for name, value in sae.get_coefficients().items()
    }
    step_count = [0]

    def step() -> None:
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
            output = sae.training_forward_pass(
                TrainStepInput(
                    sae_in=x,
                    coefficients=coefficients,
                    dead_neuron_mask=dead,
                    n_training_steps=step_count[0],
                    is_logging_step=False,
                )
            )
        output.loss.backward()
        step_count[0] += 1
        for param in sae.parameters():
            param.grad = None

    return step


def make_floor_step(shape: Shape, x: torch.Tensor, bf16: bool) -> Any:
    """Encoder forward ``x @ W_enc + b_enc`` and its weight (and bias) gradient."""
    import torch

    generator = torch.Generator().manual_seed(1)
    w_enc = (torch.randn(shape.d_in, shape.d_sae, generator=generator) * 0.05).to(
        x.device
    )
    w_enc.requires_grad_(True)
    b_enc = torch.zeros(shape.d_sae, device=x.device, requires_grad=True)
    grad = torch.randn(shape.batch, shape.d_sae, generator=generator).to(x.device)

    def step() -> None:
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
            pre = torch.addmm(b_enc, x, w_enc)
        pre.backward(grad.to(pre.dtype))
        w_enc.grad = b_enc.grad = None

    return step


def time_steps(
    steps: dict[str, Any], repeats: int, device: str, warmup: int = 1
) -> dict[str, list[float]]:
    """Interleaved timings: each round runs every step once, in a rotating order."""
    import torch

    cuda = device.startswith("cuda")
    names = list(steps)
    for _ in range(warmup):
        for name in names:
            steps[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(repeats):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            steps[name]()
            if cuda:
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - start)
    return times


def _proc_status_bytes(key: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise OSError(f"{key} not in /proc/self/status")


def _reset_peak_rss() -> bool:
    """Reset the process's peak resident size (Linux >= 4.0); False if not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False


def measure_peak_bytes(name: str, shape: Shape, device: str, bf16: bool) -> int | None:
    """Extra memory of the second training step: on CUDA the peak allocated minus
    the allocated before it; on CPU the rise of the peak resident size (``VmHWM``,
    reset just before) over ``VmRSS``, or None without ``/proc/self/clear_refs``."""
    import torch

    x = torch.randn(shape.batch, shape.d_in, device=device)
    if name == FLOOR:
        step = make_floor_step(shape, x, bf16)
    else:
        step = make_step(build_sae(name, shape, device), x, bf16)
    step()
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    if not _reset_peak_rss():
        return None
    before = _proc_status_bytes("VmRSS")
    step()
    return max(0, _proc_status_bytes("VmHWM") - before)


def run_benchmark(
    shapes: Sequence[Shape] = DEFAULT_SHAPES,
    repeats: int = 5,
    device: str = "cpu",
    dtype: str = "fp32",
    architectures: Sequence[str] | None = None,
    memory: bool = True,
) -> list[ShapeResult]:
    """Time every architecture at every shape, interleaved (:func:`time_steps`)."""
    import torch

    check_choice("dtype", dtype, ("fp32", "bf16"))
    check_range("repeats", repeats, low=1)
    names = list(architectures or available_architectures())
    if BASELINE not in names:
        names.insert(0, BASELINE)
    bf16 = dtype == "bf16"
    results = []
    for shape in shapes:
        x = torch.randn(
            shape.batch, shape.d_in, generator=torch.Generator().manual_seed(2)
        )
        x = x.to(device)
        steps = {
            name: make_step(build_sae(name, shape, device), x, bf16) for name in names
        }
        steps[FLOOR] = make_floor_step(shape, x, bf16)
        times = time_steps(steps, repeats, device)
        del steps
        shape_result = ShapeResult(shape, device, dtype, repeats)
        medians = {name: statistics.median(ts) for name, ts in times.items()}
        for name, ts in times.items():
            result = ArchResult(name, medians[name], ts)
            result.vs_batchtopk = medians[name] / medians[BASELINE]
            result.vs_encoder_floor = medians[name] / medians[FLOOR]
            if device.startswith("cuda"):
                result.tokens_per_s = shape.batch / medians[name]
            shape_result.results[name] = result
        if memory:
            for name, result in shape_result.results.items():
                result.peak_bytes = measure_peak_bytes(name, shape, device, bf16)
            base = shape_result.results[BASELINE].peak_bytes
            for result in shape_result.results.values():
                if base and result.peak_bytes is not None:
                    result.mem_vs_batchtopk = result.peak_bytes / base
        results.append(shape_result)
    return results


def format_results(results: Sequence[ShapeResult]) -> str:
    """Markdown tables of the ratios (and tokens/s on a GPU)."""
    lines = []
    for shape_result in results:
        on_gpu = shape_result.device.startswith("cuda")
        lines.append(
            f"\n{shape_result.shape}, {shape_result.dtype}, {shape_result.device}, "
            f"median of {shape_result.repeats} interleaved steps"
        )
        header = "| step | vs batchtopk | vs encoder floor | peak mem vs batchtopk |"
        rule = "|---|---|---|---|"
        if on_gpu:
            header += " tokens/s |"
            rule += "---|"
        lines += [header, rule]
        for name, r in shape_result.results.items():
            mem = "-" if r.mem_vs_batchtopk is None else f"{r.mem_vs_batchtopk:.2f}"
            row = (
                f"| {name} | {r.vs_batchtopk:.2f} | {r.vs_encoder_floor:.2f} | {mem} |"
            )
            if on_gpu:
                row += f" {r.tokens_per_s:,.0f} |"
            lines.append(row)
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="sae-lens-sampled bench",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
    )
    parser.add_argument(
        "--shape",
        action="append",
        type=Shape.parse,
        help="B,d_in,d_sae,k (repeatable); default: "
        + " and ".join(f"{s.batch},{s.d_in},{s.d_sae},{s.k}" for s in DEFAULT_SHAPES),
    )
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds (median)")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--device", help="torch device (default: cuda if available)")
    parser.add_argument(
        "--arch", action="append", help="architectures (repeatable); default: all"
    )
    parser.add_argument("--threads", type=int, help="torch.set_num_threads on CPU")
    parser.add_argument("--no-memory", action="store_true", help="skip peak memory")
    parser.add_argument("--json", help="also write the full results to this file")
    args = parser.parse_args(argv)
    import torch

    from sae_lens_sampled.benchmark.compare import check_device

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    check_device(device)
    if args.threads:
        torch.set_num_threads(args.threads)
    results = run_benchmark(
        shapes=args.shape or DEFAULT_SHAPES,
        repeats=args.repeats,
        device=device,
        dtype=args.dtype,
        architectures=args.arch,
        memory=not args.no_memory,
    )
    print(format_results(results))
    if args.json:
        with open(args.json, "w") as out:
            json.dump([asdict(r) for r in results], out, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
