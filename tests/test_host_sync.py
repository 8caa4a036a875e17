"""No host sync in a default training forward + backward of any architecture.

A GPU step that never waits for the host can be queued ahead and captured as one
graph. On a CPU the audit counts the ATen ops that would sync on a GPU (a value read,
or an op whose output size depends on the data) and the tensor methods that copy
values to the host without an ATen op (``tolist``, ``numpy``); on CUDA the same step
runs under ``torch.cuda.set_sync_debug_mode("error")``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping
from typing import Any

import pytest
import torch
from torch.overrides import TorchFunctionMode

from benchmarks.op_audit import AuditShape, audit_sae, count_ops, training_step

# Tensor methods that read values on the host without dispatching an ATen op.
_HOST_READS = frozenset({"tolist", "numpy"})

ARCHITECTURES: list[tuple[str, dict[str, Any]]] = [
    ("mutual_choice", {}),
    ("sampled", {}),
    ("sampled", {"pool_seed": 0}),
    ("feature_choice", {}),
]
IDS = ["mutual_choice", "sampled", "sampled-seeded", "feature_choice"]


class _HostReads(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.reads: Counter[str] = Counter()

    def __torch_function__(
        self,
        func: Any,
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: Mapping[str, Any] | None = None,
    ) -> Any:
        name = getattr(func, "__name__", "")
        if name in _HOST_READS:
            self.reads[name] += 1
        return func(*args, **(kwargs or {}))


def _syncs(step: Callable[[], object]) -> Counter[str]:
    reads = _HostReads()
    with reads:
        counts = count_ops(step)
    return counts.sync_sites + reads.reads


def _warm_step(architecture: str, fields: dict[str, Any], device: str) -> Any:
    shape = AuditShape()
    sae = audit_sae(architecture, shape, **fields).to(device)
    step = training_step(sae, shape)
    step()  # lazy state is built on the first step
    sae.zero_grad()
    return step


@pytest.mark.parametrize(("architecture", "fields"), ARCHITECTURES, ids=IDS)
def test_training_step_has_no_sync_op(architecture: str, fields: dict[str, Any]):
    step = _warm_step(architecture, fields, "cpu")
    assert _syncs(step) == Counter()


def test_audit_sees_a_sync():
    # The counter itself: a value read and a data-dependent shape are both caught.
    def run() -> None:
        x = torch.arange(4.0)
        int(x.sum())
        x[x > 1].tolist()

    names = {site.split(" at ")[0] for site in _syncs(run)}
    assert names == {"_local_scalar_dense", "index", "tolist"}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize(("architecture", "fields"), ARCHITECTURES, ids=IDS)
def test_training_step_never_syncs_on_cuda(architecture: str, fields: dict[str, Any]):
    step = _warm_step(architecture, fields, "cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
