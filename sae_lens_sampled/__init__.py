"""Batch-level feature selection for SAELens.

Importing this package registers the ``sampled``, ``mutual_choice`` (and further)
architectures in SAELens's inference and training registries, so they work with
``LanguageModelSAERunnerConfig``, ``SAE.load_from_disk``, ``HookedSAETransformer`` and
the training CLI exactly like SAELens's built-ins. Registration is idempotent.
"""

from sae_lens_sampled._registry import register_architecture
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
from sae_lens_sampled.thresholds import calibrate_thresholds, export_jumprelu

__version__ = "0.1.0"

register_architecture(
    "sampled",
    SampledSAE,
    SampledSAEConfig,
    SampledTrainingSAE,
    SampledTrainingSAEConfig,
)
register_architecture(
    "feature_choice",
    FeatureChoiceSAE,
    FeatureChoiceSAEConfig,
    FeatureChoiceTrainingSAE,
    FeatureChoiceTrainingSAEConfig,
)
register_architecture(
    "mutual_choice",
    MutualChoiceSAE,
    MutualChoiceSAEConfig,
    MutualChoiceTrainingSAE,
    MutualChoiceTrainingSAEConfig,
)

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
