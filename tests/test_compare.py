"""``sae-lens-sampled compare``: run specs, a small synthetic run, LM mode offline."""

from __future__ import annotations

import json

import pytest
import torch
from sae_lens.registry import SAE_TRAINING_CLASS_REGISTRY

from sae_lens_sampled.benchmark import CompareConfig, RunSpec, run_compare
from sae_lens_sampled.benchmark.report import format_table, write_plots
from sae_lens_sampled.benchmark.specs import (
    build_sae_config,
    parse_run_specs,
    resolve_runs,
)
from sae_lens_sampled.benchmark.summary import summarize
from sae_lens_sampled.cli import main as cli_main
from tests.helpers import HOOK, tiny_model, token_dataset

BATCH_LEVEL = {"batchtopk", "sampled", "feature_choice", "mutual_choice"}


def test_parse_run_specs_groups_settings_with_their_architecture():
    specs = parse_run_specs("topk, sampled:pool_factor=4,score=entropy,mutual_choice")
    assert [(s.architecture, s.params) for s in specs] == [
        ("topk", {}),
        ("sampled", {"pool_factor": 4, "score": "entropy"}),
        ("mutual_choice", {}),
    ]
    assert specs[1].label == "sampled:pool_factor=4,score=entropy"
    # "default" expands to the default set, which has 7 runs.
    assert len(parse_run_specs("default,topk:k=3")) == 8
    assert parse_run_specs("x:flag=true,seed=none,lr=1e-3")[0].params == {
        "flag": True,
        "seed": None,
        "lr": 0.001,
    }


def test_parse_run_specs_rejects_orphan_settings():
    with pytest.raises(ValueError, match="before any architecture"):
        parse_run_specs("pool_factor=4,sampled")


def test_resolve_runs_rejects_unknown_architecture():
    with pytest.raises(ValueError, match="unknown architecture 'nope'"):
        resolve_runs([RunSpec("topk"), RunSpec("nope")])


def test_resolve_runs_skips_an_unregistered_optional_architecture(monkeypatch):
    monkeypatch.delitem(SAE_TRAINING_CLASS_REGISTRY, "feature_choice", raising=False)
    runs, notes = resolve_runs(parse_run_specs("default"))
    assert [s.architecture for s in runs] == [
        "topk",
        "batchtopk",
        "sampled",
        "sampled",
        "sampled",
        "mutual_choice",
    ]
    assert notes == [
        "skipped feature_choice: architecture 'feature_choice' is not registered "
        "in this installation"
    ]


def test_build_sae_config_applies_shared_k_and_spec_settings():
    topk = build_sae_config(RunSpec("topk"), d_in=8, d_sae=32, k=6.0)
    assert (topk.d_in, topk.d_sae, topk.k) == (8, 32, 6)
    assert isinstance(topk.k, int)
    sampled = build_sae_config(
        RunSpec("sampled", {"pool_factor": 2.0}), d_in=8, d_sae=32, k=2.5
    )
    assert (sampled.k, sampled.pool_factor, sampled.pool_seed) == (2.5, 2.0, None)
    with pytest.raises(ValueError, match="k must be a whole number"):
        build_sae_config(RunSpec("topk"), d_in=8, d_sae=32, k=2.5)
    with pytest.raises(ValueError, match="has no setting 'poolfactor'"):
        build_sae_config(RunSpec("sampled", {"poolfactor": 2}), d_in=8, d_sae=32, k=2)


def test_none_is_a_string_for_fields_that_take_no_none():
    spec = parse_run_specs("sampled:aux_loss=none,pool_seed=none")[0]
    assert spec.params == {"aux_loss": None, "pool_seed": None}
    cfg = build_sae_config(spec, d_in=8, d_sae=32, k=2)
    assert (cfg.aux_loss, cfg.pool_seed) == ("none", None)


