"""The plugin's architecture registry, and its idempotent registration in SAELens.

Each architecture module declares one :class:`Architecture` entry (its key, classes
and batch rule); :mod:`sae_lens_sampled._plugin` hands the entries to
:func:`add_architecture`. Everything that needs the plugin's architectures (the
SAEs' ``select`` and ``select_ranked``, ``bench``, ``compare``, the data-parallel
trainer) reads them here.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sae_lens import register_sae_class, register_sae_training_class
from sae_lens.registry import SAE_CLASS_REGISTRY, SAE_TRAINING_CLASS_REGISTRY

if TYPE_CHECKING:
    from sae_lens.saes.sae import SAE, SAEConfig, TrainingSAE, TrainingSAEConfig

    from sae_lens_sampled.global_batch import Rule, Traffic


@dataclass(frozen=True)
class Architecture:
    """One architecture of the plugin, as its module declares it.

    Args:
        key: The registry key (``cfg.architecture()``), e.g. ``"mutual_choice"``.
        sae_class: The inference SAE.
        sae_config_class: Its config.
        training_sae_class: The training SAE.
        training_config_class: Its config.
        rule: The batch rule, ``rule(sae, acts, batch)`` on this process's rows of a
            :class:`~sae_lens_sampled.global_batch.GlobalBatch`: the training SAE's
            ``select``, the inference SAE's ``select_ranked`` and the data-parallel
            step all run it.
        traffic: The bytes the rule sends per data-parallel step (the traffic
            model's formula, ``traffic(cfg, n_tokens, costs)``), or None.
        traffic_cases: The settings the traffic model tabulates: a column name ->
            training config fields. Empty: one column, the key, with the defaults.
        lost_on_export: Config settings under which the rule reads learned state
            that :func:`~sae_lens_sampled.calibration.export_jumprelu` does not
            keep: field name -> (value, what is lost).
    """

    key: str
    sae_class: type[SAE[Any]]
    sae_config_class: type[SAEConfig]
    training_sae_class: type[TrainingSAE[Any]]
    training_config_class: type[TrainingSAEConfig]
    rule: Rule
    traffic: Traffic | None = None
    traffic_cases: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    lost_on_export: Mapping[str, tuple[Any, str]] = field(default_factory=dict)


_ARCHITECTURES: dict[str, Architecture] = {}

_PACKAGE = __name__.split(".")[0]


def _register_one(
    registry: dict[str, Any], register: Any, key: str, classes: tuple[type, type]
) -> None:
    existing = registry.get(key)
    if existing is None:
        register(key, *classes)
        return
    if existing[0].__module__.split(".")[0] != _PACKAGE:
        raise ValueError(
            f"architecture {key!r} is already registered by "
            f"{existing[0].__module__}.{existing[0].__qualname__}; "
            f"{_PACKAGE} cannot register it"
        )
    # Our own earlier registration (re-import, importlib.reload): point the key at
    # the current class objects.
    registry[key] = classes


def register_architecture(
    key: str,
    sae_class: type[SAE[Any]],
    sae_config_class: type[SAEConfig],
    training_sae_class: type[TrainingSAE[Any]],
    training_config_class: type[TrainingSAEConfig],
) -> None:
    """Register ``key`` in both SAELens registries; safe to call again."""
    _register_one(
        SAE_CLASS_REGISTRY, register_sae_class, key, (sae_class, sae_config_class)
    )
    _register_one(
        SAE_TRAINING_CLASS_REGISTRY,
        register_sae_training_class,
        key,
        (training_sae_class, training_config_class),
    )


def add_architecture(entry: Architecture) -> None:
    """Register ``entry`` in SAELens's registries and in the plugin's; idempotent."""
    register_architecture(
        entry.key,
        entry.sae_class,
        entry.sae_config_class,
        entry.training_sae_class,
        entry.training_config_class,
    )
    _ARCHITECTURES[entry.key] = entry


def architectures() -> list[Architecture]:
    """The plugin's architectures, in the order they were added."""
    # Importing the plugin's entry module adds its entries (once).
    importlib.import_module(f"{_PACKAGE}._plugin")
    return list(_ARCHITECTURES.values())


def architecture_keys() -> list[str]:
    """The registry keys of the plugin's architectures, in the order they were added."""
    return [entry.key for entry in architectures()]


def entry_of(key: str) -> Architecture | None:
    """The plugin's entry of architecture ``key``; None if it has none."""
    if key not in _ARCHITECTURES:
        architectures()  # the plugin's own entries are added on first use
    return _ARCHITECTURES.get(key)


def rule_of(key: str) -> Rule:
    """The batch rule of architecture ``key``."""
    entry = entry_of(key)
    if entry is None:
        raise KeyError(
            f"no batch rule for architecture {key!r}: it is not in the plugin's "
            f"registry (known: {architecture_keys()}); add it with add_architecture"
        )
    return entry.rule
