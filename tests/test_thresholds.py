"""Threshold update rules, the rate-matching state, calibration and JumpReLU export."""

import math
from typing import get_args

import pytest
import torch
from sae_lens import SAE, JumpReLUSAE

import sae_lens_sampled.calibration as calibration_module
import sae_lens_sampled.thresholds as thresholds_module
from sae_lens_sampled import (
    FeatureChoiceTrainingSAE,
    FeatureChoiceTrainingSAEConfig,
    MutualChoiceTrainingSAE,
    MutualChoiceTrainingSAEConfig,
    SampledTrainingSAE,
    SampledTrainingSAEConfig,
    calibrate_thresholds,
    export_jumprelu,
)
from sae_lens_sampled.thresholds import (
    MAX_RELATIVE_STEP,
    THRESHOLD_MODES,
    THRESHOLD_RULES,
    ThresholdMode,
    column_stats_dense,
    fired_and_excess,
    update_firing_rate,
    update_global_threshold,
    update_per_feature_threshold,
    update_rate_threshold,
)
from tests.helpers import step_input

pytestmark = pytest.mark.filterwarnings("ignore:calibrate_thresholds:UserWarning")

ACTS = torch.tensor([[0.0, 2.0, 0.0], [0.5, 3.0, 0.0]])
INF = math.inf
D_IN, D_SAE = 8, 32
ARCHITECTURES = {
    "sampled": (SampledTrainingSAE, SampledTrainingSAEConfig, {"pool_factor": 2}),
    "mutual_choice": (MutualChoiceTrainingSAE, MutualChoiceTrainingSAEConfig, {}),
    "feature_choice": (FeatureChoiceTrainingSAE, FeatureChoiceTrainingSAEConfig, {}),
}


# --- pure update rules ----------------------------------------------------------


def test_column_stats_dense():
    counts, smallest = column_stats_dense(ACTS)
    assert counts.tolist() == [1, 2, 0]
    assert smallest.tolist() == [0.5, 2.0, INF]


@pytest.mark.parametrize("chunk_entries", [1, 4, 1 << 20])
def test_fired_and_excess_counts_strictly_above(monkeypatch, chunk_entries):
    monkeypatch.setattr(thresholds_module, "_CPU_CHUNK_ENTRIES", chunk_entries)
    hidden = torch.tensor([[1.0, -2.0, 5.0], [3.0, 0.5, 5.0], [2.0, 0.0, 4.0]])
    threshold = torch.tensor([2.0, -1.0, INF], dtype=torch.float64)
    fired, excess = fired_and_excess(hidden, threshold)
    assert fired.tolist() == [1, 2, 0]  # 2.0 is not above 2.0
    assert excess.tolist() == [1.0, 2.5, 0.0]
    assert fired.dtype == excess.dtype == torch.float32


def test_fired_and_excess_in_bfloat16_counts_exactly():
    hidden = torch.full((600, 2), 3.0, dtype=torch.bfloat16)
    fired, _ = fired_and_excess(hidden, torch.tensor([1.0, 3.0]))
    assert fired.tolist() == [600, 0]  # 600 is not representable in bfloat16


def test_rate_step_is_gain_times_scale_times_relative_error():
    def f64(*values):
        return torch.tensor(values, dtype=torch.float64)

    out = update_rate_threshold(
        threshold=f64(1.0, 2.0, INF, 0.5, 1.0, 3.0),
        scale=f64(0.5, 0.0, 1.0, 1.0, 0.2, 0.5),
        target_rate=f64(0.1, 0.4, 0.1, 0.001, 0.05, 0.5),
        token_rate=f64(0.4, 0.1, 0.0, 0.0, 0.05, 0.02),
        fired=f64(30, 20, 0, 0, 100, 0),
        n_tokens=100,
        gain=0.1,
    )
    # error = (fired - target * B) / max(B * sqrt(token_rate * target), 1), in +-4:
    # 0: (30 - 10) / 20 = 1, step 0.1 * 0.5 * 1
    # 1: (20 - 40) / 20 = -1; no scale yet, so the threshold sets it: 0.1 * 2 * -1
    # 2: unset (inf) stays unset
    # 3: (0 - 0.1) / 1 = -0.1 (normalised by one token at least)
    # 4: (100 - 5) / 5 = 19 -> 4;  5: (0 - 50) / 10 = -5 -> -4
    expected = f64(
        1.05,
        1.8,
        INF,
        0.5 - 0.1 * 0.1,
        1.0 + 0.1 * 0.2 * MAX_RELATIVE_STEP,
        3.0 - 0.1 * 0.5 * MAX_RELATIVE_STEP,
    )
    torch.testing.assert_close(out, expected)
    # never below zero (JumpReLU fires on positive values only)
    low = update_rate_threshold(
        f64(0.01), f64(1.0), f64(0.5), f64(0.0), f64(0.0), n_tokens=10, gain=1.0
    )
    assert low.tolist() == [0.0]


