"""The size of one training step, and a seeded training SAE of that size.

Shared by ``sae-lens-sampled bench`` (:mod:`sae_lens_sampled.benchmark.speed`) and the
data-parallel traffic and timing model (:mod:`sae_lens_sampled.distributed.costs`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class Shape:
    """One benchmark shape: tokens per step, input width, features and mean L0."""

    batch: int
    d_in: int
    d_sae: int
    k: int

    @classmethod
    def parse(cls, text: str) -> Shape:
        """``"B,d_in,d_sae,k"``, e.g. ``"4096,256,8192,32"``."""
        parts = text.split(",")
        if len(parts) != 4 or not all(p.strip().isdigit() for p in parts):
            raise ValueError(
                f"shape must be 4 positive integers 'B,d_in,d_sae,k', got {text!r}"
            )
        shape = cls(*(int(p) for p in parts))
        if min(asdict(shape).values()) < 1 or shape.k > shape.d_sae:
            raise ValueError(
                f"shape needs all values >= 1 and k <= d_sae, got {text!r}"
            )
        return shape

    def __str__(self) -> str:
        return f"B={self.batch} d_in={self.d_in} d_sae={self.d_sae} k={self.k}"


def build_sae(name: str, shape: Shape, device: str, seed: int = 0) -> Any:
    """A training SAE of architecture ``name`` with the same initial weights for all."""
    # Imported here: the bench command reads its arguments before torch loads.
    import torch
    from sae_lens.registry import get_sae_training_class

    import sae_lens_sampled  # noqa: F401

    sae_class, cfg_class = get_sae_training_class(name)
    # k is a field of every architecture benchmarked, not of the base config class
    fields: dict[str, Any] = {"d_in": shape.d_in, "d_sae": shape.d_sae, "k": shape.k}
    cfg = cfg_class(**fields, device=device)
    torch.manual_seed(seed)
    sae = sae_class(cfg)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in ("W_enc", "b_enc", "W_dec", "b_dec"):
            tensor = getattr(sae, param)
            values = torch.randn(tensor.shape, generator=generator) * 0.05
            tensor.copy_(values.to(tensor))
    sae.train()
    return sae
