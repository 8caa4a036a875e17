"""The heavy half of the package: the architectures and their registration.

Importing this module imports SAELens and torch and registers every architecture of
the plugin in SAELens's registries (the package's ``__init__`` and the autoload hook
import it; nothing else needs to). It also installs the flat form of SAELens's
runner config (:mod:`sae_lens_sampled.flat_config`).
"""

from __future__ import annotations

from sae_lens_sampled._registry import register_architecture
from sae_lens_sampled.flat_config import install_flat_form
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

# key -> (inference SAE, its config, training SAE, its config)
ARCHITECTURES: dict[str, tuple[type, type, type, type]] = {
    "sampled": (
        SampledSAE,
        SampledSAEConfig,
        SampledTrainingSAE,
        SampledTrainingSAEConfig,
    ),
    "feature_choice": (
        FeatureChoiceSAE,
        FeatureChoiceSAEConfig,
        FeatureChoiceTrainingSAE,
        FeatureChoiceTrainingSAEConfig,
    ),
    "mutual_choice": (
        MutualChoiceSAE,
        MutualChoiceSAEConfig,
        MutualChoiceTrainingSAE,
        MutualChoiceTrainingSAEConfig,
    ),
}


def register_all() -> None:
    """Register every architecture and the flat config form; safe to call again."""
    for key, classes in ARCHITECTURES.items():
        register_architecture(key, *classes)
    install_flat_form()


register_all()
