"""Batch-level feature selection for SAELens.

Importing this package registers the ``sampled``, ``feature_choice`` and
``mutual_choice`` architectures in SAELens's inference and training registries
(idempotently), so they work with ``LanguageModelSAERunnerConfig``,
``SAE.load_from_disk``, ``HookedSAETransformer`` and the training CLI exactly like
SAELens's built-ins. The import itself is cheap (the command line starts in
milliseconds): SAELens and torch are imported, and the architectures registered, at
the first use of a public name, when anyone imports ``sae_lens`` (a one-shot import
hook, ``sae_lens_sampled_autoload``), or at once if ``sae_lens`` is already imported.
So SAELens's registries hold the plugin's architectures whenever they can be read.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sae_lens_sampled._registry import register_architecture
    from sae_lens_sampled.calibration import calibrate_thresholds, export_jumprelu
    from sae_lens_sampled.saes.feature_choice_sae import (
        FeatureChoiceSAE,
        FeatureChoiceSAEConfig,
        FeatureChoiceTrainingSAE,
        FeatureChoiceTrainingSAEConfig,
    )
    from sae_lens_sampled.saes.mutual_choice_sae import (
        MutualChoiceSAE,
        MutualChoiceSAEConfig,
        MutualChoiceTrainingSAE,
        MutualChoiceTrainingSAEConfig,
    )
    from sae_lens_sampled.saes.sampled_sae import (
        SampledSAE,
        SampledSAEConfig,
        SampledTrainingSAE,
        SampledTrainingSAEConfig,
    )

    __version__: str

DISTRIBUTION = "sae-lens-sampled"
# The four classes of each architecture module ``saes/NAME_sae.py``, named after it
# (``feature_choice_sae``: ``FeatureChoiceSAE``, ``FeatureChoiceSAEConfig``, ...).
SAE_CLASS_SUFFIXES = ("SAE", "SAEConfig", "TrainingSAE", "TrainingSAEConfig")


def _architecture_names() -> dict[str, str]:
    """Public class name -> its module, for every architecture module, read from the
    file names so that importing the package imports neither torch nor SAELens."""
    names: dict[str, str] = {}
    for path in sorted((Path(__file__).parent / "saes").glob("*_sae.py")):
        words = path.stem.removesuffix("_sae").split("_")
        prefix = "".join(word.capitalize() for word in words)
        for suffix in SAE_CLASS_SUFFIXES:
            names[prefix + suffix] = f"{__name__}.saes.{path.stem}"
    return names


# Public name -> the module that defines it (imported on first use).
_LAZY: dict[str, str] = {
    **_architecture_names(),
    "calibrate_thresholds": f"{__name__}.calibration",
    "export_jumprelu": f"{__name__}.calibration",
    "register_architecture": f"{__name__}._registry",
}

# Written out for type checkers, which read __all__ and the imports above without
# running the module; tests/test_public_names.py checks they name what _LAZY finds.
__all__ = [
    "FeatureChoiceSAE",
    "FeatureChoiceSAEConfig",
    "FeatureChoiceTrainingSAE",
    "FeatureChoiceTrainingSAEConfig",
    "MutualChoiceSAE",
    "MutualChoiceSAEConfig",
    "MutualChoiceTrainingSAE",
    "MutualChoiceTrainingSAEConfig",
    "SampledSAE",
    "SampledSAEConfig",
    "SampledTrainingSAE",
    "SampledTrainingSAEConfig",
    "__version__",
    "calibrate_thresholds",
    "export_jumprelu",
    "register_architecture",
]


def _version() -> str:
    """The installed version (package metadata, set in pyproject.toml)."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed_version

    try:
        return installed_version(DISTRIBUTION)
    except PackageNotFoundError:  # a checkout on sys.path that was never installed
        return "0+unknown"


def _register() -> None:
    """Import SAELens and the architectures, and register them (idempotent)."""
    importlib.import_module("sae_lens_sampled._plugin").register_all()


def __getattr__(name: str) -> Any:
    if name == "__version__":
        value: Any = _version()
    elif name in _LAZY:
        _register()
        value = getattr(importlib.import_module(_LAZY[name]), name)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


def _register_or_arm() -> None:
    if "sae_lens" in sys.modules:
        _register()
        return
    try:
        import sae_lens_sampled_autoload
    except ImportError:  # the hook module is not importable here: register now
        _register()
        return
    sae_lens_sampled_autoload.install(force=True)


_register_or_arm()