def test_global_update_uses_smallest_positive_entry():
    _, smallest = column_stats_dense(ACTS)
    threshold = torch.zeros(3, dtype=torch.float64)
    out = update_global_threshold(threshold, smallest, lr=0.1)
    assert torch.allclose(out, torch.full((3,), 0.05, dtype=torch.float64))
    # a batch with nothing selected leaves it alone
    nothing = torch.full((3,), INF)
    assert torch.equal(update_global_threshold(out, nothing, 0.1), out)
    # the first sighting sets an unset (inf) threshold outright
    unset = torch.full((3,), INF, dtype=torch.float64)
    assert update_global_threshold(unset, smallest, lr=0.1).tolist() == [0.5] * 3


def test_per_feature_update_first_sighting_then_ema():
    _, smallest = column_stats_dense(ACTS)
    threshold = torch.tensor([INF, 1.0, 7.0], dtype=torch.float64)
    out = update_per_feature_threshold(threshold, smallest, lr=0.5)
    # feature 0 first seen -> set to 0.5; feature 1 EMA of 1.0 and 2.0; 2 untouched
    assert out.tolist() == [0.5, 1.5, 7.0]


def test_firing_rate_is_running_mean_then_ema():
    def step(rate, acts, seen):
        counts, _ = column_stats_dense(acts)
        seen = torch.tensor(float(seen), dtype=torch.float64)
        return update_firing_rate(rate, counts, acts.shape[0], seen, horizon_tokens=4)

    rate = step(torch.zeros(3, dtype=torch.float64), ACTS, 2)
    assert rate.tolist() == [0.5, 1.0, 0.0]
    rate = step(rate, torch.zeros(2, 3), 4)
    assert rate.tolist() == [0.25, 0.5, 0.0]  # running mean over 4 tokens
    rate = step(rate, torch.ones(2, 3), 6)
    assert rate.tolist() == [0.625, 0.75, 0.5]  # EMA weight 2/4 past the horizon
    assert torch.equal(step(rate, torch.zeros(0, 3), 6), rate)  # empty batch


# --- the training SAE's rate-matching state --------------------------------------


def make(name: str, **fields):
    cls, cfg_cls, defaults = ARCHITECTURES[name]
    torch.manual_seed(0)
    sae = cls(cfg_cls(d_in=D_IN, d_sae=D_SAE, **{"k": 3, **defaults, **fields}))
    with torch.no_grad():
        sae.W_dec.mul_(torch.linspace(0.2, 3.0, D_SAE)[:, None])
        sae.b_enc.normal_(0, 0.2)
    return sae


def data(n: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, D_IN, generator=generator) * 2


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_first_selection_sets_the_smallest_selected_value(name):
    sae = make(name)
    out = sae.training_forward_pass(step_input(data(64, 0)))
    acts = out.feature_acts.detach()
    smallest = torch.where(acts > 0, acts, torch.inf).amin(0).double()
    # selected features start at their smallest selection, the others stay unset
    assert torch.equal(sae.running_threshold, smallest)
    assert torch.isinf(sae.running_threshold).any()
    assert torch.isfinite(sae.running_threshold).any()


