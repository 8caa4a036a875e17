"""Count the ATen ops of one training forward + backward, and the ones that sync.

A GPU step is fast when it launches few kernels and never waits for the host. This
counts, on any device (a CPU is enough), every ATen op that one
``training_forward_pass`` plus ``loss.backward()`` dispatches, and separately the ops
that force a host sync on a GPU: reading a value (``_local_scalar_dense``, behind
``int(t)``, ``float(t)`` and ``if t:``), ops whose output size depends on the data
(``nonzero``, boolean-mask indexing, ``masked_select``, ``unique``, ``bincount``,
``repeat_interleave`` without ``output_size``) and ``equal``; and the host reads that
dispatch no op (``tolist``, ``numpy``).

``python -m benchmarks.op_audit`` prints the table for SAELens's ``batchtopk`` and the
plugin's architectures at the default audit shape.
"""

from __future__ import annotations

import argparse
import traceback
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from sae_lens.saes.sae import TrainStepInput, TrainStepOutput
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

# Ops whose output needs a value from the device before the host can go on.
_SYNC_OPS = frozenset(
    {
        "aten._local_scalar_dense",
        "aten.nonzero",
        "aten.masked_select",
        "aten._unique2",
        "aten.unique_dim",
        "aten.unique_consecutive",
        "aten.bincount",
        "aten.equal",
        "aten.is_nonzero",
    }
)
# Tensor methods that read values on the host without dispatching an ATen op.
_HOST_READS = frozenset({"tolist", "numpy"})
# Indexing with a boolean mask is a nonzero in disguise.
_MASK_INDEX_OPS = frozenset({"aten.index", "aten.index_put", "aten.index_put_"})


def _op_name(func: Any) -> str:
    return f"aten.{func._schema.name.split('::')[-1]}"


