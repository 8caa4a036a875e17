"""Training checkpoints of 0.1, which predate the rate-matching threshold state:
they load with every missing training buffer as a fresh run starts it (zeros), and a
warning says so; anything else missing is still a load error.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping

import torch

# Buffers that every training SAE has had since 0.2 and no 0.1 checkpoint has.
ADDED_IN_0_2: tuple[str, ...] = ("selection_rate", "token_rate", "tail_scale")


def fill_0_1_checkpoint(
    state_dict: dict[str, torch.Tensor],
    buffers: Mapping[str, torch.Tensor],
    architecture: str,
) -> None:
    """Add to a 0.1 ``state_dict`` the training ``buffers`` it lacks, as zeros, and
    warn; other files pass. ``buffers`` gives shapes and dtypes only (the SAE may
    still be on the meta device)."""
    if "running_threshold" not in state_dict or any(
        name in state_dict for name in ADDED_IN_0_2
    ):
        return  # not written by 0.1
    device = state_dict["running_threshold"].device
    missing = [name for name in buffers if name not in state_dict]
    for name in missing:
        like = buffers[name]
        state_dict[name] = torch.zeros(like.shape, dtype=like.dtype, device=device)
    warnings.warn(
        f"this {architecture} training checkpoint was written by sae-lens-sampled "
        f"0.1 (it has no {', '.join(ADDED_IN_0_2)}); loaded with "
        f"{', '.join(missing)} as a fresh run starts them (zeros): weights, "
        "thresholds and the firing-rate EMA are the file's, and the per-token and "
        "batch-rule L0 estimates (l0_per_token, l0_batch_rule) start over. Save it "
        "again to write a current checkpoint",
        UserWarning,
        stacklevel=4,
    )