@pytest.mark.parametrize(
    ("name", "fields"),
    [
        ("mutual_choice", {}),
        ("feature_choice", {"capacity_schedule": "uniform"}),
        ("sampled", {"pool_factor": 2}),
    ],
)
def test_rate_thresholds_converge_to_the_batch_rule_rates(name, fields):
    # Fixed weights, fresh batches of one distribution: every feature's per-token
    # rate converges to the batch rule's selection rate (EMA), sampled's pool
    # included, and the per-token L0 to the rule's on held-out data.
    sae = make(name, threshold_gain=0.1, **fields)
    for step in range(200):
        sae.training_forward_pass(step_input(data(256, step)))
    held_out = data(8192, 10_000)
    per_token = (sae.hidden_pre(held_out) > sae.running_threshold.float()).float()
    rule = torch.cat([sae.encode_batch(x) for x in held_out.split(256)]) > 0
    token_rate, rule_rate = per_token.mean(0), rule.float().mean(0)
    l0_token, l0_rule = token_rate.sum().item(), rule_rate.sum().item()
    assert abs(l0_token / l0_rule - 1) < 0.05, (l0_token, l0_rule)
    target = sae.selection_rate.float()
    frequent = target > 0.02
    assert frequent.sum() >= 5
    # sampled's target moves with each pool draw, and the threshold follows it
    # about 1 / threshold_gain steps late
    rtol = 0.3 if name == "sampled" else 0.15
    torch.testing.assert_close(
        token_rate[frequent], target[frequent], rtol=rtol, atol=0.005
    )
    if name != "sampled":  # a deterministic rule: the held-out rates agree too
        torch.testing.assert_close(
            token_rate[frequent], rule_rate[frequent], rtol=0.15, atol=0.005
        )


def test_per_token_l0_metric_reads_the_thresholds_the_batch_met():
    sae = make("mutual_choice")
    sae.training_forward_pass(step_input(data(64, 0)))
    before = sae.running_threshold.clone()
    x = data(64, 1)
    out = sae.training_forward_pass(step_input(x))
    expected = (out.hidden_pre > before.float()).sum(-1).double().mean()
    torch.testing.assert_close(out.metrics["l0_per_token"](), expected)


def test_a_batch_with_nothing_selected_moves_no_rate_state():
    sae = make("mutual_choice")
    sae.training_forward_pass(step_input(data(64, 0)))
    state = {n: getattr(sae, n).clone() for n in sae.thresholds.buffers}
    with torch.no_grad():
        sae.b_enc.fill_(-1e4)
    sae.training_forward_pass(step_input(data(64, 1)))
    for name, value in state.items():
        assert torch.equal(getattr(sae, name), value), name


def test_fold_scaling_factor_rescales_thresholds_and_tail_scales():
    sae = make("mutual_choice")
    for step in range(3):
        sae.training_forward_pass(step_input(data(64, step)))
    threshold, scale = sae.running_threshold.clone(), sae.tail_scale.clone()
    assert (scale > 0).any()
    sae.fold_activation_norm_scaling_factor(4.0)
    torch.testing.assert_close(sae.running_threshold, threshold / 4)
    torch.testing.assert_close(sae.tail_scale, scale / 4)


@pytest.mark.parametrize("mode", ["global", "per_feature"])
def test_earlier_modes_keep_their_rule(mode):
    sae = make("mutual_choice", threshold_mode=mode, topk_threshold_lr=1.0)
    out = sae.training_forward_pass(step_input(data(64, 0)))
    acts = out.feature_acts.detach()
    smallest = torch.where(acts > 0, acts, torch.inf).amin(0).double()
    if mode == "global":
        smallest = smallest.min().expand(D_SAE)
    torch.testing.assert_close(sae.running_threshold, smallest)


def test_metadata_carries_both_l0s_through_save_and_export(tmp_path):
    sae = make("sampled")
    for step in range(20):
        sae.training_forward_pass(step_input(data(128, step)))
    expected_token = sae.token_rate.sum().item()
    expected_rule = sae.selection_rate.sum().item()
    assert expected_rule == pytest.approx(3.0, rel=1e-6)  # k, every batch
    sae.save_inference_model(tmp_path / "plugin")
    loaded = SAE.load_from_disk(tmp_path / "plugin")
    assert loaded.cfg.metadata.l0_per_token == pytest.approx(expected_token)
    assert loaded.cfg.metadata.l0_batch_rule == pytest.approx(expected_rule)
    export_jumprelu(loaded, tmp_path / "jumprelu")
    exported = SAE.load_from_disk(tmp_path / "jumprelu")
    assert exported.cfg.metadata.l0_per_token == pytest.approx(expected_token)
    assert exported.cfg.metadata.batch_rule["architecture"] == "sampled"


# --- calibration -----------------------------------------------------------------


def trained(name: str = "mutual_choice", steps: int = 5, **fields):
    sae = make(name, **fields)
    for step in range(steps):
        sae.training_forward_pass(step_input(data(128, step)))
    return sae


def quiet_calibrate(*args, **kwargs):
    with pytest.warns(UserWarning, match="calibrate_thresholds"):
        return calibrate_thresholds(*args, **kwargs)


