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

    Everything stays on the device, with no branch on a step count, so that a
    training step compiles to one graph (``torch.compile(..., fullgraph=True)``)
    and never recompiles; reading :meth:`change` syncs once.
    """

    def __init__(self, window: int = WINDOW_STEPS) -> None:
        self.window = window
        # Running sum and step count, and the means of the window before the last
        # and of the last (NaN until that window has closed).
        self._sum: torch.Tensor | None = None
        self._steps: torch.Tensor | None = None
        self._means: torch.Tensor | None = None

    def add(self, mse: torch.Tensor) -> None:
        value = mse.detach().to(torch.float64)
        if self._sum is None or self._steps is None or self._means is None:
            self._sum = torch.zeros_like(value)
            self._steps = torch.zeros((), dtype=torch.long, device=value.device)
            self._means = torch.full((2,), torch.nan, device=value.device).to(value)
        total = self._sum + value
        steps = self._steps + 1
        closed = steps % self.window == 0
        shifted = torch.stack([self._means[1], total / self.window])
        self._means = torch.where(closed, shifted, self._means)
        self._sum = torch.where(closed, 0.0, total)
        self._steps = steps

    def change_tensor(self) -> torch.Tensor | None:
        """Relative change of the window mean, last against the one before
        (negative: improved); NaN before two full windows, None before any step."""
        if self._means is None:
            return None
        return self._means[1] / self._means[0] - 1

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
    """The state of a run at one moment.

    Args:
        mse_change (float | None): Relative change of the mean training MSE over the
            last window against the window before it (None: fewer than two windows).
        window_steps (int): Steps per window.
        l0_per_token (float | None): Per-token L0 the learned thresholds give.
        k (float): Target mean L0.
        mse_advice (str): The likely cause of a rising MSE and the setting to change.
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
        """Per-token L0 relative to k, minus 1 (0: exactly k)."""
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
