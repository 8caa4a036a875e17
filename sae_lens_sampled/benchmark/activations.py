"""Activations data source of ``compare``: a user's cached activations, offline.

The file is checked before anything trains (shape, dtype, NaN/Inf rows, enough rows),
split once into a held-out eval split and training rows, and streamed: training
batches come from a seeded shuffle (contiguous blocks in a random order, then rows
within a buffer), fed to SAELens's ``SAETrainer``; evaluation reads the eval split
batch by batch. Nothing holds the whole file in memory.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch
from sae_lens.config import SAETrainerConfig
from sae_lens.registry import get_sae_training_class
from sae_lens.saes.sae import TrainingSAEConfig
from sae_lens.training.sae_trainer import SAETrainer

from sae_lens_sampled.benchmark.activation_files import (
    ActivationFile,
    nonfinite_rows,
    open_activations,
)
from sae_lens_sampled.benchmark.config import DEFAULT_EVAL_SAMPLES, CompareConfig
from sae_lens_sampled.benchmark.metrics import evaluate_on_activations
from sae_lens_sampled.benchmark.probe_command import from_config
from sae_lens_sampled.benchmark.source import DataSource, training_schedule

# The eval split is this many evenly spaced contiguous segments, so that a file in
# document or source order is not evaluated on its tail alone.
EVAL_SEGMENTS = 16

# Training rows are read in contiguous blocks of this many rows, in a random order.
BLOCK_ROWS = 256

# Rows are shuffled within a buffer of about this many bytes (float32).
SHUFFLE_BUFFER_BYTES = 256 * 2**20

Ranges = list[tuple[int, int]]


def split_rows(n_rows: int, eval_rows: int) -> tuple[Ranges, Ranges]:
    """The eval split and the training rows, as ``[start, stop)`` ranges.

    The file is laid out as training gap, eval segment, training gap, eval segment,
    ...: ``EVAL_SEGMENTS`` segments (fewer when ``eval_rows`` is smaller) whose
    lengths sum to ``eval_rows``, the last one ending at the last row.
    """
    if not 0 < eval_rows < n_rows:
        raise ValueError(f"eval_rows must be in [1, {n_rows - 1}], got {eval_rows}")
    segments = min(EVAL_SEGMENTS, eval_rows)
    train_rows = n_rows - eval_rows
    eval_ranges: Ranges = []
    train_ranges: Ranges = []
    position = 0
    for i in range(segments):
        gap = train_rows // segments + (i < train_rows % segments)
        length = eval_rows // segments + (i < eval_rows % segments)
        if gap:
            train_ranges.append((position, position + gap))
        eval_ranges.append((position + gap, position + gap + length))
        position += gap + length
    return eval_ranges, train_ranges


def read_batches(
    file: ActivationFile, ranges: Ranges, batch_size: int
) -> Iterator[torch.Tensor]:
    """The rows of ``ranges`` in order, ``batch_size`` at a time (the last batch
    holds the remainder)."""
    parts: list[torch.Tensor] = []
    held = 0
    for start, stop in ranges:
        while start < stop:
            take = min(stop - start, batch_size - held)
            parts.append(file.read(start, start + take))
            held += take
            start += take
            if held == batch_size:
                yield torch.cat(parts)
                parts, held = [], 0
    if held:
        yield torch.cat(parts)


class ShuffledBatches:
    """Endless training batches from ``ranges`` of ``file``, shuffled by ``seed``.

    Each epoch visits every block of ``BLOCK_ROWS`` contiguous rows once, in a
    random order; the rows of about ``buffer_rows`` consecutive blocks are shuffled
    together. A SAELens ``DataProvider``.
    """

    def __init__(
        self,
        file: ActivationFile,
        ranges: Ranges,
        batch_size: int,
        seed: int,
        buffer_rows: int,
    ):
        self.file = file
        self.batch_size = batch_size
        self.buffer_rows = buffer_rows
        self.blocks = [
            (start, min(start + BLOCK_ROWS, stop))
            for range_start, stop in ranges
            for start in range(range_start, stop, BLOCK_ROWS)
        ]
        self.generator = torch.Generator().manual_seed(seed)
        self._order: list[int] = []
        self._pending = torch.empty(0, file.d_in)

    def __iter__(self) -> ShuffledBatches:
        return self

    def __next__(self) -> torch.Tensor:
        while self._pending.shape[0] < self.batch_size:
            self._refill()
        batch = self._pending[: self.batch_size]
        self._pending = self._pending[self.batch_size :]
        return batch

    def _refill(self) -> None:
        parts: list[torch.Tensor] = []
        rows = 0
        while rows < self.buffer_rows:
            if not self._order:  # a new epoch
                self._order = torch.randperm(
                    len(self.blocks), generator=self.generator
                ).tolist()
            start, stop = self.blocks[self._order.pop()]
            parts.append(self.file.read(start, stop))
            rows += stop - start
        fresh = torch.cat(parts)
        fresh = fresh[torch.randperm(fresh.shape[0], generator=self.generator)]
        self._pending = torch.cat([self._pending, fresh])


class ActivationsSource(DataSource):
    """Activations from a SAELens activation cache or a tensor file."""

    mode = "activations"

    def __init__(self, cfg: CompareConfig):
        assert cfg.activations is not None
        self.cfg = cfg
        self.file = open_activations(cfg.activations, cfg.hook)
        self.d_in = self.file.d_in
        n_rows = self.file.n_rows
        self.eval_samples = cfg.eval_samples or max(
            1, min(DEFAULT_EVAL_SAMPLES, n_rows // 10)
        )
        if n_rows < cfg.batch_size + self.eval_samples:
            raise ValueError(
                f"activations: {self.file.path}: {n_rows:,} rows; one training batch "
                f"plus the eval split need batch_size + eval_samples = "
                f"{cfg.batch_size:,} + {self.eval_samples:,} = "
                f"{cfg.batch_size + self.eval_samples:,}; lower --batch-size or "
                "--eval-samples"
            )
        self.probing = from_config(self.file, cfg)  # label files checked here
        bad, first = nonfinite_rows(self.file)
        if bad:
            shown = ", ".join(str(row) for row in first)
            more = ", ..." if bad > len(first) else ""
            raise ValueError(
                f"activations: {self.file.path}: {bad:,} of {n_rows:,} rows hold NaN "
                f"or Inf values (rows {shown}{more}); drop or repair them"
            )
        self.eval_ranges, self.train_ranges = split_rows(n_rows, self.eval_samples)
        self.train_rows = n_rows - self.eval_samples
        self.sha256 = self.file.sha256()
        # A file that fits in the buffer is shuffled whole, once per epoch.
        self.buffer_rows = min(
            self.train_rows,
            max(4 * cfg.batch_size, SHUFFLE_BUFFER_BYTES // (4 * self.d_in)),
        )

    def describe(self) -> dict[str, Any]:
        file = self.file
        tokens = self.cfg.steps * self.cfg.batch_size
        return {
            "path": str(file.path.resolve()),
            "format": file.format,
            "key": file.key,
            "shape": [file.n_rows, file.d_in],
            "dtype": file.dtype,
            "sha256": self.sha256,
            "eval_rows": self.eval_samples,
            "eval_ranges": [list(r) for r in self.eval_ranges],
            "train_rows": self.train_rows,
            "epochs_per_run": tokens / self.train_rows,
        }

    def train(self, sae_cfg: TrainingSAEConfig, seed: int) -> Any:
        cfg = self.cfg
        trainer_cfg = SAETrainerConfig(
            total_training_samples=cfg.steps * cfg.batch_size,
            train_batch_size_samples=cfg.batch_size,
            lr_end=cfg.lr / 10,
            **training_schedule(cfg),
            # Norm and whitening estimates read at most one pass of the training rows.
            n_batches_for_norm_estimate=min(
                1000, math.ceil(self.train_rows / cfg.batch_size)
            ),
        )
        sae_class, _ = get_sae_training_class(sae_cfg.architecture())
        sae = sae_class(sae_cfg).to(cfg.device)
        batches = ShuffledBatches(
            self.file, self.train_ranges, cfg.batch_size, seed, self.buffer_rows
        )
        trainer: SAETrainer[Any, Any] = SAETrainer(
            cfg=trainer_cfg, sae=sae, data_provider=batches
        )
        return trainer.fit()

    def evaluate(self, sae: Any) -> dict[str, Any]:
        return evaluate_on_activations(
            sae, read_batches(self.file, self.eval_ranges, self.cfg.batch_size)
        )
