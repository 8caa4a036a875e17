"""Training health: reconstruction over the last window and per-token L0 drift,
logged, saved in the metadata, warned about with the cause and the setting."""

from __future__ import annotations

import warnings

import pytest
import torch

from sae_lens_sampled import (
    FeatureChoiceTrainingSAE,
    FeatureChoiceTrainingSAEConfig,
    MutualChoiceTrainingSAE,
    MutualChoiceTrainingSAEConfig,
    SampledTrainingSAE,
    SampledTrainingSAEConfig,
)
from sae_lens_sampled.benchmark.loop import health_fields
from sae_lens_sampled.benchmark.report import format_table, with_notes
from sae_lens_sampled.health import (
    WINDOW_STEPS,
    HealthReport,
    ReconstructionWindows,
    TrainingHealthWarning,
)
from tests.helpers import step_input

ARCHITECTURES = {
    "sampled": (SampledTrainingSAE, SampledTrainingSAEConfig),
    "feature_choice": (FeatureChoiceTrainingSAE, FeatureChoiceTrainingSAEConfig),
    "mutual_choice": (MutualChoiceTrainingSAE, MutualChoiceTrainingSAEConfig),
}


def test_windows_compare_the_last_mean_with_the_one_before():
    windows = ReconstructionWindows(window=2)
    assert windows.change_tensor() is None and windows.change() is None
    assert torch.isnan(windows.logged_change())
    for value in (4.0, 2.0):
        windows.add(torch.tensor(value))
    assert windows.change() is None  # one window only
    assert torch.isnan(windows.change_tensor())
    windows.add(torch.tensor(5.0))
    assert windows.change() is None  # the second is not full
    windows.add(torch.tensor(7.0))
    assert float(windows.change_tensor()) == pytest.approx(6.0 / 3.0 - 1)
    assert windows.change() == pytest.approx(6.0 / 3.0 - 1)
    windows.add(torch.tensor(1.0))  # a third window opens: nothing moves yet
    assert windows.change() == pytest.approx(6.0 / 3.0 - 1)


def test_report_names_the_cause_and_the_setting():
    healthy = HealthReport(mse_change=-0.01, window_steps=100, l0_per_token=4.5, k=4)
    assert healthy.reconstruction_improved is True
    assert healthy.l0_drift == pytest.approx(0.125)
    assert healthy.problems() == [] and healthy.flags() == []
    sick = HealthReport(mse_change=0.05, window_steps=100, l0_per_token=9.0, k=4)
    assert sick.reconstruction_improved is False
    assert sick.flags() == ["MSE rising", "L0 +125%"]
    rising, drift = sick.problems(threshold_gain=0.1)
    assert rising.startswith("training MSE rose +5.0% over the last 100 steps")
    assert rising.endswith("lower the learning rate (lr)")
    assert drift.startswith("per-token L0 9.00 is +125% off k=4")
    assert "raise threshold_gain (now 0.1)" in drift
    # SAELens's own SAEs have no threshold_gain: only the steps are named.
    assert sick.problems()[1].endswith("; train for more steps")


WINDOW = 15  # steps per window in these tests (WINDOW_STEPS in training)


def train(architecture: str, steps: int, growth: float) -> torch.nn.Module:
    """``steps`` Adam steps on sparse data whose scale grows by ``growth`` per step
    (0: a fixed distribution, which the SAE learns)."""
    sae_class, cfg_class = ARCHITECTURES[architecture]
    torch.manual_seed(0)
    sae = sae_class(cfg_class(d_in=16, d_sae=32, k=2, dtype="float32"))
    assert sae.reconstruction.window == WINDOW_STEPS
    sae.reconstruction = ReconstructionWindows(window=WINDOW)
    optimizer = torch.optim.Adam(sae.parameters(), lr=1e-2)
    directions = torch.randn(32, 16)
    for step in range(steps):
        codes = torch.rand(128, 32) * (torch.rand(128, 32) < 0.06)
        x = codes @ directions * (1 + growth * step)
        output = sae.training_forward_pass(step_input(x))
        optimizer.zero_grad()
        output.loss.backward()
        optimizer.step()
    return sae


@pytest.mark.parametrize("architecture", sorted(ARCHITECTURES))
def test_training_sae_reports_whether_reconstruction_improved(architecture):
    learning = train(architecture, 2 * WINDOW, growth=0.0)
    assert learning.health().reconstruction_improved is True
    # Inputs growing 5% per step: the MSE rises window after window.
    diverging = train(architecture, 2 * WINDOW, growth=0.05)
    report = diverging.health()
    assert report.reconstruction_improved is False
    assert report.mse_change > 0.1
    state = {k: v.detach().clone() for k, v in diverging.state_dict().items()}
    with pytest.warns(TrainingHealthWarning, match=r"lower the learning rate \(lr\)"):
        diverging.process_state_dict_for_saving_inference(state)
    metadata = diverging.cfg.metadata
    assert metadata.reconstruction_improved is False
    assert metadata.mse_window_change == pytest.approx(report.mse_change)
    assert metadata.l0_per_token_drift == pytest.approx(metadata.l0_per_token / 2 - 1)


