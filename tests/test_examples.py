"""Every script in examples/ runs here, offline, at a size that takes seconds.

The training examples run with ``--offline`` (a tiny random model and generated
tokens instead of Pythia-160M and the Pile); the HookedSAETransformer walk-through
runs with its hub-loading function replaced (tests/test_example_hooked.py). Each test
checks what the example prints and returns, not just that it exits.
"""

from __future__ import annotations

import importlib.util
import math
import re
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch
from sae_lens import SAE

EXAMPLES = Path(__file__).parent.parent / "examples"

# Each example and the test that runs it. A new example must be added here (and
# tested), or test_every_example_is_run fails.
RUN_BY = {
    "aux_zipf_synthetic.py": "test_aux_zipf_synthetic",
    "load_into_hooked_sae_transformer.py": "test_hooked_walk_through_offline "
    "(and test_example_hooked.py)",
    "pythia_setup.py": "test_training_example (imported by each train_*.py)",
    "train_feature_choice.py": "test_training_example",
    "train_mutual_choice.py": "test_training_example",
    "train_sampled.py": "test_training_example",
    "train_sampled_tiny_offline.py": "test_tiny_offline_comparison",
}


def load_example(name: str, monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """Import ``examples/<name>`` as its own script would see it (examples/ on the
    path, for ``from pythia_setup import ...``)."""
    monkeypatch.syspath_prepend(str(EXAMPLES))
    module_name = f"example_{name.removesuffix('.py')}"
    spec = importlib.util.spec_from_file_location(module_name, EXAMPLES / name)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    # registered while it runs, as a script is (dataclasses look their module up)
    monkeypatch.setitem(sys.modules, module_name, module)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def _restore_threads():
    # The examples set torch's thread count for their own process.
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_every_example_is_run():
    scripts = sorted(path.name for path in EXAMPLES.glob("*.py"))
    assert scripts == sorted(RUN_BY), (
        "examples/ and RUN_BY in tests/test_examples.py disagree: add a test for "
        f"each new example; scripts {scripts}, tested {sorted(RUN_BY)}"
    )


@pytest.mark.parametrize(
    ("script", "architecture", "sae_class"),
    [
        ("train_sampled.py", "sampled", "SampledSAE"),
        ("train_mutual_choice.py", "mutual_choice", "MutualChoiceSAE"),
        ("train_feature_choice.py", "feature_choice", "FeatureChoiceSAE"),
    ],
)
def test_training_example(
    script, architecture, sae_class, tmp_path, monkeypatch, capsys
):
    output = tmp_path / "out"
    example = load_example(script, monkeypatch)

    summary = example.main(["--offline", "--output", str(output), "--k", "4"])

    printed = capsys.readouterr().out
    offline = sys.modules["pythia_setup"].OFFLINE
    assert summary["architecture"] == architecture
    assert summary["class"] == sae_class
    assert summary["d_sae"] == 16 * offline.d_model  # the default --expansion
    # The batch rule keeps k codes per token on average over each batch: the
    # moving average the saved SAE records is k, up to tokens whose selected
    # pre-activation is exactly 0 (not counted as active).
    assert summary["l0_batch_rule"] == pytest.approx(4.0, abs=0.1)
    # Long enough for the per-token thresholds to settle: the saved SAE fires about
    # k features per token, as training selected.
    assert summary["l0_per_token"] == pytest.approx(4.0, rel=0.2)
    assert 0 <= summary["dead_features"] <= summary["d_sae"]
    # what it printed is what the saved SAE says
    saved = SAE.load_from_disk(output)
    assert type(saved).__name__ == sae_class
    assert saved.cfg.metadata.l0_batch_rule == summary["l0_batch_rule"]
    assert saved.cfg.metadata.hook_name == offline.hook
    assert (
        f"saved a {architecture} SAE ({sae_class}, d_sae {summary['d_sae']}, k 4)"
        in printed
    )
    assert f"L0 under the batch rule {summary['l0_batch_rule']:.2f}" in printed
    assert f"per token {summary['l0_per_token']:.2f}" in printed


def test_hooked_walk_through_offline(tmp_path, monkeypatch, capsys):
    # What its docstring shows: train with --offline, then walk through --offline.
    output = str(tmp_path / "sae")
    trainer = load_example("train_mutual_choice.py", monkeypatch)
    # A short run: this test is about loading, not about settled thresholds.
    trainer.main(["--offline", "--output", output, "--k", "4"]
                 + ["--training-tokens", str(60 * 256)])  # fmt: skip
    example = load_example("load_into_hooked_sae_transformer.py", monkeypatch)
    capsys.readouterr()

    figures = example.main([output, "--offline"])

    printed = capsys.readouterr().out.splitlines()
    hook = sys.modules["pythia_setup"].OFFLINE.hook
    assert printed[0] == f"MutualChoiceSAE {hook} d_sae = 512"
    assert printed[1] == (
        f"mean L0 per token {figures['l0_token']:.2f}, under the batch rule "
        f"{figures['l0_batch']:.2f}"
    )
    assert printed[2].startswith("top features of the last token: [(")
    # The batch rule keeps k codes per token over the 64 x 16 tokens.
    assert figures["l0_batch"] == pytest.approx(4.0, abs=0.05)
    # The per-token codes are the saved SAE's encode of the stand-in's activations.
    sae = SAE.load_from_disk(output)
    model, tokens = example.load_offline_model_and_tokens(sae)
    _, cache = model.run_with_cache(tokens, names_filter=hook)
    expected = (sae.encode(cache[hook]) > 0).sum(-1).float().mean().item()
    assert figures["l0_token"] == pytest.approx(expected)


def test_training_example_hub_settings_unchanged(tmp_path, monkeypatch):
    # Without --offline the runner config is the paper's setting (built, not run:
    # building downloads nothing).
    example = load_example("train_sampled.py", monkeypatch)
    setup = sys.modules["pythia_setup"]
    args = setup.base_parser("x").parse_args(["--output", str(tmp_path)])
    cfg = setup.runner_config(
        example.SampledTrainingSAEConfig(**setup.sae_fields(args), pool_factor=4.0),
        args,
    )
    assert (cfg.model_name, cfg.hook_name, cfg.dataset_path) == (
        "pythia-160m-deduped",
        "blocks.6.hook_resid_post",
        "monology/pile-uncopyrighted",
    )
    assert (cfg.context_size, cfg.train_batch_size_tokens) == (1024, 4096)
    assert cfg.training_tokens == 50_000_000 and cfg.device == "cuda"
    assert (cfg.sae.d_in, cfg.sae.d_sae, cfg.sae.k) == (768, 768 * 16, 32.0)


def test_tiny_offline_comparison(monkeypatch, capsys):
    example = load_example("train_sampled_tiny_offline.py", monkeypatch)

    rows = example.main(["--steps", "30"])

    printed = capsys.readouterr().out.splitlines()
    k = example.K
    assert set(rows) == {"sampled", "mutual_choice", "batchtopk"}
    for name in ("sampled", "mutual_choice"):
        l0_batch, ev_batch, l0_token, _, l0_calib, ev_calib = rows[name]
        # the batch rule keeps exactly k * n_tokens codes of the 2048 eval tokens
        assert l0_batch == pytest.approx(k, abs=1e-6)
        assert 0 < l0_token < example.D_SAE and 0 < l0_calib < example.D_SAE
        assert -1 < ev_batch <= 1 and -1 < ev_calib <= 1
    # Calibrated on held-out tokens to the batch rule's firing rates. (Not asserted
    # for sampled: after 30 steps most of its features are in no pool drawn on the
    # 2048 calibration tokens and keep their thresholds.)
    assert rows["mutual_choice"][4] == pytest.approx(k, rel=0.3)
    # SAELens saves batchtopk as a per-token JumpReLU SAE: no batch-rule columns
    l0_batch, ev_batch, l0_token, ev_token, l0_calib, ev_calib = rows["batchtopk"]
    assert all(math.isnan(v) for v in (l0_batch, ev_batch, l0_calib, ev_calib))
    assert 0 < l0_token < example.D_SAE and -1 < ev_token <= 1
    # one header and one row per architecture, with the returned values
    assert printed[0].split() == ["architecture", *" ".join(example.COLUMNS).split()]
    for line, (name, values) in zip(printed[1:], rows.items(), strict=True):
        cells = line.split()
        assert cells[0] == name
        assert cells[1:] == [f"{v:.3f}" for v in values]


def test_aux_zipf_synthetic(monkeypatch, capsys):
    example = load_example("aux_zipf_synthetic.py", monkeypatch)
    small = [
        "--num-features", "64", "--hidden-dim", "16", "--d-sae", "64",
        "--steps", "40", "--batch-size", "128", "--eval-samples", "2048",
        "--dead-window", "10", "--ema-tokens", "2000",
    ]  # fmt: skip
    # aux_k with coefficient 0 trains exactly as no aux loss at all
    variants = ["none", "aux_k:0.1:0", "aux_zipf:0.5:1.0"]

    rows = example.main([*small, "--variants", *variants])

    printed = capsys.readouterr().out.splitlines()
    assert [r["variant"] for r in rows] == [
        "none(c=1)",
        "aux_k(c=0)",
        "aux_zipf(tau=0.5,c=1)",
    ]
    none, zero, zipf = rows
    for key in ("ev", "mcc", "l0", "rate_dead", "underutil"):
        assert none[key] == zero[key], key
    for row in rows:
        # aux_zipf's set U holds the dead features and its head is part of it
        assert row["rate_dead"] <= row["underutil"] <= 64
        assert row["under_head"] <= row["underutil"]
        assert 0 <= row["mcc"] <= 1 and row["ev"] <= 1
    assert zipf["ev"] != none["ev"]  # the aux loss changed training
    assert printed[0].startswith("synthetic: 64 features in 16 dims")
    table = [line.split() for line in printed[2:]]
    assert [cells[0] for cells in table] == [r["variant"] for r in rows]
    assert [cells[2] for cells in table] == [f"{r['ev']:.4f}" for r in rows]


def test_aux_zipf_variant_parsing(monkeypatch):
    example = load_example("aux_zipf_synthetic.py", monkeypatch)
    variant = example.Variant.parse("aux_zipf:0.25:2")
    assert (variant.aux_loss, variant.tau, variant.coefficient) == ("aux_zipf", 0.25, 2)
    assert variant.label == "aux_zipf(tau=0.25,c=2)"
    assert example.Variant.parse("aux_k").label == "aux_k(c=1)"


def test_examples_say_how_to_run_them():
    # every script's docstring shows its command line
    for path in sorted(EXAMPLES.glob("*.py")):
        if path.name == "pythia_setup.py":
            continue  # imported by the train_*.py scripts, not run
        text = path.read_text()
        assert re.search(rf"python examples/{re.escape(path.name)}\b", text), path.name
