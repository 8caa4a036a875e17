"""A thin wrapper over ``torch.distributed`` collectives that counts what it sends.

:class:`Comm` works without a process group (world size 1: every call returns its
input) and records, per category (``"selection"``, ``"gradients"``, ...), the calls
and the bytes each rank sent under the usual ring algorithms. Nothing here imports
SAELens.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from sae_lens_sampled.checks import check_choice


@dataclass
class TrafficCounter:
    """Calls and bytes sent per rank, by category, since the last :meth:`reset`."""

    calls: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    bytes_sent: dict[str, float] = field(default_factory=lambda: defaultdict(float))

    def add(self, category: str, n_bytes: float) -> None:
        self.calls[category] += 1
        self.bytes_sent[category] += n_bytes

    def reset(self) -> None:
        self.calls.clear()
        self.bytes_sent.clear()

    def snapshot(self) -> dict[str, tuple[int, float]]:
        return {name: (self.calls[name], self.bytes_sent[name]) for name in self.calls}


class Comm:
    """Collectives over ``group`` (``None``: the default group if one is initialised,
    else a single process), counted in ``counter``. A one-rank group skips the
    collectives unless ``always`` (to exercise a backend on a single device)."""

    def __init__(
        self,
        group: dist.ProcessGroup | None = None,
        counter: TrafficCounter | None = None,
        always: bool = False,
    ) -> None:
        self.active = dist.is_available() and dist.is_initialized()
        self.group = group
        self.rank = dist.get_rank(group) if self.active else 0
        self.world_size = dist.get_world_size(group) if self.active else 1
        if self.world_size == 1 and not always:
            self.active = False
        self.counter = TrafficCounter() if counter is None else counter

    def all_reduce(
        self, tensor: torch.Tensor, op: str = "sum", category: str = "stats"
    ) -> torch.Tensor:
        """Reduce ``tensor`` (``op``: sum, min or max) in place over all ranks."""
        if not self.active:
            return tensor
        check_choice("op", op, ("sum", "min", "max"))
        w = self.world_size
        self.counter.add(category, 2 * (w - 1) / w * tensor.numel() * tensor.itemsize)
        dist.all_reduce(tensor, op=getattr(dist.ReduceOp, op.upper()), group=self.group)
        return tensor

    def all_gather(self, tensor: torch.Tensor, category: str) -> torch.Tensor:
        """``[world_size, *tensor.shape]``: every rank's ``tensor`` (of one shape and
        dtype on all ranks), in rank order."""
        tensor = tensor.contiguous()
        if not self.active:
            return tensor.unsqueeze(0)
        out = tensor.new_empty((self.world_size, *tensor.shape))
        self.counter.add(
            category, (self.world_size - 1) * tensor.numel() * tensor.itemsize
        )
        gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        gather(out.view(-1), tensor.view(-1), group=self.group)
        return out

    def all_to_all(
        self,
        tensor: torch.Tensor,
        send_counts: Sequence[int],
        receive_counts: Sequence[int],
        category: str,
    ) -> torch.Tensor:
        """Send ``send_counts[q]`` consecutive entries of ``tensor`` (1-D) to rank q;
        return what every rank sent here, concatenated in rank order."""
        out = tensor.new_empty(sum(receive_counts))
        if not self.active:
            return out.copy_(tensor)
        kept = send_counts[self.rank]
        self.counter.add(category, (tensor.numel() - kept) * tensor.itemsize)
        dist.all_to_all_single(
            out,
            tensor.contiguous(),
            output_split_sizes=list(receive_counts),
            input_split_sizes=list(send_counts),
            group=self.group,
        )
        return out

    def broadcast(
        self, tensor: torch.Tensor, src: int = 0, category: str = "selection"
    ) -> torch.Tensor:
        """Overwrite ``tensor`` on every rank with rank ``src``'s; return it."""
        if not self.active:
            return tensor
        self.counter.add(category, tensor.numel() * tensor.itemsize)
        dist.broadcast(tensor, src=self._global_rank(src), group=self.group)
        return tensor

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        """Rank ``src``'s picklable ``obj`` on every rank (setup only; not counted)."""
        if not self.active:
            return obj
        holder = [obj]
        dist.broadcast_object_list(holder, src=self._global_rank(src), group=self.group)
        return holder[0]

    def all_gather_object(self, obj: Any) -> list[Any]:
        """Every rank's picklable ``obj``, in rank order (setup only; not counted)."""
        if not self.active:
            return [obj]
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, obj, group=self.group)
        return gathered

    def barrier(self) -> None:
        if self.active:
            dist.barrier(group=self.group)

    def _global_rank(self, group_rank: int) -> int:
        if self.group is None:
            return group_rank
        return dist.get_global_rank(self.group, group_rank)