def test_compare_config_rejects_bad_values():
    with pytest.raises(ValueError, match="steps must be in"):
        CompareConfig(steps=0)
    with pytest.raises(ValueError, match="k must be in"):
        CompareConfig(k=300, d_sae=256)
    with pytest.raises(ValueError, match="hook must be set"):
        CompareConfig(model="pythia-160m")
    with pytest.raises(ValueError, match="seeds must be in"):
        CompareConfig(seeds=0)
    with pytest.raises(ValueError, match="normalize_activations must be one of"):
        CompareConfig(normalize_activations="unit")
    with pytest.raises(ValueError, match="data must be one of default, lottery"):
        CompareConfig(data="zipf")
    with pytest.raises(ValueError, match="data='lottery' names a synthetic data set"):
        CompareConfig(data="lottery", activations="acts.npy")
    # None means "the mode's default" only where a field offers one.
    for name in ("d_sae", "steps", "batch_size", "seeds", "dead_feature_window"):
        with pytest.raises(
            ValueError, match=rf"{name} must be in \[1, inf\), got None"
        ):
            CompareConfig(**{name: None})
    assert CompareConfig(eval_samples=None, threads=None).threads is None


def test_lottery_data_makes_the_rare_features_the_strongest():
    from sae_lens_sampled.benchmark.synthetic import (
        SYNTHETIC_DATA,
        SyntheticSource,
        default_synthetic_model_config,
        lottery_synthetic_model_config,
    )

    assert set(SYNTHETIC_DATA) == {"default", "lottery"}
    default = default_synthetic_model_config(3)
    lottery = lottery_synthetic_model_config(3)
    magnitudes = lottery.mean_firing_magnitudes.generate(256)
    assert magnitudes[0] == pytest.approx(0.5) and magnitudes[-1] == pytest.approx(20)
    # everything else is the default data
    assert lottery.firing_probability == default.firing_probability
    assert lottery.hierarchy == default.hierarchy
    assert lottery.seed == default.seed == 3
    source = SyntheticSource(CompareConfig(data="lottery", seed=1), None)
    assert source.model.cfg == lottery_synthetic_model_config(1)
    assert source.describe()["synthetic_model"] == "lottery"
    source.start_seed(2)
    assert source.model.cfg == lottery_synthetic_model_config(2)


def check_result_ranges(result: dict, d_sae: int) -> None:
    assert 0 <= result["l0"] <= d_sae
    assert result["explained_variance"] <= 1
    assert 0 <= result["dead_features"] <= d_sae
    assert result["tokens_per_second"] > 0
    assert result["tokens_per_second"] == pytest.approx(
        result["training_tokens"] / result["train_seconds"]
    )
    if result["architecture"] in BATCH_LEVEL:
        assert 0 <= result["l0_batch"] <= d_sae
        assert result["explained_variance_batch"] <= 1
        assert 0 <= result["dead_features_batch"] <= d_sae
    else:
        assert result["l0_batch"] is None


def test_synthetic_compare_writes_one_sane_result_per_run(tmp_path, capsys):
    specs = "topk,batchtopk,sampled:pool_factor=4,score=entropy,mutual_choice"
    if "feature_choice" in SAE_TRAINING_CLASS_REGISTRY:
        specs += ",feature_choice"
    runs = parse_run_specs(specs)
    k, d_sae, steps, batch = 4, 64, 15, 256
    payload = run_compare(
        runs=runs,
        k=k,
        d_sae=d_sae,
        steps=steps,
        batch_size=batch,
        eval_samples=1024,
        output=str(tmp_path),
        plots=False,
    )
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved == json.loads(json.dumps(payload))
    assert saved["mode"] == "synthetic"
    results = saved["results"]
    assert [r["label"] for r in results] == [s.label for s in runs]
    by_label = {r["label"]: r for r in results}
    for result in results:
        check_result_ranges(result, d_sae)
        assert -1 <= result["mcc"] <= 1
        assert result["training_tokens"] == steps * batch
        assert result["params"]["k"] == k
        assert result["params"]["d_sae"] == d_sae
    assert by_label["sampled:pool_factor=4,score=entropy"]["params"] == {
        "pool_factor": 4,
        "score": "entropy",
        "k": 4.0,
        "d_sae": d_sae,
    }
    # TopK keeps at most k per token; the batch rules keep k * batch per batch.
    assert by_label["topk"]["l0"] <= k
    for label in ("batchtopk", "mutual_choice"):
        assert by_label[label]["l0_batch"] <= k + 1e-6
    # Mutual Choice selects exactly what BatchTopK does: same seed, same training.
    for key in ("l0_batch", "explained_variance_batch", "mcc"):
        assert by_label["mutual_choice"][key] == pytest.approx(
            by_label["batchtopk"][key], rel=1e-3
        )
    # Absorption is measured per token and under the batch rule (the default data
    # has a hierarchy), for per-token architectures only per token.
    for result in results:
        assert 0 <= result["absorption"] <= 1
    assert by_label["topk"]["absorption_batch"] is None
    assert 0 <= by_label["mutual_choice"]["absorption_batch"] <= 1
    # The terminal table lists every run; the inference SAEs are saved.
    table = capsys.readouterr().out
    assert all(r["label"] in table for r in results)
    assert len(list((tmp_path / "saes").glob("*/cfg.json"))) == len(runs)
    # No calibration unless asked: the learned thresholds are what is measured.
    assert all(r["l0_calibrated"] is None for r in results)
    assert "L0 calib" not in table and "EV calib" not in table