def test_calibration_matches_the_batch_rule_counts_on_its_data():
    sae = trained()
    x = data(4096, 99)
    result = calibrate_thresholds(sae, [x], batch_size=512, min_selections=0)
    assert torch.equal(sae.running_threshold, result.thresholds)
    selected = torch.cat([sae.encode_batch(b) for b in x.split(512)]) > 0
    target = selected.sum(0).double()
    assert torch.equal(result.selected, target)
    fired = (sae.hidden_pre(x) > sae.running_threshold.float()).sum(0).double()
    seen = target > 0
    # the histograms place each threshold within a fraction of a token-rank
    assert ((fired - target)[seen].abs() <= (0.02 * target[seen]).clamp_min(1)).all()


def test_calibration_keeps_thresholds_of_features_it_never_sees_selected():
    sae = trained()
    with torch.no_grad():
        sae.W_enc[:, :4] = 0  # features 0-3: pre-activation b_enc < 0 everywhere
        sae.b_enc[:4] = -1.0
        sae.running_threshold[:4] = torch.tensor([0.5, 1.0, INF, 2.0])
    result = quiet_calibrate(sae, [data(512, 7)], batch_size=128)
    assert not result.refitted[:4].any()
    assert sae.running_threshold[:4].tolist() == [0.5, 1.0, INF, 2.0]


def test_calibration_does_not_depend_on_how_the_data_is_split():
    sae = trained("sampled", pool_seed=3)
    x = data(1000, 5)
    whole = calibrate_thresholds(sae, [x], batch_size=256, min_selections=0)
    pieces = (x[:1], x[1:300], x[300:301], x[301:].reshape(3, 233, D_IN))
    stream = (piece for piece in pieces)  # a generator, read once
    split = calibrate_thresholds(sae, stream, batch_size=256, min_selections=0)
    assert torch.equal(whole.thresholds, split.thresholds)
    assert torch.equal(whole.selected, split.selected)


def test_calibration_draws_fresh_pools_and_leaves_the_callers_rng_alone():
    sae = trained("sampled", pool_seed=0, pool_factor=1)  # a pool of 3 features
    torch.manual_seed(123)
    state = torch.get_rng_state()
    one = calibrate_thresholds(sae, [data(4096, 8)], batch_size=128, min_selections=0)
    assert torch.equal(torch.get_rng_state(), state)
    assert sae.cfg.pool_seed == 0
    # 32 batches, each its own pool of 3: many more than 3 features get selected
    assert one.refitted.sum() > 10
    again = calibrate_thresholds(sae, [data(4096, 8)], batch_size=128, min_selections=0)
    assert torch.equal(one.thresholds, again.thresholds)  # seeded: reproducible
    averaged = calibrate_thresholds(
        sae, [data(4096, 8)], batch_size=128, pool_draws=4, min_selections=0
    )
    # four draws per batch: counts in quarters, not all whole
    assert torch.equal(averaged.selected * 4, (averaged.selected * 4).round())
    assert not torch.equal(averaged.selected, averaged.selected.round())


def test_calibration_warns_and_reports_dead_features():
    sae = trained()
    with torch.no_grad():
        sae.running_threshold.fill_(INF)  # nothing fires per token before
    with pytest.warns(UserWarning, match=r"features were selected fewer than 50"):
        result = calibrate_thresholds(
            sae, [data(256, 3)], batch_size=256, min_selections=50
        )
    assert result.dead_before == D_SAE
    fires = (sae.hidden_pre(data(256, 3)) > result.thresholds.float()).any(0)
    assert result.dead_after == int((~fires).sum())
    assert result.dead_after < D_SAE
    assert result.rare == int(((result.selected > 0) & (result.selected < 50)).sum())


@pytest.mark.parametrize("name", ["mutual_choice", "sampled"])
def test_calibration_accepts_an_exported_jumprelu_sae(name, tmp_path):
    sae = trained(name, pool_seed=1) if name == "sampled" else trained(name)
    export_jumprelu(sae, tmp_path)
    jumprelu = SAE.load_from_disk(tmp_path)
    assert type(jumprelu) is JumpReLUSAE
    x = data(2048, 4)
    # the batch rule is rebuilt from the export's metadata
    ours = calibrate_thresholds(jumprelu, [x], batch_size=256, min_selections=0)
    reference = calibrate_thresholds(sae, [x], batch_size=256, min_selections=0)
    assert torch.equal(ours.selected, reference.selected)
    torch.testing.assert_close(ours.thresholds, reference.thresholds, rtol=1e-5, atol=0)
    torch.testing.assert_close(
        jumprelu.threshold.double(), ours.thresholds.float().double()
    )


