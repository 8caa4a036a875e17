"""An error caused by a value the user never set says it is the default."""

from __future__ import annotations

import dataclasses

import pytest

from sae_lens_sampled import (
    FeatureChoiceSAEConfig,
    FeatureChoiceTrainingSAEConfig,
    MutualChoiceSAEConfig,
    MutualChoiceTrainingSAEConfig,
    SampledSAEConfig,
    SampledTrainingSAEConfig,
)
from sae_lens_sampled.saes.base import FieldValueError, is_default, shown

CONFIGS = [
    SampledTrainingSAEConfig,
    FeatureChoiceTrainingSAEConfig,
    MutualChoiceTrainingSAEConfig,
    SampledSAEConfig,
    FeatureChoiceSAEConfig,
    MutualChoiceSAEConfig,
]


def default_k(config_class: type) -> float:
    [field] = [f for f in dataclasses.fields(config_class) if f.name == "k"]
    return field.default


@pytest.mark.parametrize("config_class", CONFIGS, ids=lambda c: c.__name__)
def test_default_k_above_d_sae_says_it_is_the_default(config_class):
    k = default_k(config_class)
    d_sae = int(k) // 2
    with pytest.raises(FieldValueError) as info:
        config_class(d_in=8, d_sae=d_sae)
    assert str(info.value) == f"k must be in (0, {d_sae}], got {k!r} (the default)"
    assert (info.value.name, info.value.value) == ("k", k)


@pytest.mark.parametrize("config_class", CONFIGS, ids=lambda c: c.__name__)
def test_value_set_by_the_user_is_not_called_the_default(config_class):
    with pytest.raises(ValueError) as info:
        config_class(d_in=8, d_sae=16, k=20)
    assert str(info.value) == "k must be in (0, 16], got 20"


def test_cross_field_error_marks_only_the_default():
    with pytest.raises(ValueError) as info:
        SampledTrainingSAEConfig(
            d_in=8, d_sae=64, k=4, normalize_activations="layer_norm"
        )
    message = str(info.value)
    assert message.startswith(
        "aux_loss='aux_k' (the default) cannot be combined with "
        "normalize_activations='layer_norm': "
    )


def test_is_default_and_shown():
    cfg = SampledTrainingSAEConfig(d_in=8, d_sae=64, k=4, score="entropy")
    assert is_default(cfg, "pool_mode") and not is_default(cfg, "score")
    assert not is_default(cfg, "d_in")  # no default at all
    assert shown(cfg, "pool_mode") == "pool_mode='sample' (the default)"
    assert shown(cfg, "score") == "score='entropy'"
