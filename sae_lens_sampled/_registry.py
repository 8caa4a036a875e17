"""Idempotent registration of the plugin's architectures in SAELens's registries."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sae_lens import register_sae_class, register_sae_training_class
from sae_lens.registry import SAE_CLASS_REGISTRY, SAE_TRAINING_CLASS_REGISTRY

if TYPE_CHECKING:
    from sae_lens.saes.sae import SAE, SAEConfig, TrainingSAE, TrainingSAEConfig

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