def test_compare_calibrates_plugin_runs_only_when_asked(tmp_path, capsys):
    runs = parse_run_specs("batchtopk,mutual_choice")
    payload = run_compare(
        runs=runs,
        k=4,
        d_sae=64,
        steps=10,
        batch_size=256,
        eval_samples=1024,
        output=None,
        calibrate=True,
    )
    by_label = {r["label"]: r for r in payload["results"]}
    assert by_label["batchtopk"]["l0_calibrated"] is None  # SAELens's own SAE
    calibrated = by_label["mutual_choice"]
    assert 0 < calibrated["l0_calibrated"] < 64
    assert -1 < calibrated["explained_variance_calibrated"] <= 1
    assert payload["config"]["calibrate"] is True
    assert "L0 calib" in capsys.readouterr().out


def test_lm_mode_runs_offline_with_a_tiny_model(tmp_path):
    runs = [RunSpec("batchtopk"), RunSpec("sampled", {"pool_factor": 4.0})]
    d_sae = 64
    payload = run_compare(
        runs=runs,
        k=4,
        d_sae=d_sae,
        steps=10,
        batch_size=128,
        eval_samples=512,
        hook=HOOK,
        output=str(tmp_path),
        plots=False,
        override_model=tiny_model(),
        override_dataset=token_dataset(),
    )
    assert payload["mode"] == "language_model"
    results = payload["results"]
    assert [r["architecture"] for r in results] == ["batchtopk", "sampled"]
    for result in results:
        check_result_ranges(result, d_sae)
        assert result["mcc"] is None
        assert result["training_tokens"] == 10 * 128
        assert isinstance(result["ce_loss_score"], float)
        # The batch rule keeps k * n_tokens entries of each eval batch.
        assert result["l0_batch"] <= 4 + 1e-6
    assert json.loads((tmp_path / "results.json").read_text())["mode"] == (
        "language_model"
    )


def test_cli_compare_runs_and_reports_bad_input(tmp_path, capsys):
    argv = ["compare", "--architectures", "topk", "--steps", "3", "--d-sae", "32"]
    argv += ["--batch-size", "64", "--eval-samples", "128", "--k", "2"]
    assert cli_main([*argv, "--output", str(tmp_path), "--no-plots"]) == 0
    results = json.loads((tmp_path / "results.json").read_text())["results"]
    assert [r["label"] for r in results] == ["topk"]
    assert results[0]["l0"] <= 2
    assert cli_main(["compare", "--steps", "0"]) == 2
    assert "steps must be in [1, inf), got 0" in capsys.readouterr().err


def test_format_table_marks_missing_values_and_drops_empty_columns():
    results = [
        {"label": "a", "l0": 2.0, "l0_batch": None, "dead_features": 3, "mcc": None},
        {"label": "bb", "l0": 10.5, "l0_batch": 4.0, "dead_features": 0, "mcc": None},
    ]
    lines = format_table(results).splitlines()
    assert lines[0].split() == ["run", "L0", "L0", "batch", "dead"]
    assert lines[2].split() == ["a", "2.00", "-", "3"]
    assert lines[3].split() == ["bb", "10.50", "4.00", "0"]


