"""The flat form ``LanguageModelSAERunnerConfig(architecture=..., d_in=..., k=..., ...)``."""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import pickle
from pathlib import Path
from typing import Any

import pytest
import torch
from sae_lens import (
    LanguageModelSAERunnerConfig,
    LanguageModelSAETrainingRunner,
    LoggingConfig,
    TopKTrainingSAEConfig,
)

import sae_lens_sampled.flat_config as flat_config
from sae_lens_sampled import (
    FeatureChoiceTrainingSAEConfig,
    MutualChoiceTrainingSAEConfig,
    SampledTrainingSAEConfig,
)
from tests.helpers import CONTEXT, D_MODEL, HOOK, tiny_model, token_dataset

# Per architecture: its training config class and SAE fields away from their
# defaults (SAELens's own fields among them).
SAE_FIELDS: dict[str, tuple[type, dict[str, Any]]] = {
    "sampled": (
        SampledTrainingSAEConfig,
        {"k": 4, "pool_factor": 4.0, "score": "entropy", "pool_seed": 3},
    ),
    "feature_choice": (
        FeatureChoiceTrainingSAEConfig,
        {"k": 4, "capacity_schedule": "uniform", "rerank_every": 7},
    ),
    "mutual_choice": (
        MutualChoiceTrainingSAEConfig,
        {"k": 4, "aux_loss": "aux_zipf", "zipf_tau": 0.2},
    ),
    "topk": (TopKTrainingSAEConfig, {"k": 4}),  # a SAELens built-in works too
}
COMMON_SAE_FIELDS = {
    "d_in": D_MODEL,
    "d_sae": 64,
    "decoder_init_norm": 0.2,
    "normalize_activations": "expected_average_only_in",
}


def runner_fields(tmp_path: Path) -> dict[str, Any]:
    """Runner settings away from their defaults; dtype is also an SAE field name."""
    return {
        "hook_name": HOOK,
        "context_size": CONTEXT,
        "is_dataset_tokenized": True,
        "streaming": False,
        "prepend_bos": False,
        "training_tokens": 10 * 64,
        "train_batch_size_tokens": 64,
        "store_batch_size_prompts": 4,
        "n_batches_in_buffer": 8,
        "lr": 1e-3,
        "dtype": "float64",
        "device": "cpu",
        "seed": 5,
        "logger": LoggingConfig(log_to_wandb=False),
        "checkpoint_path": None,  # else a random id is appended
        "output_path": str(tmp_path / "out"),
        "verbose": False,
        "exclude_special_tokens": False,
    }


def flat_and_nested(architecture: str, tmp_path: Path) -> tuple[Any, Any]:
    config_class, fields = SAE_FIELDS[architecture]
    sae_fields = {**COMMON_SAE_FIELDS, **fields}
    flat = LanguageModelSAERunnerConfig(
        architecture=architecture, **sae_fields, **runner_fields(tmp_path)
    )
    nested = LanguageModelSAERunnerConfig(
        sae=config_class(**sae_fields), **runner_fields(tmp_path)
    )
    return flat, nested


@pytest.mark.parametrize("architecture", sorted(SAE_FIELDS))
def test_flat_form_builds_the_nested_config(architecture, tmp_path):
    flat, nested = flat_and_nested(architecture, tmp_path)
    assert type(flat) is LanguageModelSAERunnerConfig
    assert type(flat.sae) is SAE_FIELDS[architecture][0]
    assert flat == nested
    assert flat.to_dict() == nested.to_dict()
    # Names both configs have go to the runner, as in SAELens's CLI.
    assert (flat.dtype, flat.sae.dtype) == ("float64", "float32")


@pytest.mark.parametrize("architecture", ["sampled", "feature_choice", "mutual_choice"])
def test_flat_config_round_trips_through_dicts(architecture, tmp_path):
    flat, _ = flat_and_nested(architecture, tmp_path)
    restored = LanguageModelSAERunnerConfig.from_dict(flat.to_dict())
    assert restored == flat
    assert restored.sae.to_dict() == flat.sae.to_dict()
    assert pickle.loads(pickle.dumps(flat)) == flat


