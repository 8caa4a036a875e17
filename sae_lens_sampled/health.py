"""Whether a training run is learning, and what to change when it is not.

Two signals, both cheap: the mean training MSE over the last window of steps
against the window before it (kept on the device, so no host sync per step), and
the drift of the per-token L0 (what the saved SAE will do) from the target k.
Pure tensor and number logic; the training SAEs log and record it
(:class:`~sae_lens_sampled.saes.base.BatchLevelTrainingSAE`).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch

# Steps per reconstruction window.
WINDOW_STEPS = 100
# A window mean more than this fraction above the window before it: not learning.
MSE_RISE_LIMIT = 0.02
# |per-token L0 / k - 1| above this: the per-token thresholds have not settled.
L0_DRIFT_LIMIT = 0.2
# What a rising MSE most often means, unless the architecture knows better.
LR_ADVICE = "the run is not converging; lower the learning rate (lr)"


class TrainingHealthWarning(UserWarning):
    """A training run ended without learning, or with per-token L0 far from k."""


class ReconstructionWindows:
    """Mean training MSE over consecutive windows of ``window`` steps.

    Each step writes its MSE into a ring of the last ``3 * window`` steps on the
    device, with no branch on a step count, so a training step compiles to one graph
    that never recompiles; the means are taken when read (:meth:`change` syncs
    once). Three windows: the two closed ones stay whole until the open one fills.
    """

    def __init__(self, window: int = WINDOW_STEPS) -> None:
        self.window = window
        # The step count has shape [1]: an index, never read on the host.
        self._ring: torch.Tensor | None = None
        self._steps: torch.Tensor | None = None

    @torch.no_grad()
    def add(self, mse: torch.Tensor) -> None:
        value = mse.to(torch.float64).reshape(1)
        if self._ring is None or self._steps is None:
            self._ring = value.new_zeros(3 * self.window)
            self._steps = torch.zeros(1, dtype=torch.long, device=value.device)
        self._ring.index_copy_(0, self._steps % (3 * self.window), value)
        self._steps.add_(1)

    @torch.no_grad()
    def change_tensor(self) -> torch.Tensor | None:
        """Relative change of the window mean, last against the one before
        (negative: improved); NaN before two full windows, None before any step."""
        if self._ring is None or self._steps is None:
            return None
        window, ring = self.window, self._ring
        closed = self._steps[0] // window  # closed windows so far
        steps = (closed - 2) * window + torch.arange(2 * window, device=ring.device)
        means = ring[steps % ring.numel()].view(2, window).sum(dim=1) / window
        change = means[1] / means[0] - 1
        return torch.where(closed >= 2, change, torch.nan)

    def logged_change(self) -> torch.Tensor:
        """:meth:`change_tensor` for a metrics log: NaN before two full windows."""
        change = self.change_tensor()
        return torch.tensor(torch.nan) if change is None else change

    def change(self) -> float | None:
        """:meth:`change_tensor` as a float; None before two full windows."""
        change = self.change_tensor()
        if change is None:
            return None
        value = float(change)
        return None if math.isnan(value) else value


@dataclass
class HealthReport:
    """The state of a run at one moment: ``mse_change`` (the last window's mean
    training MSE against the one before, relative; None before two windows) over
    windows of ``window_steps``, the ``l0_per_token`` the learned thresholds give
    against the target ``k``, and ``mse_advice`` (what a rising MSE likely means).
    """

    mse_change: float | None
    window_steps: int
    l0_per_token: float | None
    k: float
    mse_advice: str = LR_ADVICE

    @property
    def reconstruction_improved(self) -> bool | None:
        return None if self.mse_change is None else self.mse_change < 0

    @property
    def l0_drift(self) -> float | None:
        """Per-token L0 / k - 1."""
        return None if self.l0_per_token is None else self.l0_per_token / self.k - 1

    def flags(self) -> list[str]:
        """Short names of the problems (a table cell)."""
        change, drift = self.mse_change, self.l0_drift
        found = []
        if change is not None and change > MSE_RISE_LIMIT:
            found.append("MSE rising")
        if drift is not None and abs(drift) > L0_DRIFT_LIMIT:
            found.append(f"L0 {drift:+.0%}")
        return found

    def problems(self, threshold_gain: float | None = None) -> list[str]:
        """Each problem with its likely cause and the setting to change;
        ``threshold_gain`` None: an SAE without that setting (SAELens's own)."""
        found = []
        change = self.mse_change
        if change is not None and change > MSE_RISE_LIMIT:
            found.append(
                f"training MSE rose {change:+.1%} over the last {self.window_steps} "
                f"steps (window mean against the window before): {self.mse_advice}"
            )
        drift = self.l0_drift
        if drift is not None and abs(drift) > L0_DRIFT_LIMIT:
            knobs = "train for more steps"
            if threshold_gain is not None:
                knobs += (
                    f", raise threshold_gain (now {threshold_gain:g}), or run "
                    "calibrate_thresholds on held-out activations"
                )
            found.append(
                f"per-token L0 {self.l0_per_token:.2f} is {drift:+.0%} off k="
                f"{self.k:g}: the per-token thresholds have not caught up with the "
                f"batch rule; {knobs}"
            )
        return found


def warn_unhealthy(report: HealthReport, where: str, **knobs: float) -> None:
    for problem in report.problems(**knobs):
        warnings.warn(f"{where}: {problem}", TrainingHealthWarning, stacklevel=3)