def test_a_sampled_pool_names_the_pool_as_the_knob():
    # d_sae 32, k 2: the default pool is 16 features, so a rising MSE names the pool
    diverging = train("sampled", 2 * WINDOW, growth=0.05)
    (rising,) = [p for p in diverging.health().problems() if "MSE" in p]
    assert "a pool of 16 of 32 features" in rising
    assert "enlarge it with pool_fraction (now pool_fraction=0.5)" in rising
    table = health_fields(diverging, l0=2.0, k=2)["health"]
    assert table == [rising]
    # a pool of every feature is BatchTopK: the learning rate is the knob again
    whole = SampledTrainingSAE(
        SampledTrainingSAEConfig(d_in=16, d_sae=32, k=2, pool_fraction=1.0)
    )
    assert whole.mse_rise_advice().endswith("lower the learning rate (lr)")
    assert "pool" not in whole.mse_rise_advice()


def test_l0_drift_is_logged_and_warned_with_threshold_gain():
    sae = train("mutual_choice", 3, growth=0.0)  # thresholds far from settled
    output = sae.training_forward_pass(step_input(torch.randn(128, 16)))
    drift = float(output.metrics["l0_per_token_drift"]())
    assert drift == pytest.approx(float(output.metrics["l0_per_token"]()) / 2 - 1)
    # fewer than two windows: logged as NaN
    assert torch.isnan(output.metrics["mse_window_change"]())
    state = {k: v.detach().clone() for k, v in sae.state_dict().items()}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sae.process_state_dict_for_saving_inference(state)
    messages = [str(w.message) for w in caught if w.category is TrainingHealthWarning]
    assert sae.cfg.metadata.reconstruction_improved is None
    drift = sae.cfg.metadata.l0_per_token_drift
    if abs(drift) > 0.2:
        assert any("raise threshold_gain (now 0.1)" in m for m in messages)
    else:
        assert messages == []


def test_compare_table_names_the_problem_and_the_notes_the_knob():
    sae = train("mutual_choice", 2 * WINDOW, growth=0.05)
    fields = health_fields(sae, l0=5.0, k=2)
    assert fields["health_flags"] == ["MSE rising", "L0 +150%"]
    results = [
        {"label": "mutual_choice", "seed": 0, "l0": 5.0, **fields},
        {"label": "topk", "seed": 0, "l0": 2.0, "health_flags": [], "health": []},
    ]
    table = with_notes(format_table(results), results)
    lines = table.splitlines()
    assert lines[0].split() == ["run", "L0", "health"]
    assert lines[2].endswith("MSE rising, L0 +150%")
    assert lines[3].endswith("ok")
    assert lines[5] == "health:"
    assert lines[6].startswith("  mutual_choice: training MSE rose")
    assert lines[7].startswith("  mutual_choice: per-token L0 5.00 is +150% off k=2")
    assert "raise threshold_gain (now 0.1)" in lines[7]


def test_the_logged_window_change_is_nan_until_two_windows_then_their_ratio():
    windows = ReconstructionWindows(window=2)
    for mse in (4.0, 4.0):
        windows.add(torch.tensor(mse))
    assert torch.isnan(windows.logged_change())  # one window
    for mse in (5.0, 5.0):
        windows.add(torch.tensor(mse))
    assert float(windows.logged_change()) == pytest.approx(0.25)
    windows.add(torch.tensor(1.0))  # mid-window: the closed windows are unchanged
    assert float(windows.logged_change()) == pytest.approx(0.25)
    assert windows.change() == pytest.approx(0.25)


def test_windows_keep_the_last_two_closed_windows_after_many_steps():
    # The ring holds 3 windows: after 11 steps of window 2 (values 1..11), the
    # closed windows are steps 7-8 (values 7, 8) and 9-10 (values 9, 10); step 11
    # is the open window.
    windows = ReconstructionWindows(window=2)
    for value in range(1, 12):
        windows.add(torch.tensor(float(value)))
    assert windows.change() == pytest.approx(9.5 / 7.5 - 1)
    windows.add(torch.tensor(100.0))  # closes the window of 11 and 100
    assert windows.change() == pytest.approx(55.5 / 9.5 - 1)
