"""NaN/Inf checks of the training SAEs' inputs: at once (one host sync), or noted on
the device and raised later (``check_finite_inputs``). Pure torch; no SAELens
imports.
"""

from __future__ import annotations

import torch

NONFINITE_APPLIED = (
    "a training batch contained non-finite activations (NaN or Inf); it was already "
    "applied, so the weights and training state are likely corrupted. Fix the data, "
    "or set check_finite_inputs='every_step' to stop before a bad batch is applied "
    "(one device sync per step)"
)


def check_finite(
    x: torch.Tensor,
    what: str = "training batch",
    consequence: str = "nothing was updated",
) -> None:
    """Raise a ValueError if ``x`` holds NaN or Inf (one device sync)."""
    if not bool(torch.isfinite(x).all()):
        n_nan = int(torch.isnan(x).sum())
        n_inf = int(torch.isinf(x).sum())
        raise ValueError(
            f"{what} contains non-finite activations ({n_nan} NaN, {n_inf} "
            f"Inf, shape {tuple(x.shape)}); {consequence}"
        )


def check_batch_rule_input(x: torch.Tensor) -> None:
    """``encode_batch``'s input check: one NaN would change every token's codes."""
    check_finite(
        x,
        what="encode_batch input",
        consequence="the batch rule ranks all tokens together, so one non-finite "
        "token would change the codes of every other; drop or fix those tokens, or "
        "use the per-token encode",
    )


def add_nonfinite(total: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    """``total + sum(0 * x)`` on ``x``'s device: 0 while every entry was finite, NaN
    for good once one was not (``0 * inf`` is NaN), with no host read."""
    # Two passes and no flag to combine: a NaN in the running sum stays.
    zeros = x.mul(0).sum()
    if total is not None:
        zeros = zeros + total.to(zeros.device)
    return zeros