def _is_sync(name: str, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> bool:
    if name in _SYNC_OPS:
        return True
    if name in _MASK_INDEX_OPS and len(args) > 1:
        indices = args[1]
        return any(
            isinstance(index, torch.Tensor) and index.dtype == torch.bool
            for index in indices
        )
    if name == "aten.repeat_interleave":
        return kwargs.get("output_size") is None and (len(args) < 4 or args[3] is None)
    return False


def _caller() -> str:
    for frame in reversed(traceback.extract_stack()):
        if "sae_lens" in frame.filename and "op_audit" not in frame.filename:
            short = frame.filename.split("site-packages/")[-1].split("/work/")[-1]
            return f"{short}:{frame.lineno} {frame.name}"
    return "?"


@dataclass
class OpCounts:
    """Ops dispatched while counting: all of them, and those that sync by name."""

    total: int = 0
    by_name: Counter[str] = field(default_factory=Counter)
    syncs: Counter[str] = field(default_factory=Counter)
    # Per sync op, the innermost SAELens or plugin frame that called it.
    sync_sites: Counter[str] = field(default_factory=Counter)

    @property
    def n_syncs(self) -> int:
        return sum(self.syncs.values())


class OpCounter(TorchDispatchMode):
    """A dispatch mode that counts every ATen op, and the syncing ones apart."""

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]  # torch: unannotated
        self.counts = OpCounts()

    def __torch_dispatch__(
        self,
        func: Any,
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: Mapping[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        name = _op_name(func)
        self.counts.total += 1
        self.counts.by_name[name] += 1
        if _is_sync(name, args, kwargs):
            self.counts.syncs[name] += 1
            self.counts.sync_sites[f"{name.removeprefix('aten.')} at {_caller()}"] += 1
        return func(*args, **kwargs)


class _HostReads(TorchFunctionMode):
    """Counts ``tolist`` and ``numpy`` calls into ``counts`` as syncs."""

    def __init__(self, counts: OpCounts) -> None:
        super().__init__()
        self.counts = counts

    def __torch_function__(
        self,
        func: Any,
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: Mapping[str, Any] | None = None,
    ) -> Any:
        name = getattr(func, "__name__", "")
        if name in _HOST_READS:
            self.counts.syncs[name] += 1
            self.counts.sync_sites[f"{name} at {_caller()}"] += 1
        return func(*args, **(kwargs or {}))


def count_ops(run: Callable[[], object]) -> OpCounts:
    """The ops that ``run()`` dispatches; the syncs include host reads that dispatch
    no op (``tolist``, ``numpy``)."""
    counter = OpCounter()
    with _HostReads(counter.counts), counter:
        run()
    return counter.counts


@dataclass(frozen=True)
class AuditShape:
    """The audited step: ``n_tokens`` rows of width ``d_in``, ``d_sae`` features, mean
    ``k`` per token, and ``n_dead`` features in the trainer's dead mask (so the aux
    loss has work to do)."""

    d_in: int = 64
    d_sae: int = 512
    k: int = 8
    n_tokens: int = 256
    n_dead: int = 40


def training_step(
    sae: Any, shape: AuditShape, seed: int = 0
) -> Callable[[], TrainStepOutput]:
    """One training forward + backward of ``sae`` on a fixed batch, as a callable."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(shape.n_tokens, shape.d_in, generator=generator)
    x = x.to(sae.W_dec.device, sae.W_dec.dtype)
    dead = torch.zeros(shape.d_sae, dtype=torch.bool, device=x.device)
    dead[: shape.n_dead] = True

    def run() -> TrainStepOutput:
        output: TrainStepOutput = sae.training_forward_pass(
            TrainStepInput(
                sae_in=x,
                coefficients={"aux_loss_coefficient": 1.0},
                dead_neuron_mask=dead,
                n_training_steps=0,
                is_logging_step=False,
            )
        )
        output.loss.backward()
        return output

    return run


def audit_sae(architecture: str, shape: AuditShape, **fields: Any) -> Any:
    """A training SAE of ``architecture`` at ``shape`` (plugin defaults, plus
    ``fields``), seeded the same way every time."""
    from sae_lens.registry import get_sae_training_class

    import sae_lens_sampled  # noqa: F401  (registers the plugin's architectures)

    sae_class, cfg_class = get_sae_training_class(architecture)
    torch.manual_seed(0)
    # Every audited config has a k.
    cfg = cfg_class(d_in=shape.d_in, d_sae=shape.d_sae, k=shape.k, **fields)  # type: ignore[call-arg]
    return sae_class(cfg)


def audit(
    architecture: str, shape: AuditShape, fixed_shapes: bool = False, **fields: Any
) -> OpCounts:
    """Ops of one training forward + backward of ``architecture`` (after one untimed
    step, so lazy state is built). ``fixed_shapes``: the read-free paths a GPU and
    ``torch.compile`` take, forced on this device."""
    from contextlib import nullcontext

    from sae_lens_sampled.selection import fixed_shape_selection

    sae = audit_sae(architecture, shape, **fields)
    step = training_step(sae, shape)
    with fixed_shape_selection() if fixed_shapes else nullcontext():
        step()
        sae.zero_grad()
        return count_ops(step)


def _architectures() -> list[tuple[str, dict[str, Any]]]:
    from sae_lens_sampled._registry import architecture_keys

    runs: list[tuple[str, dict[str, Any]]] = [("batchtopk", {})]
    for key in architecture_keys():
        runs.append((key, {"pool_seed": 0} if key == "sampled" else {}))
    return runs


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--verbose", action="store_true", help="list the sync ops")
    parser.add_argument(
        "--where", action="store_true", help="print where each sync op is called"
    )
    parser.add_argument(
        "--fixed-shapes",
        action="store_true",
        help="audit the read-free paths that a GPU and torch.compile take",
    )
    args = parser.parse_args(argv)
    shape = AuditShape()
    rows = [
        (key, audit(key, shape, args.fixed_shapes, **fields))
        for key, fields in _architectures()
    ]
    base = rows[0][1].total
    print("| | ops | ops vs BatchTopK | sync ops |")
    print("|---|---|---|---|")
    for key, counts in rows:
        syncs = ", ".join(
            f"{n} {name.removeprefix('aten.')}" for name, n in counts.syncs.items()
        )
        detail = f" ({syncs})" if args.verbose and syncs else ""
        ratio = counts.total / base
        print(f"| `{key}` | {counts.total} | {ratio:.2f} | {counts.n_syncs}{detail} |")
    if args.where:
        for key, counts in rows:
            for site, n in counts.sync_sites.items():
                print(f"{key}: {n} x {site}")


if __name__ == "__main__":
    main()