def test_flat_and_nested_configs_train_the_same_sae(tmp_path):
    weights = []
    for form, cfg in zip(
        ("flat", "nested"), flat_and_nested("sampled", tmp_path), strict=True
    ):
        cfg.output_path = str(tmp_path / form)
        sae = LanguageModelSAETrainingRunner(
            cfg, override_model=tiny_model(), override_dataset=token_dataset(100)
        ).run()
        weights.append(sae.state_dict())
        assert sae.cfg.metadata.l0 == pytest.approx(4.0, abs=0.05)
    assert weights[0].keys() == weights[1].keys()
    for name in weights[0]:
        torch.testing.assert_close(weights[0][name], weights[1][name], rtol=0, atol=0)


def test_unknown_architecture_is_refused():
    with pytest.raises(ValueError) as info:
        LanguageModelSAERunnerConfig(architecture="smapled", d_in=8, d_sae=64)
    message = str(info.value)
    assert "architecture='smapled'" in message
    assert "not a registered training architecture" in message
    assert "sampled" in message and "mutual_choice" in message


def test_field_of_another_architecture_is_refused():
    with pytest.raises(TypeError) as info:
        LanguageModelSAERunnerConfig(
            architecture="sampled", d_in=8, d_sae=64, capacity_schedule="zipf"
        )
    assert str(info.value) == (
        "LanguageModelSAERunnerConfig(architecture='sampled'): 'capacity_schedule' "
        "is neither a field of SampledTrainingSAEConfig nor of the runner config; "
        "it is a field of feature_choice"
    )


def test_misspelled_field_is_refused_with_a_suggestion():
    with pytest.raises(TypeError, match="'pool_factr'.*did you mean 'pool_factor'"):
        LanguageModelSAERunnerConfig(
            architecture="sampled", d_in=8, d_sae=64, pool_factr=4
        )


def test_missing_required_field_is_named():
    with pytest.raises(TypeError, match=r"architecture='sampled'\) needs d_in"):
        LanguageModelSAERunnerConfig(architecture="sampled", d_sae=64)


def test_sae_and_architecture_together_are_refused():
    sae = SampledTrainingSAEConfig(d_in=8, d_sae=64, k=4)
    with pytest.raises(TypeError, match="either sae=.* or architecture='sampled'"):
        LanguageModelSAERunnerConfig(sae=sae, architecture="sampled", d_in=8)
    with pytest.raises(TypeError, match="not both"):
        LanguageModelSAERunnerConfig(sae, architecture="sampled")


def test_bad_value_is_the_config_classs_error():
    with pytest.raises(ValueError, match=r"pool_factor must be in \[1, inf\), got 0.5"):
        LanguageModelSAERunnerConfig(
            architecture="sampled", d_in=8, d_sae=64, k=4, pool_factor=0.5
        )


def test_calls_without_architecture_reach_saelens_unchanged(tmp_path):
    cls = LanguageModelSAERunnerConfig
    wrapper = cls.__dict__["__init__"]
    assert flat_config.flat_form_installed()
    original = wrapper.__wrapped__
    assert not getattr(original, flat_config._MARKER, False)
    names = list(inspect.signature(cls).parameters)
    assert names == list(inspect.signature(original).parameters)[1:]
    assert "architecture" not in names
    sae = SampledTrainingSAEConfig(d_in=8, d_sae=64, k=4)
    direct = object.__new__(cls)
    original(direct, sae, **runner_fields(tmp_path))
    assert cls(sae, **runner_fields(tmp_path)) == direct  # positional sae
    assert dataclasses.replace(direct, lr=0.5).lr == 0.5
    # SAELens's own errors are untouched.
    with pytest.raises(TypeError, match="unexpected keyword argument 'pool_factor'"):
        cls(sae=sae, pool_factor=4)


def test_installing_again_wraps_saelens_init_once():
    original = LanguageModelSAERunnerConfig.__dict__["__init__"].__wrapped__
    flat_config.install_flat_form()
    importlib.reload(flat_config)
    flat_config.install_flat_form()
    init = LanguageModelSAERunnerConfig.__dict__["__init__"]
    assert init.__wrapped__ is original
    cfg = LanguageModelSAERunnerConfig(
        architecture="sampled", d_in=8, d_sae=64, k=4, checkpoint_path=None
    )
    assert isinstance(cfg.sae, SampledTrainingSAEConfig)
