"""Keeping the training SAEs' float64 and int64 buffers exact through SAELens.

SAELens's ``.to(dtype)`` and its loader cast every tensor to the SAE's dtype. The
float64 EMAs stay float64 through dtype casts, and float64/int64 buffers are saved as
their raw bytes (0..255 survive a cast to any float dtype, bfloat16 included), so
they are restored bit-exactly. Pure torch; no SAELens imports.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch


def buffer_to_bytes(tensor: torch.Tensor) -> torch.Tensor:
    """The raw bytes of ``tensor`` as a flat uint8 tensor."""
    return tensor.detach().contiguous().reshape(-1).view(torch.uint8).clone()


def buffer_from_bytes(saved: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Undo :func:`buffer_to_bytes` (after any float cast) into ``like``'s dtype/shape."""
    return saved.to(torch.uint8).view(like.dtype).reshape(like.shape)


def exact_buffers(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Buffers that SAELens's loader would cast to the cfg dtype (losing bits)."""
    return {
        name: buffer
        for name, buffer in module.named_buffers()
        if buffer.dtype in (torch.float64, torch.int64)
    }


def pack_exact_buffers(state_dict: dict[str, Any], module: torch.nn.Module) -> None:
    """Replace ``module``'s exact buffers in ``state_dict`` by their raw bytes."""
    for name in exact_buffers(module):
        if name in state_dict:
            state_dict[name] = buffer_to_bytes(state_dict[name])


def unpack_exact_buffers(state_dict: dict[str, Any], module: torch.nn.Module) -> None:
    """Undo :func:`pack_exact_buffers` where ``state_dict`` holds bytes."""
    for name, buffer in exact_buffers(module).items():
        saved = state_dict.get(name)
        if saved is not None and saved.shape != buffer.shape:
            state_dict[name] = buffer_from_bytes(saved, buffer)


@contextmanager
def float64_kept(module: torch.nn.Module) -> Iterator[None]:
    """``module``'s own float64 buffers stay float64 through a cast made inside,
    and follow its device moves."""
    before = {
        name: buffer
        for name, buffer in module._buffers.items()
        if buffer is not None and buffer.dtype == torch.float64
    }
    yield
    for name, original in before.items():
        moved = module._buffers[name]
        if moved is not None and moved.dtype != torch.float64:
            module._buffers[name] = original.to(moved.device)
