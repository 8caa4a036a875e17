"""Local process groups: W processes on this machine, one rank each, for the
traffic and timing tools, the data-parallel tests and the self-test."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.multiprocessing.spawn import ProcessRaisedException, start_processes


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def init_process_group(
    rank: int, world_size: int, port: int, device: str, timeout_s: float = 60.0
) -> None:
    """Join a loopback group: gloo for CPU, NCCL for CUDA (one GPU per rank)."""
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    backend = "gloo"
    if torch.device(device).type == "cuda":
        torch.cuda.set_device(rank % torch.cuda.device_count())
        backend = "nccl"
    dist.init_process_group(
        backend,
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=timeout_s),
    )


def _entry(
    rank: int,
    fn: Callable[..., None],
    world_size: int,
    port: int,
    device: str,
    args: tuple[Any, ...],
) -> None:
    torch.set_num_threads(1)
    init_process_group(rank, world_size, port, device)
    try:
        fn(rank, world_size, device, *args)
    finally:
        dist.destroy_process_group()


def spawn(
    fn: Callable[..., None],
    world_size: int,
    device: str = "cpu",
    args: tuple[Any, ...] = (),
    attempts: int = 3,
    start_method: str | None = None,
) -> None:
    """Run ``fn(rank, world_size, device, *args)`` in ``world_size`` new processes,
    each in a fresh loopback process group (60 s timeout) with 1 CPU thread; a start
    that fails because another program took the port is retried.

    ``start_method``: ``"spawn"`` or ``"fork"`` (much faster to start). The default
    forks only where that is safe: a CPU run with a CPU-only torch (a CUDA build's
    autograd keeps device threads that a forked child cannot use).
    """
    if start_method is None:
        safe = torch.device(device).type == "cpu" and not torch.cuda.is_available()
        fork = safe and "fork" in mp.get_all_start_methods()
        start_method = "fork" if fork else "spawn"
    for attempt in range(attempts):
        try:
            start_processes(
                _entry,
                args=(fn, world_size, free_port(), device, args),
                nprocs=world_size,
                join=True,
                start_method=start_method,
            )
            return
        except ProcessRaisedException as error:
            in_use = "address already in use" in str(error).lower()
            if not in_use or attempt == attempts - 1:
                raise
            time.sleep(0.5)