def test_write_plots_makes_pngs(tmp_path):
    pytest.importorskip("matplotlib")
    results = [
        {
            "label": "a",
            "architecture": "topk",
            "params": {},
            "l0": 2.0,
            "explained_variance": 0.5,
            "mcc": 0.7,
        },
        {
            "label": "b",
            "architecture": "batchtopk",
            "params": {},
            "l0": 3.0,
            "explained_variance": 0.4,
            "l0_batch": 2.0,
            "explained_variance_batch": 0.6,
            "mcc": 0.6,
        },
    ]
    paths = write_plots(summarize(results), tmp_path)
    # No two runs of one architecture: no spectrum.
    assert [p.name for p in paths] == ["ev_vs_l0.png", "mcc.png"]
    for path in paths:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_to_inference_sae_matches_saelens_save_and_load(tmp_path):
    from sae_lens import SAE, BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig

    from sae_lens_sampled.benchmark.runs import to_inference_sae

    sae = BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(d_in=8, d_sae=16, k=3))
    with torch.no_grad():
        sae.W_dec.mul_(torch.rand(16, 1) + 0.5)  # varied decoder norms to fold
        sae.b_enc.normal_()
        sae.topk_threshold.fill_(0.3)
    sae.save_inference_model(tmp_path)
    x = torch.randn(20, 8)
    expected = SAE.load_from_disk(tmp_path).encode(x)
    assert torch.allclose(to_inference_sae(sae).encode(x), expected, atol=1e-6)
    # Building the inference SAE leaves the training SAE untouched.
    assert sae.topk_threshold.dtype == torch.float64


def test_batch_rule_view_selects_over_the_batch_in_eval_mode():
    from sae_lens import (
        BatchTopKTrainingSAE,
        BatchTopKTrainingSAEConfig,
        TopKTrainingSAE,
        TopKTrainingSAEConfig,
    )

    from sae_lens_sampled.benchmark.runs import batch_rule_view

    sae = BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(d_in=8, d_sae=16, k=3))
    with torch.no_grad():
        sae.b_enc.fill_(5.0)  # every pre-activation positive
    sae.eval()
    acts = batch_rule_view(sae).encode(torch.randn(10, 8))
    assert int((acts != 0).sum()) == 30  # k * n_tokens entries over the batch
    topk = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=8, d_sae=16, k=3))
    assert batch_rule_view(topk) is None


def test_replayed_activations_serve_the_same_batches():
    from sae_lens_sampled.benchmark.synthetic import ReplayedActivations

    batches = [torch.ones(4, 3), torch.zeros(2, 3)]
    replay = ReplayedActivations(batches)
    assert replay.sample(4) is batches[0]
    assert replay.sample(2) is batches[1]
    with pytest.raises(ValueError, match="replayed batch has 4 rows, not 5"):
        ReplayedActivations(batches).sample(5)


def test_compare_absorption_is_the_metric_on_the_eval_samples(tmp_path):
    """The absorption column equals absorption_metrics on the saved SAE and the
    replayed eval samples, so compare adds nothing of its own to the metric."""
    from sae_lens import SAE

    from sae_lens_sampled.benchmark.absorption import absorption_metrics
    from sae_lens_sampled.benchmark.synthetic import SyntheticSource

    settings = dict(k=4, d_sae=64, steps=15, batch_size=256, eval_samples=1024)
    payload = run_compare(
        runs=parse_run_specs("mutual_choice"),
        output=str(tmp_path),
        plots=False,
        **settings,
    )
    (result,) = payload["results"]
    source = SyntheticSource(CompareConfig(**settings, output=None), None)
    source.start_seed(0)
    sae = SAE.load_from_disk(next((tmp_path / "saes").glob("*")))
    direct = absorption_metrics(
        sae.encode,
        sae.W_dec,
        source.model,
        torch.cat(source.eval_batches),
        batch_size=256,
    )
    assert result["absorption"] == pytest.approx(direct.absorption, abs=1e-9)
