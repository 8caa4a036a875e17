"""The HookedSAETransformer walk-through (examples/) runs offline on a tiny model:
its one hub-loading function is replaced by the tests' tiny random model."""

import importlib.util
from pathlib import Path

import pytest
import torch
from sae_lens import SAE, HookedSAETransformer, LanguageModelSAETrainingRunner

from sae_lens_sampled import MutualChoiceTrainingSAEConfig, SampledTrainingSAEConfig
from tests.helpers import (
    CONTEXT,
    D_MODEL,
    HOOK,
    VOCAB,
    runner_config,
    tiny_model,
    token_dataset,
)

EXAMPLE = (
    Path(__file__).parent.parent / "examples" / "load_into_hooked_sae_transformer.py"
)


def load_example():
    spec = importlib.util.spec_from_file_location("hooked_walk_through", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tiny_hooked_model() -> HookedSAETransformer:
    """The tests' tiny random transformer, as a HookedSAETransformer."""
    plain = tiny_model()
    model = HookedSAETransformer(plain.cfg)
    model.load_state_dict(plain.state_dict())
    return model


@pytest.mark.parametrize(
    "sae_cfg",
    [
        MutualChoiceTrainingSAEConfig(d_in=D_MODEL, d_sae=64, k=4),
        SampledTrainingSAEConfig(d_in=D_MODEL, d_sae=64, k=4, pool_factor=4),
    ],
    ids=["mutual_choice", "sampled"],
)
def test_walk_through_runs_offline_without_calibration(
    sae_cfg, tmp_path, capsys, monkeypatch
):
    model = tiny_hooked_model()
    cfg = runner_config(sae_cfg, tmp_path, steps=150)
    LanguageModelSAETrainingRunner(
        cfg, override_model=model, override_dataset=token_dataset()
    ).run()
    sae = SAE.load_from_disk(tmp_path / "final")  # what a user loads
    generator = torch.Generator().manual_seed(5)
    tokens = torch.randint(0, VOCAB, (64, CONTEXT), generator=generator)
    example = load_example()
    monkeypatch.setattr(
        example, "load_model_and_tokens_from_hub", lambda _sae: (model, tokens)
    )
    capsys.readouterr()

    figures = example.main([str(tmp_path / "final")])

    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == f"{type(sae).__name__} {HOOK} d_sae = 64"
    assert printed[1] == (
        f"mean L0 per token {figures['l0_token']:.2f}, under the batch rule "
        f"{figures['l0_batch']:.2f}"
    )
    assert printed[2].startswith("top features of the last token: [(")
    # the cached codes are the SAE's per-token encode of the hook's activations
    _, cache = model.run_with_cache(tokens, names_filter=HOOK)
    expected = (sae.encode(cache[HOOK]) > 0).sum(-1).float().mean().item()
    assert figures["l0_token"] == pytest.approx(expected)
    # faithful thresholds: per token about as many features as the batch rule keeps
    assert figures["l0_batch"] == pytest.approx(4.0, abs=0.05)
    assert figures["l0_token"] == pytest.approx(figures["l0_batch"], rel=0.2)