def test_calibration_of_jumprelu_needs_a_rule_it_cannot_rebuild(tmp_path):
    sae = trained("feature_choice")  # learned (zipf) capacities
    jumprelu = export_jumprelu(sae)
    with pytest.raises(ValueError, match="pass batch_rule="):
        calibrate_thresholds(jumprelu, [data(256, 0)])
    result = calibrate_thresholds(
        jumprelu, [data(256, 0)], batch_rule=sae, batch_size=256, min_selections=0
    )
    assert result.refitted.any()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"batch_size": 0}, r"batch_size must be in \[1, inf\), got 0"),
        ({"pool_draws": 0}, r"pool_draws must be in \[1, inf\), got 0"),
        ({"accuracy": 0.5}, r"accuracy must be in \(0, 0.5\), got 0.5"),
    ],
)
def test_calibration_rejects_bad_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        calibrate_thresholds(trained(), [data(8, 0)], **kwargs)


def test_calibration_needs_tokens():
    with pytest.raises(ValueError, match="at least one token"):
        calibrate_thresholds(trained(), [])


# --- export ----------------------------------------------------------------------


def test_export_jumprelu_matches_plugin_encode(tmp_path):
    sae = trained("sampled", pool_seed=0)
    exported = export_jumprelu(sae, tmp_path / "jumprelu")
    assert type(exported) is JumpReLUSAE
    reloaded = SAE.load_from_disk(tmp_path / "jumprelu")
    assert type(reloaded) is JumpReLUSAE
    x = torch.randn(4, 6, D_IN)
    sae.eval()
    expected = sae.encode(x)
    assert (expected != 0).any()
    torch.testing.assert_close(exported.encode(x), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(reloaded.encode(x), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(
        reloaded.decode(reloaded.encode(x)), sae.decode(expected), rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize("name", ["mutual_choice", "sampled"])
def test_export_after_fold_W_dec_norm_keeps_the_batch_rule(name, tmp_path):
    # Without decoder-norm rescaling, fold_W_dec_norm moves the norms into the encoder
    # and the batch rule's ranking scale (rank_scale = 1 / norm) must travel along.
    fields = {"pool_mode": "top"} if name == "sampled" else {}
    sae = trained(name, rescale_acts_by_decoder_norm=False, **fields)
    sae.save_inference_model(tmp_path / "plugin")
    plugin = SAE.load_from_disk(tmp_path / "plugin")
    plugin.fold_W_dec_norm()
    assert not torch.equal(plugin.rank_scale, torch.ones(D_SAE))
    export_jumprelu(plugin, tmp_path / "jumprelu")
    rule = calibration_module._rule_from_metadata(
        SAE.load_from_disk(tmp_path / "jumprelu")
    )
    x = data(512, 7)
    expected = plugin.encode_batch(x)
    assert (expected != 0).sum() == 3 * 512
    assert torch.equal(rule.encode_batch(x) != 0, expected != 0)
    torch.testing.assert_close(rule.encode_batch(x), expected)
    # so calibration on the export fits the plugin's rule
    exported = SAE.load_from_disk(tmp_path / "jumprelu")
    ours = calibrate_thresholds(exported, [x], batch_size=512, min_selections=0)
    reference = calibrate_thresholds(plugin, [x], batch_size=512, min_selections=0)
    assert torch.equal(ours.selected, reference.selected)
    torch.testing.assert_close(ours.thresholds, reference.thresholds)


# --- the rule table ----------------------------------------------------------------


def test_threshold_modes_are_the_rule_table_and_the_config_type():
    assert THRESHOLD_MODES == tuple(THRESHOLD_RULES) == get_args(ThresholdMode)


def test_training_step_runs_the_rule_the_table_holds(monkeypatch):
    seen = []

    def constant(step):
        seen.append(step.n_tokens)
        return torch.full_like(step.threshold, 7.0)

    monkeypatch.setitem(THRESHOLD_RULES, "global", constant)
    torch.manual_seed(0)
    cfg = MutualChoiceTrainingSAEConfig(
        d_in=D_IN, d_sae=D_SAE, k=2, threshold_mode="global"
    )
    sae = MutualChoiceTrainingSAE(cfg)
    sae.training_forward_pass(step_input(torch.randn(6, D_IN)))
    assert seen == [6]
    assert sae.running_threshold.tolist() == [7.0] * D_SAE
